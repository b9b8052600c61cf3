//! The installed handlers of a gateway: one per device type, kept in the state directory
//! as the signed packages they came in, loaded again at every start.
//!
//! Installing is verify → compile → check `describe` → write → swap. Nothing on disk or in
//! memory changes until every check has passed, and a call in flight keeps the handler
//! version it started with: it holds its own `Arc`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::cache::{self, CacheOutcome};
use crate::package::{Manifest, Package, PackageError, TrustedVendor, VerifiedPackage, sha256_hex};
use crate::{CallError, Handler, HandlerInfo, LoadError, Runtime, Services};

/// The package file inside a handler's directory.
const PACKAGE_FILE: &str = "package.tar";
/// The precompile cache, beside the handlers.
const CACHE_DIR: &str = ".compiled";

/// A handler that is installed and loaded.
#[derive(Debug)]
pub struct InstalledHandler {
    /// What its package says.
    pub manifest: Manifest,
    /// The trusted vendor that signed it.
    pub vendor: String,
    /// The component's SHA-256.
    pub component_sha256: String,
    /// What it says about itself.
    pub info: HandlerInfo,
    /// Ready to call.
    pub handler: Handler,
}

/// What the local API and `outpost handler list --json` say about an installed handler.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandlerSummary {
    /// The handler's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The trusted vendor that signed it.
    pub vendor: String,
    /// The device types it updates.
    pub device_types: Vec<String>,
    /// The WIT world it was built against.
    pub wit: String,
    /// The component's SHA-256.
    pub component_sha256: String,
    /// Whether it runs yet.
    pub state: HandlerState,
}

/// Whether an installed handler runs yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerState {
    /// Its code is being compiled (or loaded from the precompile cache); rollouts that
    /// need it wait.
    Compiling,
    /// Loaded and ready to call.
    Ready,
}

impl From<&InstalledHandler> for HandlerSummary {
    fn from(h: &InstalledHandler) -> Self {
        Self {
            name: h.manifest.name.clone(),
            version: h.manifest.version.clone(),
            vendor: h.vendor.clone(),
            device_types: h.manifest.device_types.clone(),
            wit: h.manifest.wit.clone(),
            component_sha256: h.component_sha256.clone(),
            state: HandlerState::Ready,
        }
    }
}

/// Ends an install's compiling entry when dropped, however the install ends (even if
/// its caller stops waiting). A start-up entry the install superseded comes back if the
/// install did not succeed: that version loads in its turn.
struct Settle<'a> {
    registry: &'a HandlerRegistry,
    name: String,
    superseded: Option<(PathBuf, VerifiedPackage)>,
    succeeded: bool,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        match self.superseded.take() {
            Some((path, verified)) if !self.succeeded => {
                self.registry
                    .pending
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(self.name.clone(), Pending::of(&verified));
                self.registry
                    .queued
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push_front((path, verified));
                self.registry
                    .changed
                    .send_modify(|n| *n = n.wrapping_add(1));
            }
            _ => self.registry.settle(&self.name),
        }
    }
}

/// A handler whose package verified and whose code is not loaded yet.
#[derive(Debug)]
struct Pending {
    manifest: Manifest,
    vendor: String,
    component_sha256: String,
}

impl Pending {
    fn of(verified: &VerifiedPackage) -> Self {
        Self {
            manifest: verified.manifest().clone(),
            vendor: verified.vendor().to_owned(),
            component_sha256: sha256_hex(verified.component()),
        }
    }

    fn summary(&self) -> HandlerSummary {
        HandlerSummary {
            name: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            vendor: self.vendor.clone(),
            device_types: self.manifest.device_types.clone(),
            wit: self.manifest.wit.clone(),
            component_sha256: self.component_sha256.clone(),
            state: HandlerState::Compiling,
        }
    }
}

