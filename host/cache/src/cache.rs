//! The cache itself: blobs on disk, their index, single-flight downloads, pins,
//! eviction and the hot set kept in memory for serving.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use outpost_store::rusqlite::{OptionalExtension as _, params};
use outpost_store::{Store, Timestamp};
use serde::Serialize;
use sha2::Digest as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fetch::{AttemptError, FetchConfig, Upstream};
use crate::manifest::{self, TrustedSigner, VerifiedManifest};
use crate::{CacheError, Sha256};

/// How the cache is set up.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// The folder that holds `blobs/`, `partial/` and `tmp/` (the state directory's
    /// `firmware/`).
    pub root: PathBuf,
    /// The size budget for complete blobs plus downloads in progress.
    pub max_bytes: u64,
    /// Bytes of blobs kept in memory for serving; a blob larger than this is served
    /// from its file in chunks.
    pub memory_bytes: u64,
    /// Keys trusted to sign update manifests.
    pub trusted_signers: Vec<TrustedSigner>,
    /// Device Update root keys: a deployment from IoT Hub's Device Update is accepted
    /// when its signing key is signed by one of these.
    pub adu_roots: Vec<crate::adu::AduRootKey>,
    /// Upstream download behaviour.
    pub fetch: FetchConfig,
}

/// Where a blob came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobSource {
    /// Downloaded because a verified manifest names it.
    Manifest,
    /// Imported by the operator.
    Import,
}

impl BlobSource {
    fn as_str(self) -> &'static str {
        match self {
            Self::Manifest => "manifest",
            Self::Import => "import",
        }
    }
}

/// What the cache knows of one blob.
#[derive(Clone, Debug, Serialize)]
pub struct BlobInfo {
    /// Its name.
    pub sha256: Sha256,
    /// Its size in bytes.
    pub size: u64,
    /// How it got here.
    pub source: BlobSource,
    /// The URL it was fetched from, or the imported file's name.
    pub origin: String,
    /// When it was stored.
    pub added_at: Timestamp,
    /// When it was last served or opened.
    pub last_access: Timestamp,
    /// Who pinned it.
    pub pins: Vec<String>,
    /// Bytes served from it so far, all clients together.
    pub bytes_served: u64,
}

/// A download that has not completed.
#[derive(Clone, Debug, Serialize)]
pub struct PendingDownload {
    /// The artifact.
    pub sha256: Sha256,
    /// Where it is fetched from.
    pub url: String,
    /// Bytes already in its partial file.
    pub have: u64,
    /// Attempts so far.
    pub attempts: u32,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// Bytes served from one blob to one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Served {
    /// The blob.
    pub sha256: Sha256,
    /// The device id the client gave, or its address.
    pub client: String,
    /// Bytes sent.
    pub bytes: u64,
    /// Responses sent.
    pub requests: u64,
}

#[derive(Clone, Debug)]
enum Flight {
    Running,
    Done(Result<(), CacheError>),
}

#[derive(Default)]
struct State {
    /// Complete blobs: sha256 → size. Mirrors `firmware_blobs`.
    index: HashMap<Sha256, u64>,
    /// Downloads in progress, by artifact.
    flights: HashMap<Sha256, Arc<watch::Sender<Flight>>>,
    /// Open blob handles per artifact; a served blob is never evicted.
    serving: HashMap<Sha256, usize>,
    /// Blobs whose file was hashed since this process opened the cache.
    verified: HashSet<Sha256>,
    /// Blobs held in memory, with a use counter for LRU.
    hot: HashMap<Sha256, (Bytes, u64)>,
    tick: u64,
    /// Bytes promised to downloads and imports in progress.
    reserved: u64,
    /// Unflushed accounting: bytes and responses per (blob, client).
    served: HashMap<(Sha256, String), (u64, u64)>,
    /// Unflushed last-access times.
    touched: HashMap<Sha256, i64>,
}

pub(crate) struct Inner {
    store: Store,
    config: CacheConfig,
    /// The manifest signers in force: the config's, replaced on reload.
    signers: std::sync::RwLock<Vec<TrustedSigner>>,
    upstream: Upstream,
    state: Mutex<State>,
    /// Serialises admission decisions (reserve and evict) so two cannot overspend.
    space: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// The firmware cache. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct FirmwareCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FirmwareCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirmwareCache")
            .field("root", &self.inner.config.root)
            .finish_non_exhaustive()
    }
}

/// An open, verified blob. While any handle is alive the blob is not evicted.
#[derive(Debug)]
pub struct Blob {
    sha256: Sha256,
    size: u64,
    body: BlobBody,
    _guard: ServingGuard,
}

/// Where a blob's bytes are read from.
#[derive(Debug, Clone)]
pub enum BlobBody {
    /// The whole blob, in memory.
    Memory(Bytes),
    /// The blob's file, read in chunks.
    File(Arc<std::fs::File>),
}

