//! `jetinfer-loadgen`: parses arguments into a [`Plan`] and runs it; prints
//! the summary table and exits 99 when a threshold fails (as k6 does), 1 on
//! an error (printed as one line of causes, without a backtrace).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use jetinfer_loadgen::http::{EncodingFormat, HttpTarget};
use jetinfer_loadgen::scenario::{self, Mode, Overrides};
use jetinfer_loadgen::{duration, raw, report, threshold, Plan, Target, Threshold, Via};
use jetinfer_nats::NatsConfig;

/// The corpus used when none is given, relative to the working directory.
const DEFAULT_CORPUS: &str = "../shared/data/bench_corpus.json";

#[derive(Parser)]
#[command(
    version,
    about = "Load tests for jetinfer: scenarios, HDR latency, thresholds, HTML reports"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario against a jetinfer deployment.
    Run(Box<RunArgs>),
    /// List the preset scenarios with their settings.
    Scenarios,
    /// Answer jobs with a bare JetStream consume-reply-ack loop (no worker
    /// pipeline, no model): the queue's ceiling to compare a worker against.
    RawResponder(TargetArgs),
}

#[derive(Args)]
struct TargetArgs {
    /// NATS server URL (repeat or comma-separate for a cluster) [default: nats://127.0.0.1:4222].
    #[arg(long = "nats-url", env = "JETINFER_NATS_URL", value_delimiter = ',')]
    nats_urls: Vec<String>,
    /// TOML file whose `[nats]` table sets the connection: credentials,
    /// TLS, inbox prefix; `JETINFER_NATS__*` variables override it.
    #[arg(long, env = "JETINFER_NATS_CONFIG")]
    nats_config: Option<PathBuf>,
    /// Model name the jobs address (the worker's `model.name`).
    #[arg(long, default_value = "minilm")]
    model: String,
}

#[derive(Args)]
struct RunArgs {
    /// Preset to start from: warm-up, light, medium, heavy, spike, soak, bulk.
    #[arg(long, short, default_value = "light")]
    scenario: String,
    /// TOML file overriding the preset (may name its own `scenario`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// How jobs are sent: nats (the producer's Client, straight onto
    /// JetStream) or http (one OpenAI `POST /v1/embeddings` per job to a
    /// gateway at --url, with the key in --api-key-file).
    #[arg(long = "target", default_value = "nats", value_parser = parse_target)]
    via: TargetKind,
    /// The gateway's base URL for --target http, e.g. http://127.0.0.1:8080.
    #[arg(long, required_if_eq("via", "http"))]
    url: Option<String>,
    /// A file holding the API key (first line) for --target http.
    #[arg(long, env = "JETINFER_API_KEY_FILE", required_if_eq("via", "http"))]
    api_key_file: Option<PathBuf>,
    /// `encoding_format` of each HTTP request: base64 (the OpenAI SDKs'
    /// default) or float.
    #[arg(long, default_value = "base64")]
    encoding_format: EncodingFormat,
    #[command(flatten)]
    target: TargetArgs,
    /// Tenant the jobs are submitted for (over NATS; over HTTP the key's).
    #[arg(long, env = "JETINFER_TENANT", default_value = "default")]
    tenant: String,
    /// closed (virtual users) or open (fixed arrival rate).
    #[arg(long, value_parser = parse_mode)]
    mode: Option<Mode>,
    /// Virtual users (closed loop); replaces a preset's ramp.
    #[arg(long)]
    users: Option<usize>,
    /// Pause between a user's result and its next job, e.g. 500ms.
    #[arg(long)]
    think_time: Option<String>,
    /// Jobs per second (implies --mode open unless --mode is given).
    #[arg(long)]
    rate: Option<f64>,
    /// Longest the run offers load, e.g. 30s, 10m.
    #[arg(long)]
    duration: Option<String>,
    /// Most jobs the run sends.
    #[arg(long)]
    max_jobs: Option<u64>,
    /// Open loop: most jobs awaiting results at once.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Longest one job waits for its result, e.g. 30s.
    #[arg(long)]
    timeout: Option<String>,
    /// Weights of the job kinds, e.g. single=70,small=25,large=5.
    #[arg(long)]
    mix: Option<String>,
    /// Texts to draw jobs from: a JSON list or JSONL file.
    #[arg(long, default_value = DEFAULT_CORPUS)]
    corpus: PathBuf,
    /// A pass/fail criterion, e.g. 'p95<250ms', 'errors<1%', 'jobs_per_s>=20'. Repeatable.
    #[arg(long = "threshold", short = 't')]
    thresholds: Vec<Threshold>,
    /// The worker's Prometheus endpoint, scraped before and after the run.
    #[arg(long)]
    metrics_url: Option<String>,
    /// A file holding the bearer token the worker's `/metrics` requires.
    #[arg(long, env = "JETINFER_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<PathBuf>,
    /// Directory for report.json, windows.csv and report.html.
    #[arg(long, default_value = "loadgen-report")]
    out: PathBuf,
    /// Length of a reporting window, e.g. 1s.
    #[arg(long, default_value = "1s")]
    window: String,
    /// Seed of the job mix, to repeat a run exactly.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum TargetKind {
    Nats,
    Http,
}

