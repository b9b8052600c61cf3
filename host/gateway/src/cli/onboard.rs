//! `outpost onboard …`: import a device manifest, onboard the devices with progress
//! bars, list them; make a local claiming CA.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use hyper::{Method, StatusCode};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::client::{GatewayApi, error_message};
use crate::config::Config;
use crate::state_dir::running_gateway;

#[derive(Debug, Subcommand)]
pub(crate) enum OnboardCommand {
    /// Import a device manifest: JSON, JSON lines, the QR codes of Espressif's
    /// provisioning examples (as a scanner returns them, or their URLs), or CSV; see
    /// docs/onboarding.md. All or nothing.
    Import {
        /// The manifest file; `-` reads standard input (e.g. from a QR scanner).
        file: PathBuf,
        /// The device type of entries without one (a QR code has none).
        #[arg(long)]
        device_type: Option<String>,
        /// The security version of entries without one; 2 reads a QR code's PoP as the
        /// Security 2 password.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
        security: Option<u8>,
        /// The Security 2 username of entries without one (`wifiprov` in ESP-IDF).
        #[arg(long)]
        username: Option<String>,
        /// The SoftAP `host:port` of entries without one (default 192.168.4.1:80 for
        /// QR codes).
        #[arg(long)]
        address: Option<String>,
    },
    /// Onboard the imported devices that are not yet provisioned, in parallel.
    Run {
        /// Only these devices (repeatable).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Also redo devices already provisioned or claimed.
        #[arg(long)]
        all: bool,
        /// Start the run and print its id without waiting.
        #[arg(long)]
        no_wait: bool,
        /// Print the final report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the imported devices and how their last attempt went.
    List,
    /// List the provisioning devices the radio hears now (not only imported ones),
    /// strongest first.
    Scan {
        /// How long to listen, in seconds (1 to 30).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Also connect to each device and read its security and capabilities
        /// (proto-ver).
        #[arg(long)]
        details: bool,
        /// Print the devices as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a device of the last scan an onboarding target: its address or name, its
    /// device type and its secret (as printed on it or in its QR code).
    Adopt {
        /// The device's address or advertised name, as `outpost onboard scan` listed it.
        device: String,
        /// Its device type (selects the update handler).
        #[arg(long)]
        device_type: String,
        /// The Security 1 proof of possession, or the Security 2 password.
        #[arg(long)]
        pop: Option<String>,
        /// The Security 2 username (`wifiprov` in ESP-IDF's examples).
        #[arg(long)]
        username: Option<String>,
        /// Its security version; by default what the device says.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
        security: Option<u8>,
    },
    /// Create a local claiming CA for offline sites (claim-ca.pem, claim-ca.key).
    CaInit {
        /// Where to write it.
        dir: PathBuf,
        /// Its common name.
        #[arg(long, default_value = "Outpost site claiming CA")]
        name: String,
    },
}

/// Runs an onboarding command; all but `ca-init` go through the running gateway.
#[allow(clippy::print_stdout)]
pub(crate) async fn run(command: OnboardCommand, config_path: &Path) -> anyhow::Result<bool> {
    if let OnboardCommand::CaInit { dir, name } = &command {
        let (cert, key) = outpost_onboarding::create_ca(dir, name)?;
        outln!(
            "Created {} and {} (mode 0600). Configure them with:\n\n[onboarding.claim]\nca_cert = \"{}\"\nca_key = {{ file = \"{}\" }}",
            cert.display(),
            key.display(),
            cert.display(),
            key.display()
        );
        return Ok(true);
    }
    let config = Config::load(config_path)?;
    let Some(addr) = running_gateway(&config.gateway.state_dir)? else {
        bail!(
            "no gateway is running on {}: start it with `outpost run` (onboarding needs the \
             gateway's Bluetooth and state)",
            config.gateway.state_dir.display()
        );
    };
    let api = GatewayApi::new(&config, addr)?;
    match command {
        OnboardCommand::Import {
            file,
            device_type,
            security,
            username,
            address,
        } => {
            let bytes = if file.as_os_str() == "-" {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                    .context("cannot read the manifest from standard input")?;
                bytes
            } else {
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            let defaults = outpost_onboarding::ImportDefaults {
                device_type,
                security,
                username,
                address,
            };
            let (status, json) = api
                .request(
                    Method::POST,
                    &format!("/api/v1/onboarding/targets?{}", defaults.to_query()),
                    "application/octet-stream",
                    &[],
                    bytes,
                )
                .await?;
            let source = if file.as_os_str() == "-" {
                "the manifest from standard input".to_owned()
            } else {
                file.display().to_string()
            };
            if status != StatusCode::OK {
                bail!("{source} was refused: {}", error_message(&json));
            }
            outln!("Imported {} devices from {source}", json["imported"]);
            Ok(true)
        }
        OnboardCommand::List => {
            let (status, json) = api
                .request(
                    Method::GET,
                    "/api/v1/onboarding/targets",
                    "application/json",
                    &[],
                    Vec::new(),
                )
                .await?;
            if status != StatusCode::OK {
                bail!("{}", error_message(&json));
            }
            outln!(
                "{:<24} {:<8} {:<4} {:<20} LAST ERROR",
                "NAME",
                "VIA",
                "SEC",
                "TYPE"
            );
            for t in json["targets"].as_array().into_iter().flatten() {
                outln!(
                    "{:<24} {:<8} {:<4} {:<20} {}",
                    t["name"].as_str().unwrap_or("?"),
                    t["transport"].as_str().unwrap_or("?"),
                    t["security"],
                    t["device_type"].as_str().unwrap_or("?"),
                    t["last_error"].as_str().unwrap_or("-"),
                );
            }
            Ok(true)
        }
        OnboardCommand::Run {
            devices,
            all,
            no_wait,
            json,
        } => {
            let body = serde_json::to_vec(&serde_json::json!({ "devices": devices, "all": all }))?;
            let (status, started) = api
                .request(
                    Method::POST,
                    "/api/v1/onboarding/runs",
                    "application/json",
                    &[],
                    body,
                )
                .await?;
            if status != StatusCode::ACCEPTED {
                bail!("onboarding did not start: {}", error_message(&started));
            }
            let id = started["id"].as_u64().unwrap_or_default();
            if no_wait {
                outln!("Started onboarding run {id}");
                return Ok(true);
            }
            let report = follow(&api, id, !json).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report)?;
            }
            Ok(report["failed"].as_u64() == Some(0))
        }
        OnboardCommand::Scan {
            seconds,
            details,
            json,
        } => {
            let path = format!("/api/v1/onboarding/nearby?seconds={seconds}&details={details}");
            let (status, found) = api
                .request(Method::GET, &path, "application/json", &[], Vec::new())
                .await?;
            if status != StatusCode::OK {
                bail!("the scan did not run: {}", error_message(&found));
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&found["devices"])?);
                return Ok(true);
            }
            print_nearby(&found["devices"])?;
            Ok(true)
        }
        OnboardCommand::Adopt {
            device,
            device_type,
            pop,
            username,
            security,
        } => {
            let body = serde_json::to_vec(&serde_json::json!({
                "device": device,
                "device_type": device_type,
                "pop": pop,
                "username": username,
                "security": security,
            }))?;
            let (status, adopted) = api
                .request(
                    Method::POST,
                    "/api/v1/onboarding/nearby/adopt",
                    "application/json",
                    &[],
                    body,
                )
                .await?;
            if status != StatusCode::CREATED {
                bail!("{device} was not adopted: {}", error_message(&adopted));
            }
            outln!(
                "Adopted {} ({}, Security {}): onboard it with `outpost onboard run --device {}`",
                adopted["name"].as_str().unwrap_or("?"),
                adopted["address"].as_str().unwrap_or("?"),
                adopted["security"],
                adopted["name"].as_str().unwrap_or("?"),
            );
            Ok(true)
        }
        OnboardCommand::CaInit { .. } => unreachable!("handled above"),
    }
}

