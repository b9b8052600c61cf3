//! `outpost`: the site gateway binary.
//!
//! `outpost run` starts the gateway on `gateway-config/outpost.toml` (or `--config FILE`);
//! `outpost config check` validates a config and prints it with secrets redacted;
//! `outpost devices list` reads the device lobby from the state database;
//! `outpost handler …` builds, signs, verifies and installs vendor update handlers;
//! `outpost onboard …` imports a device manifest and onboards the devices.

mod api;
mod cli;
mod config;
mod daemon;
mod logging;
mod malloc;
mod state_dir;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if cli.runs_the_daemon() {
        malloc::tune();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outpost-worker")
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::dispatch(cli)) {
        Ok(code) => code,
        Err(err) if cli::quiet_on_closed_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            if tracing::dispatcher::has_been_set() {
                tracing::error!(error = format!("{err:#}"), "outpost stopped with an error");
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
