//! Measurement: every finished job is recorded once, into HDR histograms
//! (microsecond resolution, 3 significant digits) for the whole run and for
//! the fixed time window it finished in, with its inputs, tokens and error
//! kind. [`Recorder::summary`] turns that into the numbers every report shows.
//!
//! Two latencies are kept per job. `latency` runs from the job's *intended*
//! start (open-loop: its slot in the arrival schedule; closed-loop: when the
//! user sent it) to its result, and is the one reported and judged by
//! thresholds. `service_time` runs from the moment it was actually sent; the
//! gap between the two is the stall that coordinated omission would hide.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency the histograms hold exactly (1 h); longer ones saturate.
const MAX_TRACKABLE_US: u64 = 3_600_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;
/// Buckets of the latency distribution chart (log-spaced).
const DISTRIBUTION_BUCKETS: usize = 24;

/// Percentiles every report shows, as (label, quantile).
pub const PERCENTILES: &[(&str, f64)] = &[
    ("p50", 0.50),
    ("p90", 0.90),
    ("p95", 0.95),
    ("p99", 0.99),
    ("p99.9", 0.999),
];

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    Ok {
        inputs: u64,
        tokens: u64,
    },
    /// A typed error from the worker (its code) or from the client
    /// (`timeout`, `queue_full`, ...).
    Error(String),
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKABLE_US, SIGNIFICANT_DIGITS)
        .expect("static histogram bounds are valid")
}

#[derive(Debug, Clone)]
struct Window {
    latency: Histogram<u64>,
    ok: u64,
    inputs: u64,
    tokens: u64,
    errors: u64,
}

impl Window {
    fn new() -> Self {
        Self {
            latency: histogram(),
            ok: 0,
            inputs: 0,
            tokens: 0,
            errors: 0,
        }
    }
}

/// Collects finished jobs. Cheap to record into; summarise at the end.
#[derive(Debug, Clone)]
pub struct Recorder {
    start: Instant,
    window: Duration,
    latency: Histogram<u64>,
    service: Histogram<u64>,
    windows: Vec<Window>,
    sent: u64,
    ok: u64,
    inputs: u64,
    tokens: u64,
    errors: BTreeMap<String, u64>,
    last_done: Option<Instant>,
    closed_at: Option<Instant>,
}

impl Recorder {
    pub fn new(start: Instant, window: Duration) -> Self {
        Self {
            start,
            window: window.max(Duration::from_millis(1)),
            latency: histogram(),
            service: histogram(),
            windows: Vec::new(),
            sent: 0,
            ok: 0,
            inputs: 0,
            tokens: 0,
            errors: BTreeMap::new(),
            last_done: None,
            closed_at: None,
        }
    }

    /// Counts a job as sent (for the progress line and unfinished jobs).
    pub fn sent(&mut self) {
        self.sent += 1;
    }

    /// Records a finished job: intended start, actual send, result time.
    pub fn record(&mut self, intended: Instant, sent: Instant, done: Instant, outcome: JobOutcome) {
        let index = (done.saturating_duration_since(self.start).as_nanos() / self.window.as_nanos())
            as usize;
        if self.windows.len() <= index {
            self.windows.resize(index + 1, Window::new());
        }
        let window = &mut self.windows[index];
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
        match outcome {
            JobOutcome::Ok { inputs, tokens } => {
                let latency = micros(done.saturating_duration_since(intended));
                self.latency.saturating_record(latency);
                self.service
                    .saturating_record(micros(done.saturating_duration_since(sent)));
                window.latency.saturating_record(latency);
                window.ok += 1;
                window.inputs += inputs;
                window.tokens += tokens;
                self.ok += 1;
                self.inputs += inputs;
                self.tokens += tokens;
            }
            JobOutcome::Error(kind) => {
                window.errors += 1;
                *self.errors.entry(kind).or_default() += 1;
            }
        }
    }

