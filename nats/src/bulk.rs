//! Bulk runs' state. The `JETINFER_BULK` key-value bucket, in the tenant's
//! own account (its producers make it when it is missing), holds one record
//! per run (`run.<tenant>.<run>`: line counts and state, written by the
//! submitting process, read by `jetinfer bulk status`) and a cancel mark per
//! cancelled run (`cancel.<tenant>.<run>`), which the run's submitter polls.
//! Workers cannot read a tenant's bucket: cancelling a run also publishes a
//! notice on `cancels.<tenant>` into the workers' `JETINFER_CANCELS` stream,
//! which they follow ([`follow_cancels`]): a job whose `Jetinfer-Bulk-Run`
//! header names a cancelled run is answered `cancelled` instead of being
//! computed. That stream keeps at most [`MAX_CANCELS_PER_TENANT`] notices per
//! tenant (one subject each), so no tenant can grow it without bound.
//!
//! The results themselves are not here: they are in the results stream on
//! the run's inbox `results.<tenant>.bulk-<run>` (see [`crate::results`]).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::provision::ProvisionError;
use crate::subjects::{self, SubjectError, Tenant, BULK_BUCKET, CANCELS_STREAM};

/// Cancel notices kept per tenant: past it, a tenant's oldest notices make
/// way for its newest (a run cancelled that long ago has no queued jobs
/// left in any reasonable deployment), never another tenant's.
pub const MAX_CANCELS_PER_TENANT: i64 = 1024;
/// Largest cancel notice stored: a run id and nothing else.
const MAX_CANCEL_NOTICE_BYTES: i32 = 64;
/// Largest value in the bucket (a run record is a few hundred bytes).
const MAX_BUCKET_VALUE_BYTES: i32 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BulkStoreError {
    #[error(transparent)]
    Subject(#[from] SubjectError),
    #[error(
        "no {BULK_BUCKET} bucket for this account: no bulk run was submitted here yet (`jetinfer bulk submit` makes it)"
    )]
    NoBucket,
    #[error("bulk bucket: {0}")]
    Kv(String),
    #[error("announcing the cancel to workers: {0}")]
    Notice(String),
    #[error("run record {key} is not readable: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
}

/// Where a run stands, as its submitting process last wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Lines are still being read and submitted.
    Submitting,
    /// Every line was submitted; waiting for the last results.
    Waiting,
    /// Every line has a result or an error.
    Finished,
    /// `jetinfer bulk cancel` was run.
    Cancelled,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Submitting => "submitting",
            Self::Waiting => "waiting",
            Self::Finished => "finished",
            Self::Cancelled => "cancelled",
        })
    }
}

/// A run's record: what the submitter knows that the results stream does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: String,
    pub input: String,
    pub output: String,
    /// Lines in the input file.
    pub lines: u64,
    /// Lines refused before submission (malformed, duplicate `custom_id`).
    pub malformed: u64,
    /// Distinct lines JetStream has accepted as jobs, over every invocation
    /// of the run (finished ones included).
    pub accepted: u64,
    pub state: RunState,
    pub updated_unix_ms: u64,
}

