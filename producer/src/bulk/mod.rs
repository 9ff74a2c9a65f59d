//! Bulk jobs for data pipelines: a JSONL file in, a JSONL file of results
//! out, resumable after a crash or Ctrl-C.
//!
//! A run has an id (`--run-id`, or a ULID kept in `<output>.run` beside the
//! output, so running the same command again resumes the same run). Every
//! line becomes one job with id `<run>:<custom_id>` (JetStream
//! de-duplicates a resubmission within the stream's duplicate window),
//! the `Jetinfer-Bulk-Run` header (so workers can skip a cancelled run),
//! and the run's inbox `results.<tenant>.bulk-<run>` as reply subject: the
//! results stream keeps what workers answer there while the submitter is
//! down.
//!
//! One invocation, in order:
//! 1. read the output and error files: `custom_id`s already there are done;
//! 2. replay the run's inbox from the results stream (an ordered consumer):
//!    results stored while no submitter ran are written out, not recomputed;
//! 3. stream the input ([`input`]), submitting each line that is not done,
//!    at most `in_flight` awaiting results (a permit is held from publish to
//!    result), waiting out a full jobs stream (`QueueFull`) rather than
//!    buffering;
//! 4. write each result as it arrives ([`output`]) until none is awaited.
//!
//! Memory: the lines in flight and a 64-bit key per `custom_id` (the done
//! and duplicate sets), never the input or the output.

pub mod input;
pub mod output;
pub mod progress;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use jetinfer_nats::bulk::{self, BulkStoreError, RunRecord, RunState};
use jetinfer_nats::subjects::{self, SubjectError, Tenant};
use jetinfer_nats::PublishJobError;
use jetinfer_schemas::{decode_result, ErrorCode, Job, JobError, Outcome};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::ClientConfig;
use input::Line;
pub use progress::ProgressMode;

/// Results awaited at once by default.
pub const DEFAULT_IN_FLIGHT: usize = 1024;
/// Publishes awaiting their PubAck at once.
const PUBLISH_CONCURRENCY: usize = 64;
/// Checked lines buffered between the reading thread and the submitter.
const LINE_BUFFER: usize = 256;
/// How often files are flushed and the run record is written.
const TICK: Duration = Duration::from_secs(1);
/// Back-off while the jobs stream is full or JetStream does not answer.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Subject(#[from] SubjectError),
    #[error(transparent)]
    Connect(#[from] jetinfer_nats::ConnectError),
    #[error(transparent)]
    Store(#[from] BulkStoreError),
    #[error("{state} belongs to run {run} over input {recorded}, not {given}: use the same --input to resume, or another --output for a new run")]
    OtherInput {
        state: PathBuf,
        run: String,
        recorded: String,
        given: String,
    },
    #[error("{state} belongs to run {recorded}, not {given}: leave out --run-id to resume it, or use another --output")]
    OtherRun {
        state: PathBuf,
        recorded: String,
        given: String,
    },
    #[error("run {0} was cancelled; its results so far are kept. Start a new run with another --output or --run-id")]
    Cancelled(String),
    #[error("reading the results stream: {0}")]
    Results(String),
    #[error("submitting {custom_id:?}: {source}")]
    Publish {
        custom_id: String,
        source: PublishJobError,
    },
}

/// What `jetinfer bulk submit` was asked to do.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Defaults to [`errors_path`] of the output.
    pub errors: Option<PathBuf>,
    /// Defaults to the id in `<output>.run`, or a new one.
    pub run_id: Option<String>,
    /// Model of lines that name none.
    pub model: String,
    pub in_flight: usize,
    pub progress: ProgressMode,
}

/// How an invocation went; also printed as JSON by the CLI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub run: String,
    /// Non-blank input lines.
    pub lines: u64,
    /// Lines with a result in the output file (all invocations).
    pub ok: u64,
    /// Lines whose job got an error reply, in the error file (all invocations).
    pub failed: u64,
    /// Lines refused before submission, in the error file.
    pub refused: u64,
    /// Lines found done in the output and error files at start.
    pub already_done: u64,
    /// Results read back from the results stream that no file had yet: work
    /// finished while no submitter was running.
    pub recovered: u64,
    /// Jobs published by this invocation.
    pub submitted: u64,
    /// Of those, how many JetStream already held (de-duplicated).
    pub deduplicated: u64,
    /// Results dropped because their `custom_id` was already written.
    pub duplicate_results: u64,
    pub cancelled: bool,
    pub seconds: f64,
    /// Lines finished by this invocation per second.
    pub lines_per_s: f64,
}

