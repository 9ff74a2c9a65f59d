//! `jetinfer-worker`: parses arguments and config, loads the model, and runs
//! the worker until SIGINT or SIGTERM, then drains and exits.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use jetinfer_worker::config::WorkerConfig;
use jetinfer_worker::http::{Health, HttpServer};
use jetinfer_worker::{load_backend, Worker};

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
    if args.print_config {
        println!("{}", config_dump(&config)?);
        return Ok(());
    }
    tracing::info!(config = ?config, "starting");

    // Serve /healthz first: a startup probe waits on it while the model loads.
    let health = Health::default();
    let http = HttpServer::from_config(&config.http, health.clone()).await?;
    let model = config.model.clone();
    let backend = tokio::task::spawn_blocking(move || load_backend(&model))
        .await?
        .with_context(|| format!("loading model from {}", config.model.path.display()))?;
    let mut worker = Worker::start_with_health(config, backend, health).await?;

    let shutdown = worker.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing jobs in hand");
        shutdown.cancel();
    });
    worker.join().await;
    http.stop().await;
    tracing::info!("stopped");
    Ok(())
}

fn config_dump(config: &WorkerConfig) -> anyhow::Result<String> {
    // Secrets are file paths in the config, never values, so the dump is safe.
    Ok(serde_json::to_string_pretty(config)?)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
