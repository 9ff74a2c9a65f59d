//! The OpenAI Batch API for embeddings, on the bulk machinery: a library the
//! gateway serves as `/v1/files` and `/v1/batches`.
//!
//! Everything lives in the tenant's own NATS account
//! ([`jetinfer_nats::batches`]): files in the `JETINFER_FILES` object store,
//! batch records (the [`Batch`] object) in the `JETINFER_BATCHES` bucket.
//! [`Batches::open`] makes both when missing, as the results stream is made.
//!
//! A batch is a bulk run ([`crate::bulk::run`]) whose run id is the ULID in
//! its id: its jobs are `<run>:<custom_id>` and reply to the run's inbox, so
//! a [`Runner`] started after a restart finds every unfinished batch in the
//! bucket, reads what workers answered from the results stream, resubmits
//! only what has no result (JetStream de-duplicates a job it still holds),
//! and writes each line exactly once. The output and error files are
//! composed on local disk (a temporary directory) and stored in the object
//! store when the batch ends: a resumed batch rebuilds them from the results
//! stream, so a line whose result aged out of it (its `max_age`,
//! `ClientConfig::results_max_age` of the account's first producer, below
//! the 24 h window) is computed again: never lost, never written twice.
//!
//! One runner per batch at a time, across processes: a runner drives a
//! batch only while it holds the lease in the batch's record ([`lease`]),
//! so several gateway replicas may each run a runner for the same tenant;
//! a killed replica's batches are taken over once its leases expire.

mod lease;
pub mod lines;
mod runner;
pub mod types;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use futures::StreamExt;
use jetinfer_nats::batches as store;
use jetinfer_nats::subjects::Tenant;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;

use crate::ClientConfig;
use lease::Record;
pub use lease::{DEFAULT_LEASE_TTL, MIN_LEASE_TTL};
pub use runner::Runner;
pub use types::*;

/// OpenAI's ceiling on a batch input file's size.
pub const MAX_FILE_BYTES: u64 = 200 * 1024 * 1024;
/// OpenAI's ceiling on a batch input file's requests.
pub const MAX_FILE_LINES: u64 = 50_000;
/// Batches per page when `list` is given no limit, and the most it gives.
pub const DEFAULT_LIST_LIMIT: usize = 20;
pub const MAX_LIST_LIMIT: usize = 100;
/// Files per page when `list_files` is given no limit, and the most it
/// gives (OpenAI's).
pub const MAX_FILE_LIST_LIMIT: usize = 10_000;
/// How long batch records are kept (OpenAI keeps batches 30 days).
pub const DEFAULT_RECORDS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// OpenAI's limits on `metadata`.
pub const MAX_METADATA_PAIRS: usize = 16;
pub const MAX_METADATA_KEY_CHARS: usize = 64;
pub const MAX_METADATA_VALUE_CHARS: usize = 512;
/// Longest file name kept.
pub const MAX_FILENAME_BYTES: usize = 255;
/// Attempts of a compare-and-set update of a record before giving up.
const UPDATE_ATTEMPTS: usize = 32;

/// How the Batch API is bounded; the defaults are OpenAI's limits.
#[derive(Debug, Clone)]
pub struct BatchesConfig {
    /// Largest input file, at most [`MAX_FILE_BYTES`].
    pub max_file_bytes: u64,
    /// Most lines in an input file, at most [`MAX_FILE_LINES`].
    pub max_file_lines: u64,
    /// Total bytes of the files object store when this handle makes it (0:
    /// bounded only by the account's storage limit).
    pub store_max_bytes: i64,
    /// How long batch records are kept, when this handle makes the bucket.
    pub records_max_age: Duration,
    /// Requests of one batch awaiting results at once.
    pub in_flight: usize,
    /// Where a running batch composes its files.
    pub work_dir: PathBuf,
    /// How long a runner's lease on a batch lasts unless renewed (at least
    /// [`MIN_LEASE_TTL`]): how soon another replica takes over the batches
    /// of one that died.
    pub lease_ttl: Duration,
}

