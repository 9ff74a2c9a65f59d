//! Short real runs: loadgen against an in-process worker (echo backend) on a
//! real nats-server, as a user would run it, files and thresholds included.

use crate::common;

use std::time::Duration;

use jetinfer_loadgen::metrics::WorkerMetrics;
use jetinfer_loadgen::scenario::Mode;
use jetinfer_loadgen::threshold::{exit_status, EXIT_THRESHOLDS_FAILED};
use jetinfer_loadgen::{execute, Plan, Threshold};
use jetinfer_nats::testing::{free_port, NatsServer};

fn plan(server: &NatsServer, out: &std::path::Path, thresholds: &[&str]) -> Plan {
    Plan {
        scenario: common::short_closed(),
        target: common::target(server),
        corpus: common::corpus(),
        thresholds: thresholds.iter().map(|t| t.parse().unwrap()).collect(),
        metrics_url: Some(format!("http://127.0.0.1:{}/metrics", free_port())),
        metrics_token: None,
        out_dir: Some(out.to_path_buf()),
        window: Duration::from_millis(500),
        seed: 7,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_run_against_a_worker_reports_every_job_and_writes_its_files() {
    let server = NatsServer::start();
    let worker = common::echo_worker(&server).await;
    let out = tempfile::tempdir().unwrap();

    let (report, files) = execute(&plan(&server, out.path(), &["errors<1%", "p99<10s"]))
        .await
        .expect("run completes");
    worker.shutdown().await;

    let s = &report.summary;
    assert!(
        s.jobs_sent > 0 && s.jobs_sent <= 60,
        "bounded: {}",
        s.jobs_sent
    );
    assert_eq!(s.jobs_ok, s.jobs_sent, "errors: {:?}", s.errors_by_kind);
    assert!(s.inputs >= s.jobs_ok, "every job has at least one input");
    assert!(s.tokens > s.inputs, "token counts come back in results");
    assert!(s.latency.count == s.jobs_ok && s.latency.p50_ms > 0.0);
    assert!(s.latency.p50_ms <= s.latency.p99_ms && s.latency.p99_ms <= s.latency.max_ms);
    assert!(!s.windows.is_empty());
    assert_eq!(
        exit_status(&report.thresholds),
        0,
        "{:?}",
        report.thresholds
    );
    assert!(
        matches!(report.worker, WorkerMetrics::NotAvailable { .. }),
        "no metrics endpoint there: {:?}",
        report.worker
    );

    let files = files.expect("files written");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
    assert_eq!(json["summary"]["jobs_ok"], s.jobs_ok);
    assert_eq!(json["worker"]["status"], "not_available");
    let csv = std::fs::read_to_string(&files.csv).unwrap();
    assert!(csv.starts_with("start_s,jobs_ok,errors,"));
    assert_eq!(csv.lines().count(), s.windows.len() + 1);
    let html = std::fs::read_to_string(&files.html).unwrap();
    assert!(html.contains("<svg") && !html.contains("<script"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_threshold_fails_the_run_with_k6s_exit_status() {
    let server = NatsServer::start();
    let worker = common::echo_worker(&server).await;
    let out = tempfile::tempdir().unwrap();
    let mut plan = plan(&server, out.path(), &["p50<1us", "errors<1%"]);
    plan.scenario.max_jobs = 10;

    let (report, _) = execute(&plan).await.expect("run completes");
    worker.shutdown().await;

    assert_eq!(exit_status(&report.thresholds), EXIT_THRESHOLDS_FAILED);
    assert!(!report.thresholds[0].passed && report.thresholds[1].passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_run_keeps_its_arrival_rate_against_a_worker() {
    let server = NatsServer::start();
    let worker = common::echo_worker(&server).await;
    let mut plan = plan(&server, std::path::Path::new("unused"), &[]);
    plan.out_dir = None;
    plan.metrics_url = None;
    plan.scenario.mode = Mode::Open;
    plan.scenario.rate = 20.0;
    plan.scenario.duration = Duration::from_millis(1500);

    let (report, _) = execute(&plan).await.expect("run completes");
    worker.shutdown().await;

    // 20 jobs/s for 1.5 s: slots at 0, 50, ..., 1450 ms.
    assert_eq!(report.summary.jobs_sent, 30);
    assert_eq!(report.summary.jobs_ok, 30);
    assert_eq!(report.worker, WorkerMetrics::NotRequested);
}

#[tokio::test]
async fn a_wrong_model_fails_fast_before_the_run() {
    let server = NatsServer::start();
    let worker = common::echo_worker(&server).await;
    let mut plan = plan(&server, std::path::Path::new("unused"), &[]);
    plan.target.model = "no-such-model".into();
    let err = execute(&plan).await.unwrap_err().to_string();
    worker.shutdown().await;
    assert!(err.contains("no-such-model"), "{err}");
}

#[test]
fn thresholds_parse_from_command_line_text() {
    assert!("p95<250ms".parse::<Threshold>().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraping_a_token_protected_metrics_endpoint_needs_the_token_file() {
    use jetinfer_loadgen::metrics::{scrape, MetricsToken};
    use jetinfer_worker::http::{self, Health, HttpServer};

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "loadgen-token\n").unwrap();
    let server = HttpServer::serve(
        "127.0.0.1:0".parse().unwrap(),
        Health::default(),
        http::MetricsToken::new("loadgen-token"),
    )
    .await
    .unwrap();
    let url = format!("http://{}/metrics", server.local_addr);

    let refused = scrape(&url, None).await.unwrap_err().to_string();
    assert!(refused.contains("401"), "{refused}");
    let token = MetricsToken::from_file(&file).unwrap();
    assert!(!format!("{token:?}").contains("loadgen-token"));
    let samples = scrape(&url, Some(&token))
        .await
        .expect("scrape with the token");
    assert!(
        samples.keys().any(|k| k.starts_with("jetinfer_build_info")),
        "{samples:?}"
    );
    server.stop().await;
}
