//! Dead letters that always land, on real nats-server processes.
//!
//! F6 (issue 15, "a dead letter that cannot be stored sticks for ever"): a
//! job just under the server's `max_payload` used to make a dead letter
//! (payload, headers and reason) larger than `max_payload`, which JetStream
//! never stored, so the job was NAKed for ever or left undeliverable. These
//! run under the shipped secure configuration, the job published by a tenant.
//!
//! Issue 16, "jobs past max_deliver can stay in the stream": burying a job
//! that had all its deliveries hung on a MAX_DELIVERIES advisory, a core NATS
//! message nobody hears when no worker listens. These run on a plain server.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use async_nats::HeaderMap;
use futures::StreamExt;
use jetinfer_nats::dead_letter::{self, DeadLetterError};
use jetinfer_nats::subjects::ReplyPolicy;
use jetinfer_nats::testing::NatsServer;
use jetinfer_nats::{provision, ConsumerSettings, StreamSettings};
use jetinfer_schemas::{decode_result, encode_job, headers, ErrorCode, Job};
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::config::{BackendKind, BatchConfig, ReplyConfig, WorkerConfig};
use jetinfer_worker::exhausted::Sweep;
use jetinfer_worker::job::Ledger;
use jetinfer_worker::settle::Settler;
use sha2::Digest;

use common::secured::Secured;
use common::*;

/// Longest a test waits for something that should happen in well under a
/// second.
const PATIENCE: Duration = Duration::from_secs(30);

/// The headers `publish` sends with a job, as they count against
/// `max_payload`.
fn job_headers(id: &str, reply_to: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, id);
    h.insert(headers::REPLY_TO, reply_to);
    h
}

fn wire_len(h: &HeaderMap) -> usize {
    let lines: usize = h
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + "\r\n".len()
}

