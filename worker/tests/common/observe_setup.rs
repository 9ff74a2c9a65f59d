//! Set-up shared by the two monitoring tests (each runs in its own process,
//! because the metrics recorder is process-wide).

use std::time::Duration;

use jetinfer_nats::testing::NatsServer;
use jetinfer_worker::config::{BackendKind, BatchConfig, WorkerConfig};

use super::worker_config;

/// How long the queries may take to all return data / the alert to arrive.
pub const DEADLINE: Duration = Duration::from_secs(120);
/// Stands in for Grafana's `$__rate_interval` at a 1 s scrape interval.
pub const RATE_INTERVAL: &str = "30s";

pub fn prometheus_config(target: &str, alertmanager: Option<&str>) -> String {
    prometheus_config_jobs(&[("jetinfer-worker", target)], alertmanager)
}

/// A config scraping each `(job name, target)` every second; the job names
/// are the shipped ones (`jetinfer-worker`, `jetinfer-gateway`), which the
/// rules and dashboards select on.
pub fn prometheus_config_jobs(jobs: &[(&str, &str)], alertmanager: Option<&str>) -> String {
    let alerting = alertmanager
        .map(|am| format!("alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{am}\"]\n"))
        .unwrap_or_default();
    let scrape: String = jobs
        .iter()
        .map(|(job, target)| {
            format!("  - job_name: {job}\n    static_configs:\n      - targets: [\"{target}\"]\n")
        })
        .collect();
    format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - RULES_DIR/*.yml\n{alerting}\
         scrape_configs:\n{scrape}"
    )
}

pub fn observed_config(server: &NatsServer) -> WorkerConfig {
    let mut config = worker_config(server, BackendKind::Echo, BatchConfig::default());
    config.monitoring.queue_poll = Duration::from_millis(200);
    config.http.addr = "127.0.0.1:0".parse().unwrap();
    config
}