/// The error file used when none is given: `results.jsonl` ->
/// `results.errors.jsonl`.
pub fn errors_path(output: &Path) -> PathBuf {
    match (output.file_stem(), output.extension()) {
        (Some(stem), Some(ext)) => output.with_file_name(format!(
            "{}.errors.{}",
            stem.to_string_lossy(),
            ext.to_string_lossy()
        )),
        _ => PathBuf::from(format!("{}.errors", output.display())),
    }
}

/// Where a run's id is kept: `<output>.run`.
pub fn state_path(output: &Path) -> PathBuf {
    PathBuf::from(format!("{}.run", output.display()))
}

/// The job id of `custom_id` in `run`.
pub fn job_id(run: &str, custom_id: &str) -> String {
    format!("{run}:{custom_id}")
}

/// Keys `custom_id`s by a 64-bit hash for the done and duplicate sets
/// (random keys per process; a collision among a million ids has odds of
/// about 1 in 30 million).
#[derive(Clone, Default)]
pub struct CustomIdHasher(std::hash::RandomState);

impl CustomIdHasher {
    pub fn key(&self, custom_id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.0.hash_one(custom_id)
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    run_id: String,
    input: String,
}

/// The run id: the one in `<output>.run` (checking input and `--run-id`
/// agree with it), or `--run-id`, or a new ULID; written to `<output>.run`
/// before anything is submitted.
pub fn run_id(options: &SubmitOptions) -> Result<String, BulkError> {
    let state = state_path(&options.output);
    let io = |source| BulkError::Io {
        path: state.clone(),
        source,
    };
    let input = std::path::absolute(&options.input)
        .map_err(io)?
        .display()
        .to_string();
    if let Some(given) = &options.run_id {
        subjects::check_run_id(given)?;
    }
    match std::fs::read(&state) {
        Ok(bytes) => {
            let recorded: StateFile = serde_json::from_slice(&bytes)
                .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
            if let Some(given) = options.run_id.as_ref().filter(|g| **g != recorded.run_id) {
                return Err(BulkError::OtherRun {
                    state,
                    recorded: recorded.run_id,
                    given: given.clone(),
                });
            }
            if recorded.input != input {
                return Err(BulkError::OtherInput {
                    state,
                    run: recorded.run_id,
                    recorded: recorded.input,
                    given: input,
                });
            }
            subjects::check_run_id(&recorded.run_id)?;
            Ok(recorded.run_id)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let run_id = options
                .run_id
                .clone()
                .unwrap_or_else(|| ulid::Ulid::new().to_string());
            let record = StateFile {
                run_id: run_id.clone(),
                input,
            };
            let tmp = PathBuf::from(format!("{}.tmp", state.display()));
            std::fs::write(&tmp, serde_json::to_vec(&record).expect("serialises")).map_err(io)?;
            std::fs::rename(&tmp, &state).map_err(io)?;
            Ok(run_id)
        }
        Err(err) => Err(io(err)),
    }
}

/// State shared by the submitter and the result writer.
struct Shared {
    /// `custom_id` keys with a result or an error reply written.
    done: HashSet<u64>,
    /// Keys published (or being published) and not yet answered.
    in_flight: HashSet<u64>,
}

struct Context {
    js: jetstream::Context,
    tenant: Tenant,
    run: String,
    inbox: String,
    shared: Arc<Mutex<Shared>>,
    permits: Arc<Semaphore>,
}

/// A line refused by the submitter, for the writer to record.
struct Refusal {
    line: u64,
    custom_id: Option<String>,
    code: &'static str,
    message: String,
}

#[derive(Default)]
struct SubmitStats {
    submitted: u64,
    deduplicated: u64,
}

/// Runs (or resumes) a bulk run to the end: every non-blank line of the input
/// ends with a result in the output file or an error in the error file,
/// unless the run is cancelled.
pub async fn submit(config: &ClientConfig, options: SubmitOptions) -> Result<Summary, BulkError> {
    let started = Instant::now();
    let tenant = Tenant::new(config.tenant.clone())?;
    let run = run_id(&options)?;
    let errors = options
        .errors
        .clone()
        .unwrap_or_else(|| errors_path(&options.output));
    let hasher = CustomIdHasher::default();
    let total = {
        let input = options.input.clone();
        tokio::task::spawn_blocking(move || input::count_lines(&input))
            .await
            .expect("counting lines does not panic")
            .map_err(|source| BulkError::Io {
                path: options.input.clone(),
                source,
            })?
    };
    let (mut files, resumed) = output::open(&options.output, &errors, &hasher)?;

    let nats = jetinfer_nats::connect(&config.nats).await?;
    let js = jetstream::new(nats);
    jetinfer_nats::results::ensure(&js, config.results_max_age, config.replicas)
        .await
        .map_err(|e| BulkError::Results(e.to_string()))?;
    let kv = bulk::ensure_bucket(&js, config.results_max_age, config.replicas).await?;
    if bulk::is_cancelled(&kv, &tenant, &run).await? {
        return Err(BulkError::Cancelled(run));
    }
    let inbox = subjects::bulk_inbox(&tenant, &run)?;
    let (stored, mut results) = jetinfer_nats::results::follow(&js, &inbox)
        .await
        .map_err(BulkError::Results)?;

    let mut summary = Summary {
        run: run.clone(),
        lines: total,
        ok: resumed.ok,
        failed: resumed.failed,
        already_done: resumed.ok + resumed.failed,
        ..Summary::default()
    };
    let refused_before = resumed.refused_lines;
    let shared = Arc::new(Mutex::new(Shared {
        done: resumed.done,
        in_flight: HashSet::new(),
    }));
    let permits = Arc::new(Semaphore::new(options.in_flight.max(1)));
    let context = Arc::new(Context {
        js: js.clone(),
        tenant: tenant.clone(),
        run: run.clone(),
        inbox,
        shared: Arc::clone(&shared),
        permits: Arc::clone(&permits),
    });
    let mut record = RunRecord {
        run: run.clone(),
        input: options.input.display().to_string(),
        output: options.output.display().to_string(),
        lines: total,
        malformed: 0,
        accepted: summary.already_done,
        state: RunState::Submitting,
        updated_unix_ms: 0,
    };
    write_record(&kv, &tenant, &mut record).await;

    let stop = CancellationToken::new();
    let (caught_up_tx, caught_up_rx) = oneshot::channel();
    let mut caught_up_tx = Some(caught_up_tx);
    let mut caught_up = stored == 0;
    if caught_up {
        let _ = caught_up_tx.take().map(|tx| tx.send(()));
    }
    let (refusals_tx, mut refusals) = mpsc::channel::<Refusal>(LINE_BUFFER);
    let mut submitter = tokio::spawn(submit_lines(
        Arc::clone(&context),
        options.clone(),
        hasher.clone(),
        caught_up_rx,
        refusals_tx,
        stop.clone(),
    ));
    let mut progress = progress::Progress::new(options.progress, &run, total, summary.already_done);
    let prefix = format!("{run}:");
    let mut refusals_open = true;
    let mut submit_stats = None;
    let mut ticker = tokio::time::interval(TICK);
    let position = |s: &Summary| s.ok + s.failed + s.refused;

    let outcome: Result<(), BulkError> = loop {
        if submit_stats.is_some()
            && !refusals_open
            && caught_up
            && shared.lock().expect("shared lock").in_flight.is_empty()
        {
            break Ok(());
        }
        tokio::select! {
            message = results.next() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "reading results; the ordered consumer recovers");
                        continue;
                    }
                    None => break Err(BulkError::Results("the results stream ended".into())),
                };
                let catching_up = !caught_up;
                if catching_up && message.info().map(|i| i.pending == 0).unwrap_or(false) {
                    caught_up = true;
                    let _ = caught_up_tx.take().map(|tx| tx.send(()));
                }
                let result = match decode_result(&message.payload) {
                    Ok(result) => result,
                    Err(err) => {
                        tracing::warn!(error = %err, "undecodable result skipped");
                        continue;
                    }
                };
                let Some(custom_id) = result.job_id.strip_prefix(&prefix) else {
                    continue;
                };
                let key = hasher.key(custom_id);
                let new = {
                    let mut shared = shared.lock().expect("shared lock");
                    if shared.in_flight.remove(&key) {
                        permits.add_permits(1);
                    }
                    shared.done.insert(key)
                };
                if !new {
                    summary.duplicate_results += 1;
                    continue;
                }
                let written = match &result.outcome {
                    Outcome::Ok(e) => {
                        summary.ok += 1;
                        files.write_ok(custom_id, &result.job_id, e)
                    }
                    Outcome::Error(err) => {
                        summary.failed += 1;
                        files.write_failed(custom_id, &result.job_id, err)
                    }
                    // Bulk runs submit embedding jobs only: a worker that
                    // answers otherwise answered another job.
                    Outcome::Reranked(_) => {
                        summary.failed += 1;
                        let err = JobError::new(
                            ErrorCode::UnsupportedTask,
                            "the worker answered with rerank scores, not embeddings",
                        );
                        files.write_failed(custom_id, &result.job_id, &err)
                    }
                };
                if let Err(err) = written {
                    break Err(err);
                }
                if catching_up {
                    summary.recovered += 1;
                }
            }
            refusal = refusals.recv(), if refusals_open => match refusal {
                Some(refusal) => {
                    summary.refused += 1;
                    if !refused_before.contains(&refusal.line) {
                        if let Err(err) = files.write_refused(
                            refusal.line,
                            refusal.custom_id.as_deref(),
                            refusal.code,
                            &refusal.message,
                        ) {
                            break Err(err);
                        }
                    }
                }
                None => refusals_open = false,
            },
            joined = &mut submitter, if submit_stats.is_none() => {
                match joined.expect("the submitter does not panic") {
                    Ok(stats) => {
                        submit_stats = Some(stats);
                        if record.state == RunState::Submitting {
                            record.state = RunState::Waiting;
                        }
                    }
                    Err(err) => break Err(err),
                }
            }
            _ = ticker.tick() => {
                if let Err(err) = files.flush() {
                    break Err(err);
                }
                // Polled by key rather than watched: a tenant's producer may
                // read its own keys of the bucket, and a watch would need a
                // consumer whose filter the server cannot confine.
                if !summary.cancelled && matches!(bulk::is_cancelled(&kv, &tenant, &run).await, Ok(true)) {
                    tracing::warn!(run = %run, "run cancelled: submitting no more lines");
                    summary.cancelled = true;
                    record.state = RunState::Cancelled;
                    stop.cancel();
                }
                progress.update(position(&summary), summary.failed + summary.refused);
                record.malformed = summary.refused;
                record.accepted = {
                    let shared = shared.lock().expect("shared lock");
                    (shared.done.len() + shared.in_flight.len()) as u64
                };
                write_record(&kv, &tenant, &mut record).await;
            }
        }
    };
    stop.cancel();
    files.flush()?;
    outcome?;

    let stats = submit_stats.unwrap_or_default();
    summary.submitted = stats.submitted;
    summary.deduplicated = stats.deduplicated;
    summary.seconds = started.elapsed().as_secs_f64();
    let finished_now = position(&summary).saturating_sub(summary.already_done);
    summary.lines_per_s = finished_now as f64 / summary.seconds.max(1e-3);
    progress.finish(position(&summary), summary.failed + summary.refused);
    record.malformed = summary.refused;
    record.accepted = shared.lock().expect("shared lock").done.len() as u64;
    if !summary.cancelled {
        record.state = RunState::Finished;
    }
    write_record(&kv, &tenant, &mut record).await;
    Ok(summary)
}