/// A job of `inputs` texts (the first starting with `first_word`) whose
/// encoding is exactly `size` bytes.
fn job_of_size(id: &str, inputs: usize, first_word: &str, size: usize) -> Vec<u8> {
    let per = size / inputs;
    let mut texts: Vec<String> = (0..inputs).map(|_| "lorem ".repeat(per / 6)).collect();
    texts[0] = format!("{first_word} {}", texts[0]);
    for _ in 0..8 {
        let encoded = encode_job(&Job::new("minilm", texts.clone()).with_id(id));
        let short = size as i64 - encoded.len() as i64;
        if short == 0 {
            return encoded;
        }
        let last = texts.last_mut().unwrap();
        let len = (last.len() as i64 + short).max(0) as usize;
        last.truncate(len.min(last.len()));
        while last.len() < len {
            last.push('x');
        }
    }
    panic!("no job of exactly {size} bytes");
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How many messages `stream` holds on `subject`.
async fn stored_on(js: &jetstream::Context, stream: &str, subject: &str) -> usize {
    let stream = js.get_stream(stream).await.unwrap();
    let mut subjects = stream.info_with_subjects(subject).await.unwrap();
    let mut count = 0;
    while let Some(entry) = subjects.next().await {
        count += entry.unwrap().1;
    }
    count
}

async fn jobs_stored(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream("JETINFER_JOBS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// The dead letters of job `id`, once there is one and the job has left the
/// jobs stream (or as they are after [`PATIENCE`]).
async fn buried(js: &jetstream::Context, id: &str) -> (Vec<dead_letter::Stored>, u64) {
    let started = Instant::now();
    loop {
        let letters: Vec<_> = dead_letter::list(js, 1000)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.job_id == id)
            .collect();
        let left = jobs_stored(js).await;
        if (!letters.is_empty() && left == 0) || started.elapsed() > PATIENCE {
            return (letters, left);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One way a job near `max_payload` reaches the dead letters.
struct Path {
    name: &'static str,
    /// The reply subject it asks for (a forbidden one gets no reply at all).
    reply_to: &'static str,
    /// Replies stored there in the end.
    replies: usize,
    reason: &'static str,
    configure: fn(&mut WorkerConfig, max_payload: usize),
    payload: fn(id: &str, size: usize) -> Vec<u8>,
}

/// F6 (issue 15): a job just under the server's `max_payload` whose dead
/// letter would not fit, on each path that buries one: an invalid job, a
/// forbidden reply subject, `payload_too_large`, and a job that fails on every
/// one of its `max_deliver` deliveries. Each ends as exactly one dead letter
/// that says it keeps only the payload's first bytes, with the original's size
/// and SHA-256 and the job's stream sequence; the job leaves the jobs stream;
/// an allowed reply subject gets exactly one error reply and a forbidden one
/// none; and `replay` refuses the letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f6_a_job_near_max_payload_ends_as_a_truncated_dead_letter() {
    let secured = Secured::start();
    let acme = secured.connect("acme").await;
    let ops = secured.connect("ops").await;
    let max_payload = acme.client.server_info().max_payload;
    let paths = [
        Path {
            name: "invalid job",
            reply_to: "results.acme.f6",
            replies: 1,
            reason: "too_many_inputs",
            // The worker decodes a job this large, and finds too many inputs.
            configure: |c, max| c.limits.max_job_bytes = max,
            payload: |id, size| job_of_size(id, 300, "lorem", size),
        },
        Path {
            name: "forbidden reply subject",
            reply_to: "results.globex.f6",
            replies: 0,
            reason: "forbidden_reply_subject",
            configure: |_, _| {},
            payload: |id, size| job_of_size(id, 100, "lorem", size),
        },
        Path {
            name: "payload_too_large",
            reply_to: "results.acme.f6",
            replies: 1,
            reason: "payload_too_large",
            configure: |_, _| {},
            payload: |_, size| vec![0xc1; size],
        },
        Path {
            name: "max_deliver",
            reply_to: "results.acme.f6",
            replies: 1,
            reason: "max_deliveries",
            configure: |c, max| {
                c.limits.max_job_bytes = max;
                c.consumer.max_deliver = 2;
            },
            payload: |id, size| job_of_size(id, 100, "kaboom", size),
        },
    ];
    for (n, path) in paths.iter().enumerate() {
        let mut config = secured.worker_config(BackendKind::Echo, BatchConfig::default());
        config.retry.min_delay = Duration::from_millis(50);
        config.retry.max_delay = Duration::from_millis(200);
        (path.configure)(&mut config, max_payload);
        let worker = start_worker(
            config,
            Arc::new(EchoBackend::default().with_poison("kaboom")),
        )
        .await;
        if n == 0 {
            secured.provision_tenant("acme").await;
        }
        let results_before = stored_on(&acme.js, "JETINFER_RESULTS", path.reply_to).await;

        let id = format!("f6-{n}");
        let h = job_headers(&id, path.reply_to);
        let payload = (path.payload)(&id, max_payload - wire_len(&h) - 16);
        let ack = acme
            .js
            .publish_with_headers("jobs.minilm.acme", h, payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap_or_else(|e| panic!("{}: the job is stored: {e}", path.name));

        let (letters, left) = buried(&ops.js, &id).await;
        let name = path.name;
        assert_eq!(letters.len(), 1, "{name}: exactly one dead letter");
        assert_eq!(left, 0, "{name}: the job left the jobs stream");
        let letter = &letters[0];
        assert_eq!(letter.reason, path.reason, "{name}");
        assert!(
            letter.payload_truncated,
            "{name}: the letter says it was truncated"
        );
        assert_eq!(
            letter.original_size,
            Some(payload.len() as u64),
            "{name}: original size"
        );
        assert_eq!(
            letter.original_sha256.as_deref(),
            Some(sha256_hex(&payload).as_str()),
            "{name}: original digest"
        );
        assert_eq!(letter.stream_sequence, Some(ack.sequence), "{name}");
        assert!(
            payload.starts_with(&letter.payload) && letter.payload.len() < payload.len(),
            "{name}: the letter keeps the payload's first bytes"
        );
        assert_eq!(
            stored_on(&acme.js, "JETINFER_RESULTS", path.reply_to).await - results_before,
            path.replies,
            "{name}: error replies stored"
        );
        let refused = dead_letter::replay(&ops.js, letter.sequence)
            .await
            .expect_err("a truncated letter is not replayed");
        assert!(
            matches!(refused, DeadLetterError::Truncated { .. }),
            "{name}: {refused}"
        );
        assert!(
            refused.to_string().contains("cannot be replayed"),
            "{name}: {refused}"
        );
        worker.shutdown().await;
    }
    assert!(
        ops.errors.lock().unwrap().is_empty(),
        "{:?}",
        ops.errors.lock().unwrap()
    );
    // The worker needed nothing the shipped permissions refuse.
    assert_eq!(secured.violations(), Vec::<String>::new());
}

/// The streams a worker provisions, and the minilm consumer as `settings`
/// make it, or, with `legacy_max_deliver`, as a worker that let JetStream
/// count deliveries made it.
async fn provision_queue(
    js: &jetstream::Context,
    settings: &ConsumerSettings,
    legacy_max_deliver: Option<i64>,
) -> PullConsumer {
    let stream = jetinfer_nats::provision_stream(js, &StreamSettings::default(), "minilm")
        .await
        .unwrap();
    jetinfer_nats::results::provision(js, Duration::from_secs(3600), 1)
        .await
        .unwrap();
    dead_letter::provision(js, 1).await.unwrap();
    let mut config = provision::consumer_config("minilm", settings).unwrap();
    if let Some(max_deliver) = legacy_max_deliver {
        config.max_deliver = max_deliver;
    }
    stream.create_consumer(config).await.unwrap()
}

/// Pulls one job as a worker would, with up to `wait` for it to come.
async fn pull(consumer: &PullConsumer, wait: Duration) -> Option<jetstream::Message> {
    let mut batch = consumer
        .batch()
        .max_messages(1)
        .expires(wait)
        .messages()
        .await
        .unwrap();
    batch.next().await.map(|m| m.unwrap())
}

fn max_deliver_config(server: &NatsServer) -> WorkerConfig {
    let mut config = worker_config(server, BackendKind::Echo, BatchConfig::default());
    config.consumer.max_deliver = 2;
    config.consumer.ack_wait = Duration::from_secs(2);
    config.retry.min_delay = Duration::from_millis(50);
    config.retry.max_delay = Duration::from_millis(200);
    config
}

/// The error reply on `inbox`, read from the results stream.
async fn error_reply(js: &jetstream::Context, inbox: &str) -> jetinfer_schemas::JobError {
    let results = js.get_stream("JETINFER_RESULTS").await.unwrap();
    let message = results
        .get_last_raw_message_by_subject(inbox)
        .await
        .expect("an error reply is stored");
    decode_result(&message.payload)
        .unwrap()
        .into_result()
        .unwrap_err()
}

/// Issue 16, "jobs past max_deliver can stay in the stream": a job delivered
/// `max_deliver` times by a consumer that let JetStream count (as older
/// workers made it), whose workers all died, so that JetStream stopped
/// delivering it and fired its MAX_DELIVERIES advisory while no worker
/// listened. A worker started afterwards buries it: one dead letter
/// (`max_deliveries`), an `internal` error reply, and the jobs stream empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_max_deliver_while_no_worker_listened_is_buried_when_one_starts() {
    let server = NatsServer::start();
    let config = max_deliver_config(&server);
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats);
    let consumer = provision_queue(&js, &config.consumer, Some(2)).await;
    let inbox = "results.default.past-max-deliver";
    let job = encode_job(&Job::new("minilm", vec!["fine".into()]).with_id("stuck"));
    publish_raw(&js, "jobs.minilm.default", Some(inbox), "stuck", job).await;

    // Two workers took it and died without answering.
    for delivery in 1..=2 {
        let message = pull(&consumer, Duration::from_secs(5))
            .await
            .expect("the job is delivered");
        assert_eq!(message.info().unwrap().delivered, delivery);
        message.ack_with(AckKind::Nak(None)).await.unwrap();
    }
    // The next pull finds it past max_deliver: JetStream fires the advisory,
    // to nobody, and delivers it no more.
    assert!(pull(&consumer, Duration::from_secs(1)).await.is_none());
    assert_eq!(jobs_stored(&js).await, 1, "the job is stuck in the stream");

    let worker = start_worker(config, Arc::new(EchoBackend::default())).await;
    let (letters, left) = buried(&js, "stuck").await;
    assert_eq!(letters.len(), 1, "one dead letter");
    assert_eq!(left, 0, "the job left the jobs stream");
    assert_eq!(letters[0].reason, "max_deliveries");
    assert_eq!(letters[0].deliveries, 2);
    assert!(
        letters[0].truncation().is_none(),
        "a small job is kept whole"
    );
    let error = error_reply(&js, inbox).await;
    assert_eq!(error.code, ErrorCode::Internal);
    assert!(error.message.contains("2 deliveries"), "{}", error.message);
    worker.shutdown().await;
}

/// Issue 16, the same bullet, with the consumer workers make now: a job whose
/// worker died on each of its `max_deliver` deliveries, while no worker was
/// running, is buried unrun by the next worker to start, with an `internal`
/// error reply and one dead letter; nothing depends on an advisory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_workers_died_on_every_delivery_is_buried_unrun_by_the_next_worker() {
    let server = NatsServer::start();
    let config = max_deliver_config(&server);
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats);
    let consumer = provision_queue(&js, &config.consumer, None).await;
    let inbox = "results.default.died";
    let job = encode_job(&Job::new("minilm", vec!["fine".into()]).with_id("died"));
    publish_raw(&js, "jobs.minilm.default", Some(inbox), "died", job).await;
    for delivery in 1..=2 {
        let message = pull(&consumer, Duration::from_secs(5))
            .await
            .expect("the job is delivered");
        assert_eq!(message.info().unwrap().delivered, delivery);
        // Never acked: the worker died; it returns after ack_wait.
    }

    let worker = start_worker(config, Arc::new(EchoBackend::default())).await;
    let (letters, left) = buried(&js, "died").await;
    assert_eq!(letters.len(), 1, "one dead letter");
    assert_eq!(left, 0, "the job left the jobs stream");
    assert_eq!(letters[0].reason, "max_deliveries");
    assert_eq!(letters[0].deliveries, 2);
    // Buried, not run: a run would have answered it with embeddings.
    let error = error_reply(&js, inbox).await;
    assert_eq!(error.code, ErrorCode::Internal);
    worker.shutdown().await;
}

/// Issue 16, the same bullet, the sweep's own rule: it buries a job JetStream
/// stopped delivering, and never one in flight at a worker or one not yet
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_buries_only_jobs_jetstream_stopped_delivering() {
    let server = NatsServer::start();
    let mut config = max_deliver_config(&server);
    config.consumer.ack_wait = Duration::from_secs(30);
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    let consumer = provision_queue(&js, &config.consumer, Some(2)).await;
    let settler = Settler::new(
        nats,
        "minilm".into(),
        jetinfer_schemas::Task::Embed,
        Arc::new(Ledger::new("minilm")),
        config.retry,
    )
    .with_limits(2, config.limits.max_job_bytes);
    let mut sweep = Sweep {
        settler,
        consumer: consumer.clone(),
        stream: js.get_stream("JETINFER_JOBS").await.unwrap(),
        model: "minilm".into(),
        reply: ReplyPolicy::new(&ReplyConfig::default().allow).unwrap(),
        max_deliver: 2,
    };
    let job = |id: &str| encode_job(&Job::new("minilm", vec!["fine".into()]).with_id(id));
    publish_raw(
        &js,
        "jobs.minilm.default",
        None,
        "exhausted",
        job("exhausted"),
    )
    .await;

    let first = pull(&consumer, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        sweep.once().await.unwrap(),
        0,
        "a job in flight is not swept"
    );
    first.ack_with(AckKind::Nak(None)).await.unwrap();
    let second = pull(&consumer, Duration::from_secs(5)).await.unwrap();
    assert_eq!(second.info().unwrap().delivered, 2);
    second.ack_with(AckKind::Nak(None)).await.unwrap();
    assert!(pull(&consumer, Duration::from_secs(1)).await.is_none());
    publish_raw(&js, "jobs.minilm.default", None, "waiting", job("waiting")).await;

    assert_eq!(sweep.once().await.unwrap(), 1, "the exhausted job is swept");
    let (letters, _) = buried(&js, "exhausted").await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "max_deliveries");
    assert_eq!(
        jobs_stored(&js).await,
        1,
        "the job not yet delivered stays in the stream"
    );
    assert_eq!(sweep.once().await.unwrap(), 0, "nothing left to sweep");
}

