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
    /// Held by an install from its compile until its handler is in `installed`, and by a
    /// prune: a prune never takes the code of an install in flight.
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
    /// Loads every handler installed under `dir`. A package that no longer verifies (its
    /// vendor key was withdrawn) or no longer loads is left on disk, skipped, and named in
    /// the returned warnings.
    pub async fn open(
        dir: impl Into<PathBuf>,
        runtime: Arc<Runtime>,
        trusted: Vec<TrustedVendor>,
    ) -> Result<(Self, Vec<String>), InstallError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| InstallError::Io {
            path: dir.clone(),
            source,
        })?;
        let registry = Self {
            dir,
            runtime,
            trusted: RwLock::new(trusted),
            installed: RwLock::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
        };
        let mut warnings = Vec::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(&registry.dir)
            .map_err(|source| InstallError::Io {
                path: registry.dir.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.join(PACKAGE_FILE).is_file())
            .collect();
        names.sort();
        for path in names {
            let package_path = path.join(PACKAGE_FILE);
            let loaded = match std::fs::read(&package_path) {
                Ok(bytes) => registry.prepare(&bytes).await,
                Err(source) => Err(InstallError::Io {
                    path: package_path.clone(),
                    source,
                }),
            };
            match loaded {
                Ok((installed, _)) => {
                    if let Err(err) = limits_agree(&installed.info, &installed.manifest) {
                        warnings.push(format!(
                            "handler {} runs under its signed manifest's limits: {err}",
                            installed.manifest.name
                        ));
                    }
                    registry
                        .write_map()
                        .insert(installed.manifest.name.clone(), Arc::new(installed));
                }
                Err(err) => {
                    warnings.push(format!("handler in {} not loaded: {err}", path.display()));
                }
            }
        }
        registry.prune_cache().await;
        Ok((registry, warnings))
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
        let current = cache::entry_path(self.runtime.engine(), &cache_dir, b"")
            .parent()
            .map(Path::to_path_buf);
        let keep = self
            .read_map()
            .values()
            .map(|h| format!("{}.cwasm", h.component_sha256).into())
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
        self.prune_locked().await;
        drop(changes);
        Ok((installed, outcome))
    }

    /// Removes an installed handler. Calls in flight finish with the version they hold.
    pub fn remove(&self, name: &str) -> Result<Arc<InstalledHandler>, InstallError> {
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
    fn check_conflicts(&self, manifest: &Manifest) -> Result<(), InstallError> {
        let map = self.read_map();
        for device_type in &manifest.device_types {
            if let Some(other) = map.values().find(|h| {
                h.manifest.name != manifest.name && h.manifest.device_types.contains(device_type)
            }) {
                return Err(InstallError::Conflict {
                    device_type: device_type.clone(),
                    other: other.manifest.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Everything short of writing: verify, compile (through the cache), describe.
    async fn prepare(
        &self,
        archive: &[u8],
    ) -> Result<(InstalledHandler, CacheOutcome), InstallError> {
        let verified = Package::read(archive)?.verify(&self.trusted())?;
        self.load_verified(verified).await
    }

    async fn load_verified(
        &self,
        verified: VerifiedPackage,
    ) -> Result<(InstalledHandler, CacheOutcome), InstallError> {
        let manifest = verified.manifest().clone();
        let wasm = verified.component();
        // Compiling takes up to a second of CPU: keep it off the async workers.
        let (engine, cache_dir, owned) = (
            self.runtime.engine().clone(),
            self.dir.join(CACHE_DIR),
            wasm.to_vec(),
        );
        let (component, outcome) = tokio::task::spawn_blocking(move || {
            crate::check_header(&owned)?;
            cache::load(&engine, &cache_dir, &owned)
        })
        .await
        .map_err(|err| LoadError::Invalid(format!("compiling the component failed: {err}")))??;
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
            let path = self.dir.join(&name).join(PACKAGE_FILE);
            let verdict = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    Package::read(bytes.as_slice())
                        .and_then(|p| p.verify(&trusted))
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
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
