//! `jetinfer`: the command-line producer. `jetinfer embed "text" ...` submits
//! one job with the given texts; without texts it reads stdin and submits one
//! job per line. Results are printed as JSON lines (or a short summary).
//! `jetinfer bulk` runs files through (`jetinfer_producer::bulk`), and
//! `jetinfer dlq` inspects dead letters.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use jetinfer_nats::NatsConfig;
use jetinfer_producer::{Client, ClientConfig, SubmitError};
use jetinfer_schemas::{Job, JobOptions, JobResult, Outcome, Truncation, Untrusted};
use serde_json::json;

#[derive(Parser)]
#[command(
    version,
    about = "Submit embedding jobs to jetinfer and print the results"
)]
struct Cli {
    /// NATS server URL (repeat for a cluster) [default: nats://127.0.0.1:4222].
    #[arg(long = "nats-url", env = "JETINFER_NATS_URL", value_delimiter = ',')]
    nats_urls: Vec<String>,
    /// TOML file whose `[nats]` table sets the connection: credentials,
    /// TLS, inbox prefix (a worker's config file has the same table).
    /// `JETINFER_NATS__*` variables override it, e.g.
    /// `JETINFER_NATS__AUTH__KIND=nkey JETINFER_NATS__AUTH__SEED_FILE=/run/secrets/seed`.
    #[arg(long, env = "JETINFER_NATS_CONFIG")]
    nats_config: Option<std::path::PathBuf>,
    /// Tenant the jobs are submitted for.
    #[arg(long, env = "JETINFER_TENANT", default_value = "default")]
    tenant: String,
    /// Seconds to wait for each result.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed texts given as arguments (one job), or stdin lines (a job per line).
    Embed(EmbedArgs),
    /// Score documents against a query with a cross-encoder model (one
    /// rerank job); prints them best first.
    Rerank(RerankArgs),
    /// Inspect and replay dead letters: jobs given up on, with the reason.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Bulk runs: a JSONL file of texts in, a JSONL file of embeddings out,
    /// resumable.
    #[command(subcommand)]
    Bulk(BulkCommand),
}

#[derive(Subcommand)]
enum BulkCommand {
    /// Submit every line of --input and write the results to --output.
    /// Running the same command again resumes the run: lines with a result
    /// are kept, only the rest is submitted.
    Submit(BulkSubmitArgs),
    /// Counts of a run: queued, done, failed, cancelled.
    Status {
        run: String,
        /// Print the counts as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a run: its queued jobs are answered `cancelled`, not computed.
    Cancel { run: String },
}

#[derive(Args)]
struct BulkSubmitArgs {
    /// JSONL input: {"custom_id": "...", "text": "..."} or "texts": [...],
    /// optionally "model" and "options" per line.
    #[arg(long)]
    input: PathBuf,
    /// JSONL output: one line per input line with a result.
    #[arg(long)]
    output: PathBuf,
    /// JSONL errors: refused lines (with their line number) and error replies.
    /// Default: the output name with `.errors` before its extension.
    #[arg(long)]
    errors: Option<PathBuf>,
    /// Run id (up to 26 of A-Z a-z 0-9 - _). Default: the id kept in
    /// `<output>.run`, or a new one written there.
    #[arg(long)]
    run_id: Option<String>,
    /// Model of lines that name none.
    #[arg(long, default_value = "minilm")]
    model: String,
    /// Most jobs awaiting results at once.
    #[arg(long, default_value_t = jetinfer_producer::bulk::DEFAULT_IN_FLIGHT)]
    in_flight: usize,
    /// Progress display: a bar on a terminal, plain lines otherwise.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    progress: ProgressArg,
    /// Seconds between plain progress lines.
    #[arg(long, default_value_t = 5.0)]
    progress_every: f64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProgressArg {
    Auto,
    Bar,
    Lines,
    Off,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One line per dead letter: sequence, job id, reason, deliveries,
    /// subject, `whole` or `truncated` (the letter keeps only the first bytes
    /// of its job), detail.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Everything kept about one dead letter, as JSON.
    Show { sequence: u64 },
    /// Publish dead letters again on their original subject and remove them.
    /// A truncated letter is refused (exit status 1): it no longer holds its job.
    Replay {
        /// Sequences to replay.
        sequences: Vec<u64>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "sequences")]
        all: bool,
    },
}

