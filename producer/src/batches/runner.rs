//! The runner: drives every unfinished batch of a tenant to its end, and
//! resumes them after a restart. Each batch, in order:
//!
//! 1. its input file is copied from the object store to local disk
//!    (streamed) and checked: line count, duplicate `custom_id`s (the batch
//!    fails validation, as OpenAI's does), each request's output options;
//! 2. it runs as a bulk run ([`crate::bulk::run::drive`]) whose run id is
//!    the batch's ULID: results already in the results stream are written
//!    first, then every line without one is submitted (a job JetStream still
//!    holds is de-duplicated), bad lines go to the error file;
//! 3. every tick the record's `request_counts` are updated, and a record
//!    turned `cancelling` (or a passed `expires_at`) stops submitting and
//!    tells the workers, which answer the queued jobs `cancelled`;
//! 4. the output and error files are stored under ids derived from the
//!    batch (`file-<run>-output`, `file-<run>-errors`: a batch resumed while
//!    finalizing overwrites, never duplicates), then the record is final.
//!
//! A batch is driven only under its lease ([`super::lease`]): each scan
//! takes the lease of every unfinished batch that has none or an expired
//! one, and a drive stops where it stands when its lease is lost.
//!
//! Role in shutdown: the [`Runner`] owns one task, which owns one task per
//! batch it drives (a `JoinSet`). [`Runner::stop`] ends them, waits for
//! them and gives their leases up, so another replica takes the batches at
//! its next scan; dropping the runner aborts them where they stand and the
//! leases lapse after their TTL. Nothing is lost either way: the next
//! runner resumes each batch from the record and the results stream.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jetinfer_schemas::{Embeddings, JobError};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::lines::{self, LineOptions};
use super::{now_s, run_of, Batch, BatchError, BatchErrorData, BatchErrors, BatchStatus, Batches};
use crate::bulk::input::{self, read_bounded, Read};
use crate::bulk::run::{self, Counts, Driver, Refusal, Tick};
use crate::bulk::{BulkError, CustomIdHasher, LINE_BUFFER};

/// How often the runner looks for batches it does not drive yet (made by
/// another handle, or left by a failed attempt); batches made or cancelled
/// through its own handle wake it at once.
const RESCAN: Duration = Duration::from_secs(5);
/// Validation errors kept in a failed batch's record.
const MAX_VALIDATION_ERRORS: usize = 32;

/// Drives a tenant's batches until stopped or dropped. See the module docs.
pub struct Runner {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Runner {
    pub(super) fn start(batches: Batches) -> Self {
        let stop = CancellationToken::new();
        Self {
            task: tokio::spawn(run_all(batches, stop.clone())),
            stop,
        }
    }

