//! The `jetinfer-gateway` binary: reads the config, starts the gateway,
//! reloads keys and the TLS certificate on SIGHUP, and drains on SIGTERM or
//! Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use jetinfer_gateway::config::GatewayConfig;
use jetinfer_gateway::Gateway;

#[derive(Parser)]
#[command(version, about = "OpenAI-compatible HTTP gateway for jetinfer")]
struct Args {
    /// TOML config file; `JETINFER_GATEWAY_*` variables override it.
    #[arg(long, short, env = "JETINFER_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective config (paths only: no secret is ever in it) and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("jetinfer-gateway: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let args = Args::parse();
    let config = GatewayConfig::load(args.config.as_deref())?;
    if args.print_config {
        // Secrets are file paths in the config, never values.
        println!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let keys = config.keys_file.clone();
    let jwks = config.jwt.as_ref().map(|j| j.jwks_file.clone());
    let gateway = Gateway::start(config).await?;
    let credentials = gateway.state.credentials.clone();
    let tls_cert = gateway.tls_cert.clone();
    let stop = gateway.stop_token();
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                jetinfer_gateway::auth::reload_all(&credentials, keys.as_deref(), jwks.as_deref());
                if let Some(cert) = &tls_cert {
                    cert.reload_logged();
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("stopping: finishing requests in flight");
    stop.cancel();
    gateway.stopped().await;
    Ok(())
}
