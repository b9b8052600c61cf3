//! Builds every guest in `plugins/` (release) and writes their paths as constants for
//! `src/lib.rs`. The guests are a cargo workspace of their own with another target;
//! building them here (as wasmtime's test-programs do) means `cargo test` always tests the
//! current source and no compiled `.wasm` is ever committed.
//!
//! Two toolchains, chosen automatically (or by `OUTPOST_GUEST_TOOLCHAIN=rustup|debian`):
//!
//! * **rustup** (what vendors use): the `wasm32-wasip2` target; rustc links a component
//!   directly.
//! * **debian** (for machines where rustup cannot fetch targets): Debian's `rustc-web`
//!   builds the standard library for `wasm32-wasip1`, and the core module is turned into a
//!   component here with `wit-component` and wasmtime 48's WASI Preview 1 reactor adapter.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (constant name, file name of the built guest)
const GUESTS: &[(&str, &str)] = &[
    ("HOSTILE", "hostile_handler.wasm"),
    ("ESP32_APP", "esp32_app.wasm"),
    ("ZIGBEE_OTA", "zigbee_ota.wasm"),
    ("SMALL", "small_handler.wasm"),
];

/// Debian's fallback toolchain: `apt-get install rustc-web cargo-web rust-web-src wasi-libc lld`.
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_STD_SRC: &str = "/usr/lib/rustlib/src/rust/library";
const DEBIAN_WASI_LIBC: &str = "/usr/lib/wasm32-wasi";
const DEBIAN_PACKAGES: &str = "rustc-web cargo-web rust-web-src wasi-libc lld";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Toolchain {
    Rustup,
    Debian,
}

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
    println!("cargo:rerun-if-env-changed=OUTPOST_GUEST_TOOLCHAIN");

    let built = match choose_toolchain() {
        Toolchain::Rustup => build_with_rustup(&plugins, &target_dir),
        Toolchain::Debian => {
            let why = if std::env::var_os("OUTPOST_GUEST_TOOLCHAIN").is_some() {
                "as OUTPOST_GUEST_TOOLCHAIN asks"
            } else {
                "the rustup target wasm32-wasip2 is not installed"
            };
            println!(
                "cargo:warning=building the wasm guests with Debian's rustc-web (wasm32-wasip1 + adapter): {why}"
            );
            build_with_debian(&plugins, &target_dir.join("debian"))
        }
    };

    let mut consts = String::new();
    for (name, file) in GUESTS {
        let path = built.join(file);
        assert!(path.exists(), "{} was not built", path.display());
        consts.push_str(&format!(
            "/// `{file}`, a component built from `plugins/`.\npub const {name}: &str = {:?};\n",
            path.display().to_string()
        ));
    }
    consts.push_str(&python_example(&root, &out_dir));
    std::fs::write(out_dir.join("guests.rs"), consts).expect("write guests.rs");
}

/// The componentize-py that `cargo xtask test` installs (PyPI, pinned there), or
/// `OUTPOST_COMPONENTIZE_PY`.
fn componentize_py(root: &Path) -> PathBuf {
    std::env::var_os("OUTPOST_COMPONENTIZE_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/tools/componentize-py/bin/componentize-py"))
}

/// Builds `plugins/handlers/python-example` with componentize-py. The constant is the
/// component's path, or empty with `PYTHON_EXAMPLE_MISSING` saying why: the build goes on
/// (the rest of the workspace does not need Python), and the test that runs the Python
/// handler fails with that reason.
fn python_example(root: &Path, out_dir: &Path) -> String {
    println!("cargo:rerun-if-env-changed=OUTPOST_COMPONENTIZE_PY");
    let tool = componentize_py(root);
    println!("cargo:rerun-if-changed={}", tool.display());
    // In this build script's own OUT_DIR: builds of other profiles do not race for it.
    let out = out_dir.join("python_example.wasm");
    let built = if tool.exists() {
        // Built from a copy: componentize-py leaves __pycache__ beside the sources, which
        // in plugins/ would make this script run again.
        let sources = out_dir.join("python-src");
        let _ = std::fs::remove_dir_all(&sources);
        std::fs::create_dir_all(&sources).expect("the python guest dir");
        for entry in std::fs::read_dir(root.join("plugins/handlers/python-example"))
            .expect("plugins/handlers/python-example")
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "py") {
                std::fs::copy(&path, sources.join(entry.file_name())).expect("copy a source");
            }
        }
        let status = Command::new(&tool)
            .current_dir(&sources)
            .arg("-d")
            .arg(root.join("wit/outpost-handler-0.1.0"))
            .args(["-w", "update-handler", "componentize", "app", "-o"])
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => Ok(out),
            Ok(s) => Err(format!("componentize-py failed ({s})")),
            Err(err) => Err(format!("cannot run {}: {err}", tool.display())),
        }
    } else {
        Err(format!(
            "componentize-py is missing at {}: `cargo xtask test` installs it (python3 -m venv \
             target/tools/componentize-py && target/tools/componentize-py/bin/pip install \
             componentize-py==0.25.1)",
            tool.display()
        ))
    };
    let (path, missing) = match built {
        Ok(path) => (path.display().to_string(), String::new()),
        Err(why) => {
            println!("cargo:warning=the Python handler example was not built: {why}");
            (String::new(), why)
        }
    };
    format!(
        "/// `python_example.wasm`, `plugins/handlers/python-example` built by componentize-py\n\
         /// (empty when it could not be built: see [`PYTHON_EXAMPLE_MISSING`]).\n\
         pub const PYTHON_EXAMPLE: &str = {path:?};\n\
         /// Why [`PYTHON_EXAMPLE`] is empty, if it is.\n\
         pub const PYTHON_EXAMPLE_MISSING: &str = {missing:?};\n"
    )
}

