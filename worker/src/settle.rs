//! Settling jobs: the one module that holds JetStream messages and so the
//! one that can ack, NAK or terminate them.
//!
//! Intake wraps each message it pulls in a [`Delivery`] at once; the
//! message inside is private to this module, so other code can read a
//! delivery (subject, headers, payload, metadata) but only a [`Settler`]
//! method can settle it.
//!
//! A job ends in exactly one of three ways, and every path goes through
//! [`Settler`]:
//! - answered: result or error reply published and flushed, then acked (with
//!   the double ack, so the worker knows JetStream took it);
//! - retried: NAKed with a growing delay, for failures that may pass;
//! - given up: error reply (when it has an allowed reply subject), stored as
//!   a dead letter with its reason, then terminated. A job whose reply
//!   subject the reply policy forbids gets no reply at all: dead letter
//!   (`forbidden_reply_subject`), then terminated.
//!
//! The Settler also counts deliveries: the consumer redelivers without limit,
//! and a job whose last allowed delivery (`consumer.max_deliver`) fails, or
//! that arrives once more after it, is given up here (`max_deliveries`), so
//! burying it never waits for an advisory nobody may hear (see
//! [`crate::exhausted`]).
//!
//! Below every stage: it imports the shared job types ([`crate::job`]) and
//! config, never a stage.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::Info;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::{self, AckKind, Message};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::future::join_all;
use jetinfer_nats::dead_letter::{self, DeadLetter};
use jetinfer_nats::results;
use jetinfer_nats::subjects::ForbiddenReply;
use jetinfer_schemas::{encode_result, ErrorCode, JobError, JobResult, Outcome, Task, Untrusted};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::config::RetryConfig;
use crate::job::{InFlightJob, Ledger};

/// Longest a double ack waits for JetStream's confirmation (async-nats's
/// JetStream default).
const ACK_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// A job message as JetStream delivered it. Anyone may read it; only this
/// module reaches the message, so only the [`Settler`] acks, NAKs or
/// terminates it.
///
/// Other code reads a delivery:
///
/// ```no_run
/// fn job_subject(delivery: &jetinfer_worker::settle::Delivery) -> &str {
///     delivery.subject()
/// }
/// ```
///
/// and cannot reach the message to settle it (the field is private):
///
/// ```compile_fail,E0616
/// async fn ack_behind_the_settlers_back(delivery: &jetinfer_worker::settle::Delivery) {
///     let _ = delivery.message.ack().await;
/// }
/// ```
pub struct Delivery {
    message: Message,
}

impl Delivery {
    /// Takes `message` out of reach of everything but the Settler.
    pub fn new(message: Message) -> Self {
        Self { message }
    }

    pub fn subject(&self) -> &str {
        &self.message.subject
    }

    pub fn headers(&self) -> Option<&HeaderMap> {
        self.message.headers.as_ref()
    }

    pub fn payload(&self) -> &Bytes {
        &self.message.payload
    }

    /// The JetStream metadata: stream sequence, deliveries, when stored.
    pub fn info(&self) -> Result<Info<'_>, async_nats::Error> {
        self.message.info()
    }

    /// How many times JetStream has delivered the job, this time included
    /// (1 when its metadata cannot be read).
    pub fn delivered(&self) -> i64 {
        self.info().map(|i| i.delivered).unwrap_or(1)
    }
}

/// Settles jobs. Shared by intake (jobs refused on arrival), the publish stage
/// (results), the progress ticker and the drain.
#[derive(Clone)]
pub struct Settler {
    client: async_nats::Client,
    /// The model name jobs are addressed to: the `model` label of metrics.
    model: Arc<str>,
    /// What the model does: the `task` label of metrics.
    task: Task,
    js: jetstream::Context,
    ledger: Arc<Ledger>,
    retry: RetryConfig,
    /// Deliveries a job gets (`consumer.max_deliver`; 0 or less: no limit).
    max_deliver: i64,
    /// Longest payload a dead letter keeps whole (the worker's `max_job_bytes`).
    max_whole_payload: usize,
}

/// A job being settled: delivered to this worker (settled with acks), or
/// read from the jobs stream by the sweep (settled by deleting it).
#[derive(Clone, Copy)]
pub enum Held<'a> {
    Delivered(&'a Delivery),
    Stored {
        message: &'a StreamMessage,
        stream: &'a Stream,
    },
}

