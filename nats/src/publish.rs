//! Publishing a job: a `Nats-Msg-Id` derived from the job id so JetStream
//! de-duplicates resubmissions, the reply subject in a header, and the
//! PubAck awaited so the caller knows the job is stored.
//!
//! JetStream de-duplicates across the whole stream, whoever published, and
//! every tenant publishes into the same jobs stream. A plain job id as
//! `Nats-Msg-Id` would let one tenant publish another's ids first and have
//! the other's jobs dropped as duplicates. So the id JetStream sees is
//! [`dedup_id`]: the job id, then a tag keyed by a secret of this process
//! and the tenant. This process's retries of a job are still de-duplicated;
//! nobody else can produce the same `Nats-Msg-Id` without the secret.

use async_nats::jetstream::{self, context::PublishErrorKind, publish::PublishAck};
use async_nats::HeaderMap;
use jetinfer_schemas::{encode_job, headers, Job};

use crate::subjects::{self, SubjectError, Tenant};

/// Why a job was not accepted by JetStream.
#[derive(Debug, thiserror::Error)]
pub enum PublishJobError {
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The stream is at a limit and refuses new jobs: back off and retry.
    #[error("the job queue is full: retry later")]
    QueueFull,
    /// This tenant already has its quota of jobs queued for this model
    /// (the stream's per-subject limit); other tenants are unaffected. Back
    /// off and retry once some of its jobs are answered.
    #[error("tenant {tenant} has its quota of jobs queued for model {model}: retry once some are answered")]
    QuotaExceeded { tenant: String, model: String },
    /// No stream listens on the job subject: no worker serves its model here.
    #[error("no jobs stream listens on this model's subject: no worker serves it here")]
    NoStream,
    /// No PubAck arrived in time: the job may or may not be stored. Retrying
    /// with the same job id is safe (JetStream de-duplicates it).
    #[error("JetStream did not acknowledge the job in time; retrying with the same id is safe")]
    Timeout,
    /// The connection dropped while publishing; the client is reconnecting.
    #[error("connection to NATS lost while publishing; retrying with the same id is safe")]
    Disconnected,
    #[error("publishing job: {0}")]
    Other(#[source] jetstream::context::PublishError),
}

impl From<jetstream::context::PublishError> for PublishJobError {
    fn from(err: jetstream::context::PublishError) -> Self {
        match err.kind() {
            PublishErrorKind::TimedOut => Self::Timeout,
            PublishErrorKind::BrokenPipe => Self::Disconnected,
            PublishErrorKind::StreamNotFound => Self::NoStream,
            _ if is_limit_refusal(&err) => Self::QueueFull,
            _ => Self::Other(err),
        }
    }
}

impl PublishJobError {
    /// Classifies a refused publish of a job for `tenant` and `model`.
    fn from_publish(err: jetstream::context::PublishError, tenant: &Tenant, model: &str) -> Self {
        if is_per_subject_refusal(&err) {
            Self::QuotaExceeded {
                tenant: tenant.to_string(),
                model: model.to_string(),
            }
        } else {
            err.into()
        }
    }
}

/// JetStream answers a full stream with discard=new with error code 10077
/// ("maximum messages exceeded") or 10047 ("maximum bytes exceeded").
fn is_limit_refusal(err: &jetstream::context::PublishError) -> bool {
    let text = err.to_string();
    text.contains("maximum messages")
        || text.contains("maximum bytes")
        || text.contains("10077")
        || text.contains("10047")
}

/// With `discard_new_per_subject`, a subject at `max_msgs_per_subject` is
/// refused with "maximum messages per subject exceeded" (also code 10077, so
/// only the text tells it from a full stream).
fn is_per_subject_refusal(err: &jetstream::context::PublishError) -> bool {
    err.to_string().contains("maximum messages per subject")
}

/// Publishes `job` for `tenant`, asking for the result on `reply_to`, and waits
/// until JetStream has stored it. The job starts a new trace (see
/// [`publish_job_traced`] to continue the caller's).
pub async fn publish_job(
    js: &jetstream::Context,
    tenant: &Tenant,
    job: &Job,
    reply_to: &str,
) -> Result<PublishAck, PublishJobError> {
    publish_job_traced(js, tenant, job, reply_to, None).await
}

/// [`publish_job`] with the caller's W3C `traceparent`; without one (or with
/// a malformed one) a new trace is started, so every job carries a header the
/// worker's spans can join.
pub async fn publish_job_traced(
    js: &jetstream::Context,
    tenant: &Tenant,
    job: &Job,
    reply_to: &str,
    traceparent: Option<&str>,
) -> Result<PublishAck, PublishJobError> {
    publish(js, tenant, job, reply_to, traceparent, None).await
}

/// [`publish_job`] for a job of bulk run `run`: the run travels in the
/// `Jetinfer-Bulk-Run` header, so workers can answer it `cancelled` once the
/// run is cancelled.
pub async fn publish_bulk_job(
    js: &jetstream::Context,
    tenant: &Tenant,
    job: &Job,
    reply_to: &str,
    run: &str,
) -> Result<PublishAck, PublishJobError> {
    subjects::check_run_id(run)?;
    publish(js, tenant, job, reply_to, None, Some(run)).await
}

async fn publish(
    js: &jetstream::Context,
    tenant: &Tenant,
    job: &Job,
    reply_to: &str,
    traceparent: Option<&str>,
    bulk_run: Option<&str>,
) -> Result<PublishAck, PublishJobError> {
    let subject = subjects::job(&job.model, tenant)?;
    let mut headers = HeaderMap::new();
    if let Some(run) = bulk_run {
        headers.insert(headers::BULK_RUN, run);
    }
    headers.insert(headers::MSG_ID, dedup_id(tenant, &job.id).as_str());
    headers.insert(headers::REPLY_TO, reply_to);
    let traceparent = match traceparent.filter(|t| valid_traceparent(t)) {
        Some(t) => t.to_string(),
        None => new_traceparent(),
    };
    headers.insert(headers::TRACEPARENT, traceparent.as_str());
    let refused = |err| PublishJobError::from_publish(err, tenant, &job.model);
    let ack = js
        .publish_with_headers(subject, headers, encode_job(job).into())
        .await
        .map_err(refused)?
        .await
        .map_err(refused)?;
    Ok(ack)
}

impl PublishJobError {
    /// Whether publishing the same job again (same id) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout | Self::Disconnected)
    }
}

