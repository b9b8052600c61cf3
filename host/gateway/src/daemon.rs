//! `outpost run`: wires the gateway together and runs it until SIGINT or SIGTERM.

use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use outpost_store::Store;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::api::{self, AdminToken, ApiState, GatewayInfo, Health, TokenOrigin};
use crate::config::Config;
use crate::onboarding::{self, OnboardingStatus};

/// The file in the state directory that names the running gateway's API address.
pub(crate) const API_ADDRESS_FILE: &str = "api-address";
/// The lock file a running gateway holds.
pub(crate) const LOCK_FILE: &str = "outpost.lock";

/// The API address of the gateway running on `state_dir`, if one runs.
pub(crate) fn running_gateway(state_dir: &Path) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Ok(file) = File::open(state_dir.join(LOCK_FILE)) else {
        return Ok(None);
    };
    match file.try_lock_shared() {
        Ok(()) => return Ok(None),
        Err(TryLockError::WouldBlock) => {}
        Err(TryLockError::Error(err)) => return Err(err).context("checking for a running gateway"),
    }
    let path = state_dir.join(API_ADDRESS_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("a gateway is running but {} cannot be read", path.display()))?;
    let addr: std::net::SocketAddr = text
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold an address", path.display()))?;
    Ok(Some(addr))
}

/// Runs the gateway. Returns once every task has stopped and the store is closed.
pub(crate) async fn run(config: Config, config_path: &Path) -> anyhow::Result<()> {
    // Listen for signals first: one that arrives during start-up still stops us cleanly.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;

    for warning in &config.warnings {
        tracing::warn!(config = %config_path.display(), "{warning}");
    }
    let state_dir = &config.gateway.state_dir;
    let _lock = StateDirLock::acquire(state_dir)?;
    let store = Store::open(config.database_path()).await?;

    let firmware = match outpost_cache::FirmwareCache::open(
        store.clone(),
        config.cache.cache_config(&config.firmware_dir()),
    )
    .await
    {
        Ok(cache) => cache,
        Err(err) => {
            store.close().await.context("closing the state database")?;
            return Err(err).context("cannot open the firmware cache");
        }
    };
    // The outbox's writer stops after every other task, so nothing queued during
    // shutdown is lost; it is closed before the store.
    let outbox_shutdown = CancellationToken::new();
    let (outbox, outbox_writer) = match outpost_uplink::Outbox::open(
        store.clone(),
        crate::uplink::outbox_limits(&config),
        outbox_shutdown.clone(),
    )
    .await
    {
        Ok(opened) => opened,
        Err(err) => {
            firmware
                .shutdown()
                .await
                .context("stopping the firmware cache")?;
            store.close().await.context("closing the state database")?;
            return Err(err).context("cannot open the outbox");
        }
    };
    let started = start(
        &config,
        config_path,
        store.clone(),
        firmware.clone(),
        outbox,
    )
    .await;
    let (tasks, shutdown) = match started {
        Ok(running) => running,
        Err(err) => {
            outbox_shutdown.cancel();
            let _ = outbox_writer.await;
            firmware
                .shutdown()
                .await
                .context("stopping the firmware cache")?;
            store.close().await.context("closing the state database")?;
            return Err(err);
        }
    };

    let reason = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        () = shutdown.cancelled() => "a task stopped",
    };
    tracing::info!(reason, "shutting down");
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    outbox_shutdown.cancel();
    if let Err(err) = outbox_writer.await {
        tracing::error!(error = %err, "the outbox writer failed");
    }
    // Downloads stop here; their partial files resume at the next start.
    firmware
        .shutdown()
        .await
        .context("stopping the firmware cache")?;
    store.close().await.context("closing the state database")?;
    tracing::info!("outpost stopped cleanly");
    Ok(())
}