/// Stores the run record; a failure only makes `bulk status` staler.
async fn write_record(kv: &jetstream::kv::Store, tenant: &Tenant, record: &mut RunRecord) {
    record.updated_unix_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .try_into()
        .unwrap_or_default();
    if let Err(err) = bulk::put_record(kv, tenant, record).await {
        tracing::warn!(error = %err, "writing the run record failed");
    }
}

/// Reads the input and publishes each line that is not done yet, once the
/// writer has caught up with the stored results.
async fn submit_lines(
    context: Arc<Context>,
    options: SubmitOptions,
    hasher: CustomIdHasher,
    caught_up: oneshot::Receiver<()>,
    refusals: mpsc::Sender<Refusal>,
    stop: CancellationToken,
) -> Result<SubmitStats, BulkError> {
    let mut stats = SubmitStats::default();
    tokio::select! {
        _ = stop.cancelled() => return Ok(stats),
        _ = caught_up => {}
    }
    let (lines_tx, mut lines) = mpsc::channel(LINE_BUFFER);
    let reader = input::read(
        options.input.clone(),
        context.run.clone(),
        options.model.clone(),
        hasher,
        lines_tx,
    );
    let mut models: HashMap<String, bool> = HashMap::new();
    let mut publishing = FuturesUnordered::new();
    let outcome = loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            Some(published) = publishing.next(), if !publishing.is_empty() => match published {
                Ok(Published::Stored { duplicate }) => {
                    stats.submitted += 1;
                    stats.deduplicated += u64::from(duplicate);
                }
                Ok(Published::NotServed { line, custom_id, model }) => {
                    let _ = refusals.send(not_served(line, custom_id, &model)).await;
                    models.insert(model, false);
                }
                Err(err) => break Err(err),
            },
            line = lines.recv(), if publishing.len() < PUBLISH_CONCURRENCY => {
                let (line, custom_id, key, job) = match line {
                    None => break Ok(()),
                    Some(Line::Refused { line, custom_id, message }) => {
                        let _ = refusals.send(Refusal { line, custom_id, code: "invalid_line", message }).await;
                        continue;
                    }
                    Some(Line::Job { line, custom_id, key, job }) => (line, custom_id, key, job),
                };
                if models.get(&job.model) == Some(&false) {
                    let _ = refusals.send(not_served(line, custom_id, &job.model)).await;
                    continue;
                }
                let permit = tokio::select! {
                    _ = stop.cancelled() => break Ok(()),
                    permit = context.permits.acquire() => permit.expect("the semaphore is never closed"),
                };
                permit.forget();
                {
                    let mut shared = context.shared.lock().expect("shared lock");
                    if shared.done.contains(&key) {
                        context.permits.add_permits(1);
                        continue;
                    }
                    shared.in_flight.insert(key);
                }
                publishing.push(publish(Arc::clone(&context), job, line, custom_id, key));
            }
        }
    };
    // Publishes under way finish either way: their results are awaited.
    while let Some(published) = publishing.next().await {
        match published {
            Ok(Published::Stored { duplicate }) => {
                stats.submitted += 1;
                stats.deduplicated += u64::from(duplicate);
            }
            Ok(Published::NotServed {
                line,
                custom_id,
                model,
            }) => {
                let _ = refusals.send(not_served(line, custom_id, &model)).await;
            }
            Err(err) => tracing::warn!(error = %err, "publishing failed"),
        }
    }
    drop(lines);
    let _ = reader.await;
    outcome.map(|()| stats)
}