#[derive(Args)]
struct EmbedArgs {
    /// Texts to embed together in one job. Without any, stdin is read.
    texts: Vec<String>,
    /// Model name (the worker's `model.name`).
    #[arg(long, default_value = "minilm")]
    model: String,
    /// Return raw mean-pooled vectors instead of unit-length ones.
    #[arg(long)]
    no_normalize: bool,
    /// Refuse over-long inputs instead of truncating them.
    #[arg(long)]
    reject_long: bool,
    /// Keep the first N dimensions of each embedding (re-normalised unless
    /// --no-normalize); more than the model's width is refused.
    #[arg(long, value_name = "N")]
    dimensions: Option<u32>,
    /// Jobs awaiting results at once when reading stdin.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Print one human-readable line per input instead of JSON.
    #[arg(long)]
    summary: bool,
}

#[derive(Args)]
struct RerankArgs {
    /// The query the documents are scored against.
    query: String,
    /// The documents, at least one.
    #[arg(required = true)]
    documents: Vec<String>,
    /// Model name of a worker serving a cross-encoder (its `model.name`).
    #[arg(long)]
    model: String,
    /// Print only the N best documents.
    #[arg(long)]
    top_n: Option<u32>,
    /// Refuse pairs longer than the model takes instead of truncating them.
    #[arg(long)]
    reject_long: bool,
    /// Print one human-readable line per document instead of JSON.
    #[arg(long)]
    summary: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut nats = NatsConfig::load(
        NatsConfig {
            name: "jetinfer-cli".into(),
            ..NatsConfig::default()
        },
        cli.nats_config.as_deref(),
    )
    .context("loading the NATS connection settings")?;
    if !cli.nats_urls.is_empty() {
        nats.urls = cli.nats_urls;
    }
    let config = ClientConfig {
        nats,
        tenant: cli.tenant,
        timeout: Duration::from_secs_f64(cli.timeout),
        ..ClientConfig::default()
    };
    match cli.command {
        Command::Embed(args) => {
            let client = Client::connect(config)
                .await
                .context("connecting to NATS")?;
            embed(&client, args).await
        }
        Command::Rerank(args) => {
            let client = Client::connect(config)
                .await
                .context("connecting to NATS")?;
            rerank(&client, args).await
        }
        Command::Bulk(command) => bulk(&config, command).await,
        Command::Dlq(command) => {
            let nats = jetinfer_nats::connect(&config.nats).await?;
            dlq(&async_nats::jetstream::new(nats), command).await
        }
    }
}

