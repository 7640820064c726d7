//! The record of a blob a cache fill put in the bucket: a `blobs` row, written after the
//! verified object is complete, so a row always names bytes that are there. Several replicas
//! may record the same blob (a take-over after a slow owner): the first row stays.

use super::pg::{Db, PgError};
use crate::oci::Digest;

impl Db {
    /// Records that the bucket holds `digest` (`size` bytes); a row already there is kept.
    pub async fn record_filled_blob(&self, digest: &Digest, size: u64) -> Result<(), PgError> {
        let size = i64::try_from(size)
            .map_err(|_| PgError::Corrupt(format!("blob {digest} is {size} bytes long")))?;
        self.client()
            .await?
            .execute(
                "INSERT INTO blobs (digest, size) VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING",
                &[&digest.to_string(), &size],
            )
            .await?;
        Ok(())
    }
}
