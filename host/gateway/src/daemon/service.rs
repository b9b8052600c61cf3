//! Running under systemd: readiness and watchdog notifications (`Type=notify`,
//! `WatchdogSec=`), and SIGHUP, which reloads the trusted keys from the config.

use std::path::Path;
use std::time::Duration;

use outpost_store::Store;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Tells the service manager `states`, when there is one (`NOTIFY_SOCKET`); a failure
/// to tell it is logged, never fatal.
pub(crate) fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

/// Pings the watchdog twice per `every` while the state database answers within half of
/// it: a gateway whose store hangs is restarted by systemd instead of lingering.
pub(crate) async fn watchdog(every: Duration, store: Store, shutdown: CancellationToken) {
    let half = every / 2;
    let mut tick = tokio::time::interval(half);
    tracing::info!(?every, "systemd watchdog enabled");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match tokio::time::timeout(half, store.call(|_| Ok(()))).await {
            Ok(Ok(())) => notify(&[NotifyState::Watchdog]),
            Ok(Err(error)) => {
                tracing::error!(%error, "the state database fails; not pinging the watchdog");
            }
            Err(_) => {
                tracing::error!(
                    ?half,
                    "the state database did not answer; not pinging the watchdog"
                );
            }
        }
    }
}

/// SIGHUP: reads the config again and puts its trusted vendor keys and manifest signers
/// in force. A config that does not load changes nothing.
pub(crate) fn reload(
    config_path: &Path,
    registry: &outpost_runtime::HandlerRegistry,
    firmware: &outpost_cache::FirmwareCache,
) {
    notify(&[NotifyState::Reloading]);
    match Config::load(config_path) {
        Err(error) => tracing::error!(
            %error,
            "SIGHUP: the config does not load; the trusted keys in force stay"
        ),
        Ok(config) => {
            let vendors = config.handlers.trusted();
            let signers = config
                .cache
                .cache_config(&config.firmware_dir())
                .trusted_signers;
            let (vendor_count, signer_count) = (vendors.len(), signers.len());
            let withdrawn = registry.set_trusted(vendors);
            firmware.set_trusted_signers(signers);
            tracing::info!(
                vendors = vendor_count,
                signers = signer_count,
                ?withdrawn,
                "SIGHUP: trusted keys reloaded"
            );
        }
    }
    notify(&[NotifyState::Ready]);
}
