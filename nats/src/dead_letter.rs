//! Dead letters: jobs that will never be answered by a worker (undecodable,
//! invalid, or failed `max_deliver` times) are kept in their own stream with
//! the original payload and headers, the reason, and the delivery count, so an
//! operator can inspect and replay them (`jetinfer dlq ...`).

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use jetinfer_schemas::{escape_within, headers};

use crate::provision::ProvisionError;
use crate::subjects::{self, DEAD_LETTER_STREAM};

/// Header with the reason code (e.g. `invalid_input`, `max_deliveries`).
pub const REASON: &str = "Jetinfer-Dlq-Reason";
/// Header with a human-readable explanation.
pub const DETAIL: &str = "Jetinfer-Dlq-Detail";
/// Header with the subject the job was originally published on.
pub const ORIGINAL_SUBJECT: &str = "Jetinfer-Dlq-Subject";
/// Header with the job id (the original's `Nats-Msg-Id`, which is not kept
/// as such so that JetStream does not de-duplicate dead letters).
pub const JOB_ID: &str = "Jetinfer-Dlq-Job-Id";
/// Header with how many times the job was delivered before it was given up.
pub const DELIVERIES: &str = "Jetinfer-Dlq-Deliveries";
/// Most characters of an invalid job id kept (escaped) in [`JOB_ID`].
const SHOWN_ID_CHARS: usize = 64;
/// How long dead letters are kept.
pub const RETENTION: std::time::Duration = std::time::Duration::from_secs(14 * 24 * 3600);

/// A job being given up on, with why.
pub struct DeadLetter<'a> {
    pub original_subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: Bytes,
    pub reason: &'a str,
    pub detail: &'a str,
    pub deliveries: i64,
}

/// Creates the dead-letter stream (limits retention, file storage), or
/// updates it.
pub async fn provision(js: &jetstream::Context, replicas: usize) -> Result<(), ProvisionError> {
    js.create_or_update_stream(stream::Config {
        name: DEAD_LETTER_STREAM.to_string(),
        subjects: vec![subjects::all_dead_letters()],
        storage: stream::StorageType::File,
        max_age: RETENTION,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|err| ProvisionError::Stream {
        name: DEAD_LETTER_STREAM.to_string(),
        source: err.into(),
    })?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("storing dead letter: {0}")]
pub struct DeadLetterError(String);

/// Stores `letter` in the dead-letter stream and waits for JetStream to
/// confirm, so the original can be settled afterwards without losing it.
pub async fn publish(
    js: &jetstream::Context,
    letter: DeadLetter<'_>,
) -> Result<(), DeadLetterError> {
    let (model, tenant) =
        subjects::parse_job(letter.original_subject).unwrap_or(("unknown", "unknown"));
    let subject = subjects::dead_letter(model, tenant)
        .or_else(|_| subjects::dead_letter("unknown", "unknown"))
        .map_err(|e| DeadLetterError(e.to_string()))?;
    let mut out = HeaderMap::new();
    if let Some(id) = letter.headers.and_then(|h| h.get(headers::MSG_ID)) {
        // A job refused for its id keeps the id only escaped: an operator's
        // `dlq list` must not print what a publisher chose raw.
        let id = id.as_str();
        if headers::valid_msg_id(id) {
            out.insert(JOB_ID, id);
        } else {
            out.insert(JOB_ID, escape_within(id, SHOWN_ID_CHARS).as_str());
        }
    }
    if let Some(original) = letter.headers {
        for (name, values) in original.iter() {
            // The original's de-duplication id must not make JetStream drop a
            // second dead letter of the same job (e.g. after a replay).
            if name.as_ref() as &str == headers::MSG_ID {
                continue;
            }
            for value in values {
                out.append(name.clone(), value.clone());
            }
        }
    }
    out.insert(REASON, letter.reason);
    out.insert(DETAIL, sanitize(letter.detail).as_str());
    out.insert(ORIGINAL_SUBJECT, letter.original_subject);
    out.insert(DELIVERIES, letter.deliveries.to_string().as_str());
    js.publish_with_headers(subject, out, letter.payload)
        .await
        .map_err(|e| DeadLetterError(e.to_string()))?
        .await
        .map_err(|e| DeadLetterError(e.to_string()))?;
    Ok(())
}

/// Header values cannot hold line breaks.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect()
}