impl Context {
    /// A job that will get no result (never stored): its key leaves the
    /// in-flight set and its permit goes back.
    fn never_answered(&self, key: u64) {
        if self
            .shared
            .lock()
            .expect("shared lock")
            .in_flight
            .remove(&key)
        {
            self.permits.add_permits(1);
        }
    }
}

/// What became of one line's job.
enum Published {
    /// JetStream holds it; `duplicate` when it already did.
    Stored { duplicate: bool },
    /// No stream listens on its model's subject: no worker serves the model.
    NotServed {
        line: u64,
        custom_id: String,
        model: String,
    },
}

/// The refusal of a line whose model no worker serves.
fn not_served(line: u64, custom_id: String, model: &str) -> Refusal {
    Refusal {
        line,
        custom_id: Some(custom_id),
        code: ErrorCode::UnknownModel.as_str(),
        message: format!(
            "line {line}: no worker serves model {model:?} on this server: check the model name or start a worker for it"
        ),
    }
}

/// Publishes one job, retrying while the stream is full or JetStream does not
/// answer (same job id: a publish that did land is de-duplicated).
async fn publish(
    context: Arc<Context>,
    job: Job,
    line: u64,
    custom_id: String,
    key: u64,
) -> Result<Published, BulkError> {
    let mut delay = RETRY_MIN;
    loop {
        match jetinfer_nats::publish_bulk_job(
            &context.js,
            &context.tenant,
            &job,
            &context.inbox,
            &context.run,
        )
        .await
        {
            Ok(ack) => {
                return Ok(Published::Stored {
                    duplicate: ack.duplicate,
                })
            }
            Err(PublishJobError::NoStream) => {
                context.never_answered(key);
                return Ok(Published::NotServed {
                    line,
                    custom_id,
                    model: job.model,
                });
            }
            Err(err) if err.is_transient() || matches!(err, PublishJobError::QueueFull) => {
                tracing::debug!(error = %err, "publish refused for now; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
            Err(source) => {
                context.never_answered(key);
                return Err(BulkError::Publish { custom_id, source });
            }
        }
    }
}

/// Counts of a run, from its record and the results stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    pub run: String,
    /// As the submitter last wrote it (every second while it runs); `None`
    /// when no record exists (never submitted here, or aged out).
    pub record: Option<RunRecord>,
    pub cancelled: bool,
    /// Jobs accepted by JetStream and not answered yet.
    pub queued: Option<u64>,
    /// Lines neither refused nor accepted yet (the submitter stopped early).
    pub not_submitted: Option<u64>,
    /// Results with embeddings.
    pub done: u64,
    /// Error replies other than `cancelled`.
    pub failed: u64,
    /// Jobs answered `cancelled`.
    pub cancelled_jobs: u64,
    /// Input lines refused before submission.
    pub refused: Option<u64>,
}

/// The run's counts: answered jobs from the results stream, the rest from
/// the run record.
pub async fn status(config: &ClientConfig, run: &str) -> Result<RunStatus, BulkError> {
    let tenant = Tenant::new(config.tenant.clone())?;
    subjects::check_run_id(run)?;
    let nats = jetinfer_nats::connect(&config.nats).await?;
    let js = jetstream::new(nats);
    let kv = bulk::bucket(&js).await?;
    status_of(&js, &kv, &tenant, run).await
}

/// [`status`] over an open connection and bucket.
async fn status_of(
    js: &jetstream::Context,
    kv: &async_nats::jetstream::kv::Store,
    tenant: &Tenant,
    run: &str,
) -> Result<RunStatus, BulkError> {
    let record = bulk::get_record(kv, tenant, run).await?;
    let cancelled = bulk::is_cancelled(kv, tenant, run).await?;
    let inbox = subjects::bulk_inbox(tenant, run)?;
    let (stored, mut results) = jetinfer_nats::results::follow(js, &inbox)
        .await
        .map_err(BulkError::Results)?;
    let hasher = CustomIdHasher::default();
    let mut seen = HashSet::new();
    let (mut done, mut failed, mut cancelled_jobs) = (0, 0, 0);
    let mut remaining = stored;
    while remaining > 0 {
        let message = match results.next().await {
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(BulkError::Results(err.to_string())),
            None => break,
        };
        remaining = message.info().map(|i| i.pending).unwrap_or(0);
        let Ok(result) = decode_result(&message.payload) else {
            continue;
        };
        if !seen.insert(hasher.key(&result.job_id)) {
            continue;
        }
        match result.outcome {
            Outcome::Ok(_) => done += 1,
            Outcome::Error(e) if e.code == ErrorCode::Cancelled => cancelled_jobs += 1,
            Outcome::Error(_) | Outcome::Reranked(_) => failed += 1,
        }
    }
    let answered = done + failed + cancelled_jobs;
    let queued = record.as_ref().map(|r| r.accepted.saturating_sub(answered));
    let not_submitted = record.as_ref().map(|r| {
        r.lines
            .saturating_sub(r.malformed + r.accepted.max(answered))
    });
    Ok(RunStatus {
        run: run.to_string(),
        refused: record.as_ref().map(|r| r.malformed),
        record,
        cancelled,
        queued,
        not_submitted,
        done,
        failed,
        cancelled_jobs,
    })
}

/// Cancels the run: workers answer its queued jobs `cancelled` instead of
/// computing them, and a running submitter stops submitting. Returns the
/// counts at the time of the cancel.
pub async fn cancel(config: &ClientConfig, run: &str) -> Result<RunStatus, BulkError> {
    let tenant = Tenant::new(config.tenant.clone())?;
    subjects::check_run_id(run)?;
    let nats = jetinfer_nats::connect(&config.nats).await?;
    let js = jetstream::new(nats);
    let kv = bulk::bucket(&js).await?;
    bulk::cancel(&js, &kv, &tenant, run).await?;
    if let Some(mut record) = bulk::get_record(&kv, &tenant, run).await? {
        record.state = RunState::Cancelled;
        write_record(&kv, &tenant, &mut record).await;
    }
    status_of(&js, &kv, &tenant, run).await
}