/// Starts every task; returns their tracker and the token that stops them.
async fn start(
    config: &Config,
    config_path: &Path,
    store: Store,
    firmware: outpost_cache::FirmwareCache,
    outbox: outpost_uplink::Outbox,
) -> anyhow::Result<(TaskTracker, CancellationToken)> {
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let admin = match &config.api.admin_token {
        Some(secret) => {
            let token = AdminToken::new(secret.expose()).map_err(|why| {
                anyhow::anyhow!("api.admin_token in {}: {why}", config_path.display())
            })?;
            (token, TokenOrigin::Config)
        }
        None => AdminToken::load_or_generate(&config.gateway.state_dir)?,
    };
    let admin = match admin {
        (token, TokenOrigin::Generated(path)) => {
            announce_generated_token(&token, &path);
            token
        }
        (token, origin) => {
            tracing::debug!(?origin, "admin token loaded");
            token
        }
    };

    let (handlers, warnings) = crate::handler_cmd::open_registry(config).await?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let handlers = Arc::new(handlers);
    let installed = handlers.list();
    tracing::info!(
        count = installed.len(),
        handlers = %installed
            .iter()
            .map(|h| format!("{}@{}", h.manifest.name, h.manifest.version))
            .collect::<Vec<_>>()
            .join(","),
        "update handlers loaded"
    );

    let listener = api::bind(config.api.bind, config_path).await?;
    let addr = listener.local_addr()?;
    // Where `outpost handler install` finds this gateway (its port may be ephemeral).
    let address_file = config.gateway.state_dir.join(API_ADDRESS_FILE);
    std::fs::write(&address_file, format!("{addr}\n"))
        .with_context(|| format!("cannot write {}", address_file.display()))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the local API listens beyond this machine over plain HTTP: the admin token crosses \
             the network in the clear. Keep api.bind on 127.0.0.1 unless the site network is trusted"
        );
    }

    let onboarding = onboarding::probe(&config.ble).await;
    match &onboarding {
        OnboardingStatus::Disabled => {
            tracing::info!("BLE onboarding is disabled (ble.enabled = false)");
        }
        OnboardingStatus::NoAdapter { reason } => tracing::warn!(
            "{reason}: BLE onboarding is disabled. Set ble.enabled = false in {} to silence this",
            config_path.display()
        ),
        OnboardingStatus::Ready { adapter } => tracing::info!(adapter, "BLE onboarding ready"),
    }
    let stats = outbox.stats();
    let uplink = match &config.uplink {
        None => {
            tracing::info!(
                queued = stats.queued,
                "no [uplink] configured: running offline; messages for the cloud wait in the outbox"
            );
            None
        }
        Some(section) => {
            let settings = crate::uplink::settings(config, section);
            tracing::info!(endpoint = ?settings.endpoint, queued = stats.queued, "starting the uplink");
            let (uplink, task) =
                outpost_uplink::Uplink::spawn(settings, outbox.clone(), shutdown.clone());
            tasks.spawn(
                async move {
                    if let Err(err) = task.await {
                        tracing::error!(error = %err, "the uplink task failed");
                    }
                }
                .instrument(tracing::info_span!("task", name = "uplink")),
            );
            Some(uplink)
        }
    };

    let firmware_listener = bind_firmware(config.cache.bind, config_path).await?;
    let firmware_addr = firmware_listener.local_addr()?;
    firmware.resume_pending().await?;
    let onboarder = Arc::new(
        crate::onboard::Onboarder::new(config, store.clone(), uplink.clone())
            .context("onboarding settings ([onboarding] in the config)")?,
    );
    let links = outpost_cache::links::LinkSigner::new(url_key(&config.gateway.state_dir)?);
    onboarder.set_device_api(match &config.api.public_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!("http://{addr}"),
    });
    let rollouts = crate::rollout::Rollouts::new(
        store.clone(),
        firmware.clone(),
        Arc::clone(&handlers),
        outbox.clone(),
        crate::rollout::Mailbox::new(config.cache.public_url(firmware_addr), links.clone()),
        config.gateway.id.as_str().to_owned(),
    );
    let engine = rollouts.clone();
    let engine_shutdown = shutdown.clone();
    tasks.spawn(
        engine
            .run(engine_shutdown)
            .instrument(tracing::info_span!("task", name = "rollouts")),
    );
    let state = Arc::new(ApiState {
        onboarder,
        store,
        admin,
        health: Health {
            status: "ok",
            version: env!("CARGO_PKG_VERSION"),
            gateway: GatewayInfo {
                id: config.gateway.id.as_str().to_owned(),
                name: config.gateway.name.clone(),
            },
            uplink: if uplink.is_some() {
                "configured"
            } else {
                "offline"
            },
            onboarding,
            firmware_url: format!("http://{firmware_addr}"),
        },
        handlers,
        firmware: firmware.clone(),
        outbox,
        uplink,
        device_tokens: api::uplink::DeviceTokens::default(),
        rollouts,
    });
    let api_shutdown = shutdown.clone();
    tasks.spawn(
        async move {
            api::serve(listener, state, api_shutdown.clone()).await;
            // Whatever ended it, the gateway stops with its API.
            api_shutdown.cancel();
        }
        .instrument(tracing::info_span!("task", name = "local-api")),
    );
    let mut server_config = config.cache.server_config();
    server_config.links = Some(links.clone());
    let firmware_shutdown = shutdown.clone();
    let served = firmware.clone();
    tasks.spawn(
        async move {
            outpost_cache::server::serve(
                served,
                firmware_listener,
                server_config,
                firmware_shutdown.clone(),
                std::time::Duration::from_secs(5),
            )
            .await;
            firmware_shutdown.cancel();
        }
        .instrument(tracing::info_span!("task", name = "firmware-server")),
    );
    // Bytes served per device reach the store in batches, not per request.
    let accounting_shutdown = shutdown.clone();
    tasks.spawn(
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = accounting_shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(error) = firmware.flush_accounting().await {
                    tracing::warn!(%error, "recording firmware bytes served failed");
                }
            }
        }
        .instrument(tracing::info_span!("task", name = "firmware-accounting")),
    );
    tracing::info!(
        addr = %firmware_addr,
        "firmware server listening on http://{firmware_addr}/firmware/{{sha256}}"
    );
    tracing::info!(
        addr = %addr,
        gateway = config.gateway.id.as_str(),
        state_dir = %config.gateway.state_dir.display(),
        "local API listening on http://{addr}"
    );
    Ok((tasks, shutdown))
}

