//! `esp-sim`: a fleet of simulated ESP32 devices for onboarding, speaking the protocomm
//! device role (outpost-protocomm) over BLE and/or SoftAP HTTP.
//!
//! * Over BLE each device is a BlueZ peripheral on its own adapter (GATT application +
//!   LE advertisement), so it runs unchanged on a Linux box with Bluetooth adapters
//!   (`--adapters hci1,hci2`). Without a radio, `--emulate` starts a private D-Bus
//!   system bus with BlueZoo on it: adapter `hci0` is left for the gateway's central
//!   and each device gets the next one.
//! * Over SoftAP each device is an HTTP server on `--http-host` (an ephemeral port).
//!
//! Devices run Security 0/1/2, join the simulated site access point (`--ap-ssid`,
//! `--ap-passphrase`; a wrong SSID or passphrase fails the way the firmware reports it),
//! and with `--claim` offer RainMaker assisted claiming with a real P-256 key and CSR.
//! `--manifest FILE` writes the onboarding manifest `outpost onboard import` takes.
//! Events (ready, sessions, Wi-Fi results, claims, dropped links) are JSON lines on
//! stdout.

mod agent;
mod ble;
mod device;
mod emulate;
mod events;
mod firmware;
mod http;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use outpost_protocomm::SecurityVersion;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::device::{AccessPoint, Fault, Identity, SimDevice};
use crate::events::emit;

/// The simulator's command line.
#[derive(Debug, Parser)]
#[command(
    name = "esp-sim",
    version,
    about = "Simulated ESP32 devices waiting to be onboarded",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// Tools instead of a fleet.
    #[command(subcommand)]
    tool: Option<Tool>,
    /// Devices reachable over BLE.
    #[arg(long, default_value_t = 0)]
    ble: usize,
    /// Devices reachable over SoftAP HTTP.
    #[arg(long, default_value_t = 0)]
    softap: usize,
    /// Address the SoftAP HTTP servers bind (each device gets a free port).
    #[arg(long, default_value = "127.0.0.1")]
    http_host: IpAddr,
    /// Security scheme: 0, 1 or 2.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=2))]
    security: u8,
    /// Security 2 `sec_patch_ver` (1: GCM IV counter; 0: one fixed IV).
    #[arg(long, default_value_t = 1)]
    patch_ver: u32,
    /// SRP username (Security 2).
    #[arg(long, default_value = "wifiprov")]
    username: String,
    /// One PoP / SRP password for every device; default: one per device derived from
    /// its MAC, as RainMaker prints on its QR code.
    #[arg(long)]
    pop: Option<String>,
    /// Offer RainMaker assisted claiming (`rmaker` cap `claim`).
    #[arg(long)]
    claim: bool,
    /// SSID of the simulated site access point.
    #[arg(long, default_value = "outpost-site")]
    ap_ssid: String,
    /// Its passphrase.
    #[arg(long, default_value = "correct horse battery")]
    ap_passphrase: String,
    /// How long a device takes to join, in milliseconds.
    #[arg(long, default_value_t = 200)]
    connect_delay_ms: u64,
    /// Make device INDEX misbehave: INDEX=drop-after-session|garbage|oversized.
    #[arg(long, value_parser = parse_fault)]
    fault: Vec<(usize, Fault)>,
    /// Give device INDEX another name (e.g. a duplicate): INDEX=NAME.
    #[arg(long, value_parser = parse_rename)]
    rename: Vec<(usize, String)>,
    /// The device type written into the manifest (selects the update handler).
    #[arg(long, default_value = "esp-sim-light")]
    device_type: String,
    /// First device index (so that several simulators make distinct MACs).
    #[arg(long, default_value_t = 0)]
    first_index: usize,
    /// Adapters the BLE devices use, one each (real hardware); default with --emulate:
    /// hci1, hci2, …
    #[arg(long, value_delimiter = ',')]
    adapters: Vec<String>,
    /// Start a private D-Bus system bus with BlueZoo for the BLE devices.
    #[arg(long)]
    emulate: bool,
    /// The BlueZoo launcher (PyPI bluezoo==1.0.2).
    #[arg(long, env = "OUTPOST_BLUEZOO", default_value = "bluezoo")]
    bluezoo: PathBuf,
    /// Where the emulated bus keeps its socket and logs.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Write the onboarding manifest (JSON) for `outpost onboard import` here.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Write each BLE device's provisioning QR payload here, one per line, as ESP-IDF's
    /// provisioning examples print it (`{"ver":"v1","name":…,"pop":…,"transport":"ble"}`,
    /// with `username` for Security 2): what an installer's QR scanner returns.
    #[arg(long)]
    qr: Option<PathBuf>,
    /// Run the Outpost update agent: offer the `outpost-agent` endpoint, and once the
    /// gateway hands over a credential, register and take update commands.
    #[arg(long)]
    agent: bool,
    /// With --agent: instead of running the built-in agent, write the credential the
    /// gateway hands over to DIR/<device name>.json, for an agent that runs elsewhere
    /// (the C agent's POSIX build in the gateway's tests).
    #[arg(long, value_name = "DIR", requires = "agent")]
    agent_handoff: Option<PathBuf>,
    /// The firmware version the devices run.
    #[arg(long, default_value = "1.0.0")]
    firmware_version: String,
    /// The chip they report (the esp32-app handler checks images against it).
    #[arg(long, default_value = "esp32c3")]
    chip: String,
    /// The ESP-IDF project they run.
    #[arg(long, default_value = "outpost-light")]
    project: String,
    /// Their manufacturer property.
    #[arg(long, default_value = "Espressif")]
    manufacturer: String,
    /// Their model property (default: the device type).
    #[arg(long)]
    model: Option<String>,
    /// A further property the agent reports, KEY=VALUE (repeatable), e.g.
    /// manufacturer_code=0x131b for Zigbee devices.
    #[arg(long = "property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// How long a reboot into new firmware takes, in milliseconds.
    #[arg(long, default_value_t = 300)]
    reboot_ms: u64,
    /// Make device INDEX fail its update: INDEX=refuse|download-fails|never-returns|wrong-version,
    /// or a Wi-Fi rotation: INDEX=wifi-refused.
    #[arg(long, value_parser = parse_update_fault)]
    update_fault: Vec<(usize, agent::UpdateFault)>,
    /// A further access point in the devices' range, SSID:PASSPHRASE (repeatable): a
    /// network a Wi-Fi rotation can move them to.
    #[arg(long, value_parser = parse_network)]
    ap_extra: Vec<(String, String)>,
}