impl Held<'_> {
    fn subject(&self) -> &str {
        match self {
            Held::Delivered(d) => d.subject(),
            Held::Stored { message, .. } => &message.subject,
        }
    }

    fn headers(&self) -> Option<&HeaderMap> {
        match self {
            Held::Delivered(d) => d.headers(),
            Held::Stored { message, .. } => Some(&message.headers),
        }
    }

    fn payload(&self) -> &Bytes {
        match self {
            Held::Delivered(d) => d.payload(),
            Held::Stored { message, .. } => &message.payload,
        }
    }

    /// The job's sequence in the jobs stream and when it was stored there.
    fn stored(&self) -> Option<(u64, OffsetDateTime)> {
        match self {
            Held::Delivered(d) => d.info().ok().map(|i| (i.stream_sequence, i.published)),
            Held::Stored { message, .. } => Some((message.sequence, message.time)),
        }
    }

    /// Ends the job for good: terminated, or deleted from the stream.
    async fn finish(&self) -> Result<(), String> {
        match self {
            Held::Delivered(d) => d
                .message
                .ack_with(AckKind::Term)
                .await
                .map_err(|e| e.to_string()),
            Held::Stored { message, stream } => stream
                .delete_message(message.sequence)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }

    /// Leaves the job to be tried again after `delay`. A stored job needs
    /// nothing: it stays in the stream for the next sweep.
    async fn again(&self, delay: Duration) {
        if let Held::Delivered(d) = self {
            let _ = d.message.ack_with(AckKind::Nak(Some(delay))).await;
        }
    }
}

