//! `--metrics-url` against a real worker: loadgen scrapes the `/metrics`
//! endpoint the worker library serves (echo backend, real nats-server) before
//! and after a run and reports the worker's own figures. Its own test binary,
//! because the metrics recorder is process-wide: no other test's worker may
//! add to these counters.

mod common;

use std::sync::Arc;
use std::time::Duration;

use jetinfer_loadgen::metrics::WorkerMetrics;
use jetinfer_loadgen::{execute, report, Plan};
use jetinfer_monitoring::names;
use jetinfer_nats::testing::NatsServer;
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::config::{BackendKind, WorkerConfig};
use jetinfer_worker::http::{Health, HttpServer};
use jetinfer_worker::Worker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reports_the_workers_batch_size_queue_wait_and_padding_waste() {
    let server = NatsServer::start();
    let mut config = WorkerConfig {
        nats: common::nats_config(&server),
        ..WorkerConfig::default()
    };
    config.model.backend = BackendKind::Echo;
    // As the binary does: the endpoint first, the worker flips its health.
    let health = Health::default();
    let http = HttpServer::start("127.0.0.1:0".parse().unwrap(), health.clone())
        .await
        .expect("metrics endpoint starts");
    let worker = Worker::start_with_health(config, Arc::new(EchoBackend::default()), health)
        .await
        .expect("worker starts");
    let out = tempfile::tempdir().unwrap();
    let metrics_url = format!("http://{}/metrics", http.local_addr);
    let plan = Plan {
        scenario: common::short_closed(),
        target: common::target(&server),
        corpus: common::corpus(),
        thresholds: Vec::new(),
        metrics_url: Some(metrics_url.clone()),
        metrics_token: None,
        out_dir: Some(out.path().to_path_buf()),
        window: Duration::from_millis(500),
        seed: 3,
        progress: false,
    };

    let (report, files) = execute(&plan).await.expect("run completes");
    worker.shutdown().await;
    http.stop().await;

    let sent = report.summary.jobs_sent as f64;
    assert!(sent > 0.0 && report.summary.jobs_ok == report.summary.jobs_sent);
    let WorkerMetrics::Available {
        url,
        histograms,
        changed,
    } = &report.worker
    else {
        panic!("worker metrics scraped: {:?}", report.worker);
    };
    assert_eq!(url, &metrics_url);
    let histogram = |name: &str| {
        histograms
            .iter()
            .find(|h| h.series.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("{name} in the report: {histograms:?}"))
    };
    let batch = histogram(names::BATCH_SIZE);
    assert!(batch.count >= 1.0 && batch.mean >= 1.0, "{batch:?}");
    let batched_inputs = batch.count * batch.mean;
    assert!(
        (batched_inputs - report.summary.inputs as f64).abs() < 0.5,
        "the worker's batches hold exactly the run's {} inputs: {batch:?}",
        report.summary.inputs
    );
    // Queue wait is per job: exactly this run's jobs, not the probe before it.
    let queue_wait = histogram(names::QUEUE_WAIT);
    assert_eq!(queue_wait.count, sent, "{queue_wait:?}");
    assert!(queue_wait.mean > 0.0);
    let waste = histogram(names::BATCH_PADDING_WASTE);
    assert!(
        waste.count >= 1.0 && (0.0..1.0).contains(&waste.mean),
        "{waste:?}"
    );
    let finished = changed
        .iter()
        .find(|c| c.series.starts_with(&format!("{}{{", names::JOBS_FINISHED)))
        .expect("finished jobs counted");
    assert_eq!(finished.delta, sent, "every job of the run, counted once");

    let table = report::summary_table(&report);
    assert!(table.contains(names::BATCH_SIZE) && table.contains(names::QUEUE_WAIT));
    let files = files.expect("files written");
    let html = std::fs::read_to_string(&files.html).unwrap();
    assert!(
        html.contains(names::BATCH_PADDING_WASTE),
        "worker table in the HTML"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
    assert_eq!(json["worker"]["status"], "available");
}
