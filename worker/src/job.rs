//! A job in flight through the worker: its delivery (which only
//! [`crate::settle`] can ack), where to reply,
//! its tokenised inputs, and the embeddings assembled as its inputs come back
//! from batches, possibly several, possibly shared with other jobs.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jetinfer_schemas::{
    Embeddings, ErrorCode, JobError, JobOptions, ModelInfo, RerankScore, Reranked, Task, Timings,
};
use time::OffsetDateTime;

use crate::backend::{l2_normalize, sigmoid, Tokens};
use crate::settle::Delivery;

pub struct InFlightJob {
    /// The job's stream sequence: unique while it is in the stream.
    pub key: u64,
    /// How many times JetStream has delivered it, this time included.
    pub delivered: i64,
    pub id: String,
    pub options: JobOptions,
    pub deadline_unix_ms: Option<u64>,
    pub reply_to: String,
    /// The message JetStream delivered: readable here, settled only by
    /// [`crate::settle::Settler`].
    delivery: Delivery,
    /// When JetStream stored the job.
    pub published: OffsetDateTime,
    pub tokens: Vec<Tokens>,
    /// Carries the producer's trace context into the reply's logs.
    pub span: tracing::Span,
    /// Set once the job's bulk run is cancelled (`None`: not a bulk job).
    pub cancelled: Option<Arc<AtomicBool>>,
    /// The tenant of the job's subject (screened at intake): what the
    /// batcher shares batches between and the ledger counts held jobs by.
    pub tenant: String,
    /// Embed, or rerank: then `tokens` are (query, document) pairs and each
    /// input's output is the classifier's logit.
    pub task: Task,
    /// A rerank job's `top_n`.
    pub top_n: Option<u32>,
    assembly: Mutex<Assembly>,
}

#[derive(Default)]
struct Assembly {
    embeddings: Vec<Option<Vec<f32>>>,
    remaining: usize,
    failed: bool,
    queue_wait: Option<Duration>,
    inference: Duration,
    largest_batch: usize,
    last_batch: Option<u64>,
}

/// How the batch an input ran in went.
#[derive(Debug, Clone, Copy)]
pub struct BatchRun {
    /// Sequence number of the batch within this worker.
    pub batch: u64,
    pub started: OffsetDateTime,
    pub elapsed: Duration,
    pub size: usize,
}

impl InFlightJob {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: u64,
        delivered: i64,
        id: String,
        options: JobOptions,
        deadline_unix_ms: Option<u64>,
        reply_to: String,
        delivery: Delivery,
        published: OffsetDateTime,
        tokens: Vec<Tokens>,
    ) -> Self {
        let assembly = Assembly {
            embeddings: vec![None; tokens.len()],
            remaining: tokens.len(),
            ..Default::default()
        };
        Self {
            key,
            delivered,
            id,
            options,
            deadline_unix_ms,
            reply_to,
            delivery,
            published,
            tokens,
            span: tracing::Span::none(),
            cancelled: None,
            tenant: String::new(),
            task: Task::Embed,
            top_n: None,
            assembly: Mutex::new(assembly),
        }
    }

    /// The delivery the job came in: what the Settler settles.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// The job with `span` as the span its later log lines belong to.
    pub fn with_span(mut self, span: tracing::Span) -> Self {
        self.span = span;
        self
    }

    /// The job with the cancel flag of its bulk run.
    pub fn with_cancel_flag(mut self, flag: Option<Arc<AtomicBool>>) -> Self {
        self.cancelled = flag;
        self
    }

    /// The job of `tenant`.
    pub fn with_tenant(mut self, tenant: String) -> Self {
        self.tenant = tenant;
        self
    }

    /// The job as a rerank job answering its `top_n` best documents.
    pub fn with_rerank(mut self, top_n: Option<u32>) -> Self {
        self.task = Task::Rerank;
        self.top_n = top_n;
        self
    }

    /// Why the job should no longer be computed at `now`: its deadline passed
    /// or its bulk run was cancelled.
    pub fn stale(&self, now: OffsetDateTime) -> Option<JobError> {
        if crate::cancel::is_cancelled(&self.cancelled) {
            Some(crate::cancel::cancelled_error())
        } else if self.expired(now) {
            Some(deadline_error())
        } else {
            None
        }
    }

    /// Records input `input`'s embedding; true when it was the job's last one.
    pub fn complete_input(&self, input: usize, mut embedding: Vec<f32>, run: BatchRun) -> bool {
        if self.task == Task::Embed {
            // Truncated first, then normalised: OpenAI's `dimensions` gives
            // unit vectors of the first N values (checked at intake to be
            // within the model's width).
            if let Some(n) = self.options.dimensions {
                embedding.truncate(n as usize);
            }
            if self.options.normalize {
                l2_normalize(&mut embedding);
            }
        }
        let mut a = self.assembly.lock().expect("assembly lock");
        if a.failed || a.embeddings[input].is_some() {
            return false;
        }
        if a.queue_wait.is_none() {
            let waited = run.started - self.published;
            a.queue_wait = Some(waited.try_into().unwrap_or(Duration::ZERO));
        }
        // Each batch's time counts once per job, however many inputs it held.
        if a.last_batch != Some(run.batch) {
            a.last_batch = Some(run.batch);
            a.inference += run.elapsed;
        }
        a.largest_batch = a.largest_batch.max(run.size);
        a.embeddings[input] = Some(embedding);
        a.remaining -= 1;
        a.remaining == 0
    }

    /// Marks the job failed; true the first time, so it is answered once.
    pub fn fail(&self) -> bool {
        let mut a = self.assembly.lock().expect("assembly lock");
        !std::mem::replace(&mut a.failed, true)
    }

    /// The finished embeddings, in input order.
    pub fn take_embeddings(&self, model: &ModelInfo) -> Embeddings {
        let mut a = self.assembly.lock().expect("assembly lock");
        let embeddings = a
            .embeddings
            .iter_mut()
            .map(|e| e.take().expect("every input completed"))
            .collect();
        Embeddings {
            model: model.clone(),
            embeddings,
            token_counts: self.tokens.iter().map(|t| t.ids.len() as u32).collect(),
            truncated: self.tokens.iter().map(|t| t.truncated).collect(),
            timings: Timings {
                queue_wait_us: micros(a.queue_wait.unwrap_or_default()),
                inference_us: micros(a.inference),
                batch_size: a.largest_batch as u32,
            },
        }
    }

    /// A finished rerank job's documents, best first (ties in document
    /// order), cut to its `top_n`: each input's output is its logit.
    pub fn take_reranked(&self, model: &ModelInfo) -> Reranked {
        let a = self.assembly.lock().expect("assembly lock");
        let mut results: Vec<RerankScore> = a
            .embeddings
            .iter()
            .enumerate()
            .map(|(index, logits)| {
                let logit = logits
                    .as_ref()
                    .and_then(|l| l.first().copied())
                    .expect("every input completed with one logit");
                RerankScore {
                    index: index as u32,
                    score: sigmoid(logit),
                    logit,
                }
            })
            .collect();
        // Stable: equal logits keep document order. A NaN sorts last.
        let key = |s: &RerankScore| {
            if s.logit.is_nan() {
                f32::NEG_INFINITY
            } else {
                s.logit
            }
        };
        results.sort_by(|x, y| key(y).total_cmp(&key(x)));
        if let Some(n) = self.top_n {
            results.truncate(n as usize);
        }
        Reranked {
            model: model.clone(),
            results,
            token_counts: self.tokens.iter().map(|t| t.ids.len() as u32).collect(),
            truncated: self.tokens.iter().map(|t| t.truncated).collect(),
            timings: Timings {
                queue_wait_us: micros(a.queue_wait.unwrap_or_default()),
                inference_us: micros(a.inference),
                batch_size: a.largest_batch as u32,
            },
        }
    }

    /// Whether the job's deadline has passed at `now`.
    pub fn expired(&self, now: OffsetDateTime) -> bool {
        expired(self.deadline_unix_ms, now)
    }
}

