//! `outpost rollout …`: create and steer rollouts on the running gateway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use hyper::Method;

use outpost_rollout::RolloutSpec;
use outpost_rollout::spec::{ErrorThreshold, MaintenanceWindow, RolloutPriority};

use super::client::call;

#[derive(Debug, Subcommand)]
pub(crate) enum RolloutCommand {
    /// Create a local rollout from a signed update manifest (for offline sites; cloud
    /// deployments arrive over the uplink).
    Create(Box<CreateArgs>),
    /// List the rollouts.
    List {
        /// Print JSON (the same shape as GET /api/v1/rollouts).
        #[arg(long)]
        json: bool,
    },
    /// A rollout's waves and devices.
    Status {
        /// The rollout id.
        id: String,
        /// Print JSON (the same shape as GET /api/v1/rollouts/{id}).
        #[arg(long)]
        json: bool,
        /// Keep showing progress until the rollout ends or pauses.
        #[arg(long, short)]
        watch: bool,
    },
    /// Stop starting devices; those in flight finish.
    Pause {
        /// The rollout id.
        id: String,
    },
    /// Go on with a paused rollout (a wave that paused below its success threshold is
    /// accepted and the next one starts).
    Resume {
        /// The rollout id.
        id: String,
    },
    /// Cancel: devices in flight are cancelled through their handler.
    Cancel {
        /// The rollout id.
        id: String,
    },
    /// Put the failed devices back in line.
    Retry {
        /// The rollout id.
        id: String,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// The signed update manifest (JWS), as `outpost firmware manifest sign` writes it.
    #[arg(long)]
    manifest: PathBuf,
    #[command(flatten)]
    settings: SpecArgs,
    /// Seconds a device gets to come back with the new version.
    #[arg(long)]
    rollback_window: Option<u64>,
    /// Allow images older than a device's anti-rollback counter (secure_version).
    #[arg(long)]
    allow_downgrade: bool,
}

/// The settings every rollout takes: its id, waves, thresholds, pacing and target.
#[derive(Debug, clap::Args)]
pub(crate) struct SpecArgs {
    /// The rollout id (default: a new one).
    #[arg(long)]
    id: Option<String>,
    /// Rollout settings as JSON (the `rollout` object of a cloud deployment); the
    /// flags below override it.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Cumulative percentages per wave, e.g. 10,50,100.
    #[arg(long, value_delimiter = ',')]
    waves: Vec<u8>,
    /// Percent of a wave that must succeed before the next starts.
    #[arg(long)]
    success_threshold: Option<u8>,
    /// Failures that stop the rollout: a count (5) or a share (10%).
    #[arg(long)]
    error_threshold: Option<ErrorThreshold>,
    /// batch (paced, windowed) or immediate.
    #[arg(long, value_parser = ["batch", "immediate"])]
    priority: Option<String>,
    /// Devices at once in batch priority.
    #[arg(long)]
    max_parallel: Option<u32>,
    /// Not before this time (RFC 3339).
    #[arg(long)]
    start_at: Option<String>,
    /// Maintenance window start, 5-field cron (e.g. "0 2 * * *").
    #[arg(long, requires = "window_minutes")]
    window_cron: Option<String>,
    /// Maintenance window length.
    #[arg(long, requires = "window_cron")]
    window_minutes: Option<u32>,
    /// Maintenance window time zone (IANA), default UTC.
    #[arg(long, requires = "window_cron")]
    window_tz: Option<String>,
    /// Only devices of this type (repeatable).
    #[arg(long)]
    device_type: Vec<String>,
    /// Only members of this device group.
    #[arg(long)]
    group: Option<String>,
    /// Only devices with this property, KEY=VALUE (repeatable).
    #[arg(long = "where", value_parser = parse_pair)]
    properties: Vec<(String, String)>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

impl SpecArgs {
    /// The settings, checked (`--spec` first, the flags over it).
    pub(crate) fn spec(&self) -> anyhow::Result<RolloutSpec> {
        let spec = self.unchecked()?;
        spec.validate().map_err(anyhow::Error::msg)?;
        Ok(spec)
    }

