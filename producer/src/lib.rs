//! The jetinfer client library: submit embedding and rerank jobs to
//! JetStream and await their results.
//!
//! A [`Client`] owns one result inbox (`results.<tenant>.<client-id>`); every
//! job it submits names that inbox as its reply subject, and a dispatcher task
//! routes each arriving result to the caller waiting for that job id. A
//! result for a job nobody waits for (a late or duplicate one) is dropped, so
//! a caller never sees two results for one job.
//!
//! Results are kept in JetStream's results stream and the client reads its
//! inbox from there, through an ordered consumer: after its connection comes
//! back (its network dropped, or the server restarted) it resumes after the
//! last stream sequence it saw, so a job answered while it was away is never
//! waited on for ever. Where the tenant has a NATS account of its
//! own (`deploy/nats/accounts.conf`), that stream lives in it and the client
//! makes it at connect when it is missing.
//!
//! The jobs stream listens only on the models workers serve, so a job for any
//! other model is refused at once ([`SubmitError::UnknownModel`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use jetinfer_producer::{Client, ClientConfig};
//! use jetinfer_schemas::Job;
//!
//! let client = Client::connect(ClientConfig::default()).await?;
//! let result = client.submit(Job::new("minilm", vec!["hello world".into()])).await?;
//! let embeddings = result.into_result()?;
//! println!("{} dims", embeddings.embeddings[0].len());
//! # Ok(()) }
//! ```

pub mod batches;
pub mod bulk;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use backon::{ExponentialBuilder, Retryable};
use futures::{Stream, StreamExt};
use jetinfer_nats::subjects::{self, SubjectError, Tenant, DEFAULT_TENANT};
use jetinfer_nats::{NatsConfig, PublishJobError};
use jetinfer_schemas::{decode_result, Job, JobId, JobResult, Untrusted};
use tokio::sync::oneshot;

/// How long [`Client::submit`] waits for a result by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Publish retries when JetStream does not acknowledge in time or nothing
/// answers the subject (200, 400, 800, 1600 ms apart).
const PUBLISH_ATTEMPTS: usize = 4;
const PUBLISH_RETRY_DELAY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub nats: NatsConfig,
    /// Tenant the jobs are submitted for (the last token of the job subject).
    pub tenant: String,
    /// Longest wait for a job's result.
    pub timeout: Duration,
    /// How long the results stream keeps results, when this client makes it
    /// (a tenant with its own account, whose stream is missing).
    pub results_max_age: Duration,
    /// Replicas of the results stream and bulk bucket this client makes.
    pub replicas: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            nats: NatsConfig {
                name: "jetinfer-producer".into(),
                ..NatsConfig::default()
            },
            tenant: DEFAULT_TENANT.into(),
            timeout: DEFAULT_TIMEOUT,
            results_max_age: jetinfer_nats::results::DEFAULT_RESULTS_MAX_AGE,
            replicas: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Subject(#[from] SubjectError),
    #[error(transparent)]
    Connect(#[from] jetinfer_nats::ConnectError),
    /// Nothing answered a publish on the model's subject through every retry
    /// (about 3 s: a stream electing a leader looks the same for a moment).
    #[error("no worker serves model {0:?} on this server: check the model name or start a worker for it")]
    UnknownModel(String),
    #[error("making this tenant's results stream: {0}")]
    Provision(#[from] jetinfer_nats::ProvisionError),
    /// The queue refused the job: back off and retry later.
    #[error("the job queue is full: retry later")]
    QueueFull,
    /// This client's tenant has its quota of jobs queued for the model: back
    /// off and retry once some are answered. Other tenants are unaffected.
    #[error("tenant {tenant} has its quota of jobs queued for model {model}: retry once some are answered")]
    QuotaExceeded { tenant: String, model: String },
    #[error(transparent)]
    Publish(PublishJobError),
    #[error("no result for job {job_id} within {after:?}; it stays queued and may still run")]
    Timeout { job_id: JobId, after: Duration },
    #[error("subscribing to the result inbox: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("reading this client's results from the results stream: {0}")]
    Results(String),
    #[error("the client's connection closed")]
    Closed,
}

impl SubmitError {
    /// Classifies a refused publish of a job for `model`: no stream listening
    /// on its subject means no worker serves the model.
    fn refused(err: PublishJobError, model: &str) -> Self {
        match err {
            PublishJobError::NoStream => Self::UnknownModel(model.to_string()),
            other => other.into(),
        }
    }
}

impl From<PublishJobError> for SubmitError {
    fn from(err: PublishJobError) -> Self {
        match err {
            PublishJobError::QueueFull => Self::QueueFull,
            PublishJobError::QuotaExceeded { tenant, model } => {
                Self::QuotaExceeded { tenant, model }
            }
            PublishJobError::Subject(e) => Self::Subject(e),
            other => Self::Publish(other),
        }
    }
}

type Pending = Arc<Mutex<HashMap<JobId, oneshot::Sender<JobResult>>>>;

/// Where the dispatcher hands each result: the waiters by job id, and a
/// count of results that found none.
#[derive(Clone, Default)]
struct Routes {
    pending: Pending,
    /// Results that reached this client for a job no caller waited for
    /// (any more): a second result for one job, or one after its caller
    /// timed out.
    unawaited: Arc<AtomicU64>,
}

/// How long re-opening the results consumer keeps retrying in one go (while
/// JetStream elects leaders after a server loss) before it logs and starts
/// again: as long as a waiting job would wait by default.
const RESUME_FOR: Duration = Duration::from_secs(120);

/// Routes every result stored for `inbox` to its waiter, for as long as the
/// client lives. Results are read through an ordered consumer on the results
/// stream, not a plain subscription: each carries its stream sequence, the
/// consumer resumes after the last one it delivered when a heartbeat is
/// missed or the connection comes back, and if its stream ends with an error
/// a new one is opened after `seen`, the last sequence routed. A result
/// stored while the client was away is therefore delivered on its return,
/// exactly once per stream sequence, with no timing guess. A second result
/// for one job (a job computed twice) finds no waiter and is dropped.
///
/// No plain subscription is needed beside it: a worker stores every result
/// on `results.>` or retries its job (`results::publish`), so a result this
/// client can be sent is one the stream holds.
async fn dispatch(
    js: jetstream::Context,
    inbox: String,
    mut results: jetstream::consumer::pull::Ordered,
    routes: Routes,
) {
    let mut seen = 0;
    loop {
        loop {
            match results.next().await {
                Some(Ok(message)) => {
                    if let Ok(info) = message.info() {
                        seen = info.stream_sequence;
                    }
                    route(&routes, &message.payload);
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, after = seen, "results consumer failed; resuming by sequence");
                    break;
                }
                // The connection is closed for good.
                None => return,
            }
        }
        let resume = || jetinfer_nats::results::follow_after(&js, &inbox, seen);
        match resume
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(250))
                    .with_max_delay(Duration::from_secs(5))
                    .with_total_delay(Some(RESUME_FOR))
                    .without_max_times(),
            )
            .notify(|err, after| {
                tracing::debug!(error = %err, retry_in = ?after, "resuming results: JetStream not answering yet");
            })
            .await
        {
            Ok(next) => results = next,
            Err(err) => {
                tracing::warn!(error = %err, after = seen, "resuming results failed; trying again");
            }
        }
    }
}

