//! Every dashboard panel and every recording rule returns data: a real
//! Prometheus (Debian package, on PATH) with the repo's recording rules
//! scrapes a real worker on a real nats-server while it processes jobs, and
//! each expression is queried through Prometheus's HTTP API. Loopback only.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::observe::{self, http_get, query, read, start_prometheus};
use common::observe_setup::{observed_config, prometheus_config, DEADLINE, RATE_INTERVAL};
use common::*;
use jetinfer_nats::testing::NatsServer;
use jetinfer_schemas::{Job, Truncation};
use jetinfer_worker::http::HttpServer;
use jetinfer_worker::{load_backend, Worker};

/// Panels allowed to return nothing here, with why.
const EXCEPTIONS: &[(&str, &str)] = &[(
    "jetinfer_gpu_memory",
    "GPU memory exists only in CUDA builds (absent, not faked, on CPU)",
)];

/// Every expression of every dashboard panel, Grafana variables replaced as
/// Grafana would for "All".
fn dashboard_exprs() -> Vec<(String, String)> {
    let dir = observe::monitoring_dir().join("grafana/dashboards");
    let mut exprs = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("dashboards dir") {
        let path = entry.unwrap().path();
        let board: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
        for panel in board["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$__range", "5m")
                    .replace("$model", ".*")
                    .replace("$consumer", ".*");
                let name = format!(
                    "{} / {}",
                    board["title"].as_str().unwrap(),
                    panel["title"].as_str().unwrap()
                );
                exprs.push((name, expr));
            }
        }
    }
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scraped_worker_feeds_every_dashboard_panel_and_rule_and_answers_service_discovery() {
    let server = NatsServer::start();
    let config = observed_config(&server);
    let backend = load_backend(&config.model).unwrap();
    let worker = Worker::start(config.clone(), backend).await.unwrap();
    let http = HttpServer::start(config.http.addr, worker.health())
        .await
        .unwrap();
    let target = http.local_addr.to_string();
    assert_eq!(http_get(&target, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(&target, "/readyz").await.unwrap().0, 200);

    // Discoverable with ordinary NATS tooling: the Services API INFO verb.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let info = nats
        .request("$SRV.INFO.jetinfer-worker", "".into())
        .await
        .expect("the worker answers $SRV.INFO");
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["name"], "jetinfer-worker");
    assert_eq!(info["metadata"]["model"], "minilm");
    assert_eq!(
        info["metadata"]["batch_max_inputs"],
        config.batch.max_inputs.to_string()
    );

    let rules = read(&observe::monitoring_dir().join("prometheus/rules/recording.yml"));
    let prometheus = start_prometheus(
        &prometheus_config(&target, None),
        &[("recording.yml", rules)],
    )
    .await;
    let prom = prometheus.addr();

    // Traffic for as long as the test looks: ok jobs of several lengths and
    // one that is refused (input_too_long), so error series exist too.
    let client = Arc::new(client(&server).await);
    let traffic = tokio::spawn({
        let client = Arc::clone(&client);
        async move {
            for round in 0usize.. {
                let inputs = (0..4)
                    .map(|i| "word ".repeat(1 + (round + i) % 7))
                    .collect();
                let _ = client.submit(Job::new("minilm", inputs)).await;
                if round % 10 == 0 {
                    let mut job = Job::new("minilm", vec!["long ".repeat(400)]);
                    job.options.truncation = Truncation::Reject;
                    let _ = client.submit(job).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let (status, body) = http_get(&prom, "/api/v1/rules?type=record").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let rules: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut exprs: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| {
            let name = r["name"].as_str().unwrap().to_string();
            (format!("recording rule {name}"), name)
        })
        .collect();
    assert!(exprs.len() >= 10, "recording rules loaded: {exprs:?}");
    exprs.extend(dashboard_exprs());
    // Operators see how the model computes (a fallback to slower products
    // shows here); this worker runs the echo backend.
    exprs.push((
        "the loaded model's compute label".to_string(),
        r#"jetinfer_model_loaded{compute="echo"}"#.to_string(),
    ));

    let started = Instant::now();
    let mut missing: Vec<(String, String)>;
    loop {
        missing = Vec::new();
        for (name, expr) in &exprs {
            let excepted = EXCEPTIONS.iter().any(|(m, _)| expr.contains(m));
            if !excepted && query(&prom, expr).await.is_empty() {
                missing.push((name.clone(), expr.clone()));
            }
        }
        if missing.is_empty() || started.elapsed() > DEADLINE {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    traffic.abort();
    assert!(
        missing.is_empty(),
        "{} of {} expressions return no data from Prometheus:\n{}",
        missing.len(),
        exprs.len(),
        missing
            .iter()
            .map(|(n, e)| format!("  {n}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    if !cfg!(feature = "cuda") {
        assert!(
            query(&prom, "jetinfer_gpu_memory_used_bytes")
                .await
                .is_empty(),
            "a CPU build must not report GPU memory"
        );
    }

    let health = worker.health();
    worker.shutdown().await;
    assert!(
        !health.not_ready().is_empty(),
        "a stopped worker is not ready"
    );
    http.stop().await;
}
