//! The `outpost` binary as an operator runs it: real processes, real signals, real
//! sockets on loopback, a real SQLite file in a temp state directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_store::{DeviceState, NewDevice, Store};

#[path = "outpost/azure.rs"]
mod azure;
#[path = "outpost/dashboard.rs"]
mod dashboard;
#[path = "outpost/device_agent.rs"]
mod device_agent;
#[path = "outpost/disk.rs"]
mod disk;
#[path = "outpost/firmware.rs"]
mod firmware;
#[path = "outpost/fleet.rs"]
mod fleet;
#[path = "outpost/hostile.rs"]
mod hostile;
#[path = "outpost/metrics.rs"]
mod metrics;
#[path = "outpost/onboarding.rs"]
mod onboarding;
#[path = "outpost/rollouts.rs"]
mod rollouts;
#[path = "outpost/service.rs"]
mod service;
#[path = "outpost/uplink.rs"]
mod uplink;

use outpost_test_support::{DEADLINE, repo_root};

/// Writes a secret file as an operator must: readable by its owner only (the gateway
/// refuses secret files others can read).
fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// Runs `command` with `input` on its standard input; its output once it exits.
fn output_with_stdin(command: &mut Command, input: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn outpost() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outpost"));
    command
        .env_remove("RUST_LOG")
        .env_remove("GLIBC_TUNABLES")
        .env_remove("OUTPOST_MALLOC_TUNED")
        .stdin(Stdio::null());
    command
}

/// A temp directory holding `outpost.toml` with its state in `state/`.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new(extra: &str) -> Self {
        let site = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        site.write_config(&format!(
            "[gateway]\nid = \"gw-test\"\nstate_dir = \"state\"\n\n[cache]\nbind = \"127.0.0.1:0\"\n\n[api]\nbind = \"127.0.0.1:0\"\n{extra}"
        ));
        site
    }

    fn write_config(&self, text: &str) {
        std::fs::write(self.config(), text).unwrap();
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("outpost.toml")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn database(&self) -> PathBuf {
        self.state().join("outpost.db")
    }

    /// Records devices in the site's store from this (test) process, as another
    /// `outpost` command would, creating the database if needed.
    fn seed(&self, devices: Vec<NewDevice>) {
        std::fs::create_dir_all(self.state()).unwrap();
        let database = self.database();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let store = Store::open(database).await.unwrap();
            for device in devices {
                store.upsert_device(device).await.unwrap();
            }
            store.close().await.unwrap();
        });
    }

    /// The generated admin token, as an operator reads it from the state directory.
    fn admin_token(&self) -> String {
        let text = std::fs::read_to_string(self.state().join("admin-token")).unwrap();
        text.trim().to_owned()
    }

    fn run(&self) -> Gateway {
        Gateway::spawn(&self.config(), &[])
    }

    fn command(&self, args: &[&str]) -> Output {
        outpost()
            .arg("--config")
            .arg(self.config())
            .args(args)
            .output()
            .unwrap()
    }
}

/// A running `outpost run`, its stderr read line by line on a thread.
struct Gateway {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stdout: Option<JoinHandle<String>>,
}

impl Gateway {
    fn spawn(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = outpost();
        command
            .envs(env.iter().copied())
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json", "run"]);
        Self::spawn_command(command)
    }

