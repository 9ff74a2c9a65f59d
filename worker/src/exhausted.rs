//! Jobs JetStream stopped delivering: when a job reaches its consumer's
//! `max_deliver` (it kept failing, or kept crashing workers), JetStream
//! publishes a MAX_DELIVERIES advisory and leaves the message in the stream,
//! undeliverable. This task turns each into a dead letter: it answers the
//! job's reply subject (if the reply policy allows it) with an `internal` error, stores the job in the
//! dead-letter stream with reason `max_deliveries`, then deletes it from the
//! jobs stream. Workers share the advisory in a queue group, so one handles it.

use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt;
use jetinfer_nats::dead_letter::{self, DeadLetter};
use jetinfer_nats::subjects::{self, ReplyPolicy};
use jetinfer_schemas::{encode_result, headers, ErrorCode, JobError, JobResult, Untrusted};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The fields of `io.nats.jetstream.advisory.v1.max_deliver` used here.
#[derive(Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: i64,
}

pub async fn run(
    client: async_nats::Client,
    stream: Stream,
    consumer: String,
    reply: ReplyPolicy,
    shutdown: CancellationToken,
) {
    let stream_name = stream.cached_info().config.name.clone();
    let subject = subjects::max_deliveries_advisory(&stream_name, &consumer);
    let group = format!("jetinfer-exhausted-{consumer}");
    let mut advisories = match client.queue_subscribe(subject, group).await {
        Ok(subscriber) => subscriber,
        Err(err) => {
            tracing::error!(error = %Untrusted(&err), "cannot watch max-deliveries advisories");
            return;
        }
    };
    let js = jetstream::new(client.clone());
    loop {
        let advisory = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = advisories.next() => match next {
                Some(message) => message,
                None => return,
            },
        };
        let Ok(advisory) = serde_json::from_slice::<MaxDeliveries>(&advisory.payload) else {
            tracing::warn!("unreadable max-deliveries advisory");
            continue;
        };
        bury(&client, &js, &stream, &reply, advisory).await;
    }
}

async fn bury(
    client: &async_nats::Client,
    js: &jetstream::Context,
    stream: &Stream,
    reply: &ReplyPolicy,
    advisory: MaxDeliveries,
) {
    let message = match stream.get_raw_message(advisory.stream_seq).await {
        Ok(message) => message,
        // Another worker got here first, or the job was answered after all.
        Err(err) => {
            tracing::debug!(seq = advisory.stream_seq, error = %Untrusted(&err), "exhausted job no longer in stream");
            return;
        }
    };
    let detail = format!(
        "gave up after {} deliveries: the job failed or crashed its worker every time",
        advisory.deliveries
    );
    let job_id = message
        .headers
        .get(headers::MSG_ID)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let letter = DeadLetter {
        original_subject: &message.subject,
        headers: Some(&message.headers),
        payload: message.payload.clone(),
        reason: "max_deliveries",
        detail: &detail,
        deliveries: advisory.deliveries,
    };
    if let Err(err) = dead_letter::publish(js, letter).await {
        // Leave it in the jobs stream: nothing is lost, an operator can act.
        tracing::error!(seq = advisory.stream_seq, error = %Untrusted(&err), "exhausted job not moved to dead letters");
        return;
    }
    // The same reply policy as intake: a job that never got past it (its
    // dead letter could not be stored) must not get a reply here either.
    let reply_to = message
        .headers
        .get(headers::REPLY_TO)
        .filter(|r| reply.check(&message.subject, r.as_str()).is_ok());
    if let Some(reply_to) = reply_to {
        let result = JobResult::error(
            job_id.clone(),
            JobError::new(ErrorCode::Internal, detail.clone()),
        );
        if let Err(err) = jetinfer_nats::results::publish(
            client,
            js,
            reply_to.as_str(),
            encode_result(&result).into(),
        )
        .await
        {
            tracing::warn!(job = %Untrusted(&job_id), error = %Untrusted(&err), "error reply for exhausted job not sent");
        }
    }
    if let Err(err) = stream.delete_message(advisory.stream_seq).await {
        tracing::warn!(seq = advisory.stream_seq, error = %Untrusted(&err), "exhausted job not deleted from jobs stream");
    }
    if let Some((model, _)) = subjects::parse_job(&message.subject) {
        jetinfer_monitoring::job_dead_lettered(model, jetinfer_monitoring::REASON_MAX_DELIVERIES);
        jetinfer_monitoring::job_finished(model, ErrorCode::Internal.as_str(), None);
    }
    tracing::warn!(job = %Untrusted(&job_id), deliveries = advisory.deliveries, "job moved to dead letters");
}