impl Blob {
    /// Its name.
    pub fn sha256(&self) -> Sha256 {
        self.sha256
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its bytes.
    pub fn body(&self) -> &BlobBody {
        &self.body
    }

    /// Reads the whole blob (for tests and small blobs).
    pub fn read_all(&self) -> std::io::Result<Vec<u8>> {
        match &self.body {
            BlobBody::Memory(bytes) => Ok(bytes.to_vec()),
            BlobBody::File(file) => {
                let mut out = vec![0u8; usize::try_from(self.size).unwrap_or(usize::MAX)];
                std::os::unix::fs::FileExt::read_exact_at(file.as_ref(), &mut out, 0)?;
                Ok(out)
            }
        }
    }
}

#[derive(Debug)]
struct ServingGuard {
    cache: Arc<Inner>,
    sha256: Sha256,
}

impl Drop for ServingGuard {
    fn drop(&mut self) {
        let mut state = lock(&self.cache.state);
        if let Some(count) = state.serving.get_mut(&self.sha256) {
            *count -= 1;
            if *count == 0 {
                state.serving.remove(&self.sha256);
            }
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cache")
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state holds no invariant a panicking holder could break halfway.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FirmwareCache {
    /// Opens the cache under `config.root`, recovering from whatever a crash left:
    /// temporary files are deleted, index rows without a matching file are dropped and
    /// files without a row are deleted. Partial downloads are kept for
    /// [`FirmwareCache::resume_pending`].
    pub async fn open(store: Store, config: CacheConfig) -> Result<Self, CacheError> {
        let upstream = Upstream::new(config.fetch.clone())?;
        let root = config.root.clone();
        let rows: Vec<(String, i64)> = store
            .call(|conn| {
                let mut stmt = conn.prepare("SELECT sha256, size FROM firmware_blobs")?;
                let rows = stmt
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        let pending: HashSet<String> = store
            .call(|conn| {
                let mut stmt = conn.prepare("SELECT sha256 FROM firmware_downloads")?;
                let rows = stmt
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<HashSet<String>, _>>()?;
                Ok(rows)
            })
            .await?;
        let (index, stale) = tokio::task::spawn_blocking(move || recover(&root, &rows, &pending))
            .await
            .map_err(|e| CacheError::task(&e))??;
        if !stale.is_empty() {
            store
                .call(move |conn| {
                    let tx = conn.transaction()?;
                    for sha in &stale {
                        tx.execute("DELETE FROM firmware_blobs WHERE sha256 = ?1", [sha])?;
                    }
                    tx.commit()?;
                    Ok(())
                })
                .await?;
        }
        let cache = Self {
            inner: Arc::new(Inner {
                store,
                signers: std::sync::RwLock::new(config.trusted_signers.clone()),
                config,
                upstream,
                state: Mutex::new(State {
                    index,
                    ..State::default()
                }),
                space: tokio::sync::Mutex::new(()),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        };
        Ok(cache)
    }

    /// The configuration the cache runs with (its `trusted_signers` as at start; see
    /// [`set_trusted_signers`](Self::set_trusted_signers)).
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// The manifest signers in force.
    pub fn signers(&self) -> Vec<TrustedSigner> {
        self.inner
            .signers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Verifies a signed manifest in either form: an Outpost JWS against the trusted
    /// signers, or a Device Update deployment against the Device Update roots.
    pub fn verify_signed(&self, signed: &str) -> Result<VerifiedManifest, CacheError> {
        if crate::adu::is_adu(signed) {
            crate::adu::verify(signed, &self.inner.config.adu_roots)
        } else {
            manifest::verify(signed, &self.signers())
        }
    }

    /// Replaces the keys whose manifests are accepted (the gateway does on SIGHUP).
    /// Manifests accepted before stay; new ones, and recorded ones checked again at
    /// start, verify against these.
    pub fn set_trusted_signers(&self, signers: Vec<TrustedSigner>) {
        *self
            .inner
            .signers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = signers;
    }

    /// Restarts, in the background, the downloads a previous run left unfinished, if a
    /// manifest still names them. The daemon calls this once at start; the CLI does not.
    pub async fn resume_pending(&self) -> Result<(), CacheError> {
        let pending: Vec<String> = self
            .inner
            .store
            .call(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT d.sha256 FROM firmware_downloads d \
                     WHERE EXISTS (SELECT 1 FROM manifest_files f WHERE f.sha256 = d.sha256 AND f.url IS NOT NULL)",
                )?;
                let rows = stmt.query_map([], |row| row.get(0))?.collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        for sha in pending {
            if let Ok(sha) = sha.parse::<Sha256>() {
                tracing::info!(%sha, "resuming an unfinished firmware download");
                self.prefetch(sha);
            }
        }
        Ok(())
    }

    /// Stops downloads (their partial files stay for the next start), flushes the
    /// accounting and waits for background work.
    pub async fn shutdown(&self) -> Result<(), CacheError> {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.flush_accounting().await
    }

    /// Verifies a signed manifest and records it; its files may then be fetched. The
    /// files are not fetched yet: see [`FirmwareCache::prefetch`].
    pub async fn add_manifest(&self, jws: &str) -> Result<VerifiedManifest, CacheError> {
        let verified = self.verify_signed(jws)?;
        let record = verified.clone();
        self.inner
            .store
            .call(move |conn| {
                let id = record.manifest.update_id.to_string();
                let tx = conn.transaction()?;
                tx.execute("DELETE FROM update_manifests WHERE id = ?1", [&id])?;
                tx.execute(
                    "INSERT INTO update_manifests (id, signer, jws, received_at) VALUES (?1, ?2, ?3, ?4)",
                    params![id, record.signer, record.jws, Timestamp::now().unix_millis()],
                )?;
                for file in &record.manifest.files {
                    tx.execute(
                        "INSERT OR REPLACE INTO manifest_files (manifest_id, sha256, size, name, url) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![
                            id,
                            file.sha256.to_hex(),
                            i64::try_from(file.size_in_bytes).unwrap_or(i64::MAX),
                            file.file_name,
                            file.url
                        ],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        tracing::info!(update = %verified.manifest.update_id, signer = verified.signer, "update manifest accepted");
        Ok(verified)
    }

    /// The verified manifests on record, newest first.
    pub async fn manifests(&self) -> Result<Vec<VerifiedManifest>, CacheError> {
        let rows: Vec<String> = self
            .inner
            .store
            .call(|conn| {
                let mut stmt =
                    conn.prepare("SELECT jws FROM update_manifests ORDER BY received_at DESC, id")?;
                let rows = stmt
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        // Re-verified on the way out: a row edited on disk does not become trusted.
        rows.iter().map(|jws| self.verify_signed(jws)).collect()
    }

    /// Forgets a manifest; its files may no longer be fetched unless another names them.
    pub async fn remove_manifest(&self, id: &str) -> Result<bool, CacheError> {
        let id = id.to_owned();
        Ok(self
            .inner
            .store
            .call(move |conn| {
                Ok(conn.execute("DELETE FROM update_manifests WHERE id = ?1", [id])? > 0)
            })
            .await?)
    }

    /// Starts fetching `sha256` in the background if it is not cached and not already
    /// being fetched. Errors are recorded with the download and show in [`FirmwareCache::pending`].
    pub fn prefetch(&self, sha256: Sha256) {
        let cache = self.clone();
        self.inner.tasks.spawn(async move {
            if let Err(error) = cache.ensure(sha256).await {
                tracing::warn!(%sha256, %error, "firmware prefetch failed");
            }
        });
    }

    /// Opens `sha256`, fetching it first if a verified manifest names it and it is not
    /// cached. Concurrent calls for one artifact share one download; every caller waits
    /// for the verified blob (no byte of an unverified download is ever handed out).
    pub async fn ensure(&self, sha256: Sha256) -> Result<Blob, CacheError> {
        let mut missed = false;
        loop {
            if let Some(blob) = self.get(sha256).await? {
                if !missed {
                    metrics::counter!(crate::metrics::HITS).increment(1);
                }
                return Ok(blob);
            }
            if !missed {
                missed = true;
                metrics::counter!(crate::metrics::MISSES).increment(1);
            }
            let mut flight = self.join_flight(sha256).await?;
            let outcome = loop {
                if let Flight::Done(result) = &*flight.borrow_and_update() {
                    break result.clone();
                }
                if flight.changed().await.is_err() {
                    break Err(CacheError::ShuttingDown);
                }
            };
            outcome?;
        }
    }

    /// Returns the receiver of the running download for `sha256`, starting one if none runs.
    async fn join_flight(&self, sha256: Sha256) -> Result<watch::Receiver<Flight>, CacheError> {
        if let Some(tx) = lock(&self.inner.state).flights.get(&sha256) {
            return Ok(tx.subscribe());
        }
        let source = self.source_of(sha256).await?;
        let mut state = lock(&self.inner.state);
        if let Some(tx) = state.flights.get(&sha256) {
            return Ok(tx.subscribe());
        }
        if self.inner.shutdown.is_cancelled() {
            return Err(CacheError::ShuttingDown);
        }
        let (tx, rx) = watch::channel(Flight::Running);
        let tx = Arc::new(tx);
        state.flights.insert(sha256, tx.clone());
        drop(state);
        let cache = self.clone();
        self.inner.tasks.spawn(async move {
            let result = cache.download(sha256, source).await;
            if let Err(error) = &result {
                tracing::warn!(%sha256, %error, "firmware download failed");
            }
            lock(&cache.inner.state).flights.remove(&sha256);
            tx.send_replace(Flight::Done(result));
        });
        Ok(rx)
    }

    /// The size and URL under which a verified manifest names `sha256`.
    async fn source_of(&self, sha256: Sha256) -> Result<(u64, String), CacheError> {
        let hex = sha256.to_hex();
        let found: Option<(i64, Option<String>)> = self
            .inner
            .store
            .call(move |conn| {
                Ok(conn
                    .prepare_cached(
                        "SELECT size, url FROM manifest_files WHERE sha256 = ?1 \
                         ORDER BY url IS NULL LIMIT 1",
                    )?
                    .query_row([hex], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()?)
            })
            .await?;
        match found {
            Some((size, Some(url))) => Ok((u64::try_from(size).unwrap_or(0), url)),
            _ => Err(CacheError::NotNamed(sha256)),
        }
    }

    /// One download round: reserve space, attempt with backoff, commit the blob.
    async fn download(&self, sha256: Sha256, (size, url): (u64, String)) -> Result<(), CacheError> {
        let _reservation = self.reserve(size).await?;
        let hex = sha256.to_hex();
        let partial = self.partial_path(sha256);
        let (record_hex, record_url) = (hex.clone(), url.clone());
        let etag: Option<String> = self
            .inner
            .store
            .call(move |conn| {
                let now = Timestamp::now().unix_millis();
                conn.execute(
                    "INSERT INTO firmware_downloads (sha256, url, updated_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (sha256) DO UPDATE SET \
                       etag = CASE WHEN url = excluded.url THEN etag END, \
                       url = excluded.url, updated_at = excluded.updated_at",
                    params![record_hex, record_url, now],
                )?;
                Ok(conn
                    .query_row(
                        "SELECT etag FROM firmware_downloads WHERE sha256 = ?1",
                        [&record_hex],
                        |row| row.get(0),
                    )
                    .optional()?
                    .flatten())
            })
            .await?;
        let config = self.inner.upstream.config().clone();
        let mut etag = etag;
        let remember = SavedValidator {
            store: self.inner.store.clone(),
            sha256_hex: hex.clone(),
        };
        let mut attempt = 0;
        let mut backoff =
            outpost_store::backoff::Backoff::new(config.backoff_initial, config.backoff_max);
        loop {
            attempt += 1;
            let result = self
                .inner
                .upstream
                .attempt(
                    &url,
                    sha256,
                    size,
                    &partial,
                    &mut etag,
                    &remember,
                    &self.inner.shutdown,
                )
                .await;
            let detail = match result {
                Ok(()) => {
                    self.commit(sha256, size, &partial, BlobSource::Manifest, url.clone())
                        .await?;
                    tracing::info!(%sha256, size, url, attempts = attempt, "firmware cached");
                    return Ok(());
                }
                Err(AttemptError::Cancelled) => return Err(CacheError::ShuttingDown),
                Err(AttemptError::Local(error)) => {
                    self.record_failure(sha256, etag.clone(), error.to_string())
                        .await?;
                    return Err(error);
                }
                Err(AttemptError::Resume(detail)) => detail,
                Err(AttemptError::Discard(detail)) => {
                    let _ = tokio::fs::remove_file(&partial).await;
                    etag = None;
                    detail
                }
            };
            self.record_failure(sha256, etag.clone(), detail.clone())
                .await?;
            tracing::warn!(%sha256, url, attempt, detail, "firmware download attempt failed");
            if attempt >= config.attempts {
                return Err(CacheError::Upstream {
                    sha256,
                    url,
                    attempts: attempt,
                    detail,
                });
            }
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return Err(CacheError::ShuttingDown),
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Records a failed attempt with the validator to resume with.
    async fn record_failure(
        &self,
        sha256: Sha256,
        etag: Option<String>,
        detail: String,
    ) -> Result<(), CacheError> {
        let hex = sha256.to_hex();
        self
            .inner
            .store
            .call(move |conn| {
                conn.execute(
                    "UPDATE firmware_downloads SET attempts = attempts + 1, last_error = ?2, etag = ?3, \
                     updated_at = ?4 WHERE sha256 = ?1",
                    params![hex, detail, etag, Timestamp::now().unix_millis()],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Moves a verified file into place and records the blob (clearing any unfinished
    /// download of it). The one way a blob enters the cache.
    async fn commit(
        &self,
        sha256: Sha256,
        size: u64,
        from: &Path,
        source: BlobSource,
        origin: String,
    ) -> Result<(), CacheError> {
        let target = self.blob_path(sha256);
        let blobs = self.inner.config.root.join("blobs");
        let from = from.to_path_buf();
        tokio::task::spawn_blocking(move || place(&from, &target, &blobs))
            .await
            .map_err(|e| CacheError::task(&e))??;
        let hex = sha256.to_hex();
        self.inner
            .store
            .call(move |conn| {
                let now = Timestamp::now().unix_millis();
                let tx = conn.transaction()?;
                tx.execute(
                    "INSERT OR REPLACE INTO firmware_blobs (sha256, size, source, origin, added_at, last_access) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                    params![hex, i64::try_from(size).unwrap_or(i64::MAX), source.as_str(), origin, now],
                )?;
                tx.execute("DELETE FROM firmware_downloads WHERE sha256 = ?1", [&hex])?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        let mut state = lock(&self.inner.state);
        state.index.insert(sha256, size);
        state.verified.insert(sha256);
        Ok(())
    }

    /// Copies an operator-supplied file into the cache: hashed while copied, fsynced,
    /// then renamed into place. Returns the blob's record. No manifest is needed.
    pub async fn import(&self, path: &Path) -> Result<BlobInfo, CacheError> {
        let source = path.to_path_buf();
        let size = tokio::fs::metadata(&source)
            .await
            .map_err(CacheError::io("reading", &source))?
            .len();
        let _reservation = self.reserve(size).await?;
        let tmp = self.staging_path()?;
        let (sha256, staged) = {
            let (source, tmp) = (source.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || copy_hashed(&source, &tmp))
                .await
                .map_err(|e| CacheError::task(&e))??
        };
        let origin = source.file_name().map_or_else(
            || source.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        self.adopt(sha256, size, &staged, origin).await
    }

    /// A fresh path in the cache's staging folder, for a caller that writes a file there
    /// and hands it to [`FirmwareCache::import_staged`] (an upload, say). Staged files
    /// left by a crash are deleted at the next open.
    pub fn staging_path(&self) -> Result<PathBuf, CacheError> {
        let tmp = self.inner.config.root.join("tmp");
        let mut name = [0u8; 8];
        getrandom::fill(&mut name).map_err(|e| CacheError::other("naming a file in", &tmp, e))?;
        Ok(tmp.join(format!("import-{}", hex::encode(name))))
    }

    /// Imports a file already written to a [`FirmwareCache::staging_path`]: hashed and
    /// renamed into place without another copy. The cache owns the file from here on
    /// and deletes it if it is not kept. `origin` is the name it is recorded under.
    pub async fn import_staged(
        &self,
        staged: &Path,
        origin: String,
    ) -> Result<BlobInfo, CacheError> {
        let result = async {
            let size = tokio::fs::metadata(staged)
                .await
                .map_err(CacheError::io("reading", staged))?
                .len();
            let _reservation = self.reserve(size).await?;
            let path = staged.to_path_buf();
            let sha256 = tokio::task::spawn_blocking(move || {
                let mut file =
                    std::fs::File::open(&path).map_err(CacheError::io("opening", &path))?;
                file.sync_all().map_err(CacheError::io("syncing", &path))?;
                hash_stream(&mut file, &path, |_| Ok(()))
            })
            .await
            .map_err(|e| CacheError::task(&e))??;
            self.adopt(sha256, size, staged, origin).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(staged).await;
        }
        result
    }

    /// Keeps a hashed, fsynced staged file as an imported blob (or drops it when the
    /// blob is already cached).
    async fn adopt(
        &self,
        sha256: Sha256,
        size: u64,
        staged: &Path,
        origin: String,
    ) -> Result<BlobInfo, CacheError> {
        let kept = if lock(&self.inner.state).index.contains_key(&sha256) {
            let _ = tokio::fs::remove_file(staged).await;
            Ok(())
        } else {
            self.commit(sha256, size, staged, BlobSource::Import, origin.clone())
                .await
        };
        if let Err(error) = kept {
            let _ = tokio::fs::remove_file(staged).await;
            return Err(error);
        }
        tracing::info!(%sha256, size, origin, "firmware imported");
        self.info(sha256)
            .await?
            .ok_or(CacheError::NotCached(sha256))
    }

    /// Opens a cached blob, or None when it is not cached. The first open of a blob in
    /// this process re-hashes its file; a blob that no longer matches its name is
    /// deleted and reported as not cached.
    pub async fn get(&self, sha256: Sha256) -> Result<Option<Blob>, CacheError> {
        let (size, hot, verified) = {
            let mut state = lock(&self.inner.state);
            let Some(&size) = state.index.get(&sha256) else {
                return Ok(None);
            };
            state.tick += 1;
            let tick = state.tick;
            let hot = state.hot.get_mut(&sha256).map(|(bytes, used)| {
                *used = tick;
                bytes.clone()
            });
            *state.serving.entry(sha256).or_default() += 1;
            state.touched.insert(sha256, Timestamp::now().unix_millis());
            (size, hot, state.verified.contains(&sha256))
        };
        let guard = ServingGuard {
            cache: self.inner.clone(),
            sha256,
        };
        if let Some(bytes) = hot {
            return Ok(Some(Blob {
                sha256,
                size,
                body: BlobBody::Memory(bytes),
                _guard: guard,
            }));
        }
        let path = self.blob_path(sha256);
        let keep_in_memory = size <= self.inner.config.memory_bytes;
        let loaded = tokio::task::spawn_blocking(move || {
            load(&path, sha256, size, verified, keep_in_memory)
        })
        .await
        .map_err(|e| CacheError::task(&e))?;
        let body = match loaded {
            Ok(body) => body,
            Err(Loaded::Corrupt(detail)) => {
                tracing::error!(%sha256, detail, "cached firmware failed verification; deleting it");
                drop(guard);
                self.forget(sha256).await?;
                return Ok(None);
            }
            Err(Loaded::Io(error)) => return Err(error),
        };
        let mut state = lock(&self.inner.state);
        state.verified.insert(sha256);
        if let BlobBody::Memory(bytes) = &body {
            let tick = state.tick;
            state.hot.insert(sha256, (bytes.clone(), tick));
            // The hot set is a handful of firmware images: summing it is cheap.
            while state.hot.values().map(|(b, _)| b.len() as u64).sum::<u64>()
                > self.inner.config.memory_bytes
            {
                let Some(coldest) = state
                    .hot
                    .iter()
                    .filter(|(sha, _)| **sha != sha256)
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(sha, _)| *sha)
                else {
                    break;
                };
                state.hot.remove(&coldest);
            }
        }
        drop(state);
        Ok(Some(Blob {
            sha256,
            size,
            body,
            _guard: guard,
        }))
    }

    /// Drops a blob from the index, the store and the disk.
    async fn forget(&self, sha256: Sha256) -> Result<(), CacheError> {
        {
            let mut state = lock(&self.inner.state);
            state.index.remove(&sha256);
            state.verified.remove(&sha256);
            state.hot.remove(&sha256);
        }
        let hex = sha256.to_hex();
        self.inner
            .store
            .call(move |conn| {
                conn.execute("DELETE FROM firmware_blobs WHERE sha256 = ?1", [hex])?;
                Ok(())
            })
            .await?;
        match tokio::fs::remove_file(self.blob_path(sha256)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(CacheError::io("deleting", self.blob_path(sha256))(e))
            }
            _ => Ok(()),
        }
    }

    /// Removes a blob at the operator's request. A pinned blob is refused; a blob being
    /// served is unlinked, and open handles finish reading it.
    pub async fn remove(&self, sha256: Sha256) -> Result<(), CacheError> {
        let _space = self.inner.space.lock().await;
        if !lock(&self.inner.state).index.contains_key(&sha256) {
            return Err(CacheError::NotCached(sha256));
        }
        let holders = self.pins(sha256).await?;
        if !holders.is_empty() {
            return Err(CacheError::Pinned { sha256, holders });
        }
        self.forget(sha256).await?;
        tracing::info!(%sha256, "firmware removed");
        Ok(())
    }

    /// Pins `sha256` for `holder` (for example `deployment:<id>`): it will not be evicted.
    /// The blob need not be cached yet.
    pub async fn pin(&self, sha256: Sha256, holder: &str) -> Result<(), CacheError> {
        let (hex, holder) = (sha256.to_hex(), holder.to_owned());
        self.inner
            .store
            .call(move |conn| {
                conn.execute(
                    "INSERT OR IGNORE INTO firmware_pins (sha256, holder, pinned_at) VALUES (?1, ?2, ?3)",
                    params![hex, holder, Timestamp::now().unix_millis()],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Removes `holder`'s pin on `sha256`.
    pub async fn unpin(&self, sha256: Sha256, holder: &str) -> Result<(), CacheError> {
        let (hex, holder) = (sha256.to_hex(), holder.to_owned());
        self.inner
            .store
            .call(move |conn| {
                conn.execute(
                    "DELETE FROM firmware_pins WHERE sha256 = ?1 AND holder = ?2",
                    params![hex, holder],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn pins(&self, sha256: Sha256) -> Result<Vec<String>, CacheError> {
        let hex = sha256.to_hex();
        Ok(self
            .inner
            .store
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT holder FROM firmware_pins WHERE sha256 = ?1 ORDER BY holder",
                )?;
                let rows = stmt
                    .query_map([hex], |row| row.get(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?)
    }

    /// Makes room for `size` more bytes, evicting least-recently-used blobs that are
    /// neither pinned nor being served, and holds the room until the returned
    /// reservation is dropped.
    async fn reserve(&self, size: u64) -> Result<Reservation, CacheError> {
        let budget = self.inner.config.max_bytes;
        let _space = self.inner.space.lock().await;
        self.flush_accounting().await?;
        // Candidates oldest first, pinned ones left out.
        let candidates: Vec<(String, i64)> = self
            .inner
            .store
            .call(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT b.sha256, b.size FROM firmware_blobs b \
                     WHERE NOT EXISTS (SELECT 1 FROM firmware_pins p WHERE p.sha256 = b.sha256) \
                     ORDER BY b.last_access, b.added_at",
                )?;
                let rows = stmt
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        let mut victims = Vec::new();
        {
            let state = lock(&self.inner.state);
            let mut used: u64 = state.index.values().sum::<u64>() + state.reserved;
            let mut candidates = candidates
                .iter()
                .filter_map(|(sha, _)| sha.parse::<Sha256>().ok())
                .filter(|sha| !state.serving.contains_key(sha));
            while used.saturating_add(size) > budget {
                let Some(victim) = candidates.next() else {
                    let evictable: u64 = victims.iter().map(|v| state.index[v]).sum();
                    return Err(CacheError::Full {
                        needed: size,
                        budget,
                        unevictable: used
                            .saturating_sub(evictable)
                            .saturating_sub(state.reserved),
                    });
                };
                if let Some(&victim_size) = state.index.get(&victim) {
                    used -= victim_size;
                    victims.push(victim);
                }
            }
        }
        for victim in victims {
            tracing::info!(sha256 = %victim, "evicting firmware to make room");
            metrics::counter!(crate::metrics::EVICTIONS).increment(1);
            self.forget(victim).await?;
        }
        lock(&self.inner.state).reserved += size;
        Ok(Reservation {
            cache: self.inner.clone(),
            size,
        })
    }

    /// Records `bytes` served from `sha256` to `client` (flushed to the store in batches).
    pub fn record_served(&self, sha256: Sha256, client: &str, bytes: u64) {
        metrics::counter!(crate::metrics::SERVED_BYTES).increment(bytes);
        let mut state = lock(&self.inner.state);
        let entry = state.served.entry((sha256, client.to_owned())).or_default();
        entry.0 += bytes;
        entry.1 += 1;
    }

    /// Writes accounting and last-access times kept in memory to the store.
    pub async fn flush_accounting(&self) -> Result<(), CacheError> {
        let (served, touched) = {
            let mut state = lock(&self.inner.state);
            (
                std::mem::take(&mut state.served),
                std::mem::take(&mut state.touched),
            )
        };
        if served.is_empty() && touched.is_empty() {
            return Ok(());
        }
        self.inner
            .store
            .call(move |conn| {
                let now = Timestamp::now().unix_millis();
                let tx = conn.transaction()?;
                for ((sha, client), (bytes, requests)) in &served {
                    tx.execute(
                        "INSERT INTO firmware_served (sha256, client, bytes, requests, last_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (sha256, client) DO UPDATE SET \
                         bytes = bytes + excluded.bytes, requests = requests + excluded.requests, \
                         last_at = excluded.last_at",
                        params![
                            sha.to_hex(),
                            client,
                            i64::try_from(*bytes).unwrap_or(i64::MAX),
                            i64::try_from(*requests).unwrap_or(i64::MAX),
                            now
                        ],
                    )?;
                }
                for (sha, at) in &touched {
                    tx.execute(
                        "UPDATE firmware_blobs SET last_access = max(last_access, ?2) WHERE sha256 = ?1",
                        params![sha.to_hex(), at],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Every cached blob, most recently used first.
    pub async fn list(&self) -> Result<Vec<BlobInfo>, CacheError> {
        self.flush_accounting().await?;
        self.inner
            .store
            .call(|conn| query_blobs(conn, None))
            .await
            .map_err(Into::into)
    }

    /// One blob's record.
    pub async fn info(&self, sha256: Sha256) -> Result<Option<BlobInfo>, CacheError> {
        self.flush_accounting().await?;
        let found = self
            .inner
            .store
            .call(move |conn| query_blobs(conn, Some(sha256)))
            .await?;
        Ok(found.into_iter().next())
    }

    /// Downloads that have not completed, with their last error.
    pub async fn pending(&self) -> Result<Vec<PendingDownload>, CacheError> {
        let rows: Vec<(String, String, i64, Option<String>)> = self
            .inner
            .store
            .call(|conn| {
                let mut stmt =
                    conn.prepare("SELECT sha256, url, attempts, last_error FROM firmware_downloads ORDER BY sha256")?;
                let rows = stmt
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        let rows: Vec<_> = rows
            .into_iter()
            .filter_map(|(sha, url, attempts, last_error)| {
                let sha256: Sha256 = sha.parse().ok()?;
                Some((sha256, self.partial_path(sha256), url, attempts, last_error))
            })
            .collect();
        // File sizes are read off the async workers.
        tokio::task::spawn_blocking(move || {
            rows.into_iter()
                .map(
                    |(sha256, partial, url, attempts, last_error)| PendingDownload {
                        sha256,
                        url,
                        have: std::fs::metadata(partial).map_or(0, |m| m.len()),
                        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                        last_error,
                    },
                )
                .collect()
        })
        .await
        .map_err(|e| CacheError::task(&e))
    }

    /// Bytes served per client, for one blob or all.
    pub async fn served(&self, sha256: Option<Sha256>) -> Result<Vec<Served>, CacheError> {
        self.flush_accounting().await?;
        let rows: Vec<(String, String, i64, i64)> = self
            .inner
            .store
            .call(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT sha256, client, bytes, requests FROM firmware_served \
                     WHERE ?1 IS NULL OR sha256 = ?1 ORDER BY sha256, client",
                )?;
                let rows = stmt
                    .query_map([sha256.map(|s| s.to_hex())], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(sha, client, bytes, requests)| {
                Some(Served {
                    sha256: sha.parse().ok()?,
                    client,
                    bytes: u64::try_from(bytes).ok()?,
                    requests: u64::try_from(requests).ok()?,
                })
            })
            .collect())
    }

    /// Bytes held by complete blobs.
    pub fn used_bytes(&self) -> u64 {
        lock(&self.inner.state).index.values().sum()
    }

    /// True while a download for `sha256` is running.
    pub fn is_downloading(&self, sha256: Sha256) -> bool {
        lock(&self.inner.state).flights.contains_key(&sha256)
    }

    /// How many callers are waiting for the running download of `sha256` (0 when none runs).
    pub fn waiters(&self, sha256: Sha256) -> usize {
        lock(&self.inner.state)
            .flights
            .get(&sha256)
            .map_or(0, |tx| tx.receiver_count())
    }

    fn blob_path(&self, sha256: Sha256) -> PathBuf {
        self.inner.config.root.join("blobs").join(sha256.to_hex())
    }

    fn partial_path(&self, sha256: Sha256) -> PathBuf {
        self.inner
            .config
            .root
            .join("partial")
            .join(format!("{sha256}.part"))
    }
}

struct Reservation {
    cache: Arc<Inner>,
    size: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut state = lock(&self.cache.state);
        state.reserved = state.reserved.saturating_sub(self.size);
    }
}

fn query_blobs(
    conn: &mut outpost_store::rusqlite::Connection,
    only: Option<Sha256>,
) -> Result<Vec<BlobInfo>, outpost_store::StoreError> {
    let mut stmt = conn.prepare(
        "SELECT b.sha256, b.size, b.source, b.origin, b.added_at, b.last_access, \
           (SELECT group_concat(holder, char(10)) FROM (SELECT holder FROM firmware_pins p \
              WHERE p.sha256 = b.sha256 ORDER BY holder)), \
           (SELECT COALESCE(SUM(bytes), 0) FROM firmware_served s WHERE s.sha256 = b.sha256) \
         FROM firmware_blobs b WHERE ?1 IS NULL OR b.sha256 = ?1 \
         ORDER BY b.last_access DESC, b.sha256",
    )?;
    let rows = stmt
        .query_map([only.map(|s| s.to_hex())], |row| {
            let sha: String = row.get(0)?;
            let source: String = row.get(2)?;
            let pins: Option<String> = row.get(6)?;
            Ok((
                sha,
                row.get::<_, i64>(1)?,
                source,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                pins,
                row.get::<_, i64>(7)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(sha, size, source, origin, added, access, pins, served)| {
            Some(BlobInfo {
                sha256: sha.parse().ok()?,
                size: u64::try_from(size).ok()?,
                source: if source == "import" {
                    BlobSource::Import
                } else {
                    BlobSource::Manifest
                },
                origin,
                added_at: Timestamp::from_unix_millis(added),
                last_access: Timestamp::from_unix_millis(access),
                pins: pins
                    .map(|p| p.split('\n').map(str::to_owned).collect())
                    .unwrap_or_default(),
                bytes_served: u64::try_from(served).unwrap_or(0),
            })
        })
        .collect())
}

/// Brings the folders into a known state after a crash; returns the index and the rows to drop.
fn recover(
    root: &Path,
    rows: &[(String, i64)],
    pending: &HashSet<String>,
) -> Result<(HashMap<Sha256, u64>, Vec<String>), CacheError> {
    for dir in ["blobs", "partial", "tmp"] {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).map_err(CacheError::io("creating", &dir))?;
    }
    let tmp = root.join("tmp");
    for entry in std::fs::read_dir(&tmp).map_err(CacheError::io("listing", &tmp))? {
        let entry = entry.map_err(CacheError::io("listing", &tmp))?;
        // Everything staged here was unfinished: files, or folders left by hand.
        let _ = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(entry.path())
        } else {
            std::fs::remove_file(entry.path())
        };
    }
    let mut index = HashMap::new();
    let mut stale = Vec::new();
    for (hex, size) in rows {
        let ok = hex.parse::<Sha256>().ok().filter(|_| {
            std::fs::metadata(root.join("blobs").join(hex))
                .is_ok_and(|m| i64::try_from(m.len()).ok() == Some(*size))
        });
        match ok {
            Some(sha) => {
                index.insert(sha, u64::try_from(*size).unwrap_or(0));
            }
            None => {
                tracing::warn!(
                    sha256 = hex,
                    "cached firmware file missing or the wrong size; forgetting it"
                );
                stale.push(hex.clone());
            }
        }
    }
    let blobs = root.join("blobs");
    for entry in std::fs::read_dir(&blobs).map_err(CacheError::io("listing", &blobs))? {
        let entry = entry.map_err(CacheError::io("listing", &blobs))?;
        let known = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Sha256>().ok())
            .is_some_and(|sha| index.contains_key(&sha));
        if !known {
            tracing::warn!(file = %entry.path().display(), "deleting a file the firmware index does not know");
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let partial = root.join("partial");
    for entry in std::fs::read_dir(&partial).map_err(CacheError::io("listing", &partial))? {
        let entry = entry.map_err(CacheError::io("listing", &partial))?;
        let wanted = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".part"))
            .is_some_and(|hex| pending.contains(hex));
        if !wanted {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok((index, stale))
}

/// Makes `from` read-only, fsyncs it, renames it to `to` and fsyncs the folder.
fn place(from: &Path, to: &Path, dir: &Path) -> Result<(), CacheError> {
    use std::os::unix::fs::PermissionsExt as _;
    let file = std::fs::File::open(from).map_err(CacheError::io("opening", from))?;
    file.sync_all().map_err(CacheError::io("syncing", from))?;
    std::fs::set_permissions(from, std::fs::Permissions::from_mode(0o444))
        .map_err(CacheError::io("protecting", from))?;
    std::fs::rename(from, to).map_err(CacheError::io("renaming into place", to))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(CacheError::io("syncing", dir))
}

/// Copies `source` to the new file `tmp`, hashing as it goes, and fsyncs the copy;
/// returns the hash and the copy. The copy is deleted on failure.
fn copy_hashed(source: &Path, tmp: &Path) -> Result<(Sha256, PathBuf), CacheError> {
    use std::io::Write as _;
    let mut input = std::fs::File::open(source).map_err(CacheError::io("opening", source))?;
    let result = (|| {
        let mut output = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(CacheError::io("creating", tmp))?;
        let sha = hash_stream(&mut input, source, |chunk| {
            output
                .write_all(chunk)
                .map_err(CacheError::io("writing", tmp))
        })?;
        output.sync_all().map_err(CacheError::io("syncing", tmp))?;
        Ok(sha)
    })();
    match result {
        Ok(sha) => Ok((sha, tmp.to_path_buf())),
        Err(error) => {
            let _ = std::fs::remove_file(tmp);
            Err(error)
        }
    }
}

/// Reads `input` (named `path` in errors) to its end in 256 KiB chunks, passing each
/// chunk to `each`; returns the sha256 of everything read.
pub(crate) fn hash_stream(
    input: &mut impl Read,
    path: &Path,
    mut each: impl FnMut(&[u8]) -> Result<(), CacheError>,
) -> Result<Sha256, CacheError> {
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = input
            .read(&mut buf)
            .map_err(CacheError::io("reading", path))?;
        if n == 0 {
            return Ok(Sha256::from_bytes(hasher.finalize().into()));
        }
        hasher.update(&buf[..n]);
        each(&buf[..n])?;
    }
}

enum Loaded {
    Corrupt(String),
    Io(CacheError),
}

/// Opens a blob's file; hashes it unless already verified in this process; reads it
/// into memory when `keep_in_memory`.
fn load(
    path: &Path,
    sha256: Sha256,
    size: u64,
    verified: bool,
    keep_in_memory: bool,
) -> Result<BlobBody, Loaded> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Loaded::Corrupt("file is missing".into()));
        }
        Err(e) => return Err(Loaded::Io(CacheError::io("opening", path)(e))),
    };
    let len = file
        .metadata()
        .map_err(|e| Loaded::Io(CacheError::io("reading", path)(e)))?
        .len();
    if len != size {
        return Err(Loaded::Corrupt(format!(
            "file is {len} bytes, the index says {size}"
        )));
    }
    if verified && !keep_in_memory {
        return Ok(BlobBody::File(Arc::new(file)));
    }
    let mut data = Vec::with_capacity(if keep_in_memory {
        usize::try_from(size).unwrap_or(0)
    } else {
        0
    });
    let got = hash_stream(&mut file, path, |chunk| {
        if keep_in_memory {
            data.extend_from_slice(chunk);
        }
        Ok(())
    })
    .map_err(Loaded::Io)?;
    if got != sha256 {
        return Err(Loaded::Corrupt(format!("its bytes hash to {got}")));
    }
    Ok(if keep_in_memory {
        BlobBody::Memory(Bytes::from(data))
    } else {
        BlobBody::File(Arc::new(file))
    })
}

/// Where an unfinished download's origin validator (its strong ETag) is kept, so the
/// resume after a restart or a crash sends `If-Range` with it.
pub(crate) struct SavedValidator {
    store: Store,
    sha256_hex: String,
}

impl SavedValidator {
    /// Records `etag` for the download; done before any byte it validates is written.
    pub(crate) async fn save(&self, etag: String) -> Result<(), CacheError> {
        let hex = self.sha256_hex.clone();
        self.store
            .call(move |conn| {
                conn.execute(
                    "UPDATE firmware_downloads SET etag = ?2 WHERE sha256 = ?1",
                    params![hex, etag],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }
}