    /// Stops driving: every batch's drive ends where it stands, then its
    /// lease is given up (best effort: one that is not expires).
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

async fn run_all(batches: Batches, stop: CancellationToken) {
    let mut driving: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut tasks = JoinSet::new();
    while !stop.is_cancelled() {
        let wake = batches.inner.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        match batches.ids().await {
            Ok(ids) => {
                let busy: HashSet<&String> = driving.values().collect();
                let fresh: Vec<String> = ids.into_iter().filter(|id| !busy.contains(id)).collect();
                for id in fresh {
                    match batches.acquire(&id).await {
                        Ok(Some(_)) => {
                            let handle = tasks.spawn(drive_leased(batches.clone(), id.clone()));
                            driving.insert(handle.id(), id);
                        }
                        Ok(None) | Err(BatchError::NotFound { .. }) => {}
                        Err(err) => {
                            tracing::warn!(batch = %id, error = %err, "reading a batch record")
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "listing batches; trying again"),
        }
        let rescan = tokio::time::sleep(RESCAN);
        tokio::pin!(rescan);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = &mut wake => break,
                _ = &mut rescan => break,
                Some(joined) = tasks.join_next_with_id() => {
                    let id = match joined {
                        Ok((id, ())) => id,
                        Err(err) => {
                            tracing::error!(error = %err, "a batch's task failed; it is tried again");
                            err.id()
                        }
                    };
                    driving.remove(&id);
                }
            }
        }
    }
    tasks.shutdown().await;
    for id in driving.values() {
        if let Err(err) = batches.release(id).await {
            tracing::warn!(batch = %id, error = %err, "giving a batch's lease up; it lapses instead");
        }
    }
}

/// Drives batch `id` while its lease (taken by the caller) holds.
async fn drive_leased(batches: Batches, id: String) {
    let driven = tokio::select! {
        driven = drive(&batches, &id) => driven,
        lost = batches.hold_lease(&id) => Err(lost),
    };
    match driven {
        Ok(()) => {}
        Err(err @ BatchError::LeaseLost { .. }) => {
            tracing::info!(batch = %id, error = %err, "another runner has the batch; this one stopped driving it")
        }
        Err(err) => {
            tracing::warn!(batch = %id, error = %err, "batch stopped; it is resumed at the next scan")
        }
    }
}

/// Local files of one batch's drive, removed when it ends or is aborted.
struct WorkFiles {
    input: PathBuf,
    output: PathBuf,
    errors: PathBuf,
}

impl WorkFiles {
    fn new(dir: &Path, id: &str) -> Result<Self, BatchError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| BatchError::Store(format!("{}: {e}", dir.display())))?;
        // Unique per drive: two processes sharing a directory do not meet.
        let tag = ulid::Ulid::new();
        let path = |what: &str| dir.join(format!("{id}.{tag}.{what}.jsonl"));
        Ok(Self {
            input: path("input"),
            output: path("output"),
            errors: path("errors"),
        })
    }
}

impl Drop for WorkFiles {
    fn drop(&mut self) {
        for path in [&self.input, &self.output, &self.errors] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What the input file holds, from one pass before the run.
struct Scan {
    lines: u64,
    duplicates: Vec<BatchErrorData>,
    /// The output options most requests share: float, and the first
    /// request's model.
    usual: LineOptions,
    /// Output options of each request that asks for other than `usual`.
    options: HashMap<u64, LineOptions>,
}

fn scan(path: &Path, run: &str, endpoint: &str, hasher: &CustomIdHasher) -> std::io::Result<Scan> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut buf = Vec::new();
    let mut seen = HashSet::new();
    let mut scan = Scan {
        lines: 0,
        duplicates: Vec::new(),
        usual: LineOptions::default(),
        options: HashMap::new(),
    };
    let mut first = true;
    let mut number = 0u64;
    loop {
        buf.clear();
        let read = read_bounded(&mut reader, &mut buf)?;
        if read == Read::Eof {
            return Ok(scan);
        }
        number += 1;
        if read == Read::Line && buf.trim_ascii().is_empty() {
            continue;
        }
        scan.lines += 1;
        let Ok((custom_id, _, options)) = lines::parse(&buf, run, endpoint) else {
            continue;
        };
        let key = hasher.key(&custom_id);
        if !seen.insert(key) {
            if scan.duplicates.len() < MAX_VALIDATION_ERRORS {
                scan.duplicates.push(BatchErrorData {
                    code: "duplicate_custom_id".into(),
                    message: format!(
                        "line {number}: custom_id {custom_id:?} is already used by an earlier line; custom_ids must be unique"
                    ),
                    param: Some("custom_id".into()),
                    line: Some(number),
                });
            }
            continue;
        }
        if first {
            first = false;
            scan.usual.model = options.model.clone();
        }
        if options != scan.usual {
            scan.options.insert(key, options);
        }
    }
}

/// Why a run stopped submitting early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    Expired,
}

/// The runner's side of a batch's bulk run.
struct BatchDriver {
    batches: Batches,
    id: String,
    expires_at: Option<i64>,
    hasher: CustomIdHasher,
    usual: LineOptions,
    options: HashMap<u64, LineOptions>,
    output: std::io::BufWriter<std::fs::File>,
    errors: std::io::BufWriter<std::fs::File>,
    completed: u64,
    failed: u64,
    stop: Option<Stop>,
    told_workers: bool,
}

fn io_error(err: std::io::Error) -> BulkError {
    BulkError::Io {
        path: PathBuf::from("batch work file"),
        source: err,
    }
}

impl Driver for BatchDriver {
    fn write_ok(&mut self, custom_id: &str, job_id: &str, e: &Embeddings) -> Result<(), BulkError> {
        let options = self
            .options
            .get(&self.hasher.key(custom_id))
            .unwrap_or(&self.usual);
        let line = lines::answered(custom_id, job_id, e, options);
        self.completed += 1;
        self.output.write_all(&line).map_err(io_error)
    }

    fn write_failed(
        &mut self,
        custom_id: &str,
        job_id: &str,
        e: &JobError,
    ) -> Result<(), BulkError> {
        self.failed += 1;
        self.errors
            .write_all(&lines::failed(custom_id, job_id, e))
            .map_err(io_error)
    }

