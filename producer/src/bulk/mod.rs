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
//! 2. open the run ([`run::open`]): replay its inbox from the results stream
//!    (an ordered consumer), so results stored while no submitter ran are
//!    written out, not recomputed;
//! 3. stream the input ([`input`]) into [`run::drive`], which submits each
//!    line that is not done, at most `in_flight` awaiting results, waiting
//!    out a full jobs stream (`QueueFull`) rather than buffering;
//! 4. write each result as it arrives ([`output`], through this module's
//!    [`run::Driver`]) until none is awaited, recording progress in the run
//!    record every tick.
//!
//! Memory: the lines in flight and a 64-bit key per `custom_id` (the done
//! and duplicate sets), never the input or the output.

pub mod input;
pub mod output;
pub mod progress;
pub mod run;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use async_nats::jetstream;
use futures::StreamExt;
use jetinfer_nats::bulk::{self, BulkStoreError, RunRecord, RunState};
use jetinfer_nats::subjects::{self, SubjectError, Tenant};
use jetinfer_nats::PublishJobError;
use jetinfer_schemas::{decode_result, Embeddings, ErrorCode, JobError, Outcome};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::ClientConfig;
pub use progress::ProgressMode;

/// Results awaited at once by default.
pub const DEFAULT_IN_FLIGHT: usize = 1024;
/// Checked lines buffered between the reading thread and the submitter.
pub const LINE_BUFFER: usize = 256;

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

/// `jetinfer bulk submit`'s side of a run: the output and error files on
/// disk, the run record in the tenant's bucket, the progress display, and
/// the cancel mark polled every tick.
struct FileDriver {
    files: output::Files,
    /// Line numbers an earlier invocation already wrote as refused.
    refused_before: HashSet<u64>,
    kv: jetstream::kv::Store,
    tenant: Tenant,
    run: String,
    record: RunRecord,
    progress: progress::Progress,
    /// Results and error replies found in the files at start.
    resumed_ok: u64,
    resumed_failed: u64,
    cancelled: bool,
}

impl FileDriver {
    fn position(&self, counts: &run::Counts) -> (u64, u64) {
        let failed = self.resumed_failed + counts.failed + counts.refused;
        (self.resumed_ok + counts.ok + failed, failed)
    }
}

impl run::Driver for FileDriver {
    fn write_ok(&mut self, custom_id: &str, job_id: &str, e: &Embeddings) -> Result<(), BulkError> {
        self.files.write_ok(custom_id, job_id, e)
    }

    fn write_failed(
        &mut self,
        custom_id: &str,
        job_id: &str,
        e: &JobError,
    ) -> Result<(), BulkError> {
        self.files.write_failed(custom_id, job_id, e)
    }

    fn write_refused(&mut self, refusal: &run::Refusal) -> Result<(), BulkError> {
        if self.refused_before.contains(&refusal.line) {
            return Ok(());
        }
        self.files.write_refused(
            refusal.line,
            refusal.custom_id.as_deref(),
            refusal.code,
            &refusal.message,
        )
    }

    fn flush(&mut self) -> Result<(), BulkError> {
        self.files.flush()
    }

    async fn tick(&mut self, counts: &run::Counts) -> run::Tick {
        if counts.all_submitted && self.record.state == RunState::Submitting {
            self.record.state = RunState::Waiting;
        }
        // Polled by key rather than watched: a tenant's producer may read
        // its own keys of the bucket, and a watch would need a consumer
        // whose filter the server cannot confine.
        if !self.cancelled
            && matches!(
                bulk::is_cancelled(&self.kv, &self.tenant, &self.run).await,
                Ok(true)
            )
        {
            tracing::warn!(run = %self.run, "run cancelled: submitting no more lines");
            self.cancelled = true;
            self.record.state = RunState::Cancelled;
        }
        let (position, failed) = self.position(counts);
        self.progress.update(position, failed);
        self.record.malformed = counts.refused;
        self.record.accepted = counts.accepted;
        write_record(&self.kv, &self.tenant, &mut self.record).await;
        if self.cancelled {
            run::Tick::StopSubmitting
        } else {
            run::Tick::Go
        }
    }
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
    let (files, resumed) = output::open(&options.output, &errors, &hasher)?;

    let nats = jetinfer_nats::connect(&config.nats).await?;
    let js = jetstream::new(nats);
    jetinfer_nats::results::ensure(&js, config.results_max_age, config.replicas)
        .await
        .map_err(|e| BulkError::Results(e.to_string()))?;
    let kv = bulk::ensure_bucket(&js, config.results_max_age, config.replicas).await?;
    if bulk::is_cancelled(&kv, &tenant, &run).await? {
        return Err(BulkError::Cancelled(run));
    }
    let opened = run::open(&js, &tenant, &run).await?;

    let already_done = resumed.ok + resumed.failed;
    let mut record = RunRecord {
        run: run.clone(),
        input: options.input.display().to_string(),
        output: options.output.display().to_string(),
        lines: total,
        malformed: 0,
        accepted: already_done,
        state: RunState::Submitting,
        updated_unix_ms: 0,
    };
    write_record(&kv, &tenant, &mut record).await;

    let (lines_tx, lines) = mpsc::channel(LINE_BUFFER);
    let reader = input::read(
        options.input.clone(),
        run.clone(),
        options.model.clone(),
        hasher.clone(),
        lines_tx,
    );
    let mut driver = FileDriver {
        files,
        refused_before: resumed.refused_lines,
        kv: kv.clone(),
        tenant: tenant.clone(),
        run: run.clone(),
        record,
        progress: progress::Progress::new(options.progress, &run, total, already_done),
        resumed_ok: resumed.ok,
        resumed_failed: resumed.failed,
        cancelled: false,
    };
    let driven = run::drive(
        opened,
        lines,
        resumed.done,
        options.in_flight,
        hasher,
        &mut driver,
    )
    .await;
    // The receiver is gone with the submitter: the reader stops.
    let _ = reader.await;
    let driven = driven?;
    let counts = driven.counts;
    if driven.stopped && !driver.cancelled {
        // Stopped by a `cancelled` answer before a tick saw the mark.
        driver.cancelled = bulk::is_cancelled(&kv, &tenant, &run).await.unwrap_or(true);
        if driver.cancelled {
            driver.record.state = RunState::Cancelled;
        }
    }

    let summary = Summary {
        run: run.clone(),
        lines: total,
        ok: resumed.ok + counts.ok,
        failed: resumed.failed + counts.failed,
        refused: counts.refused,
        already_done,
        recovered: counts.recovered,
        submitted: counts.submitted,
        deduplicated: counts.deduplicated,
        duplicate_results: counts.duplicate_results,
        cancelled: driver.cancelled,
        seconds: started.elapsed().as_secs_f64(),
        lines_per_s: 0.0,
    };
    let position = summary.ok + summary.failed + summary.refused;
    let finished_now = position.saturating_sub(already_done);
    let summary = Summary {
        lines_per_s: finished_now as f64 / summary.seconds.max(1e-3),
        ..summary
    };
    driver
        .progress
        .finish(position, summary.failed + summary.refused);
    driver.record.malformed = summary.refused;
    driver.record.accepted = counts.accepted;
    if !summary.cancelled {
        driver.record.state = RunState::Finished;
    }
    write_record(&kv, &tenant, &mut driver.record).await;
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
