//! Registry errors as clients see them: an OCI/distribution error code, the HTTP status it maps
//! to, and the `{"errors":[...]}` JSON body. Every handler failure ends up here; internal error
//! types convert into `RegistryError` at the module boundary and never leak details of the host.

use std::fmt;

/// The error codes of the distribution spec plus the distribution extras clients know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    RangeInvalid,
    TagInvalid,
    PaginationNumberInvalid,
    /// `413`: a manifest over the size limit.
    ManifestTooLarge,
    NotFound,
    Unknown,
    Unavailable,
    /// `507`: the registry is out of disk space for new content.
    InsufficientStorage,
}

impl ErrorCode {
    /// The code string in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Self::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Self::ManifestInvalid | Self::ManifestTooLarge => "MANIFEST_INVALID",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameInvalid => "NAME_INVALID",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::SizeInvalid => "SIZE_INVALID",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Denied => "DENIED",
            Self::Unsupported => "UNSUPPORTED",
            Self::TooManyRequests => "TOOMANYREQUESTS",
            Self::RangeInvalid => "RANGE_INVALID",
            Self::TagInvalid => "TAG_INVALID",
            Self::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            Self::NotFound => "NOT_FOUND",
            Self::Unknown => "UNKNOWN",
            Self::Unavailable => "UNAVAILABLE",
            Self::InsufficientStorage => "INSUFFICIENT_STORAGE",
        }
    }

    /// The HTTP status for the code, the one distribution answers with.
    pub fn status(self) -> u16 {
        match self {
            Self::BlobUnknown
            | Self::BlobUploadInvalid
            | Self::BlobUploadUnknown
            | Self::ManifestUnknown
            | Self::NameUnknown
            | Self::NotFound => 404,
            Self::DigestInvalid
            | Self::ManifestBlobUnknown
            | Self::ManifestInvalid
            | Self::NameInvalid
            | Self::SizeInvalid
            | Self::TagInvalid
            | Self::PaginationNumberInvalid => 400,
            Self::Unauthorized => 401,
            Self::Denied => 403,
            Self::Unsupported => 405,
            Self::ManifestTooLarge => 413,
            Self::RangeInvalid => 416,
            Self::TooManyRequests => 429,
            Self::Unknown => 500,
            Self::Unavailable => 503,
            Self::InsufficientStorage => 507,
        }
    }
}

/// One registry error: a code and a human message. Optional `detail` is raw JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: String,
    pub detail: Option<String>,
    /// Overrides the code's default status (e.g. 416 for an out-of-order chunk).
    pub status: Option<u16>,
    /// Response headers the error needs (`WWW-Authenticate`, `Retry-After`).
    pub headers: Vec<(&'static str, String)>,
}

impl RegistryError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            detail: None,
            status: None,
            headers: Vec::new(),
        }
    }

    /// Adds a response header (name in lower case).
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Attaches a JSON value as `detail` (the caller guarantees it is valid JSON).
    pub fn with_detail_json(mut self, json: String) -> Self {
        self.detail = Some(json);
        self
    }

    pub fn status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.code.status())
    }

    /// `{"errors":[{"code":..,"message":..,"detail":..}]}`
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(64 + self.message.len());
        out.push_str(r#"{"errors":[{"code":""#);
        out.push_str(self.code.as_str());
        out.push_str(r#"","message":"#);
        out.push_str(&serde_json::Value::String(self.message.clone()).to_string());
        if let Some(detail) = &self.detail {
            out.push_str(r#","detail":"#);
            out.push_str(detail);
        }
        out.push_str("}]}");
        out
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unknown, message)
    }
    pub fn blob_unknown(digest: &impl fmt::Display) -> Self {
        Self::new(
            ErrorCode::BlobUnknown,
            format!("blob unknown to registry: {digest}"),
        )
    }
    pub fn manifest_unknown(reference: &impl fmt::Display) -> Self {
        Self::new(
            ErrorCode::ManifestUnknown,
            format!("manifest unknown: {reference}"),
        )
    }
    pub fn name_unknown(name: &impl fmt::Display) -> Self {
        Self::new(
            ErrorCode::NameUnknown,
            format!("repository name not known to registry: {name}"),
        )
    }
    pub fn upload_unknown() -> Self {
        Self::new(
            ErrorCode::BlobUploadUnknown,
            "blob upload unknown to registry",
        )
    }
    pub fn digest_invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::DigestInvalid, message)
    }
    pub fn manifest_invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ManifestInvalid, message)
    }
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Denied, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, message)
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for RegistryError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_escapes_message_and_keeps_detail() {
        let e = RegistryError::new(ErrorCode::NameInvalid, "bad \"name\"\n")
            .with_detail_json(r#"{"name":"x"}"#.into());
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "bad \"name\"\n");
        assert_eq!(v["errors"][0]["detail"]["name"], "x");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn statuses_follow_distribution() {
        assert_eq!(ErrorCode::BlobUploadInvalid.status(), 404);
        assert_eq!(ErrorCode::ManifestBlobUnknown.status(), 400);
        assert_eq!(ErrorCode::Unsupported.status(), 405);
        assert_eq!(ErrorCode::RangeInvalid.status(), 416);
        assert_eq!(ErrorCode::ManifestTooLarge.status(), 413);
        assert_eq!(ErrorCode::ManifestTooLarge.as_str(), "MANIFEST_INVALID");
        let e = RegistryError::new(ErrorCode::BlobUploadInvalid, "x").with_status(416);
        assert_eq!(e.status(), 416);
    }
}