/// `jetinfer bulk ...`. Submit prints its summary as one JSON object on
/// stdout and exits 1 when any line ended in the error file or the run was
/// cancelled.
async fn bulk(
    config: &ClientConfig,
    command: BulkCommand,
) -> anyhow::Result<std::process::ExitCode> {
    use jetinfer_producer::bulk::{self, ProgressMode};
    match command {
        BulkCommand::Submit(args) => {
            let every = Duration::from_secs_f64(args.progress_every.max(0.1));
            let progress = match args.progress {
                ProgressArg::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
                ProgressArg::Auto | ProgressArg::Lines => ProgressMode::Lines(every),
                ProgressArg::Bar => ProgressMode::Bar,
                ProgressArg::Off => ProgressMode::Off,
            };
            let options = bulk::SubmitOptions {
                input: args.input,
                output: args.output,
                errors: args.errors,
                run_id: args.run_id,
                model: args.model,
                in_flight: args.in_flight,
                progress,
            };
            let errors = options
                .errors
                .clone()
                .unwrap_or_else(|| bulk::errors_path(&options.output));
            let summary = tokio::select! {
                summary = bulk::submit(config, options) => summary?,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("jetinfer bulk: interrupted; run the same command again to resume");
                    return Ok(std::process::ExitCode::from(130));
                }
            };
            println!("{}", serde_json::to_string(&summary)?);
            eprintln!(
                "jetinfer bulk {}: {} lines: {} ok, {} failed, {} refused ({} already done, {} recovered from the results stream, {} submitted now); {:.1} s, {:.0} lines/s",
                summary.run,
                summary.lines,
                summary.ok,
                summary.failed,
                summary.refused,
                summary.already_done,
                summary.recovered,
                summary.submitted,
                summary.seconds,
                summary.lines_per_s,
            );
            if summary.cancelled {
                eprintln!("jetinfer bulk {}: cancelled", summary.run);
            }
            if summary.failed + summary.refused > 0 {
                eprintln!("jetinfer bulk {}: see {}", summary.run, errors.display());
            }
            let clean = !summary.cancelled && summary.failed + summary.refused == 0;
            Ok(if clean {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        BulkCommand::Status { run, json } => {
            let status = bulk::status(config, &run).await?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                print_status(&status);
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        BulkCommand::Cancel { run } => {
            let status = bulk::cancel(config, &run).await?;
            println!("cancelled run {run}: its queued jobs will be answered `cancelled`");
            print_status(&status);
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn print_status(status: &jetinfer_producer::bulk::RunStatus) {
    let or_unknown = |n: Option<u64>| n.map_or_else(|| "?".to_string(), |n| n.to_string());
    let state = match (&status.record, status.cancelled) {
        (_, true) => "cancelled".to_string(),
        (Some(record), false) => record.state.to_string(),
        (None, false) => "no record (never submitted here, or aged out)".to_string(),
    };
    println!("run {}  state {state}", status.run);
    if let Some(record) = &status.record {
        println!(
            "input {}  output {}  lines {}",
            record.input, record.output, record.lines
        );
    }
    println!(
        "queued {}  done {}  failed {}  cancelled {}  refused {}  not submitted {}",
        or_unknown(status.queued),
        status.done,
        status.failed,
        status.cancelled_jobs,
        or_unknown(status.refused),
        or_unknown(status.not_submitted),
    );
}

async fn dlq(
    js: &async_nats::jetstream::Context,
    command: DlqCommand,
) -> anyhow::Result<std::process::ExitCode> {
    use jetinfer_nats::dead_letter;
    match command {
        DlqCommand::List { limit } => {
            for letter in dead_letter::list(js, limit).await? {
                let kept = if letter.truncation().is_some() {
                    "truncated"
                } else {
                    "whole"
                };
                // A letter's fields came off the wire (an undecodable job's
                // id, a hostile subject): escaped, so none can forge a line
                // or drive the operator's terminal.
                println!(
                    "{}\t{}\t{}\t{} deliveries\t{}\t{kept}\t{}",
                    letter.sequence,
                    Untrusted(&letter.job_id),
                    Untrusted(&letter.reason),
                    letter.deliveries,
                    Untrusted(&letter.original_subject),
                    Untrusted(&letter.detail)
                );
            }
        }
        DlqCommand::Show { sequence } => {
            let letter = dead_letter::get(js, sequence).await?;
            let truncation = letter.truncation();
            let job = if letter.payload_truncated {
                json!({"not_decoded": "the letter keeps only the payload's first bytes"})
            } else {
                jetinfer_schemas::decode_job(&letter.payload, &Default::default())
                    .map(|job| json!(job))
                    .unwrap_or_else(|err| {
                        json!({"undecodable": err.to_string(), "bytes": letter.payload.len()})
                    })
            };
            let headers: serde_json::Map<String, serde_json::Value> = letter
                .headers
                .iter()
                .map(|(name, values)| {
                    let name: &str = name.as_ref();
                    let values: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
                    (name.to_string(), json!(values))
                })
                .collect();
            let shown = json!({
                "sequence": letter.sequence,
                "job_id": letter.job_id,
                "reason": letter.reason,
                "detail": letter.detail,
                "deliveries": letter.deliveries,
                "original_subject": letter.original_subject,
                "stored_at": letter.stored_at.to_string(),
                "stream_sequence": letter.stream_sequence,
                "payload": {
                    "kept_bytes": letter.payload.len(),
                    "original_bytes": letter.original_size,
                    "original_sha256": letter.original_sha256,
                    "truncated": letter.payload_truncated,
                },
                "headers_truncated": letter.headers_truncated,
                "replayable": truncation.is_none(),
                "truncation": truncation,
                "headers": headers,
                "job": job,
            });
            println!("{}", serde_json::to_string_pretty(&shown)?);
        }
        DlqCommand::Replay { sequences, all } => {
            let sequences = if all {
                dead_letter::list(js, usize::MAX)
                    .await?
                    .into_iter()
                    .map(|l| l.sequence)
                    .collect()
            } else {
                sequences
            };
            // A letter that does not keep its job whole is refused, and the
            // others are still replayed; the exit status says some were not.
            let mut refused = 0;
            for sequence in sequences {
                match dead_letter::replay(js, sequence).await {
                    Ok(job_id) => println!("replayed {sequence} (job {job_id})"),
                    Err(err @ dead_letter::DeadLetterError::Truncated { .. }) => {
                        eprintln!("refused: {err}");
                        refused += 1;
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            if refused > 0 {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Embeds and prints; the exit code is 1 when any job failed (each failure is
/// printed with its code).
async fn embed(client: &Client, args: EmbedArgs) -> anyhow::Result<std::process::ExitCode> {
    let options = JobOptions {
        normalize: !args.no_normalize,
        truncation: if args.reject_long {
            Truncation::Reject
        } else {
            Truncation::Truncate
        },
        dimensions: args.dimensions,
    };
    let jobs: Vec<Job> = if args.texts.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .map(|line| Ok(Job::new(&args.model, vec![line?]).with_options(options)))
            .collect::<std::io::Result<_>>()
            .context("reading stdin")?
    } else {
        vec![Job::new(&args.model, args.texts.clone()).with_options(options)]
    };

    let mut failures = 0usize;
    let mut out = std::io::stdout().lock();
    let mut results = client.submit_many(jobs, args.concurrency);
    while let Some((job_id, outcome)) = results.next().await {
        let line = match outcome {
            Ok(result) => {
                failures += usize::from(matches!(result.outcome, Outcome::Error(_)));
                render(&result, args.summary)
            }
            Err(err) => {
                failures += 1;
                let code = submit_error_code(&err);
                if args.summary {
                    format!("{job_id}  error {code}: {err}")
                } else {
                    json!({"job_id": job_id, "error": {"code": code, "message": err.to_string()}})
                        .to_string()
                }
            }
        };
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    if failures > 0 {
        eprintln!("jetinfer: {failures} job(s) failed");
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Reranks and prints; the exit code is 1 when the job failed.
async fn rerank(client: &Client, args: RerankArgs) -> anyhow::Result<std::process::ExitCode> {
    let options = JobOptions {
        truncation: if args.reject_long {
            Truncation::Reject
        } else {
            Truncation::Truncate
        },
        ..JobOptions::default()
    };
    let job = Job::rerank(&args.model, &args.query, args.documents.clone(), args.top_n)
        .with_options(options);
    let job_id = job.id.clone();
    let line = match client.submit(job).await {
        Ok(result) => {
            let failed = !matches!(result.outcome, Outcome::Reranked(_));
            let line = if args.summary {
                render_rerank_summary(&result, &args.documents)
            } else {
                render(&result, false)
            };
            println!("{line}");
            if failed {
                return Ok(std::process::ExitCode::FAILURE);
            }
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Err(err) => {
            let code = submit_error_code(&err);
            json!({"job_id": job_id, "error": {"code": code, "message": err.to_string()}})
                .to_string()
        }
    };
    println!("{line}");
    Ok(std::process::ExitCode::FAILURE)
}

/// One line per document, best first: rank, score, index, the document's start.
fn render_rerank_summary(result: &JobResult, documents: &[String]) -> String {
    match &result.outcome {
        Outcome::Reranked(r) => r
            .results
            .iter()
            .enumerate()
            .map(|(rank, s)| {
                let text = documents.get(s.index as usize).map_or("", String::as_str);
                let head: String = text.chars().take(60).collect();
                format!("{:>3}. {:.4}  #{}  {head}", rank + 1, s.score, s.index)
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => render(result, true),
    }
}

fn submit_error_code(err: &SubmitError) -> &'static str {
    match err {
        SubmitError::UnknownModel(_) => "unknown_model",
        SubmitError::QueueFull => "queue_full",
        SubmitError::QuotaExceeded { .. } => "quota_exceeded",
        SubmitError::Timeout { .. } => "timeout",
        SubmitError::Subject(_) => "invalid_input",
        _ => "client_error",
    }
}

fn render(result: &JobResult, summary: bool) -> String {
    match (&result.outcome, summary) {
        (Outcome::Ok(e), false) => json!({
            "job_id": result.job_id,
            "model": e.model,
            "embeddings": e.embeddings,
            "token_counts": e.token_counts,
            "truncated": e.truncated,
            "timings": e.timings,
        })
        .to_string(),
        (Outcome::Error(err), false) => {
            json!({"job_id": result.job_id, "error": err}).to_string()
        }
        (Outcome::Ok(e), true) => e
            .embeddings
            .iter()
            .zip(&e.token_counts)
            .enumerate()
            .map(|(i, (v, tokens))| {
                let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:+.4}")).collect();
                format!(
                    "{}#{i}  {} dims  {tokens:>3} tokens  [{} ...]  queue {:.1} ms, batch of {}, model {:.1} ms",
                    result.job_id,
                    v.len(),
                    head.join(", "),
                    e.timings.queue_wait_us as f64 / 1000.0,
                    e.timings.batch_size,
                    e.timings.inference_us as f64 / 1000.0,
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        (Outcome::Error(err), true) => format!("{}  error {}: {}", result.job_id, err.code, err.message),
        (Outcome::Reranked(r), false) => json!({
            "job_id": result.job_id,
            "model": r.model,
            "results": r.results,
            "token_counts": r.token_counts,
            "truncated": r.truncated,
            "timings": r.timings,
        })
        .to_string(),
        (Outcome::Reranked(r), true) => r
            .results
            .iter()
            .map(|s| format!("{}#{}  score {:.4}  logit {:+.4}", result.job_id, s.index, s.score, s.logit))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}
