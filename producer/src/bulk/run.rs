//! The engine of a bulk run, shared by `jetinfer bulk submit` (files on
//! disk) and the Batch API runner ([`crate::batches`], files in the object
//! store). Four pieces, in the order a run uses them:
//!
//! 1. [`open`]: the run's inbox `results.<tenant>.bulk-<run>`, read from the
//!    start of the results stream (an ordered consumer), so what workers
//!    answered while no submitter ran is found, not recomputed;
//! 2. [`drive`]'s submitter: each checked [`Line`] that is not done yet is
//!    published as job `<run>:<custom_id>` (JetStream de-duplicates a
//!    resubmission), at most `in_flight` awaiting results (a permit held from
//!    publish to result), waiting out a full jobs stream rather than
//!    buffering; it starts only once the stored results are read;
//! 3. [`Driver`]'s writes: each result once per `custom_id` (the done set
//!    drops a second one), refused lines, flushes;
//! 4. [`Driver::tick`], every [`TICK`]: the caller records progress and says
//!    whether to stop submitting (a cancel). A job answered `cancelled`
//!    stops submitting at once: workers answer so only for a cancelled run.
//!
//! Memory: the lines in flight and a 64-bit key per `custom_id`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use jetinfer_nats::subjects::{self, Tenant};
use jetinfer_nats::PublishJobError;
use jetinfer_schemas::{decode_result, Embeddings, ErrorCode, Job, JobError, Outcome};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::input::Line;
use super::{BulkError, CustomIdHasher};

/// Publishes awaiting their PubAck at once.
const PUBLISH_CONCURRENCY: usize = 64;
/// Refusals buffered between the submitter and the writer.
const REFUSAL_BUFFER: usize = 256;
/// How often files are flushed and [`Driver::tick`] runs.
pub const TICK: Duration = Duration::from_secs(1);
/// Back-off while the jobs stream is full or JetStream does not answer.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A run whose inbox is open: everything stored on it is about to be read.
pub struct Opened {
    js: jetstream::Context,
    tenant: Tenant,
    run: String,
    inbox: String,
    /// Results stored on the inbox when it was opened.
    stored: u64,
    results: jetstream::consumer::pull::Ordered,
}

/// Opens run `run` of `tenant`: its inbox, from the start of the results
/// stream (which must exist: `results::ensure`).
pub async fn open(
    js: &jetstream::Context,
    tenant: &Tenant,
    run: &str,
) -> Result<Opened, BulkError> {
    let inbox = subjects::bulk_inbox(tenant, run)?;
    let (stored, results) = jetinfer_nats::results::follow(js, &inbox)
        .await
        .map_err(BulkError::Results)?;
    Ok(Opened {
        js: js.clone(),
        tenant: tenant.clone(),
        run: run.to_string(),
        inbox,
        stored,
        results,
    })
}

/// A line refused before or at submission, for the writer to record.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub line: u64,
    pub custom_id: Option<String>,
    pub code: &'static str,
    pub message: String,
}

/// Where a run stands, handed to every [`Driver::tick`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Results with embeddings written by this invocation.
    pub ok: u64,
    /// Error replies written by this invocation.
    pub failed: u64,
    /// Lines refused by this invocation.
    pub refused: u64,
    /// Of `ok + failed`, results read back from the stream that were stored
    /// before this invocation caught up.
    pub recovered: u64,
    /// Results dropped because their `custom_id` was already written.
    pub duplicate_results: u64,
    /// Distinct `custom_id`s done or in flight (done includes earlier
    /// invocations).
    pub accepted: u64,
    /// Jobs published by this invocation.
    pub submitted: u64,
    /// Of those, how many JetStream already held (de-duplicated).
    pub deduplicated: u64,
    /// The submitter has read every line (or stopped).
    pub all_submitted: bool,
}

/// What [`Driver::tick`] asks of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    Go,
    /// Submit nothing more; results of jobs already published are still
    /// awaited (a cancelled run's workers answer them `cancelled`).
    StopSubmitting,
}

/// The caller's side of a run: where results go and how progress is kept.
/// Writes are synchronous (buffered files); `tick` may talk to NATS.
pub trait Driver: Send {
    fn write_ok(&mut self, custom_id: &str, job_id: &str, e: &Embeddings) -> Result<(), BulkError>;
    fn write_failed(
        &mut self,
        custom_id: &str,
        job_id: &str,
        e: &JobError,
    ) -> Result<(), BulkError>;
    fn write_refused(&mut self, refusal: &Refusal) -> Result<(), BulkError>;
    fn flush(&mut self) -> Result<(), BulkError>;
    /// Every [`TICK`] while the run goes on, after a flush.
    fn tick(&mut self, counts: &Counts) -> impl Future<Output = Tick> + Send;
}

/// How [`drive`] ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Driven {
    pub counts: Counts,
    /// Submitting stopped early: a tick asked, or a job was answered
    /// `cancelled` (its run was cancelled).
    pub stopped: bool,
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

#[derive(Default)]
struct SubmitStats {
    submitted: u64,
    deduplicated: u64,
}

