//! Project automation, run as `cargo xtask <command>`.
//!
//! `cargo xtask test` is the one command that runs the whole test suite on a fresh
//! machine. It first prepares the external parts the tests use (each capability adds its
//! own step to [`prepare`]), then runs `cargo test --workspace --locked`, passing on any
//! arguments after `--`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test [-- <cargo test args>]   prepare the test parts, then run every test in the workspace
  bench-cache [-- <bench args>] firmware fan-out against nginx with wrk (installs both if
                                missing); bench args: --duration S --rounds N --cold N
  help                          show this text";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("bench-cache") => bench_cache(&args[1..]),
        Some("help" | "-h" | "--help") => {
            eprintln!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command {other:?}\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let extra = match args.split_first() {
        None => &[][..],
        Some((sep, rest)) if sep == "--" => rest,
        Some((other, _)) => {
            bail!("unexpected argument {other:?}; pass cargo test arguments after --")
        }
    };
    let root = workspace_root();
    let started = Instant::now();
    prepare(&root)?;

    step("cargo test --workspace --locked");
    let status = Command::new(cargo())
        .current_dir(&root)
        .args(["test", "--workspace", "--locked"])
        .args(extra)
        .status()
        .context("cannot run cargo test")?;
    if !status.success() {
        bail!("tests failed ({status})");
    }
    eprintln!("xtask: all tests passed in {:.0?}", started.elapsed());
    Ok(())
}

/// The firmware fan-out benchmark: nginx and wrk from Debian, then the release example.
fn bench_cache(args: &[String]) -> anyhow::Result<()> {
    let extra = match args.split_first() {
        None => &[][..],
        Some((sep, rest)) if sep == "--" => rest,
        Some((other, _)) => bail!("unexpected argument {other:?}; pass bench arguments after --"),
    };
    let missing: Vec<&str> = ["nginx", "wrk"]
        .into_iter()
        .filter(|tool| {
            !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .any(|dir| Path::new(dir).join(tool).is_file())
        })
        .collect();
    if !missing.is_empty() {
        apt_install(&missing.join(" "))?;
    }
    step("cargo run --release -p outpost-cache --example fanout-bench");
    let status = Command::new(cargo())
        .current_dir(workspace_root())
        .args([
            "run",
            "--release",
            "--locked",
            "-p",
            "outpost-cache",
            "--example",
            "fanout-bench",
            "--",
        ])
        .args(extra)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

/// Makes sure every external part the tests start is present, installing what is missing.
///
/// SQLite is compiled in. The firmware cache's full-disk test mounts a small tmpfs in a
/// private mount namespace with `unshare` (util-linux, on every Debian system) and needs
/// root, as CI runs. The handler guests in `plugins/` are built by the test build
/// (`tests/guests/build.rs`) and need the `wasm32-wasip2` standard library. Later
/// capabilities add their parts here (Mosquitto, the BlueZoo venv and a private D-Bus).
fn prepare(root: &Path) -> anyhow::Result<()> {
    step("checking the toolchain");
    let rustc = Command::new("rustc")
        .current_dir(root)
        .arg("--version")
        .output()
        .context("rustc not found: install Rust with rustup (https://rustup.rs)")?;
    eprintln!("  {}", String::from_utf8_lossy(&rustc.stdout).trim());
    ensure_rust_target(root, WASM_TARGET)
}

/// The target handler guests are built for.
const WASM_TARGET: &str = "wasm32-wasip2";

/// Installs a Rust target's standard library with rustup when it is missing.
fn ensure_rust_target(root: &Path, target: &str) -> anyhow::Result<()> {
    let sysroot = Command::new("rustc")
        .current_dir(root)
        .args(["--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(target).exists() {
        eprintln!("  target {target}: installed");
        return Ok(());
    }
    step(&format!("rustup target add {target}"));
    let added = Command::new("rustup")
        .current_dir(root)
        .args(["target", "add", target])
        .status()
        .is_ok_and(|status| status.success());
    if added {
        return Ok(());
    }
    // toolchain.md: where rustup cannot fetch targets, Debian's rustc-web builds the
    // guests for wasm32-wasip1 and tests/guests/build.rs turns them into components.
    eprintln!(
        "xtask: rustup could not add {target}; falling back to Debian's rustc-web toolchain \
         ({DEBIAN_GUEST_PACKAGES})"
    );
    apt_install(DEBIAN_GUEST_PACKAGES).with_context(|| {
        format!("neither `rustup target add {target}` nor the Debian fallback worked; the handler guests cannot be built")
    })
}

/// Debian's packages for building guests without the rustup target.
const DEBIAN_GUEST_PACKAGES: &str = "rustc-web cargo-web rust-web-src wasi-libc lld";

/// Installs Debian packages (as root, or through sudo).
fn apt_install(packages: &str) -> anyhow::Result<()> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let mut command = if root {
            Command::new(args[0])
        } else {
            Command::new("sudo")
        };
        if !root {
            command.arg(args[0]);
        }
        let status = command
            .args(&args[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("cannot run {}", args.join(" ")))?;
        if !status.success() {
            bail!("{} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    step(&format!("apt-get install {packages}"));
    run(&["apt-get", "update", "-qq"])?;
    let mut args = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    args.extend(packages.split_whitespace());
    run(&args)
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

/// The cargo that runs us, so the same toolchain builds the tests.
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
