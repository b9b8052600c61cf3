//! Outpost's firmware cache: each artifact is downloaded once, verified, and served to
//! many devices on the site network.
//!
//! * **Content-addressed blobs** under the state directory's `firmware/` folder, named
//!   by sha256. Bytes are written to a temporary or partial file, fsynced, checked
//!   against the size and sha256 they were promised, and only then renamed into place
//!   and recorded in the store. A blob is re-hashed the first time a process opens it;
//!   one that no longer matches is deleted, never served.
//! * **Only what a verified manifest names** is fetched: update manifests are JWS
//!   compact documents signed with Ed25519 ([`manifest`]). The operator may also import
//!   a file by hand ([`FirmwareCache::import`]).
//! * **Single flight, resumable**: concurrent requests for one artifact share one
//!   upstream download; an interrupted download (a dead origin, a crash, a restart)
//!   resumes with `Range` from its partial file.
//! * **Bounded**: a size budget with LRU eviction over blobs that are neither pinned
//!   (an active deployment) nor being served.
//! * **Fan-out over HTTP** ([`server`]): `GET`/`HEAD /firmware/{sha256}` with Range,
//!   ETag, `If-None-Match` and `If-Range`.

pub mod adu;
mod cache;
mod error;
mod fetch;
pub mod links;
pub mod manifest;
pub mod metrics;
pub mod range;
pub mod server;
mod sha;

pub use cache::{
    Blob, BlobBody, BlobInfo, BlobSource, CacheConfig, FirmwareCache, PendingDownload, Served,
};
pub use error::CacheError;
pub use fetch::FetchConfig;
pub use sha::{BadSha256, Sha256};
