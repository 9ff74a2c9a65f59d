//! Durable results. Workers publish each result through JetStream into the
//! `JETINFER_RESULTS` stream (subjects `results.>`) and ack the job only once
//! JetStream has stored the result. A producer reads its inbox from the
//! stream ([`follow_after`], an ordered consumer), so one that was
//! disconnected (its own network, or a server restart) resumes after the
//! last stream sequence it saw instead of waiting for ever for a job that was
//! answered and acked. A plain subscriber on an inbox still gets results live,
//! since a stream does not hide a subject from plain subscribers.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures::StreamExt;
use time::OffsetDateTime;

use crate::provision::ProvisionError;
use crate::subjects::{self, RESULTS_STREAM};

/// How long results are kept for late readers by default.
pub const DEFAULT_RESULTS_MAX_AGE: Duration = Duration::from_secs(3600);
/// Messages fetched per request while catching up.
const CATCH_UP_BATCH: usize = 256;

/// Creates the results stream (limits retention, old results age out), or
/// updates it.
pub async fn provision(
    js: &jetstream::Context,
    max_age: Duration,
    replicas: usize,
) -> Result<(), ProvisionError> {
    js.create_or_update_stream(stream::Config {
        name: RESULTS_STREAM.to_string(),
        subjects: vec![subjects::all_results()],
        storage: stream::StorageType::File,
        max_age,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|err| ProvisionError::Stream {
        name: RESULTS_STREAM.to_string(),
        source: err.into(),
    })?;
    Ok(())
}

/// Makes the results stream with `max_age` and `replicas` if this account
/// has none: a tenant with an account of its own keeps its results there,
/// made by its producers. Where workers share the account they made it, and
/// it is left as they made it.
pub async fn ensure(
    js: &jetstream::Context,
    max_age: Duration,
    replicas: usize,
) -> Result<(), ProvisionError> {
    match js.get_stream(RESULTS_STREAM).await {
        Ok(_) => Ok(()),
        Err(err) if crate::provision::is_not_found(&err) => provision(js, max_age, replicas).await,
        Err(err) => Err(ProvisionError::Stream {
            name: RESULTS_STREAM.to_string(),
            source: err.into(),
        }),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("publishing result to {subject}: {message}")]
pub struct ResultPublishError {
    pub subject: String,
    pub message: String,
}

/// Publishes a result to `reply_to` and waits until it is stored. A reply
/// subject outside the results stream (a producer using a plain inbox) gets a
/// plain publish and flush: delivered live or not at all, as it asked.
pub async fn publish(
    client: &async_nats::Client,
    js: &jetstream::Context,
    reply_to: &str,
    payload: Bytes,
) -> Result<(), ResultPublishError> {
    let failed = |message: String| ResultPublishError {
        subject: reply_to.to_string(),
        message,
    };
    // A result on `results.>` belongs in a results stream: "no responders"
    // there means the stream cannot take it now (a leader election, a
    // tenant's stream being made), not that nobody keeps results, so it is a
    // failure to retry. Acking the job after a plain publish instead would
    // lose the result for a client that was away.
    let must_store = reply_to.starts_with(&format!("{}.", subjects::RESULTS_PREFIX));
    if !must_store {
        return plain(client, reply_to, payload).await.map_err(failed);
    }
    match js.publish(reply_to.to_string(), payload).await {
        Ok(ack) => match ack.await {
            Ok(_) => Ok(()),
            Err(err) if err.kind() == PublishErrorKind::StreamNotFound => Err(failed(
                "no results stream took it (a leader election, or the tenant's stream is missing): retried later".into(),
            )),
            Err(err) => Err(failed(err.to_string())),
        },
        Err(err) => Err(failed(err.to_string())),
    }
}

async fn plain(client: &async_nats::Client, subject: &str, payload: Bytes) -> Result<(), String> {
    client
        .publish(subject.to_string(), payload)
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())
}

/// Every stored result on `inbox` since `since`, oldest first, read through a
/// short-lived consumer. The consumer reads the stream replica on its own
/// server: right after a server of a cluster restarts, that replica may not
/// yet hold the newest results, so a caller that must see everything waits
/// until the stream's replicas are current (stream info) or reads again.
pub async fn since(
    js: &jetstream::Context,
    inbox: &str,
    since: OffsetDateTime,
) -> Result<Vec<Bytes>, String> {
    let stream = js
        .get_stream(RESULTS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    // Named, so the create request's subject carries the filter
    // (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<inbox>`): a server that
    // confines producers to `results.<tenant>.>` can then refuse a consumer
    // on another tenant's results. The name is the unguessable tail of a
    // fresh inbox.
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            name: Some(consumer_name(js, "catch-up")),
            filter_subject: inbox.to_string(),
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: since },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut payloads = Vec::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(CATCH_UP_BATCH)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let before = payloads.len();
        while let Some(message) = batch.next().await {
            payloads.push(message.map_err(|e| e.to_string())?.payload.clone());
        }
        if payloads.len() == before {
            return Ok(payloads);
        }
    }
}

/// `<purpose>-<the unguessable tail of a fresh inbox>`: a consumer name
/// nobody else can predict.
fn consumer_name(js: &jetstream::Context, purpose: &str) -> String {
    let inbox = js.client().new_inbox();
    format!("{purpose}-{}", inbox.rsplit('.').next().unwrap_or_default())
}

/// Every result stored on `inbox`, oldest first, then each new one as it is
/// stored, through an ordered consumer (it recreates itself after a gap or a
/// reconnect). Also returns how many results were stored when it started:
/// once the reader has seen a message whose `info().pending` is 0 (or at
/// once, if this is 0), it has caught up with the stream.
pub async fn follow(
    js: &jetstream::Context,
    inbox: &str,
) -> Result<(u64, consumer::pull::Ordered), String> {
    let consumer = ordered(js, inbox, 0).await?;
    let stored = consumer
        .clone()
        .info()
        .await
        .map_err(|e| e.to_string())?
        .num_pending;
    let messages = consumer.messages().await.map_err(|e| e.to_string())?;
    Ok((stored, messages))
}

/// Every result stored on `inbox` after stream sequence `after` (all of them
/// when `after` is 0), then each new one as it is stored, through an ordered
/// consumer. The ordered consumer resumes by sequence on its own after a
/// missed heartbeat or a lost consumer; a reader whose stream ended with an
/// error calls this again with the last sequence it saw, so nothing between
/// is skipped and nothing depends on a delay.
pub async fn follow_after(
    js: &jetstream::Context,
    inbox: &str,
    after: u64,
) -> Result<consumer::pull::Ordered, String> {
    ordered(js, inbox, after)
        .await?
        .messages()
        .await
        .map_err(|e| e.to_string())
}

async fn ordered(
    js: &jetstream::Context,
    inbox: &str,
    after: u64,
) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>, String> {
    let stream = js
        .get_stream(RESULTS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let deliver_policy = match after {
        0 => consumer::DeliverPolicy::All,
        seq => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
    };
    // Named, as in `since`, so the filter is in the create request's subject
    // where the server's permissions can confine it.
    stream
        .create_consumer(consumer::pull::OrderedConfig {
            name: Some(consumer_name(js, "follow")),
            filter_subject: inbox.to_string(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())
}