    /// Runs `command`, which ends in an `outpost … run` (perhaps behind a wrapper such
    /// as `unshare`), with its output read as [`spawn`](Self::spawn) does.
    fn spawn_command(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stdout = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            stdout: Some(stdout),
        }
    }

    /// Waits for a log line matching `pred`; panics with everything seen if the process
    /// ends or the deadline passes first.
    fn wait_for_line(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value, &str) -> bool,
    ) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let json = serde_json::from_str(&line).unwrap_or(serde_json::Value::Null);
                    if pred(&json, &line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no {what} within {DEADLINE:?}; stderr:\n{}",
                    self.seen.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "outpost ended before {what}; stderr:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits until the API listens and returns its address.
    fn ready(&mut self) -> SocketAddr {
        let line = self.wait_for_line("ready line", |json, _| {
            json["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("local API listening"))
        });
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        json["addr"].as_str().unwrap().parse().unwrap()
    }

    /// The gateway's resident memory, MiB (VmRSS).
    fn rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib >> 10
    }

    /// The environment the gateway's program started with (after its own re-exec).
    fn environ(&self) -> Vec<String> {
        let bytes = std::fs::read(format!("/proc/{}/environ", self.child.id())).unwrap();
        bytes
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill failed: {}", std::io::Error::last_os_error());
    }

    /// Sends `signal`, expects a clean exit, and returns stderr and stdout.
    fn stop_cleanly(self, signal: libc::c_int, site: &Site) -> (String, String) {
        self.signal(signal);
        let (status, stderr, stdout) = self.wait();
        assert_clean_exit(status, &stderr, site);
        (stderr, stdout)
    }

    /// Waits for the process to exit; returns its status, all of stderr and stdout.
    fn wait(mut self) -> (ExitStatus, String, String) {
        let end = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            // Drain stderr meanwhile: it is also how we notice progress.
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "outpost did not exit within {DEADLINE:?}; stderr:\n{}",
                    self.seen.join("\n")
                );
            }
        };
        self.seen.extend(self.lines.iter());
        let stdout = self.stdout.take().unwrap().join().unwrap();
        (status, self.seen.join("\n"), stdout)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request over a plain socket; returns the status code and the JSON body.
fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("no header end");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

fn assert_clean_exit(status: ExitStatus, stderr: &str, site: &Site) {
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("outpost stopped cleanly"), "{stderr}");
    assert!(site.database().exists());
    assert!(
        !site.state().join("outpost.db-wal").exists(),
        "the store was not closed cleanly: WAL left behind"
    );
}

#[test]
fn run_serves_and_stops_cleanly_on_sigterm() {
    let site = Site::new("");
    let mut gateway = site.run();
    let addr = gateway.ready();
    // The daemon re-executed itself (same pid) with glibc's malloc cache sized for bursts.
    assert!(
        gateway
            .environ()
            .contains(&"GLIBC_TUNABLES=glibc.malloc.tcache_count=1000".to_owned()),
        "{:?}",
        gateway.environ()
    );
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", gateway.child.id())).unwrap();
    assert_eq!(comm.trim(), "outpost", "the name ps and pgrep show");

    let (status, health) = http_get(addr, "/healthz", None);
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["gateway"]["id"], "gw-test");
    assert_eq!(health["uplink"], "offline");

    let token_file = site.state().join("admin-token");
    let token = &site.admin_token();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "admin token file mode {mode:o}");
    }
    assert_eq!(http_get(addr, "/api/v1/devices", None).0, 401);
    assert_eq!(
        http_get(addr, "/api/v1/devices", Some("wrong-token-0123456789")).0,
        401
    );
    let (status, body) = http_get(addr, "/api/v1/devices", Some(token));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["devices"], serde_json::json!([]));

    let (stderr, stdout) = gateway.stop_cleanly(libc::SIGTERM, &site);
    assert!(stderr.contains("\"reason\":\"SIGTERM\""), "{stderr}");
    for line in stderr.lines() {
        let json: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|err| {
            panic!("--log-format json wrote a non-JSON line ({err}): {line}")
        });
        assert!(
            json["level"].is_string() && json["timestamp"].is_string(),
            "{line}"
        );
    }
    // Printed once, on stdout, and never into the log.
    assert_eq!(stdout.matches(token).count(), 1, "stdout:\n{stdout}");
    assert!(!stderr.contains(token), "token leaked into the log");
}