fn choose_toolchain() -> Toolchain {
    let rustup_ready = rustup_target_installed("wasm32-wasip2");
    let debian_ready = [DEBIAN_RUSTC, DEBIAN_CARGO, DEBIAN_STD_SRC, DEBIAN_WASI_LIBC]
        .iter()
        .all(|p| Path::new(p).exists());
    match std::env::var("OUTPOST_GUEST_TOOLCHAIN").as_deref() {
        Ok("rustup") => {
            assert!(
                rustup_ready,
                "OUTPOST_GUEST_TOOLCHAIN=rustup, but the target wasm32-wasip2 is not installed: run `rustup target add wasm32-wasip2`"
            );
            Toolchain::Rustup
        }
        Ok("debian") => {
            assert!(
                debian_ready,
                "OUTPOST_GUEST_TOOLCHAIN=debian, but Debian's toolchain is incomplete: run `apt-get install {DEBIAN_PACKAGES}`"
            );
            Toolchain::Debian
        }
        Ok(other) => panic!("OUTPOST_GUEST_TOOLCHAIN={other:?}: use rustup or debian"),
        Err(_) if rustup_ready => Toolchain::Rustup,
        Err(_) if debian_ready => Toolchain::Debian,
        Err(_) => panic!(
            "cannot build the wasm guests in plugins/: the Rust target wasm32-wasip2 is not installed. \
             Run `rustup target add wasm32-wasip2` (cargo xtask test does), or, where rustup cannot \
             fetch targets, `apt-get install {DEBIAN_PACKAGES}`"
        ),
    }
}

fn rustup_target_installed(target: &str) -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(sysroot) = Command::new(&rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(target)
        .exists()
}

/// A cargo command for the guests, with none of the outer build's settings (they are for
/// the host target).
fn guest_cargo(program: &str, plugins: &Path) -> Command {
    let mut build = Command::new(program);
    build.current_dir(plugins);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTC"
        {
            build.env_remove(&*key);
        }
    }
    build
}

fn build_with_rustup(plugins: &Path, target_dir: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = guest_cargo(&cargo, plugins)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(target_dir)
        .status()
        .expect("cannot run cargo to build the wasm guests");
    assert!(
        status.success(),
        "building the wasm guests in {} failed",
        plugins.display()
    );
    target_dir.join("wasm32-wasip2/release")
}

fn build_with_debian(plugins: &Path, target_dir: &Path) -> PathBuf {
    let status = guest_cargo(DEBIAN_CARGO, plugins)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "RUSTFLAGS",
            format!("-C linker=wasm-ld -C link-self-contained=no -L native={DEBIAN_WASI_LIBC}"),
        )
        .args([
            "build",
            "--release",
            "--locked",
            "-Zbuild-std=std,panic_abort",
            "--target",
            "wasm32-wasip1",
            "--target-dir",
        ])
        .arg(target_dir)
        .status()
        .expect("cannot run Debian's cargo to build the wasm guests");
    assert!(
        status.success(),
        "building the wasm guests in {} with Debian's toolchain failed",
        plugins.display()
    );

    let modules = target_dir.join("wasm32-wasip1/release");
    let components = target_dir.join("components");
    std::fs::create_dir_all(&components).expect("create the components directory");
    for (_, file) in GUESTS {
        let core = std::fs::read(modules.join(file)).unwrap_or_else(|err| panic!("{file}: {err}"));
        let component = wit_component::ComponentEncoder::default()
            .module(&core)
            .and_then(|encoder| {
                encoder.validate(true).adapter(
                    "wasi_snapshot_preview1",
                    wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
                )
            })
            .and_then(|mut encoder| encoder.encode())
            .unwrap_or_else(|err| panic!("turning {file} into a component failed: {err:#}"));
        std::fs::write(components.join(file), component).expect("write the component");
    }
    components
}