/// Creates the bucket, or updates it. Records and cancel marks age out after
/// `max_age`, as the run's results do (the results stream's `max_age`).
pub async fn provision(
    js: &jetstream::Context,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, ProvisionError> {
    js.create_or_update_key_value(kv::Config {
        bucket: BULK_BUCKET.to_string(),
        description: "jetinfer bulk runs: records and cancel marks".to_string(),
        history: 1,
        max_age,
        max_value_size: MAX_BUCKET_VALUE_BYTES,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|err| ProvisionError::Stream {
        name: BULK_BUCKET.to_string(),
        source: err.into(),
    })
}

/// The bucket, as a worker or a producer of this account provisioned it.
pub async fn bucket(js: &jetstream::Context) -> Result<kv::Store, BulkStoreError> {
    js.get_key_value(BULK_BUCKET)
        .await
        .map_err(|err| match err.kind() {
            jetstream::context::KeyValueErrorKind::GetBucket => BulkStoreError::NoBucket,
            _ => BulkStoreError::Kv(err.to_string()),
        })
}

/// The bucket, made with `max_age` and `replicas` if this account has none
/// yet (a tenant in its own account makes its own; where workers share the
/// account, they made it already and it is left as they made it).
pub async fn ensure_bucket(
    js: &jetstream::Context,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, BulkStoreError> {
    match bucket(js).await {
        Err(BulkStoreError::NoBucket) => provision(js, max_age, replicas)
            .await
            .map_err(|e| BulkStoreError::Kv(e.to_string())),
        found => found,
    }
}

/// Creates the workers' stream of cancel notices, or updates it: one
/// subject per tenant, each keeping its newest [`MAX_CANCELS_PER_TENANT`]
/// notices of at most a run id each, for `max_age`.
pub async fn provision_cancels(
    js: &jetstream::Context,
    max_age: Duration,
    replicas: usize,
) -> Result<jetstream::stream::Stream, ProvisionError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| ProvisionError::Stream {
        name: CANCELS_STREAM.to_string(),
        source,
    };
    js.create_or_update_stream(jetstream::stream::Config {
        name: CANCELS_STREAM.to_string(),
        description: Some("jetinfer: cancelled bulk runs, one subject per tenant".into()),
        subjects: vec![subjects::all_bulk_cancels()],
        storage: jetstream::stream::StorageType::File,
        max_messages_per_subject: MAX_CANCELS_PER_TENANT,
        max_message_size: MAX_CANCEL_NOTICE_BYTES,
        max_age,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|err| failed(err.into()))?;
    js.get_stream(CANCELS_STREAM)
        .await
        .map_err(|err| failed(err.into()))
}

/// Stores `record` as the run's record.
pub async fn put_record(
    kv: &kv::Store,
    tenant: &Tenant,
    record: &RunRecord,
) -> Result<(), BulkStoreError> {
    let key = subjects::bulk_run_key(tenant, &record.run)?;
    let value = serde_json::to_vec(record).expect("a run record always serialises");
    kv.put(key, value.into())
        .await
        .map_err(|e| BulkStoreError::Kv(e.to_string()))?;
    Ok(())
}

/// The run's record, if one was written and has not aged out.
pub async fn get_record(
    kv: &kv::Store,
    tenant: &Tenant,
    run: &str,
) -> Result<Option<RunRecord>, BulkStoreError> {
    let key = subjects::bulk_run_key(tenant, run)?;
    let Some(value) = kv
        .get(key.clone())
        .await
        .map_err(|e| BulkStoreError::Kv(e.to_string()))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&value)
        .map(Some)
        .map_err(|source| BulkStoreError::Decode { key, source })
}

/// Marks the run cancelled in the tenant's bucket (its submitter stops) and
/// tells the workers (they answer its queued jobs `cancelled`). The notice
/// is stored before this returns; a retry after a failure is harmless.
pub async fn cancel(
    js: &jetstream::Context,
    kv: &kv::Store,
    tenant: &Tenant,
    run: &str,
) -> Result<(), BulkStoreError> {
    let key = subjects::bulk_cancel_key(tenant, run)?;
    kv.put(key, bytes::Bytes::from_static(b"cancelled"))
        .await
        .map_err(|e| BulkStoreError::Kv(e.to_string()))?;
    notify_cancel(js, tenant, run).await
}

/// Tells the workers that `run` is cancelled (they answer its queued jobs
/// `cancelled`), with no mark in the bucket: for runs whose submitter learns
/// of the cancel elsewhere (a batch's record). Stored before this returns.
pub async fn notify_cancel(
    js: &jetstream::Context,
    tenant: &Tenant,
    run: &str,
) -> Result<(), BulkStoreError> {
    subjects::check_run_id(run)?;
    js.publish(subjects::bulk_cancels(tenant), run.to_string().into())
        .await
        .map_err(|e| BulkStoreError::Notice(e.to_string()))?
        .await
        .map_err(|e| BulkStoreError::Notice(e.to_string()))?;
    Ok(())
}

/// Whether the run has been cancelled.
pub async fn is_cancelled(
    kv: &kv::Store,
    tenant: &Tenant,
    run: &str,
) -> Result<bool, BulkStoreError> {
    let key = subjects::bulk_cancel_key(tenant, run)?;
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| BulkStoreError::Kv(e.to_string()))?;
    Ok(entry.is_some_and(|e| e.operation == kv::Operation::Put))
}

/// A run cancelled by its tenant, as a worker reads it from the notices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelNotice {
    pub tenant: String,
    pub run: String,
}

/// Every cancel notice stored, then each new one, through an ordered
/// consumer (it recreates itself after a gap or a reconnect). A notice is
/// untrusted input: its tenant comes from the subject (which the server's
/// imports confine), and one whose payload is not a valid run id is skipped
/// and counted in the stream's `Err` items as [`BadNotice`].
pub async fn follow_cancels(
    stream: &jetstream::stream::Stream,
) -> Result<impl Stream<Item = Result<CancelNotice, BadNotice>>, BulkStoreError> {
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::all_bulk_cancels(),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| BulkStoreError::Kv(e.to_string()))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| BulkStoreError::Kv(e.to_string()))?;
    Ok(messages.filter_map(|message| async move {
        let message = match message {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(error = %err, "following bulk cancel notices");
                return None;
            }
        };
        Some(parse_notice(&message.subject, &message.payload))
    }))
}

/// A cancel notice that does not name a tenant and a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cancel notice on {subject} ignored: not a tenant's subject or not a run id")]
pub struct BadNotice {
    /// The subject, escaped and shortened for logs.
    pub subject: String,
}

fn parse_notice(subject: &str, payload: &[u8]) -> Result<CancelNotice, BadNotice> {
    let bad = || BadNotice {
        subject: subjects::shown(subject),
    };
    let tenant = subjects::parse_bulk_cancels(subject).ok_or_else(bad)?;
    let run = std::str::from_utf8(payload).map_err(|_| bad())?;
    subjects::check_run_id(run).map_err(|_| bad())?;
    Ok(CancelNotice {
        tenant: tenant.to_string(),
        run: run.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_is_read_only_when_subject_and_run_id_are_valid() {
        assert_eq!(
            parse_notice("cancels.acme", b"run-1"),
            Ok(CancelNotice {
                tenant: "acme".into(),
                run: "run-1".into()
            })
        );
        for (subject, payload) in [
            ("cancels.acme", &b"a.b"[..]),
            ("cancels.acme", b"\x1b[2J"),
            ("cancels.acme", b"\xff"),
            ("cancels.acme", &[b'r'; 27][..]),
            ("cancels.acme", b""),
            ("cancels.acme.x", b"run-1"),
            ("cancel.acme", b"run-1"),
        ] {
            assert!(
                parse_notice(subject, payload).is_err(),
                "{subject} {payload:?}"
            );
        }
    }
}
