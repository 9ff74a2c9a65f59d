//! The worker's side of a run: scrape its Prometheus `/metrics` before and
//! after, and report every `jetinfer_*` series that changed (batch sizes,
//! queue wait, padding waste...), with the mean of each histogram over the
//! run. Parsing is generic (the text exposition format), so new worker
//! metrics show up without changes here.
//!
//! Each scrape waits (briefly) for the worker's in-flight jobs to settle: a
//! job's result reaches loadgen a moment before the worker counts it as
//! finished, so a scrape taken at once would miss the run's last jobs and
//! count the probe job in the run.
//!
//! Only plain `http://` URLs are scraped (a worker's metrics port is local to
//! its host); anything unreachable is reported as not available.

use std::collections::BTreeMap;
use std::time::Duration;

use jetinfer_monitoring::names;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Metric families reported: the worker's own.
pub const PREFIX: &str = "jetinfer_";
/// Longest a scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest exposition accepted.
const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Longest a scrape waits for the worker's in-flight jobs to reach zero; a
/// worker busy with other clients' jobs never does, and is scraped as it is.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between scrapes while waiting for in-flight jobs to settle.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// Samples by series key: `name{label="v",...}` as written by the exporter.
pub type Samples = BTreeMap<String, f64>;

/// Parses the Prometheus text exposition format into samples; comments,
/// blank and malformed lines are skipped.
pub fn parse(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The series ends at the closing brace if there are labels (label
        // values may hold spaces), else at the first space.
        let split = match line.find('{') {
            Some(_) => line.rfind('}').map(|i| i + 1),
            None => line.find(char::is_whitespace),
        };
        let Some(split) = split else { continue };
        let (series, rest) = line.split_at(split);
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        samples.insert(series.to_string(), value);
    }
    samples
}

fn metric_name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

/// One `jetinfer_*` series that changed over the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesChange {
    pub series: String,
    pub before: Option<f64>,
    pub after: f64,
    pub delta: f64,
}

/// A histogram or summary over the run: observations and their mean.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistogramChange {
    /// Series key without the `_sum`/`_count` suffix.
    pub series: String,
    pub count: f64,
    pub mean: f64,
}

/// What the worker reported over the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WorkerMetrics {
    /// No `--metrics-url` was given.
    NotRequested,
    /// The endpoint could not be scraped (before or after).
    NotAvailable { url: String, reason: String },
    Available {
        url: String,
        histograms: Vec<HistogramChange>,
        /// Counters and gauges that changed (histogram buckets left out).
        changed: Vec<SeriesChange>,
    },
}

/// Compares two scrapes: every `jetinfer_*` series whose value changed, and
/// for each histogram/summary the observations made between them and their
/// mean (delta of `_sum` over delta of `_count`).
pub fn diff(url: &str, before: &Samples, after: &Samples) -> WorkerMetrics {
    let mut changed = Vec::new();
    let mut histograms = Vec::new();
    for (series, &value) in after {
        let name = metric_name(series);
        if !name.starts_with(PREFIX) || name.ends_with("_bucket") {
            continue;
        }
        let old = before.get(series).copied();
        let delta = value - old.unwrap_or(0.0);
        if let Some(base) = name.strip_suffix("_count") {
            let sum_key = series.replacen(name, &format!("{base}_sum"), 1);
            if let Some(&sum_after) = after.get(&sum_key) {
                if delta > 0.0 {
                    let sum_delta = sum_after - before.get(&sum_key).copied().unwrap_or(0.0);
                    histograms.push(HistogramChange {
                        series: series.replacen(name, base, 1),
                        count: delta,
                        mean: sum_delta / delta,
                    });
                }
                continue;
            }
        }
        if name.ends_with("_sum") && after.contains_key(&series.replacen("_sum", "_count", 1)) {
            continue;
        }
        if old != Some(value) {
            changed.push(SeriesChange {
                series: series.clone(),
                before: old,
                after: value,
                delta,
            });
        }
    }
    WorkerMetrics::Available {
        url: url.into(),
        histograms,
        changed,
    }
}

/// The bearer token a worker's `/metrics` may require
/// (`[http] metrics_token_file` on the worker). `Debug` never shows it.
#[derive(Clone)]
pub struct MetricsToken(String);

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(redacted)")
    }
}

impl MetricsToken {
    /// Reads the token from `path`; surrounding whitespace is not part of it.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Self> {
        let token = std::fs::read_to_string(path)?.trim().to_string();
        if token.is_empty() || token.contains(['\r', '\n']) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} must hold one non-empty line", path.display()),
            ));
        }
        Ok(Self(token))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("only http:// metrics URLs are supported")]
    Scheme,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0}")]
    Status(String),
    #[error("malformed HTTP response")]
    Malformed,
}

/// Fetches and parses `url` (e.g. `http://127.0.0.1:9464/metrics`), sending
/// `token` as a bearer token when given.
pub async fn scrape(url: &str, token: Option<&MetricsToken>) -> Result<Samples, ScrapeError> {
    tokio::time::timeout(SCRAPE_TIMEOUT, fetch(url, token))
        .await
        .map_err(|_| ScrapeError::Timeout(SCRAPE_TIMEOUT))?
        .map(|body| parse(&body))
}

