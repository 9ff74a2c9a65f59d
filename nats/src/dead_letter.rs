//! Dead letters: jobs that will never be answered by a worker (undecodable,
//! invalid, or failed `max_deliver` times) are kept in their own stream with
//! the original payload and headers, the reason, and the delivery count, so an
//! operator can inspect and replay them (`jetinfer dlq ...`).
//!
//! A dead letter always fits the server's `max_payload` ([`compose`]): a job
//! close to that limit would otherwise make a letter that can never be stored,
//! and a job that cannot be buried is never settled. So the letter keeps the
//! job's payload whole only when it fits, and otherwise its first bytes, with
//! the original's size, SHA-256 and stream sequence, and says so
//! ([`PAYLOAD_TRUNCATED`]); the job's headers are copied within fixed bounds.
//! A letter that does not keep its job whole cannot be replayed.

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
/// Header with the job's sequence in the jobs stream.
pub const STREAM_SEQ: &str = "Jetinfer-Stream-Seq";
/// Header with the size of the job's original payload, in bytes.
pub const PAYLOAD_SIZE: &str = "Jetinfer-Payload-Size";
/// Header with the SHA-256 of the job's original payload (lower-case hex).
pub const PAYLOAD_SHA256: &str = "Jetinfer-Payload-Sha256";
/// Header present (`true`) when the letter keeps only the first bytes of the
/// job's payload.
pub const PAYLOAD_TRUNCATED: &str = "Jetinfer-Payload-Truncated";
/// Header with how many of the job's header values were dropped or cut to
/// fit; absent when none was.
pub const HEADERS_TRUNCATED: &str = "Jetinfer-Headers-Truncated";
/// The headers a dead letter adds; a job's own headers of these names are
/// never copied, so a job cannot forge what its letter says about it.
const OWN_HEADERS: [&str; 10] = [
    REASON,
    DETAIL,
    ORIGINAL_SUBJECT,
    JOB_ID,
    DELIVERIES,
    STREAM_SEQ,
    PAYLOAD_SIZE,
    PAYLOAD_SHA256,
    PAYLOAD_TRUNCATED,
    HEADERS_TRUNCATED,
];
/// Most characters of an invalid job id kept (escaped) in [`JOB_ID`].
const SHOWN_ID_CHARS: usize = 64;
/// How long dead letters are kept.
pub const RETENTION: std::time::Duration = std::time::Duration::from_secs(14 * 24 * 3600);

/// Most characters kept of the reason and the detail.
pub const MAX_TEXT_CHARS: usize = 512;
/// Most bytes kept of one header value copied from the job (its id included),
/// and of its original subject.
pub const MAX_COPIED_VALUE_BYTES: usize = 1024;
/// Most header values copied from the job.
pub const MAX_COPIED_HEADERS: usize = 32;
/// Most bytes (names and values) of all headers copied from the job.
pub const MAX_COPIED_HEADER_BYTES: usize = 8 * 1024;
/// Bytes kept of a payload that is not kept whole: enough to see what it
/// was; its size and digest identify the rest.
pub const TRUNCATED_PAYLOAD_PREFIX: usize = 8 * 1024;
/// Room left unused under the server's `max_payload`, beyond the exactly
/// counted header block and payload.
const FRAMING_MARGIN: usize = 64;

/// A job being given up on, with why.
pub struct DeadLetter<'a> {
    pub original_subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: Bytes,
    pub reason: &'a str,
    pub detail: &'a str,
    pub deliveries: i64,
    /// The job's sequence in the jobs stream, and when JetStream stored it
    /// there: recorded in the letter, and together its de-duplication id, so
    /// burying the same job twice (a worker that died between storing the
    /// letter and settling the job) keeps one letter.
    pub stream_sequence: Option<u64>,
    pub stored_at: Option<time::OffsetDateTime>,
    /// Longest payload kept whole (a worker passes its `max_job_bytes`: a
    /// larger job can never be answered, so its first bytes and digest are
    /// all a letter needs). Whatever this says, a letter never keeps more
    /// than fits the server's `max_payload`.
    pub max_whole_payload: usize,
}

