//! Builds every guest in `plugins/` for `wasm32-wasip2` (release), into
//! `<target>/wasm-guests`, and writes their paths as constants for `src/lib.rs`.
//!
//! The guests are a cargo workspace of their own with another target; building them here
//! (as wasmtime's test-programs do) means `cargo test` always tests the current source and
//! no compiled `.wasm` is ever committed.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

/// (constant name, file name of the built component)
const GUESTS: &[(&str, &str)] = &[
    ("HOSTILE", "hostile_handler.wasm"),
    ("ESP32_APP", "esp32_app.wasm"),
];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest_dir
        .join("../..")
        .canonicalize()
        .expect("workspace root");
    let plugins = root.join("plugins");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    // OUT_DIR is <target>/<profile>/build/<crate>-<hash>/out: share one guest target dir
    // per workspace target dir, whatever the profile.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .expect("OUT_DIR has the usual depth")
        .join("wasm-guests");

    println!("cargo:rerun-if-changed={}", plugins.display());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    check_target_installed();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&plugins)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's settings are for the host target; none of them may leak in.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
        {
            build.env_remove(&*key);
        }
    }
    let status = build
        .status()
        .expect("cannot run cargo to build the wasm guests");
    assert!(
        status.success(),
        "building the wasm guests in {} failed",
        plugins.display()
    );

    let release = target_dir.join(TARGET).join("release");
    let mut consts = String::new();
    for (name, file) in GUESTS {
        let path = release.join(file);
        assert!(path.exists(), "{} was not built", path.display());
        consts.push_str(&format!(
            "/// `{file}`, built from `plugins/` for {TARGET}.\npub const {name}: &str = {:?};\n",
            path.display().to_string()
        ));
    }
    std::fs::write(out_dir.join("guests.rs"), consts).expect("write guests.rs");
}

/// Fails with the fix when the standard library for the target is missing.
fn check_target_installed() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .expect("cannot run rustc");
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    let std_dir = Path::new(&sysroot).join("lib/rustlib").join(TARGET);
    assert!(
        std_dir.exists(),
        "the Rust target {TARGET} is not installed ({} is missing). Run `rustup target add {TARGET}` \
         or `cargo xtask test`, which installs it",
        std_dir.display()
    );
}