impl Default for BatchesConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: MAX_FILE_BYTES,
            max_file_lines: MAX_FILE_LINES,
            store_max_bytes: 0,
            records_max_age: DEFAULT_RECORDS_MAX_AGE,
            in_flight: crate::bulk::DEFAULT_IN_FLIGHT,
            work_dir: std::env::temp_dir().join("jetinfer-batches"),
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }
}

/// What went wrong, typed for the gateway's OpenAI error shapes. The mapping
/// expected (status, `type`, `param`, `code`):
///
/// | variant | status | `type` | `param` | `code` |
/// | --- | --- | --- | --- | --- |
/// | [`NotFound`](Self::NotFound) | 404 | `invalid_request_error` | the id's parameter | `null` |
/// | [`Invalid`](Self::Invalid) | 400 | `invalid_request_error` | `param` | `null` |
/// | [`TooLarge`](Self::TooLarge) | 413 | `invalid_request_error` | `file` | `null` |
/// | [`Conflict`](Self::Conflict) | 409 | `invalid_request_error` | `null` | `null` |
/// | [`Store`](Self::Store), [`Connect`](Self::Connect), [`LeaseLost`](Self::LeaseLost) | 503 | `server_error` | `null` | `null` |
///
/// Every message is safe to show a client: ids in it are checked tokens or
/// shortened and escaped.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("no {what} with id {id}")]
    NotFound {
        what: &'static str,
        /// The parameter naming it (`file_id`, `batch_id`, `input_file_id`).
        param: &'static str,
        /// Escaped and shortened.
        id: String,
    },
    #[error("{message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the batch store is unavailable: {0}")]
    Store(String),
    /// This handle's runner no longer holds the batch's lease (another
    /// runner took it over, or it could not be renewed in time). Only the
    /// runner meets it; a route never does.
    #[error("batch {batch}'s lease is not this runner's (held by {owner:?})")]
    LeaseLost {
        batch: String,
        owner: Option<String>,
    },
    #[error(transparent)]
    Connect(#[from] jetinfer_nats::ConnectError),
}

impl BatchError {
    fn not_found(what: &'static str, param: &'static str, id: &str) -> Self {
        Self::NotFound {
            what,
            param,
            id: jetinfer_nats::subjects::shown(id),
        }
    }

    fn store(err: impl std::fmt::Display) -> Self {
        Self::Store(err.to_string())
    }
}

/// A tenant's Batch API: files, batches, and the [`Runner`] that drives
/// them. Cheap to clone.
#[derive(Clone)]
pub struct Batches {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    tenant: Tenant,
    files: object_store::ObjectStore,
    records: kv::Store,
    config: BatchesConfig,
    /// This handle's runner id in batch leases.
    owner: String,
    /// Woken when a batch is created or cancelled here, so this handle's
    /// runner need not wait for its next scan.
    wake: Notify,
}

impl Batches {
    /// Connects as `client` (its tenant and credentials) and makes the
    /// tenant's results stream, files store and records bucket when missing.
    pub async fn open(client: &ClientConfig, config: BatchesConfig) -> Result<Self, BatchError> {
        let tenant = Tenant::new(client.tenant.clone()).map_err(|e| BatchError::Invalid {
            param: "tenant",
            message: e.to_string(),
        })?;
        let nats = jetinfer_nats::connect(&client.nats).await?;
        let js = jetstream::new(nats);
        jetinfer_nats::results::ensure(&js, client.results_max_age, client.replicas)
            .await
            .map_err(BatchError::store)?;
        let files = store::ensure_files(&js, config.store_max_bytes, client.replicas)
            .await
            .map_err(BatchError::store)?;
        let records = store::ensure_records(&js, config.records_max_age, client.replicas)
            .await
            .map_err(BatchError::store)?;
        let config = BatchesConfig {
            max_file_bytes: config.max_file_bytes.clamp(1, MAX_FILE_BYTES),
            max_file_lines: config.max_file_lines.clamp(1, MAX_FILE_LINES),
            in_flight: config.in_flight.max(1),
            lease_ttl: config.lease_ttl.max(MIN_LEASE_TTL),
            ..config
        };
        let owner = format!("{}-{}", std::process::id(), ulid::Ulid::new());
        Ok(Self {
            inner: Arc::new(Inner {
                js,
                tenant,
                files,
                records,
                config,
                owner,
                wake: Notify::new(),
            }),
        })
    }

