//! The queue end to end on a real nats-server with the echo backend: results
//! come back to the right job in the right order however jobs are batched,
//! the batching knobs hold, and bad jobs get typed error replies without
//! hurting the worker.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use jetinfer_nats::testing::NatsServer;
use jetinfer_producer::SubmitError;
use jetinfer_schemas::{
    decode_result, encode_job, ErrorCode, Job, JobOptions, JobResult, Truncation,
};
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::backend::l2_normalize;
use jetinfer_worker::config::{BackendKind, BatchConfig};

use common::*;

fn batch(max_inputs: usize, max_tokens: usize, max_wait_ms: u64) -> BatchConfig {
    BatchConfig {
        max_inputs,
        max_tokens,
        max_wait: Duration::from_millis(max_wait_ms),
    }
}

fn text(job: usize, input: usize) -> String {
    // Different lengths so batches sort and split them.
    format!(
        "job {job} input {input} {}",
        "word ".repeat((job * 7 + input * 3) % 23)
    )
}

fn expected(echo: &EchoBackend, text: &str) -> Vec<f32> {
    let mut v = echo.expected(text);
    l2_normalize(&mut v);
    v
}

/// A slow echo model, so jobs pile up and batches mix them.
fn slow_echo() -> Arc<EchoBackend> {
    Arc::new(EchoBackend::new(256, Duration::from_micros(20)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_gets_its_own_inputs_embeddings_in_order_when_batched_with_others() {
    let server = NatsServer::start();
    let echo = slow_echo();
    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, batch(16, 4096, 10)),
        echo.clone(),
    )
    .await;
    let client = client(&server).await;

    let jobs: Vec<Job> = (0..60)
        .map(|j| Job::new("minilm", (0..1 + j % 4).map(|i| text(j, i)).collect()))
        .collect();
    let inputs: Vec<Vec<String>> = jobs.iter().map(|j| j.inputs.clone()).collect();
    let results: Vec<_> = client.submit_many(jobs, 60).collect().await;

    let mut mixed = 0;
    for ((id, result), inputs) in results.into_iter().zip(&inputs) {
        let result = result.unwrap();
        assert_eq!(result.job_id, id);
        let e = result.into_result().unwrap();
        assert_eq!(e.embeddings.len(), inputs.len());
        for (got, text) in e.embeddings.iter().zip(inputs) {
            assert_eq!(got, &expected(&echo, text), "embedding of {text:?}");
        }
        assert_eq!(e.token_counts.len(), inputs.len());
        assert!(e.timings.batch_size as usize <= 16);
        mixed += usize::from(e.timings.batch_size as usize > inputs.len());
    }
    assert!(mixed > 0, "no job shared a batch with another job");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_never_exceed_max_inputs_or_padded_tokens() {
    let server = NatsServer::start();
    // Every input is 12 tokens ("x" x 10 plus [CLS] and [SEP]): a 40-token
    // budget allows 3 per batch, fewer than max_inputs.
    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, batch(5, 40, 20)),
        slow_echo(),
    )
    .await;
    let client = client(&server).await;
    let text = "x ".repeat(10);
    let jobs: Vec<Job> = (0..30)
        .map(|_| Job::new("minilm", vec![text.clone()]))
        .collect();
    let sizes: Vec<u32> = client
        .submit_many(jobs, 30)
        .map(|(_, r)| r.unwrap().into_result().unwrap().timings.batch_size)
        .collect()
        .await;
    assert!(
        sizes.iter().all(|&s| (1..=3).contains(&s)),
        "batch sizes {sizes:?}"
    );
    assert!(sizes.contains(&3), "the budget was never filled: {sizes:?}");
    worker.shutdown().await;

    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, batch(4, 100_000, 20)),
        slow_echo(),
    )
    .await;
    let jobs: Vec<Job> = (0..30)
        .map(|_| Job::new("minilm", vec![text.clone()]))
        .collect();
    let sizes: Vec<u32> = client
        .submit_many(jobs, 30)
        .map(|(_, r)| r.unwrap().into_result().unwrap().timings.batch_size)
        .collect()
        .await;
    assert!(
        sizes.iter().all(|&s| (1..=4).contains(&s)),
        "batch sizes {sizes:?}"
    );
    assert!(
        sizes.contains(&4),
        "max_inputs was never reached: {sizes:?}"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_job_is_answered_after_max_wait_without_a_full_batch() {
    let server = NatsServer::start();
    let wait = Duration::from_millis(300);
    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, batch(64, 100_000, 300)),
        slow_echo(),
    )
    .await;
    let client = client(&server).await;
    let result = client
        .submit(Job::new("minilm", vec!["alone".into()]))
        .await
        .unwrap();
    let e = result.into_result().unwrap();
    assert_eq!(e.timings.batch_size, 1);
    // Queue wait runs from JetStream's publish time to the batch start, so it
    // includes the batcher's wait for company.
    assert!(
        Duration::from_micros(e.timings.queue_wait_us) >= wait - Duration::from_millis(5),
        "queue wait {}us is shorter than max_wait",
        e.timings.queue_wait_us
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_get_typed_errors_are_settled_and_the_worker_keeps_serving() {
    let server = NatsServer::start();
    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, batch(8, 4096, 5)),
        slow_echo(),
    )
    .await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    let inbox = "results.default.rawtest";
    let mut replies = nats.subscribe(inbox).await.unwrap();

    let long = "word ".repeat(400);
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "garbage",
            b"\x00\xffthis is not msgpack".to_vec(),
            ErrorCode::InvalidInput,
        ),
        (
            "empty",
            encode_job(&Job::new("minilm", vec![]).with_id("empty")),
            ErrorCode::InvalidInput,
        ),
        (
            "wrong-model",
            encode_job(&Job::new("gpt-17", vec!["hi".into()]).with_id("wrong-model")),
            ErrorCode::UnknownModel,
        ),
        (
            "too-long",
            encode_job(
                &Job::new("minilm", vec!["short".into(), long.clone()])
                    .with_id("too-long")
                    .with_options(JobOptions {
                        normalize: true,
                        truncation: Truncation::Reject,
                        dimensions: None,
                    }),
            ),
            ErrorCode::InputTooLong,
        ),
        (
            "expired",
            encode_job(
                &Job::new("minilm", vec!["late".into()])
                    .with_id("expired")
                    .with_deadline_unix_ms(1),
            ),
            ErrorCode::DeadlineExceeded,
        ),
    ];
    for (id, payload, _) in &cases {
        publish_raw(&js, "jobs.minilm.default", Some(inbox), id, payload.clone()).await;
    }
    // Garbage with nowhere to reply is terminated, not retried for ever.
    publish_raw(
        &js,
        "jobs.minilm.default",
        None,
        "orphan",
        b"\x01\x02".to_vec(),
    )
    .await;

    let mut codes = std::collections::HashMap::new();
    for _ in 0..cases.len() {
        let message = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("an error reply arrives")
            .unwrap();
        let result: JobResult = decode_result(&message.payload).unwrap();
        codes.insert(
            result.job_id.clone(),
            result.into_result().unwrap_err().code,
        );
    }
    for (id, _, code) in &cases {
        assert_eq!(codes.get(*id), Some(code), "error code for {id}");
    }

    // Still serving.
    let client = client(&server).await;
    let ok = client
        .submit(Job::new("minilm", vec!["still here".into()]))
        .await
        .unwrap();
    assert!(ok.into_result().is_ok());

    // Nothing left pending or awaiting an ack: every bad job was settled.
    let mut stream = js.get_stream("JETINFER_JOBS").await.unwrap();
    assert_eq!(settled_state(&mut stream, "worker-minilm").await, (0, 0));
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "work queue is empty"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_model_no_worker_serves() {
    let server = NatsServer::start();
    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, BatchConfig::default()),
        slow_echo(),
    )
    .await;
    let client = client(&server).await;
    let err = client
        .submit(Job::new("nosuchmodel", vec!["x".into()]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::UnknownModel(ref m) if m == "nosuchmodel"),
        "{err}"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmitted_job_id_is_answered_once() {
    let server = NatsServer::start();
    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, BatchConfig::default()),
        slow_echo(),
    )
    .await;
    let client = client(&server).await;
    let job = Job::new("minilm", vec!["same".into()]).with_id("dup-1");
    let first = client.submit(job.clone()).await.unwrap();
    assert!(first.into_result().is_ok());
    // JetStream de-duplicates the second publish on Nats-Msg-Id, so no worker
    // runs it again and the second wait times out rather than getting a copy.
    let quick = jetinfer_producer::Client::connect(jetinfer_producer::ClientConfig {
        nats: nats_config(&server),
        timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = quick.submit(job).await.unwrap_err();
    assert!(matches!(err, SubmitError::Timeout { .. }), "{err}");
    worker.shutdown().await;
}

/// A worker told to stop after its server died still stops: nothing it says
/// to NATS on the way out (leaving the Services API, the final flush) waits
/// for a server that is gone. (`scripts/demo.sh` used to hang here when it
/// stopped both at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_server_is_gone_still_stops() {
    let server = NatsServer::start();
    let worker = start_worker(
        worker_config(&server, BackendKind::Echo, batch(8, 4096, 5)),
        slow_echo(),
    )
    .await;
    drop(server);
    tokio::time::timeout(Duration::from_secs(120), worker.shutdown())
        .await
        .expect("the worker stopped although its server is gone");
}

