//! `outpost handler …`: the vendor's tools (keygen, pack, sign) and the operator's
//! (verify, install, list, remove).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::client::{GatewayApi, error_message};
use crate::config::Config;
use crate::state_dir::running_gateway;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use outpost_runtime::package::{self, Manifest, Package, RequestedLimits};
use outpost_runtime::{HandlerRegistry, HandlerState, HandlerSummary, Runtime};

#[derive(Debug, Subcommand)]
pub(crate) enum HandlerCommand {
    /// Create a vendor signing key (private key file, mode 0600) and print its public key.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Pack a wasm32-wasip2 component into an (unsigned) handler package.
    Pack(PackArgs),
    /// Sign a package with a vendor key (in place unless --out is given).
    Sign {
        /// The package.
        package: PathBuf,
        /// The vendor's private key file.
        #[arg(long)]
        key: PathBuf,
        /// Write the signed package here instead.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a package against this gateway's trusted vendors and runtime, without installing.
    Verify {
        /// The package.
        package: PathBuf,
    },
    /// Verify, compile and install a package (replaces an installed handler of the same name).
    Install {
        /// The package.
        package: PathBuf,
    },
    /// List the installed handlers.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an installed handler.
    Remove {
        /// The handler's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct PackArgs {
    /// The component (.wasm) built for wasm32-wasip2.
    component: PathBuf,
    /// Handler name (a-z 0-9 - _ .).
    #[arg(long)]
    name: String,
    /// Handler version.
    #[arg(long)]
    version: String,
    /// Vendor name, as the gateway's trust store knows it.
    #[arg(long)]
    vendor: String,
    /// A device type the handler updates (repeat for more).
    #[arg(long = "device-type", required = true)]
    device_types: Vec<String>,
    /// The WIT world version it was built against.
    #[arg(long, default_value = "outpost:handler@0.1.0")]
    wit: String,
    /// Where to write the package.
    #[arg(long)]
    out: PathBuf,
}

#[allow(clippy::print_stdout)]
pub(crate) async fn run(command: HandlerCommand, config_path: &Path) -> anyhow::Result<()> {
    match command {
        HandlerCommand::Keygen { out } => {
            let key = package::generate_key().map_err(anyhow::Error::msg)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| {
                    format!("cannot create {} (it must not exist yet)", out.display())
                })?;
            file.write_all(package::format_secret_key(&key).as_bytes())?;
            file.sync_all()?;
            let public = package::format_public_key(&key.verifying_key());
            outln!(
                "Wrote the private key to {} (mode 0600). Keep it secret.",
                out.display()
            );
            outln!("Public key: {public}");
            outln!("\nGateways that trust this vendor add to outpost.toml:\n");
            outln!(
                "[[handlers.trusted_vendors]]\nname = \"<vendor>\"\npublic_key = \"{public}\"\ndevice_types = [\"<device type>\"]"
            );
        }
        HandlerCommand::Pack(args) => {
            let component = std::fs::read(&args.component)
                .with_context(|| format!("cannot read {}", args.component.display()))?;
            // The limits come from one place, the handler's own describe: the manifest
            // carries what it asks for (the gateway refuses a package whose two differ).
            let runtime = Runtime::new(outpost_runtime::RuntimeConfig::default())?;
            let handler = runtime.load(&args.name, &component).with_context(|| {
                format!("{} is not a handler component", args.component.display())
            })?;
            let info = runtime
                .describe(&handler, &outpost_runtime::Services::closed())
                .await
                .with_context(|| format!("{}'s describe failed", args.component.display()))?;
            let manifest = Manifest {
                format: package::FORMAT,
                name: args.name,
                version: args.version,
                vendor: args.vendor,
                device_types: args.device_types,
                wit: args.wit,
                limits: RequestedLimits {
                    memory_mib: info.requested_limits.memory_mib,
                    cpu_ms: info.requested_limits.cpu_ms,
                },
                component: "handler.wasm".into(),
                files: Default::default(),
            };
            let package = Package::build(manifest, component)?;
            write_atomically(&args.out, &package.to_tar())?;
            outln!(
                "Packed {} {} into {} with the limits its describe asks for ({} MiB, {} ms) \
                 (unsigned; sign it with `outpost handler sign`)",
                package.manifest().name,
                package.manifest().version,
                args.out.display(),
                package.manifest().limits.memory_mib,
                package.manifest().limits.cpu_ms
            );
        }
        HandlerCommand::Sign {
            package: path,
            key,
            out,
        } => {
            let key_text = std::fs::read_to_string(&key)
                .with_context(|| format!("cannot read the key file {}", key.display()))?;
            let key = package::parse_secret_key(&key_text)
                .map_err(|why| anyhow::anyhow!("{}: {why}", key.display()))?;
            let mut package = read_package(&path)?;
            package.sign(&key);
            let out = out.unwrap_or(path);
            write_atomically(&out, &package.to_tar())?;
            outln!(
                "Signed {} {} with {} into {}",
                package.manifest().name,
                package.manifest().version,
                package::format_public_key(&key.verifying_key()),
                out.display()
            );
        }
        HandlerCommand::Verify { package: path } => {
            let config = Config::load(config_path)?;
            let verified = read_package(&path)?
                .verify(&config.handlers.trusted())
                .with_context(|| format!("{} was refused", path.display()))?;
            let runtime = Runtime::new(config.handlers.runtime_config())?;
            // The same checks an install makes: it compiles here, and `describe`
            // answers and agrees with the manifest.
            outpost_runtime::check_package(&runtime, &verified)
                .await
                .with_context(|| format!("{} cannot run on this gateway", path.display()))?;
            let manifest = verified.manifest();
            outln!(
                "OK: {} {} by {} for {}, built for {}",
                manifest.name,
                manifest.version,
                verified.vendor(),
                manifest.device_types.join(", "),
                manifest.wit
            );
        }
        HandlerCommand::Install { package: path } => {
            let config = Config::load(config_path)?;
            let archive =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let summary = match running_gateway(&config.gateway.state_dir)? {
                // A running gateway swaps it into its live registry.
                Some(addr) => {
                    let (status, json) = GatewayApi::new(&config, addr)?
                        .send(Method::POST, "/api/v1/handlers", archive)
                        .await?;
                    if status != StatusCode::CREATED {
                        bail!(
                            "{} was not installed: {}",
                            path.display(),
                            error_message(&json)
                        );
                    }
                    let handler = &json["handler"];
                    let device_types: Vec<&str> = handler["device_types"]
                        .as_array()
                        .map(|types| types.iter().filter_map(|t| t.as_str()).collect())
                        .unwrap_or_default();
                    format!(
                        "{} {} by {} for {} into the running gateway",
                        handler["name"].as_str().unwrap_or("?"),
                        handler["version"].as_str().unwrap_or("?"),
                        handler["vendor"].as_str().unwrap_or("?"),
                        device_types.join(", ")
                    )
                }
                None => {
                    let registry = open_registry_cli(&config).await?;
                    let (installed, _) = registry
                        .install(&archive)
                        .await
                        .with_context(|| format!("{} was not installed", path.display()))?;
                    format!(
                        "{} {} by {} for {}",
                        installed.manifest.name,
                        installed.manifest.version,
                        installed.vendor,
                        installed.manifest.device_types.join(", ")
                    )
                }
            };
            outln!("Installed {summary}");
        }
        HandlerCommand::List { json } => {
            let config = Config::load(config_path)?;
            // The running gateway knows which handlers are still compiling; without one,
            // the packages on disk are loaded here.
            let handlers: Vec<HandlerSummary> = match running_gateway(&config.gateway.state_dir)? {
                Some(addr) => {
                    let (status, body) = GatewayApi::new(&config, addr)?
                        .send(Method::GET, "/api/v1/handlers", Vec::new())
                        .await?;
                    if status != StatusCode::OK {
                        bail!(
                            "the gateway did not list its handlers: {}",
                            error_message(&body)
                        );
                    }
                    serde_json::from_value(body["handlers"].clone())
                        .context("the gateway's handler list is not as expected")?
                }
                None => open_registry_cli(&config).await?.summaries(),
            };
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "handlers": handlers }))?
                );
            } else if handlers.is_empty() {
                outln!("No handlers installed.");
            } else {
                for h in &handlers {
                    let state = match h.state {
                        HandlerState::Ready => "",
                        HandlerState::Compiling => "  (compiling)",
                    };
                    outln!(
                        "{}  {}  by {}  for {}{state}",
                        h.name,
                        h.version,
                        h.vendor,
                        h.device_types.join(", ")
                    );
                }
            }
        }
        HandlerCommand::Remove { name } => {
            let config = Config::load(config_path)?;
            match running_gateway(&config.gateway.state_dir)? {
                Some(addr) => {
                    let (status, json) = GatewayApi::new(&config, addr)?
                        .send(
                            Method::DELETE,
                            &format!("/api/v1/handlers/{name}"),
                            Vec::new(),
                        )
                        .await?;
                    if status != StatusCode::OK {
                        bail!("{name} was not removed: {}", error_message(&json));
                    }
                    outln!(
                        "Removed {} {} from the running gateway",
                        json["removed"]["name"].as_str().unwrap_or("?"),
                        json["removed"]["version"].as_str().unwrap_or("?")
                    );
                }
                None => {
                    let registry = open_registry_cli(&config).await?;
                    let removed = registry.remove(&name)?;
                    outln!(
                        "Removed {} {}",
                        removed.manifest.name,
                        removed.manifest.version
                    );
                }
            }
        }
    }
    Ok(())
}

