//! The cluster profile's building blocks: several replicas serving one registry from an
//! S3-compatible bucket (`objects`) and a PostgreSQL database (`pg` and its parts), used by
//! `storage` (the registry), `proxy` (the pull-through cache) and `auth` (identities). Like
//! `store`, this layer imports only `oci` and takes its own option structs, never the `Config`.

pub mod browse;
pub mod cache;
pub mod cache_evict;
pub mod cache_list;
pub mod cache_pins;
pub mod console_sessions;
pub mod events;
pub mod fill_lease;
pub mod filled;
pub mod gc;
pub mod hash_state;
pub mod identity_records;
pub mod links;
pub mod manifests;
pub mod migrate;
pub mod objects;
pub mod parts;
pub mod pg;
pub mod pg_tls;
pub mod repos;
pub mod signing_key;
pub mod tags;
pub mod uploads;