/// Hands a result to the caller waiting for its job, if any.
fn route(routes: &Routes, payload: &[u8]) {
    match decode_result(payload) {
        Ok(result) => {
            let waiter = routes
                .pending
                .lock()
                .expect("pending lock")
                .remove(&result.job_id);
            match waiter {
                Some(waiter) => {
                    let _ = waiter.send(result);
                }
                None => {
                    routes.unawaited.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(job = %Untrusted(&result.job_id), "result nobody waits for (late or duplicate); dropped")
                }
            }
        }
        Err(err) => tracing::warn!(error = %Untrusted(err), "undecodable result dropped"),
    }
}

/// Submits jobs and awaits their results. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    tenant: Tenant,
    inbox: String,
    pending: Pending,
    unawaited: Arc<AtomicU64>,
    config: ClientConfig,
    dispatcher: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

impl Client {
    pub async fn connect(config: ClientConfig) -> Result<Self, SubmitError> {
        let tenant = Tenant::new(config.tenant.clone())?;
        let nats = jetinfer_nats::connect(&config.nats).await?;
        let inbox = subjects::result_inbox(&tenant, &ulid::Ulid::new().to_string())?;
        let routes = Routes::default();
        let js = jetstream::new(nats.clone());
        // A restarting server or a leader election answers JetStream's API
        // with timeouts for a few seconds: a client connecting then waits it
        // out (as it waits for a first connection) instead of failing.
        let startup = || {
            ExponentialBuilder::default()
                .with_min_delay(PUBLISH_RETRY_DELAY)
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(config.nats.startup_retry_for))
        };
        (|| jetinfer_nats::results::ensure(&js, config.results_max_age, config.replicas))
            .retry(startup())
            .when(|err| !matches!(err, jetinfer_nats::ProvisionError::Subject(_)))
            .notify(|err, after| tracing::warn!(error = %err, retry_in = ?after, "results stream not ready; retrying"))
            .await?;
        // Made before any job names the inbox, and from its first result:
        // the inbox is fresh, so nothing is missed and nothing old is read.
        let results = (|| jetinfer_nats::results::follow_after(&js, &inbox, 0))
            .retry(startup())
            .notify(|err, after| tracing::warn!(error = %err, retry_in = ?after, "following the results stream failed; retrying"))
            .await
            .map_err(SubmitError::Results)?;
        let dispatcher = tokio::spawn(dispatch(js.clone(), inbox.clone(), results, routes.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                js,
                tenant,
                inbox,
                pending: routes.pending,
                unawaited: routes.unawaited,
                config,
                dispatcher,
            }),
        })
    }

    /// The subject results for this client arrive on.
    pub fn inbox(&self) -> &str {
        &self.inner.inbox
    }

    /// How many results reached this client for a job no caller waited for
    /// any more (a second result for a job computed twice, or one that came
    /// after its caller timed out); the client dropped them. A measure of
    /// duplicates before de-duplication.
    pub fn results_unawaited(&self) -> u64 {
        self.inner.unawaited.load(Ordering::Relaxed)
    }

    /// Whether the client's NATS connection is up now (for readiness probes).
    pub fn connected(&self) -> bool {
        self.inner.js.client().connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes `job`, waits until JetStream stored it, then waits for its
    /// result (embeddings or a typed error) up to the configured timeout.
    pub async fn submit(&self, job: Job) -> Result<JobResult, SubmitError> {
        self.submit_traced(job, None).await
    }

    /// Scores `documents` against `query` with the cross-encoder a worker
    /// serves as `model`: a rerank job, answered with the `top_n` best
    /// documents (all when `None`), best first
    /// ([`JobResult::into_reranked`]), or a typed error (`unsupported_task`
    /// from a worker serving an embedding model).
    pub async fn rerank(
        &self,
        model: &str,
        query: impl Into<String>,
        documents: Vec<String>,
        top_n: Option<u32>,
    ) -> Result<JobResult, SubmitError> {
        self.submit(Job::rerank(model, query, documents, top_n))
            .await
    }

    /// [`Client::submit`] as part of the caller's trace: `traceparent` (W3C
    /// trace context) travels in the job's `traceparent` header into the
    /// worker's spans. Without one, each job starts a new trace.
    pub async fn submit_traced(
        &self,
        job: Job,
        traceparent: Option<&str>,
    ) -> Result<JobResult, SubmitError> {
        let receiver = self.enqueue(&job, traceparent).await?;
        let timeout = self.inner.config.timeout;
        let outcome = tokio::time::timeout(timeout, receiver).await;
        self.inner
            .pending
            .lock()
            .expect("pending lock")
            .remove(&job.id);
        match outcome {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err(SubmitError::Closed),
            Err(_) => Err(SubmitError::Timeout {
                job_id: job.id,
                after: timeout,
            }),
        }
    }

    /// Submits `jobs` with at most `concurrency` awaiting results at once;
    /// yields `(job id, outcome)` in the order the jobs were given.
    pub fn submit_many<I>(
        &self,
        jobs: I,
        concurrency: usize,
    ) -> impl Stream<Item = (JobId, Result<JobResult, SubmitError>)> + '_
    where
        I: IntoIterator<Item = Job>,
        I::IntoIter: 'static,
    {
        futures::stream::iter(jobs)
            .map(move |job| async move {
                let id = job.id.clone();
                (id, self.submit(job).await)
            })
            .buffered(concurrency.max(1))
    }

    /// Registers the job's waiter and publishes it.
    async fn enqueue(
        &self,
        job: &Job,
        traceparent: Option<&str>,
    ) -> Result<oneshot::Receiver<JobResult>, SubmitError> {
        let (sender, receiver) = oneshot::channel();
        // Register before publishing: the result can beat the PubAck.
        self.inner
            .pending
            .lock()
            .expect("pending lock")
            .insert(job.id.clone(), sender);
        // One trace per job: retries publish the same context.
        let traceparent = traceparent
            .filter(|t| jetinfer_nats::publish::valid_traceparent(t))
            .map(str::to_string)
            .unwrap_or_else(jetinfer_nats::publish::new_traceparent);
        let publish = || {
            jetinfer_nats::publish_job_traced(
                &self.inner.js,
                &self.inner.tenant,
                job,
                &self.inner.inbox,
                Some(&traceparent),
            )
        };
        // Same job id, so JetStream de-duplicates a publish that did land.
        // "No responders" is retried too: it is what a publish gets while
        // the jobs stream elects a leader, not only for a model no worker
        // serves, so an unknown model is reported after the last attempt
        // (about 3 s), never a served one in the middle of an election.
        let published = publish
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(PUBLISH_RETRY_DELAY)
                    .with_max_times(PUBLISH_ATTEMPTS),
            )
            .when(|err| err.is_transient() || matches!(err, PublishJobError::NoStream))
            .await;
        if let Err(err) = published {
            self.inner
                .pending
                .lock()
                .expect("pending lock")
                .remove(&job.id);
            return Err(SubmitError::refused(err, &job.model));
        }
        Ok(receiver)
    }
}
