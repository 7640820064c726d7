//! Blob bytes in an S3-compatible bucket, content-addressed under
//! `PREFIX/blobs/<algorithm>/<2 hex>/<hex>`. Bytes only become visible under a blob's key once
//! they are known to hash to its digest: `put_verified` hashes while it streams (into a
//! multipart upload, or one PUT when the blob fits in one part) and completes the upload only
//! when digest and size match, aborting it otherwise. Reads are ranged; `list` feeds GC;
//! `presign_get` lets a client fetch from the store directly.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayloadMut, WriteMultipart,
};

use crate::oci::{Algorithm, Digest, Digester};

/// S3 refuses parts below 5 MiB (all but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// Parts uploading at once per `put_verified`, besides the one being filled.
const PARTS_IN_FLIGHT: usize = 2;

/// How long connecting to the store may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take, body included: object_store's default (30 s) would cut off
/// the read of a large blob; this still ends a request the store stopped answering.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Where the bucket is and how to reach it.
#[derive(Clone)]
pub struct S3Options {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub path_style: bool,
    pub prefix: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Size of each multipart part (at least `MIN_PART_SIZE`); a blob smaller than one part
    /// goes up in a single PUT.
    pub part_size: usize,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("blob {0} is not in the object store")]
    NotFound(Digest),
    #[error(
        "the bytes do not match: expected {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes)"
    )]
    Mismatch {
        expected: Digest,
        expected_size: u64,
        actual: Digest,
        actual_size: u64,
    },
    #[error("the blob is longer than the {expected_size} bytes declared")]
    TooLong { expected_size: u64 },
    #[error("reading the blob's bytes failed: {0}")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("part_size must be at least {MIN_PART_SIZE} bytes")]
    PartSize,
}

/// One blob object found by `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobObject {
    pub digest: Digest,
    pub size: u64,
    pub last_modified: SystemTime,
}

/// The bucket, as a content-addressed blob store.
#[derive(Debug, Clone)]
pub struct Objects {
    pub(super) s3: Arc<AmazonS3>,
    /// `PREFIX/blobs` (or `blobs`).
    root: Path,
    /// `PREFIX/uploads`: push sessions' objects before their digest is known (see `parts`).
    pub(super) uploads: Path,
    pub(super) part_size: usize,
}