#[test]
fn sigint_stops_cleanly_and_a_restart_keeps_state_and_token_quiet() {
    let site = Site::new("");
    let mut first = site.run();
    first.ready();
    first.signal(libc::SIGINT);
    let (status, stderr, first_stdout) = first.wait();
    assert_clean_exit(status, &stderr, &site);
    assert!(stderr.contains("\"reason\":\"SIGINT\""), "{stderr}");
    assert!(first_stdout.contains("Generated an admin API token"));

    site.seed(vec![NewDevice::new(
        "esp-1",
        "thermostat",
        DeviceState::Claimed,
    )]);

    // An operator's own malloc tuning is kept as it is.
    let own = "GLIBC_TUNABLES=glibc.malloc.mxfast=0:glibc.malloc.tcache_count=7";
    let mut second = Gateway::spawn(&site.config(), &[own.split_once('=').unwrap()]);
    let addr = second.ready();
    // (glibc splits the value where it parses it, in the process's own copy.)
    let environ = second.environ().join("\n");
    assert!(environ.contains("glibc.malloc.tcache_count=7"), "{environ}");
    assert!(!environ.contains("tcache_count=1000"), "{environ}");
    assert!(!environ.contains("OUTPOST_MALLOC_TUNED"));
    let token = site.admin_token();
    let (status, body) = http_get(addr, "/api/v1/devices", Some(&token));
    assert_eq!(status, 200);
    assert_eq!(body["devices"][0]["id"], "esp-1");
    let (_, stdout) = second.stop_cleanly(libc::SIGTERM, &site);
    assert!(!stdout.contains(&token), "token printed again on restart");
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let site = Site::new("");
    site.write_config(&format!(
        "[gateway]\nid = \"gw-test\"\n[api]\nbind = \"{addr}\"\nadmin_token = \"configured-token-0123456789\"\n"
    ));
    let (status, stderr, _) = site.run().wait();
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("cannot start the local API on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("already in use"), "{stderr}");
    assert!(stderr.contains("set api.bind in"), "{stderr}");
    // The store was opened and must still have been closed cleanly.
    assert!(!site.state().join("outpost.db-wal").exists());
}

#[test]
fn two_gateways_cannot_share_a_state_directory() {
    let site = Site::new("");
    let mut first = site.run();
    first.ready();
    let (status, stderr, _) = site.run().wait();
    assert!(!status.success());
    assert!(stderr.contains("another outpost (pid"), "{stderr}");
    let _ = first.stop_cleanly(libc::SIGTERM, &site);
}

#[test]
fn run_refuses_a_database_from_a_newer_outpost_and_leaves_it() {
    let site = Site::new("");
    site.seed(Vec::new());
    outpost_store::rusqlite::Connection::open(site.database())
        .unwrap()
        .pragma_update(None, "user_version", outpost_store::SCHEMA_VERSION + 5)
        .unwrap();
    let before = std::fs::read(site.database()).unwrap();

    let (status, stderr, _) = site.run().wait();
    assert!(!status.success());
    assert!(stderr.contains("newer than the"), "{stderr}");
    assert!(stderr.contains("left untouched"), "{stderr}");
    assert_eq!(std::fs::read(site.database()).unwrap(), before);
}

#[test]
fn run_with_a_missing_config_names_the_file() {
    let output = outpost()
        .args(["--config", "/nonexistent/site.toml", "run"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read config file /nonexistent/site.toml"),
        "{stderr}"
    );
}

#[test]
fn config_check_accepts_the_shipped_config() {
    let shipped = repo_root().join("gateway-config/outpost.toml");
    let output = outpost()
        .args(["config", "check"])
        .arg(&shipped)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("id = \"site-gateway-1\""), "{stdout}");
    assert!(stdout.contains("bind = \"127.0.0.1:8080\""), "{stdout}");
    assert!(stdout.contains("runs offline"), "{stdout}");
}

#[test]
fn config_check_names_file_and_line_of_an_unknown_key() {
    let shipped = std::fs::read_to_string(repo_root().join("gateway-config/outpost.toml")).unwrap();
    let site = Site::new("");
    // Into [api], right after its bind line.
    let mut lines: Vec<&str> = shipped.lines().collect();
    let bind = lines.iter().position(|l| l.starts_with("bind = ")).unwrap();
    lines.insert(bind + 1, "bnid = \"0.0.0.0:80\"");
    site.write_config(&lines.join("\n"));

    let output = outpost()
        .args(["config", "check"])
        .arg(site.config())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let place = format!("{}:{}:1:", site.config().display(), bind + 2);
    assert!(stderr.contains(&place), "expected {place} in: {stderr}");
    assert!(stderr.contains("unknown field `bnid`"), "{stderr}");
}

#[test]
fn config_check_redacts_secrets_from_the_environment() {
    let site = Site::new("admin_token = { env = \"OUTPOST_TEST_ADMIN_TOKEN\" }\n");
    let secret = "very-secret-admin-token-42";
    let output = outpost()
        .env("OUTPOST_TEST_ADMIN_TOKEN", secret)
        .args(["config", "check"])
        .arg(site.config())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("<redacted: from env OUTPOST_TEST_ADMIN_TOKEN>"),
        "{stdout}"
    );
    assert!(!stdout.contains(secret), "secret printed: {stdout}");

    let output = outpost()
        .args(["config", "check"])
        .arg(site.config())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "outpost.toml:10:15: environment variable OUTPOST_TEST_ADMIN_TOKEN is not set"
        ),
        "{stderr}"
    );
}

