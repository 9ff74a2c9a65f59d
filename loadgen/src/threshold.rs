//! Pass/fail criteria, as k6 thresholds: `p95<250ms`, `p99.9<=1s`,
//! `errors<1%`, `jobs_per_s>=20`. A run with a failed threshold exits with
//! [`EXIT_THRESHOLDS_FAILED`], so CI or a release can gate on it.

use std::fmt;

use serde::Serialize;

use crate::duration;
use crate::stats::Summary;

/// Exit status when any threshold fails (the one k6 uses).
pub const EXIT_THRESHOLDS_FAILED: i32 = 99;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Op {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
}

impl Op {
    fn holds(self, actual: f64, limit: f64) -> bool {
        match self {
            Op::Lt => actual < limit,
            Op::Le => actual <= limit,
            Op::Gt => actual > limit,
            Op::Ge => actual >= limit,
        }
    }
}

/// What a threshold judges, and the unit its limit is stored in.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// A latency statistic (`p50`... `p99.9`, `min`, `mean`, `max`), in ms.
    Latency(String),
    /// Failed jobs over finished jobs, as a fraction.
    Errors,
    JobsPerS,
    InputsPerS,
    TokensPerS,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Threshold {
    pub text: String,
    pub metric: Metric,
    pub op: Op,
    pub limit: f64,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid threshold {text:?}: {why}. Examples: p95<250ms, p99.9<=1s, errors<1%, jobs_per_s>=20"
)]
pub struct ThresholdError {
    pub text: String,
    pub why: String,
}

impl std::str::FromStr for Threshold {
    type Err = ThresholdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |why: &str| ThresholdError {
            text: text.into(),
            why: why.into(),
        };
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let at = compact
            .find(['<', '>'])
            .ok_or_else(|| fail("no comparison (<, <=, >, >=)"))?;
        let (name, rest) = compact.split_at(at);
        let (op, value) = if let Some(v) = rest.strip_prefix("<=") {
            (Op::Le, v)
        } else if let Some(v) = rest.strip_prefix(">=") {
            (Op::Ge, v)
        } else if let Some(v) = rest.strip_prefix('<') {
            (Op::Lt, v)
        } else {
            (Op::Gt, &rest[1..])
        };
        let (metric, limit) = match name {
            "errors" | "error_rate" => {
                let limit = match value.strip_suffix('%') {
                    Some(pct) => pct.parse::<f64>().map(|p| p / 100.0),
                    None => value.parse::<f64>(),
                }
                .map_err(|_| fail("an error rate is a percentage (1%) or a fraction (0.01)"))?;
                (Metric::Errors, limit)
            }
            "jobs_per_s" | "inputs_per_s" | "tokens_per_s" => {
                let limit = value
                    .parse::<f64>()
                    .map_err(|_| fail("a throughput limit is a plain number"))?;
                let metric = match name {
                    "jobs_per_s" => Metric::JobsPerS,
                    "inputs_per_s" => Metric::InputsPerS,
                    _ => Metric::TokensPerS,
                };
                (metric, limit)
            }
            "p50" | "median" | "p90" | "p95" | "p99" | "p99.9" | "p999" | "min" | "mean"
            | "avg" | "max" => {
                let limit = duration::parse(value)
                    .map_err(|_| fail("a latency limit needs a unit, e.g. 250ms or 1s"))?;
                (Metric::Latency(name.into()), limit.as_secs_f64() * 1e3)
            }
            _ => {
                return Err(fail(
                    "unknown metric; use p50, p90, p95, p99, p99.9, min, mean, max, errors, jobs_per_s, inputs_per_s or tokens_per_s",
                ))
            }
        };
        Ok(Self {
            text: text.trim().into(),
            metric,
            op,
            limit,
        })
    }
}

/// A threshold judged against a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub threshold: String,
    /// The measured value, in the threshold's unit (ms, fraction, per second).
    pub actual: f64,
    pub shown: String,
    pub passed: bool,
}

