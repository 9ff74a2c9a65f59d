//! Nothing lost, nothing answered twice, under faults, on real nats-server
//! processes (loopback only, every loop bounded). The CI sizes are small; set
//! `JETINFER_FAULT_JOBS` (or run `scripts/faults.sh`) for the larger runs.
//!
//! Each test prints a line with its figures: jobs, faults injected, lost,
//! computed twice (results seen twice on the wire, where a test listens
//! there), `answered_twice_at_client` (job ids the caller got more than one
//! outcome for, counted from what `submit_many` handed back; asserted 0) and
//! `results_stored_twice` (job ids with more than one result stored on the
//! client's inbox in the results stream, read back after the run: the
//! client reads its results from there, so these reached it twice and it
//! dropped the second; allowed).

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use jetinfer_nats::dead_letter;
use jetinfer_nats::testing::NatsServer;
use jetinfer_producer::{Client, ClientConfig, SubmitError};
use jetinfer_schemas::{decode_result, encode_job, ErrorCode, Job};
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::config::{BackendKind, BatchConfig};

use common::runs::*;
use common::*;

fn jobs_from_env(default: usize) -> usize {
    count_from_env("JETINFER_FAULT_JOBS", default)
}

async fn crash_run(backend: &str, n: usize, kills: usize, delay_us: &str) {
    let server = NatsServer::start();
    // Short ack_wait so jobs held by a killed worker come back quickly.
    let env = [
        ("JETINFER_CONSUMER__ACK_WAIT", "2"),
        ("JETINFER_MODEL__ECHO_DELAY_PER_TOKEN_US", delay_us),
        ("JETINFER_BATCH__MAX_INPUTS", "16"),
    ];
    let mut victim = WorkerProcess::start(&server, backend, &env);
    let _steady = WorkerProcess::start(&server, backend, &env);
    let counter = WireCounter::start(&server).await;
    let client = patient_client(&server).await;
    wait_for_workers(&client).await;

    let done = Arc::new(AtomicUsize::new(0));
    let run = {
        let client = client.clone();
        let done = Arc::clone(&done);
        let prefix = format!("crash-{backend}");
        tokio::spawn(async move { submit_all(&client, n, &prefix, done).await })
    };
    for k in 1..=kills {
        wait_until(&done, n * k / (kills + 1)).await;
        victim.kill();
        victim = WorkerProcess::start(&server, backend, &env);
    }
    let outcomes = tokio::time::timeout(PATIENCE * 2, run)
        .await
        .expect("run finished")
        .unwrap();
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let (ok, failed) = (outcomes.ok, &outcomes.failed);
    eprintln!(
        "worker crash ({backend}): jobs={n} kills={kills} answered={ok} lost={} computed_twice={} {}",
        n - ok - failed.len(),
        counter.computed_twice(),
        duplicates(&js, &client, &outcomes).await
    );
    assert!(
        failed.is_empty(),
        "failed jobs: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert_eq!(ok, n, "every job answered exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_workers_lose_no_job_echo() {
    crash_run("echo", jobs_from_env(2000), 5, "20").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_workers_lose_no_job_candle() {
    crash_run("candle", jobs_from_env(2000) / 10, 2, "0").await;
}

async fn server_restart_run(graceful: bool) {
    let mut server = NatsServer::start();
    let mut config = worker_config(&server, BackendKind::Echo, BatchConfig::default());
    config.consumer.ack_wait = Duration::from_secs(2);
    config.nats.startup_retry_for = Duration::from_secs(30);
    let worker = start_worker(
        config,
        Arc::new(EchoBackend::new(256, Duration::from_micros(50))),
    )
    .await;
    let client = patient_client(&server).await;
    let n = jobs_from_env(2000) / 2;
    let done = Arc::new(AtomicUsize::new(0));
    let run = {
        let client = client.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move { submit_all(&client, n, "restart", done).await })
    };
    wait_until(&done, n / 4).await;
    tokio::task::block_in_place(|| {
        if graceful {
            server.restart_gracefully()
        } else {
            server.restart()
        }
    });
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    finish_run(
        run,
        n,
        &format!("server restart (graceful={graceful}): jobs={n} restarts=1"),
        &js,
        &client,
    )
    .await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sigkilled_and_restarted_mid_run_loses_nothing() {
    server_restart_run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_and_restarted_mid_run_loses_nothing() {
    server_restart_run(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_jobs_become_dead_letters_and_every_good_job_is_answered() {
    let server = NatsServer::start();
    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, BatchConfig::default()),
        Arc::new(EchoBackend::default()),
    )
    .await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    let client = patient_client(&server).await;

    let good = 1000;
    let done = Arc::new(AtomicUsize::new(0));
    let run = {
        let client = client.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move { submit_all(&client, good, "good", done).await })
    };
    // 100 bad jobs of four kinds, interleaved with the good ones.
    let inbox = "results.default.poison";
    let mut replies = nats.subscribe(inbox).await.unwrap();
    for i in 0..100 {
        let id = format!("bad-{i}");
        let (reply_to, payload) = match i % 4 {
            0 => (Some(inbox), b"\xc1\xc1 not a job".to_vec()),
            1 => (
                Some(inbox),
                encode_job(&Job::new("minilm", vec![]).with_id(&id)),
            ),
            2 => (
                Some(inbox),
                encode_job(&Job::new("other", vec!["x".into()]).with_id(&id)),
            ),
            _ => (
                None,
                encode_job(&Job::new("minilm", vec!["x".into()]).with_id(&id)),
            ),
        };
        publish_raw(&js, "jobs.minilm.default", reply_to, &id, payload).await;
    }
    let outcomes = tokio::time::timeout(PATIENCE, run).await.unwrap().unwrap();
    assert!(outcomes.failed.is_empty(), "{:?}", outcomes.failed);
    assert_eq!(outcomes.ok, good);
    let good_duplicates = duplicates(&js, &client, &outcomes).await;

    // The 75 with a reply subject got a typed error reply.
    let mut replied = 0;
    while replied < 75 {
        let message = tokio::time::timeout(PATIENCE, replies.next())
            .await
            .unwrap()
            .unwrap();
        let code = decode_result(&message.payload)
            .unwrap()
            .into_result()
            .unwrap_err()
            .code;
        assert!(
            matches!(code, ErrorCode::InvalidInput | ErrorCode::UnknownModel),
            "{code}"
        );
        replied += 1;
    }
    // All 100 are dead letters, each with its reason. A job's error reply is
    // sent before its dead letter is stored, and the 25 without a reply
    // subject send none, so the last letters may still be on their way.
    let waiting = std::time::Instant::now();
    let letters = loop {
        let letters = dead_letter::list(&js, 1000).await.unwrap();
        if letters.len() >= 100 || waiting.elapsed() > PATIENCE {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letters.len(), 100);
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for letter in &letters {
        assert!(letter.job_id.starts_with("bad-"), "{}", letter.job_id);
        assert_eq!(letter.original_subject, "jobs.minilm.default");
        *reasons.entry(letter.reason.clone()).or_default() += 1;
    }
    assert_eq!(reasons.get("invalid_input"), Some(&75), "{reasons:?}");
    assert_eq!(reasons.get("unknown_model"), Some(&25), "{reasons:?}");
    eprintln!(
        "poison: good={good} answered={} bad=100 dead_letters={} reasons={reasons:?} {good_duplicates}",
        outcomes.ok,
        letters.len()
    );
    // The same worker served it all: it never restarted.
    assert_eq!(worker.jobs_in_hand(), 0);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_failing_is_answered_and_dead_lettered_after_max_deliver_then_replayable()
{
    let server = NatsServer::start();
    let mut config = worker_config(&server, BackendKind::Echo, BatchConfig::default());
    config.consumer.max_deliver = 3;
    config.retry.min_delay = Duration::from_millis(50);
    config.retry.max_delay = Duration::from_millis(200);
    let poisoned = Arc::new(EchoBackend::default().with_poison("kaboom"));
    let worker = start_worker(config.clone(), poisoned).await;
    let client = patient_client(&server).await;

    // A good job batched with the poison one still succeeds: the failing
    // batch is split and only the poisoned input fails.
    let (bad, good) = tokio::join!(
        client.submit(Job::new("minilm", vec!["this goes kaboom".into()]).with_id("boom")),
        client.submit(Job::new("minilm", vec!["this is fine".into()])),
    );
    assert!(good.unwrap().into_result().is_ok());
    let err = bad.unwrap().into_result().unwrap_err();
    assert_eq!(err.code, ErrorCode::Internal);
    assert!(err.message.contains("3 deliveries"), "{}", err.message);

    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats);
    let letters = dead_letter::list(&js, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (
            letters[0].job_id.as_str(),
            letters[0].reason.as_str(),
            letters[0].deliveries
        ),
        ("boom", "max_deliveries", 3)
    );
    let mut jobs = js.get_stream("JETINFER_JOBS").await.unwrap();
    assert_eq!(
        jobs.info().await.unwrap().state.messages,
        0,
        "the exhausted job left the jobs stream"
    );

    // Once the cause is fixed, replaying the dead letter answers the job.
    worker.shutdown().await;
    let worker = start_worker(config, Arc::new(EchoBackend::default())).await;
    // The replayed job's result goes to its original reply subject.
    let inbox = client.inbox().to_string();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut results = nats.subscribe(inbox).await.unwrap();
    nats.flush().await.unwrap();
    let job_id = dead_letter::replay(&js, letters[0].sequence).await.unwrap();
    assert_eq!(job_id, "boom");
    let message = tokio::time::timeout(PATIENCE, results.next())
        .await
        .unwrap()
        .unwrap();
    let result = decode_result(&message.payload).unwrap();
    assert_eq!(result.job_id, "boom");
    assert!(result.into_result().is_ok());
    assert!(dead_letter::list(&js, 10).await.unwrap().is_empty());
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_queue_full_and_every_accepted_job_is_answered() {
    let server = NatsServer::start();
    let mut config = worker_config(&server, BackendKind::Echo, BatchConfig::default());
    config.stream.max_messages = 50;
    // Provision the small stream, then stop consuming.
    start_worker(config.clone(), Arc::new(EchoBackend::default()))
        .await
        .shutdown()
        .await;

    let client = patient_client(&server).await;
    let submits: Vec<_> = (0..80)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .submit(Job::new("minilm", vec![format!("overload {i}")]))
                    .await
            })
        })
        .collect();
    // Give every publish time to be accepted or refused before consuming.
    let started = Instant::now();
    let mut jobs = jetstream::new(async_nats::connect(server.url()).await.unwrap())
        .get_stream("JETINFER_JOBS")
        .await
        .unwrap();
    while jobs.info().await.unwrap().state.messages < 50 {
        assert!(started.elapsed() < PATIENCE);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let worker = start_worker(config, Arc::new(EchoBackend::default())).await;
    let mut answered = 0;
    let mut refused = 0;
    for submit in submits {
        match submit.await.unwrap() {
            Ok(result) => {
                assert!(result.into_result().is_ok());
                answered += 1;
            }
            Err(SubmitError::QueueFull) => refused += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    eprintln!("overload: submitted=80 limit=50 answered={answered} queue_full={refused}");
    assert_eq!(answered + refused, 80);
    assert!(refused > 0, "the limit never refused a job");
    assert!(answered >= 50, "every accepted job is answered");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_exits_zero_and_hands_back_what_it_could_not_finish() {
    let server = NatsServer::start();
    // A long ack_wait: a job left unacked by the stopping worker would stall
    // the run far beyond the test's patience, so finishing shows none was.
    let env = [
        ("JETINFER_CONSUMER__ACK_WAIT", "600"),
        // About 10 s of compute for the whole run, against a 1 s drain.
        ("JETINFER_MODEL__ECHO_DELAY_PER_TOKEN_US", "2000"),
        ("JETINFER_BATCH__MAX_INPUTS", "32"),
        ("JETINFER_SHUTDOWN__DRAIN_TIMEOUT", "1"),
    ];
    let mut stopping = WorkerProcess::start(&server, "echo", &env);
    let client = patient_client(&server).await;
    wait_for_workers(&client).await;
    let n = 400;
    let done = Arc::new(AtomicUsize::new(0));
    let run = {
        let client = client.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move { submit_all(&client, n, "drain", done).await })
    };
    wait_until(&done, 10).await;
    let status = tokio::task::block_in_place(|| stopping.terminate());
    assert!(status.success(), "worker exited with {status}");
    let answered_by_first = done.load(Ordering::Relaxed);
    assert!(
        answered_by_first < n,
        "the drain timeout never cut the drain short"
    );

    let _taking_over = WorkerProcess::start(&server, "echo", &env);
    let outcomes = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("no job waited for ack_wait")
        .unwrap();
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let (ok, failed) = (outcomes.ok, &outcomes.failed);
    eprintln!(
        "drain: jobs={n} answered_before_sigterm_exit={answered_by_first} answered={ok} lost={} {}",
        n - ok - failed.len(),
        duplicates(&js, &client, &outcomes).await
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(ok, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_of_a_three_node_cluster_loses_nothing() {
    // The client's resumed results consumer, shown only if the test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("jetinfer_producer=debug,jetinfer_worker=info")
        .with_test_writer()
        .try_init();
    let mut cluster = jetinfer_nats::testing::NatsCluster::start(3);
    let nats = jetinfer_nats::NatsConfig {
        urls: cluster.urls(),
        startup_retry_for: Duration::from_secs(30),
        ..jetinfer_nats::NatsConfig::default()
    };
    let mut config = jetinfer_worker::config::WorkerConfig {
        nats: nats.clone(),
        ..Default::default()
    };
    config.model.backend = BackendKind::Echo;
    config.stream.replicas = 3;
    config.consumer.ack_wait = Duration::from_secs(3);
    // The cluster elects its JetStream meta leader shortly after start.
    let started = Instant::now();
    let worker = loop {
        match jetinfer_worker::Worker::start(
            config.clone(),
            Arc::new(EchoBackend::new(256, Duration::from_micros(50))),
        )
        .await
        {
            Ok(worker) => break worker,
            Err(err) => {
                assert!(
                    started.elapsed() < PATIENCE,
                    "cluster never accepted the stream: {err}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let client = Client::connect(ClientConfig {
        nats: nats.clone(),
        timeout: PATIENCE,
        ..ClientConfig::default()
    })
    .await
    .unwrap();
    let js = jetstream::new(jetinfer_nats::connect(&nats).await.unwrap());
    let mut stream = js.get_stream("JETINFER_JOBS").await.unwrap();
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("replicated stream has a leader");

    let n = jobs_from_env(2000) / 2;
    let done = Arc::new(AtomicUsize::new(0));
    let run = {
        let client = client.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move { submit_all(&client, n, "failover", done).await })
    };
    wait_until(&done, n / 4).await;
    cluster.kill(&leader);
    let outcomes = tokio::time::timeout(PATIENCE * 2, run)
        .await
        .unwrap()
        .unwrap();
    let (ok, failed) = (outcomes.ok, &outcomes.failed);
    eprintln!(
        "cluster failover: jobs={n} killed_leader={leader} answered={ok} lost={} {}",
        n - ok - failed.len(),
        duplicates(&js, &client, &outcomes).await
    );
    if !failed.is_empty() {
        // Seen about once in ten runs under a loaded machine: say where the
        // unanswered jobs are (still queued, delivered, or answered but not
        // received) for whoever looks next.
        panic!(
            "{} jobs unanswered, first {:?}\n{}",
            failed.len(),
            &failed[..failed.len().min(3)],
            queue_state(&js).await
        );
    }
    assert_eq!(ok, n);
    worker.shutdown().await;
}