/// Creates the dead-letter stream (limits retention, file storage), or
/// updates it.
pub async fn provision(js: &jetstream::Context, replicas: usize) -> Result<(), ProvisionError> {
    provision_bounded(js, replicas, DEFAULT_MAX_LETTERS_PER_TENANT).await
}

/// Dead letters kept per model and tenant by default.
pub const DEFAULT_MAX_LETTERS_PER_TENANT: i64 = 10_000;

/// [`provision`], keeping at most `per_tenant` letters on each subject
/// `dlq.<model>.<tenant>`: past it a tenant's oldest letters make way for its
/// newest, never another tenant's. Each letter fits `max_payload`
/// ([`compose`]), so what one tenant can store here is bounded by
/// `per_tenant` x `max_payload` per model.
pub async fn provision_bounded(
    js: &jetstream::Context,
    replicas: usize,
    per_tenant: i64,
) -> Result<(), ProvisionError> {
    js.create_or_update_stream(stream::Config {
        name: DEAD_LETTER_STREAM.to_string(),
        subjects: vec![subjects::all_dead_letters()],
        storage: stream::StorageType::File,
        max_age: RETENTION,
        max_messages_per_subject: per_tenant,
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
pub enum DeadLetterError {
    #[error("storing dead letter: {0}")]
    Store(String),
    #[error(
        "a dead letter of {needed} bytes does not fit the server's max_payload of {max_payload} bytes"
    )]
    NoRoom { needed: usize, max_payload: usize },
    #[error("{0}")]
    Read(String),
    #[error(
        "dead letter {sequence} cannot be replayed: {what}; the original job is not kept \
         whole, so ask its producer to submit it again"
    )]
    Truncated { sequence: u64, what: String },
}

