//! Project automation, run as `cargo xtask <command>`.
//!
//! `cargo xtask test` is the one command that runs the whole test suite on a fresh
//! machine. It first prepares the external parts the tests use (each capability adds its
//! own step to [`prepare`]), then runs `cargo test --workspace --locked`, passing on any
//! arguments after `--`.

mod arm64;
mod demo;

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
  bench-onboard [-- --devices N] onboard N simulated devices (Security 2 + Wi-Fi + claim)
                                over BlueZoo with the release gateway (default 100)
  bench-uplink [-- --messages N --connections C[,C..] --protocol P --rounds R] telemetry through the gateway
                                (API -> outbox -> Mosquitto QoS1) next to raw Mosquitto
                                QoS1; connections default 64,128
  bench-fleet [-- --gateways N --devices N --records N --batch N --workers N --faults]
                                N release gateways on a 3-node NATS cluster (JetStream +
                                MQTT, Debian nats-server, installed if missing) relaying
                                telemetry to cloud-sim workers, next to QoS 1 straight
                                into the cluster; with --faults a node and a worker die
  deb [-- --target TRIPLE]      the Debian package (cargo-deb, installed when missing):
                                release build, /etc/outpost/outpost.toml from
                                gateway-config with the state in /var/lib/outpost, the
                                systemd unit; prints the .deb path. With --target
                                aarch64-unknown-linux-gnu: the Raspberry Pi (arm64)
                                package, cross-built with Debian's toolchain
  test-arm64 [-- <cargo test args>]
                                the pure crates' tests built for aarch64 and run under
                                qemu-user (installs the cross toolchain when missing)
  esp-idf                       build the ESP-IDF example with the device agent
                                (devices/esp-idf/examples/ota-agent) with idf.py; needs
                                an ESP-IDF tree in IDF_PATH (`cargo xtask test` runs it
                                when IDF_PATH is set)
  demo [-- --lights N --sensors N --keep]
                                the whole story on this machine: Mosquitto + cloud-sim,
                                50 simulated devices onboarded, two signed handlers, a
                                signed cloud deployment in three waves; prints a summary
  help                          show this text";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("bench-cache") => bench_cache(&args[1..]),
        Some("bench-onboard") => bench_onboard(&args[1..]),
        Some("bench-uplink") => bench_uplink(&args[1..]),
        Some("bench-fleet") => bench_fleet(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("deb") => deb(&args[1..]),
        Some("test-arm64") => arm64::test(&args[1..]),
        Some("esp-idf") => esp_idf(true),
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
    esp_idf(false)?;
    eprintln!("xtask: all tests passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Builds the ESP-IDF example app with the device agent component (its ESP-IDF port),
/// where an ESP-IDF tree is installed (`IDF_PATH`, with `idf.py` on the PATH as
/// `export.sh` sets up). ESP-IDF cannot be fetched here, so without it `cargo xtask test`
/// says so (the component's portable core and POSIX port are built and tested either
/// way); `cargo xtask esp-idf` then fails.
fn esp_idf(required: bool) -> anyhow::Result<()> {
    let Some(idf) = std::env::var_os("IDF_PATH") else {
        if required {
            bail!(
                "IDF_PATH is not set: install ESP-IDF 5.1 or later and run `. $IDF_PATH/export.sh` \
                 first (docs/device-agent.md)"
            );
        }
        eprintln!(
            "xtask: IDF_PATH is not set, so the ESP-IDF port of the device agent was not built \
             (cargo xtask esp-idf builds it where ESP-IDF is installed)"
        );
        return Ok(());
    };
    let example = workspace_root().join("devices/esp-idf/examples/ota-agent");
    let target = std::env::var("OUTPOST_IDF_TARGET").unwrap_or_else(|_| "esp32c3".to_owned());
    step(&format!(
        "idf.py set-target {target} build (devices/esp-idf/examples/ota-agent, IDF_PATH={})",
        Path::new(&idf).display()
    ));
    for args in [vec!["set-target", target.as_str()], vec!["build"]] {
        let status = Command::new("idf.py")
            .current_dir(&example)
            .args(["-B", "build"])
            .args(&args)
            .status()
            .context("cannot run idf.py: run `. $IDF_PATH/export.sh` first")?;
        if !status.success() {
            bail!("idf.py {} failed ({status})", args.join(" "));
        }
    }
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
/// capabilities add their parts here: the BlueZoo venv, Mosquitto, Chromium with
/// chromedriver for the dashboard, and promtool (Debian's prometheus) for /metrics.
fn prepare(root: &Path) -> anyhow::Result<()> {
    step("checking the toolchain");
    let rustc = Command::new("rustc")
        .current_dir(root)
        .arg("--version")
        .output()
        .context("rustc not found: install Rust with rustup (https://rustup.rs)")?;
    eprintln!("  {}", String::from_utf8_lossy(&rustc.stdout).trim());
    ensure_rust_target(root, WASM_TARGET)?;
    ensure_bluezoo(root)?;
    ensure_componentize_py(root)?;
    ensure_azure_iot_device(root)?;
    ensure_mosquitto()?;
    ensure_nats_server()?;
    // The dashboard test drives Debian's headless Chromium through chromedriver.
    if !Path::new("/usr/bin/chromium").exists() || !Path::new("/usr/bin/chromedriver").exists() {
        apt_install("chromium chromium-driver")?;
    }
    // The C device agent's test build (tests/device-agent) links Debian's libcurl, cJSON
    // and OpenSSL.
    if ["/usr/include/cjson/cJSON.h", "/usr/include/openssl/evp.h"]
        .iter()
        .any(|header| !Path::new(header).exists())
        || !curl_header_present()
    {
        apt_install("libcurl4-openssl-dev libcjson-dev libssl-dev")?;
    }
    // The metrics test has Prometheus's own promtool check what /metrics serves.
    if !Path::new("/usr/bin/promtool").exists() {
        apt_install("prometheus")?;
    }
    step(
        "cargo build -p esp-sim -p cloud-sim -p hub-sim -p outpost-fleet-bench (the onboarding, uplink and fleet tests run these binaries)",
    );
    let status = Command::new(cargo())
        .current_dir(root)
        .args([
            "build",
            "--locked",
            "-p",
            "esp-sim",
            "-p",
            "cloud-sim",
            "-p",
            "hub-sim",
            "-p",
            "outpost-fleet-bench",
        ])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("building esp-sim, cloud-sim, hub-sim and fleet-bench failed ({status})");
    }
    Ok(())
}

/// Whether libcurl's header is installed (Debian puts it under the multiarch include dir).
fn curl_header_present() -> bool {
    ["/usr/include/curl/curl.h"]
        .into_iter()
        .map(PathBuf::from)
        .chain(
            std::fs::read_dir("/usr/include")
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path().join("curl/curl.h")),
        )
        .any(|path| path.exists())
}

/// The pinned componentize-py (PyPI) that builds the Python handler example.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

/// Makes `target/tools/componentize-py`, a venv with componentize-py, unless it is there:
/// `tests/guests` builds `plugins/handlers/python-example` with it.
fn ensure_componentize_py(root: &Path) -> anyhow::Result<()> {
    ensure_venv(root, "componentize-py", COMPONENTIZE_PY, "componentize-py").map(|_| ())
}

/// The pinned BlueZoo (an emulated BlueZ on D-Bus) for the BLE tests.
const BLUEZOO: &str = "bluezoo==1.0.2";

/// Makes `target/tools/bluezoo`, a Python venv with BlueZoo, unless it is there.
fn ensure_bluezoo(root: &Path) -> anyhow::Result<PathBuf> {
    ensure_venv(root, "bluezoo", BLUEZOO, "bluezoo")
}

/// The pinned Microsoft device SDK for Python (PyPI), the referee of hub-sim's Azure IoT
/// dialect (its paho-mqtt comes pinned below 2 by the SDK itself).
const AZURE_IOT_DEVICE: &str = "azure-iot-device==2.14.0";

/// Makes `target/tools/azure-iot-device`, a venv with Microsoft's device SDK, unless it is
/// there: the hub-sim tests run it against hub-sim before Outpost.
fn ensure_azure_iot_device(root: &Path) -> anyhow::Result<()> {
    ensure_venv(root, "azure-iot-device", AZURE_IOT_DEVICE, "python").map(|_| ())
}

/// Makes `target/tools/<tool>`, a Python venv with `requirement` from PyPI, unless its
/// `bin/<program>` is there (made for the same requirement); returns that program.
fn ensure_venv(
    root: &Path,
    tool: &str,
    requirement: &str,
    program: &str,
) -> anyhow::Result<PathBuf> {
    let venv = root.join("target/tools").join(tool);
    let program = venv.join("bin").join(program);
    // What the venv was made for: a new pin makes it again.
    let marker = venv.join("outpost-requirement");
    let made_for = std::fs::read_to_string(&marker).unwrap_or_default();
    if program.exists() && made_for.trim() == requirement {
        eprintln!("  {requirement}: installed");
        return Ok(program);
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .with_context(|| format!("cannot remove the old {}", venv.display()))?;
    }
    step(&format!(
        "python3 -m venv target/tools/{tool} && pip install {requirement}"
    ));
    let ok = |cmd: &mut Command| cmd.status().is_ok_and(|s| s.success());
    if !ok(Command::new("python3").args(["-m", "venv"]).arg(&venv)) {
        bail!("python3 -m venv failed: install python3 and python3-venv (Debian)");
    }
    if !ok(Command::new(venv.join("bin/pip")).args(["install", "-q", requirement])) {
        bail!("pip install {requirement} failed (needs PyPI)");
    }
    std::fs::write(&marker, requirement)
        .with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(program)
}

/// The uplink benchmark: the release gateway and the bench (its own package, so that it
/// does not rebuild the gateway with other features) against a local Mosquitto (Debian
/// package, installed here if missing).
fn bench_uplink(args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    ensure_mosquitto()?;
    build_release_gateway_and_sim(&root)?;
    build_release(&root, &["outpost-uplink-bench"])?;
    let bench_args: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    let status = Command::new(root.join("target/release/uplink-bench"))
        .current_dir(&root)
        .arg("--outpost")
        .arg(root.join("target/release/outpost"))
        .args(bench_args)
        .status()?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

/// The fleet benchmark: release gateways, cloud-sim and the harness (its own package)
/// against a 3-node NATS cluster (Debian `nats-server`, installed here if missing).
fn bench_fleet(args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    ensure_nats_server()?;
    // The gateway as the other benches build it (built together with cloud-sim, cargo
    // would unify other features and build the release gateway a second time).
    build_release_gateway_and_sim(&root)?;
    build_release_cloud_sim(&root)?;
    build_release(&root, &["outpost-fleet-bench"])?;
    let bench_args: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    let status = Command::new(root.join("target/release/fleet-bench"))
        .current_dir(&root)
        .arg("--outpost")
        .arg(root.join("target/release/outpost"))
        .arg("--cloud-sim")
        .arg(root.join("target/release/cloud-sim"))
        .args(bench_args)
        .status()?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

/// The onboarding benchmark: N simulated devices (Security 2 + Wi-Fi + claim) over
/// BlueZoo, onboarded by the release `outpost` through its CLI.
fn bench_onboard(args: &[String]) -> anyhow::Result<()> {
    let mut devices = 100usize;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--" => {}
            "--devices" => {
                devices = rest
                    .next()
                    .and_then(|n| n.parse().ok())
                    .context("--devices takes a number")?;
            }
            other => bail!("unknown bench argument {other:?} (--devices N)"),
        }
    }
    let root = workspace_root();
    let bluezoo = ensure_bluezoo(&root)?;
    build_release_gateway_and_sim(&root)?;
    let bin = root.join("target/release");
    let dir = root.join("target/bench-onboard");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let outpost = |args: &[&str]| {
        Command::new(bin.join("outpost"))
            .arg("--config")
            .arg(dir.join("outpost.toml"))
            .args(args)
            .output()
    };
    std::fs::write(dir.join("wifi"), "correct horse battery")?;
    std::fs::write(
        dir.join("outpost.toml"),
        "[gateway]\nid = \"bench\"\nstate_dir = \"state\"\n[api]\nbind = \"127.0.0.1:0\"\n\
         [cache]\nbind = \"127.0.0.1:0\"\n[ble]\nadapter = \"hci0\"\nmax_concurrent_sessions = 32\n\
         [onboarding]\nstatus_poll_ms = 100\nscan = true\nscan_timeout_secs = 30\n\
         [[onboarding.wifi]]\nssid = \"outpost-site\"\npassphrase = { file = \"wifi\" }\n\
         [onboarding.claim]\nca_cert = \"ca/claim-ca.pem\"\nca_key = { file = \"ca/claim-ca.key\" }\n",
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.join("wifi"), std::fs::Permissions::from_mode(0o600))?;
    let ca = outpost(&[
        "onboard",
        "ca-init",
        dir.join("ca").to_str().unwrap_or("ca"),
    ])?;
    if !ca.status.success() {
        bail!("ca-init failed: {}", String::from_utf8_lossy(&ca.stderr));
    }
    step(&format!(
        "esp-sim --emulate --ble {devices} --claim --security 2"
    ));
    let mut sim = Command::new(bin.join("esp-sim"))
        .args([
            "--emulate",
            "--claim",
            "--security",
            "2",
            "--connect-delay-ms",
            "200",
        ])
        .args(["--ble", &devices.to_string()])
        .arg("--manifest")
        .arg(dir.join("fleet.json"))
        .arg("--work-dir")
        .arg(dir.join("bus"))
        .env("OUTPOST_BLUEZOO", &bluezoo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join("esp-sim.log"))?)
        .spawn()?;
    let mut bus = None;
    let stdout = sim.stdout.take().context("no stdout")?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    for line in lines.by_ref() {
        let line = line?;
        let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if json["event"] == "bus" {
            bus = json["dbus_system_bus_address"].as_str().map(str::to_owned);
        }
        if json["event"] == "ready" {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let bus = bus.context("esp-sim printed no bus address")?;
    let mut gateway = Command::new(bin.join("outpost"))
        .arg("--config")
        .arg(dir.join("outpost.toml"))
        .arg("run")
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("outpost.log"))?)
        .spawn()?;
    let result = (|| -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let import = outpost(&[
                "onboard",
                "import",
                dir.join("fleet.json").to_str().unwrap_or(""),
            ])?;
            if import.status.success() {
                break;
            }
            if Instant::now() > deadline {
                bail!("import failed: {}", String::from_utf8_lossy(&import.stderr));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        step(&format!("outpost onboard run ({devices} devices)"));
        let run = outpost(&["onboard", "run", "--json"])?;
        serde_json::from_slice(&run.stdout)
            .with_context(|| format!("no report: {}", String::from_utf8_lossy(&run.stderr)))
    })();
    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = Command::new("kill").arg(sim.id().to_string()).status();
    let _ = sim.wait();
    let report = result?;
    let list = report["devices"].as_array().cloned().unwrap_or_default();
    let mut crypto: Vec<f64> = list
        .iter()
        .filter_map(|d| d["crypto_ms"].as_f64())
        .collect();
    crypto.sort_by(f64::total_cmp);
    let median = crypto.get(crypto.len() / 2).copied().unwrap_or_default();
    let mean = crypto.iter().sum::<f64>() / crypto.len().max(1) as f64;
    let total_s = report["elapsed_ms"].as_f64().unwrap_or_default() / 1000.0;
    // perf-anchors.md §4: esp_prov spends at least ~10 s per device in fixed sleeps
    // (5 s scan + 5 s before each status poll), one device at a time.
    let esp_prov_floor_s = 10.0 * devices as f64;
    println!(
        "\nonboarding benchmark: {devices} devices, Security 2 + Wi-Fi + claim, BLE over BlueZoo"
    );
    println!(
        "  onboarded {} / failed {}",
        report["succeeded"], report["failed"]
    );
    println!("  total: {total_s:.2} s (goal < 20 s for 100)");
    println!(
        "  per-device crypto (gateway side: SRP + GCM): median {median:.1} ms, mean {mean:.1} ms"
    );
    println!(
        "  vs esp_prov's fixed-sleep floor ({esp_prov_floor_s:.0} s for {devices} devices one by one): {:.0}x faster",
        esp_prov_floor_s / total_s.max(0.001)
    );
    println!("  rerun: cargo xtask bench-onboard -- --devices {devices}");
    for device in list.iter().filter(|d| d["error"].is_string()).take(10) {
        println!(
            "  failed: {} ({})",
            device["name"].as_str().unwrap_or("?"),
            device["error"].as_str().unwrap_or_default()
        );
    }
    if report["failed"].as_u64() != Some(0) {
        bail!(
            "some devices failed; see target/bench-onboard/outpost.log and bus/bluezoo.log, \
             esp-sim.log beside it"
        );
    }
    Ok(())
}

