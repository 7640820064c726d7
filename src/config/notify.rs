//! `[[notify]]`: webhook endpoints that receive registry events (pushes, deletes, cache fills,
//! evictions, moved upstream tags, optionally pulls), and their validation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{HumanDuration, Secret, has_userinfo, redact_url};

/// One notification endpoint.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Names the endpoint in the outbox, metrics and `transship events`; default: the URL.
    /// Renaming an endpoint (or changing its URL without a name) starts it afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub url: String,
    pub format: NotifyFormat,
    #[serde(default = "default_events")]
    pub events: Vec<NotifyEvent>,
    /// Extra request headers (values may be credentials: rendered redacted).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "redacted_values"
    )]
    pub headers: BTreeMap<String, String>,
    /// Signs each body: `X-Transship-Signature: sha256=<hex HMAC-SHA256>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// One delivery attempt's limit.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// How long an event is retried before it is dead-lettered.
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
    /// The registry host named in events (`gcr` names, `distribution` target URLs); default:
    /// the listen address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Header values may be credentials: only their names are shown.
impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("format", &self.format)
            .field("events", &self.events)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("secret", &self.secret)
            .field("timeout", &self.timeout)
            .field("max_age", &self.max_age)
            .field("host", &self.host)
            .finish()
    }
}

impl NotifyConfig {
    /// The endpoint's stable name: `name`, else the URL's origin and a short hash of the whole
    /// URL. Never the path or query, which often carry a webhook's secret token: the id shows
    /// up in metrics labels, logs and `transship events ls`.
    pub fn id(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        use sha2::Digest as _;
        let start = self.url.find("://").map_or(0, |i| i + 3);
        let end = self.url[start..]
            .find(['/', '?', '#'])
            .map_or(self.url.len(), |j| start + j);
        let hash = sha2::Sha256::digest(self.url.as_bytes());
        format!("{}#{}", &self.url[..end], hex::encode(&hash[..4]))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// The distribution (Docker registry) webhook envelope.
    Distribution,
    /// CloudEvents 1.0, structured mode.
    Cloudevents,
    /// GCR's Pub/Sub message: `{"action":"INSERT"|"DELETE","digest":…,"tag":…}`.
    Gcr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotifyEvent {
    #[serde(rename = "push")]
    Push,
    #[serde(rename = "delete")]
    Delete,
    #[serde(rename = "pull")]
    Pull,
    #[serde(rename = "cache.fill")]
    CacheFill,
    #[serde(rename = "cache.evict")]
    CacheEvict,
    #[serde(rename = "tag.moved")]
    TagMoved,
}

fn redacted_values<S: serde::Serializer>(
    headers: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(headers.keys().map(|k| (k, super::REDACTED)))
}

fn default_events() -> Vec<NotifyEvent> {
    vec![
        NotifyEvent::Push,
        NotifyEvent::Delete,
        NotifyEvent::CacheFill,
        NotifyEvent::CacheEvict,
        NotifyEvent::TagMoved,
    ]
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}

/// Cross-key rules of the `[[notify]]` list.
pub(super) fn validate(endpoints: &[NotifyConfig]) -> Result<(), String> {
    for (i, n) in endpoints.iter().enumerate() {
        let url = redact_url(&n.url);
        if !(n.url.starts_with("https://") || n.url.starts_with("http://"))
            || n.url.parse::<http::Uri>().is_err()
        {
            return Err(format!(
                "notify.url {url:?} must be an http:// or https:// URL"
            ));
        }
        if has_userinfo(&n.url) {
            return Err(format!(
                "notify.url {url:?} must not hold credentials: use headers"
            ));
        }
        let id = n.id();
        if id.is_empty() || id.len() > 255 || id.chars().any(char::is_control) {
            return Err(format!(
                "notify endpoint {url:?}: name must be 1 to 255 printable characters"
            ));
        }
        if endpoints[..i].iter().any(|m| m.id() == id) {
            return Err(format!(
                "notify endpoint {:?} is declared twice (give each a distinct name)",
                redact_url(&id)
            ));
        }
        for (k, v) in &n.headers {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                || http::HeaderValue::from_str(v).is_err()
            {
                return Err(format!(
                    "notify endpoint {url:?}: header {k:?} is not a valid HTTP header"
                ));
            }
        }
        if n.events.is_empty() {
            return Err(format!("notify endpoint {url:?}: events is empty"));
        }
        if n.timeout.0.is_zero() || n.max_age.0.is_zero() {
            return Err(format!(
                "notify endpoint {url:?}: timeout and max_age must be more than 0"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<NotifyConfig>, String> {
        #[derive(Deserialize)]
        struct Doc {
            notify: Vec<NotifyConfig>,
        }
        let doc: Doc = toml::from_str(text).map_err(|e| e.to_string())?;
        validate(&doc.notify).map(|()| doc.notify)
    }

    #[test]
    fn defaults_and_rules() {
        let n = parse("[[notify]]\nurl = \"http://127.0.0.1:1/hook\"\nformat = \"gcr\"\n").unwrap();
        // No name: the origin and a hash, never the path (it may hold a token).
        assert!(
            n[0].id().starts_with("http://127.0.0.1:1#"),
            "{}",
            n[0].id()
        );
        assert!(!n[0].id().contains("hook"));
        assert!(
            !n[0].events.contains(&NotifyEvent::Pull),
            "pull is off by default"
        );
        assert!(n[0].events.contains(&NotifyEvent::Push));
        assert_eq!(n[0].timeout.0, Duration::from_secs(10));
        for bad in [
            "[[notify]]\nurl = \"ftp://x/\"\nformat = \"gcr\"\n",
            "[[notify]]\nurl = \"http://u:p@x/\"\nformat = \"gcr\"\n",
            "[[notify]]\nurl = \"http://x/\"\nformat = \"xml\"\n",
            "[[notify]]\nurl = \"http://x/\"\nformat = \"gcr\"\nevents = [\"nope\"]\n",
            "[[notify]]\nurl = \"http://x/\"\nformat = \"gcr\"\nheaders = { \"a b\" = \"c\" }\n",
            "[[notify]]\nurl = \"http://x/\"\nformat = \"gcr\"\n[[notify]]\nurl = \"http://x/\"\nformat = \"cloudevents\"\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_and_header_values_are_never_rendered() {
        let text = format!(
            "{}\n[[notify]]\nurl = \"http://127.0.0.1:1/\"\nformat = \"distribution\"\nsecret = \"hmac-key-1\"\nheaders = {{ Authorization = \"Bearer tok-2\" }}\n",
            super::super::EMBEDDED_DEFAULT
        );
        let c = super::super::Config::parse(&text, "test").unwrap();
        assert_eq!(c.notify[0].secret.as_ref().unwrap().expose(), "hmac-key-1");
        let shown = format!("{}{:?}", c.to_toml(), c);
        assert!(
            !shown.contains("hmac-key-1") && !shown.contains("tok-2"),
            "{shown}"
        );
        assert!(shown.contains("Authorization"));
    }
}
