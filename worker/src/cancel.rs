//! Cancelled bulk runs. `jetinfer bulk cancel` publishes a notice on
//! `cancels.<tenant>` into the `JETINFER_CANCELS` stream; [`watch`] follows
//! it and keeps this worker's view of the cancelled runs current. A job
//! carrying a `Jetinfer-Bulk-Run` header gets its run's flag at intake: a
//! job of a cancelled run is answered `cancelled` there, and one cancelled
//! after intake is left out when its batch forms (like an expired job), so
//! queued work of a cancelled run is never computed.
//!
//! Both maps are bounded, whatever tenants send: a flag exists only while a
//! job of its run is held (the map keeps weak references and drops dead ones
//! once it has [`MAX_LIVE_RUNS`]), and each tenant's newest
//! `bulk::MAX_CANCELS_PER_TENANT` cancelled runs are remembered (as many as
//! the stream keeps for it), for at most [`MAX_TENANTS`] tenants: one
//! tenant's flood of notices forgets only its own oldest cancels.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use jetinfer_schemas::{ErrorCode, JobError};
use tokio_util::sync::CancellationToken;

/// Pause before following again after the notices ended (e.g. a server
/// restart).
const REWATCH_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// Flags of runs with jobs in hand before dead entries are swept out.
pub const MAX_LIVE_RUNS: usize = 4096;
/// Cancelled runs remembered per tenant: as many as the stream keeps.
pub const MAX_CANCELLED_RUNS_PER_TENANT: usize =
    jetinfer_nats::bulk::MAX_CANCELS_PER_TENANT as usize;
/// Tenants whose cancels are remembered; notices of further tenants are
/// ignored (tenants come from the server's accounts, far fewer than this).
pub const MAX_TENANTS: usize = 4096;

type RunKey = (String, String);

/// The flags of the runs this worker holds jobs of, and the runs it knows
/// are cancelled.
#[derive(Default)]
pub struct Cancellations {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    live: HashMap<RunKey, Weak<AtomicBool>>,
    cancelled: HashSet<RunKey>,
    /// Each tenant's cancelled runs in the order the notices came, to forget
    /// its oldest.
    order: HashMap<String, VecDeque<String>>,
}

impl Cancellations {
    /// The flag of `run` of `tenant`, shared by all its jobs in this worker
    /// and set once the run is cancelled.
    pub fn flag(&self, tenant: &str, run: &str) -> Arc<AtomicBool> {
        let mut state = self.state.lock().expect("cancellations lock");
        let key = (tenant.to_string(), run.to_string());
        if let Some(flag) = state.live.get(&key).and_then(Weak::upgrade) {
            return flag;
        }
        if state.live.len() >= MAX_LIVE_RUNS {
            state.live.retain(|_, flag| flag.strong_count() > 0);
        }
        let flag = Arc::new(AtomicBool::new(state.cancelled.contains(&key)));
        state.live.insert(key, Arc::downgrade(&flag));
        flag
    }

    /// Records that `run` of `tenant` is cancelled and raises its flag.
    pub fn cancel(&self, tenant: &str, run: &str) {
        let mut state = self.state.lock().expect("cancellations lock");
        if !state.order.contains_key(tenant) && state.order.len() >= MAX_TENANTS {
            tracing::warn!(tenant, "cancel notice ignored: too many tenants tracked");
            return;
        }
        let key = (tenant.to_string(), run.to_string());
        if let Some(flag) = state.live.get(&key).and_then(Weak::upgrade) {
            flag.store(true, Ordering::Relaxed);
        }
        if state.cancelled.insert(key) {
            let runs = state.order.entry(tenant.to_string()).or_default();
            runs.push_back(run.to_string());
            let forgotten = if runs.len() > MAX_CANCELLED_RUNS_PER_TENANT {
                runs.pop_front()
            } else {
                None
            };
            if let Some(oldest) = forgotten {
                state.cancelled.remove(&(tenant.to_string(), oldest));
            }
        }
    }

    /// How many runs this worker tracks: (with a flag, known cancelled).
    pub fn tracked(&self) -> (usize, usize) {
        let state = self.state.lock().expect("cancellations lock");
        (state.live.len(), state.cancelled.len())
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

/// Follows the cancel notices until `stop` fires.
pub async fn watch(stream: Stream, cancellations: Arc<Cancellations>, stop: CancellationToken) {
    loop {
        match jetinfer_nats::bulk::follow_cancels(&stream).await {
            Ok(notices) => {
                let mut notices = std::pin::pin!(notices);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        notice = notices.next() => match notice {
                            Some(Ok(notice)) => {
                                tracing::info!(tenant = %notice.tenant, run = %notice.run, "bulk run cancelled");
                                cancellations.cancel(&notice.tenant, &notice.run);
                            }
                            Some(Err(bad)) => tracing::warn!(error = %bad, "bad cancel notice"),
                            None => break,
                        },
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "following bulk cancel notices failed; retrying")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REWATCH_DELAY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_raised_before_or_after_the_job_arrives_reads_cancelled() {
        let runs = Cancellations::default();
        let early = runs.flag("acme", "r1");
        runs.cancel("acme", "r1");
        assert!(early.load(Ordering::Relaxed));
        assert!(runs.flag("acme", "r1").load(Ordering::Relaxed));
        assert!(!runs.flag("globex", "r1").load(Ordering::Relaxed));
    }

    #[test]
    fn runs_seen_and_runs_cancelled_stay_bounded() {
        let runs = Cancellations::default();
        for i in 0..(3 * MAX_LIVE_RUNS) {
            drop(runs.flag("acme", &format!("r{i}")));
        }
        runs.cancel("globex", "keep");
        for i in 0..(MAX_CANCELLED_RUNS_PER_TENANT + 100) {
            runs.cancel("acme", &format!("c{i}"));
        }
        let (live, cancelled) = runs.tracked();
        assert!(live <= MAX_LIVE_RUNS, "{live} flags kept");
        assert_eq!(cancelled, MAX_CANCELLED_RUNS_PER_TENANT + 1);
        // acme's newest cancels are kept, its oldest forgotten; globex's kept.
        let newest = format!("c{}", MAX_CANCELLED_RUNS_PER_TENANT + 99);
        assert!(runs.flag("acme", &newest).load(Ordering::Relaxed));
        assert!(runs.flag("globex", "keep").load(Ordering::Relaxed));
        assert!(!runs.flag("acme", "c0").load(Ordering::Relaxed));
    }
}