    /// Starts the runner of this tenant's batches: it resumes every
    /// unfinished one. Dropping the [`Runner`] stops it.
    pub fn runner(&self) -> Runner {
        Runner::start(self.clone())
    }

    /// Stores an input file read from `reader` (streamed in chunks, never
    /// whole in memory). Refused with [`BatchError::TooLarge`] past the
    /// configured bytes or lines; nothing of it is kept then.
    pub async fn create_file(
        &self,
        filename: &str,
        purpose: &str,
        reader: impl AsyncRead + Unpin,
    ) -> Result<FileObject, BatchError> {
        if purpose != PURPOSE_BATCH {
            return Err(BatchError::Invalid {
                param: "purpose",
                message: format!(
                    "purpose {} is not served here: upload batch input files with purpose \"batch\"",
                    jetinfer_nats::subjects::shown(purpose)
                ),
            });
        }
        if filename.is_empty()
            || filename.len() > MAX_FILENAME_BYTES
            || filename.chars().any(char::is_control)
        {
            return Err(BatchError::Invalid {
                param: "file",
                message: format!(
                    "the file name must be 1 to {MAX_FILENAME_BYTES} bytes without control characters"
                ),
            });
        }
        let id = format!("file-{}", ulid::Ulid::new());
        let created_at = now_s();
        let mut limited = Limited {
            inner: reader,
            bytes: 0,
            lines: 0,
            max_bytes: self.inner.config.max_file_bytes,
            max_lines: self.inner.config.max_file_lines,
            over: None,
        };
        let info = self
            .put_file(&id, filename, PURPOSE_BATCH, created_at, &mut limited)
            .await?;
        if let Some(over) = limited.over {
            let _ = self.inner.files.delete(self.object(&id)?).await;
            return Err(BatchError::TooLarge(over));
        }
        Ok(FileObject {
            id,
            object: "file".into(),
            bytes: info.size as u64,
            created_at,
            filename: filename.to_string(),
            purpose: PURPOSE_BATCH.into(),
        })
    }

    async fn put_file(
        &self,
        id: &str,
        filename: &str,
        purpose: &str,
        created_at: i64,
        reader: &mut (impl AsyncRead + Unpin),
    ) -> Result<object_store::ObjectInfo, BatchError> {
        let meta = object_store::ObjectMetadata {
            name: self.object(id)?,
            metadata: HashMap::from([
                ("filename".to_string(), filename.to_string()),
                ("purpose".to_string(), purpose.to_string()),
                ("created_at".to_string(), created_at.to_string()),
            ]),
            ..Default::default()
        };
        self.inner
            .files
            .put(meta, reader)
            .await
            .map_err(BatchError::store)
    }

    fn object(&self, id: &str) -> Result<String, BatchError> {
        store::file_object(&self.inner.tenant, id)
            .map_err(|_| BatchError::not_found("file", "file_id", id))
    }

    /// The file `id`.
    pub async fn file(&self, id: &str) -> Result<FileObject, BatchError> {
        let info = self
            .inner
            .files
            .info(self.object(id)?)
            .await
            .map_err(|err| match err.kind() {
                object_store::InfoErrorKind::NotFound => {
                    BatchError::not_found("file", "file_id", id)
                }
                _ => BatchError::store(err),
            })?;
        if info.deleted {
            return Err(BatchError::not_found("file", "file_id", id));
        }
        let meta = |k: &str| info.metadata.get(k).cloned().unwrap_or_default();
        Ok(FileObject {
            id: id.to_string(),
            object: "file".into(),
            bytes: info.size as u64,
            created_at: meta("created_at").parse().unwrap_or_default(),
            filename: meta("filename"),
            purpose: meta("purpose"),
        })
    }