/// Why an install was refused. The installed set is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The package failed verification.
    #[error(transparent)]
    Package(#[from] PackageError),
    /// The component cannot run here.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `describe` failed.
    #[error("the handler failed to describe itself: {0}")]
    Describe(CallError),
    /// `describe` contradicts the manifest.
    #[error("the handler's describe contradicts its manifest: {0}")]
    DescribeMismatch(String),
    /// Another handler already serves one of its device types.
    #[error("device type {device_type:?} is already served by handler {other:?}; remove it first")]
    Conflict {
        /// The contested device type.
        device_type: String,
        /// The handler that has it.
        other: String,
    },
    /// No handler of that name is installed.
    #[error("no handler named {0:?} is installed")]
    NotInstalled(String),
    /// The handler is still compiling (the gateway just started).
    #[error("handler {0:?} is still compiling; remove it once it is ready")]
    Compiling(String),
    /// The state directory could not be written.
    #[error("cannot store the handler in {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// What [`HandlerRegistry::prune_cache`] keeps of `.compiled/`: the current engine's
/// directory, and in it the entries of the installed components.
struct PrunePlan {
    cache_dir: PathBuf,
    current: Option<PathBuf>,
    keep: std::collections::HashSet<std::ffi::OsString>,
}

impl PrunePlan {
    /// Removes the rest; returns how many entries went.
    fn run(self) -> usize {
        let mut removed = 0;
        let Ok(entries) = std::fs::read_dir(&self.cache_dir) else {
            return removed;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if Some(&path) != self.current.as_ref() {
                let gone = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if gone.is_ok() {
                    removed += 1;
                }
                continue;
            }
            for file in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                // Only finished entries: a `.tmp` is an install writing its code now.
                let name = file.file_name();
                let finished = Path::new(&name).extension().is_some_and(|e| e == "cwasm");
                if finished
                    && !self.keep.contains(&name)
                    && std::fs::remove_file(file.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// The set of installed handlers.
pub struct HandlerRegistry {
    dir: PathBuf,
    runtime: Arc<Runtime>,
    trusted: RwLock<Vec<TrustedVendor>>,
    installed: RwLock<BTreeMap<String, Arc<InstalledHandler>>>,
    /// Handlers being compiled, by name: found at start, or being installed.
    pending: RwLock<BTreeMap<String, Pending>>,
    /// The packages found at start, for [`load_pending`](Self::load_pending).
    queued: std::sync::Mutex<std::collections::VecDeque<(PathBuf, VerifiedPackage)>>,
    /// Bumped whenever a pending handler is loaded or given up.
    changed: tokio::sync::watch::Sender<u64>,
    /// Held by an install from its compile until its handler is in `installed`, by the
    /// start-up load of each handler, and by a prune: a prune never takes the code of a
    /// compile in flight.
    changes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerRegistry")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl HandlerRegistry {
    /// Loads every handler installed under `dir`: [`start`](Self::start), then
    /// [`load_pending`](Self::load_pending). A package that no longer verifies (its vendor
    /// key was withdrawn) or no longer loads is left on disk, skipped, and named in the
    /// returned warnings.
    pub async fn open(
        dir: impl Into<PathBuf>,
        runtime: Arc<Runtime>,
        trusted: Vec<TrustedVendor>,
    ) -> Result<(Self, Vec<String>), InstallError> {
        let (registry, mut warnings) = Self::start(dir, runtime, trusted)?;
        warnings.extend(registry.load_pending().await);
        Ok((registry, warnings))
    }

    /// Finds and verifies the handlers installed under `dir` without compiling them:
    /// they are listed as [`HandlerState::Compiling`] until
    /// [`load_pending`](Self::load_pending) has loaded them, and rollouts that need them
    /// wait ([`ready_for_device_type`](Self::ready_for_device_type)). A gateway serves
    /// meanwhile. The warnings name packages that no longer verify.
    pub fn start(
        dir: impl Into<PathBuf>,
        runtime: Arc<Runtime>,
        trusted: Vec<TrustedVendor>,
    ) -> Result<(Self, Vec<String>), InstallError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| InstallError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| InstallError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.join(PACKAGE_FILE).is_file())
            .collect();
        names.sort();
        let mut warnings = Vec::new();
        let mut pending = BTreeMap::new();
        let mut queued = std::collections::VecDeque::new();
        for path in names {
            let package_path = path.join(PACKAGE_FILE);
            let verified = std::fs::read(&package_path)
                .map_err(|source| InstallError::Io {
                    path: package_path.clone(),
                    source,
                })
                .and_then(|bytes| Ok(Package::read(bytes.as_slice())?.verify(&trusted)?));
            match verified {
                Ok(verified) => {
                    pending.insert(verified.manifest().name.clone(), Pending::of(&verified));
                    queued.push_back((path, verified));
                }
                Err(err) => {
                    warnings.push(format!("handler in {} not loaded: {err}", path.display()));
                }
            }
        }
        let registry = Self {
            dir,
            runtime,
            trusted: RwLock::new(trusted),
            installed: RwLock::new(BTreeMap::new()),
            pending: RwLock::new(pending),
            queued: std::sync::Mutex::new(queued),
            changed: tokio::sync::watch::Sender::new(0),
            changes: tokio::sync::Mutex::new(()),
        };
        Ok((registry, warnings))
    }

    /// Compiles (or loads from the precompile cache) and checks the handlers
    /// [`start`](Self::start) found, one at a time, each ready as soon as it loads; then
    /// drops the compiled code no handler uses. Returns warnings for the handlers that
    /// did not load (left on disk, skipped) or run under their manifest's limits.
    pub async fn load_pending(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        loop {
            let changes = self.changes.lock().await;
            let next = self
                .queued
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop_front();
            let Some((path, verified)) = next else {
                break;
            };
            let name = verified.manifest().name.clone();
            // The vendor keys may have changed (SIGHUP) since the package was found.
            // Reading and checking a package of tens of MB: off the async workers.
            let (dir, key, trusted) = (self.dir.clone(), name.clone(), self.trusted());
            let verdict = tokio::task::spawn_blocking(move || verify_on_disk(&dir, &key, &trusted))
                .await
                .unwrap_or_else(|err| Err(format!("verifying the package failed: {err}")));
            let loaded = match verdict {
                Err(why) => Err(why),
                Ok(()) => self
                    .load_verified(verified)
                    .await
                    .map_err(|err| err.to_string()),
            };
            match loaded {
                Ok((installed, _)) => {
                    if let Err(err) = limits_agree(&installed.info, &installed.manifest) {
                        warnings.push(format!(
                            "handler {name} runs under its signed manifest's limits: {err}"
                        ));
                    }
                    tracing::info!(handler = %name, version = %installed.manifest.version, "handler ready");
                    self.write_map().insert(name.clone(), Arc::new(installed));
                }
                Err(err) => {
                    warnings.push(format!("handler in {} not loaded: {err}", path.display()));
                }
            }
            self.settle(&name);
            drop(changes);
        }
        self.prune_cache().await;
        warnings
    }

    /// Ends a compile of `name`: it is no longer pending, and waiters look again.
    fn settle(&self, name: &str) {
        self.pending
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Drops the compiled code no installed handler uses: other components, and every
    /// entry of another engine (an older gateway, other settings). Run after start-up,
    /// installs and removals; a failure only costs disk space.
    async fn prune_cache(&self) {
        let _changes = self.changes.lock().await;
        self.prune_locked().await;
    }

    /// [`prune_cache`](Self::prune_cache) for a caller that holds `changes`.
    async fn prune_locked(&self) {
        let plan = self.prune_plan();
        let removed = tokio::task::spawn_blocking(move || plan.run())
            .await
            .unwrap_or(0);
        if removed > 0 {
            tracing::info!(removed, "compiled handler code no handler uses was removed");
        }
    }

    fn prune_plan(&self) -> PrunePlan {
        let cache_dir = self.dir.join(CACHE_DIR);
        // No engine yet means no handler loaded: nothing of this engine's to keep.
        let current = self.runtime.built().and_then(|engine| {
            cache::entry_path(engine, &cache_dir, b"")
                .parent()
                .map(Path::to_path_buf)
        });
        let pending = self
            .pending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|p| format!("{}.cwasm", p.component_sha256).into())
            .collect::<Vec<_>>();
        let keep = self
            .read_map()
            .values()
            .map(|h| format!("{}.cwasm", h.component_sha256).into())
            .chain(pending)
            .collect();
        PrunePlan {
            cache_dir,
            current,
            keep,
        }
    }

    /// Verifies, compiles and installs a package, replacing an installed handler of the same
    /// name. Returns the new handler and what the compile cache did.
    pub async fn install(
        &self,
        archive: &[u8],
    ) -> Result<(Arc<InstalledHandler>, CacheOutcome), InstallError> {
        let verified = Package::read(archive)?.verify(&self.trusted())?;
        self.check_conflicts(verified.manifest())?;
        let changes = self.changes.lock().await;
        let name = verified.manifest().name.clone();
        // A version found at start and not loaded yet is superseded by this one.
        let superseded = {
            let mut queued = self
                .queued
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queued
                .iter()
                .position(|(_, v)| v.manifest().name == name)
                .and_then(|at| queued.remove(at))
        };
        // Listed as compiling meanwhile (unless a version of it runs already).
        self.pending
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.clone(), Pending::of(&verified));
        let mut settle = Settle {
            registry: self,
            name,
            superseded,
            succeeded: false,
        };
        let result = self.install_locked(verified, archive).await;
        settle.succeeded = result.is_ok();
        drop(settle);
        if result.is_ok() {
            self.prune_locked().await;
        }
        drop(changes);
        result
    }

    /// [`install`](Self::install) for a caller that holds `changes`.
    async fn install_locked(
        &self,
        verified: VerifiedPackage,
        archive: &[u8],
    ) -> Result<(Arc<InstalledHandler>, CacheOutcome), InstallError> {
        let (installed, outcome) = self.load_verified(verified).await?;
        limits_agree(&installed.info, &installed.manifest)?;
        let name = installed.manifest.name.clone();
        // fsync can take a while on an SD card: off the async workers too.
        let (dir, bytes) = (self.dir.join(&name), archive.to_vec());
        tokio::task::spawn_blocking(move || write_package(&dir, &bytes))
            .await
            .map_err(|err| InstallError::Io {
                path: self.dir.join(&name),
                source: std::io::Error::other(err.to_string()),
            })??;
        let installed = Arc::new(installed);
        let previous = self
            .write_map()
            .insert(name.clone(), Arc::clone(&installed));
        tracing::info!(
            handler = %name,
            version = %installed.manifest.version,
            vendor = %installed.vendor,
            replaced = previous.as_ref().map(|p| p.manifest.version.as_str()),
            "handler installed"
        );
        Ok((installed, outcome))
    }

    /// Removes an installed handler. Calls in flight finish with the version they hold.
    pub fn remove(&self, name: &str) -> Result<Arc<InstalledHandler>, InstallError> {
        let is_pending = self
            .pending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(name);
        if is_pending && !self.read_map().contains_key(name) {
            return Err(InstallError::Compiling(name.to_owned()));
        }
        let removed = self
            .write_map()
            .remove(name)
            .ok_or_else(|| InstallError::NotInstalled(name.to_owned()))?;
        let dir = self.dir.join(name);
        std::fs::remove_dir_all(&dir).map_err(|source| InstallError::Io { path: dir, source })?;
        // An install in flight prunes when it ends, with this removal in its view.
        let removed_entries = match self.changes.try_lock() {
            Ok(_changes) => self.prune_plan().run(),
            Err(_) => 0,
        };
        if removed_entries > 0 {
            tracing::info!(
                removed = removed_entries,
                "compiled handler code no handler uses was removed"
            );
        }
        Ok(removed)
    }

    /// Every installed handler, by name.
    pub fn list(&self) -> Vec<Arc<InstalledHandler>> {
        self.read_map().values().cloned().collect()
    }

    /// What the local API lists: every installed handler, ready or still compiling.
    pub fn summaries(&self) -> Vec<HandlerSummary> {
        let mut all: BTreeMap<String, HandlerSummary> = self
            .read_map()
            .values()
            .map(|h| (h.manifest.name.clone(), h.as_ref().into()))
            .collect();
        for (name, pending) in self
            .pending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            all.entry(name.clone()).or_insert_with(|| pending.summary());
        }
        all.into_values().collect()
    }

    /// The name of the handler that serves a device type, ready or still compiling.
    pub fn handler_name_for(&self, device_type: &str) -> Option<String> {
        // Pending first: a handler that loads meanwhile is in `installed` before it
        // leaves `pending`, so it is seen in one or the other.
        let pending = self.pending_for(device_type);
        if let Some(ready) = self.for_device_type(device_type) {
            return Some(ready.manifest.name.clone());
        }
        pending
    }

    fn pending_for(&self, device_type: &str) -> Option<String> {
        self.pending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .find(|p| p.manifest.device_types.iter().any(|t| t == device_type))
            .map(|p| p.manifest.name.clone())
    }

    /// Whether the handler for a device type is still compiling (none is ready yet).
    pub fn is_compiling(&self, device_type: &str) -> bool {
        self.pending_for(device_type).is_some() && self.for_device_type(device_type).is_none()
    }

    /// The handler for a device type, once it is ready: waits while it compiles. None
    /// when no handler serves the type, or its compile failed.
    pub async fn ready_for_device_type(&self, device_type: &str) -> Option<Arc<InstalledHandler>> {
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            // Pending first (see handler_name_for).
            let pending = self.pending_for(device_type);
            if let Some(ready) = self.for_device_type(device_type) {
                return Some(ready);
            }
            pending?;
            changed.changed().await.ok()?;
        }
    }

    /// The handler for a device type.
    pub fn for_device_type(&self, device_type: &str) -> Option<Arc<InstalledHandler>> {
        self.read_map()
            .values()
            .find(|h| h.manifest.device_types.iter().any(|t| t == device_type))
            .cloned()
    }

    /// The handler with this name.
    pub fn get(&self, name: &str) -> Option<Arc<InstalledHandler>> {
        self.read_map().get(name).cloned()
    }

    /// The runtime handlers run in.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// A handler of another name must not already serve one of the device types.
    /// Handlers still compiling count.
    fn check_conflicts(&self, manifest: &Manifest) -> Result<(), InstallError> {
        let map = self.read_map();
        let pending = self
            .pending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let others = map
            .values()
            .map(|h| &h.manifest)
            .chain(pending.values().map(|p| &p.manifest))
            .filter(|other| other.name != manifest.name);
        for other in others {
            if let Some(device_type) = manifest
                .device_types
                .iter()
                .find(|t| other.device_types.contains(t))
            {
                return Err(InstallError::Conflict {
                    device_type: device_type.clone(),
                    other: other.name.clone(),
                });
            }
        }
        Ok(())
    }

    async fn load_verified(
        &self,
        verified: VerifiedPackage,
    ) -> Result<(InstalledHandler, CacheOutcome), InstallError> {
        let manifest = verified.manifest().clone();
        let wasm = verified.component();
        let (component, outcome) = self
            .runtime
            .load_cached(&self.dir.join(CACHE_DIR), wasm)
            .await?;
        let handler = self.runtime.prepare(&manifest.name, &component)?;
        let handler = self.runtime.with_requested_limits(
            handler,
            manifest.limits.memory_mib,
            manifest.limits.cpu_ms,
        );
        let info = describe_checked(&self.runtime, &handler, &manifest).await?;
        Ok((
            InstalledHandler {
                vendor: verified.vendor().to_owned(),
                component_sha256: sha256_hex(wasm),
                manifest,
                info,
                handler,
            },
            outcome,
        ))
    }

    /// The vendor keys in force.
    fn trusted(&self) -> Vec<TrustedVendor> {
        self.trusted
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the trusted vendor keys (the gateway does on SIGHUP): later installs
    /// verify against them, and an installed handler whose package no longer verifies
    /// (its vendor withdrawn, or no longer allowed its device types) is unloaded at once,
    /// left on disk as at start-up. Returns what was unloaded and why.
    pub fn set_trusted(&self, trusted: Vec<TrustedVendor>) -> Vec<String> {
        let installed: Vec<String> = self.read_map().keys().cloned().collect();
        let mut withdrawn = Vec::new();
        for name in installed {
            let verdict = verify_on_disk(&self.dir, &name, &trusted);
            if let Err(why) = verdict {
                self.write_map().remove(&name);
                tracing::warn!(handler = %name, reason = %why, "handler unloaded: its package no longer verifies");
                withdrawn.push(format!("{name}: {why}"));
            }
        }
        *self
            .trusted
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = trusted;
        withdrawn
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<InstalledHandler>>> {
        self.installed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_map(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<InstalledHandler>>> {
        self.installed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether the package installed in `dir` under `name` verifies against `trusted`.
fn verify_on_disk(dir: &Path, name: &str, trusted: &[TrustedVendor]) -> Result<(), String> {
    let path = dir.join(name).join(PACKAGE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Package::read(bytes.as_slice())
        .and_then(|p| p.verify(trusted))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Calls `describe` (with no doors open) and checks it against the manifest: the name
/// and every claimed device type.
async fn describe_checked(
    runtime: &Runtime,
    handler: &Handler,
    manifest: &Manifest,
) -> Result<HandlerInfo, InstallError> {
    let info = runtime
        .describe(handler, &Services::closed())
        .await
        .map_err(InstallError::Describe)?;
    if info.name != manifest.name {
        return Err(InstallError::DescribeMismatch(format!(
            "it calls itself {:?}, the manifest {:?}",
            info.name, manifest.name
        )));
    }
    if let Some(missing) = manifest
        .device_types
        .iter()
        .find(|t| !info.device_types.contains(t))
    {
        return Err(InstallError::DescribeMismatch(format!(
            "the manifest claims device type {missing:?}, which the handler does not handle"
        )));
    }
    Ok(info)
}

/// A handler's limits come from one place: the signed manifest, which `outpost handler
/// pack` fills from `describe`. A new package whose two disagree is refused, not picked
/// from. (Packages installed before this check keep running under their manifest's
/// limits; the gateway warns about them at start.)
fn limits_agree(info: &HandlerInfo, manifest: &Manifest) -> Result<(), InstallError> {
    let asked = (
        info.requested_limits.memory_mib,
        info.requested_limits.cpu_ms,
    );
    let signed = (manifest.limits.memory_mib, manifest.limits.cpu_ms);
    if asked != signed {
        return Err(InstallError::DescribeMismatch(format!(
            "describe asks for {} MiB and {} ms, the signed manifest for {} MiB and {} ms; \
             pack it again (outpost handler pack takes the limits from describe)",
            asked.0, asked.1, signed.0, signed.1
        )));
    }
    Ok(())
}

/// What `outpost handler verify` checks of a package whose signature was verified:
/// everything an install checks short of writing it. The component must compile and
/// link on this runtime, and its `describe` must answer within the package's
/// requested limits and agree with the manifest. A package that passes is one that
/// [`HandlerRegistry::install`] accepts.
pub async fn check_package(
    runtime: &Runtime,
    verified: &VerifiedPackage,
) -> Result<HandlerInfo, InstallError> {
    let manifest = verified.manifest();
    let handler = runtime.load(&manifest.name, verified.component())?;
    let handler =
        runtime.with_requested_limits(handler, manifest.limits.memory_mib, manifest.limits.cpu_ms);
    let info = describe_checked(runtime, &handler, manifest).await?;
    limits_agree(&info, manifest)?;
    Ok(info)
}

/// Writes the package atomically: a crash leaves the old one or the new one.
fn write_package(dir: &Path, archive: &[u8]) -> Result<(), InstallError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!("{PACKAGE_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(archive)
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp))?;
    let target = dir.join(PACKAGE_FILE);
    std::fs::rename(&tmp, &target).map_err(io(&target))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}