/// Polls the run, drawing a bar per device, until it is done.
async fn follow(api: &GatewayApi, id: u64, bars: bool) -> anyhow::Result<serde_json::Value> {
    let multi = MultiProgress::new();
    if !bars {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:24} [{bar:20}] {msg}")
        .expect("valid template")
        .progress_chars("=> ");
    let mut device_bars: Vec<ProgressBar> = Vec::new();
    loop {
        let (status, run) = api
            .request(
                Method::GET,
                &format!("/api/v1/onboarding/runs/{id}"),
                "application/json",
                &[],
                Vec::new(),
            )
            .await?;
        if status != StatusCode::OK {
            bail!("run {id}: {}", error_message(&run));
        }
        let devices = run["devices"].as_array().cloned().unwrap_or_default();
        while device_bars.len() < devices.len() {
            let bar = multi.add(ProgressBar::new(STEPS.len() as u64));
            bar.set_style(style.clone());
            device_bars.push(bar);
        }
        for (bar, device) in device_bars.iter().zip(&devices) {
            let step = device["step"].as_str().unwrap_or("?");
            bar.set_prefix(device["name"].as_str().unwrap_or("?").to_owned());
            let position = STEPS.iter().position(|s| *s == step).unwrap_or(0) as u64;
            bar.set_position(if device["done"] == true {
                STEPS.len() as u64
            } else {
                position
            });
            bar.set_message(match device["error"].as_str() {
                Some(err) => format!("failed: {err}"),
                None => step.to_owned(),
            });
        }
        if run["done"] == true {
            for bar in &device_bars {
                bar.finish();
            }
            return Ok(run);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The nearby devices as a table.
#[allow(clippy::print_stdout)]
fn print_nearby(devices: &serde_json::Value) -> anyhow::Result<()> {
    let devices = devices.as_array().map(Vec::as_slice).unwrap_or_default();
    if devices.is_empty() {
        outln!("No provisioning device heard.");
        return Ok(());
    }
    outln!(
        "{:<20} {:<18} {:>5}  {:<4} {:<32} IMPORTED AS",
        "NAME",
        "ADDRESS",
        "RSSI",
        "SEC",
        "CAPABILITIES"
    );
    let strings = |value: &serde_json::Value| -> Vec<String> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect()
    };
    for d in devices {
        let details = &d["details"];
        let capabilities = match details["error"].as_str() {
            Some(err) => format!("({err})"),
            None => {
                // The provisioning capabilities, then each application's as app:cap.
                let mut all = strings(&details["capabilities"]);
                for (app, caps) in details["apps"].as_object().into_iter().flatten() {
                    all.extend(strings(caps).into_iter().map(|c| format!("{app}:{c}")));
                }
                if all.is_empty() {
                    "-".to_owned()
                } else {
                    all.join(",")
                }
            }
        };
        outln!(
            "{:<20} {:<18} {:>5}  {:<4} {:<32} {}",
            d["name"].as_str().unwrap_or("-"),
            d["address"].as_str().unwrap_or("?"),
            d["rssi"].as_i64().map_or("-".to_owned(), |r| r.to_string()),
            details["security"]
                .as_u64()
                .map_or("-".to_owned(), |s| s.to_string()),
            capabilities,
            d["target"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

/// The steps a device goes through, in order (for the bars).
const STEPS: [&str; 10] = [
    "queued",
    "scanning",
    "connecting",
    "version",
    "session",
    "wifi scan",
    "claiming",
    "wifi config",
    "joining",
    "done",
];

#[allow(clippy::print_stdout)]
fn print_report(run: &serde_json::Value) -> anyhow::Result<()> {
    outln!();
    for device in run["devices"].as_array().into_iter().flatten() {
        let name = device["name"].as_str().unwrap_or("?");
        match device["error"].as_str() {
            Some(err) => outln!("✗ {name}: {err}"),
            None => outln!(
                "✓ {name}: {} in {:.0} ms (crypto {:.1} ms){}",
                device["outcome"].as_str().unwrap_or("?"),
                device["elapsed_ms"].as_f64().unwrap_or_default(),
                device["crypto_ms"].as_f64().unwrap_or_default(),
                device["node_id"]
                    .as_str()
                    .map(|n| format!(", node {n}"))
                    .unwrap_or_default()
            ),
        }
        if let Some(warning) = device["wifi_scan"]["warning"].as_str() {
            let seen: Vec<String> = device["wifi_scan"]["networks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| format!("{} ({} dBm)", n["ssid"].as_str().unwrap_or("?"), n["rssi"]))
                .collect();
            outln!("  ! {warning}; it sees: {}", seen.join(", "));
        }
    }
    outln!(
        "\n{} onboarded, {} failed, {:.1} s",
        run["succeeded"],
        run["failed"],
        run["elapsed_ms"].as_f64().unwrap_or_default() / 1000.0
    );
    Ok(())
}