fn parse_network(s: &str) -> Result<(String, String), String> {
    s.split_once(':')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected SSID:PASSPHRASE".to_owned())
}

#[derive(Debug, clap::Subcommand)]
enum Tool {
    /// Write a firmware file the simulated devices' handlers accept (an ESP-IDF app
    /// image or a Zigbee OTA upgrade file).
    Firmware(firmware::FirmwareArgs),
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected KEY=VALUE".to_owned())
}

fn parse_update_fault(s: &str) -> Result<(usize, agent::UpdateFault), String> {
    let (index, mode) = s.split_once('=').ok_or("expected INDEX=MODE")?;
    let index = index.parse().map_err(|_| format!("bad index {index:?}"))?;
    let mode = <agent::UpdateFault as clap::ValueEnum>::from_str(mode, true)?;
    Ok((index, mode))
}

fn parse_fault(s: &str) -> Result<(usize, Fault), String> {
    let (index, mode) = s.split_once('=').ok_or("expected INDEX=MODE")?;
    let index = index.parse().map_err(|_| format!("bad index {index:?}"))?;
    let mode = <Fault as clap::ValueEnum>::from_str(mode, true)?;
    Ok((index, mode))
}

fn parse_rename(s: &str) -> Result<(usize, String), String> {
    let (index, name) = s.split_once('=').ok_or("expected INDEX=NAME")?;
    Ok((
        index.parse().map_err(|_| format!("bad index {index:?}"))?,
        name.to_owned(),
    ))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(Tool::Firmware(firmware)) = &args.tool {
        return firmware::write(firmware);
    }
    if args.emulate && args.ble > 0 {
        return supervise(&args);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// `--emulate`: start the bus and BlueZoo, then run the simulator itself on that bus as
/// a child (BlueZ clients read the bus address from the environment at start).
fn supervise(args: &Args) -> anyhow::Result<()> {
    let work_dir = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("esp-sim-{}", std::process::id())),
    };
    let mut adapters = vec![central_address(args.first_index)];
    adapters.extend((0..args.ble).map(|i| mac_string(&mac(args.first_index + i))));
    let emulation = emulate::Emulation::start(&work_dir, &args.bluezoo, &adapters)?;
    emit(&json!({
        "event": "bus",
        "dbus_system_bus_address": emulation.address,
        "central_adapter": "hci0",
        "central_address": adapters[0],
    }));
    let mut child_args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--emulate")
        .collect();
    child_args.push("--adapters".into());
    child_args.push(
        (1..=args.ble)
            .map(|i| format!("hci{i}"))
            .collect::<Vec<_>>()
            .join(","),
    );
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(&child_args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &emulation.address)
        .spawn()
        .context("cannot start the simulator on the emulated bus")?;
    let child_pid = child.id().to_string();
    // Stop when told to (SIGTERM/SIGINT) or when the simulator ends.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let wait = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            (child, status)
        });
        tokio::pin!(wait);
        tokio::select! {
            _ = term.recv() => Ok::<_, anyhow::Error>(None),
            _ = tokio::signal::ctrl_c() => Ok(None),
            done = &mut wait => Ok(Some(done?.1?)),
        }
    })?;
    let mut emulation = emulation;
    let code = match status {
        Some(status) => {
            let code = status.code().unwrap_or(1);
            if code != 0 && !emulation.bluezoo_alive() {
                eprintln!("esp-sim: BlueZoo exited; its log:\n{}", emulation.log());
            }
            code
        }
        None => {
            // Pass the stop on to the simulator (its wait runs on another thread); the
            // bus and BlueZoo are stopped when `emulation` drops.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child_pid])
                .status();
            0
        }
    };
    drop(emulation);
    drop(runtime);
    if code != 0 {
        bail!("the simulator exited with status {code}");
    }
    Ok(())
}