/// Separates the job id from its de-duplication tag in `Nats-Msg-Id`.
pub const DEDUP_TAG_SEPARATOR: char = '~';
/// Hex digits of the tag: 128 bits, beyond guessing.
const DEDUP_TAG_HEX: usize = 32;
const _: () = assert!(1 + DEDUP_TAG_HEX == headers::DEDUP_TAG_LEN);

/// The `Nats-Msg-Id` of `tenant`'s job `id` from this process:
/// `<id>~<tag>`, the tag being the first 128 bits of
/// SHA-256(process secret, tenant, id). Stable for this process, so its
/// retries are de-duplicated; unpredictable to every other publisher.
pub fn dedup_id(tenant: &Tenant, id: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let secret = SECRET.get_or_init(|| {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the operating system's random source works");
        secret
    });
    let mut hasher = Sha256::new();
    hasher.update(secret);
    for part in [tenant.as_str(), id] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut msg_id = String::with_capacity(id.len() + 1 + DEDUP_TAG_HEX);
    msg_id.push_str(id);
    msg_id.push(DEDUP_TAG_SEPARATOR);
    for byte in &digest[..DEDUP_TAG_HEX / 2] {
        let _ = write!(msg_id, "{byte:02x}");
    }
    msg_id
}

/// The job id inside a `Nats-Msg-Id`: without its [`dedup_id`] tag if it has
/// one (older producers and raw publishers send the bare id).
pub fn job_id_of(msg_id: &str) -> &str {
    let tag_len = 1 + DEDUP_TAG_HEX;
    if msg_id.len() > tag_len && msg_id.is_char_boundary(msg_id.len() - tag_len) {
        let (id, tag) = msg_id.split_at(msg_id.len() - tag_len);
        if let Some(hex) = tag.strip_prefix(DEDUP_TAG_SEPARATOR) {
            if hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return id;
            }
        }
    }
    msg_id
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, ids not all zero.
pub fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

/// A new sampled trace context with random ids.
pub fn new_traceparent() -> String {
    format!(
        "00-{:016x}{:016x}-{:016x}-01",
        random_u64(),
        random_u64(),
        random_u64()
    )
}

/// Random enough for trace ids (not for secrets): std's per-process random
/// hash keys over a clock reading and a counter.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_ids_are_stable_here_and_differ_per_tenant() {
        let acme = Tenant::new("acme").unwrap();
        let globex = Tenant::new("globex").unwrap();
        let id = dedup_id(&acme, "nightly:doc-1");
        assert_eq!(id, dedup_id(&acme, "nightly:doc-1"));
        assert!(id.starts_with("nightly:doc-1~"));
        assert_eq!(id.len(), "nightly:doc-1~".len() + DEDUP_TAG_HEX);
        assert_ne!(id, dedup_id(&globex, "nightly:doc-1"));
        assert_ne!(id, dedup_id(&acme, "nightly:doc-2"));
        assert_eq!(job_id_of(&id), "nightly:doc-1");
        assert_eq!(job_id_of("plain-id"), "plain-id");
        assert_eq!(job_id_of("a~not-a-tag"), "a~not-a-tag");
        // Not a char boundary where a tag would start: left as it is.
        let odd = format!("\u{10000}{}", "0".repeat(DEDUP_TAG_HEX));
        assert_eq!(job_id_of(&odd), odd);
    }

    #[test]
    fn generated_traceparents_are_valid_and_distinct() {
        let a = new_traceparent();
        let b = new_traceparent();
        assert!(valid_traceparent(&a), "{a}");
        assert_ne!(a, b);
        assert!(!valid_traceparent("00-0000-1111-01"));
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
    }
}
