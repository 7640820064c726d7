//! Store work the proxy runs off the async workers: synced RocksDB writes (caching a manifest,
//! confirming or forgetting a tag) block, so they go to tokio's blocking pool. It lives here,
//! below `http`, so the pull-through side never reaches up into the HTTP layer for it; the
//! handlers use the same function as `http::blocking`.

use crate::oci::RegistryError;
use crate::store::StoreError;

/// Runs `f` on the blocking pool; a store error becomes the registry error a client sees.
pub async fn store_work<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, RegistryError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(RegistryError::internal(format!("storage task failed: {e}"))),
    }
}