impl Objects {
    pub fn new(options: &S3Options) -> Result<Self, ObjectsError> {
        if options.part_size < MIN_PART_SIZE {
            return Err(ObjectsError::PartSize);
        }
        let s3 = AmazonS3Builder::new()
            // First: the client options replace every client setting made before them
            // (`with_allow_http` included).
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT),
            )
            .with_endpoint(&options.endpoint)
            .with_allow_http(options.endpoint.starts_with("http://"))
            .with_bucket_name(&options.bucket)
            .with_region(&options.region)
            .with_virtual_hosted_style_request(!options.path_style)
            .with_access_key_id(&options.access_key_id)
            .with_secret_access_key(&options.secret_access_key)
            .build()?;
        let base = match &options.prefix {
            Some(prefix) => Path::parse(prefix).map_err(|e| ObjectsError::Store(e.into()))?,
            None => Path::default(),
        };
        Ok(Self {
            s3: Arc::new(s3),
            root: base.clone().join("blobs"),
            uploads: base.join("uploads"),
            part_size: options.part_size,
        })
    }

    /// The object key of a blob: `PREFIX/blobs/sha256/ab/abcd...`.
    pub fn key(&self, digest: &Digest) -> Path {
        let hex = digest.hex();
        self.root
            .clone()
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Streams `bytes` into the blob's key, hashing as it goes; the object appears only if the
    /// bytes hash to `digest` and number exactly `size`. On any mismatch or error the upload
    /// is aborted and nothing is visible under the key.
    pub async fn put_verified<S, E>(
        &self,
        digest: &Digest,
        size: u64,
        bytes: S,
    ) -> Result<(), ObjectsError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::error::Error + Send + Sync + 'static,
    {
        let key = self.key(digest);
        let mut bytes = std::pin::pin!(bytes);
        let mut check = Check::new(digest, size);
        // The first part stays in memory: a blob that fits in it needs no multipart upload.
        let mut first = PutPayloadMut::new();
        while first.content_length() < self.part_size {
            match bytes.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(|e| ObjectsError::Source(Box::new(e)))?;
                    check.add(&chunk)?;
                    first.push(chunk);
                }
                None => {
                    check.finish()?;
                    self.s3.put(&key, first.freeze()).await?;
                    return Ok(());
                }
            }
        }
        let upload = self.s3.put_multipart(&key).await?;
        let mut guard = AbortOnDrop(None);
        let writer = guard
            .0
            .insert(WriteMultipart::new_with_chunk_size(upload, self.part_size));
        for piece in first.freeze() {
            writer.put(piece);
        }
        let streamed = async {
            while let Some(chunk) = bytes.next().await {
                let chunk = chunk.map_err(|e| ObjectsError::Source(Box::new(e)))?;
                check.add(&chunk)?;
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.put(chunk);
            }
            check.finish()
        }
        .await;
        // Disarmed: from here on the upload is completed or aborted explicitly.
        match (streamed, guard.0.take()) {
            (Ok(()), Some(writer)) => {
                writer.finish().await?;
                Ok(())
            }
            (Err(e), Some(writer)) => {
                abort(writer, digest).await;
                Err(e)
            }
            (result, None) => result,
        }
    }

    /// `range` of the blob's bytes (clamped to its end by the store), as a stream.
    pub async fn get_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, ObjectsError>>, ObjectsError> {
        // An HTTP Range cannot name zero bytes (object_store refuses `0..0` before asking):
        // the empty blob, or an empty slice of any blob, is read without a request.
        if range.is_empty() {
            return Ok(futures_util::stream::empty().boxed());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..GetOptions::default()
        };
        let result = self
            .s3
            .get_opts(&self.key(digest), options)
            .await
            .map_err(|e| not_found(e, digest))?;
        Ok(result.into_stream().map_err(ObjectsError::from).boxed())
    }

    /// The blob's size, or `None` when it is not stored.
    pub async fn head(&self, digest: &Digest) -> Result<Option<u64>, ObjectsError> {
        self.key_size(&self.key(digest)).await
    }

    /// Removes the blob (succeeds when it is already gone).
    pub async fn delete(&self, digest: &Digest) -> Result<(), ObjectsError> {
        self.delete_key(&self.key(digest)).await
    }

    /// Every blob object, for GC. Keys that are not blob keys are skipped (with a warning):
    /// GC must never act on what it cannot name.
    pub fn list(&self) -> BoxStream<'static, Result<BlobObject, ObjectsError>> {
        let root = self.root.clone();
        self.s3
            .list(Some(&self.root))
            .filter_map(move |item| {
                let found = match item {
                    Err(e) => Some(Err(e.into())),
                    Ok(meta) => match blob_of(&root, &meta.location) {
                        Some(digest) => Some(Ok(BlobObject {
                            digest,
                            size: meta.size,
                            last_modified: system_time(meta.last_modified.timestamp_millis()),
                        })),
                        None => {
                            tracing::warn!(key = %meta.location, "not a blob key under the blob prefix; left alone");
                            None
                        }
                    },
                };
                std::future::ready(found)
            })
            .boxed()
    }

    /// A URL that GETs the blob without credentials until `expires_in` has passed.
    pub async fn presign_get(
        &self,
        digest: &Digest,
        expires_in: Duration,
    ) -> Result<String, ObjectsError> {
        let url = self
            .s3
            .signed_url(
                object_store::signer::Method::GET,
                &self.key(digest),
                expires_in,
            )
            .await?;
        Ok(url.to_string())
    }
}

/// A multipart upload that is aborted when `put_verified`'s future is dropped before the upload
/// ends (a fill or push cancelled at shutdown), so no parts are left behind in the bucket.
struct AbortOnDrop(Option<WriteMultipart>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(writer) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(e) = settle_and_abort(writer).await {
                    tracing::warn!(error = %e, "cannot abort a cancelled multipart upload; the bucket's lifecycle rule or GC must remove it");
                }
            });
        }
    }
}

/// Aborts `writer` once none of its parts is in flight: a part request cancelled mid-way may
/// still land on the store after the abort and bring the upload back.
async fn settle_and_abort(mut writer: WriteMultipart) -> object_store::Result<()> {
    // Each error ends one part's wait; the loop ends when no part is left in flight.
    while writer.wait_for_capacity(0).await.is_err() {}
    writer.abort().await
}

async fn abort(writer: WriteMultipart, digest: &Digest) {
    if let Err(e) = settle_and_abort(writer).await {
        tracing::warn!(%digest, error = %e, "cannot abort a refused multipart upload; the bucket's lifecycle rule or GC must remove it");
    }
}

/// The running hash and count of a `put_verified`.
struct Check<'a> {
    expected: &'a Digest,
    expected_size: u64,
    digester: Digester,
    size: u64,
}

impl<'a> Check<'a> {
    fn new(expected: &'a Digest, expected_size: u64) -> Self {
        Self {
            expected,
            expected_size,
            digester: Digester::new(expected.algorithm()),
            size: 0,
        }
    }