/// Runs an opened run to its end: every line from `lines` not in `done`
/// (keys of `custom_id`s an earlier invocation wrote) is submitted and its
/// result written through `driver`, unless a tick stops submitting; then
/// every result awaited is written. Returns once none is awaited.
pub async fn drive<D: Driver>(
    opened: Opened,
    lines: mpsc::Receiver<Line>,
    done: HashSet<u64>,
    in_flight: usize,
    hasher: CustomIdHasher,
    driver: &mut D,
) -> Result<Driven, BulkError> {
    let Opened {
        js,
        tenant,
        run,
        inbox,
        stored,
        mut results,
    } = opened;
    let shared = Arc::new(Mutex::new(Shared {
        done,
        in_flight: HashSet::new(),
    }));
    let permits = Arc::new(Semaphore::new(in_flight.max(1)));
    let context = Arc::new(Context {
        js,
        tenant,
        run: run.clone(),
        inbox,
        shared: Arc::clone(&shared),
        permits: Arc::clone(&permits),
    });
    let stop = CancellationToken::new();
    let (caught_up_tx, caught_up_rx) = oneshot::channel();
    let mut caught_up_tx = Some(caught_up_tx);
    let mut caught_up = stored == 0;
    if caught_up {
        let _ = caught_up_tx.take().map(|tx| tx.send(()));
    }
    let (refusals_tx, mut refusals) = mpsc::channel::<Refusal>(REFUSAL_BUFFER);
    // Aborted with this future: a run dropped mid-way (a gateway stopping)
    // leaves no submitter behind to publish on its own.
    let mut submitter = AbortOnDrop(tokio::spawn(submit_lines(
        Arc::clone(&context),
        lines,
        caught_up_rx,
        refusals_tx,
        stop.clone(),
    )));
    let prefix = format!("{run}:");
    let mut counts = Counts::default();
    let mut stopped = false;
    let mut refusals_open = true;
    let mut ticker = tokio::time::interval(TICK);
    let accepted = |shared: &Mutex<Shared>| {
        let shared = shared.lock().expect("shared lock");
        (shared.done.len() + shared.in_flight.len()) as u64
    };

    let outcome: Result<(), BulkError> = loop {
        if counts.all_submitted
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
                    counts.duplicate_results += 1;
                    continue;
                }
                let written = match &result.outcome {
                    Outcome::Ok(e) => {
                        counts.ok += 1;
                        driver.write_ok(custom_id, &result.job_id, e)
                    }
                    Outcome::Error(err) => {
                        counts.failed += 1;
                        driver.write_failed(custom_id, &result.job_id, err)
                    }
                    // Runs submit embedding jobs only: a worker answering
                    // with rerank scores answered another job.
                    Outcome::Reranked(_) => {
                        counts.failed += 1;
                        let err = JobError::new(
                            ErrorCode::UnsupportedTask,
                            "the worker answered with rerank scores, not embeddings",
                        );
                        driver.write_failed(custom_id, &result.job_id, &err)
                    }
                };
                if let Err(err) = written {
                    break Err(err);
                }
                if catching_up {
                    counts.recovered += 1;
                }
                // Workers answer `cancelled` only for a cancelled run: stop
                // now, not at the next tick, or the lines left would race
                // through permits the instant answers free.
                if !stopped && matches!(&result.outcome, Outcome::Error(e) if e.code == ErrorCode::Cancelled) {
                    tracing::warn!(run = %run, "a job of the run was answered cancelled: submitting no more lines");
                    stopped = true;
                    stop.cancel();
                }
            }
            refusal = refusals.recv(), if refusals_open => match refusal {
                Some(refusal) => {
                    counts.refused += 1;
                    if let Err(err) = driver.write_refused(&refusal) {
                        break Err(err);
                    }
                }
                None => refusals_open = false,
            },
            joined = &mut submitter.0, if !counts.all_submitted => {
                match joined.expect("the submitter does not panic") {
                    Ok(stats) => {
                        counts.all_submitted = true;
                        counts.submitted = stats.submitted;
                        counts.deduplicated = stats.deduplicated;
                    }
                    Err(err) => break Err(err),
                }
            }
            _ = ticker.tick() => {
                if let Err(err) = driver.flush() {
                    break Err(err);
                }
                counts.accepted = accepted(&shared);
                if driver.tick(&counts).await == Tick::StopSubmitting && !stopped {
                    tracing::warn!(run = %run, "submitting no more lines of the run");
                    stopped = true;
                    stop.cancel();
                }
            }
        }
    };
    stop.cancel();
    driver.flush()?;
    outcome?;
    counts.accepted = shared.lock().expect("shared lock").done.len() as u64;
    Ok(Driven { counts, stopped })
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes each line not done yet, once the writer has caught up with the
/// stored results.
async fn submit_lines(
    context: Arc<Context>,
    mut lines: mpsc::Receiver<Line>,
    caught_up: oneshot::Receiver<()>,
    refusals: mpsc::Sender<Refusal>,
    stop: CancellationToken,
) -> Result<SubmitStats, BulkError> {
    let mut stats = SubmitStats::default();
    tokio::select! {
        _ = stop.cancelled() => return Ok(stats),
        _ = caught_up => {}
    }
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
