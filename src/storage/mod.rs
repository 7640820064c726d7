//! Storage as the registry sees it, above the local `store` and the `cluster` engines: each
//! cluster replica's local read cache of bucket blobs (`read_cache`).

pub mod read_cache;