impl Settler {
    pub fn new(
        client: async_nats::Client,
        model: String,
        task: Task,
        ledger: Arc<Ledger>,
        retry: RetryConfig,
    ) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            client,
            model: model.into(),
            task,
            js,
            ledger,
            retry,
            max_deliver: jetinfer_nats::ConsumerSettings::default().max_deliver,
            max_whole_payload: jetinfer_schemas::Limits::default().max_job_bytes,
        }
    }

    /// The settler giving jobs `max_deliver` deliveries (0 or less: no
    /// limit) and keeping payloads up to `max_whole_payload` bytes whole in
    /// dead letters.
    pub fn with_limits(mut self, max_deliver: i64, max_whole_payload: usize) -> Self {
        self.max_deliver = max_deliver;
        self.max_whole_payload = max_whole_payload;
        self
    }

    /// Whether a job delivered `delivered` times has had all its deliveries:
    /// a failure now is its last.
    pub fn last_delivery(&self, delivered: i64) -> bool {
        self.max_deliver > 0 && delivered >= self.max_deliver
    }

    /// Whether a job arriving for the `delivered`th time is past its last
    /// delivery (its worker died on the last one): it is buried unrun.
    pub fn past_last_delivery(&self, delivered: i64) -> bool {
        self.max_deliver > 0 && delivered > self.max_deliver
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Takes an admitted job into the ledger until it is settled.
    pub fn admitted(&self, job: &Arc<InFlightJob>) {
        self.ledger.insert(job);
    }

    /// Every settled admitted job leaves the ledger here (which moves the
    /// in-flight gauge).
    fn release(&self, job: &InFlightJob) {
        self.ledger.remove(job);
    }

    /// Publishes each reply into the results stream and, once JetStream has
    /// stored it, double-acks the job. A job whose reply was not stored is
    /// NAKed instead: its result is not known to be kept, so it must run
    /// again rather than be lost.
    pub async fn answer(&self, answered: Vec<(Arc<InFlightJob>, JobResult)>) {
        let stored = join_all(answered.iter().map(|(job, result)| async move {
            let _span = job.span.enter();
            results::publish(
                &self.client,
                &self.js,
                &job.reply_to,
                encode_result(result).into(),
            )
            .await
        }))
        .await;
        let mut kept = Vec::with_capacity(answered.len());
        for ((job, result), stored) in answered.into_iter().zip(stored) {
            match stored {
                Ok(()) => {
                    record_finished(&self.model, self.task, &job, &result);
                    kept.push(job);
                }
                Err(err) => {
                    tracing::warn!(job = %Untrusted(&job.id), error = %Untrusted(&err), "result not stored; retrying the job");
                    self.retry_later(&job).await;
                }
            }
        }
        join_all(kept.iter().map(|job| self.settle(job, AckKind::Ack))).await;
    }

    /// NAKs `job` so JetStream redelivers it after the retry policy's delay;
    /// on its last delivery, buries it instead (`max_deliveries`).
    pub async fn retry_later(&self, job: &InFlightJob) {
        if self.last_delivery(job.delivered) {
            self.exhausted(
                Held::Delivered(job.delivery()),
                Some(&job.reply_to),
                &job.id,
                job.delivered,
            )
            .instrument(job.span.clone())
            .await;
            self.release(job);
            return;
        }
        let delay = self.retry.delay(job.delivered);
        self.settle(job, AckKind::Nak(Some(delay))).await;
    }

    /// Buries a job that had all its deliveries: an `internal` error reply
    /// to `reply_to` (which must be allowed by the reply policy), a dead
    /// letter with reason `max_deliveries`, then the job is ended.
    pub async fn exhausted(
        &self,
        held: Held<'_>,
        reply_to: Option<&str>,
        job_id: &str,
        deliveries: i64,
    ) {
        let error = JobError::new(
            ErrorCode::Internal,
            format!(
                "gave up after {deliveries} deliveries: the job failed or crashed its worker every time"
            ),
        );
        let reason = jetinfer_monitoring::REASON_MAX_DELIVERIES;
        tracing::warn!(
            job = job_id,
            deliveries,
            "job had all its deliveries; burying it"
        );
        self.refuse(
            held,
            reply_to,
            job_id,
            &error,
            Some((reason, reason)),
            deliveries,
        )
        .await;
    }

    /// The model name jobs are addressed to (the `model` label of metrics).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// What the model does (the `task` label of its metrics).
    pub fn task(&self) -> Task {
        self.task
    }

    /// NAKs a delivery that was never admitted for immediate redelivery to
    /// any worker (intake, for what arrives after it stopped).
    pub async fn hand_back_unread(&self, delivery: Delivery) {
        if let Err(err) = delivery.message.ack_with(AckKind::Nak(None)).await {
            tracing::warn!(error = %Untrusted(&err), "handing back a job failed; it returns after ack_wait");
        }
    }

    /// NAKs `job` for immediate redelivery to any worker (used by the drain).
    pub async fn hand_back(&self, job: &InFlightJob) {
        self.settle(job, AckKind::Nak(None)).await;
    }

    async fn settle(&self, job: &InFlightJob, kind: AckKind) {
        let outcome = match kind {
            AckKind::Ack => self.double_ack(job.delivery()).await,
            other => job.delivery().message.ack_with(other).await,
        };
        if let Err(err) = outcome {
            tracing::warn!(job = %Untrusted(&job.id), error = %Untrusted(&err), "settling job failed; JetStream will redeliver it");
        }
        self.release(job);
    }

    /// The double ack: `+ACK` sent as a request, so JetStream's answer
    /// confirms it took the ack, and a lost ack shows up here rather than as
    /// a silent redelivery later. Sent through the client's one shared
    /// request inbox, as JetStream publishes are: async-nats's own
    /// `double_ack` subscribes to a fresh inbox and unsubscribes again for
    /// every job, which cost the worker and the server a subscription per
    /// job (docs/benchmarks.md, "the queue's own cost"). A reply that says
    /// nobody took the ack (no responders) is a failure here, where that
    /// `double_ack` counted any reply as confirmation.
    async fn double_ack(&self, delivery: &Delivery) -> Result<(), async_nats::Error> {
        let Some(ack_subject) = delivery.message.reply.clone() else {
            return Err("no reply subject: not a JetStream message".into());
        };
        let request = async_nats::Request::new()
            .payload(AckKind::Ack.into())
            .timeout(Some(ACK_CONFIRM_TIMEOUT));
        self.client.send_request(ack_subject, request).await?;
        Ok(())
    }

    /// Pushes everything buffered (replies, acks, NAKs) to the server: a
    /// process that exits without it loses its last NAKs and acks.
    pub async fn flush(&self) {
        if let Err(err) = self.client.flush().await {
            tracing::warn!(error = %Untrusted(&err), "final flush failed");
        }
    }

    /// Sends a progress ack so JetStream keeps waiting for a job still queued
    /// or running here.
    pub async fn keep_alive(&self, job: &InFlightJob) {
        if let Err(err) = job.delivery().message.ack_with(AckKind::Progress).await {
            tracing::debug!(job = %Untrusted(&job.id), error = %Untrusted(&err), "progress ack failed");
        }
    }

    /// Replies `error` (when there is a reply subject) and terminates the
    /// message; with `keep`, the job is also stored in the dead-letter
    /// stream. The reply is stored in the results stream and confirmed first;
    /// if neither it nor a dead letter is kept, or the dead letter cannot be
    /// stored, the message is NAKed instead: never dropped without a trace.
    ///
    /// `reply_to` must be a subject the reply policy allowed (intake screens
    /// it before anything is published).
    pub async fn give_up(
        &self,
        delivery: &Delivery,
        reply_to: Option<&str>,
        job_id: &str,
        error: JobError,
        keep: bool,
    ) {
        let burial = keep.then(|| {
            let metric = if reply_to.is_some() {
                error.code.as_str()
            } else {
                jetinfer_monitoring::REASON_NO_REPLY_SUBJECT
            };
            (error.code.as_str(), metric)
        });
        let delivered = delivery.delivered();
        self.refuse(
            Held::Delivered(delivery),
            reply_to,
            job_id,
            &error,
            burial,
            delivered,
        )
        .await;
    }

    /// Buries a job whose reply subject the reply policy forbids: a dead
    /// letter with reason `forbidden_reply_subject`, then terminated. Nothing
    /// is published to the reply subject.
    pub async fn forbid_reply(&self, delivery: &Delivery, job_id: &str, why: &ForbiddenReply) {
        let error = JobError::new(ErrorCode::InvalidInput, why.to_string());
        let reason = jetinfer_monitoring::REASON_FORBIDDEN_REPLY_SUBJECT;
        tracing::warn!(job = %Untrusted(job_id), subject = %Untrusted(delivery.subject()), reason = %Untrusted(why), "reply subject forbidden");
        let delivered = delivery.delivered();
        self.refuse(
            Held::Delivered(delivery),
            None,
            job_id,
            &error,
            Some((reason, reason)),
            delivered,
        )
        .await;
    }

    /// `burial`: the dead-letter reason stored, and the one counted.
    async fn refuse(
        &self,
        held: Held<'_>,
        reply_to: Option<&str>,
        job_id: &str,
        error: &JobError,
        burial: Option<(&str, &str)>,
        deliveries: i64,
    ) {
        tracing::info!(
            job = %Untrusted(job_id),
            code = %error.code,
            reason = %Untrusted(&error.message),
            "job refused"
        );
        if reply_to.is_some() {
            jetinfer_monitoring::job_finished(
                &self.model,
                self.task.as_str(),
                error.code.as_str(),
                since_stored(&held),
            );
        }
        if let Some(reply_to) = reply_to {
            let result = JobResult::error(job_id.to_string(), error.clone());
            let stored = results::publish(
                &self.client,
                &self.js,
                reply_to,
                encode_result(&result).into(),
            )
            .await;
            if let Err(err) = stored {
                if burial.is_none() {
                    tracing::warn!(job = %Untrusted(job_id), error = %Untrusted(&err), "error reply not stored; retrying the job");
                    held.again(self.retry.delay(deliveries)).await;
                    return;
                }
                tracing::warn!(job = %Untrusted(job_id), error = %Untrusted(&err), "publishing error reply failed; the dead letter keeps the job");
            }
        }
        if let Some((reason, metric)) = burial {
            let stored = held.stored();
            let letter = DeadLetter {
                original_subject: held.subject(),
                headers: held.headers(),
                payload: held.payload().clone(),
                reason,
                detail: &error.message,
                deliveries,
                stream_sequence: stored.map(|(seq, _)| seq),
                stored_at: stored.map(|(_, at)| at),
                max_whole_payload: self.max_whole_payload,
            };
            if let Err(err) = dead_letter::publish(&self.js, letter).await {
                tracing::error!(job = %Untrusted(job_id), error = %Untrusted(&err), "dead letter not stored; the job stays in the stream and is tried again");
                jetinfer_monitoring::job_not_buried(&self.model, metric);
                held.again(self.retry.max_delay).await;
                return;
            }
            jetinfer_monitoring::job_dead_lettered(&self.model, metric);
        }
        if let Err(err) = held.finish().await {
            tracing::warn!(job = %Untrusted(job_id), error = %Untrusted(&err), "ending the job failed");
        }
    }

    /// Gives up on an admitted job (held in the ledger).
    pub async fn give_up_job(&self, job: &InFlightJob, error: JobError, keep: bool) {
        self.give_up(job.delivery(), Some(&job.reply_to), &job.id, error, keep)
            .await;
        self.release(job);
    }
}

fn record_finished(model: &str, task: Task, job: &InFlightJob, result: &JobResult) {
    let task = task.as_str();
    let outcome = match &result.outcome {
        Outcome::Ok(e) => {
            jetinfer_monitoring::job_queue_wait(
                model,
                task,
                Duration::from_micros(e.timings.queue_wait_us),
            );
            jetinfer_monitoring::OUTCOME_OK
        }
        Outcome::Reranked(r) => {
            jetinfer_monitoring::job_queue_wait(
                model,
                task,
                Duration::from_micros(r.timings.queue_wait_us),
            );
            jetinfer_monitoring::OUTCOME_OK
        }
        Outcome::Error(err) => err.code.as_str(),
    };
    let stored = (OffsetDateTime::now_utc() - job.published).try_into().ok();
    jetinfer_monitoring::job_finished(model, task, outcome, stored);
    tracing::debug!(job = %Untrusted(&job.id), outcome, "job answered");
}

/// Time since JetStream stored the job, when its metadata says.
fn since_stored(held: &Held<'_>) -> Option<Duration> {
    let (_, published) = held.stored()?;
    (OffsetDateTime::now_utc() - published).try_into().ok()
}
