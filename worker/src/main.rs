//! `jetinfer-worker`: parses arguments and config, loads the model, and runs
//! the worker until SIGINT or SIGTERM, then drains and exits 0; or until the
//! worker fails on its own (a pipeline stage gone, the NATS connection lost),
//! then hands its jobs back and exits non-zero so an orchestrator restarts
//! it. Exit status: 0 stopped by a signal, 1 could not start,
//! 2 a pipeline stage gone, 3 the NATS connection lost
//! (`jetinfer_worker::supervise`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use jetinfer_worker::config::WorkerConfig;
use jetinfer_worker::http::{Health, HttpServer};
use jetinfer_worker::supervise::{panic_message, Failure};
use jetinfer_worker::Worker;

#[derive(Parser)]
#[command(
    version,
    about = "Pulls embedding jobs from NATS JetStream, batches them, runs the model, replies"
)]
struct Args {
    /// TOML config file; `JETINFER_*` environment variables override it.
    #[arg(long, short, env = "JETINFER_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<Failure>().is_some() => {
            let failure = err.downcast_ref::<Failure>().expect("checked above");
            eprintln!("jetinfer-worker: stopped: {failure}");
            ExitCode::from(failure.exit_code())
        }
        Err(err) => {
            // One line of causes; the Debug form `main` would print carries a
            // full backtrace whenever RUST_BACKTRACE is set and reads like a panic.
            eprintln!("jetinfer-worker: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = WorkerConfig::load(args.config.as_deref()).context("loading configuration")?;
    jetinfer_worker::logging::init(config.log.json);
    log_panics();
    if args.print_config {
        println!("{}", config_dump(&config)?);
        return Ok(());
    }
    tracing::info!(config = ?config, "starting");

    // Serve /healthz first: a startup probe waits on it while the models load.
    let health = Health::default();
    let http = HttpServer::from_config(&config.http, health.clone()).await?;
    // The builder loads every model (one failing names itself), then connects.
    let worker = Worker::builder(config).health(health).start().await?;

    let shutdown = worker.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing jobs in hand");
        shutdown.cancel();
    });
    let stopped = worker.run_until_stopped().await;
    http.stop().await;
    tracing::info!("stopped");
    Ok(stopped?)
}

/// Panics go to the log as one escaped, bounded line instead of the default
/// hook's raw text on stderr: a backend panic message may carry input text.
/// (The inference stage catches backend panics; this only says where.)
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            location = %info.location().map(|l| l.to_string()).unwrap_or_default(),
            panic = %panic_message(info.payload()),
            "panicked"
        );
    }));
}

/// The effective configuration: `models` lists every model served, each
/// complete (the one `[model]` when the file has no `[[models]]`).
fn config_dump(config: &WorkerConfig) -> anyhow::Result<String> {
    let mut shown = config.clone();
    shown.models = config.served();
    // Secrets are file paths in the config, never values, so the dump is safe.
    Ok(serde_json::to_string_pretty(&shown)?)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
