//! Beside the pipeline, not in it: a task that reads the model's consumer and
//! the jobs stream from JetStream every `queue_poll` and publishes queue depth
//! (pending and ack-pending jobs), stream usage, and the estimated time to
//! drain the backlog, the autoscaling signal. In CUDA builds serving on a GPU
//! it also reads that GPU's memory.
//!
//! Every worker of a model reads the same consumer, so each reports the same
//! queue; dashboards and alerts take `max` across workers, not `sum`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::stream::Stream;
use tokio_util::sync::CancellationToken;

/// How far back the completion rate behind the drain estimate looks.
pub const DRAIN_RATE_WINDOW: Duration = Duration::from_secs(60);

/// Completion progress at one poll.
struct Sample {
    at: Instant,
    /// The consumer's ack floor: deliveries up to here are all settled.
    acked: u64,
}

/// The drain estimate from recent samples: backlog over the consumer's
/// completion rate across all its workers. `None` until there are two samples;
/// `+Inf` while there is a backlog and no progress.
struct DrainEstimator {
    samples: VecDeque<Sample>,
}

impl DrainEstimator {
    fn new() -> Self {
        Self {
            samples: VecDeque::new(),
        }
    }

    fn observe(&mut self, at: Instant, acked: u64, backlog: u64) -> Option<f64> {
        self.samples.push_back(Sample { at, acked });
        while self
            .samples
            .front()
            .is_some_and(|s| at.duration_since(s.at) > DRAIN_RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        if backlog == 0 {
            return Some(0.0);
        }
        let first = self.samples.front()?;
        let span = at.duration_since(first.at).as_secs_f64();
        if self.samples.len() < 2 || span <= 0.0 {
            return None;
        }
        let rate = acked.saturating_sub(first.acked) as f64 / span;
        Some(if rate > 0.0 {
            backlog as f64 / rate
        } else {
            f64::INFINITY
        })
    }
}

/// Polls until `shutdown` fires. Errors are logged and the poll retried; the
/// gauges keep their last values meanwhile.
pub async fn run(
    mut consumer: PullConsumer,
    mut stream: Stream,
    every: Duration,
    gpu: Option<usize>,
    shutdown: CancellationToken,
) {
    let mut estimator = DrainEstimator::new();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match consumer.info().await {
            Ok(info) => {
                let backlog = info.num_pending + info.num_ack_pending as u64;
                let drain =
                    estimator.observe(Instant::now(), info.ack_floor.consumer_sequence, backlog);
                jetinfer_monitoring::record_queue(
                    &info.name,
                    info.num_pending,
                    info.num_ack_pending as u64,
                    drain,
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "reading consumer info for queue depth failed")
            }
        }
        match stream.info().await {
            Ok(info) => jetinfer_monitoring::record_stream(
                &info.config.name,
                info.state.bytes,
                info.config.max_bytes,
                info.state.messages,
                info.config.max_messages,
            ),
            Err(err) => tracing::warn!(error = %err, "reading stream info failed"),
        }
        record_gpu(gpu);
    }
}

#[cfg(feature = "cuda")]
fn record_gpu(gpu: Option<usize>) {
    let Some(ordinal) = gpu else { return };
    if let Some((used, total)) = crate::backend::candle::gpu_memory(ordinal) {
        jetinfer_monitoring::record_gpu_memory(ordinal, used, total);
    }
}

/// CPU builds have no GPU metrics: absent, not zero.
#[cfg(not(feature = "cuda"))]
fn record_gpu(_gpu: Option<usize>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_time_is_backlog_over_recent_completion_rate() {
        let mut e = DrainEstimator::new();
        let t0 = Instant::now();
        assert_eq!(e.observe(t0, 0, 100), None, "one sample has no rate");
        // 50 completions in 10 s: 5/s, so 100 waiting take 20 s.
        assert_eq!(e.observe(t0 + Duration::from_secs(10), 50, 100), Some(20.0));
    }

    #[test]
    fn backlog_without_progress_never_drains_and_no_backlog_is_drained() {
        let mut e = DrainEstimator::new();
        let t0 = Instant::now();
        e.observe(t0, 7, 10);
        assert_eq!(
            e.observe(t0 + Duration::from_secs(5), 7, 10),
            Some(f64::INFINITY)
        );
        assert_eq!(e.observe(t0 + Duration::from_secs(6), 7, 0), Some(0.0));
    }
}
