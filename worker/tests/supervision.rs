//! A worker is never silently stuck: a backend that panics or miscounts
//! fails only the job at fault; a pipeline stage gone, or a NATS connection
//! gone past its bound, makes the worker not ready, hand its jobs back and
//! exit non-zero; the in-flight gauge returns to zero whichever way jobs
//! end. Real nats-server processes, the echo backend (in this process, or
//! the `jetinfer-worker` binary where the exit status matters), loopback
//! only, every wait bounded.

use crate::common;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use jetinfer_nats::dead_letter;
use jetinfer_nats::subjects::Tenant;
use jetinfer_nats::testing::{free_port, NatsServer};
use jetinfer_schemas::{decode_result, encode_job, headers, ErrorCode, Job};
use jetinfer_worker::backend::echo::{EchoBackend, EchoFault, ECHO_PANIC_MESSAGE};
use jetinfer_worker::config::{BackendKind, BatchConfig};
use jetinfer_worker::http::HttpServer;
use jetinfer_worker::supervise::{Failure, Stage};

use common::observe::http_get;
use common::*;

/// Upper bound for any one wait in these tests; generous, never a speed check.
const PATIENCE: Duration = Duration::from_secs(120);

/// Six inputs per batch, and time for all six to arrive: the jobs of one
/// test share one batch.
fn one_batch_of_six() -> BatchConfig {
    BatchConfig {
        max_inputs: 6,
        max_wait: Duration::from_secs(2),
        ..BatchConfig::default()
    }
}