#[test]
fn a_configured_token_is_used_and_never_logged() {
    let site = Site::new("admin_token = { env = \"OUTPOST_TEST_ADMIN_TOKEN\" }\n");
    let secret = "configured-admin-token-0123456789";
    let mut child = Gateway::spawn(&site.config(), &[("OUTPOST_TEST_ADMIN_TOKEN", secret)]);
    let addr = child.ready();
    assert_eq!(http_get(addr, "/api/v1/devices", Some(secret)).0, 200);
    assert!(
        !site.state().join("admin-token").exists(),
        "generated a token despite the config"
    );
    let (stderr, stdout) = child.stop_cleanly(libc::SIGTERM, &site);
    assert!(!stderr.contains(secret) && !stdout.contains(secret));
}

#[test]
fn devices_list_reads_the_lobby_without_creating_state() {
    let site = Site::new("");
    let output = site.command(&["devices", "list"]);
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "No devices yet.\n");
    assert!(!site.state().exists(), "listing created a state directory");

    let mut device = NewDevice::new("esp-0a1b2c", "thermostat", DeviceState::Provisioned);
    device.firmware_version = Some("1.4.2".into());
    site.seed(vec![device]);

    let output = site.command(&["devices", "list", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["devices"][0]["id"], "esp-0a1b2c");
    assert_eq!(json["devices"][0]["state"], "provisioned");

    let output = site.command(&["devices", "list"]);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("esp-0a1b2c  thermostat  provisioned  1.4.2     never"),
        "{table}"
    );
}

