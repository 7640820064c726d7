//! Content digests (`algorithm:encoded`) and the streaming hashers that produce them.
//! Parsing is strict (image-spec descriptor.md): lowercase hex of the exact length for the
//! algorithms we implement; a well-formed digest of another algorithm is `Unsupported`, so
//! callers can answer `400` rather than `404`. A parsed `Digest` is safe to use as a file name.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// The digest algorithms transship can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    pub fn hex_len(self) -> usize {
        match self {
            Self::Sha256 => 64,
            Self::Sha512 => 128,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sha256" => Some(Self::Sha256),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }
}

/// A validated digest. `hex` is lowercase hex of exactly `algorithm.hex_len()` characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: Box<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("invalid digest {0:?}: expected <algorithm>:<encoded>")]
    Malformed(String),
    #[error("unsupported digest algorithm {0:?}: transship verifies sha256 and sha512")]
    Unsupported(String),
    #[error("invalid {0} digest: the encoded part must be {1} lowercase hex characters")]
    BadEncoding(&'static str, usize),
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded (hex) part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Builds a digest from raw hash output.
    pub fn from_raw(algorithm: Algorithm, raw: &[u8]) -> Self {
        Self {
            algorithm,
            hex: hex::encode(raw).into_boxed_str(),
        }
    }

    /// sha256 of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        Self::of(Algorithm::Sha256, bytes)
    }

    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Self {
        let mut d = Digester::new(algorithm);
        d.update(bytes);
        d.finish()
    }
}

/// True for `[a-z0-9]+([+._-][a-z0-9]+)*`.
fn is_algorithm_grammar(s: &str) -> bool {
    !s.is_empty()
        && s.split(['+', '.', '_', '-']).all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The common case, checked in one pass: a well-formed digest of an algorithm we
        // implement. Anything else takes the full grammar below for its precise error.
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            if let Some(enc) = s
                .strip_prefix(algorithm.as_str())
                .and_then(|r| r.strip_prefix(':'))
                && enc.len() == algorithm.hex_len()
                && enc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Ok(Self {
                    algorithm,
                    hex: enc.into(),
                });
            }
        }
        let Some((alg, enc)) = s.split_once(':') else {
            return Err(DigestError::Malformed(s.chars().take(200).collect()));
        };
        let enc_ok = !enc.is_empty()
            && enc
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
        if !is_algorithm_grammar(alg) || !enc_ok {
            return Err(DigestError::Malformed(s.chars().take(200).collect()));
        }
        let Some(algorithm) = Algorithm::parse(alg) else {
            return Err(DigestError::Unsupported(alg.chars().take(64).collect()));
        };
        let want = algorithm.hex_len();
        if enc.len() != want || !enc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::BadEncoding(algorithm.as_str(), want));
        }
        Ok(Self {
            algorithm,
            hex: enc.into(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Three plain writes: no format string to interpret (digests are written out on
        // every blob and manifest request, for keys and headers).
        f.write_str(self.algorithm.as_str())?;
        f.write_str(":")?;
        f.write_str(&self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A streaming hasher for one algorithm.
#[derive(Clone)]
pub enum Digester {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Digester {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Self::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Self::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::Sha256(_) => Algorithm::Sha256,
            Self::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Self::Sha256(h) => Digest::from_raw(Algorithm::Sha256, &h.finalize()),
            Self::Sha512(h) => Digest::from_raw(Algorithm::Sha512, &h.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn hashes_known_vectors() {
        assert_eq!(Digest::sha256_of(b"").to_string(), EMPTY_SHA256);
        assert_eq!(
            Digest::sha256_of(b"{}").to_string(),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        let d = Digest::of(Algorithm::Sha512, b"abc");
        assert!(d.hex().starts_with("ddaf35a193617aba"));
        assert_eq!(d.hex().len(), 128);
    }

    #[test]
    fn parses_valid_digests() {
        let d: Digest = EMPTY_SHA256.parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY_SHA256);
        let s512 = format!("sha512:{}", "a".repeat(128));
        assert_eq!(
            s512.parse::<Digest>().unwrap().algorithm(),
            Algorithm::Sha512
        );
    }

    #[test]
    fn rejects_hostile_and_malformed_input() {
        for bad in [
            "",
            ":",
            "sha256",
            "sha256:",
            ":abc",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:../../../../etc/passwd",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85/",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            "sha256:zzb0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256+:abc",
            "sha256:abc:def",
            "sha256:\0",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn well_formed_foreign_algorithm_is_unsupported_not_malformed() {
        assert!(matches!(
            "blake3:abcd".parse::<Digest>(),
            Err(DigestError::Unsupported(_))
        ));
        assert!(matches!(
            "multi+part.alg:abcd".parse::<Digest>(),
            Err(DigestError::Unsupported(_))
        ));
        assert!(matches!(
            "sha256:XYZ".parse::<Digest>(),
            Err(DigestError::BadEncoding(..))
        ));
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut d = Digester::new(Algorithm::Sha256);
        for chunk in data.chunks(333) {
            d.update(chunk);
        }
        assert_eq!(d.finish(), Digest::sha256_of(&data));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_roundtrips(s in "\\PC{0,140}") {
            if let Ok(d) = s.parse::<Digest>() {
                proptest::prop_assert_eq!(d.to_string(), s);
            }
        }
    }
}