/// A dead letter ready to publish: it fits the server's `max_payload` (its
/// header block plus payload), whatever the job it keeps.
#[derive(Debug)]
pub struct Composed {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// Builds the dead letter of `letter` so that it fits `max_payload`: the
/// letter's own headers first (reason and detail cut to [`MAX_TEXT_CHARS`]),
/// then the job's headers within [`MAX_COPIED_HEADERS`] values and
/// [`MAX_COPIED_HEADER_BYTES`], then the payload: whole when it fits the
/// room left and `letter.max_whole_payload`, else its first bytes (at most
/// [`TRUNCATED_PAYLOAD_PREFIX`]) with [`PAYLOAD_TRUNCATED`]. The original's
/// size and SHA-256 are always recorded.
pub fn compose(letter: &DeadLetter<'_>, max_payload: usize) -> Result<Composed, DeadLetterError> {
    let (model, tenant) =
        subjects::parse_job(letter.original_subject).unwrap_or(("unknown", "unknown"));
    let subject = subjects::dead_letter(model, tenant)
        .or_else(|_| subjects::dead_letter("unknown", "unknown"))
        .map_err(|e| DeadLetterError::Store(e.to_string()))?;
    let mut own = HeaderMap::new();
    let mut cut = 0usize;
    if let Some(id) = letter.headers.and_then(|h| h.get(headers::MSG_ID)) {
        // A job refused for its id keeps the id only escaped and cut short:
        // an operator's `dlq list` must not print what a publisher chose raw.
        let id = id.as_str();
        if headers::valid_msg_id(id) {
            own.insert(JOB_ID, crate::publish::job_id_of(id));
        } else {
            cut += 1;
            own.insert(JOB_ID, escape_within(id, SHOWN_ID_CHARS).as_str());
        }
    }
    let (original_subject, whole) = bounded(letter.original_subject, MAX_COPIED_VALUE_BYTES);
    cut += usize::from(!whole);
    own.insert(REASON, sanitize(letter.reason, MAX_TEXT_CHARS).as_str());
    own.insert(DETAIL, sanitize(letter.detail, MAX_TEXT_CHARS).as_str());
    own.insert(
        ORIGINAL_SUBJECT,
        sanitize(original_subject, usize::MAX).as_str(),
    );
    own.insert(DELIVERIES, letter.deliveries.to_string().as_str());
    if let Some(sequence) = letter.stream_sequence {
        own.insert(STREAM_SEQ, sequence.to_string().as_str());
        if let Some(stored_at) = letter.stored_at {
            let id = format!("{sequence}@{}", stored_at.unix_timestamp_nanos());
            own.insert(headers::MSG_ID, id.as_str());
        }
    }
    own.insert(PAYLOAD_SIZE, letter.payload.len().to_string().as_str());
    own.insert(PAYLOAD_SHA256, sha256_hex(&letter.payload).as_str());

    let (copied, dropped) = copy_headers(letter.headers);
    let mut out = own.clone();
    for (name, value) in &copied {
        out.append(name.as_str(), value.as_str());
    }
    cut += dropped;
    // The truncation marks are counted in before they are known to be needed.
    let marks = header_line(PAYLOAD_TRUNCATED, "true")
        + header_line(HEADERS_TRUNCATED, &usize::MAX.to_string());
    let mut header_bytes = wire_len(&out) + marks + FRAMING_MARGIN;
    if header_bytes > max_payload {
        // The job's headers must give way before the letter's own do.
        cut += copied.len();
        out = own;
        header_bytes = wire_len(&out) + marks + FRAMING_MARGIN;
        if header_bytes > max_payload {
            return Err(DeadLetterError::NoRoom {
                needed: header_bytes,
                max_payload,
            });
        }
    }
    if cut > 0 {
        out.insert(HEADERS_TRUNCATED, cut.to_string().as_str());
    }
    let room = max_payload - header_bytes;
    let payload = if letter.payload.len() <= room.min(letter.max_whole_payload) {
        letter.payload.clone()
    } else {
        out.insert(PAYLOAD_TRUNCATED, "true");
        letter
            .payload
            .slice(..letter.payload.len().min(room).min(TRUNCATED_PAYLOAD_PREFIX))
    };
    // True by the arithmetic above; checked rather than asserted, so a
    // mistake here is a failed burial (counted, retried), never a panic.
    let needed = wire_len(&out) + payload.len();
    if needed > max_payload {
        return Err(DeadLetterError::NoRoom {
            needed,
            max_payload,
        });
    }
    Ok(Composed {
        subject,
        headers: out,
        payload,
    })
}

/// Stores `letter` in the dead-letter stream and waits for JetStream to
/// confirm, so the original can be settled afterwards without losing it.
/// The letter always fits the connected server's `max_payload` ([`compose`]).
pub async fn publish(
    js: &jetstream::Context,
    letter: DeadLetter<'_>,
) -> Result<(), DeadLetterError> {
    let max_payload = js.client().server_info().max_payload;
    let composed = compose(&letter, max_payload)?;
    js.publish_with_headers(composed.subject, composed.headers, composed.payload)
        .await
        .map_err(|e| DeadLetterError::Store(e.to_string()))?
        .await
        .map_err(|e| DeadLetterError::Store(e.to_string()))?;
    Ok(())
}

/// The job's headers to copy into its letter, within the bounds, and how
/// many values were dropped or cut. Its `Nats-Msg-Id` is not copied (the
/// letter has its own; the job id is kept as [`JOB_ID`]), nor headers named
/// like the letter's own.
fn copy_headers(original: Option<&HeaderMap>) -> (Vec<(String, String)>, usize) {
    let mut copied = Vec::new();
    let mut dropped = 0usize;
    let mut bytes = 0usize;
    let Some(original) = original else {
        return (copied, dropped);
    };
    for (name, values) in original.iter() {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(headers::MSG_ID)
            || OWN_HEADERS.iter().any(|own| own.eq_ignore_ascii_case(name))
        {
            continue;
        }
        for value in values {
            let (value, whole) = bounded(value.as_str(), MAX_COPIED_VALUE_BYTES);
            let size = name.len() + value.len();
            if copied.len() >= MAX_COPIED_HEADERS
                || name.len() > MAX_COPIED_VALUE_BYTES
                || bytes + size > MAX_COPIED_HEADER_BYTES
            {
                dropped += 1;
                continue;
            }
            dropped += usize::from(!whole);
            bytes += size;
            copied.push((name.to_string(), sanitize(value, usize::MAX)));
        }
    }
    (copied, dropped)
}

/// At most `max` bytes of `text`, cut at a character boundary, and whether
/// it is whole.
fn bounded(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, true);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], false)
}

