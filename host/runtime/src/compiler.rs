//! Where handler components are compiled to machine code.
//!
//! Cranelift needs a lot of memory for a large component (a CPython guest built by
//! componentize-py: some 300 MB), and the allocator keeps much of it once the compile is
//! over. A gateway therefore compiles in a child process ([`Compiler::Child`]): the child
//! writes the precompile cache entry and exits, its memory goes back to the system, and
//! the gateway loads the entry as it would at any start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use wasmtime::component::Component;

use crate::cache::{self, CacheOutcome, Lookup};
use crate::{LoadError, Runtime, RuntimeConfig};

/// How the runtime compiles a component it has no cached code for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Compiler {
    /// In this process, on a blocking thread (tests, tools).
    #[default]
    InProcess,
    /// In a child process: `program` with `args`, then `--engine SETTINGS --out PATH`.
    /// The child reads the component on stdin and calls [`compile_entry`] with them
    /// (`outpost compile-handler` does). If the program cannot be started at all, the
    /// runtime warns and compiles in process.
    Child {
        /// The program, usually the running binary.
        program: PathBuf,
        /// Its arguments before `--engine`.
        args: Vec<String>,
    },
}

/// A compile in a child process that takes longer than this is stopped and fails.
const CHILD_TIMEOUT: Duration = Duration::from_secs(600);

/// Exit status of a child whose component did not compile (as opposed to a crash).
pub const COMPILE_REFUSED: i32 = 3;

/// The engine settings a child needs to compile code this runtime's engine accepts.
#[derive(serde::Serialize, serde::Deserialize)]
struct EngineSettings {
    memory_limit: u64,
    max_instances: u32,
}

impl EngineSettings {
    fn of(config: &RuntimeConfig) -> Self {
        Self {
            memory_limit: config.memory_limit,
            max_instances: config.max_instances,
        }
    }
}

/// The child's half of [`Compiler::Child`]: compiles `wasm` with an engine built from
/// `engine_settings` (as the parent passed them) and writes the cache entry at `out`.
/// A component that does not compile is [`LoadError::Invalid`]: the child prints its
/// message alone on stderr and exits with [`COMPILE_REFUSED`]; any other failure, with
/// another status.
pub fn compile_entry(engine_settings: &str, wasm: &[u8], out: &Path) -> Result<(), LoadError> {
    let settings: EngineSettings = serde_json::from_str(engine_settings)
        .map_err(|err| LoadError::Compiler(format!("bad engine settings: {err}")))?;
    let engine = crate::engine::build_engine(&RuntimeConfig {
        memory_limit: settings.memory_limit,
        max_instances: settings.max_instances,
        ..RuntimeConfig::default()
    })
    .map_err(|err| LoadError::Compiler(err.to_string()))?;
    let code = cache::compile(&engine, wasm)?;
    cache::store(out, &code)
        .map_err(|err| LoadError::Compiler(format!("cannot write {}: {err}", out.display())))
}

/// Why a child compile did not give an entry.
enum ChildError {
    /// The program could not be started: compile in process instead.
    Spawn(std::io::Error),
    /// It ran and failed.
    Failed(LoadError),
}

impl Runtime {
    /// The component for `wasm`, from the precompile cache in `dir` or compiled by this
    /// runtime's [`Compiler`] (and stored there).
    pub(crate) async fn load_cached(
        &self,
        dir: &Path,
        wasm: &[u8],
    ) -> Result<(Component, CacheOutcome), LoadError> {
        crate::check_header(wasm)?;
        let path = cache::entry_path(self.engine()?, dir, wasm);
        let outcome = match self.lookup(&path).await? {
            Lookup::Hit(component) => return Ok((component, CacheOutcome::Hit)),
            Lookup::Missing => CacheOutcome::Compiled,
            Lookup::Damaged => CacheOutcome::Recompiled,
        };
        if let Compiler::Child { program, args } = &self.config.compiler {
            match self.compile_in_child(program, args, &path, wasm).await {
                Ok(()) => {
                    return match self.lookup(&path).await? {
                        Lookup::Hit(component) => Ok((component, outcome)),
                        _ => Err(LoadError::Compiler(format!(
                            "{} wrote no code this gateway can load",
                            program.display()
                        ))),
                    };
                }
                Err(ChildError::Failed(err)) => return Err(err),
                Err(ChildError::Spawn(err)) => tracing::warn!(
                    program = %program.display(),
                    error = %err,
                    "cannot start the handler compiler; compiling in the gateway itself"
                ),
            }
        }
        let (engine, owned) = (self.engine()?.clone(), wasm.to_vec());
        let component =
            tokio::task::spawn_blocking(move || cache::compile_and_store(&engine, &path, &owned))
                .await
                .map_err(|err| LoadError::Compiler(format!("the compile task failed: {err}")))??;
        Ok((component, outcome))
    }

    /// [`cache::lookup`] on a blocking thread (reading and checking an entry of tens of
    /// MB takes a while).
    async fn lookup(&self, path: &Path) -> Result<Lookup, LoadError> {
        let (engine, path) = (self.engine()?.clone(), path.to_path_buf());
        tokio::task::spawn_blocking(move || cache::lookup(&engine, &path))
            .await
            .map_err(|err| LoadError::Compiler(format!("the cache lookup failed: {err}")))
    }

    async fn compile_in_child(
        &self,
        program: &Path,
        args: &[String],
        out: &Path,
        wasm: &[u8],
    ) -> Result<(), ChildError> {
        let settings = serde_json::to_string(&EngineSettings::of(&self.config))
            .expect("engine settings serialise");
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .arg("--engine")
            .arg(settings)
            .arg("--out")
            .arg(out)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(ChildError::Spawn)?;
        let failed = |why: String| ChildError::Failed(LoadError::Compiler(why));
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // The child reads the whole component before it compiles or writes anything. One
        // deadline covers writing it and the compile.
        let run = async move {
            let written = stdin.write_all(wasm).await;
            drop(stdin);
            (written, child.wait_with_output().await)
        };
        let (written, output) = match tokio::time::timeout(CHILD_TIMEOUT, run).await {
            Ok((written, Ok(output))) => (written, output),
            Ok((_, Err(err))) => return Err(failed(format!("waiting for the compiler: {err}"))),
            // Dropping the future kills the child (kill_on_drop).
            Err(_) => {
                return Err(failed(format!(
                    "the compiler took longer than {} s",
                    CHILD_TIMEOUT.as_secs()
                )));
            }
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        // A refusal is the compiler's message alone; after a crash, its last lines
        // (a panic's message, not Rust's note about backtraces).
        let said = stderr.trim();
        match output.status.code() {
            Some(0) if written.is_ok() => Ok(()),
            Some(COMPILE_REFUSED) => Err(ChildError::Failed(LoadError::Invalid(crate::truncate(
                said, 2000,
            )))),
            _ => Err(failed(format!(
                "{} ({}): {}",
                program.display(),
                output.status,
                crate::truncate(&last_lines(said), 2000)
            ))),
        }
    }
}

/// The last three lines of a crashed compiler's stderr that are not Rust's notes.
fn last_lines(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note:"))
        .collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}
