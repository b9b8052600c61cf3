//! What the crates' tests share: the `esp-sim` fleet simulator (the protocomm device
//! role; `cargo build -p esp-sim`, which `cargo xtask test` runs first) as a child
//! process whose JSON events the test waits for. With `--emulate` it brings up BlueZoo on
//! a private D-Bus; BlueZoo comes from the venv `cargo xtask test` makes (or
//! `OUTPOST_BLUEZOO`). A missing part fails the test; it never skips.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a test waits for an event: generous, for a cold debug binary on a loaded
/// 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A free loopback port for one of the benches' listeners, below the ephemeral range.
///
/// A port the kernel hands out for `bind(0)` comes from the range outgoing connections
/// take their local ports from, and the benches make thousands of those
/// (devices, gateways, workers, probes): between our check and the listener's own bind,
/// or while a killed broker is down, one of them could take it (a gateway once failed to
/// start on "address already in use"). Below the range only listeners bind; each port is
/// handed out once per process, and processes side by side start at different places.
pub fn free_port() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const BASE: u32 = 10_000;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if low < BASE + 1_000 {
        // No room below the ephemeral range here: the kernel's choice, as any listener.
        return Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    let span = low - BASE;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(BASE + offset).map_err(std::io::Error::other)?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {BASE}..{low}"),
    ))
}

/// Microseconds since the Unix epoch: the timestamps the benches put in what they send
/// and read back across processes.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `esp-sim` binary in the target directory of the running test.
pub fn esp_sim_binary() -> PathBuf {
    sibling_binary("esp-sim")
}

