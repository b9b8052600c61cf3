//! A private D-Bus system bus with BlueZoo (an emulated BlueZ) on it, for machines
//! without a Bluetooth radio: one emulated adapter for the gateway's central and one
//! per simulated device.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// The running bus and BlueZoo; both are stopped on drop.
pub(crate) struct Emulation {
    pub(crate) address: String,
    dbus: Child,
    bluezoo: Child,
    dir: PathBuf,
}

impl Emulation {
    /// Starts the bus in `dir` and BlueZoo (`bluezoo` is its launcher) with `adapters`
    /// (addresses; the first becomes hci0).
    pub(crate) fn start(dir: &Path, bluezoo: &Path, adapters: &[String]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("system-bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
  </policy>
  <!-- One BlueZoo connection serves the gateway's adapter and every simulated device,
       so the system bus's per-connection defaults (512 match rules, 128 pending
       replies) are too small for a hundred devices at once. -->
  <limit name="max_match_rules_per_connection">50000</limit>
  <limit name="max_replies_per_connection">50000</limit>
  <limit name="max_connections_per_user">10000</limit>
  <limit name="max_completed_connections">10000</limit>
</busconfig>
"#,
                dir.display()
            ),
        )?;
        let mut dbus = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start dbus-daemon (Debian package dbus-daemon)")?;
        let mut line = String::new();
        BufReader::new(dbus.stdout.take().expect("piped"))
            .read_line(&mut line)
            .context("dbus-daemon printed no address")?;
        let address = line.trim().to_owned();
        if address.is_empty() {
            let _ = dbus.kill();
            bail!("dbus-daemon exited without printing its address");
        }
        if !bluezoo.exists() && bluezoo.components().count() > 1 {
            let _ = dbus.kill();
            bail!(
                "BlueZoo not found at {} (install: python3 -m venv DIR && DIR/bin/pip install bluezoo==1.0.2)",
                bluezoo.display()
            );
        }
        let mut cmd = Command::new(bluezoo);
        cmd.args(["--auto-enable", "--scan-interval", "1"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.join("bluezoo.log"))?));
        for adapter in adapters {
            cmd.args(["-a", adapter]);
        }
        let bluezoo = match cmd.spawn() {
            Ok(child) => child,
            Err(err) => {
                let _ = dbus.kill();
                return Err(err).with_context(|| format!("cannot start {}", bluezoo.display()));
            }
        };
        Ok(Self {
            address,
            dbus,
            bluezoo,
            dir: dir.to_owned(),
        })
    }

    /// BlueZoo's log, for error messages.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bluezoo.log")).unwrap_or_default()
    }

    /// Whether BlueZoo is still running.
    pub(crate) fn bluezoo_alive(&mut self) -> bool {
        matches!(self.bluezoo.try_wait(), Ok(None))
    }
}

impl Drop for Emulation {
    fn drop(&mut self) {
        let _ = self.bluezoo.kill();
        let _ = self.bluezoo.wait();
        let _ = self.dbus.kill();
        let _ = self.dbus.wait();
    }
}
