//! The distribution protocol's vocabulary: names, digests, references, media types, manifests,
//! byte ranges and the error codes clients see. Pure parsing and validation — no I/O, no
//! storage, no HTTP types beyond header strings — so every rule here is unit-tested in isolation.

pub mod digest;
pub mod error;
pub mod image_ref;
pub mod manifest;
pub mod media;
pub mod name;
pub mod range;

pub use digest::{Algorithm, Digest, Digester};
pub use error::{ErrorCode, RegistryError};
pub use name::{Reference, RepoName, Tag};
