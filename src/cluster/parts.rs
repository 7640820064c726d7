//! Multipart uploads driven part by part, by id, from any replica: what a push session needs
//! when its next PATCH may arrive at another replica than the last. A push does not know its
//! digest until its last request, and an S3 multipart upload is bound to its key when it is
//! created, so a session's parts go to `PREFIX/uploads/<session>`; once the digest is verified,
//! the completed object is copied server-side to the blob's key and removed. The caller keeps
//! the upload id and each part's ETag (in the database); a part's number is its position.

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use super::objects::{Objects, ObjectsError};
use crate::oci::Digest;

impl Objects {
    /// Where session `session`'s bytes are assembled.
    pub fn upload_key(&self, session: &str) -> Path {
        self.uploads.clone().join(session)
    }

    /// Size of each part this replica cuts (S3's minimum or more).
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// Starts a multipart upload to `key`; returns its upload id.
    pub async fn create_parts(&self, key: &Path) -> Result<String, ObjectsError> {
        Ok(self.s3.create_multipart(key).await?)
    }

    /// Uploads part `index` (0-based; S3 number `index + 1`); returns its ETag.
    pub async fn put_part(
        &self,
        key: &Path,
        upload_id: &str,
        index: usize,
        bytes: PutPayload,
    ) -> Result<String, ObjectsError> {
        let part = self
            .s3
            .put_part(key, &upload_id.to_string(), index, bytes)
            .await?;
        Ok(part.content_id)
    }

    /// Completes the upload from its parts' ETags, in part order. The store refuses a part
    /// whose ETag is not the one it holds.
    pub async fn complete_parts(
        &self,
        key: &Path,
        upload_id: &str,
        etags: Vec<String>,
    ) -> Result<(), ObjectsError> {
        let parts = etags
            .into_iter()
            .map(|content_id| PartId { content_id })
            .collect();
        self.s3
            .complete_multipart(key, &upload_id.to_string(), parts)
            .await?;
        Ok(())
    }

    /// Discards an upload and its parts (succeeds when it is already gone).
    pub async fn abort_parts(&self, key: &Path, upload_id: &str) -> Result<(), ObjectsError> {
        match self.s3.abort_multipart(key, &upload_id.to_string()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores `bytes` as blob `digest` in one PUT. Only for bytes the caller has verified to
    /// hash to `digest`.
    pub async fn put_checked_blob(
        &self,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<(), ObjectsError> {
        self.s3
            .put(&self.key(digest), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// Copies the object at `key` (verified to hash to `digest`) to the blob's key, inside the
    /// store.
    pub async fn copy_to_blob(&self, key: &Path, digest: &Digest) -> Result<(), ObjectsError> {
        self.s3.copy(key, &self.key(digest)).await?;
        Ok(())
    }

    /// The bytes of the object at `key`, as a stream.
    pub async fn read_key(
        &self,
        key: &Path,
    ) -> Result<BoxStream<'static, Result<Bytes, ObjectsError>>, ObjectsError> {
        let result = self.s3.get(key).await?;
        Ok(result.into_stream().map_err(ObjectsError::from).boxed())
    }

    /// The size of the object at `key`, or `None` when there is none.
    pub async fn key_size(&self, key: &Path) -> Result<Option<u64>, ObjectsError> {
        match self.s3.head(key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the object at `key` (succeeds when it is already gone).
    pub async fn delete_key(&self, key: &Path) -> Result<(), ObjectsError> {
        match self.s3.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
