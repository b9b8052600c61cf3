//! The command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_store::{Device, Store};
use serde::Serialize;

/// `println!` for command output: a stdout that is gone (`outpost … | head -1`) ends the
/// command through [`quiet_on_closed_pipe`] instead of a panic. Use inside functions
/// that return `anyhow::Result`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?;
    }};
}

/// `print!` for command output, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, $($arg)*)?;
        stdout.flush()?;
    }};
}

pub(crate) mod client;
mod firmware;
mod handler;
mod onboard;
mod rollout;
mod tokens;
mod wifi;

use firmware::FirmwareCommand;
use handler::HandlerCommand;
use onboard::OnboardCommand;
use rollout::RolloutCommand;
use tokens::TokensCommand;
use wifi::WifiCommand;

use crate::config::{self, Config, LogFormat};
use crate::{daemon, logging};

/// Outpost: a site gateway for fleets of ESP32-class devices.
#[derive(Debug, Parser)]
#[command(name = "outpost", version, about)]
pub(crate) struct Cli {
    /// The config file.
    #[arg(long, short, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,

    /// Log format for `run`, overriding log.format in the config.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway until SIGINT or SIGTERM.
    Run,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect the devices the gateway knows.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Build, sign, verify and install vendor update handlers.
    #[command(subcommand)]
    Handler(HandlerCommand),
    /// The firmware cache: import, list, remove; signed update manifests.
    #[command(subcommand)]
    Firmware(FirmwareCommand),
    /// Onboard ESP devices: import a manifest, run, list; make a claiming CA.
    #[command(subcommand)]
    Onboard(OnboardCommand),
    /// The cloud uplink: link state, outbox.
    #[command(subcommand)]
    Uplink(UplinkCommand),
    /// Rollouts: create (offline sites), list, follow, pause, resume, cancel, retry.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Device groups that rollouts target.
    #[command(subcommand)]
    Groups(GroupsCommand),
    /// The site's Wi-Fi on the devices: rotate credentials as a rollout.
    #[command(subcommand)]
    Wifi(WifiCommand),
    /// API tokens with a role (viewer, operator, admin).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Internal: compiles a handler component (on stdin) into a precompile cache entry.
    /// The gateway runs it as a child process, so the compiler's memory goes back to
    /// the system when it exits.
    #[command(name = "compile-handler", hide = true)]
    CompileHandler {
        /// The engine settings, as the gateway passes them.
        #[arg(long)]
        engine: String,
        /// The cache entry to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum GroupsCommand {
    /// List the groups and their members.
    List {
        /// Print JSON (the same shape as GET /api/v1/groups).
        #[arg(long)]
        json: bool,
    },
    /// Create an empty group.
    Create {
        /// Its id (rollouts name it in `target.group` / `--group`).
        id: String,
        /// A name for people (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Add devices to a group.
    Add {
        /// The group.
        id: String,
        /// The devices.
        #[arg(required = true)]
        devices: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check a config file and print the effective config, secrets redacted.
    Check {
        /// The file to check (default: the --config file).
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// List the devices in the lobby.
    List {
        /// Print JSON (the same shape as GET /api/v1/devices).
        #[arg(long)]
        json: bool,
    },
    /// Set properties of a device that rollouts select on (site, customer, tag, …):
    /// KEY=VALUE, or KEY= to remove one. Needs the running gateway.
    Set {
        /// The device id.
        id: String,
        /// KEY=VALUE pairs.
        #[arg(required = true)]
        properties: Vec<String>,
    },
    /// Issue a device's credential for the local device API (shown once; replaces the
    /// previous one). Needs the running gateway.
    Credential {
        /// The device id.
        id: String,
    },
    /// Revoke a device's credential: its token stops working at once. Needs the
    /// running gateway.
    Revoke {
        /// The device id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum UplinkCommand {
    /// The link state and the outbox figures of the running gateway.
    Status {
        /// Print JSON (the same shape as GET /api/v1/uplink).
        #[arg(long)]
        json: bool,
    },
}

/// Whether `err` comes from writing to a closed pipe: the reader (`head`, a pager) has
/// all it wants, so the command ends quietly and successfully.
pub(crate) fn quiet_on_closed_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

impl Cli {
    /// Whether this is `outpost run`, the long-lived daemon.
    pub(crate) fn runs_the_daemon(&self) -> bool {
        matches!(self.command, Command::Run)
    }
}

/// Runs the parsed command.
pub(crate) async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run => {
            let config = Config::load(&cli.config)?;
            let format = cli.log_format.unwrap_or(config.log.format);
            logging::init(format, config.log.level.as_str())?;
            daemon::run(config, &cli.config).await?;
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let path = file.unwrap_or(cli.config);
            let config = Config::load(&path)?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "# {}: OK. Effective configuration:\n", path.display())?;
            out.write_all(config.to_redacted_toml().as_bytes())?;
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
        }
        Command::Handler(command) => handler::run(command, &cli.config).await?,
        Command::CompileHandler { engine, out } => {
            return Ok(handler::compile_child(&engine, &out));
        }
        Command::Firmware(command) => firmware::run(command, &cli.config).await?,
        Command::Rollout(command) => rollout::run(command, &cli.config).await?,
        Command::Groups(command) => groups(command, &cli.config).await?,
        Command::Wifi(command) => wifi::run(command, &cli.config).await?,
        Command::Tokens(command) => tokens::run(command, &cli.config).await?,
        Command::Devices(DevicesCommand::Set { id, properties }) => {
            let mut changes = serde_json::Map::new();
            for pair in &properties {
                let (key, value) = pair
                    .split_once('=')
                    .with_context(|| format!("{pair:?}: expected KEY=VALUE (or KEY= to remove)"))?;
                let value = if value.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::Value::String(value.to_owned())
                };
                changes.insert(key.to_owned(), value);
            }
            let device = client::call(
                &cli.config,
                hyper::Method::PUT,
                &format!("/api/v1/devices/{id}/properties"),
                Some(serde_json::Value::Object(changes)),
            )
            .await?;
            outln!(
                "{id}: {}",
                serde_json::to_string(&device["compat"]).unwrap_or_default()
            );
        }
        Command::Onboard(command) => {
            if !onboard::run(command, &cli.config).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Devices(DevicesCommand::Revoke { id }) => {
            client::call(
                &cli.config,
                hyper::Method::DELETE,
                &format!("/api/v1/devices/{id}/credential"),
                None,
            )
            .await?;
            outln!("Revoked the device token of {id}.");
        }
        Command::Devices(DevicesCommand::Credential { id }) => {
            let answer = client::call(
                &cli.config,
                hyper::Method::POST,
                &format!("/api/v1/devices/{id}/credential"),
                None,
            )
            .await?;
            outln!(
                "Device token for {id} (shown once; send it as Authorization: Bearer <token>):\n\n    {}",
                answer["token"].as_str().unwrap_or_default()
            );
        }
        Command::Uplink(UplinkCommand::Status { json }) => {
            let answer =
                client::call(&cli.config, hyper::Method::GET, "/api/v1/uplink", None).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let outbox = &answer["outbox"];
                if answer["configured"].as_bool() == Some(true) {
                    let link = &answer["link"];
                    outln!(
                        "uplink:   {} {}",
                        link["state"].as_str().unwrap_or("?"),
                        link["broker"].as_str().unwrap_or("")
                    );
                    if let Some(error) = link["last_error"].as_str() {
                        outln!("error:    {error}");
                    }
                    outln!(
                        "attempts: {} connects, {} connections, {} registrations",
                        link["connect_attempts"],
                        link["connections"],
                        link["registrations"]
                    );
                } else {
                    outln!("uplink:   not configured (offline site)");
                }
                outln!(
                    "outbox:   {} queued ({} bytes) of {} max; {} delivered, {} expired, {} refused; {} telemetry writes paced now",
                    outbox["queued"],
                    outbox["bytes"],
                    outbox["max_messages"],
                    outbox["delivered"],
                    outbox["expired"],
                    outbox["refused"],
                    outbox["paced"]
                );
            }
        }
        Command::Devices(DevicesCommand::List { json }) => {
            let config = Config::load(&cli.config)?;
            let devices = read_devices(&config.database_path()).await?;
            let mut out = std::io::stdout().lock();
            if json {
                #[derive(Serialize)]
                struct DeviceList<'a> {
                    devices: &'a [Device],
                }
                serde_json::to_writer_pretty(&mut out, &DeviceList { devices: &devices })?;
                writeln!(out)?;
            } else {
                write_device_table(&mut out, &devices)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn groups(command: GroupsCommand, config: &Path) -> anyhow::Result<()> {
    match command {
        GroupsCommand::List { json } => {
            let answer = client::call(config, hyper::Method::GET, "/api/v1/groups", None).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            let groups = answer["groups"].as_array().cloned().unwrap_or_default();
            if groups.is_empty() {
                outln!("No groups.");
            }
            for group in groups {
                let members: Vec<&str> = group["members"]
                    .as_array()
                    .map(|m| m.iter().filter_map(serde_json::Value::as_str).collect())
                    .unwrap_or_default();
                outln!(
                    "{:<20} {} device(s): {}",
                    group["id"].as_str().unwrap_or("?"),
                    members.len(),
                    members.join(", ")
                );
            }
        }
        GroupsCommand::Create {
            id,
            name,
            description,
        } => {
            let body = serde_json::json!({"id": id, "name": name, "description": description});
            client::call(config, hyper::Method::POST, "/api/v1/groups", Some(body)).await?;
            outln!("Group {id} created.");
        }
        GroupsCommand::Add { id, devices } => {
            for device in &devices {
                client::call(
                    config,
                    hyper::Method::PUT,
                    &format!("/api/v1/groups/{id}/members/{device}"),
                    None,
                )
                .await?;
            }
            outln!("Added {} device(s) to {id}.", devices.len());
        }
    }
    Ok(())
}

/// Reads the lobby. A gateway that never ran has no database yet: that is an empty
/// lobby, and listing must not create one.
async fn read_devices(database: &Path) -> anyhow::Result<Vec<Device>> {
    if !database.exists() {
        return Ok(Vec::new());
    }
    let store = Store::open(database).await?;
    let devices = store.list_devices().await;
    store.close().await?;
    devices.with_context(|| format!("reading devices from {}", database.display()))
}

fn write_device_table(out: &mut impl Write, devices: &[Device]) -> std::io::Result<()> {
    if devices.is_empty() {
        return writeln!(out, "No devices yet.");
    }
    let header = ["ID", "TYPE", "STATE", "FIRMWARE", "LAST SEEN"];
    let rows: Vec<[String; 5]> = devices
        .iter()
        .map(|d| {
            [
                d.id.clone(),
                d.device_type.clone(),
                d.state.to_string(),
                d.firmware_version.clone().unwrap_or_else(|| "-".into()),
                d.last_seen_at
                    .map_or_else(|| "never".into(), |t| t.to_string()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: &[&str]| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(out, "{}", text.join("  ").trim_end())
    };
    line(&header)?;
    for row in &rows {
        line(&row.each_ref().map(String::as_str))?;
    }
    writeln!(out, "\n{} device(s)", devices.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_store::{DeviceState, Timestamp};

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn device_table_aligns_columns() {
        let device = |id: &str, fw: Option<&str>| Device {
            id: id.into(),
            device_type: "thermostat".into(),
            manufacturer: None,
            model: None,
            compat: Default::default(),
            firmware_version: fw.map(str::to_owned),
            state: DeviceState::Claimed,
            created_at: Timestamp::from_unix_millis(0),
            updated_at: Timestamp::from_unix_millis(0),
            last_seen_at: Some(Timestamp::from_unix_millis(1_700_000_000_000)),
        };
        let mut out = Vec::new();
        write_device_table(
            &mut out,
            &[device("esp-long-name-1", Some("1.2.0")), device("e2", None)],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID               TYPE"), "{text}");
        assert!(
            lines[1].starts_with("esp-long-name-1  thermostat  claimed  1.2.0"),
            "{text}"
        );
        assert!(
            lines[2].contains("e2               thermostat  claimed  -"),
            "{text}"
        );
        assert!(lines[1].ends_with("2023-11-14T22:13:20.000Z"), "{text}");
        assert!(text.ends_with("2 device(s)\n"), "{text}");
    }
}