fn mac(index: usize) -> [u8; 6] {
    [0x24, 0x0A, 0xC4, 0x5E, (index >> 8) as u8, index as u8]
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn central_address(first_index: usize) -> String {
    format!(
        "02:0A:C4:00:{:02X}:{:02X}",
        (first_index >> 8) as u8,
        first_index as u8
    )
}

fn identities(args: &Args) -> anyhow::Result<Vec<Identity>> {
    let security = SecurityVersion::try_from(args.security).map_err(anyhow::Error::msg)?;
    let total = args.ble + args.softap;
    let mut out = Vec::with_capacity(total);
    for i in 0..total {
        let index = args.first_index + i;
        let mac = mac(index);
        let mut name = format!("PROV_{:02X}{:02X}{:02X}", mac[3], mac[4], mac[5]);
        if let Some((_, renamed)) = args.rename.iter().find(|(at, _)| *at == i) {
            name = renamed.clone();
        }
        let pop = match &args.pop {
            Some(pop) => pop.clone(),
            None => hex::encode(&Sha256::digest(format!("outpost-sim:{}", mac_string(&mac)))[..4]),
        };
        out.push(Identity {
            index,
            name,
            mac,
            security,
            pop,
            username: args.username.clone(),
            patch_ver: args.patch_ver,
            claim: args.claim,
            fault: args.fault.iter().find(|(at, _)| *at == i).map(|(_, f)| *f),
            agent: args.agent.then(|| agent::AgentProfile {
                manufacturer: args.manufacturer.clone(),
                model: args
                    .model
                    .clone()
                    .unwrap_or_else(|| args.device_type.clone()),
                chip: args.chip.clone(),
                project: args.project.clone(),
                properties: args.properties.clone(),
                firmware_version: args.firmware_version.clone(),
                reboot: Duration::from_millis(args.reboot_ms),
                handoff: args.agent_handoff.clone(),
                networks: std::iter::once((args.ap_ssid.clone(), args.ap_passphrase.clone()))
                    .chain(args.ap_extra.iter().cloned())
                    .collect(),
                network: args.ap_ssid.clone(),
                fault: args
                    .update_fault
                    .iter()
                    .find(|(at, _)| *at == i)
                    .map(|(_, f)| *f),
            }),
        });
    }
    Ok(out)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ap = AccessPoint {
        ssid: args.ap_ssid.clone(),
        passphrase: args.ap_passphrase.clone(),
        connect_delay: Duration::from_millis(args.connect_delay_ms),
    };
    let identities = identities(&args)?;
    let devices: Vec<Arc<SimDevice>> = tokio::task::spawn_blocking({
        let ap = ap.clone();
        move || {
            identities
                .into_iter()
                .map(|id| SimDevice::new(id, ap.clone()).map(Arc::new))
                .collect::<anyhow::Result<Vec<_>>>()
        }
    })
    .await??;

    let mut manifest = Vec::new();
    let mut qr_codes = String::new();
    let mut peripherals = Vec::new();
    let mut _session = None;
    if args.ble > 0 {
        let session = bluer::Session::new()
            .await
            .context("cannot reach BlueZ on the system bus")?;
        let adapters = if args.adapters.is_empty() {
            session.adapter_names().await?.into_iter().skip(1).collect()
        } else {
            args.adapters.clone()
        };
        if adapters.len() < args.ble {
            bail!(
                "{} BLE devices need as many adapters; have {} ({})",
                args.ble,
                adapters.len(),
                adapters.join(", ")
            );
        }
        wait_for_adapters(&session, &adapters).await?;
        for (device, adapter_name) in devices.iter().take(args.ble).zip(&adapters) {
            let adapter = session.adapter(adapter_name)?;
            peripherals.push(
                ble::serve(&adapter, device.clone())
                    .await
                    .with_context(|| {
                        format!("cannot register {} on {adapter_name}", device.identity.name)
                    })?,
            );
            let address = adapter.address().await?.to_string();
            manifest.push(entry(
                &args,
                device,
                json!({"transport": "ble", "mac": address}),
            ));
            qr_codes.push_str(&qr_payload(device));
            qr_codes.push('\n');
        }
        _session = Some(session);
    }
    for device in devices.iter().skip(args.ble) {
        let listener = http::bind(SocketAddr::new(args.http_host, 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(http::serve(listener, device.clone()));
        manifest.push(entry(
            &args,
            device,
            json!({"transport": "softap", "address": addr.to_string(), "mac": device.identity.mac_colon()}),
        ));
    }
    let manifest = json!({ "devices": manifest });
    if let Some(path) = &args.manifest {
        std::fs::write(path, serde_json::to_vec_pretty(&manifest)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.qr {
        std::fs::write(path, qr_codes)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    emit(&json!({"event": "ready", "devices": manifest["devices"]}));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(peripherals);
    Ok(())
}

fn entry(args: &Args, device: &SimDevice, transport: serde_json::Value) -> serde_json::Value {
    let serde_json::Value::Object(transport) = transport else {
        unreachable!("callers pass objects")
    };
    let id = &device.identity;
    let mut entry = json!({
        "name": id.name,
        "device_type": args.device_type,
        "security": id.security.number(),
    });
    match id.security {
        SecurityVersion::Sec0 => {}
        SecurityVersion::Sec1 => entry["pop"] = json!(id.pop),
        SecurityVersion::Sec2 => {
            entry["username"] = json!(id.username);
            entry["password"] = json!(id.pop);
        }
    }
    if let Some(map) = entry.as_object_mut() {
        map.extend(transport);
    }
    entry
}

/// The QR payload ESP-IDF's provisioning examples print for a BLE device: no device
/// type, and for Security 2 the SRP password travels as `pop`.
fn qr_payload(device: &SimDevice) -> String {
    let id = &device.identity;
    let mut payload = json!({"ver": "v1", "name": id.name});
    match id.security {
        SecurityVersion::Sec0 => {}
        SecurityVersion::Sec1 => payload["pop"] = json!(id.pop),
        SecurityVersion::Sec2 => {
            payload["username"] = json!(id.username);
            payload["pop"] = json!(id.pop);
        }
    }
    payload["transport"] = json!("ble");
    payload.to_string()
}

/// BlueZ (or BlueZoo) may still be bringing adapters up when we start: a readiness
/// poll, bounded.
async fn wait_for_adapters(session: &bluer::Session, wanted: &[String]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let names = session.adapter_names().await.unwrap_or_default();
        if wanted.iter().all(|w| names.contains(w)) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("adapters {wanted:?} did not appear on the bus (have {names:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
