//! Running as a systemd service does: `Type=notify` readiness, watchdog pings, and
//! SIGHUP reloading the trusted keys. systemd's side is played by a datagram socket the
//! test binds as `NOTIFY_SOCKET`, exactly what sd_notify(3) writes to.

use std::os::unix::net::UnixDatagram;

use super::rollouts::{FleetSite, Release};
use super::*;

/// The service manager's end of `NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Manager {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(DEADLINE)).unwrap();
        Self { socket, path }
    }

    /// The next notification that contains `what` (others are skipped); panics at the
    /// deadline.
    fn wait_for(&self, what: &str) -> String {
        let mut seen = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {what} (saw {seen:?}): {e}"));
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.lines().any(|l| l == what) {
                return text;
            }
            seen.push(text);
        }
    }
}

#[test]
fn under_systemd_it_notifies_ready_pings_the_watchdog_and_says_stopping() {
    let site = Site::new("");
    let manager = Manager::bind(site.dir.path());
    let socket = manager.path.to_str().unwrap().to_owned();
    let mut gateway = Gateway::spawn(
        &site.config(),
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "400000")],
    );
    manager.wait_for("READY=1");
    // Ready means every listener listens: the API answers at once.
    let addr = gateway.ready();
    assert_eq!(http_get(addr, "/healthz", None).0, 200);
    // Pings at half the watchdog interval, while the state database answers.
    let started = Instant::now();
    for _ in 0..3 {
        manager.wait_for("WATCHDOG=1");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "three pings took {:?}",
        started.elapsed()
    );
    gateway.signal(libc::SIGTERM);
    manager.wait_for("STOPPING=1");
    let (status, stderr, _) = gateway.wait();
    assert_clean_exit(status, &stderr, &site);
}

#[test]
fn sighup_reloads_the_trusted_keys_without_a_restart() {
    let fleet = FleetSite::new("");
    let manager = Manager::bind(fleet.site.dir.path());
    let socket = manager.path.to_str().unwrap().to_owned();
    let mut gateway = Gateway::spawn(&fleet.site.config(), &[("NOTIFY_SOCKET", &socket)]);
    manager.wait_for("READY=1");
    let addr = gateway.ready();
    let admin = fleet.site.admin_token();
    fleet.install_handlers();
    let jws = fleet.sign(&Release::new().manifest(None));
    let handlers = || {
        let (_, json) = http_get(addr, "/api/v1/handlers", Some(&admin));
        json["handlers"].as_array().unwrap().len()
    };
    assert_eq!(handlers(), 2);
    let reload = |gateway: &Gateway| {
        gateway.signal(libc::SIGHUP);
        manager.wait_for("RELOADING=1");
        manager.wait_for("READY=1");
    };

    // The vendor and the fleet key are withdrawn from the config: on SIGHUP the
    // installed handlers are unloaded and neither a handler nor a manifest they signed
    // is accepted any more.
    let trusted = std::fs::read_to_string(fleet.site.config()).unwrap();
    let without: String = trusted
        .split("\n\n")
        .filter(|block| {
            !block.starts_with("[[handlers.trusted_vendors]]")
                && !block.starts_with("[[cache.trusted_signers]]")
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    assert_ne!(without, trusted);
    fleet.site.write_config(&without);
    reload(&gateway);
    assert_eq!(
        handlers(),
        0,
        "the withdrawn vendor's handlers were unloaded"
    );
    let refused = fleet
        .site
        .command(&["firmware", "manifest", "add", jws.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("fleet"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // A config that does not load changes nothing.
    fleet
        .site
        .write_config(&format!("{trusted}\nthis is not toml"));
    reload(&gateway);
    assert_eq!(handlers(), 0);

    // Trusted again: installs and manifests are accepted, without a restart.
    fleet.site.write_config(&trusted);
    reload(&gateway);
    fleet.install_handlers();
    assert_eq!(handlers(), 2);
    let accepted =
        stdout_of(
            &fleet
                .site
                .command(&["firmware", "manifest", "add", jws.to_str().unwrap()]),
        );
    assert!(accepted.contains("signed by fleet"), "{accepted}");
    let (stderr, _) = gateway.stop_cleanly(libc::SIGTERM, &fleet.site);
    assert!(stderr.contains("the config does not load"), "{stderr}");
    assert!(stderr.contains("trusted keys reloaded"), "{stderr}");
}