/// A minimal HTTP/1.0 GET: one request, the server closes after the body.
async fn fetch(url: &str, token: Option<&MetricsToken>) -> Result<String, ScrapeError> {
    let rest = url.strip_prefix("http://").ok_or(ScrapeError::Scheme)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {}\r\n", t.0))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: text/plain\r\nUser-Agent: jetinfer-loadgen\r\n{authorization}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream
        .take(MAX_BODY_BYTES)
        .read_to_end(&mut response)
        .await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or(ScrapeError::Malformed)?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(ScrapeError::Status(status.to_string()));
    }
    Ok(body.to_string())
}

/// Jobs the worker holds now: the sum of its in-flight gauges (all models).
fn in_flight(samples: &Samples) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| metric_name(series) == names::JOBS_IN_FLIGHT)
        .map(|(_, value)| value)
        .sum()
}

/// Scrapes `url` until the worker holds no job in flight, or for at most
/// [`SETTLE_TIMEOUT`]; returns the last scrape.
pub async fn scrape_settled(
    url: &str,
    token: Option<&MetricsToken>,
) -> Result<Samples, ScrapeError> {
    let started = tokio::time::Instant::now();
    loop {
        let samples = scrape(url, token).await?;
        if in_flight(&samples) <= 0.0 || started.elapsed() >= SETTLE_TIMEOUT {
            return Ok(samples);
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// Scrapes before a run; `None` for `url` means not requested.
pub async fn before(
    url: Option<&str>,
    token: Option<&MetricsToken>,
) -> Option<Result<Samples, String>> {
    let url = url?;
    Some(scrape_settled(url, token).await.map_err(|e| e.to_string()))
}

/// Scrapes after a run and compares with the first scrape.
pub async fn after(
    url: Option<&str>,
    token: Option<&MetricsToken>,
    before: Option<Result<Samples, String>>,
) -> WorkerMetrics {
    let (Some(url), Some(before)) = (url, before) else {
        return WorkerMetrics::NotRequested;
    };
    let unavailable = |reason: String| WorkerMetrics::NotAvailable {
        url: url.into(),
        reason,
    };
    match (before, scrape_settled(url, token).await) {
        (Ok(b), Ok(a)) => diff(url, &b, &a),
        (Err(e), _) => unavailable(format!("before the run: {e}")),
        (_, Err(e)) => unavailable(format!("after the run: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"
# HELP jetinfer_batch_size_inputs Inputs per forward pass.
# TYPE jetinfer_batch_size_inputs histogram
jetinfer_batch_size_inputs_bucket{model="minilm",le="8"} 1
jetinfer_batch_size_inputs_bucket{model="minilm",le="+Inf"} 2
jetinfer_batch_size_inputs_sum{model="minilm"} 10
jetinfer_batch_size_inputs_count{model="minilm"} 2
jetinfer_jobs_total{model="minilm",outcome="ok"} 5
jetinfer_padding_waste_ratio 0.25
process_cpu_seconds_total 1.5
"#;

    const AFTER: &str = r#"
jetinfer_batch_size_inputs_bucket{model="minilm",le="8"} 3
jetinfer_batch_size_inputs_bucket{model="minilm",le="+Inf"} 6
jetinfer_batch_size_inputs_sum{model="minilm"} 70
jetinfer_batch_size_inputs_count{model="minilm"} 6
jetinfer_jobs_total{model="minilm",outcome="ok"} 45
jetinfer_jobs_total{model="minilm",outcome="error label with spaces"} 1 1700000000000
jetinfer_padding_waste_ratio 0.25
process_cpu_seconds_total 9.5
"#;

    #[test]
    fn exposition_lines_parse_with_labels_timestamps_and_infinities() {
        let s = parse(AFTER);
        assert_eq!(s["jetinfer_padding_waste_ratio"], 0.25);
        assert_eq!(
            s[r#"jetinfer_jobs_total{model="minilm",outcome="error label with spaces"}"#],
            1.0
        );
        assert_eq!(s.len(), 8);
    }

    #[test]
    fn the_diff_reports_changed_jetinfer_series_and_histogram_means() {
        let WorkerMetrics::Available {
            histograms,
            changed,
            ..
        } = diff("u", &parse(BEFORE), &parse(AFTER))
        else {
            panic!("available");
        };
        assert_eq!(
            histograms,
            [HistogramChange {
                series: r#"jetinfer_batch_size_inputs{model="minilm"}"#.into(),
                count: 4.0,
                mean: 15.0,
            }]
        );
        let names: Vec<&str> = changed.iter().map(|c| c.series.as_str()).collect();
        assert_eq!(
            names,
            [
                r#"jetinfer_jobs_total{model="minilm",outcome="error label with spaces"}"#,
                r#"jetinfer_jobs_total{model="minilm",outcome="ok"}"#,
            ],
            "unchanged gauges, buckets and other prefixes are left out"
        );
        assert_eq!(changed[1].delta, 40.0);
    }

    #[test]
    fn jobs_in_flight_are_summed_over_models() {
        let s = parse(
            "jetinfer_jobs_in_flight{model=\"a\"} 2\njetinfer_jobs_in_flight{model=\"b\"} 1\n\
             jetinfer_jobs_in_flight_other 7\n",
        );
        assert_eq!(in_flight(&s), 3.0);
        assert_eq!(in_flight(&parse(BEFORE)), 0.0, "absent: nothing in flight");
    }

    #[tokio::test]
    async fn an_absent_endpoint_is_reported_as_not_available() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/metrics");
        let first = before(Some(&url), None).await;
        let report = after(Some(&url), None, first).await;
        assert!(
            matches!(report, WorkerMetrics::NotAvailable { .. }),
            "{report:?}"
        );
        assert_eq!(after(None, None, None).await, WorkerMetrics::NotRequested);
    }
}
