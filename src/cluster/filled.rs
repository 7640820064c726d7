//! Recording a blob a cache fill has just put into the bucket, safely against GC and eviction:
//! they remove a blob's rows first and its object afterwards, under the digest's fence
//! (`gc::blob_fence`), only if no row came back. A fill that wrote the object between those two
//! steps and then inserted its row would leave a row without bytes; so the row goes in under
//! the same fence, and only if the object is there with its size. Otherwise nothing is
//! recorded and the next miss fills again.

use super::gc::blob_fence;
use super::links::link_on;
use super::objects::{Objects, ObjectsError};
use super::pg::{Db, PgError};
use crate::oci::{Digest, RepoName};

#[derive(Debug, thiserror::Error)]
pub enum FilledError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Objects(#[from] ObjectsError),
}

impl From<tokio_postgres::Error> for FilledError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e.into())
    }
}

impl Db {
    /// Records `digest` (`size` bytes, already in the bucket) and links it to `repo` as a
    /// fill's, with the outbox records `events`, if its object is still there; false if it
    /// went meanwhile (nothing recorded).
    pub async fn record_filled_blob(
        &self,
        objects: &Objects,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        events: &[Vec<u8>],
    ) -> Result<bool, FilledError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        blob_fence(&tx, digest).await?;
        if objects.head(digest).await? != Some(size) {
            return Ok(false);
        }
        link_on(&tx, repo, digest, size, false).await?;
        super::events::insert_events(&tx, events).await?;
        tx.commit().await?;
        Ok(true)
    }
}