/// The binary `name` of this workspace beside the running test (target/<profile>/), which
/// `cargo xtask test` builds before the tests.
fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test binary lives in target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p {name}` (cargo xtask test does)",
        path.display()
    );
    path
}

/// BlueZoo, the BlueZ emulation `esp-sim --emulate` runs.
pub fn bluezoo() -> PathBuf {
    let path = std::env::var_os("OUTPOST_BLUEZOO")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/tools/bluezoo/bin/bluezoo"));
    assert!(
        path.exists(),
        "BlueZoo is missing at {}: `cargo xtask test` installs it (python3 -m venv \
         target/tools/bluezoo && target/tools/bluezoo/bin/pip install bluezoo==1.0.2)",
        path.display()
    );
    path
}

/// The Python of the venv with Microsoft's device SDK (`azure-iot-device` from PyPI), the
/// referee of hub-sim's Azure dialect; `cargo xtask test` makes it (or
/// `OUTPOST_AZURE_PYTHON`).
pub fn azure_sdk_python() -> PathBuf {
    let path = std::env::var_os("OUTPOST_AZURE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/tools/azure-iot-device/bin/python"));
    assert!(
        path.exists(),
        "Microsoft's azure-iot-device SDK is missing at {}: `cargo xtask test` installs it \
         (python3 -m venv target/tools/azure-iot-device && \
         target/tools/azure-iot-device/bin/pip install azure-iot-device==2.14.0)",
        path.display()
    );
    path
}

/// The JSON events a child process prints on stdout, one object per line, read by a
/// thread; `wait_for` finds one (also one seen before).
pub struct EventLog {
    events: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("seen", &self.seen.len())
            .finish_non_exhaustive()
    }
}

impl EventLog {
    /// Reads `stdout` until it closes; lines that are not JSON are skipped.
    pub fn read(stdout: impl std::io::Read + Send + 'static) -> Self {
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(json) = serde_json::from_str(&line)
                    && tx.send(json).is_err()
                {
                    break;
                }
            }
        });
        Self {
            events,
            seen: Vec::new(),
        }
    }

    /// The first event named `event` that `pred` accepts, waiting at most [`DEADLINE`];
    /// `None` when none came.
    pub fn wait_for(
        &mut self,
        event: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        if let Some(found) = self.seen.iter().find(|e| e["event"] == event && pred(e)) {
            return Some(found.clone());
        }
        let end = Instant::now() + DEADLINE;
        while let Ok(json) = self
            .events
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.seen.push(json.clone());
            if json["event"] == event && pred(&json) {
                return Some(json);
            }
        }
        None
    }

    /// Everything printed so far.
    pub fn drain(&mut self) -> &[serde_json::Value] {
        while let Ok(json) = self.events.try_recv() {
            self.seen.push(json);
        }
        &self.seen
    }

    /// The next event not seen yet, waiting until `end`; `None` when none came.
    pub fn next_before(&mut self, end: Instant) -> Option<serde_json::Value> {
        let json = self
            .events
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .ok()?;
        self.seen.push(json.clone());
        Some(json)
    }

    /// What was seen so far, without reading more.
    pub fn seen(&self) -> &[serde_json::Value] {
        &self.seen
    }
}

/// A running simulator and the events it printed. Stopped (SIGTERM, so the emulation
/// takes BlueZoo and its bus down) when dropped.
pub struct Sim {
    child: Child,
    events: EventLog,
    /// The private system bus of `--emulate`, for `DBUS_SYSTEM_BUS_ADDRESS`.
    pub bus: Option<String>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("pid", &self.child.id())
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// Starts `esp-sim` with `args`, writing its device manifest to `manifest`, and
    /// waits for its `ready` event.
    pub fn start(args: &[&str], manifest: &Path) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut command = Command::new(esp_sim_binary());
        command
            .args(args)
            .arg("--manifest")
            .arg(manifest)
            .arg("--work-dir")
            .arg(dir.path().join("bus"));
        // Only the BLE emulation needs BlueZoo.
        if args.contains(&"--emulate") {
            command.env("OUTPOST_BLUEZOO", bluezoo());
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .spawn()
            .expect("esp-sim starts");
        let events = EventLog::read(child.stdout.take().expect("piped"));
        let mut sim = Self {
            child,
            events,
            bus: None,
            _dir: dir,
        };
        sim.wait_for("ready", |_| true);
        sim.bus = sim
            .events
            .seen()
            .iter()
            .find(|e| e["event"] == "bus")
            .and_then(|e| e["dbus_system_bus_address"].as_str())
            .map(str::to_owned);
        sim
    }

    /// Waits for an event `event` that `pred` accepts (one seen earlier counts);
    /// panics with what was seen after [`DEADLINE`].
    pub fn wait_for(
        &mut self,
        event: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        match self.events.wait_for(event, pred) {
            Some(found) => found,
            None => panic!("esp-sim: no {event} event; saw {:?}", self.events.seen()),
        }
    }

    /// Everything printed so far.
    pub fn drain(&mut self) -> &[serde_json::Value] {
        self.events.drain()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `hub-sim` binary (IoT Hub and DPS stand-in) in the target directory of the running
/// test (`cargo build -p hub-sim`, which `cargo xtask test` runs first).
pub fn hub_sim_binary() -> PathBuf {
    sibling_binary("hub-sim")
}

/// A running `hub-sim`: its `ready` event (DPS and hub addresses, id scope), its CA
/// file, operator commands on its stdin and the events it prints. Killed when dropped.
pub struct HubSim {
    child: Child,
    stdin: std::process::ChildStdin,
    /// What it printed.
    pub events: EventLog,
    /// Its `ready` event.
    pub ready: serde_json::Value,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for HubSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSim")
            .field("pid", &self.child.id())
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl HubSim {
    /// Starts `binary` (see [`hub_sim_binary`]) with `args` and waits until it is ready.
    pub fn start(binary: &Path, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut child = Command::new(binary)
            .args(args)
            .arg("--ca-out")
            .arg(dir.path().join("ca.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("hub-sim starts");
        let stdin = child.stdin.take().expect("piped");
        let mut events = EventLog::read(child.stdout.take().expect("piped"));
        let ready = events
            .wait_for("ready", |_| true)
            .expect("hub-sim says it is ready");
        Self {
            child,
            stdin,
            events,
            ready,
            dir,
        }
    }

    /// DPS's host (an address in 127.0.0.0/8, port 8883).
    pub fn dps(&self) -> &str {
        self.ready["dps"].as_str().expect("dps")
    }

    /// The first hub's host name.
    pub fn hub(&self) -> &str {
        self.ready["hubs"][0].as_str().expect("a hub")
    }

    /// The `index`th hub's host name.
    pub fn hub_at(&self, index: usize) -> &str {
        self.ready["hubs"][index].as_str().expect("that hub")
    }

    /// DPS's id scope.
    pub fn id_scope(&self) -> &str {
        self.ready["id_scope"].as_str().expect("id_scope")
    }

    /// The CA certificate (PEM file) its listeners' certificates chain to.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Sends an operator command (`{"op": …}`).
    pub fn command(&mut self, command: &serde_json::Value) {
        use std::io::Write;
        writeln!(self.stdin, "{command}").expect("hub-sim reads commands");
    }

    /// The first event `event` that `pred` accepts (one seen earlier counts); panics with
    /// what was seen after [`DEADLINE`].
    pub fn wait(
        &mut self,
        event: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        match self.events.wait_for(event, pred) {
            Some(found) => found,
            None => panic!("hub-sim: no {event} event; saw {:#?}", self.events.drain()),
        }
    }
}

impl Drop for HubSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and one client certificate it issues per common name (the X.509 identity
/// of a DPS registration or a hub device), as PEM files in `dir`: returns the CA's file
/// and each name's certificate and key files.
pub fn x509_files(dir: &Path, names: &[&str]) -> (PathBuf, Vec<PathBuf>, Vec<PathBuf>) {
    let ca_key = rcgen::KeyPair::generate().expect("a key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test device CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("the CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let ca = dir.join("device-ca.pem");
    std::fs::write(&ca, ca_cert.pem()).expect("written");
    let (mut certs, mut keys) = (Vec::new(), Vec::new());
    for name in names {
        let key = rcgen::KeyPair::generate().expect("a key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, *name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).expect("a certificate");
        let (cert_file, key_file) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).expect("written");
        std::fs::write(&key_file, key.serialize_pem()).expect("written");
        certs.push(cert_file);
        keys.push(key_file);
    }
    (ca, certs, keys)
}