/// The key that signs firmware download URLs for devices (`url.key` in the state
/// directory, 32 random bytes, mode 0600), created on first use.
fn url_key(state_dir: &Path) -> anyhow::Result<[u8; 32]> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("url.key");
    match std::fs::read(&path) {
        Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
            anyhow::anyhow!(
                "{} does not hold a 32-byte key; delete it and a new one is made",
                path.display()
            )
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            file.write_all(&key)?;
            file.sync_all()?;
            Ok(key)
        }
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Binds the firmware server's address, with advice for the usual failures.
async fn bind_firmware(
    addr: std::net::SocketAddr,
    config_path: &Path,
) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|err| {
        let config = config_path.display();
        let advice = match err.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "the address is already in use; stop the other program or set cache.bind in {config}"
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "ports below 1024 need privileges; set cache.bind in {config} to a port above 1023"
            ),
            _ => format!("set cache.bind in {config}"),
        };
        anyhow::anyhow!("cannot start the firmware server on {addr}: {err}. {advice}")
    })
}

/// Shows a newly generated token once, on stdout and outside the log, so it reaches the
/// operator's terminal but not a log collector.
#[allow(clippy::print_stdout)]
fn announce_generated_token(token: &AdminToken, path: &Path) {
    println!(
        "Generated an admin API token and saved it to {} (mode 0600):\n\n    {}\n\n\
         It is shown only this once; read it again from that file.",
        path.display(),
        token.reveal()
    );
    tracing::info!(path = %path.display(), "generated an admin API token (shown once on stdout)");
}

/// Creates the state directory (mode 0700) and holds an exclusive lock on it, so two
/// gateways never share one state.
#[derive(Debug)]
struct StateDirLock {
    _file: File,
    path: PathBuf,
}

impl StateDirLock {
    fn acquire(state_dir: &Path) -> anyhow::Result<Self> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| {
                format!("cannot create the state directory {}", state_dir.display())
            })?;
        let path = state_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                anyhow::bail!(
                    "another outpost (pid {}) is running with the state directory {}; stop it \
                     first, or give this one its own gateway.state_dir",
                    holder.trim(),
                    state_dir.display()
                );
            }
            Err(TryLockError::Error(err)) => {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file, path })
    }
}

impl Drop for StateDirLock {
    fn drop(&mut self) {
        // The lock goes with the file handle; emptying the file just clears the stale pid.
        if let Ok(file) = OpenOptions::new().write(true).open(&self.path) {
            let _ = file.set_len(0);
        }
    }
}