/// Issue 16, "a dead letter that cannot be stored leaves the job
/// undeliverable with an error line and no metric": with the dead-letter
/// stream gone, a job to bury stays in the jobs stream and is counted in
/// `jetinfer_jobs_not_buried_total` (which the JetinferJobsNotBuried alert
/// watches); once the stream is back, the job is buried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_stored_is_counted_and_the_job_buried_once_it_can_be() {
    let server = NatsServer::start();
    let mut config = max_deliver_config(&server);
    config.consumer.max_deliver = 1_000;
    let worker = start_worker(config, Arc::new(EchoBackend::default())).await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats);
    js.delete_stream("JETINFER_DLQ").await.unwrap();
    let not_buried = || {
        let text = jetinfer_monitoring::render(&jetinfer_monitoring::install().unwrap());
        text.lines()
            .filter(|l| {
                l.starts_with(jetinfer_monitoring::names::JOBS_NOT_BURIED)
                    && l.contains("reason=\"invalid_input\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = not_buried();
    publish_raw(
        &js,
        "jobs.minilm.default",
        Some("results.default.nodlq"),
        "no-dlq",
        b"\xc1 not a job".to_vec(),
    )
    .await;
    let started = Instant::now();
    while not_buried() < before + 2.0 {
        assert!(started.elapsed() < PATIENCE, "no failed burial counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(jobs_stored(&js).await, 1, "the job stays in the stream");

    dead_letter::provision(&js, 1).await.unwrap();
    let (letters, left) = buried(&js, "no-dlq").await;
    assert_eq!(letters.len(), 1, "buried once the stream is back");
    assert_eq!(left, 0);
    assert_eq!(letters[0].reason, "invalid_input");
    worker.shutdown().await;
}
