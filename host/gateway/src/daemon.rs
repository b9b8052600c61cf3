//! `outpost run`: wires the gateway together and runs it until SIGINT or SIGTERM.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use outpost_store::Store;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use outpost_onboarding::OnboardingStatus;

mod service;

use crate::api::{self, ApiState, GatewayInfo, Health};
use crate::config::Config;
use crate::state_dir::{API_ADDRESS_FILE, AdminToken, StateDirLock, TokenOrigin};

/// Runs the gateway. Returns once every task has stopped and the store is closed.
pub(crate) async fn run(config: Config, config_path: &Path) -> anyhow::Result<()> {
    // Listen for signals first: one that arrives during start-up still stops us cleanly.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;

    for warning in &config.warnings {
        tracing::warn!(config = %config_path.display(), "{warning}");
    }
    // The metrics recorder goes in before any engine starts counting.
    api::metrics::handle();
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
    let (outbox, outbox_writer) = match outpost_uplink::Outbox::open_with_lanes(
        store.clone(),
        crate::config::outbox_limits(&config),
        crate::config::outbox_lanes(&config),
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
    let (tasks, shutdown, registry) = match started {
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

    // Under systemd (Type=notify): ready now that every listener listens, and alive as
    // long as the state database answers.
    service::notify(&[NotifyState::Ready]);
    if let Some(every) = sd_notify::watchdog_enabled() {
        tasks.spawn(service::watchdog(every, store.clone(), shutdown.clone()));
    }
    let reason = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            () = shutdown.cancelled() => break "a task stopped",
            _ = sighup.recv() => service::reload(config_path, &registry, &firmware),
        }
    };
    service::notify(&[NotifyState::Stopping]);
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
) -> anyhow::Result<(
    TaskTracker,
    CancellationToken,
    Arc<outpost_runtime::HandlerRegistry>,
)> {
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

    // The handlers compile (or load from the precompile cache) after the API listens:
    // the gateway serves meanwhile, lists them as compiling, and rollouts wait for them.
    let (handlers, warnings) = outpost_runtime::HandlerRegistry::start(
        config.handlers_dir(),
        handler_runtime(config),
        config.handlers.trusted(),
    )?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let handlers = Arc::new(handlers);
    let registry = Arc::clone(&handlers);
    let found = handlers.summaries();
    tracing::info!(
        count = found.len(),
        handlers = %found
            .iter()
            .map(|h| format!("{}@{}", h.name, h.version))
            .collect::<Vec<_>>()
            .join(","),
        "update handlers found; loading them"
    );
    {
        let (handlers, shutdown) = (Arc::clone(&handlers), shutdown.clone());
        tasks.spawn(
            async move {
                // A shutdown stops a compile in flight (its child is killed).
                tokio::select! {
                    warnings = handlers.load_pending() => {
                        for warning in warnings {
                            tracing::warn!("{warning}");
                        }
                        let loaded = handlers.list();
                        tracing::info!(
                            count = loaded.len(),
                            handlers = %loaded
                                .iter()
                                .map(|h| format!("{}@{}", h.manifest.name, h.manifest.version))
                                .collect::<Vec<_>>()
                                .join(","),
                            "update handlers loaded"
                        );
                    }
                    () = shutdown.cancelled() => {}
                }
            }
            .instrument(tracing::info_span!("task", name = "handler-load")),
        );
    }

    let listener = bind(config.api.bind, "local API", "api.bind", config_path).await?;
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

    let onboarding =
        outpost_onboarding::probe(config.ble.enabled, config.ble.adapter.as_deref()).await;
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
    let inbox = outpost_uplink::DeploymentInbox::new(store.clone());
    let uplink = match &config.uplink {
        None => {
            tracing::info!(
                queued = stats.queued,
                "no [uplink] configured: running offline; messages for the cloud wait in the outbox"
            );
            None
        }
        Some(section) => {
            let settings = crate::config::uplink_settings(config, section);
            tracing::info!(endpoint = ?settings.endpoint, queued = stats.queued, "starting the uplink");
            let (uplink, task) = outpost_uplink::Uplink::spawn(
                settings,
                outbox.clone(),
                inbox.clone(),
                shutdown.clone(),
            );
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

    let firmware_listener = match config.cache.bind {
        Some(addr) => {
            let listener = bind(addr, "plain firmware server", "cache.bind", config_path).await?;
            let bound = listener.local_addr()?;
            Some((listener, bound))
        }
        None => None,
    };
    let plain_firmware_url = firmware_listener
        .as_ref()
        .map(|(_, bound)| config.cache.public_url(*bound));
    firmware.resume_pending().await?;
    // The device listener, and the site CA whose certificate it (and a TLS admin API)
    // presents; devices are handed the CA at onboarding.
    let devices = match &config.devices {
        Some(section) => {
            let listener =
                bind(section.bind, "device listener", "devices.bind", config_path).await?;
            let bound = listener.local_addr()?;
            Some((section, listener, bound))
        }
        None => None,
    };
    let mut names = devices
        .as_ref()
        .map(|(section, _, bound)| section.certificate_names(*bound))
        .unwrap_or_default();
    if config.api.tls {
        names.extend([
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            addr.ip().to_string(),
        ]);
        names.sort();
        names.dedup();
    }
    let pki = if config.api.tls || devices.as_ref().is_some_and(|(s, _, _)| !s.plain_http) {
        let dir = config.gateway.state_dir.join("tls");
        Some(
            outpost_serve::pki::SitePki::load_or_create(&dir, &names)
                .context("the site CA (gateway.state_dir/tls)")?,
        )
    } else {
        None
    };
    let devices_url = devices
        .as_ref()
        .map(|(section, _, bound)| section.public_url(*bound));
    let api_scheme = if config.api.tls { "https" } else { "http" };
    let device_api_url = match (&devices_url, &config.api.public_url) {
        (Some(url), _) => url.clone(),
        (None, Some(url)) => url.clone(),
        (None, None) => format!("{api_scheme}://{addr}"),
    };
    let mut onboarder = outpost_onboarding::Onboarder::new(
        config.onboarding_settings(),
        store.clone(),
        uplink.clone(),
        device_api_url.clone(),
    )
    .context("onboarding settings ([onboarding] in the config)")?;
    if device_api_url.starts_with("https://")
        && let Some(pki) = &pki
    {
        onboarder = onboarder.with_device_api_ca(pki.ca_pem().to_owned());
    }
    let onboarder = Arc::new(onboarder);
    // The key that signs firmware download links for devices.
    let key_file = config.gateway.state_dir.join("url.key");
    // Onboarding runs in flight stop with the gateway.
    let stopping = Arc::clone(&onboarder);
    let onboarding_shutdown = shutdown.clone();
    tasks.spawn(
        async move {
            onboarding_shutdown.cancelled().await;
            stopping.shutdown().await;
        }
        .instrument(tracing::info_span!("task", name = "onboarding")),
    );
    let links = outpost_cache::links::LinkSigner::load_or_create(&key_file)
        .with_context(|| format!("the download-link key {}", key_file.display()))?;
    let rollouts = outpost_rollout::Rollouts::new(
        store.clone(),
        firmware.clone(),
        Arc::clone(&handlers),
        outbox.clone(),
        inbox,
        // Devices download where they reach the gateway: the device listener, else the
        // plain firmware listener, else the API listener (which serves /firmware/ too).
        outpost_rollout::Mailbox::new(
            devices_url
                .clone()
                .or_else(|| plain_firmware_url.clone())
                .unwrap_or_else(|| device_api_url.clone()),
            links.clone(),
        ),
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
            firmware_url: plain_firmware_url.clone(),
            devices_url: devices_url.clone(),
        },
        handlers,
        firmware: firmware.clone(),
        outbox,
        uplink,
        rollouts,
        links: links.clone(),
        require_signed_links: config.cache.require_signed_links,
    });
    let api_shutdown = shutdown.clone();
    let api_limits = config.api.limits();
    let api_tls = pki
        .as_ref()
        .filter(|_| config.api.tls)
        .map(|p| p.acceptor());
    let api_state = Arc::clone(&state);
    if let Some((section, listener, bound)) = devices {
        let tls = pki
            .as_ref()
            .filter(|_| !section.plain_http)
            .map(|p| p.acceptor());
        if tls.is_none() {
            tracing::warn!(
                "devices.plain_http = true: device tokens and firmware cross the site network in the clear"
            );
        }
        let url = devices_url.clone().unwrap_or_default();
        tracing::info!(addr = %bound, url, "device listener listening on {url}");
        let (limits, state, stop) = (section.limits(), Arc::clone(&state), shutdown.clone());
        tasks.spawn(
            async move {
                api::serve_devices(listener, tls, limits, state, stop.clone()).await;
                stop.cancel();
            }
            .instrument(tracing::info_span!("task", name = "device-listener")),
        );
    }
    tasks.spawn(
        async move {
            api::serve(
                listener,
                api_tls,
                api_limits,
                api_state,
                api_shutdown.clone(),
            )
            .await;
            // Whatever ended it, the gateway stops with its API.
            api_shutdown.cancel();
        }
        .instrument(tracing::info_span!("task", name = "local-api")),
    );
    if !config.cache.require_signed_links {
        tracing::warn!(
            "cache.require_signed_links = false: anyone who reaches a firmware listener can fetch any cached firmware by its hash"
        );
    }
    if let Some((listener, firmware_addr)) = firmware_listener {
        let mut server_config = config.cache.server_config();
        server_config.links = Some(links.clone());
        let firmware_shutdown = shutdown.clone();
        let served = firmware.clone();
        tasks.spawn(
            async move {
                outpost_cache::server::serve(
                    served,
                    listener,
                    server_config,
                    firmware_shutdown.clone(),
                )
                .await;
                firmware_shutdown.cancel();
            }
            .instrument(tracing::info_span!("task", name = "firmware-server")),
        );
        tracing::info!(
            addr = %firmware_addr,
            "firmware server listening on http://{firmware_addr}/firmware/{{sha256}}"
        );
    }
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
        addr = %addr,
        gateway = config.gateway.id.as_str(),
        state_dir = %config.gateway.state_dir.display(),
        "local API listening on http://{addr}"
    );
    Ok((tasks, shutdown, registry))
}

