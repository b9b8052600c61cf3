//! `outpost firmware …`: the operator's view of the firmware cache (import, list,
//! remove, manifests) and the fleet's manifest signing tool.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use hyper::{Method, StatusCode};
use outpost_cache::manifest::{self, UpdateManifest};
use outpost_cache::{FirmwareCache, Sha256};
use outpost_store::Store;

use super::client::{GatewayApi, error_message};
use crate::config::Config;
use crate::state_dir::running_gateway;

#[derive(Debug, Subcommand)]
pub(crate) enum FirmwareCommand {
    /// Add a firmware file to the cache by hand (no manifest needed); prints its sha256.
    Import {
        /// The file.
        file: PathBuf,
    },
    /// List cached firmware, with pins, bytes served and unfinished downloads.
    List {
        /// Print JSON (the same shape as GET /api/v1/firmware).
        #[arg(long)]
        json: bool,
    },
    /// Remove a cached file (refused while a deployment pins it).
    Remove {
        /// Its sha256.
        sha256: Sha256,
    },
    /// Keep a file from eviction (deployments pin their files; operators may too).
    Pin {
        /// Its sha256 (it need not be cached yet).
        sha256: Sha256,
        /// Who holds the pin.
        #[arg(long, default_value = "operator")]
        holder: String,
    },
    /// Remove a pin.
    Unpin {
        /// Its sha256.
        sha256: Sha256,
        /// Whose pin.
        #[arg(long, default_value = "operator")]
        holder: String,
    },
    /// Print a signed download link to a cached file (the firmware listener serves
    /// only such links unless cache.require_signed_links = false). Needs the running
    /// gateway.
    Link {
        /// Its sha256.
        sha256: Sha256,
        /// Whom the link is for: a device id, or a name for a person or tool.
        #[arg(long, default_value = "operator")]
        device: String,
        /// How long it stays valid (e.g. 30m, 1h, 2d; at most 7d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        valid: std::time::Duration,
    },
    /// Signed update manifests: what the gateway may download.
    #[command(subcommand)]
    Manifest(ManifestCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum ManifestCommand {
    /// Verify a signed manifest (JWS) against the trusted signers, record it and
    /// download its files (in the background when a gateway is running).
    Add {
        /// The signed manifest file.
        file: PathBuf,
    },
    /// Sign a manifest (JSON) with an ed25519 key, for the fleet backend or tests.
    Sign {
        /// The manifest, as JSON.
        manifest: PathBuf,
        /// The private key file (from `outpost handler keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The signer's name, as gateways' `[[cache.trusted_signers]]` know it.
        #[arg(long)]
        kid: String,
        /// Where to write the JWS (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Runs a `firmware` subcommand.
#[allow(clippy::print_stdout)]
pub(crate) async fn run(command: FirmwareCommand, config_path: &Path) -> anyhow::Result<()> {
    if let FirmwareCommand::Manifest(ManifestCommand::Sign {
        manifest: path,
        key,
        kid,
        out,
    }) = command
    {
        return sign(&path, &key, &kid, out.as_deref());
    }
    let config = Config::load(config_path)?;
    match running_gateway(&config.gateway.state_dir)? {
        Some(addr) => online(command, &GatewayApi::new(&config, addr)?).await,
        None => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.gateway.state_dir)
                .with_context(|| {
                    format!(
                        "cannot create the state directory {}",
                        config.gateway.state_dir.display()
                    )
                })?;
            let store = Store::open(config.database_path()).await?;
            let cache = FirmwareCache::open(
                store.clone(),
                config.cache.cache_config(&config.firmware_dir()),
            )
            .await;
            let result = match cache {
                Ok(cache) => {
                    let result = offline(command, &cache).await;
                    cache.shutdown().await?;
                    result
                }
                Err(error) => Err(error).context("cannot open the firmware cache"),
            };
            store.close().await?;
            result
        }
    }
}

#[allow(clippy::print_stdout)]
fn sign(path: &Path, key: &Path, kid: &str, out: Option<&Path>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let manifest: UpdateManifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid manifest", path.display()))?;
    let key_text = std::fs::read_to_string(key)
        .with_context(|| format!("cannot read the key file {}", key.display()))?;
    let key = outpost_runtime::package::parse_secret_key(&key_text)
        .map_err(|why| anyhow::anyhow!("{}: {why}", key.display()))?;
    let jws = manifest::sign(&manifest, &key, kid)
        .with_context(|| format!("{} was not signed", path.display()))?;
    match out {
        Some(out) => {
            std::fs::write(out, format!("{jws}\n"))
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "Signed {} as {kid:?} into {}",
                manifest.update_id,
                out.display()
            );
        }
        None => outln!("{jws}"),
    }
    Ok(())
}

/// Through the running gateway's API.
#[allow(clippy::print_stdout)]
async fn online(command: FirmwareCommand, api: &GatewayApi) -> anyhow::Result<()> {
    // Pin and unpin share one arm below.
    let pin = matches!(command, FirmwareCommand::Pin { .. });
    match command {
        FirmwareCommand::Import { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (status, json) = api
                .request(
                    Method::POST,
                    "/api/v1/firmware",
                    "application/octet-stream",
                    &[("x-outpost-file-name", &name)],
                    bytes,
                )
                .await?;
            if status != StatusCode::CREATED {
                bail!(
                    "{} was not imported: {}",
                    file.display(),
                    error_message(&json)
                );
            }
            outln!(
                "Imported {} as {} into the running gateway",
                file.display(),
                json["blob"]["sha256"].as_str().unwrap_or("?")
            );
        }
        FirmwareCommand::List { json } => {
            let (status, answer) = api
                .request(
                    Method::GET,
                    "/api/v1/firmware",
                    "application/json",
                    &[],
                    Vec::new(),
                )
                .await?;
            if status != StatusCode::OK {
                bail!(
                    "the firmware list could not be read: {}",
                    error_message(&answer)
                );
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print_list(&answer)?;
            }
        }
        FirmwareCommand::Link {
            sha256,
            device,
            valid,
        } => {
            let body = serde_json::json!({ "device": device, "validSecs": valid.as_secs() });
            let (status, json) = api
                .request(
                    Method::POST,
                    &format!("/api/v1/firmware/{sha256}/links"),
                    "application/json",
                    &[],
                    serde_json::to_vec(&body)?,
                )
                .await?;
            if status != StatusCode::CREATED {
                bail!("no link was made: {}", error_message(&json));
            }
            outln!("{}", json["url"].as_str().unwrap_or_default());
        }
        FirmwareCommand::Remove { sha256 } => {
            let (status, json) = api
                .request(
                    Method::DELETE,
                    &format!("/api/v1/firmware/{sha256}"),
                    "application/json",
                    &[],
                    Vec::new(),
                )
                .await?;
            if status != StatusCode::OK {
                bail!("{sha256} was not removed: {}", error_message(&json));
            }
            outln!("Removed {sha256} from the running gateway");
        }
        FirmwareCommand::Pin { sha256, holder } | FirmwareCommand::Unpin { sha256, holder } => {
            let (status, json) = api
                .request(
                    if pin { Method::PUT } else { Method::DELETE },
                    &format!("/api/v1/firmware/{sha256}/pins/{holder}"),
                    "application/json",
                    &[],
                    Vec::new(),
                )
                .await?;
            if status != StatusCode::OK {
                let done = if pin { "pinned" } else { "unpinned" };
                bail!("{sha256} was not {done}: {}", error_message(&json));
            }
            outln!(
                "{} {sha256} for {holder}",
                if pin { "Pinned" } else { "Unpinned" }
            );
        }
        FirmwareCommand::Manifest(ManifestCommand::Add { file }) => {
            let jws =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let (status, json) = api
                .request(
                    Method::POST,
                    "/api/v1/firmware/manifests",
                    "application/jose",
                    &[],
                    jws,
                )
                .await?;
            if status != StatusCode::ACCEPTED {
                bail!("{} was refused: {}", file.display(), error_message(&json));
            }
            let manifest = &json["manifest"];
            outln!(
                "Accepted {} signed by {}; the running gateway is downloading its files",
                manifest["update_id"].as_str().unwrap_or("?"),
                manifest["signer"].as_str().unwrap_or("?")
            );
        }
        FirmwareCommand::Manifest(ManifestCommand::Sign { .. }) => unreachable!("handled before"),
    }
    Ok(())
}

/// Straight on the state directory, when no gateway runs.
#[allow(clippy::print_stdout)]
async fn offline(command: FirmwareCommand, cache: &FirmwareCache) -> anyhow::Result<()> {
    match command {
        FirmwareCommand::Import { file } => {
            let blob = cache
                .import(&file)
                .await
                .with_context(|| format!("{} was not imported", file.display()))?;
            outln!(
                "Imported {} as {} ({} bytes)",
                file.display(),
                blob.sha256,
                blob.size
            );
        }
        FirmwareCommand::List { json } => {
            let answer = serde_json::json!({
                "blobs": cache.list().await?,
                "downloads": cache.pending().await?,
                "used_bytes": cache.used_bytes(),
                "budget_bytes": cache.config().max_bytes,
            });
            if json {
                outln!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print_list(&answer)?;
            }
        }
        FirmwareCommand::Link { .. } => {
            bail!(
                "links are signed with the running gateway's key and name its listener: start \
                 it (outpost run) and ask again"
            );
        }
        FirmwareCommand::Remove { sha256 } => {
            cache.remove(sha256).await?;
            outln!("Removed {sha256}");
        }
        FirmwareCommand::Pin { sha256, holder } => {
            cache.pin(sha256, &holder).await?;
            outln!("Pinned {sha256} for {holder}");
        }
        FirmwareCommand::Unpin { sha256, holder } => {
            cache.unpin(sha256, &holder).await?;
            outln!("Unpinned {sha256} for {holder}");
        }
        FirmwareCommand::Manifest(ManifestCommand::Add { file }) => {
            let jws = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let verified = cache
                .add_manifest(&jws)
                .await
                .with_context(|| format!("{} was refused", file.display()))?;
            outln!(
                "Accepted {} signed by {}",
                verified.manifest.update_id,
                verified.signer
            );
            let mut failed = 0;
            for file in &verified.manifest.files {
                if file.url.is_none() {
                    outln!(
                        "  {} {}: no url; import it with `outpost firmware import`",
                        file.sha256,
                        file.file_name
                    );
                    continue;
                }
                match cache.ensure(file.sha256).await {
                    Ok(blob) => outln!(
                        "  {} {}: cached ({} bytes)",
                        file.sha256,
                        file.file_name,
                        blob.size()
                    ),
                    Err(error) => {
                        failed += 1;
                        outln!("  {} {}: {error}", file.sha256, file.file_name);
                    }
                }
            }
            if failed > 0 {
                bail!(
                    "{failed} file(s) could not be downloaded; they are retried when the gateway runs or on the next request"
                );
            }
        }
        FirmwareCommand::Manifest(ManifestCommand::Sign { .. }) => unreachable!("handled before"),
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_list(answer: &serde_json::Value) -> anyhow::Result<()> {
    let empty = Vec::new();
    let blobs = answer["blobs"].as_array().unwrap_or(&empty);
    let used = answer["used_bytes"].as_u64().unwrap_or(0);
    let budget = answer["budget_bytes"].as_u64().unwrap_or(0);
    outln!(
        "{} file(s), {:.1} of {:.1} MiB",
        blobs.len(),
        mib(used),
        mib(budget)
    );
    for blob in blobs {
        let pins: Vec<&str> = blob["pins"]
            .as_array()
            .map(|p| p.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        outln!(
            "{}  {:>10} bytes  {:<8} served {:>12} bytes  {}{}",
            blob["sha256"].as_str().unwrap_or("?"),
            blob["size"].as_u64().unwrap_or(0),
            blob["source"].as_str().unwrap_or("?"),
            blob["bytes_served"].as_u64().unwrap_or(0),
            blob["origin"].as_str().unwrap_or("?"),
            if pins.is_empty() {
                String::new()
            } else {
                format!("  pinned by {}", pins.join(", "))
            }
        );
    }
    for download in answer["downloads"].as_array().unwrap_or(&empty) {
        outln!(
            "downloading {}: {} bytes so far, {} attempt(s){}",
            download["sha256"].as_str().unwrap_or("?"),
            download["have"].as_u64().unwrap_or(0),
            download["attempts"].as_u64().unwrap_or(0),
            download["last_error"]
                .as_str()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}