fn parse_target(text: &str) -> Result<TargetKind, String> {
    match text {
        "nats" => Ok(TargetKind::Nats),
        "http" => Ok(TargetKind::Http),
        other => Err(format!("{other:?}: expected nats or http")),
    }
}

fn parse_mode(text: &str) -> Result<Mode, String> {
    match text {
        "closed" => Ok(Mode::Closed),
        "open" => Ok(Mode::Open),
        other => Err(format!("{other:?}: expected closed or open")),
    }
}

/// Connection settings: the `[nats]` table of `--nats-config`, then
/// `JETINFER_NATS__*` variables, then `--nats-url`.
fn nats(target: &TargetArgs) -> anyhow::Result<NatsConfig> {
    let mut config = NatsConfig::load(
        NatsConfig {
            name: "jetinfer-loadgen".into(),
            ..NatsConfig::default()
        },
        target.nats_config.as_deref(),
    )
    .context("loading the NATS connection settings")?;
    if !target.nats_urls.is_empty() {
        config.urls = target.nats_urls.clone();
    }
    Ok(config)
}

fn plan(args: RunArgs) -> anyhow::Result<Plan> {
    let file = match &args.config {
        Some(path) => Some(Overrides::from_toml_file(path)?),
        None => None,
    };
    let preset = file
        .as_ref()
        .and_then(|f| f.scenario.clone())
        .unwrap_or(args.scenario);
    let mut scenario = scenario::preset(&preset)?;
    if let Some(file) = file {
        file.apply(&mut scenario)?;
    }
    Overrides {
        scenario: None,
        mode: args.mode,
        users: args.users,
        think_time: args.think_time,
        rate: args.rate,
        stages: None,
        duration: args.duration,
        max_jobs: args.max_jobs,
        max_in_flight: args.max_in_flight,
        timeout: args.timeout,
        mix: None,
    }
    .apply(&mut scenario)?;
    if let Some(mix) = &args.mix {
        scenario::set_mix_weights(&mut scenario.mix, mix)?;
    }
    scenario.validate()?;
    let via = match args.via {
        TargetKind::Nats => Via::Nats(nats(&args.target)?),
        TargetKind::Http => {
            let (Some(url), Some(key_file)) = (&args.url, &args.api_key_file) else {
                anyhow::bail!("--target http needs --url and --api-key-file");
            };
            Via::Http(HttpTarget::with_key_file(
                url,
                key_file,
                args.encoding_format,
            )?)
        }
    };
    Ok(Plan {
        scenario,
        target: Target {
            via,
            model: args.target.model,
            tenant: args.tenant,
        },
        corpus: args.corpus,
        thresholds: args.thresholds,
        metrics_url: args.metrics_url,
        metrics_token: args
            .metrics_token_file
            .as_deref()
            .map(|path| {
                jetinfer_loadgen::metrics::MetricsToken::from_file(path)
                    .with_context(|| format!("reading --metrics-token-file {}", path.display()))
            })
            .transpose()?,
        out_dir: Some(args.out),
        window: duration::parse(&args.window)?,
        seed: args.seed,
        progress: !args.quiet,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(err) => {
            // `{:#}`: the causes on one line. Returning the error from `main`
            // would print its Debug form, which includes a full backtrace
            // whenever RUST_BACKTRACE is set and reads like a panic.
            eprintln!("jetinfer-loadgen: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Scenarios => {
            for name in scenario::PRESETS {
                let s = scenario::preset(name)?;
                println!("{}", toml::to_string(&s).context("printing a preset")?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::RawResponder(target) => {
            let _responder = raw::RawResponder::start(&nats(&target)?, &target.model).await?;
            eprintln!(
                "raw responder answering jobs for model {}; Ctrl-C stops it",
                target.model
            );
            tokio::signal::ctrl_c().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let plan = plan(*args)?;
            eprintln!(
                "loadgen: scenario {} against {}",
                plan.scenario.name,
                plan.target.shown()
            );
            let (report, files) = jetinfer_loadgen::execute(&plan).await?;
            print!("{}", report::summary_table(&report));
            if let Some(files) = files {
                println!(
                    "report    {} ({} and {} beside it)",
                    files.html.display(),
                    files.json.display(),
                    files.csv.display()
                );
            }
            let status = threshold::exit_status(&report.thresholds);
            Ok(ExitCode::from(u8::try_from(status).unwrap_or(1)))
        }
    }
}