    fn write_refused(&mut self, refusal: &Refusal) -> Result<(), BulkError> {
        self.failed += 1;
        let line = lines::refused(refusal.custom_id.as_deref(), refusal.code, &refusal.message);
        self.errors.write_all(&line).map_err(io_error)
    }

    fn flush(&mut self) -> Result<(), BulkError> {
        self.output.flush().map_err(io_error)?;
        self.errors.flush().map_err(io_error)
    }

    async fn tick(&mut self, _counts: &Counts) -> Tick {
        let (completed, failed) = (self.completed, self.failed);
        let updated = self
            .batches
            .update_owned(&self.id, |batch| {
                let counts = &mut batch.request_counts;
                let changed = counts.completed != completed || counts.failed != failed;
                counts.completed = completed;
                counts.failed = failed;
                Ok(changed)
            })
            .await;
        match updated {
            Ok(batch) if batch.status == BatchStatus::Cancelling => {
                self.stop.get_or_insert(Stop::Cancelled);
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(batch = %self.id, error = %err, "recording a batch's progress")
            }
        }
        if self.stop.is_none() && self.expires_at.is_some_and(|at| now_s() >= at) {
            self.stop = Some(Stop::Expired);
        }
        match self.stop {
            None => Tick::Go,
            Some(_) => {
                if !self.told_workers {
                    self.told_workers = true;
                    if let Ok(batch) = self.batches.batch(&self.id).await {
                        self.batches.notify_workers(&batch).await;
                    }
                }
                Tick::StopSubmitting
            }
        }
    }
}

/// Drives batch `id` from wherever its record says it is to its end.
async fn drive(batches: &Batches, id: &str) -> Result<(), BatchError> {
    let batch = batches.batch(id).await?;
    if batch.status.is_terminal() {
        return Ok(());
    }
    let run = run_of(id)
        .ok_or_else(|| BatchError::Store(format!("batch id {id} does not end in a run id")))?
        .to_string();
    // Never started: nothing to collect.
    if batch.in_progress_at.is_none() {
        if batch.status == BatchStatus::Cancelling {
            return finish(batches, id, None, 0, 0, Some(Stop::Cancelled)).await;
        }
        if batch.expires_at.is_some_and(|at| now_s() >= at) {
            return finish(batches, id, None, 0, 0, Some(Stop::Expired)).await;
        }
    }
    let work = WorkFiles::new(&batches.inner.config.work_dir, id)?;
    match batches
        .inner
        .files
        .get(batches.object(&batch.input_file_id)?)
        .await
    {
        Ok(mut object) => {
            let mut file = tokio::fs::File::create(&work.input)
                .await
                .map_err(BatchError::store)?;
            tokio::io::copy(&mut object, &mut file)
                .await
                .map_err(BatchError::store)?;
        }
        Err(err) if err.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
            return fail(
                batches,
                id,
                vec![BatchErrorData {
                    code: "file_not_found".into(),
                    message: format!(
                        "input file {} was deleted before the batch ran",
                        batch.input_file_id
                    ),
                    param: Some("input_file_id".into()),
                    line: None,
                }],
            )
            .await;
        }
        Err(err) => return Err(BatchError::store(err)),
    }

    let hasher = CustomIdHasher::default();
    let scanned = {
        let (path, run, endpoint, hasher) = (
            work.input.clone(),
            run.clone(),
            batch.endpoint.clone(),
            hasher.clone(),
        );
        tokio::task::spawn_blocking(move || scan(&path, &run, &endpoint, &hasher))
            .await
            .expect("scanning does not panic")
            .map_err(BatchError::store)?
    };
    let max_lines = batches.inner.config.max_file_lines;
    if scanned.lines > max_lines {
        return fail(
            batches,
            id,
            vec![BatchErrorData {
                code: "too_many_requests".into(),
                message: format!(
                    "the input file has {} requests, more than {max_lines}",
                    scanned.lines
                ),
                param: Some("input_file_id".into()),
                line: None,
            }],
        )
        .await;
    }
    if !scanned.duplicates.is_empty() {
        return fail(batches, id, scanned.duplicates).await;
    }
    let total = scanned.lines;
    let batch = batches
        .update_owned(id, |batch| {
            if batch.status == BatchStatus::Validating {
                batch.status = BatchStatus::InProgress;
            }
            batch.in_progress_at.get_or_insert_with(now_s);
            batch.request_counts.total = total;
            Ok(true)
        })
        .await?;

