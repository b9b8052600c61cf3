//! `outpost wifi rotate`: move the site's devices to a new Wi-Fi network, as a rollout.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use hyper::Method;

use super::client::call;
use super::rollout::SpecArgs;

#[derive(Debug, Subcommand)]
pub(crate) enum WifiCommand {
    /// Rotate the devices' Wi-Fi credentials: a rollout (waves, thresholds, pause,
    /// resume, retry as for firmware) whose devices join the new network, keep the old
    /// one as their fallback for a while, and go back to it by themselves when they
    /// cannot join. Needs the running gateway with its TLS device listener.
    Rotate {
        /// The new network's SSID.
        #[arg(long)]
        ssid: String,
        /// A file holding the new passphrase (one line; readable by its owner only).
        #[arg(long)]
        passphrase_file: PathBuf,
        /// How long a device keeps its old network as the fallback (30-3600 s).
        #[arg(long, default_value_t = 120)]
        fallback_secs: u64,
        #[command(flatten)]
        settings: SpecArgs,
    },
}

/// The passphrase in `path`: its first line. A file others can read is refused.
fn read_passphrase(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} can be read by other users (mode {:o}); run: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let line = text.lines().next().unwrap_or_default();
    if text.lines().filter(|l| !l.is_empty()).count() > 1 {
        bail!(
            "{} holds more than one line: give the passphrase alone",
            path.display()
        );
    }
    Ok(line.to_owned())
}

pub(crate) async fn run(command: WifiCommand, config_path: &Path) -> anyhow::Result<()> {
    match command {
        WifiCommand::Rotate {
            ssid,
            passphrase_file,
            fallback_secs,
            settings,
        } => {
            let spec = settings.spec()?;
            let rotation = outpost_rollout::WifiRotation {
                ssid,
                passphrase: read_passphrase(&passphrase_file)?,
                fallback_secs,
            };
            rotation.validate().map_err(anyhow::Error::msg)?;
            let body = serde_json::json!({
                "id": settings.id(),
                "wifi": rotation,
                "rollout": spec,
            });
            let view = call(config_path, Method::POST, "/api/v1/rollouts", Some(body)).await?;
            let id = view["id"].as_str().unwrap_or("?");
            outln!(
                "Rollout {id} created: Wi-Fi {} to {} devices in {} wave(s), {}.",
                rotation.ssid,
                super::rollout::total(&view),
                view["waves"],
                view["state"].as_str().unwrap_or("?")
            );
            outln!("Follow it with: outpost rollout status {id} --watch");
            outln!(
                "Once it finishes, put the new network in [[onboarding.wifi]] so that devices \
                 onboarded from now on get it."
            );
        }
    }
    Ok(())
}
