//! Jobs that had all their deliveries. The model's consumer redelivers
//! without limit (`jetinfer_nats::provision::consumer_config`) and the worker
//! counts: the [`Settler`] buries a job whose last allowed delivery
//! (`consumer.max_deliver`) fails, and intake buries one that arrives after
//! it ([`bury_arrived`]: its worker died on the last one). So a job past its
//! deliveries stays deliverable until some worker buries it, and burying needs
//! no MAX_DELIVERIES advisory: advisories are core NATS messages, lost when
//! no worker listens (nats-server #7284).
//!
//! What this cannot reach are jobs JetStream itself stopped delivering: ones
//! that exhausted a consumer with a finite `max_deliver` (made by an older
//! worker, or edited by hand), which raising it does not revive. [`sweep`]
//! finds and buries those, from the jobs stream, whenever the consumer holds
//! no job in flight: then every job at or below its last delivered sequence
//! that is still in the stream is one JetStream gave up on.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use async_nats::HeaderMap;
use jetinfer_nats::subjects::{self, ReplyPolicy};
use jetinfer_schemas::headers;
use tokio_util::sync::CancellationToken;

use crate::settle::{Delivery, Held, Settler};

/// Time between sweeps. Jobs past their deliveries are found by intake;
/// the sweep is for the ones JetStream no longer delivers, which only
/// configuration changes make, so it can be slow.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Most jobs one sweep buries (the next sweep goes on).
pub const SWEEP_MAX_JOBS: usize = 256;

/// Buries a job that arrived past its last delivery, without running it: an
/// error reply only where `reply` allows the job's reply subject.
pub async fn bury_arrived(settler: &Settler, delivery: &Delivery, reply: &ReplyPolicy) {
    let delivered = delivery.delivered();
    let (reply_to, job_id) = reply_and_id(delivery.subject(), delivery.headers(), reply);
    settler
        .exhausted(
            Held::Delivered(delivery),
            reply_to.as_deref(),
            &job_id,
            // The deliveries it had, not counting this one that buries it.
            delivered - 1,
        )
        .await;
}

/// The job's reply subject where the policy allows it, and its id.
fn reply_and_id(
    subject: &str,
    headers: Option<&HeaderMap>,
    reply: &ReplyPolicy,
) -> (Option<String>, String) {
    let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    let reply_to = get(headers::REPLY_TO)
        .filter(|r| reply.check(subject, r).is_ok())
        .map(str::to_string);
    (
        reply_to,
        get(headers::MSG_ID).unwrap_or_default().to_string(),
    )
}

/// What the sweep needs: the model's consumer and the jobs stream.
pub struct Sweep {
    pub settler: Settler,
    pub consumer: PullConsumer,
    pub stream: Stream,
    pub model: String,
    pub reply: ReplyPolicy,
    /// Deliveries JetStream gave a job it stopped delivering: the worker's
    /// `consumer.max_deliver` (what the old consumer had, in every
    /// deployment that kept one setting).
    pub max_deliver: i64,
}

/// Sweeps at start and every [`SWEEP_INTERVAL`] until `stop`.
pub async fn sweep(sweep: Sweep, stop: CancellationToken) {
    let mut sweep = sweep;
    loop {
        match sweep.once().await {
            Ok(0) => {}
            Ok(buried) => tracing::warn!(buried, "buried jobs JetStream had stopped delivering"),
            Err(err) => {
                tracing::warn!(error = %err, "sweep for undeliverable jobs failed; trying again later")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
    }
}

impl Sweep {
    /// One sweep: how many jobs it buried (or tried to; a failure is counted
    /// by the Settler and the job is left for the next sweep).
    pub async fn once(&mut self) -> Result<usize, async_nats::Error> {
        let info = self.consumer.info().await?.clone();
        // With a job in flight, a stored job below the delivered sequence may
        // be that one: nothing can be told apart, so wait for a quiet moment.
        if info.num_ack_pending > 0 {
            return Ok(0);
        }
        let last = info.delivered.stream_sequence;
        let filter = subjects::jobs_for_model(&self.model)?;
        let mut next = info.ack_floor.stream_sequence + 1;
        let mut buried = 0;
        while next <= last && buried < SWEEP_MAX_JOBS {
            let found = self
                .stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(filter.clone())
                .send()
                .await;
            let message = match found {
                Ok(message) if message.sequence <= last => message,
                Ok(_) => break,
                Err(err) if matches!(err.kind(), RawMessageErrorKind::NoMessageFound) => break,
                Err(err) => return Err(err.into()),
            };
            next = message.sequence + 1;
            self.bury(&message).await;
            buried += 1;
        }
        Ok(buried)
    }

    async fn bury(&self, message: &StreamMessage) {
        let (reply_to, job_id) =
            reply_and_id(&message.subject, Some(&message.headers), &self.reply);
        self.settler
            .exhausted(
                Held::Stored {
                    message,
                    stream: &self.stream,
                },
                reply_to.as_deref(),
                &job_id,
                self.max_deliver,
            )
            .await;
    }
}