/// Installs Debian's Mosquitto when it is missing.
fn ensure_mosquitto() -> anyhow::Result<()> {
    ensure_debian_program("mosquitto", &["-h"], "mosquitto")
}

/// Installs Debian's NATS server (the fleet test's and bench's broker cluster) when it is
/// missing.
fn ensure_nats_server() -> anyhow::Result<()> {
    ensure_debian_program("nats-server", &["--version"], "nats-server")
}

/// Installs Debian package `package` when `program args` does not run.
fn ensure_debian_program(program: &str, args: &[&str], package: &str) -> anyhow::Result<()> {
    if Command::new(program).args(args).output().is_ok() {
        return Ok(());
    }
    step(&format!("installing {package} (Debian package)"));
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("apt-get install {package} failed ({status}); install it and rerun");
    }
    Ok(())
}

/// Runs cargo with `args` in `root`; an error when it fails.
fn cargo_ok(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(cargo())
        .current_dir(root)
        .args(args)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The target handler guests are built for.
const WASM_TARGET: &str = "wasm32-wasip2";

/// Installs a Rust target's standard library with rustup when it is missing.
fn ensure_rust_target(root: &Path, target: &str) -> anyhow::Result<()> {
    if rust_target_installed(root, target)? {
        eprintln!("  target {target}: installed");
        return Ok(());
    }
    if rustup_target_add(root, target) {
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

/// `rustup target add`; whether it worked (rustup may be missing or offline).
fn rustup_target_add(root: &Path, target: &str) -> bool {
    step(&format!("rustup target add {target}"));
    Command::new("rustup")
        .current_dir(root)
        .args(["target", "add", target])
        .status()
        .is_ok_and(|status| status.success())
}

/// Whether the toolchain that builds this workspace has `target`'s standard library.
fn rust_target_installed(root: &Path, target: &str) -> anyhow::Result<bool> {
    let sysroot = Command::new("rustc")
        .current_dir(root)
        .args(["--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    Ok(sysroot.join("lib/rustlib").join(target).exists())
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

/// `cargo xtask deb [-- --target TRIPLE]`: builds the release binary and the Debian
/// package; the packaged config is the shipped one with its state in /var/lib/outpost.
fn deb(args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    let args = args.strip_prefix(&["--".to_owned()]).unwrap_or(args);
    let target = match args {
        [] => None,
        [flag, triple] if flag == "--target" => Some(triple.clone()),
        other => bail!("unexpected arguments {other:?}: use -- --target TRIPLE"),
    };
    if Command::new(cargo())
        .args(["deb", "--version"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        step("cargo install cargo-deb --locked");
        let status = Command::new(cargo())
            .args(["install", "cargo-deb", "--locked"])
            .status()?;
        if !status.success() {
            bail!("cargo install cargo-deb failed ({status})");
        }
    }
    // The package's config: the shipped one, with the state where the unit keeps it.
    let shipped = std::fs::read_to_string(root.join("gateway-config/outpost.toml"))?;
    let mut replaced = 0;
    let packaged: String = shipped
        .lines()
        .map(|line| {
            if line.starts_with("state_dir = ") {
                replaced += 1;
                "state_dir = \"/var/lib/outpost\"".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    if replaced != 1 {
        bail!("gateway-config/outpost.toml has no single `state_dir = ` line to replace");
    }
    std::fs::create_dir_all(root.join("target/deb"))?;
    std::fs::write(root.join("target/deb/outpost.toml"), packaged + "\n")?;

    match target.as_deref() {
        None => build_release_gateway_and_sim(&root)?,
        Some(triple) => {
            if triple == arm64::TARGET {
                arm64::ensure_toolchain(&root)?;
            }
            // Another machine's package holds the gateway alone: no simulator to share.
            let mut args = vec!["build", "--release", "--locked", "-p", "outpost-gateway"];
            args.extend(["--target", triple]);
            step(&format!("cargo {}", args.join(" ")));
            let mut build = Command::new(cargo());
            build.current_dir(&root).args(&args);
            if triple == arm64::TARGET {
                arm64::cross_env(&mut build);
            }
            let status = build.status().context("cannot run cargo")?;
            if !status.success() {
                bail!("cargo {} failed ({status})", args.join(" "));
            }
        }
    }
    let mut package = Command::new(cargo());
    package
        .current_dir(&root)
        .args(["deb", "-p", "outpost-gateway", "--no-build", "--locked"]);
    if let Some(triple) = &target {
        package.args(["--target", triple]);
    }
    step("cargo deb -p outpost-gateway --no-build");
    let output = package.stderr(std::process::Stdio::inherit()).output()?;
    if !output.status.success() {
        bail!("cargo deb failed ({})", output.status);
    }
    let deb = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    println!("{deb}");
    Ok(())
}

/// The release build of the gateway and esp-sim that bench-onboard and deb share: one
/// package set, so cargo unifies features the same way and CI compiles it once.
fn build_release_gateway_and_sim(root: &Path) -> anyhow::Result<()> {
    build_release(root, &["outpost-gateway", "esp-sim"])
}

/// The release cloud-sim that bench-fleet and the demo share, built alone: with the gateway
/// in the same command cargo would unify features differently and rebuild the gateway.
fn build_release_cloud_sim(root: &Path) -> anyhow::Result<()> {
    build_release(root, &["cloud-sim"])
}

/// `cargo build --release --locked -p P...` for this machine.
fn build_release(root: &Path, packages: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["build", "--release", "--locked"];
    for package in packages {
        args.extend(["-p", package]);
    }
    step(&format!("cargo {}", args.join(" ")));
    cargo_ok(root, &args)
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