/// Opens the installed-handler registry of the config's state directory; the warnings
/// name installed handlers that no longer load.
pub(crate) async fn open_registry(
    config: &Config,
) -> anyhow::Result<(outpost_runtime::HandlerRegistry, Vec<String>)> {
    Ok(outpost_runtime::HandlerRegistry::open(
        config.handlers_dir(),
        handler_runtime(config),
        config.handlers.trusted(),
    )
    .await?)
}

/// The handler runtime of the config. Components are compiled by this binary in a
/// child process (`outpost compile-handler`), so the compiler's memory (some 300 MB for
/// a CPython guest) goes back to the system when it exits. The engine is set up when the
/// first handler loads: a gateway without handlers never maps wasmtime's code.
fn handler_runtime(config: &Config) -> Arc<outpost_runtime::Runtime> {
    let mut settings = config.handlers.runtime_config();
    // /proc/self/exe runs this very build even after a package upgrade replaced the file.
    let this_program = Path::new("/proc/self/exe");
    let program = if this_program.exists() {
        Ok(this_program.to_path_buf())
    } else {
        std::env::current_exe()
    };
    match program {
        Ok(program) => {
            settings.compiler = outpost_runtime::Compiler::Child {
                program,
                args: vec!["compile-handler".to_owned()],
            };
        }
        Err(err) => tracing::warn!(
            error = %err,
            "cannot find this program to compile handlers in a child; compiling in process"
        ),
    }
    Arc::new(outpost_runtime::Runtime::deferred(settings))
}

/// Binds a listener for `what` (the config key `key` sets its address), turning the
/// usual failures into advice.
async fn bind(
    addr: std::net::SocketAddr,
    what: &str,
    key: &str,
    config_path: &Path,
) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|err| {
        let config = config_path.display();
        let advice = match err.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "the address is already in use (another outpost, or another program, listens \
                 there). Stop it, or set {key} in {config} to a free address"
            ),
            std::io::ErrorKind::AddrNotAvailable => format!(
                "{} is not an address of this machine; set {key} in {config}",
                addr.ip()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "ports below 1024 need privileges; set {key} in {config} to a port above 1023"
            ),
            _ => format!("set {key} in {config}"),
        };
        anyhow::anyhow!("cannot start the {what} on {addr}: {err}. {advice}")
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