pub fn expired(deadline_unix_ms: Option<u64>, now: OffsetDateTime) -> bool {
    let now_ms = now.unix_timestamp_nanos() / 1_000_000;
    deadline_unix_ms.is_some_and(|d| i128::from(d) < now_ms)
}

/// The error a job whose deadline passed is answered with.
pub fn deadline_error() -> JobError {
    JobError::new(
        ErrorCode::DeadlineExceeded,
        "the job's deadline passed before it could be answered",
    )
}

fn micros(d: Duration) -> u64 {
    d.as_micros().try_into().unwrap_or(u64::MAX)
}

/// Every job the worker holds and has not settled (acked, NAKed or
/// terminated). It lets the worker keep long waits alive with progress acks,
/// NAK what is left when a drain runs out of time, and cap the jobs one
/// tenant holds here (`rate_limit` `max_held_jobs`).
///
/// It also keeps `jetinfer_jobs_in_flight` true: the gauge moves here and
/// only here, up when a job enters and down when it leaves, whichever path
/// settled it, and never twice for one job.
pub struct Ledger {
    /// The `model` label of the gauge.
    model: String,
    held: Mutex<Held>,
}

/// The ledger's state. `per_tenant` has an entry only for tenants holding
/// at least one job, so it is no larger than `jobs`.
#[derive(Default)]
struct Held {
    jobs: HashMap<u64, Arc<InFlightJob>>,
    per_tenant: HashMap<String, usize>,
}

impl Ledger {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            held: Mutex::default(),
        }
    }

    pub fn insert(&self, job: &Arc<InFlightJob>) {
        let mut held = self.lock();
        if held.jobs.insert(job.key, Arc::clone(job)).is_none() {
            *held.per_tenant.entry(job.tenant.clone()).or_default() += 1;
            jetinfer_monitoring::job_admitted(&self.model);
        }
    }

    pub fn remove(&self, job: &InFlightJob) {
        let mut held = self.lock();
        // Counted down once: a job settled twice changes nothing the second time.
        let Some(removed) = held.jobs.remove(&job.key) else {
            return;
        };
        jetinfer_monitoring::job_released(&self.model);
        if let Some(count) = held.per_tenant.get_mut(&removed.tenant) {
            *count -= 1;
            if *count == 0 {
                held.per_tenant.remove(&removed.tenant);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many jobs of `tenant` are held now.
    pub fn held_by(&self, tenant: &str) -> usize {
        self.lock().per_tenant.get(tenant).copied().unwrap_or(0)
    }

    /// A snapshot of the jobs held now.
    pub fn jobs(&self) -> Vec<Arc<InFlightJob>> {
        self.lock().jobs.values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().expect("ledger lock")
    }
}