/// Header values cannot hold line breaks; no control character is kept.
fn sanitize(text: &str, max_chars: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect()
}

/// Bytes of `headers` as sent: `NATS/1.0\r\n`, one `name: value\r\n` per
/// value, `\r\n` (what the server counts against `max_payload`).
fn wire_len(headers: &HeaderMap) -> usize {
    let mut len = "NATS/1.0\r\n".len() + "\r\n".len();
    for (name, values) in headers.iter() {
        for value in values {
            len += header_line(name.as_ref(), value.as_str());
        }
    }
    len
}

fn header_line(name: &str, value: &str) -> usize {
    name.len() + ": ".len() + value.len() + "\r\n".len()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
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
    /// The job's sequence in the jobs stream (letters from older workers
    /// do not record it).
    pub stream_sequence: Option<u64>,
    /// The original payload's size and SHA-256, when recorded.
    pub original_size: Option<u64>,
    pub original_sha256: Option<String>,
    /// The letter keeps only the first `payload.len()` bytes of the job.
    pub payload_truncated: bool,
    /// How many of the job's header values were dropped or cut.
    pub headers_truncated: u64,
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
            stream_sequence: header(h, STREAM_SEQ).parse().ok(),
            original_size: header(h, PAYLOAD_SIZE).parse().ok(),
            original_sha256: h.get(PAYLOAD_SHA256).map(|v| v.as_str().to_string()),
            payload_truncated: h.get(PAYLOAD_TRUNCATED).is_some(),
            headers_truncated: header(h, HEADERS_TRUNCATED).parse().unwrap_or(0),
            headers: message.headers.clone(),
            payload: message.payload,
        }
    }

    /// What the letter does not keep of its job, in words (`None`: it keeps
    /// the job whole, and can be replayed).
    pub fn truncation(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.payload_truncated {
            let size = self
                .original_size
                .map_or_else(|| "?".to_string(), |s| s.to_string());
            let digest = self.original_sha256.as_deref().unwrap_or("unknown");
            parts.push(format!(
                "payload truncated to its first {} of {size} bytes (sha256 {digest})",
                self.payload.len()
            ));
        }
        if self.headers_truncated > 0 {
            parts.push(format!(
                "{} header values dropped or cut",
                self.headers_truncated
            ));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

async fn dead_letter_stream(js: &jetstream::Context) -> Result<stream::Stream, DeadLetterError> {
    js.get_stream(DEAD_LETTER_STREAM).await.map_err(|e| {
        DeadLetterError::Read(format!("no dead-letter stream {DEAD_LETTER_STREAM}: {e}"))
    })
}

/// Up to `limit` dead letters, oldest first.
pub async fn list(js: &jetstream::Context, limit: usize) -> Result<Vec<Stored>, DeadLetterError> {
    let mut stream = dead_letter_stream(js).await?;
    let state = stream
        .info()
        .await
        .map_err(|e| DeadLetterError::Read(e.to_string()))?
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
        .map_err(|e| DeadLetterError::Read(format!("dead letter {sequence}: {e}")))?;
    Ok(Stored::from_message(message))
}

/// Publishes the dead letter at `sequence` again on its original subject,
/// with its original headers (so its result goes where it was asked to), then
/// removes it from the dead-letter stream. The job keeps its id; its
/// `Nats-Msg-Id` gets a replay suffix so JetStream's de-duplication does not
/// drop it. Returns the job id. A letter that does not keep its job whole
/// ([`Stored::truncation`]) is refused: replaying part of a job would run
/// something nobody submitted.
pub async fn replay(js: &jetstream::Context, sequence: u64) -> Result<String, DeadLetterError> {
    let letter = get(js, sequence).await?;
    if let Some(what) = letter.truncation() {
        return Err(DeadLetterError::Truncated { sequence, what });
    }
    if letter.original_subject.is_empty() {
        return Err(DeadLetterError::Read(format!(
            "dead letter {sequence} has no original subject"
        )));
    }
    let mut out = HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name_str: &str = name.as_ref();
        if name_str == headers::MSG_ID || OWN_HEADERS.contains(&name_str) {
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
        .map_err(|e| DeadLetterError::Store(e.to_string()))?
        .await
        .map_err(|e| DeadLetterError::Store(e.to_string()))?;
    dead_letter_stream(js)
        .await?
        .delete_message(sequence)
        .await
        .map_err(|e| {
            DeadLetterError::Read(format!("replayed, but not removed from dead letters: {e}"))
        })?;
    Ok(letter.job_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_PAYLOAD: usize = 2 * 1024 * 1024;

    fn letter<'a>(headers: Option<&'a HeaderMap>, payload: Bytes) -> DeadLetter<'a> {
        DeadLetter {
            original_subject: "jobs.minilm.acme",
            headers,
            payload,
            reason: "invalid_input",
            detail: "bad",
            deliveries: 1,
            stream_sequence: Some(7),
            stored_at: Some(time::OffsetDateTime::UNIX_EPOCH),
            max_whole_payload: MAX_PAYLOAD,
        }
    }

    fn fits(composed: &Composed, max_payload: usize) -> bool {
        wire_len(&composed.headers) + composed.payload.len() <= max_payload
    }

    #[test]
    fn wire_len_counts_what_async_nats_sends() {
        let mut h = HeaderMap::new();
        h.insert("A", "b");
        h.append("A", "cd");
        h.insert(REASON, "x");
        let expected = "NATS/1.0\r\nA: b\r\nA: cd\r\nJetinfer-Dlq-Reason: x\r\n\r\n";
        assert_eq!(wire_len(&h), expected.len());
    }

    #[test]
    fn a_small_job_is_kept_whole_with_its_size_digest_and_sequence() {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, "job-1");
        h.insert(headers::REPLY_TO, "results.acme.c");
        let composed = compose(&letter(Some(&h), Bytes::from_static(b"abc")), MAX_PAYLOAD).unwrap();
        assert_eq!(&composed.payload[..], b"abc");
        let got = |name: &str| composed.headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(got(PAYLOAD_TRUNCATED), None);
        assert_eq!(got(HEADERS_TRUNCATED), None);
        assert_eq!(got(PAYLOAD_SIZE).as_deref(), Some("3"));
        assert_eq!(
            got(PAYLOAD_SHA256).as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(got(STREAM_SEQ).as_deref(), Some("7"));
        assert_eq!(got(JOB_ID).as_deref(), Some("job-1"));
        assert_eq!(got(headers::REPLY_TO).as_deref(), Some("results.acme.c"));
        // Its own de-duplication id, not the job's.
        assert_eq!(got(headers::MSG_ID).as_deref(), Some("7@0"));
        assert_eq!(composed.subject, "dlq.minilm.acme");
    }

    #[test]
    fn a_job_just_under_max_payload_gets_a_truncated_letter_that_fits() {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, "job-1");
        for size in [MAX_PAYLOAD - 200, MAX_PAYLOAD - 42, MAX_PAYLOAD] {
            let payload = Bytes::from(vec![b'x'; size]);
            let composed = compose(&letter(Some(&h), payload), MAX_PAYLOAD).unwrap();
            assert!(fits(&composed, MAX_PAYLOAD), "{size}");
            assert_eq!(composed.payload.len(), TRUNCATED_PAYLOAD_PREFIX);
            assert!(composed.headers.get(PAYLOAD_TRUNCATED).is_some());
            assert_eq!(
                composed.headers.get(PAYLOAD_SIZE).unwrap().as_str(),
                size.to_string()
            );
        }
    }

    #[test]
    fn a_payload_over_the_whole_bound_is_truncated_even_when_it_would_fit() {
        let mut l = letter(None, Bytes::from(vec![b'x'; 100_000]));
        l.max_whole_payload = 50_000;
        let composed = compose(&l, MAX_PAYLOAD).unwrap();
        assert_eq!(composed.payload.len(), TRUNCATED_PAYLOAD_PREFIX);
        assert!(composed.headers.get(PAYLOAD_TRUNCATED).is_some());
    }

    #[test]
    fn hostile_headers_are_bounded_and_cannot_forge_the_letter() {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, "i".repeat(5000).as_str());
        h.insert(PAYLOAD_TRUNCATED.to_lowercase().as_str(), "false");
        h.insert(REASON, "forged");
        for i in 0..100 {
            h.insert(format!("X-Big-{i}").as_str(), "v".repeat(3000).as_str());
        }
        let composed = compose(&letter(Some(&h), Bytes::from_static(b"p")), MAX_PAYLOAD).unwrap();
        let out = &composed.headers;
        assert_eq!(out.get(REASON).unwrap().as_str(), "invalid_input");
        assert!(out.get(PAYLOAD_TRUNCATED.to_lowercase().as_str()).is_none());
        // An invalid id is kept escaped and cut to a few dozen characters.
        assert!(out.get(JOB_ID).unwrap().as_str().len() <= SHOWN_ID_CHARS + 8);
        let copied: usize = out
            .iter()
            .filter(|(n, _)| {
                let n: &str = n.as_ref();
                n.starts_with("X-Big-")
            })
            .map(|(n, v)| {
                let n: &str = n.as_ref();
                v.iter().map(|v| n.len() + v.as_str().len()).sum::<usize>()
            })
            .sum();
        assert!(copied <= MAX_COPIED_HEADER_BYTES, "{copied}");
        // 100 values, the id cut, all counted.
        let cut: usize = out
            .get(HEADERS_TRUNCATED)
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        assert!(cut >= 100 - MAX_COPIED_HEADERS, "{cut}");
        assert_eq!(&composed.payload[..], b"p");
    }

    #[test]
    fn on_a_tiny_max_payload_the_jobs_headers_give_way_and_the_letter_still_fits() {
        let mut h = HeaderMap::new();
        h.insert("X-Pad", "v".repeat(1000).as_str());
        let max = 1200;
        let composed = compose(&letter(Some(&h), Bytes::from(vec![0u8; 4096])), max).unwrap();
        assert!(fits(&composed, max));
        assert!(composed.headers.get("X-Pad").is_none());
        assert!(composed.headers.get(HEADERS_TRUNCATED).is_some());
        assert!(composed.headers.get(PAYLOAD_TRUNCATED).is_some());
        let err = compose(&letter(None, Bytes::new()), 300).unwrap_err();
        assert!(matches!(err, DeadLetterError::NoRoom { .. }), "{err}");
    }

    #[test]
    fn every_size_of_payload_and_header_fits() {
        let mut h = HeaderMap::new();
        for (max, pad, size) in [
            (65_536, 0, 65_536),
            (65_536, 7_000, 60_000),
            (1_048_576, 8_000, 1_048_000),
            (MAX_PAYLOAD, 8_192, MAX_PAYLOAD - 8_300),
        ] {
            h.insert("X-Pad", "v".repeat(pad).as_str());
            let composed = compose(&letter(Some(&h), Bytes::from(vec![1u8; size])), max).unwrap();
            assert!(fits(&composed, max), "{max} {pad} {size}");
        }
    }
}
