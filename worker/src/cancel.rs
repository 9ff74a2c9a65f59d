//! Cancelled bulk runs. `jetinfer bulk cancel` puts a cancel mark in the
//! `JETINFER_BULK` bucket; [`watch`] keeps this worker's view of the marks
//! current. A job carrying a `Jetinfer-Bulk-Run` header gets its run's flag
//! at intake: a job of a cancelled run is answered `cancelled` there, and
//! one cancelled after intake is left out when its batch forms (like an
//! expired job), so queued work of a cancelled run is never computed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use futures::StreamExt;
use jetinfer_schemas::{ErrorCode, JobError};
use tokio_util::sync::CancellationToken;

/// Pause before watching again after the watch ended (e.g. a server restart).
const REWATCH_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// One flag per (tenant, run) this worker has seen, set once the run is
/// cancelled. Entries are a few bytes per run, never per job.
#[derive(Default)]
pub struct Cancellations {
    runs: Mutex<HashMap<(String, String), Arc<AtomicBool>>>,
}

impl Cancellations {
    /// The flag of `run` of `tenant`, shared by all its jobs in this worker.
    pub fn flag(&self, tenant: &str, run: &str) -> Arc<AtomicBool> {
        let mut runs = self.runs.lock().expect("cancellations lock");
        Arc::clone(
            runs.entry((tenant.to_string(), run.to_string()))
                .or_default(),
        )
    }

    fn set(&self, tenant: &str, run: &str, cancelled: bool) {
        self.flag(tenant, run).store(cancelled, Ordering::Relaxed);
    }
}

/// Whether a job holding `flag` belongs to a cancelled run.
pub fn is_cancelled(flag: &Option<Arc<AtomicBool>>) -> bool {
    flag.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// The error reply of a job whose run was cancelled.
pub fn cancelled_error() -> JobError {
    JobError::new(
        ErrorCode::Cancelled,
        "the job's bulk run was cancelled before the job was computed",
    )
}

/// Follows the bucket's cancel marks until `stop` fires.
pub async fn watch(kv: kv::Store, cancellations: Arc<Cancellations>, stop: CancellationToken) {
    loop {
        match jetinfer_nats::bulk::watch_cancels(&kv).await {
            Ok(marks) => {
                let mut marks = std::pin::pin!(marks);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        mark = marks.next() => match mark {
                            Some(mark) => {
                                tracing::info!(tenant = %mark.tenant, run = %mark.run, cancelled = mark.cancelled, "bulk run cancel mark");
                                cancellations.set(&mark.tenant, &mark.run, mark.cancelled);
                            }
                            None => break,
                        },
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "watching bulk cancel marks failed; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REWATCH_DELAY) => {}
        }
    }
}
