//! Every dashboard panel and every recording rule returns data: a real
//! Prometheus (Debian package, on PATH) with the repo's recording rules
//! scrapes a real worker on a real nats-server while it processes jobs, and
//! each expression is queried through Prometheus's HTTP API. Loopback only.
//!
//! The gateway's panels and rules (every expression naming a
//! `jetinfer_gateway_` metric) need a live `jetinfer-gateway`: when its
//! binary is built (`common::gateway`), it runs in front of the same
//! worker, is scraped as job `jetinfer-gateway` and takes API traffic, and
//! its `/metrics` must carry every gateway metric the repo's files name.
//! Without the binary those expressions are skipped, and the test says so;
//! `JETINFER_REQUIRE_GATEWAY=1` makes that a failure.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gateway::{self, Gateway, REQUIRE_GATEWAY, TEST_KEY};
use common::observe::{
    self, http_get, http_post_json, http_request, query, read, start_prometheus,
};
use common::observe_setup::{observed_config, prometheus_config_jobs, DEADLINE, RATE_INTERVAL};
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

/// What names a gateway expression: the gateway's metrics share this prefix.
const GATEWAY_METRIC: &str = "jetinfer_gateway_";
/// The metrics the gateway exports (its contract with the dashboards).
const GATEWAY_METRICS: &[&str] = &[
    "jetinfer_gateway_requests_total",
    "jetinfer_gateway_request_duration_seconds",
    "jetinfer_gateway_in_flight_requests",
];

/// Every expression of every dashboard panel (row panels hold none; a
/// collapsed row's panels are inside it), Grafana variables replaced as
/// Grafana would for "All".
fn dashboard_exprs() -> Vec<(String, String)> {
    let dir = observe::monitoring_dir().join("grafana/dashboards");
    let mut exprs = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("dashboards dir") {
        let path = entry.unwrap().path();
        let board: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
        let top = board["panels"].as_array().unwrap();
        let nested = top.iter().filter_map(|p| p["panels"].as_array()).flatten();
        for panel in top.iter().chain(nested) {
            let Some(targets) = panel["targets"].as_array() else {
                assert_eq!(panel["type"], "row", "a panel without targets: {panel}");
                continue;
            };
            for target in targets {
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

/// Every `jetinfer_gateway_*` metric family the dashboards and rule files
/// name (histogram series folded into their family).
fn gateway_metrics_named_in_repo() -> std::collections::BTreeSet<String> {
    let mut texts: Vec<String> = [
        "prometheus/rules/recording.yml",
        "prometheus/rules/alerts.yml",
    ]
    .iter()
    .map(|f| read(&observe::monitoring_dir().join(f)))
    .collect();
    texts.extend(dashboard_exprs().into_iter().map(|(_, e)| e));
    let mut names = std::collections::BTreeSet::new();
    for text in &texts {
        for (at, _) in text.match_indices(GATEWAY_METRIC) {
            // A recorded series' name (`level:jetinfer_gateway_...:op`) is not a metric.
            if at > 0 && text.as_bytes()[at - 1] == b':' {
                continue;
            }
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            names.insert(family.to_string());
        }
    }
    names
}

/// API traffic through the gateway: embeddings with the test's key, a bad
/// key (401) and the model list, so every status and route the panels show
/// has series.
async fn gateway_traffic(addr: String) {
    let good = format!("Authorization: Bearer {TEST_KEY}\r\n");
    let body = r#"{"model":"minilm","input":["the quick brown fox","jumps"]}"#;
    for round in 0usize.. {
        let _ = http_post_json(&addr, "/v1/embeddings", &good, body).await;
        if round % 5 == 0 {
            let _ = http_post_json(
                &addr,
                "/v1/embeddings",
                "Authorization: Bearer wrong\r\n",
                body,
            )
            .await;
            let _ = http_request(&addr, "/v1/models", &good).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

    // The gateway in front of this worker, or why not.
    let gateway = match gateway::gateway_binary() {
        Ok(binary) => Some(Gateway::start(&binary, &server).await),
        Err(reason) => {
            assert!(
                !gateway::gateway_required(),
                "{REQUIRE_GATEWAY}=1 but the gateway cannot run: {reason}"
            );
            eprintln!("SKIPPED the gateway's panels and rules: {reason}");
            None
        }
    };
    let mut jobs = vec![("jetinfer-worker", target.as_str())];
    if let Some(gateway) = &gateway {
        jobs.push(("jetinfer-gateway", gateway.addr.as_str()));
        // One request the way an OpenAI client sends it, answered.
        let response = http_post_json(
            &gateway.addr,
            "/v1/embeddings",
            &format!("Authorization: Bearer {TEST_KEY}\r\n"),
            r#"{"model":"minilm","input":"hello"}"#,
        )
        .await
        .unwrap();
        assert_eq!(
            response.status,
            200,
            "{}\ngateway log:\n{}",
            response.body,
            gateway.log()
        );
        // The metrics the repo's files name are the ones it exports (after
        // a request: a metric appears once it is first recorded).
        let (status, metrics) = http_get(&gateway.addr, "/metrics").await.unwrap();
        assert_eq!(status, 200, "gateway /metrics: {metrics}");
        let exported: std::collections::BTreeSet<&str> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let mut wanted = gateway_metrics_named_in_repo();
        wanted.extend(GATEWAY_METRICS.iter().map(|m| m.to_string()));
        let unknown: Vec<&String> = wanted
            .iter()
            .filter(|m| !exported.contains(m.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "the gateway does not export {unknown:?}; it exports {exported:?}"
        );
    }

    let rules = read(&observe::monitoring_dir().join("prometheus/rules/recording.yml"));
    let prometheus = start_prometheus(
        &prometheus_config_jobs(&jobs, None),
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

    let api_traffic = gateway
        .as_ref()
        .map(|g| tokio::spawn(gateway_traffic(g.addr.clone())));

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
    if gateway.is_none() {
        let skipped: Vec<String> = exprs
            .iter()
            .filter(|(_, e)| e.contains(GATEWAY_METRIC))
            .map(|(n, _)| n.clone())
            .collect();
        assert!(!skipped.is_empty(), "the repo has gateway panels and rules");
        eprintln!(
            "SKIPPED {} gateway expressions (set {REQUIRE_GATEWAY}=1 to fail instead):\n  {}",
            skipped.len(),
            skipped.join("\n  ")
        );
        exprs.retain(|(_, e)| !e.contains(GATEWAY_METRIC));
    }

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
    if let Some(t) = api_traffic {
        t.abort();
    }
    let gateway_log = match &gateway {
        Some(g) if missing.iter().any(|(_, e)| e.contains(GATEWAY_METRIC)) => {
            format!("\ngateway log:\n{}", g.log())
        }
        _ => String::new(),
    };
    assert!(
        missing.is_empty(),
        "{} of {} expressions return no data from Prometheus:\n{}{gateway_log}",
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
    drop(gateway);
    http.stop().await;
}
