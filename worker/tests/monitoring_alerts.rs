//! The backlog-without-consumer alert end to end: a real worker builds a
//! backlog, goes away, and the real Prometheus (with the repo's alert rules,
//! `for:` shortened) fires the alert, the real Alertmanager (the repo's config,
//! secrets and receivers pointed at loopback) routes it, and a webhook this
//! test serves receives it. Loopback only.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::observe::{self, query, read, start_alertmanager, start_prometheus};
use common::observe_setup::{observed_config, prometheus_config, DEADLINE};
use jetinfer_nats::testing::{free_port, NatsServer};
use jetinfer_nats::Tenant;
use jetinfer_schemas::Job;
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::http::HttpServer;
use jetinfer_worker::Worker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// A tiny webhook receiver: forwards each POST body, answers 200.
async fn webhook() -> (String, mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            // Alertmanager keeps connections alive: serve every request on
            // this connection, not just the first.
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&raw).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() < length {
                        continue;
                    }
                    let _ = tx.send(body[..length].to_string());
                    let consumed = head.len() + 4 + length;
                    raw.drain(..consumed.min(raw.len()));
                    if stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}/alerts"), rx)
}

// Flaky since the reliability merge: in about one run in four, Prometheus
// fires the alert and Alertmanager holds it (seen through both APIs), but no
// notification reaches the test's webhook before the deadline. Until that is
// understood it runs on demand only:
//     cargo test -p jetinfer-worker --test monitoring_alerts -- --ignored
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "flaky notification delivery to the test webhook; see the comment above"]
async fn backlog_without_a_consuming_worker_fires_and_reaches_the_webhook() {
    let server = NatsServer::start();
    let mut config = observed_config(&server);
    // One job at a time, half a second each: a backlog builds and stays.
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
    let am_config = read(&observe::monitoring_dir().join("alertmanager/alertmanager.yml"))
        .replace(
            "/etc/alertmanager/secrets",
            &secrets.path().display().to_string(),
        )
        .replace("http://alert-webhook:8080/alerts", &hook_url)
        .replace(
            "smtp.example.invalid:587",
            &format!("127.0.0.1:{}", free_port()),
        )
        // Throttling shortened like `for:` below; routing is the repo's.
        .replace("group_wait: 30s", "group_wait: 2s")
        .replace("group_wait: 10s", "group_wait: 2s");
    let alertmanager = start_alertmanager(&am_config, secrets).await;

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
    for i in 0..40 {
        let job = Job::new("minilm", vec![format!("backlog {i}")]);
        jetinfer_nats::publish_job(&js, &tenant, &job, "results.acme.nobody")
            .await
            .unwrap();
    }

    // Prometheus sees the backlog; then the only worker goes away.
    let started = Instant::now();
    while query(&prom, "jetinfer_queue_pending_jobs > 0")
        .await
        .is_empty()
    {
        assert!(
            started.elapsed() < DEADLINE,
            "Prometheus never saw the backlog"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    worker.shutdown().await;
    http.stop().await;

    let alert = loop {
        let remaining = DEADLINE.saturating_sub(started.elapsed());
        let body = tokio::time::timeout(remaining, hooks.recv())
            .await
            .expect("no JetinferBacklogWithoutConsumer notification reached the webhook in time")
            .expect("webhook receiver running");
        let payload: serde_json::Value = serde_json::from_str(&body).unwrap();
        let found = payload["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| {
                a["labels"]["alertname"] == "JetinferBacklogWithoutConsumer"
                    && a["status"] == "firing"
            });
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
