//! Bulk runs' shared state: the `JETINFER_BULK` key-value bucket. It holds
//! one record per run (`run.<tenant>.<run>`: line counts and state, written
//! by the submitting process, read by `jetinfer bulk status`) and a cancel
//! mark per cancelled run (`cancel.<tenant>.<run>`), which workers watch:
//! a job whose `Jetinfer-Bulk-Run` header names a cancelled run is answered
//! `cancelled` instead of being computed.
//!
//! The results themselves are not here: they are in the results stream on
//! the run's inbox `results.<tenant>.bulk-<run>` (see [`crate::results`]).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::provision::ProvisionError;
use crate::subjects::{self, SubjectError, Tenant, BULK_BUCKET};

#[derive(Debug, thiserror::Error)]
pub enum BulkStoreError {
    #[error(transparent)]
    Subject(#[from] SubjectError),
    #[error(
        "no {BULK_BUCKET} bucket on this server: start a worker (it provisions the bucket) first"
    )]
    NoBucket,
    #[error("bulk bucket: {0}")]
    Kv(String),
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

/// The bucket, as a worker provisioned it.
pub async fn bucket(js: &jetstream::Context) -> Result<kv::Store, BulkStoreError> {
    js.get_key_value(BULK_BUCKET)
        .await
        .map_err(|err| match err.kind() {
            jetstream::context::KeyValueErrorKind::GetBucket => BulkStoreError::NoBucket,
            _ => BulkStoreError::Kv(err.to_string()),
        })
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

/// Marks the run cancelled: workers answer its queued jobs `cancelled`.
pub async fn cancel(kv: &kv::Store, tenant: &Tenant, run: &str) -> Result<(), BulkStoreError> {
    let key = subjects::bulk_cancel_key(tenant, run)?;
    kv.put(key, bytes::Bytes::from_static(b"cancelled"))
        .await
        .map_err(|e| BulkStoreError::Kv(e.to_string()))?;
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

/// A change to a run's cancel mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelMark {
    pub tenant: String,
    pub run: String,
    /// False when the mark was deleted (the run may be resumed).
    pub cancelled: bool,
}

/// Every cancel mark now in the bucket, then each change as it happens.
pub async fn watch_cancels(
    kv: &kv::Store,
) -> Result<impl Stream<Item = CancelMark>, BulkStoreError> {
    let watch = kv
        .watch_with_history(subjects::all_bulk_cancels())
        .await
        .map_err(|e| BulkStoreError::Kv(e.to_string()))?;
    Ok(watch.filter_map(|entry| async move {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                tracing::warn!(error = %err, "watching bulk cancel marks");
                return None;
            }
        };
        let (tenant, run) = subjects::parse_bulk_cancel_key(&entry.key)?;
        Some(CancelMark {
            tenant: tenant.to_string(),
            run: run.to_string(),
            cancelled: entry.operation == kv::Operation::Put,
        })
    }))
}