/// Submits five good jobs and one carrying `marker` at once, to a worker
/// whose backend misbehaves on `marker` as `fault` says; checks that the
/// five are answered with their own vectors from the shared batch, and
/// returns the marked job's error and its dead letters.
async fn one_bad_input_in_a_batch(
    fault: EchoFault,
) -> (jetinfer_schemas::JobError, Vec<dead_letter::Stored>) {
    let server = NatsServer::start();
    let backend = EchoBackend::default().with_fault("marker", fault);
    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, one_batch_of_six()),
        Arc::new(backend),
    )
    .await;
    let client = client(&server).await;
    let texts: Vec<String> = (0..5).map(|i| format!("a good input number {i}")).collect();
    let good = futures::future::join_all(texts.iter().enumerate().map(|(i, text)| {
        client.submit(Job::new("minilm", vec![text.clone()]).with_id(format!("good-{i}")))
    }));
    let bad = client.submit(Job::new("minilm", vec!["the marker input".into()]).with_id("bad"));
    let (good, bad) = tokio::time::timeout(PATIENCE, async { tokio::join!(good, bad) })
        .await
        .expect("every job answered");

    let reference = EchoBackend::default();
    for (text, result) in texts.iter().zip(good) {
        let embeddings = result.unwrap().into_result().expect("a good job succeeds");
        assert_eq!(
            embeddings.timings.batch_size, 6,
            "the good job shared the batch with the bad one"
        );
        let mut expected = reference.expected(text);
        jetinfer_worker::backend::l2_normalize(&mut expected);
        assert_eq!(embeddings.embeddings, vec![expected], "its own vector");
    }
    let error = bad.unwrap().into_result().expect_err("the bad job fails");

    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let mut jobs = js.get_stream("JETINFER_JOBS").await.unwrap();
    assert_eq!(
        settled_state(&mut jobs, "worker-minilm").await,
        (0, 0),
        "nothing left pending or unacked"
    );
    assert_eq!(worker.jobs_in_hand(), 0, "nothing left in the ledger");
    let letters = dead_letter::list(&js, 10).await.unwrap();

    // The same worker goes on serving: no stage died with the batch.
    let after = client
        .submit(Job::new("minilm", vec!["after the bad batch".into()]))
        .await
        .unwrap();
    assert!(after.into_result().is_ok());
    worker.shutdown().await;
    (error, letters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_batch_dead_letters_only_the_poison_job() {
    let (error, letters) = one_bad_input_in_a_batch(EchoFault::Panic).await;
    assert_eq!(error.code, ErrorCode::Internal);
    assert!(
        error.message.contains(ECHO_PANIC_MESSAGE),
        "the panic message is kept: {}",
        error.message
    );
    assert_eq!(letters.len(), 1, "only the poison job is a dead letter");
    assert_eq!(
        (letters[0].job_id.as_str(), letters[0].reason.as_str()),
        ("bad", "internal")
    );
    assert!(
        letters[0].detail.contains(ECHO_PANIC_MESSAGE),
        "{}",
        letters[0].detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_backend_result_is_an_error_of_that_batch() {
    let (error, letters) = one_bad_input_in_a_batch(EchoFault::ShortResult).await;
    assert_eq!(error.code, ErrorCode::Internal);
    assert!(
        error.message.contains("0 embeddings for 1 inputs"),
        "{}",
        error.message
    );
    assert_eq!(letters.len(), 1, "only the short job is a dead letter");
    assert_eq!(
        (letters[0].job_id.as_str(), letters[0].reason.as_str()),
        ("bad", "internal")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_gone_makes_the_worker_not_ready_and_exit_non_zero_and_its_jobs_are_answered_by_another_worker(
) {
    let server = NatsServer::start();
    let mut config = worker_config(
        &server,
        BackendKind::Echo,
        BatchConfig {
            max_inputs: 4,
            ..BatchConfig::default()
        },
    );
    // Far beyond the test's patience: only a hand-back brings jobs back in
    // time, never JetStream's redelivery of jobs nobody acked.
    config.consumer.ack_wait = Duration::from_secs(600);
    // The inference stage ends on the marker: its backend says it is
    // unusable, as after a lost device.
    let failing = EchoBackend::new(256, Duration::from_micros(500))
        .with_fault("unusable", EchoFault::Unusable);
    let worker = start_worker(config.clone(), Arc::new(failing)).await;
    let health = worker.health();
    let http = HttpServer::start("127.0.0.1:0".parse().unwrap(), health)
        .await
        .unwrap();
    let addr = http.local_addr.to_string();
    assert_eq!(http_get(&addr, "/readyz").await.unwrap().0, 200);

    let client = client(&server).await;
    let n = 40;
    let jobs: Vec<Job> = (0..n)
        .map(|i| {
            let text = if i == 5 {
                "this input makes the backend unusable".to_string()
            } else {
                format!("job number {i} of the stage test")
            };
            Job::new("minilm", vec![text]).with_id(format!("stage-{i}"))
        })
        .collect();
    let run = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .submit_many(jobs, n)
                .map(|(id, outcome)| (id, outcome.map(|r| r.into_result())))
                .collect::<Vec<_>>()
                .await
        })
    };

    let failure = tokio::time::timeout(PATIENCE, worker.run_until_stopped())
        .await
        .expect("the worker stops on its own")
        .expect_err("it stops on a failure");
    // It names the model whose stage is gone: a worker may serve several.
    assert!(
        matches!(
            &failure,
            Failure::StageGone {
                stage: Stage::Infer,
                model: Some(model),
                ..
            } if model == "minilm"
        ),
        "{failure}"
    );
    assert_ne!(failure.exit_code(), 0, "the binary exits non-zero");
    let (status, body) = http_get(&addr, "/readyz").await.unwrap();
    assert_eq!(status, 503, "not ready after a stage is gone");
    assert!(
        body.contains("stage infer of model minilm is gone"),
        "{body}"
    );

    // Another worker answers every job, the one that broke the first
    // worker's backend included.
    let taking_over = start_worker(config, Arc::new(EchoBackend::default())).await;
    let outcomes = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("every job answered before ack_wait")
        .unwrap();
    assert_eq!(outcomes.len(), n);
    for (id, outcome) in outcomes {
        assert!(matches!(outcome, Ok(Ok(_))), "{id}: {outcome:?}");
    }
    taking_over.shutdown().await;
    http.stop().await;
}

/// The `jetinfer-worker` binary with the echo backend, its `/readyz` on a
/// known port; killed on drop.
struct WorkerProcess {
    child: Child,
    http: String,
}

impl WorkerProcess {
    fn start(server: &NatsServer, max_disconnected_s: &str) -> Self {
        let http = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_jetinfer-worker"))
            .env("JETINFER_NATS__URLS", format!("[\"{}\"]", server.url()))
            .env("JETINFER_MODEL__BACKEND", "echo")
            .env("JETINFER_HTTP__ADDR", &http)
            .env("JETINFER_SUPERVISION__MAX_DISCONNECTED", max_disconnected_s)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning jetinfer-worker");
        Self { child, http }
    }

    /// `/readyz`'s status and body, or `None` while nothing answers.
    async fn readiness(&self) -> Option<(u16, String)> {
        http_get(&self.http, "/readyz").await.ok()
    }

    /// Waits (bounded) until `/readyz` answers `status`; returns its body.
    async fn wait_readiness(&mut self, status: u16) -> String {
        let started = Instant::now();
        loop {
            if let Some((seen, body)) = self.readiness().await {
                if seen == status {
                    return body;
                }
            }
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("the worker exited ({exit}) before /readyz answered {status}");
            }
            assert!(
                started.elapsed() < PATIENCE,
                "/readyz never answered {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) for the process to exit on its own.
    async fn wait_exit(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < PATIENCE, "the worker never exited");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn terminate(&mut self) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("sending SIGTERM");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_connection_makes_the_worker_not_ready_and_exit_non_zero() {
    let mut server = NatsServer::start();
    let mut worker = WorkerProcess::start(&server, "5");
    worker.wait_readiness(200).await;

    tokio::task::block_in_place(|| server.kill());
    let body = worker.wait_readiness(503).await;
    assert!(body.contains("not connected to NATS"), "{body}");
    let status = worker.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(i32::from(jetinfer_worker::supervise::EXIT_CONNECTION_LOST)),
        "exit status {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_within_the_bound_restores_readiness() {
    let mut server = NatsServer::start();
    let mut worker = WorkerProcess::start(&server, "600");
    worker.wait_readiness(200).await;

    tokio::task::block_in_place(|| server.kill());
    worker.wait_readiness(503).await;
    tokio::task::block_in_place(|| server.resume());
    worker.wait_readiness(200).await;
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker kept running"
    );
    worker.terminate();
    let status = worker.wait_exit().await;
    assert!(status.success(), "a SIGTERM still exits 0: {status}");
}

/// The value of `jetinfer_jobs_in_flight` for `model`, as `/metrics` shows it.
async fn in_flight(addr: &str, model: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let series = format!("jetinfer_jobs_in_flight{{model=\"{model}\"}}");
    body.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map(|value| value.trim().parse().expect("a gauge value"))
        .unwrap_or(0.0)
}

/// Polls the gauge until `wanted` (bounded); returns what it last read.
async fn wait_in_flight(addr: &str, model: &str, wanted: f64) -> f64 {
    let started = Instant::now();
    loop {
        let seen = in_flight(addr, model).await;
        if seen == wanted || started.elapsed() > PATIENCE {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_gauge_returns_to_zero_after_expiries_and_a_cancel() {
    // Its own model name: the metrics recorder is shared by every test of
    // this process, and the gauge is labelled by model.
    const MODEL: &str = "gauge";
    let server = NatsServer::start();
    let mut config = worker_config(
        &server,
        BackendKind::Echo,
        BatchConfig {
            max_inputs: 1,
            ..BatchConfig::default()
        },
    );
    config.model.name = MODEL.to_string();
    // 20 ms per token: the long first job holds the model for seconds,
    // while the others wait admitted behind it.
    let worker = start_worker(
        config,
        Arc::new(EchoBackend::new(256, Duration::from_millis(20))),
    )
    .await;
    let http = HttpServer::start("127.0.0.1:0".parse().unwrap(), worker.health())
        .await
        .unwrap();
    let addr = http.local_addr.to_string();
    let client = client(&server).await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats.clone());

    let long_text = vec!["word"; 250].join(" ");
    let blocker = {
        let client = client.clone();
        tokio::spawn(async move { client.submit(Job::new(MODEL, vec![long_text])).await })
    };
    assert_eq!(
        wait_in_flight(&addr, MODEL, 1.0).await,
        1.0,
        "the long job is admitted"
    );

    // Five jobs whose deadline passes while they wait.
    let deadline = (time::OffsetDateTime::now_utc() + Duration::from_secs(3))
        .unix_timestamp_nanos()
        / 1_000_000;
    let expiring: Vec<_> = (0..5)
        .map(|i| {
            let client = client.clone();
            let job =
                Job::new(MODEL, vec![format!("late {i}")]).with_deadline_unix_ms(deadline as u64);
            tokio::spawn(async move { client.submit(job).await })
        })
        .collect();
    // Five jobs of a bulk run that is cancelled while they wait.
    let inbox = "results.default.gauge-bulk";
    let mut replies = nats.subscribe(inbox).await.unwrap();
    nats.flush().await.unwrap();
    for i in 0..5 {
        let id = format!("run1:doc-{i}");
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, id.as_str());
        h.insert(headers::REPLY_TO, inbox);
        h.insert(headers::BULK_RUN, "run1");
        let job = Job::new(MODEL, vec![format!("bulk {i}")]).with_id(id.as_str());
        js.publish_with_headers(format!("jobs.{MODEL}.default"), h, encode_job(&job).into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert_eq!(
        wait_in_flight(&addr, MODEL, 11.0).await,
        11.0,
        "all eleven jobs admitted behind the long one"
    );
    let kv = jetinfer_nats::bulk::bucket(&js).await.unwrap();
    jetinfer_nats::bulk::cancel(
        &js,
        &kv,
        &Tenant::new("default".to_string()).unwrap(),
        "run1",
    )
    .await
    .unwrap();

    let answered = blocker.await.unwrap().unwrap();
    assert!(answered.into_result().is_ok());
    for job in expiring {
        let error = job.await.unwrap().unwrap().into_result().unwrap_err();
        assert_eq!(error.code, ErrorCode::DeadlineExceeded);
    }
    for _ in 0..5 {
        let message = tokio::time::timeout(PATIENCE, replies.next())
            .await
            .expect("a cancelled job is answered")
            .unwrap();
        let error = decode_result(&message.payload)
            .unwrap()
            .into_result()
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::Cancelled);
    }
    assert_eq!(
        wait_in_flight(&addr, MODEL, 0.0).await,
        0.0,
        "every job that left the worker left the gauge"
    );
    assert_eq!(worker.jobs_in_hand(), 0);
    worker.shutdown().await;
    http.stop().await;
}

/// A worker started while JetStream cannot answer (two of a cluster's three
/// nodes down, so no quorum: what a leader election or a restarting server
/// looks like to a starting worker) waits, as it waits for a first
/// connection, instead of exiting; once the nodes are back it provisions
/// its stream and consumer and answers jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_jetstream_has_no_quorum_waits_for_it_then_serves() {
    use jetinfer_nats::testing::NatsCluster;
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    cluster.kill("n1");
    cluster.kill("n2");
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker = runs::WorkerProcess::start_logged(
        &urls[..1],
        "echo",
        &[
            ("JETINFER_NATS__STARTUP_RETRY_FOR", "90"),
            ("JETINFER_STREAM__REPLICAS", "3"),
        ],
        Some(log.path()),
    );
    // Longer than JetStream's request timeout (5 s): a worker that gave up
    // on the first failed request would have exited by now.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(worker.exited(), None, "the worker waits for JetStream");
    cluster.resume("n1");
    cluster.resume("n2");

    let client = runs::patient_client_at(jetinfer_nats::NatsConfig {
        urls: urls.clone(),
        startup_retry_for: Duration::from_secs(30),
        ..jetinfer_nats::NatsConfig::default()
    })
    .await;
    let started = Instant::now();
    while client
        .submit(Job::new("minilm", vec!["warm-up".into()]))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < PATIENCE,
            "the worker never served; its log:\n{}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let result = client
        .submit(Job::new(
            "minilm",
            vec!["after the quorum came back".into()],
        ))
        .await
        .expect("answered");
    assert!(result.into_result().is_ok());
    assert_eq!(worker.exited(), None, "the worker is still serving");
    worker.kill();
}
