//! The jetinfer client library: submit embedding jobs to JetStream and await
//! their results.
//!
//! A [`Client`] owns one result inbox (`results.<tenant>.<client-id>`); every
//! job it submits names that inbox as its reply subject, and a dispatcher task
//! routes each arriving result to the caller waiting for that job id. A
//! result for a job nobody waits for (a late or duplicate one) is dropped, so
//! a caller never sees two results for one job.
//!
//! Results are also kept in JetStream's results stream: after the client's
//! connection comes back (its network dropped, or the server restarted), it
//! reads the results published to its inbox while it was away, so an answered
//! job is never waited on for ever. Where the tenant has a NATS account of its
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

pub mod bulk;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use backon::{ExponentialBuilder, Retryable};
use futures::{Stream, StreamExt};
use jetinfer_nats::subjects::{self, SubjectError, Tenant, DEFAULT_TENANT};
use jetinfer_nats::{NatsConfig, PublishJobError};
use jetinfer_schemas::{decode_result, Job, JobId, JobResult};
use tokio::sync::oneshot;

/// How long [`Client::submit`] waits for a result by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Publish attempts when JetStream does not acknowledge in time.
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

/// Results are read back from a little before the disconnect was noticed.
const CATCH_UP_MARGIN: time::Duration = time::Duration::seconds(10);

/// How long a catch-up keeps retrying while JetStream elects leaders after
/// a server loss: as long as a waiting job would wait by default.
const CATCH_UP_FOR: Duration = Duration::from_secs(120);

/// After the first read, the catch-up reads once more this much later: a
/// result stored after that read but before the new subscription's interest
/// reached the worker's server went to nobody.
const CATCH_UP_SETTLE: Duration = Duration::from_secs(2);

/// Routes every result stored for `inbox` since `since`: those published
/// while the connection was down never reached the live subscription.
///
/// Runs as its own task: right after a server loss the JetStream API may not
/// answer for seconds (a new meta leader), so reading is retried, and live
/// results keep flowing meanwhile. Results routed twice are harmless: the
/// second finds no waiter.
async fn catch_up_results(
    js: jetstream::Context,
    inbox: String,
    since: time::OffsetDateTime,
    routes: Pending,
) {
    let read = || jetinfer_nats::results::since(&js, &inbox, since);
    for pass in 0..2 {
        if pass > 0 {
            tokio::time::sleep(CATCH_UP_SETTLE).await;
        }
        let missed = read
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(250))
                    .with_max_delay(Duration::from_secs(5))
                    .with_total_delay(Some(CATCH_UP_FOR))
                    .without_max_times(),
            )
            .notify(|err, after| {
                tracing::debug!(error = %err, retry_in = ?after, "catching up on results: JetStream not answering yet");
            })
            .await;
        match missed {
            Ok(missed) => {
                tracing::info!(
                    results = missed.len(),
                    pass,
                    "reconnected; caught up on results"
                );
                for payload in missed {
                    route(&routes, &payload);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "catching up on results failed");
                return;
            }
        }
    }
}

/// Hands a result to the caller waiting for its job, if any.
fn route(pending: &Pending, payload: &[u8]) {
    match decode_result(payload) {
        Ok(result) => {
            let waiter = pending.lock().expect("pending lock").remove(&result.job_id);
            match waiter {
                Some(waiter) => {
                    let _ = waiter.send(result);
                }
                None => {
                    tracing::debug!(job = %result.job_id, "result nobody waits for (late or duplicate); dropped")
                }
            }
        }
        Err(err) => tracing::warn!(error = %err, "undecodable result dropped"),
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
        let (events, mut connection) = tokio::sync::mpsc::unbounded_channel();
        let nats = jetinfer_nats::connect_with_events(&config.nats, move |event| {
            let _ = events.send(event);
        })
        .await?;
        let inbox = subjects::result_inbox(&tenant, &ulid::Ulid::new().to_string())?;
        let mut results = nats.subscribe(inbox.clone()).await?;
        let pending: Pending = Arc::default();
        let routes = Arc::clone(&pending);
        let js = jetstream::new(nats.clone());
        jetinfer_nats::results::ensure(&js, config.results_max_age, config.replicas).await?;
        let catch_up = (js.clone(), inbox.clone());
        let dispatcher = tokio::spawn(async move {
            let mut away_since = None;
            loop {
                tokio::select! {
                    message = results.next() => match message {
                        Some(message) => route(&routes, &message.payload),
                        None => return,
                    },
                    Some(event) = connection.recv() => match event {
                        async_nats::Event::Disconnected => {
                            away_since.get_or_insert(time::OffsetDateTime::now_utc());
                        }
                        async_nats::Event::Connected => {
                            if let Some(since) = away_since.take() {
                                tokio::spawn(catch_up_results(
                                    catch_up.0.clone(),
                                    catch_up.1.clone(),
                                    since - CATCH_UP_MARGIN,
                                    Arc::clone(&routes),
                                ));
                            }
                        }
                        _ => {}
                    },
                }
            }
        });
        Ok(Self {
            inner: Arc::new(Inner {
                js,
                tenant,
                inbox,
                pending,
                config,
                dispatcher,
            }),
        })
    }

    /// The subject results for this client arrive on.
    pub fn inbox(&self) -> &str {
        &self.inner.inbox
    }

    /// Publishes `job`, waits until JetStream stored it, then waits for its
    /// result (embeddings or a typed error) up to the configured timeout.
    pub async fn submit(&self, job: Job) -> Result<JobResult, SubmitError> {
        self.submit_traced(job, None).await
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
        let published = publish
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(PUBLISH_RETRY_DELAY)
                    .with_max_times(PUBLISH_ATTEMPTS - 1),
            )
            // Same job id, so JetStream de-duplicates a publish that did land.
            .when(PublishJobError::is_transient)
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