    pub fn finished(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    pub fn errors(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn sent_count(&self) -> u64 {
        self.sent
    }

    /// The p-quantile latency so far, for the progress line.
    pub fn latency_quantile(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    /// Ends the run at `now`: throughput is over start to `now`, and jobs
    /// sent but never answered count as `unfinished` errors.
    pub fn close(&mut self, now: Instant) {
        self.closed_at = Some(now);
        let missing = self.sent.saturating_sub(self.finished());
        if missing > 0 {
            *self.errors.entry("unfinished".into()).or_default() += missing;
            let index = (now.saturating_duration_since(self.start).as_nanos()
                / self.window.as_nanos()) as usize;
            if self.windows.len() <= index {
                self.windows.resize(index + 1, Window::new());
            }
            self.windows[index].errors += missing;
        }
    }

    /// The run's numbers; throughput over the run (start to close, or to the
    /// last result if not closed), so think time counts as time.
    pub fn summary(&self) -> Summary {
        let elapsed = self
            .closed_at
            .or(self.last_done)
            .map(|d| d.saturating_duration_since(self.start))
            .unwrap_or_default()
            .max(Duration::from_millis(1));
        let secs = elapsed.as_secs_f64();
        let failed = self.errors();
        let finished = self.ok + failed;
        let window_secs = self.window.as_secs_f64();
        Summary {
            jobs_sent: self.sent,
            jobs_ok: self.ok,
            jobs_failed: failed,
            error_rate: if finished == 0 {
                0.0
            } else {
                failed as f64 / finished as f64
            },
            errors_by_kind: self.errors.clone(),
            inputs: self.inputs,
            tokens: self.tokens,
            elapsed_s: secs,
            jobs_per_s: self.ok as f64 / secs,
            inputs_per_s: self.inputs as f64 / secs,
            tokens_per_s: self.tokens as f64 / secs,
            latency: LatencySummary::of(&self.latency),
            service_time: LatencySummary::of(&self.service),
            window_s: window_secs,
            windows: self
                .windows
                .iter()
                .enumerate()
                .map(|(i, w)| WindowSummary {
                    start_s: i as f64 * window_secs,
                    jobs_ok: w.ok,
                    errors: w.errors,
                    jobs_per_s: w.ok as f64 / window_secs,
                    inputs_per_s: w.inputs as f64 / window_secs,
                    tokens_per_s: w.tokens as f64 / window_secs,
                    latency: (!w.latency.is_empty()).then(|| LatencySummary::of(&w.latency)),
                })
                .collect(),
            distribution: distribution(&self.latency),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self {
                count: 0,
                min_ms: 0.0,
                mean_ms: 0.0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p95_ms: 0.0,
                p99_ms: 0.0,
                p999_ms: 0.0,
                max_ms: 0.0,
            };
        }
        let ms = |us: u64| us as f64 / 1e3;
        let q = |q: f64| ms(h.value_at_quantile(q));
        Self {
            count: h.len(),
            min_ms: ms(h.min()),
            mean_ms: h.mean() / 1e3,
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: ms(h.max()),
        }
    }

    /// The percentile called `label` (`p50` ... `p99.9`, `min`, `mean`, `max`).
    pub fn get(&self, label: &str) -> Option<f64> {
        Some(match label {
            "min" => self.min_ms,
            "mean" | "avg" => self.mean_ms,
            "p50" | "median" => self.p50_ms,
            "p90" => self.p90_ms,
            "p95" => self.p95_ms,
            "p99" => self.p99_ms,
            "p99.9" | "p999" => self.p999_ms,
            "max" => self.max_ms,
            _ => return None,
        })
    }
}

/// One fixed window of the run, by the time jobs finished.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowSummary {
    pub start_s: f64,
    pub jobs_ok: u64,
    pub errors: u64,
    pub jobs_per_s: f64,
    pub inputs_per_s: f64,
    pub tokens_per_s: f64,
    /// `None` when no job succeeded in the window.
    pub latency: Option<LatencySummary>,
}

/// One bar of the latency distribution: jobs with latency in `(from, to]` ms.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    pub from_ms: f64,
    pub to_ms: f64,
    pub count: u64,
}

fn distribution(h: &Histogram<u64>) -> Vec<Bucket> {
    if h.is_empty() {
        return Vec::new();
    }
    let lo = (h.min() as f64).max(1.0);
    let hi = (h.max() as f64).max(lo * 1.01);
    let step = (hi / lo).powf(1.0 / DISTRIBUTION_BUCKETS as f64);
    let mut edges: Vec<u64> = (0..=DISTRIBUTION_BUCKETS)
        .map(|i| (lo * step.powi(i as i32)).round() as u64)
        .collect();
    edges[0] = h.min().saturating_sub(1);
    *edges.last_mut().expect("edges") = h.max();
    edges.dedup();
    edges
        .windows(2)
        .map(|pair| {
            let count = h
                .iter_recorded()
                .filter(|v| {
                    let value = h.highest_equivalent(v.value_iterated_to());
                    value > pair[0] && value <= pair[1]
                })
                .map(|v| v.count_at_value())
                .sum();
            Bucket {
                from_ms: pair[0] as f64 / 1e3,
                to_ms: pair[1] as f64 / 1e3,
                count,
            }
        })
        .collect()
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub jobs_sent: u64,
    pub jobs_ok: u64,
    pub jobs_failed: u64,
    /// Failed jobs over finished jobs (0..1).
    pub error_rate: f64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub inputs: u64,
    pub tokens: u64,
    pub elapsed_s: f64,
    pub jobs_per_s: f64,
    pub inputs_per_s: f64,
    pub tokens_per_s: f64,
    /// From each job's intended start to its result (successful jobs).
    pub latency: LatencySummary,
    /// From each job's actual send to its result (successful jobs).
    pub service_time: LatencySummary,
    pub window_s: f64,
    pub windows: Vec<WindowSummary>,
    pub distribution: Vec<Bucket>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> JobOutcome {
        JobOutcome::Ok {
            inputs: 2,
            tokens: 20,
        }
    }

    #[test]
    fn percentiles_of_one_to_a_thousand_ms_are_exact_to_three_digits() {
        let start = Instant::now();
        let mut r = Recorder::new(start, Duration::from_secs(1));
        for ms in 1..=1000u64 {
            r.sent();
            r.record(start, start, start + Duration::from_millis(ms), ok());
        }
        let s = r.summary();
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1e-9;
        assert!(close(s.latency.p50_ms, 500.0), "{}", s.latency.p50_ms);
        assert!(close(s.latency.p90_ms, 900.0), "{}", s.latency.p90_ms);
        assert!(close(s.latency.p95_ms, 950.0), "{}", s.latency.p95_ms);
        assert!(close(s.latency.p99_ms, 990.0), "{}", s.latency.p99_ms);
        assert!(close(s.latency.p999_ms, 999.0), "{}", s.latency.p999_ms);
        assert!(close(s.latency.max_ms, 1000.0), "{}", s.latency.max_ms);
        assert!(close(s.latency.mean_ms, 500.5), "{}", s.latency.mean_ms);
        assert_eq!(s.latency.count, 1000);
        assert_eq!(
            s.distribution.iter().map(|b| b.count).sum::<u64>(),
            1000,
            "every job lands in exactly one distribution bucket"
        );
    }

    #[test]
    fn latency_counts_from_the_intended_start_service_time_from_the_send() {
        let start = Instant::now();
        let mut r = Recorder::new(start, Duration::from_secs(1));
        r.sent();
        // Meant to go at 0, held back 900 ms by a stall, answered 100 ms later.
        r.record(
            start,
            start + Duration::from_millis(900),
            start + Duration::from_millis(1000),
            ok(),
        );
        let s = r.summary();
        assert!((s.latency.max_ms - 1000.0).abs() < 1.0);
        assert!((s.service_time.max_ms - 100.0).abs() < 0.1);
    }

    #[test]
    fn windows_rates_and_errors_by_kind() {
        let start = Instant::now();
        let mut r = Recorder::new(start, Duration::from_millis(500));
        let at = |ms| start + Duration::from_millis(ms);
        for _ in 0..5 {
            r.sent();
        }
        r.record(start, start, at(100), ok());
        r.record(start, start, at(200), ok());
        r.record(start, start, at(700), JobOutcome::Error("timeout".into()));
        r.record(start, start, at(1000), ok());
        r.close(at(1000));
        let s = r.summary();
        assert_eq!(s.jobs_ok, 3);
        assert_eq!(s.jobs_failed, 2);
        assert_eq!(s.errors_by_kind["timeout"], 1);
        assert_eq!(s.errors_by_kind["unfinished"], 1);
        assert!((s.error_rate - 0.4).abs() < 1e-9);
        assert_eq!(s.inputs, 6);
        assert_eq!(s.tokens, 60);
        assert!((s.jobs_per_s - 3.0).abs() < 1e-9, "3 jobs over 1 s");
        assert!((s.tokens_per_s - 60.0).abs() < 1e-9);
        let w: Vec<(u64, u64)> = s.windows.iter().map(|w| (w.jobs_ok, w.errors)).collect();
        assert_eq!(w, [(2, 0), (0, 1), (1, 1)]);
        assert!(
            (s.windows[0].jobs_per_s - 4.0).abs() < 1e-9,
            "2 jobs in 0.5 s"
        );
        assert!(s.windows[1].latency.is_none());
    }
}