    let opened = run::open(&batches.inner.js, &batches.inner.tenant, &run)
        .await
        .map_err(BatchError::store)?;
    let (lines_tx, lines_rx) = mpsc::channel(LINE_BUFFER);
    let reader = {
        let (run, endpoint) = (run.clone(), batch.endpoint.clone());
        input::read_with(work.input.clone(), hasher.clone(), lines_tx, move |bytes| {
            lines::parse_job(bytes, &run, &endpoint)
        })
    };
    let create = |path: &Path| {
        std::fs::File::create(path)
            .map(std::io::BufWriter::new)
            .map_err(BatchError::store)
    };
    let mut driver = BatchDriver {
        batches: batches.clone(),
        id: id.to_string(),
        expires_at: batch.expires_at,
        hasher: hasher.clone(),
        usual: scanned.usual,
        options: scanned.options,
        output: create(&work.output)?,
        errors: create(&work.errors)?,
        completed: 0,
        failed: 0,
        stop: None,
        told_workers: false,
    };
    let driven = run::drive(
        opened,
        lines_rx,
        HashSet::new(),
        batches.inner.config.in_flight,
        hasher,
        &mut driver,
    )
    .await;
    let _ = reader.await;
    let driven = driven.map_err(BatchError::store)?;
    if driven.stopped && driver.stop.is_none() {
        // Stopped by a `cancelled` answer before a tick saw the record.
        driver.stop = Some(Stop::Cancelled);
    }

    let stop = driver.stop;
    let (completed, failed) = (driver.completed, driver.failed);
    drop(driver);
    if stop.is_none() {
        batches
            .update_owned(id, |batch| {
                if batch.status != BatchStatus::InProgress {
                    return Ok(false);
                }
                batch.status = BatchStatus::Finalizing;
                batch.finalizing_at = Some(now_s());
                Ok(true)
            })
            .await?;
    }
    let output = if completed > 0 {
        Some(store_file(batches, &run, "output", &work.output).await?)
    } else {
        None
    };
    let errors = if failed > 0 {
        Some(store_file(batches, &run, "errors", &work.errors).await?)
    } else {
        None
    };
    finish(batches, id, Some((output, errors)), completed, failed, stop).await
}

/// Stores a finished batch's output or error file; its id follows from the
/// batch, so storing it again replaces it.
async fn store_file(
    batches: &Batches,
    run: &str,
    what: &str,
    path: &Path,
) -> Result<String, BatchError> {
    let id = format!("file-{run}-{what}");
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(BatchError::store)?;
    batches
        .put_file(
            &id,
            &format!("batch_{run}_{what}.jsonl"),
            super::PURPOSE_BATCH_OUTPUT,
            now_s(),
            &mut file,
        )
        .await?;
    Ok(id)
}

/// The batch's last record: completed, cancelled or expired.
async fn finish(
    batches: &Batches,
    id: &str,
    files: Option<(Option<String>, Option<String>)>,
    completed: u64,
    failed: u64,
    stop: Option<Stop>,
) -> Result<(), BatchError> {
    batches
        .update_owned(id, |batch: &mut Batch| {
            if batch.status.is_terminal() {
                return Ok(false);
            }
            let now = now_s();
            match (stop, batch.status) {
                (Some(Stop::Expired), _) => {
                    batch.status = BatchStatus::Expired;
                    batch.expired_at = Some(now);
                }
                (Some(Stop::Cancelled), _) | (_, BatchStatus::Cancelling) => {
                    batch.status = BatchStatus::Cancelled;
                    batch.cancelled_at = Some(now);
                }
                _ => {
                    batch.status = BatchStatus::Completed;
                    batch.completed_at = Some(now);
                }
            }
            if let Some((output, errors)) = &files {
                batch.output_file_id = output.clone();
                batch.error_file_id = errors.clone();
                batch.request_counts.completed = completed;
                batch.request_counts.failed = failed;
            }
            Ok(true)
        })
        .await?;
    Ok(())
}

/// The batch failed validation: nothing of it runs.
async fn fail(batches: &Batches, id: &str, errors: Vec<BatchErrorData>) -> Result<(), BatchError> {
    batches
        .update_owned(id, |batch| {
            if batch.status.is_terminal() {
                return Ok(false);
            }
            batch.status = BatchStatus::Failed;
            batch.failed_at = Some(now_s());
            batch.errors = Some(BatchErrors {
                object: "list".into(),
                data: errors.clone(),
            });
            Ok(true)
        })
        .await?;
    Ok(())
}