#[test]
fn after_kill_9_a_restart_recovers_state_and_the_lock() {
    let site = Site::new("");
    let mut first = site.run();
    let addr = first.ready();
    let token = site.admin_token();
    assert_eq!(http_get(addr, "/api/v1/devices", Some(&token)).0, 200);
    first.signal(libc::SIGKILL);
    let (status, _, _) = first.wait();
    assert!(!status.success());

    // Written by another process while the gateway is dead, then read by the new one.
    site.seed(vec![NewDevice::new(
        "esp-after-crash",
        "valve",
        DeviceState::Discovered,
    )]);

    let mut second = site.run();
    let addr = second.ready();
    let (status, body) = http_get(addr, "/api/v1/devices", Some(&token));
    assert_eq!(status, 200);
    assert_eq!(body["devices"][0]["id"], "esp-after-crash");
    let _ = second.stop_cleanly(libc::SIGTERM, &site);
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Vendor side: a key, then the hostile guest packed and signed. Returns the package and
/// the public key.
fn vendor_package(site: &Site, version: &str) -> (PathBuf, String) {
    vendor_package_with(site, version, |_| {})
}

/// [`vendor_package`] with more `outpost handler pack` flags.
/// A package packed with `outpost handler pack`, its manifest then changed by `edit` (as a
/// vendor's own tool might write it), signed with `outpost handler sign`.
fn vendor_package_with(
    site: &Site,
    version: &str,
    edit: impl FnOnce(&mut outpost_runtime::package::Manifest),
) -> (PathBuf, String) {
    let key = site.dir.path().join("acme.key");
    let package = site.dir.path().join(format!("hostile-{version}.tar"));
    let keygen = stdout_of(&site.command(&["handler", "keygen", "--out", key.to_str().unwrap()]));
    let public_key = keygen
        .lines()
        .find_map(|l| l.strip_prefix("Public key: "))
        .expect("keygen prints the public key")
        .to_owned();
    stdout_of(&site.command(&[
        "handler",
        "pack",
        outpost_test_guests::HOSTILE,
        "--name",
        "hostile",
        "--version",
        version,
        "--vendor",
        "acme",
        "--device-type",
        "hostile-device",
        "--out",
        package.to_str().unwrap(),
    ]));
    let packed =
        outpost_runtime::package::Package::read(std::fs::File::open(&package).unwrap()).unwrap();
    let mut manifest = packed.manifest().clone();
    edit(&mut manifest);
    let edited =
        outpost_runtime::package::Package::build(manifest, packed.component().to_vec()).unwrap();
    std::fs::write(&package, edited.to_tar()).unwrap();
    stdout_of(&site.command(&[
        "handler",
        "sign",
        package.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]));
    (package, public_key)
}

#[test]
fn verify_refuses_a_package_whose_describe_fails_as_install_does() {
    let site = Site::new("");
    // Signed and well-formed, but 1 MiB is less than the guest needs to start, so
    // `describe` cannot run within the limits the package asks for.
    let (package, public_key) = vendor_package_with(&site, "1.0.0", |m| m.limits.memory_mib = 1);
    trust_acme(&site, &public_key);
    let verify = site.command(&["handler", "verify", package.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(!verify.status.success(), "verify accepted it: {stderr}");
    assert!(stderr.contains("cannot run on this gateway"), "{stderr}");
    assert!(stderr.contains("failed to describe itself"), "{stderr}");
    let install = site.command(&["handler", "install", package.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&install.stderr);
    assert!(!install.status.success());
    assert!(stderr.contains("failed to describe itself"), "{stderr}");
}

/// A handler's limits come from one place: `pack` writes what `describe` asks for, and
/// a package whose signed manifest says otherwise is refused by verify and install alike.
#[test]
fn a_package_whose_manifest_limits_contradict_describe_is_refused() {
    let site = Site::new("");
    let (packed, _) = vendor_package(&site, "1.0.0");
    let manifest = outpost_runtime::package::Package::read(std::fs::File::open(&packed).unwrap())
        .unwrap()
        .manifest()
        .clone();
    // The hostile guest's describe asks for 64 MiB and 1000 ms.
    assert_eq!(
        (manifest.limits.memory_mib, manifest.limits.cpu_ms),
        (64, 1000)
    );

    let site = Site::new("");
    let (package, public_key) = vendor_package_with(&site, "1.0.0", |m| m.limits.cpu_ms = 50);
    trust_acme(&site, &public_key);
    for command in ["verify", "install"] {
        let out = site.command(&["handler", command, package.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} accepted it: {stderr}");
        assert!(
            stderr.contains(
                "describe asks for 64 MiB and 1000 ms, the signed manifest for 64 MiB and 50 ms"
            ),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn commands_end_quietly_when_their_reader_goes_away() {
    // `outpost … | head -1`: the reader has closed the pipe before the command writes.
    let site = Site::new("");
    for args in [
        &["handler", "list"][..],
        &["devices", "list"][..],
        &["config", "check"][..],
        &["rollout", "--help"][..],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = outpost()
            .arg("--config")
            .arg(site.config())
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{args:?}: {:?} {stderr}",
            output.status
        );
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

fn trust_acme(site: &Site, public_key: &str) {
    site.write_config(&format!(
        "[gateway]\nid = \"gw-test\"\nstate_dir = \"state\"\n\n[cache]\nbind = \"127.0.0.1:0\"\n\n[api]\nbind = \"127.0.0.1:0\"\n\n\
         [[handlers.trusted_vendors]]\nname = \"acme\"\npublic_key = \"{public_key}\"\ndevice_types = [\"hostile-device\"]\n"
    ));
}

#[test]
fn installing_into_a_running_gateway_swaps_the_handler_live() {
    let site = Site::new("");
    let (package, public_key) = vendor_package(&site, "2.0.0");
    trust_acme(&site, &public_key);
    let mut gateway = site.run();
    let addr = gateway.ready();
    let token = site.admin_token();

    let installed = stdout_of(&site.command(&["handler", "install", package.to_str().unwrap()]));
    assert_eq!(
        installed,
        "Installed hostile 2.0.0 by acme for hostile-device into the running gateway\n"
    );
    gateway.wait_for_line("the live install", |json, _| {
        json["message"] == "handler installed"
    });
    let (status, body) = http_get(addr, "/api/v1/handlers", Some(&token));
    assert_eq!(status, 200);
    assert_eq!(body["handlers"][0]["version"], "2.0.0");

    // A refused package is refused by the running gateway, with its reason.
    let bogus = site.dir.path().join("bogus.tar");
    std::fs::write(&bogus, b"not a package").unwrap();
    let refused = site.command(&["handler", "install", bogus.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("was not installed"));

    let removed = stdout_of(&site.command(&["handler", "remove", "hostile"]));
    assert_eq!(removed, "Removed hostile 2.0.0 from the running gateway\n");
    let (_, body) = http_get(addr, "/api/v1/handlers", Some(&token));
    assert_eq!(body["handlers"], serde_json::json!([]));
    gateway.stop_cleanly(libc::SIGTERM, &site);
}

#[test]
fn a_vendor_packs_and_signs_a_handler_and_the_operator_installs_it() {
    let site = Site::new("");
    let key = site.dir.path().join("acme.key");
    let package = site.dir.path().join("hostile.tar");

    // Vendor side.
    let keygen = stdout_of(&site.command(&["handler", "keygen", "--out", key.to_str().unwrap()]));
    let public_key = keygen
        .lines()
        .find_map(|l| l.strip_prefix("Public key: "))
        .expect("keygen prints the public key")
        .to_owned();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    stdout_of(&site.command(&[
        "handler",
        "pack",
        outpost_test_guests::HOSTILE,
        "--name",
        "hostile",
        "--version",
        "1.2.0",
        "--vendor",
        "acme",
        "--device-type",
        "hostile-device",
        "--out",
        package.to_str().unwrap(),
    ]));
    let unsigned = site.command(&["handler", "verify", package.to_str().unwrap()]);
    assert!(!unsigned.status.success());
    assert!(String::from_utf8_lossy(&unsigned.stderr).contains("not signed"));
    stdout_of(&site.command(&[
        "handler",
        "sign",
        package.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]));

    // Operator side: not trusted yet, then trusted.
    let untrusted = site.command(&["handler", "install", package.to_str().unwrap()]);
    assert!(!untrusted.status.success());
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("unknown key"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
    site.write_config(&format!(
        "[gateway]\nid = \"gw-test\"\nstate_dir = \"state\"\n\n[cache]\nbind = \"127.0.0.1:0\"\n\n[api]\nbind = \"127.0.0.1:0\"\n\n\
         [[handlers.trusted_vendors]]\nname = \"acme\"\npublic_key = \"{public_key}\"\ndevice_types = [\"hostile-device\"]\n"
    ));
    let verified = stdout_of(&site.command(&["handler", "verify", package.to_str().unwrap()]));
    assert!(
        verified.starts_with("OK: hostile 1.2.0 by acme for hostile-device"),
        "{verified}"
    );

    // A package altered after signing is refused, naming why.
    let mut tampered = std::fs::read(&package).unwrap();
    let at = tampered.windows(7).position(|w| w == b"\"1.2.0\"").unwrap();
    tampered[at + 1] = b'9';
    let tampered_path = site.dir.path().join("tampered.tar");
    std::fs::write(&tampered_path, tampered).unwrap();
    let refused = site.command(&["handler", "install", tampered_path.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("signature does not verify"));

    let installed = stdout_of(&site.command(&["handler", "install", package.to_str().unwrap()]));
    assert!(
        installed.starts_with("Installed hostile 1.2.0 by acme"),
        "{installed}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&stdout_of(&site.command(&["handler", "list", "--json"]))).unwrap();
    assert_eq!(list["handlers"][0]["name"], "hostile");
    assert_eq!(list["handlers"][0]["version"], "1.2.0");

    // The gateway loads it at start, while its API starts listening (in either order).
    let mut gateway = site.run();
    let (mut line, mut listening) = (String::new(), false);
    while line.is_empty() || !listening {
        let next = gateway.wait_for_line("handlers loaded and the API listening", |json, _| {
            json["message"] == "update handlers loaded"
                || json["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("local API listening"))
        });
        if next.contains("update handlers loaded") {
            line = next;
        } else {
            listening = true;
        }
    }
    assert!(
        line.contains("\"count\":1") && line.contains("hostile@1.2.0"),
        "{line}"
    );
    gateway.stop_cleanly(libc::SIGTERM, &site);

    assert_eq!(
        stdout_of(&site.command(&["handler", "remove", "hostile"])),
        "Removed hostile 1.2.0\n"
    );
    assert_eq!(
        stdout_of(&site.command(&["handler", "list"])),
        "No handlers installed.\n"
    );
}

#[test]
fn a_malformed_trusted_key_in_the_config_names_its_line() {
    let site = Site::new(
        "\n[[handlers.trusted_vendors]]\nname = \"acme\"\npublic_key = \"ed25519:nothex\"\ndevice_types = [\"*\"]\n",
    );
    let output = site.command(&["config", "check"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("outpost.toml:13:14:"), "{stderr}");
    assert!(stderr.contains("64 hex digits"), "{stderr}");
}

/// The dependency rule of docs/architecture.md, read off every `host/*/Cargo.toml`:
/// `gateway -> {rollout, onboarding} -> {cache, uplink, runtime, ble} -> {protocomm,
/// store, serve}`. A crate depends only on crates on a lower floor (dev-dependencies included,
/// so a test cannot pull the gateway into an engine either).
#[test]
fn engine_crates_depend_only_on_lower_floors() {
    let floor = |name: &str| match name {
        "outpost-gateway" => Some(4),
        "outpost-rollout" | "outpost-onboarding" => Some(3),
        "outpost-cache" | "outpost-uplink" | "outpost-runtime" | "outpost-ble" => Some(2),
        "outpost-protocomm" | "outpost-store" | "outpost-serve" | "outpost-azure" => Some(1),
        _ => None,
    };
    let host = repo_root().join("host");
    let mut seen = 0;
    for entry in std::fs::read_dir(&host).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        let toml: toml::Table = text.parse().unwrap();
        let name = toml["package"]["name"].as_str().unwrap().to_owned();
        let own = floor(&name).unwrap_or_else(|| panic!("{name} has no floor in the rule"));
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            let Some(deps) = toml.get(section).and_then(|d| d.as_table()) else {
                continue;
            };
            for dep in deps.keys() {
                if let Some(theirs) = floor(dep) {
                    assert!(
                        theirs < own,
                        "{name} (floor {own}) must not depend on {dep} (floor {theirs}) in [{section}]"
                    );
                }
            }
        }
        seen += 1;
    }
    assert_eq!(seen, 11, "every crate under host/ was checked");
}

/// `outpost tokens` with no gateway running writes the state database directly; the
/// gateway then honours the token's role, and a token revoked offline is gone.
#[test]
fn tokens_made_offline_carry_their_role_into_the_running_gateway() {
    let site = Site::new("");
    let token_of = |output: &str| output.lines().last().unwrap().trim().to_owned();
    let operator = token_of(&stdout_of(&site.command(&[
        "tokens",
        "create",
        "--role",
        "operator",
        "--name",
        "night-shift",
    ])));
    let viewer =
        token_of(&stdout_of(&site.command(&[
            "tokens", "create", "--role", "viewer", "--name", "grafana",
        ])));
    let again = site.command(&["tokens", "create", "--role", "admin", "--name", "grafana"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let bad_role = site.command(&["tokens", "create", "--role", "root", "--name", "x"]);
    assert!(!bad_role.status.success());
    assert!(String::from_utf8_lossy(&bad_role.stderr).contains("viewer, operator or admin"));
    stdout_of(&site.command(&["tokens", "revoke", "grafana"]));
    let listed = stdout_of(&site.command(&["tokens", "list", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 1, "{listed}");
    assert!(
        !listed.to_string().contains(&operator[4..]),
        "only hashes are kept"
    );

    let mut gateway = site.run();
    let addr = gateway.ready();
    let (status, me) = http_get(addr, "/api/v1/whoami", Some(&operator));
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["role"], "operator");
    assert_eq!(http_get(addr, "/api/v1/tokens", Some(&operator)).0, 403);
    assert_eq!(http_get(addr, "/api/v1/devices", Some(&viewer)).0, 401);
    gateway.stop_cleanly(libc::SIGTERM, &site);
}