impl Threshold {
    pub fn check(&self, summary: &Summary) -> Verdict {
        let (actual, shown) = match &self.metric {
            Metric::Latency(stat) => {
                let ms = summary.latency.get(stat).unwrap_or(f64::INFINITY);
                (ms, format!("{ms:.1}ms"))
            }
            Metric::Errors => (
                summary.error_rate,
                format!("{:.2}%", summary.error_rate * 100.0),
            ),
            Metric::JobsPerS => (summary.jobs_per_s, format!("{:.1}/s", summary.jobs_per_s)),
            Metric::InputsPerS => (
                summary.inputs_per_s,
                format!("{:.1}/s", summary.inputs_per_s),
            ),
            Metric::TokensPerS => (
                summary.tokens_per_s,
                format!("{:.0}/s", summary.tokens_per_s),
            ),
        };
        // No successful job means no latency to judge: that fails.
        let judged = match self.metric {
            Metric::Latency(_) => summary.latency.count > 0 && self.op.holds(actual, self.limit),
            _ => self.op.holds(actual, self.limit),
        };
        Verdict {
            threshold: self.text.clone(),
            actual,
            shown,
            passed: judged,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.passed { "pass" } else { "FAIL" };
        write!(f, "{mark}  {}  (measured {})", self.threshold, self.shown)
    }
}

/// The process exit status for a set of verdicts: 0 when all passed.
pub fn exit_status(verdicts: &[Verdict]) -> i32 {
    if verdicts.iter().all(|v| v.passed) {
        0
    } else {
        EXIT_THRESHOLDS_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{JobOutcome, Recorder};
    use std::time::{Duration, Instant};

    fn summary(latencies_ms: &[u64], errors: usize) -> Summary {
        let start = Instant::now();
        let mut r = Recorder::new(start, Duration::from_secs(1));
        for &ms in latencies_ms {
            r.sent();
            let outcome = JobOutcome::Ok {
                inputs: 1,
                tokens: 10,
            };
            r.record(start, start, start + Duration::from_millis(ms), outcome);
        }
        for _ in 0..errors {
            r.sent();
            r.record(start, start, start, JobOutcome::Error("internal".into()));
        }
        r.summary()
    }

    #[test]
    fn thresholds_parse_with_units_and_spaces() {
        let t: Threshold = "p95 < 250ms".parse().unwrap();
        assert_eq!(
            (t.metric, t.op, t.limit),
            (Metric::Latency("p95".into()), Op::Lt, 250.0)
        );
        let t: Threshold = "p99.9<=1.5s".parse().unwrap();
        assert_eq!((t.op, t.limit), (Op::Le, 1500.0));
        let t: Threshold = "errors<1%".parse().unwrap();
        assert_eq!((t.metric, t.limit), (Metric::Errors, 0.01));
        let t: Threshold = "jobs_per_s>=20".parse().unwrap();
        assert_eq!((t.metric, t.op, t.limit), (Metric::JobsPerS, Op::Ge, 20.0));
    }

    #[test]
    fn malformed_thresholds_are_refused_with_an_example() {
        for bad in [
            "p95",
            "p95<250",
            "p42<1s",
            "errors<lots",
            "jobs_per_s>fast",
            "",
        ] {
            let err = bad.parse::<Threshold>().unwrap_err().to_string();
            assert!(err.contains("Examples"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn exit_status_is_zero_only_when_every_threshold_passes() {
        // 100 jobs at 1..=100 ms plus one error: p95 = 95 ms, errors ~ 0.99%.
        let latencies: Vec<u64> = (1..=100).collect();
        let s = summary(&latencies, 1);
        let judge = |texts: &[&str]| {
            let verdicts: Vec<Verdict> = texts
                .iter()
                .map(|t| t.parse::<Threshold>().unwrap().check(&s))
                .collect();
            exit_status(&verdicts)
        };
        assert_eq!(judge(&["p95<250ms", "errors<1%"]), 0);
        assert_eq!(judge(&["p95<90ms", "errors<1%"]), EXIT_THRESHOLDS_FAILED);
        assert_eq!(judge(&["p95<250ms", "errors<0.5%"]), EXIT_THRESHOLDS_FAILED);
        // HDR keeps 3 significant digits: the 100 ms max reads back within 0.1%.
        assert_eq!(judge(&["max<=101ms"]), 0);
        assert_eq!(judge(&["max<99ms"]), EXIT_THRESHOLDS_FAILED);
    }

    #[test]
    fn a_latency_threshold_fails_when_nothing_succeeded() {
        let s = summary(&[], 3);
        let v = "p95<1s".parse::<Threshold>().unwrap().check(&s);
        assert!(!v.passed);
    }
}