    fn add(&mut self, chunk: &[u8]) -> Result<(), ObjectsError> {
        self.size += chunk.len() as u64;
        if self.size > self.expected_size {
            return Err(ObjectsError::TooLong {
                expected_size: self.expected_size,
            });
        }
        self.digester.update(chunk);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ObjectsError> {
        let digester = std::mem::replace(&mut self.digester, Digester::new(Algorithm::Sha256));
        let actual = digester.finish();
        if actual != *self.expected || self.size != self.expected_size {
            return Err(ObjectsError::Mismatch {
                expected: self.expected.clone(),
                expected_size: self.expected_size,
                actual,
                actual_size: self.size,
            });
        }
        Ok(())
    }
}

fn not_found(e: object_store::Error, digest: &Digest) -> ObjectsError {
    match e {
        object_store::Error::NotFound { .. } => ObjectsError::NotFound(digest.clone()),
        e => e.into(),
    }
}

/// The digest a key under `root` names: `root/<algorithm>/<2 hex>/<hex>`, consistent.
fn blob_of(root: &Path, key: &Path) -> Option<Digest> {
    let parts: Vec<String> = key
        .prefix_match(root)?
        .map(|p| p.as_ref().to_string())
        .collect();
    let [algorithm, fan, hex] = parts.as_slice() else {
        return None;
    };
    let digest: Digest = format!("{algorithm}:{hex}").parse().ok()?;
    (hex.get(..2) == Some(fan.as_str())).then_some(digest)
}

fn system_time(millis: i64) -> SystemTime {
    let since = Duration::from_millis(millis.unsigned_abs());
    if millis >= 0 {
        SystemTime::UNIX_EPOCH + since
    } else {
        SystemTime::UNIX_EPOCH - since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(prefix: Option<&str>) -> Objects {
        Objects::new(&S3Options {
            endpoint: "http://127.0.0.1:9".into(),
            bucket: "b".into(),
            region: "us-east-1".into(),
            path_style: true,
            prefix: prefix.map(str::to_string),
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            part_size: MIN_PART_SIZE,
        })
        .expect("options are valid")
    }

    #[test]
    fn keys_fan_out_by_two_hex_digits_and_read_back() {
        let digest = Digest::sha256_of(b"x");
        let hex = digest.hex().to_string();
        let o = objects(Some("team/reg"));
        let key = o.key(&digest);
        assert_eq!(
            key.as_ref(),
            format!("team/reg/blobs/sha256/{}/{hex}", &hex[..2])
        );
        assert_eq!(blob_of(&o.root, &key), Some(digest.clone()));
        assert_eq!(
            objects(None).key(&digest).as_ref(),
            format!("blobs/sha256/{}/{hex}", &hex[..2])
        );
        // A key whose fan-out directory disagrees with its name, or that is not a digest, is
        // no blob.
        let wrong_fan = Path::from(format!("team/reg/blobs/sha256/zz/{hex}").as_str());
        assert_eq!(blob_of(&o.root, &wrong_fan), None);
        let junk = Path::from("team/reg/blobs/sha256/ab/notahash");
        assert_eq!(blob_of(&o.root, &junk), None);
        let outside = Path::from(format!("other/blobs/sha256/{}/{hex}", &hex[..2]).as_str());
        assert_eq!(blob_of(&o.root, &outside), None);
    }

    #[test]
    fn small_parts_are_refused() {
        let mut options = S3Options {
            endpoint: "http://127.0.0.1:9".into(),
            bucket: "b".into(),
            region: "r".into(),
            path_style: true,
            prefix: None,
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            part_size: MIN_PART_SIZE - 1,
        };
        assert!(matches!(
            Objects::new(&options),
            Err(ObjectsError::PartSize)
        ));
        options.part_size = MIN_PART_SIZE;
        assert!(Objects::new(&options).is_ok());
    }

    #[test]
    fn check_refuses_wrong_bytes_and_overlong_streams() {
        let digest = Digest::sha256_of(b"hello");
        let mut ok = Check::new(&digest, 5);
        ok.add(b"hel").expect("within size");
        ok.add(b"lo").expect("within size");
        ok.finish().expect("matches");
        let mut wrong = Check::new(&digest, 5);
        wrong.add(b"jello").expect("within size");
        assert!(matches!(wrong.finish(), Err(ObjectsError::Mismatch { .. })));
        let mut long = Check::new(&digest, 5);
        assert!(matches!(
            long.add(b"hello!"),
            Err(ObjectsError::TooLong { .. })
        ));
        let mut short = Check::new(&digest, 5);
        short.add(b"hell").expect("within size");
        assert!(matches!(short.finish(), Err(ObjectsError::Mismatch { .. })));
    }
}
