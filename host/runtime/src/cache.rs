//! The precompile cache: each component is compiled once, and the machine code kept in the
//! state directory for the next start.
//!
//! Entries are keyed by the engine's compatibility hash and the component's SHA-256, so an
//! upgraded gateway or changed settings never load stale code. Each file starts with the
//! SHA-256 of the rest; a file that does not match is deleted and recompiled, never handed
//! to `Component::deserialize` (which trusts its input completely). Only the gateway
//! writes this directory, and only with output it compiled itself.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::LoadError;
use crate::package::sha256_hex;

/// What the cache did for one component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from a valid entry.
    Hit,
    /// No entry: compiled and stored.
    Compiled,
    /// The entry was damaged: deleted, compiled again and stored.
    Recompiled,
}

/// The file an entry lives in.
pub(crate) fn entry_path(engine: &Engine, dir: &Path, wasm: &[u8]) -> PathBuf {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{:016x}", hasher.finish()))
        .join(format!("{}.cwasm", sha256_hex(wasm)))
}

/// What the cache holds for one entry.
pub(crate) enum Lookup {
    /// A valid entry, loaded.
    Hit(Component),
    /// No entry.
    Missing,
    /// An entry that was damaged or unusable; it has been deleted.
    Damaged,
}

/// Loads the entry at `path` if it is valid; deletes it if it is not.
pub(crate) fn lookup(engine: &Engine, path: &Path) -> Lookup {
    match std::fs::read(path) {
        Ok(bytes) => {
            match verified_body(&bytes) {
                Some(body) => {
                    // SAFETY: `body` is machine code this gateway compiled (itself or in
                    // its compiler child) with an engine of the same compatibility hash
                    // and wrote to its own state directory; its SHA-256 was checked just
                    // now, so it is exactly what was written.
                    #[allow(unsafe_code)]
                    let component = unsafe { Component::deserialize(engine, body) };
                    match component {
                        Ok(component) => return Lookup::Hit(component),
                        Err(err) => {
                            tracing::warn!(path = %path.display(), error = %err, "cached handler code is unusable; recompiling");
                        }
                    }
                }
                None => {
                    tracing::warn!(path = %path.display(), "cached handler code is damaged; recompiling");
                }
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Lookup::Missing,
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "cannot read cached handler code; recompiling");
        }
    }
    let _ = std::fs::remove_file(path);
    Lookup::Damaged
}

/// Compiles `wasm` in this process, stores the entry and loads it.
pub(crate) fn compile_and_store(
    engine: &Engine,
    path: &Path,
    wasm: &[u8],
) -> Result<Component, LoadError> {
    let code = compile(engine, wasm)?;
    if let Err(err) = store(path, &code) {
        // The handler still runs; only the next start compiles again.
        tracing::warn!(path = %path.display(), error = %err, "cannot store compiled handler code");
    }
    // SAFETY: `code` was produced by `precompile_component` on this very engine, just now.
    #[allow(unsafe_code)]
    unsafe { Component::deserialize(engine, &code) }
        .map_err(|err| LoadError::Invalid(format!("{err:#}")))
}

/// The machine code of `wasm` for `engine`.
pub(crate) fn compile(engine: &Engine, wasm: &[u8]) -> Result<Vec<u8>, LoadError> {
    crate::check_header(wasm)?;
    engine
        .precompile_component(wasm)
        .map_err(|err| LoadError::Invalid(format!("{err:#}")))
}

fn verified_body(bytes: &[u8]) -> Option<&[u8]> {
    let (digest, body) = bytes.split_at_checked(32)?;
    (Sha256::digest(body).as_slice() == digest).then_some(body)
}

/// Writes `code` with its digest, atomically: a crash leaves the old entry or none.
pub(crate) fn store(path: &Path, code: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("entries live in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("cwasm.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&Sha256::digest(code))?;
    file.write_all(code)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
