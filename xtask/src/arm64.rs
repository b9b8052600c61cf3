//! The Raspberry Pi build (64-bit ARM, `aarch64-unknown-linux-gnu`): Debian's cross
//! toolchain compiles and links it, and Debian's qemu-user runs what it built on this
//! x86-64 machine. The linker and the test runner are set for the cargo commands xtask
//! runs ([`cross_env`]), only when this machine is not arm64 itself: on a Raspberry Pi the
//! same commands build and test natively.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::{apt_install, cargo, step};

/// The Rust target of a 64-bit Raspberry Pi OS or Debian arm64.
pub(crate) const TARGET: &str = "aarch64-unknown-linux-gnu";

/// Debian's cross compiler (the linker, and `cc` for SQLite, libdbus and ring), the arm64
/// C library it links against, and the statically linked user-mode emulator (the test
/// runner, and what packaging/test-deb runs the arm64 package with).
const PACKAGES: &str = "gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static";

/// The crates whose tests need nothing but a CPU, a file system and loopback: no BLE, no
/// broker, no WebAssembly guests. Their tests run under qemu-user.
pub(crate) const PURE_CRATES: [&str; 3] = ["outpost-protocomm", "outpost-store", "outpost-serve"];

/// Whether this machine builds arm64 natively (a Raspberry Pi, an arm64 server).
fn native() -> bool {
    std::env::consts::ARCH == "aarch64"
}

/// Sets the cross linker and the emulator as the test runner on `command` (a cargo
/// command for [`TARGET`]) when this machine is not arm64; the same as exporting
/// `CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER` and `…_RUNNER` by hand.
pub(crate) fn cross_env(command: &mut Command) {
    if !native() {
        command
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            )
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
                "qemu-aarch64-static -L /usr/aarch64-linux-gnu",
            );
    }
}

/// Installs the cross toolchain, the emulator and the Rust target when any is missing
/// (on an arm64 machine only the Rust target, which is its own).
pub(crate) fn ensure_toolchain(root: &Path) -> anyhow::Result<()> {
    if native() {
        return Ok(());
    }
    let have = |program: &str| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let libc = Path::new("/usr/aarch64-linux-gnu/lib/libc.so.6").exists()
        && Path::new("/usr/aarch64-linux-gnu/include/stdio.h").exists();
    if have("aarch64-linux-gnu-gcc") && have("qemu-aarch64-static") && libc {
        eprintln!("  cross toolchain for {TARGET}: installed");
    } else {
        apt_install(PACKAGES).with_context(|| {
            format!("the {TARGET} build needs Debian's {PACKAGES}; install them and rerun")
        })?;
    }
    if crate::rust_target_installed(root, TARGET)? {
        eprintln!("  target {TARGET}: installed");
        return Ok(());
    }
    if !crate::rustup_target_add(root, TARGET) {
        bail!(
            "`rustup target add {TARGET}` failed: the arm64 build needs rustup's standard \
             library for it (install Rust with rustup, https://rustup.rs)"
        );
    }
    Ok(())
}

/// `cargo xtask test-arm64 [-- <cargo test args>]`: the pure crates' tests, built for
/// arm64 and run under qemu-user ([`cross_env`]); natively on an arm64 machine.
pub(crate) fn test(args: &[String]) -> anyhow::Result<()> {
    let extra = args.strip_prefix(&["--".to_owned()]).unwrap_or(args);
    let root = crate::workspace_root();
    ensure_toolchain(&root)?;
    let mut command = Command::new(cargo());
    command
        .current_dir(&root)
        .args(["test", "--locked", "--target", TARGET]);
    cross_env(&mut command);
    for package in PURE_CRATES {
        command.args(["-p", package]);
    }
    step(&format!(
        "cargo test --target {TARGET} -p {}{}",
        PURE_CRATES.join(" -p "),
        if native() {
            ""
        } else {
            " (run under qemu-aarch64-static)"
        }
    ));
    let started = std::time::Instant::now();
    let status = command
        .args(extra)
        .status()
        .context("cannot run cargo test")?;
    if !status.success() {
        bail!("the {TARGET} tests failed ({status})");
    }
    eprintln!(
        "xtask: the {TARGET} tests passed in {:.0?}",
        started.elapsed()
    );
    Ok(())
}