/// `outpost compile-handler`, the gateway's compiler child (see
/// [`outpost_runtime::Compiler::Child`]): the component on stdin, the cache entry to
/// `out`. A component that does not compile exits with
/// [`outpost_runtime::COMPILE_REFUSED`] and the reason alone on stderr.
pub(crate) fn compile_child(engine: &str, out: &Path) -> ExitCode {
    use std::io::Read as _;
    let mut wasm = Vec::new();
    // A package holds no entry larger than this, so no component is.
    let limit = package::MAX_ENTRY_SIZE;
    if let Err(err) = std::io::stdin()
        .lock()
        .take(limit + 1)
        .read_to_end(&mut wasm)
    {
        eprintln!("error: cannot read the component: {err}");
        return ExitCode::FAILURE;
    }
    if wasm.len() as u64 > limit {
        eprintln!("error: the component is over {} MiB", limit >> 20);
        return ExitCode::FAILURE;
    }
    match outpost_runtime::compile_entry(engine, &wasm, out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(outpost_runtime::LoadError::Invalid(why)) => {
            eprintln!("{why}");
            ExitCode::from(outpost_runtime::COMPILE_REFUSED as u8)
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// [`open_registry`] for the CLI: warnings go to stderr.
async fn open_registry_cli(config: &Config) -> anyhow::Result<HandlerRegistry> {
    let (registry, warnings) = crate::daemon::open_registry(config).await?;
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    Ok(registry)
}

fn read_package(path: &Path) -> anyhow::Result<Package> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    Package::read(std::io::BufReader::new(file))
        .with_context(|| format!("{} was refused", path.display()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