    /// The content of file `id`, streamed from the object store.
    pub async fn file_content(&self, id: &str) -> Result<FileContent, BatchError> {
        self.file(id).await?;
        self.inner
            .files
            .get(self.object(id)?)
            .await
            .map_err(|err| match err.kind() {
                object_store::GetErrorKind::NotFound => {
                    BatchError::not_found("file", "file_id", id)
                }
                _ => BatchError::store(err),
            })
    }

    /// A page of this tenant's files, newest id first: those with `purpose`
    /// (all when `None`), after file id `after` in that order, at most
    /// `limit` (default and most [`MAX_FILE_LIST_LIMIT`]). Reads every
    /// file's info of the tenant, so it costs as many as the tenant keeps.
    pub async fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<List<FileObject>, BatchError> {
        let limit = page_limit(limit, MAX_FILE_LIST_LIMIT, MAX_FILE_LIST_LIMIT)?;
        let prefix = format!("{}/", self.inner.tenant);
        let mut infos = self.inner.files.list().await.map_err(BatchError::store)?;
        let mut files = Vec::new();
        while let Some(info) = infos.next().await {
            let info = info.map_err(BatchError::store)?;
            let Some(id) = info.name.strip_prefix(&prefix) else {
                continue;
            };
            let meta = |k: &str| info.metadata.get(k).cloned().unwrap_or_default();
            if purpose.is_some_and(|p| meta("purpose") != p) {
                continue;
            }
            if after.is_some_and(|after| id >= after) {
                continue;
            }
            files.push(FileObject {
                id: id.to_string(),
                object: "file".into(),
                bytes: info.size as u64,
                created_at: meta("created_at").parse().unwrap_or_default(),
                filename: meta("filename"),
                purpose: meta("purpose"),
            });
        }
        // File ids carry a ULID: newest first by id, a stable order for `after`.
        files.sort_unstable_by(|a, b| b.id.cmp(&a.id));
        let has_more = files.len() > limit;
        files.truncate(limit);
        Ok(List {
            object: "list".into(),
            first_id: files.first().map(|f| f.id.clone()),
            last_id: files.last().map(|f| f.id.clone()),
            data: files,
            has_more,
        })
    }

    /// Deletes file `id` (a running batch keeps the copy it read).
    pub async fn delete_file(&self, id: &str) -> Result<FileDeleted, BatchError> {
        self.file(id).await?;
        self.inner
            .files
            .delete(self.object(id)?)
            .await
            .map_err(|err| match err.kind() {
                object_store::DeleteErrorKind::NotFound => {
                    BatchError::not_found("file", "file_id", id)
                }
                _ => BatchError::store(err),
            })?;
        Ok(FileDeleted {
            id: id.to_string(),
            object: "file".into(),
            deleted: true,
        })
    }