/// A dead letter as stored: the original job and why it was given up.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Sequence in the dead-letter stream: what `show` and `replay` take.
    pub sequence: u64,
    pub job_id: String,
    pub reason: String,
    pub detail: String,
    pub original_subject: String,
    pub deliveries: i64,
    pub stored_at: time::OffsetDateTime,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

impl Stored {
    fn from_message(message: jetstream::message::StreamMessage) -> Self {
        let h = &message.headers;
        Self {
            sequence: message.sequence,
            job_id: header(h, JOB_ID),
            reason: header(h, REASON),
            detail: header(h, DETAIL),
            original_subject: header(h, ORIGINAL_SUBJECT),
            deliveries: header(h, DELIVERIES).parse().unwrap_or(0),
            stored_at: message.time,
            headers: message.headers.clone(),
            payload: message.payload,
        }
    }
}

async fn dead_letter_stream(js: &jetstream::Context) -> Result<stream::Stream, DeadLetterError> {
    js.get_stream(DEAD_LETTER_STREAM)
        .await
        .map_err(|e| DeadLetterError(format!("no dead-letter stream {DEAD_LETTER_STREAM}: {e}")))
}

/// Up to `limit` dead letters, oldest first.
pub async fn list(js: &jetstream::Context, limit: usize) -> Result<Vec<Stored>, DeadLetterError> {
    let mut stream = dead_letter_stream(js).await?;
    let state = stream
        .info()
        .await
        .map_err(|e| DeadLetterError(e.to_string()))?
        .state
        .clone();
    let mut letters = Vec::new();
    if state.messages == 0 {
        return Ok(letters);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        if letters.len() >= limit {
            break;
        }
        // Deleted (replayed) sequences leave gaps.
        if let Ok(message) = stream.get_raw_message(sequence).await {
            letters.push(Stored::from_message(message));
        }
    }
    Ok(letters)
}

/// The dead letter at `sequence`.
pub async fn get(js: &jetstream::Context, sequence: u64) -> Result<Stored, DeadLetterError> {
    let stream = dead_letter_stream(js).await?;
    let message = stream
        .get_raw_message(sequence)
        .await
        .map_err(|e| DeadLetterError(format!("dead letter {sequence}: {e}")))?;
    Ok(Stored::from_message(message))
}

/// Publishes the dead letter at `sequence` again on its original subject,
/// with its original headers (so its result goes where it was asked to), then
/// removes it from the dead-letter stream. The job keeps its id; its
/// `Nats-Msg-Id` gets a replay suffix so JetStream's de-duplication does not
/// drop it. Returns the job id.
pub async fn replay(js: &jetstream::Context, sequence: u64) -> Result<String, DeadLetterError> {
    let letter = get(js, sequence).await?;
    if letter.original_subject.is_empty() {
        return Err(DeadLetterError(format!(
            "dead letter {sequence} has no original subject"
        )));
    }
    let mut out = HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name_str: &str = name.as_ref();
        if [
            REASON,
            DETAIL,
            ORIGINAL_SUBJECT,
            DELIVERIES,
            headers::MSG_ID,
        ]
        .contains(&name_str)
        {
            continue;
        }
        for value in values {
            out.append(name.clone(), value.clone());
        }
    }
    out.insert(
        headers::MSG_ID,
        headers::replay_msg_id(&letter.job_id, sequence).as_str(),
    );
    js.publish_with_headers(letter.original_subject.clone(), out, letter.payload.clone())
        .await
        .map_err(|e| DeadLetterError(e.to_string()))?
        .await
        .map_err(|e| DeadLetterError(e.to_string()))?;
    dead_letter_stream(js)
        .await?
        .delete_message(sequence)
        .await
        .map_err(|e| {
            DeadLetterError(format!("replayed, but not removed from dead letters: {e}"))
        })?;
    Ok(letter.job_id)
}