    /// The rollout id asked for.
    pub(crate) fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    fn unchecked(&self) -> anyhow::Result<RolloutSpec> {
        let mut spec = match &self.spec {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not valid rollout settings", path.display()))?
            }
            None => RolloutSpec::default(),
        };
        if !self.waves.is_empty() {
            spec.waves.clone_from(&self.waves);
        }
        if let Some(v) = self.success_threshold {
            spec.success_threshold = v;
        }
        if let Some(v) = self.error_threshold {
            spec.error_threshold = Some(v);
        }
        if let Some(p) = &self.priority {
            spec.priority = if p == "immediate" {
                RolloutPriority::Immediate
            } else {
                RolloutPriority::Batch
            };
        }
        if let Some(v) = self.max_parallel {
            spec.max_parallel = v;
        }
        if let Some(v) = &self.start_at {
            spec.start_at = Some(v.clone());
        }
        if let (Some(cron), Some(minutes)) = (&self.window_cron, self.window_minutes) {
            spec.window = Some(MaintenanceWindow {
                cron: cron.clone(),
                duration_minutes: minutes,
                timezone: self.window_tz.clone().unwrap_or_else(|| "UTC".into()),
            });
        }
        if !self.device_type.is_empty() {
            spec.target.device_types.clone_from(&self.device_type);
        }
        if let Some(g) = &self.group {
            spec.target.group = Some(g.clone());
        }
        spec.target
            .properties
            .extend(self.properties.iter().cloned());
        Ok(spec)
    }
}

impl CreateArgs {
    fn spec(&self) -> anyhow::Result<RolloutSpec> {
        let mut spec = self.settings.unchecked()?;
        if let Some(v) = self.rollback_window {
            spec.rollback_window_secs = v;
        }
        if self.allow_downgrade {
            spec.allow_downgrade = true;
        }
        spec.validate().map_err(anyhow::Error::msg)?;
        Ok(spec)
    }
}

/// Runs a rollout command; false when the answer was a failure to report.
pub(crate) async fn run(command: RolloutCommand, config_path: &Path) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Create(args) => {
            let spec = args.spec()?;
            let manifest = std::fs::read_to_string(&args.manifest)
                .with_context(|| format!("cannot read {}", args.manifest.display()))?;
            let body = serde_json::json!({
                "id": args.settings.id,
                "manifest": manifest.trim(),
                "rollout": spec,
            });
            let view = call(config_path, Method::POST, "/api/v1/rollouts", Some(body)).await?;
            outln!(
                "Rollout {} created: {} to {} devices in {} wave(s), {}.",
                view["id"].as_str().unwrap_or("?"),
                view["update_id"].as_str().unwrap_or("?"),
                total(&view),
                view["waves"],
                view["state"].as_str().unwrap_or("?")
            );
            outln!(
                "Follow it with: outpost rollout status {} --watch",
                view["id"].as_str().unwrap_or("?")
            );
        }
        RolloutCommand::List { json } => {
            let answer = call(config_path, Method::GET, "/api/v1/rollouts", None).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let rollouts = answer["rollouts"].as_array().cloned().unwrap_or_default();
                if rollouts.is_empty() {
                    outln!("No rollouts.");
                }
                for r in rollouts {
                    outln!(
                        "{:<32} {:<10} wave {}/{}  {}  {}",
                        r["id"].as_str().unwrap_or("?"),
                        r["state"].as_str().unwrap_or("?"),
                        r["wave"].as_u64().unwrap_or(0) + 1,
                        r["waves"],
                        counts_line(&r["counts"]),
                        r["update_id"].as_str().unwrap_or("?"),
                    );
                }
            }
        }
        RolloutCommand::Status { id, json, watch } => loop {
            let view = call(
                config_path,
                Method::GET,
                &format!("/api/v1/rollouts/{id}"),
                None,
            )
            .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print_status(&view, watch)?;
            }
            let state = view["state"].as_str().unwrap_or("");
            if !watch || !matches!(state, "running" | "scheduled") {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
        RolloutCommand::Pause { id } => action(config_path, &id, "pause").await?,
        RolloutCommand::Resume { id } => action(config_path, &id, "resume").await?,
        RolloutCommand::Cancel { id } => action(config_path, &id, "cancel").await?,
        RolloutCommand::Retry { id } => action(config_path, &id, "retry").await?,
    }
    Ok(())
}

async fn action(config_path: &Path, id: &str, what: &str) -> anyhow::Result<()> {
    let view = call(
        config_path,
        Method::POST,
        &format!("/api/v1/rollouts/{id}/{what}"),
        None,
    )
    .await?;
    outln!(
        "Rollout {id}: {}{}",
        view["state"].as_str().unwrap_or("?"),
        view["reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    Ok(())
}

pub(crate) fn total(view: &serde_json::Value) -> u64 {
    view["counts"].as_object().map_or(0, |c| {
        c.values().filter_map(serde_json::Value::as_u64).sum()
    })
}

fn counts_line(counts: &serde_json::Value) -> String {
    let get = |k: &str| counts[k].as_u64().unwrap_or(0);
    format!(
        "{} ok, {} skipped, {} failed, {} running, {} pending, {} cancelled",
        get("succeeded"),
        get("skipped"),
        get("failed"),
        get("running"),
        get("pending"),
        get("cancelled")
    )
}

fn print_status(view: &serde_json::Value, watch: bool) -> anyhow::Result<()> {
    if watch {
        // Redraw in place on a terminal.
        out!("\x1b[2J\x1b[H");
    }
    outln!(
        "rollout {}  {}  ({} from {})",
        view["id"].as_str().unwrap_or("?"),
        view["state"].as_str().unwrap_or("?"),
        view["update_id"].as_str().unwrap_or("?"),
        view["origin"].as_str().unwrap_or("?")
    );
    if let Some(reason) = view["reason"].as_str() {
        outln!("reason: {reason}");
    }
    outln!("total: {}", counts_line(&view["counts"]));
    for (i, wave) in view["wave_counts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let marker = if view["wave"].as_u64() == Some(i as u64) {
            ">"
        } else {
            " "
        };
        outln!(
            "{marker} wave {}: {} devices: {}",
            i + 1,
            wave["devices"],
            counts_line(wave)
        );
    }
    let mut by_status: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for device in view["devices"].as_array().cloned().unwrap_or_default() {
        let status = device["status"].as_str().unwrap_or("?").to_owned();
        let detail = match status.as_str() {
            "running" => format!(
                "{} ({}{})",
                device["device_id"].as_str().unwrap_or("?"),
                device["step"].as_str().unwrap_or("?"),
                device["progress"]
                    .as_u64()
                    .map(|p| format!(" {p}%"))
                    .unwrap_or_default()
            ),
            "failed" => format!(
                "{}: {}",
                device["device_id"].as_str().unwrap_or("?"),
                device["result"]["lastInstallResult"]["resultDetails"]
                    .as_str()
                    .unwrap_or("?")
            ),
            _ => device["device_id"].as_str().unwrap_or("?").to_owned(),
        };
        by_status.entry(status).or_default().push(detail);
    }
    for status in ["running", "failed"] {
        for line in by_status.get(status).into_iter().flatten() {
            outln!("  {status:<8} {line}");
        }
    }
    Ok(())
}