    /// Creates a batch over input file `input_file_id`, `validating` until a
    /// runner takes it.
    pub async fn create_batch(
        &self,
        input_file_id: &str,
        endpoint: &str,
        completion_window: &str,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<Batch, BatchError> {
        if endpoint != EMBEDDINGS_ENDPOINT {
            return Err(BatchError::Invalid {
                param: "endpoint",
                message: format!(
                    "endpoint {} is not served: batches run {EMBEDDINGS_ENDPOINT}",
                    jetinfer_nats::subjects::shown(endpoint)
                ),
            });
        }
        if completion_window != COMPLETION_WINDOW {
            return Err(BatchError::Invalid {
                param: "completion_window",
                message: format!("completion_window must be {COMPLETION_WINDOW:?}"),
            });
        }
        check_metadata(metadata.as_ref())?;
        let file = self.file(input_file_id).await.map_err(|err| match err {
            BatchError::NotFound { what, id, .. } => BatchError::NotFound {
                what,
                param: "input_file_id",
                id,
            },
            other => other,
        })?;
        if file.purpose != PURPOSE_BATCH {
            return Err(BatchError::Invalid {
                param: "input_file_id",
                message: format!(
                    "file {input_file_id} has purpose {:?}, not \"batch\"",
                    file.purpose
                ),
            });
        }
        let created_at = now_s();
        let batch = Batch {
            id: format!("batch_{}", ulid::Ulid::new()),
            object: "batch".into(),
            endpoint: endpoint.to_string(),
            errors: None,
            input_file_id: input_file_id.to_string(),
            completion_window: completion_window.to_string(),
            status: BatchStatus::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at,
            in_progress_at: None,
            expires_at: Some(created_at + COMPLETION_WINDOW_S),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            metadata,
        };
        let key = self.key(&batch.id)?;
        self.inner
            .records
            .create(
                key,
                Record {
                    batch: batch.clone(),
                    lease: None,
                }
                .encode()
                .into(),
            )
            .await
            .map_err(BatchError::store)?;
        self.inner.wake.notify_waiters();
        Ok(batch)
    }

    fn key(&self, id: &str) -> Result<String, BatchError> {
        store::batch_key(&self.inner.tenant, id)
            .map_err(|_| BatchError::not_found("batch", "batch_id", id))
    }

    /// The batch `id`.
    pub async fn batch(&self, id: &str) -> Result<Batch, BatchError> {
        let key = self.key(id)?;
        let value = self
            .inner
            .records
            .get(key)
            .await
            .map_err(BatchError::store)?
            .ok_or_else(|| BatchError::not_found("batch", "batch_id", id))?;
        Ok(Record::decode(&value)?.batch)
    }

    /// Cancels batch `id`: it submits nothing more, its queued requests are
    /// answered `cancelled` by the workers, and it ends `cancelled` with the
    /// output so far once its runner has the last answers. A finished batch
    /// is a [`BatchError::Conflict`]; one already cancelling is returned as
    /// it is.
    pub async fn cancel(&self, id: &str) -> Result<Batch, BatchError> {
        let mut changed = false;
        let batch = self
            .update(id, |batch| match batch.status {
                BatchStatus::Validating | BatchStatus::InProgress => {
                    batch.status = BatchStatus::Cancelling;
                    batch.cancelling_at = Some(now_s());
                    changed = true;
                    Ok(true)
                }
                BatchStatus::Cancelling | BatchStatus::Cancelled => Ok(false),
                other => Err(BatchError::Conflict(format!(
                    "batch {id} is {other}: only a validating or in-progress batch can be cancelled"
                ))),
            })
            .await?;
        // Once per batch: repeated cancels add no notices to the workers'
        // bounded stream.
        if changed {
            self.notify_workers(&batch).await;
            self.inner.wake.notify_waiters();
        }
        Ok(batch)
    }

    /// Tells the workers the batch's run is cancelled; a failure only means
    /// its queued jobs are computed rather than skipped.
    async fn notify_workers(&self, batch: &Batch) {
        let Some(run) = run_of(&batch.id) else {
            return;
        };
        if let Err(err) =
            jetinfer_nats::bulk::notify_cancel(&self.inner.js, &self.inner.tenant, run).await
        {
            tracing::warn!(batch = %batch.id, error = %err, "telling workers of a cancelled batch failed; its queued requests will be computed");
        }
    }

    /// A page of batches, newest first: those older than `after` (a batch
    /// id), at most `limit` (default [`DEFAULT_LIST_LIMIT`], at most
    /// [`MAX_LIST_LIMIT`]).
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<List<Batch>, BatchError> {
        let limit = page_limit(limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
        let mut ids = self.ids().await?;
        // Batch ids end in a ULID: sorting them sorts by creation time.
        ids.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(after) = after {
            ids.retain(|id| id.as_str() < after);
        }
        let has_more = ids.len() > limit;
        let mut data = Vec::with_capacity(limit.min(ids.len()));
        for id in ids.iter().take(limit) {
            match self.batch(id).await {
                Ok(batch) => data.push(batch),
                // Aged out between the listing and the read.
                Err(BatchError::NotFound { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(List {
            object: "list".into(),
            first_id: data.first().map(|b| b.id.clone()),
            last_id: data.last().map(|b| b.id.clone()),
            data,
            has_more,
        })
    }

    /// Every batch id of this tenant in the bucket.
    async fn ids(&self) -> Result<Vec<String>, BatchError> {
        let mut keys = match self.inner.records.keys().await {
            Ok(keys) => keys,
            Err(err) => return Err(BatchError::store(err)),
        };
        let mut ids = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(BatchError::store)?;
            if let Some(id) = store::parse_batch_key(&self.inner.tenant, &key) {
                ids.push(id.to_string());
            }
        }
        Ok(ids)
    }

    /// Changes batch `id` by compare-and-set: `change` says whether it
    /// changed anything (or refuses); retried when another writer came
    /// first. The lease is kept as it is.
    async fn update(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Batch) -> Result<bool, BatchError>,
    ) -> Result<Batch, BatchError> {
        self.update_record(id, |record| change(&mut record.batch))
            .await
    }

    /// [`Batches::update`] of the whole stored record, lease included.
    async fn update_record(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Record) -> Result<bool, BatchError>,
    ) -> Result<Batch, BatchError> {
        let key = self.key(id)?;
        for _ in 0..UPDATE_ATTEMPTS {
            let entry = self
                .inner
                .records
                .entry(key.clone())
                .await
                .map_err(BatchError::store)?
                .filter(|e| e.operation == kv::Operation::Put)
                .ok_or_else(|| BatchError::not_found("batch", "batch_id", id))?;
            let mut record = Record::decode(&entry.value)?;
            if !change(&mut record)? {
                return Ok(record.batch);
            }
            match self
                .inner
                .records
                .update(key.clone(), record.encode().into(), entry.revision)
                .await
            {
                Ok(_) => return Ok(record.batch),
                Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(err) => return Err(BatchError::store(err)),
            }
        }
        Err(BatchError::Store(format!(
            "batch {id} kept changing under this update"
        )))
    }
}

/// The run id of a batch: the ULID after `batch_`.
fn run_of(id: &str) -> Option<&str> {
    id.strip_prefix("batch_")
        .filter(|run| jetinfer_nats::subjects::check_run_id(run).is_ok())
}

fn check_metadata(metadata: Option<&BTreeMap<String, String>>) -> Result<(), BatchError> {
    let Some(metadata) = metadata else {
        return Ok(());
    };
    let bad = |message: String| BatchError::Invalid {
        param: "metadata",
        message,
    };
    if metadata.len() > MAX_METADATA_PAIRS {
        return Err(bad(format!(
            "metadata has {} pairs, more than {MAX_METADATA_PAIRS}",
            metadata.len()
        )));
    }
    for (key, value) in metadata {
        if key.chars().count() > MAX_METADATA_KEY_CHARS {
            return Err(bad(format!(
                "a metadata key is longer than {MAX_METADATA_KEY_CHARS} characters"
            )));
        }
        if value.chars().count() > MAX_METADATA_VALUE_CHARS {
            return Err(bad(format!(
                "a metadata value is longer than {MAX_METADATA_VALUE_CHARS} characters"
            )));
        }
    }
    Ok(())
}

/// A list request's page size: `default` when none is asked, else from 1 to
/// `max` or `Invalid` on `limit`.
fn page_limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, BatchError> {
    let limit = limit.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(BatchError::Invalid {
            param: "limit",
            message: format!("limit must be from 1 to {max}"),
        })
    }
}

/// A file's content as it is read from the object store.
pub type FileContent = object_store::Object;

/// Counts what passes through and ends the stream early (setting `over`)
/// once it passes a bound, so an upload over its limit stops without an
/// error the object store would leave chunks behind for.
struct Limited<R> {
    inner: R,
    bytes: u64,
    lines: u64,
    max_bytes: u64,
    max_lines: u64,
    over: Option<String>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.over.is_some() {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = &buf.filled()[before..];
            let newlines = read.iter().filter(|&&b| b == b'\n').count() as u64;
            self.bytes += read.len() as u64;
            self.lines += newlines;
            if self.bytes > self.max_bytes {
                self.over = Some(format!(
                    "the file is larger than {} bytes, the most a batch input file may be",
                    self.max_bytes
                ));
            } else if self.lines > self.max_lines {
                self.over = Some(format!(
                    "the file has more than {} lines, the most requests a batch may have",
                    self.max_lines
                ));
            }
        }
        polled
    }
}