/// How many messages `stream` holds on `subject`.
async fn held_on(js: &jetstream::Context, stream: &str, subject: &str) -> usize {
    let stream = js.get_stream(stream).await.unwrap();
    let mut subjects = stream.info_with_subjects(subject).await.unwrap();
    let mut count = 0;
    while let Some(entry) = subjects.next().await {
        count += entry.unwrap().1;
    }
    count
}

/// A result that no stream stores (tenant `lost` has no results stream
/// yet) leaves its job unacked: it stays in the jobs stream and comes back,
/// while the jobs settled beside it, whose results were stored, are acked
/// and gone. Once a stream takes `lost`'s results the job is answered:
/// nothing was lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_result_is_not_stored_stays_unacked_while_those_beside_it_are_acked() {
    use jetinfer_nats::Tenant;
    const KEPT: usize = 8;
    let server = NatsServer::start();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    // As in a tenant's own account: the results stream is the producers',
    // and here it takes only tenant `kept`'s results.
    js.create_stream(jetstream::stream::Config {
        name: "JETINFER_RESULTS".into(),
        subjects: vec!["results.kept.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut config = worker_config(&server, BackendKind::Echo, batch(64, 1 << 16, 0));
    config.stream.tenant_accounts = true;
    config.consumer.max_deliver = 0;
    config.retry.min_delay = Duration::from_millis(200);
    config.retry.max_delay = Duration::from_millis(200);
    // Started once to make the jobs stream and consumer, then stopped, so
    // every job waits in the stream and the next worker pulls them together.
    start_worker(config.clone(), slow_echo())
        .await
        .shutdown()
        .await;
    let (kept, lost) = (Tenant::new("kept").unwrap(), Tenant::new("lost").unwrap());
    for i in 0..KEPT {
        let job = Job::new("minilm", vec![format!("kept {i}")]);
        jetinfer_nats::publish_job(&js, &kept, &job, "results.kept.inbox")
            .await
            .unwrap();
        if i == KEPT / 2 {
            let job = Job::new("minilm", vec!["lost".into()]);
            jetinfer_nats::publish_job(&js, &lost, &job, "results.lost.inbox")
                .await
                .unwrap();
        }
    }
    let worker = start_worker(config, slow_echo()).await;

    let consumer_info = || async {
        let stream = js.get_stream("JETINFER_JOBS").await.unwrap();
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("worker-minilm").await.unwrap();
        consumer.info().await.unwrap().clone()
    };
    // Bounded: 600 looks, 50 ms apart.
    let mut came_back = false;
    for _ in 0..600 {
        let info = consumer_info().await;
        let stored = held_on(&js, "JETINFER_RESULTS", "results.kept.>").await;
        if stored == KEPT && info.num_redelivered >= 1 {
            came_back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        came_back,
        "every kept result stored and the lost job redelivered"
    );
    assert_eq!(
        held_on(&js, "JETINFER_JOBS", "jobs.minilm.kept").await,
        0,
        "the jobs whose results were stored are acked and gone"
    );
    assert_eq!(
        held_on(&js, "JETINFER_JOBS", "jobs.minilm.lost").await,
        1,
        "the job whose result was not stored is still in the jobs stream"
    );
    assert_eq!(
        held_on(&js, "JETINFER_RESULTS", "results.kept.>").await,
        KEPT,
        "each kept job answered once"
    );

    // A stream now takes `lost`'s results: its next delivery is answered.
    js.update_stream(jetstream::stream::Config {
        name: "JETINFER_RESULTS".into(),
        subjects: vec!["results.kept.>".into(), "results.lost.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut answered = false;
    for _ in 0..600 {
        if held_on(&js, "JETINFER_RESULTS", "results.lost.>").await == 1
            && held_on(&js, "JETINFER_JOBS", "jobs.minilm.lost").await == 0
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        answered,
        "the lost job answered once a stream takes its result, and acked"
    );
    worker.shutdown().await;
}
