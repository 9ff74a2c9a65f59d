//! The backlog-without-consumer alert end to end: a real worker consumes, a
//! backlog builds, the worker goes away, and the real Prometheus (with the
//! repo's alert rules, `for:` shortened) fires the alert, the real
//! Alertmanager (the repo's config, secrets and receivers pointed at
//! loopback, throttling shortened) routes it, and a webhook this test serves
//! receives it. Loopback only.
//!
//! Two things make this reliable, both learnt from a flaky earlier version:
//! - The worker visibly finishes a job before the backlog is published. With
//!   `for:` at 1 s the alert would otherwise fire for a moment while the
//!   worker is still consuming (backlog scraped before its first finished
//!   job), resolve, and fire again after the shutdown; Alertmanager then
//!   holds the second firing for the rest of the group's `group_interval`.
//! - `group_interval` is shortened with `group_wait`, so no notification can
//!   wait the shipped 5 minutes. The shipped file is checked by `amtool
//!   check-config` in `scripts/test.sh`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use common::observe::{self, query, read, start_alertmanager, start_prometheus, Daemon};
use common::observe_setup::{observed_config, prometheus_config, DEADLINE};
use jetinfer_nats::testing::{free_port, NatsServer};
use jetinfer_nats::Tenant;
use jetinfer_schemas::Job;
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::http::HttpServer;
use jetinfer_worker::Worker;
use tokio::sync::mpsc;

const ALERT: &str = "JetinferBacklogWithoutConsumer";

/// The webhook receiver: an axum server (the HTTP stack the worker's own
/// endpoints use) that forwards each notification body and answers 200.
async fn webhook() -> (String, mpsc::UnboundedReceiver<String>) {
    async fn receive(State(tx): State<mpsc::UnboundedSender<String>>, body: String) -> StatusCode {
        let _ = tx.send(body);
        StatusCode::OK
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route("/alerts", post(receive)).with_state(tx);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/alerts"), rx)
}

/// `text` with `from` replaced by `to`; `from` must be there, so a change to
/// the shipped file cannot silently leave the test on the shipped values.
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in the shipped file");
    text.replace(from, to)
}

/// The repo's Alertmanager config with its receivers on loopback (the
/// webhook at `hook_url`; Slack and email at closed ports) and throttling
/// shortened; routing, grouping and inhibition as shipped.
fn alertmanager_config(hook_url: &str, secrets: &std::path::Path) -> String {
    let shipped = read(&observe::monitoring_dir().join("alertmanager/alertmanager.yml"));
    let smtp = format!("127.0.0.1:{}", free_port());
    [
        ("/etc/alertmanager/secrets", secrets.display().to_string()),
        ("http://alert-webhook:8080/alerts", hook_url.to_string()),
        ("smtp.example.invalid:587", smtp),
        ("group_wait: 30s", "group_wait: 1s".into()),
        ("group_wait: 10s", "group_wait: 1s".into()),
        ("group_interval: 5m", "group_interval: 2s".into()),
    ]
    .iter()
    .fold(shipped, |text, (from, to)| replaced(&text, from, to))
}

/// What Prometheus and Alertmanager know, for a failure message.
async fn diagnosis(prom: &str, alertmanager: &Daemon) -> String {
    let history = query(prom, &format!("ALERTS{{alertname=\"{ALERT}\"}}[5m]")).await;
    let groups = observe::http_get(&alertmanager.addr(), "/api/v2/alerts/groups")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    let log = std::fs::read_to_string(alertmanager.dir.path().join("log")).unwrap_or_default();
    format!(
        "Prometheus ALERTS history: {history:?}\nAlertmanager groups: {groups}\n\
         Alertmanager log (debug):\n{log}"
    )
}

/// Polls Prometheus until `expr` returns data.
async fn wait_for(prom: &str, expr: &str, started: Instant) {
    while query(prom, expr).await.is_empty() {
        assert!(started.elapsed() < DEADLINE, "Prometheus never saw {expr}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_without_a_consuming_worker_fires_and_reaches_the_webhook() {
    let server = NatsServer::start();
    let mut config = observed_config(&server);
    // One job at a time, a tenth of a second each: a backlog builds and stays.
    config.consumer.max_ack_pending = 1;
    let backend = Arc::new(EchoBackend::new(256, Duration::from_millis(100)));
    let worker = Worker::start(config.clone(), backend).await.unwrap();
    let http = HttpServer::start(config.http.addr, worker.health())
        .await
        .unwrap();

    let (hook_url, mut hooks) = webhook().await;
    let secrets = tempfile::tempdir().unwrap();
    for file in ["smtp_password", "slack_webhook_url"] {
        std::fs::write(secrets.path().join(file), "http://127.0.0.1:1/").unwrap();
    }
    let alertmanager =
        start_alertmanager(&alertmanager_config(&hook_url, secrets.path()), secrets).await;

    // The repo's alert rules, verbatim except that `for:` is 1 s.
    let rules_dir = observe::monitoring_dir().join("prometheus/rules");
    let alerts = read(&rules_dir.join("alerts.yml"))
        .lines()
        .map(|l| match l.split_once("for: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: 1s"),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let rules = [
        ("recording.yml", read(&rules_dir.join("recording.yml"))),
        ("alerts.yml", alerts),
    ];
    let prometheus = start_prometheus(
        &prometheus_config(&http.local_addr.to_string(), Some(&alertmanager.addr())),
        &rules,
    )
    .await;
    let prom = prometheus.addr();

    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let tenant = Tenant::new("acme").unwrap();
    let publish = |text: String| {
        let js = js.clone();
        let tenant = tenant.clone();
        async move {
            let job = Job::new("minilm", vec![text]);
            jetinfer_nats::publish_job(&js, &tenant, &job, "results.acme.nobody")
                .await
                .unwrap();
        }
    };

    // The worker is seen consuming: up, and finishing jobs.
    let started = Instant::now();
    publish("first".into()).await;
    // (Not a rate: the counter's first sample already counts the job.)
    wait_for(&prom, "sum(jetinfer_jobs_finished_total) > 0", started).await;

    // A backlog builds while it consumes: no alert, not even pending.
    for i in 0..40 {
        publish(format!("backlog {i}")).await;
    }
    wait_for(&prom, "jetinfer_queue_pending_jobs > 0", started).await;
    let early = query(&prom, &format!("ALERTS{{alertname=\"{ALERT}\"}}")).await;
    assert!(
        early.is_empty(),
        "{ALERT} while the worker consumes: {early:?}"
    );

    // Then the only worker goes away.
    worker.shutdown().await;
    http.stop().await;

    let alert = loop {
        let remaining = DEADLINE.saturating_sub(started.elapsed());
        let Ok(body) = tokio::time::timeout(remaining, hooks.recv()).await else {
            panic!(
                "no {ALERT} notification reached the webhook within {DEADLINE:?}\n{}",
                diagnosis(&prom, &alertmanager).await
            );
        };
        let body = body.expect("webhook receiver running");
        let payload: serde_json::Value = serde_json::from_str(&body).unwrap();
        let found = payload["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["labels"]["alertname"] == ALERT && a["status"] == "firing");
        if let Some(alert) = found {
            break alert.clone();
        }
    };
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["consumer"], "worker-minilm");
    assert!(alert["annotations"]["runbook_url"]
        .as_str()
        .unwrap()
        .ends_with("docs/runbooks.md#jetinferbacklogwithoutconsumer"));
}
