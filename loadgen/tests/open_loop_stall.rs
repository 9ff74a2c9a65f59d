//! The open-loop scheduler against a deliberately stalled target: a fake
//! responder on a real nats-server that sits on its first job for 2 s while
//! the scheduler may keep only one job in flight. Jobs whose slots fell inside
//! the stall must report latency from their intended start (coordinated
//! omission corrected), not from when they finally went out.

use crate::common;

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use jetinfer_loadgen::corpus::JobSource;
use jetinfer_loadgen::scenario::{Mode, Scenario};
use jetinfer_nats::testing::NatsServer;
use jetinfer_nats::{ConsumerSettings, StreamSettings};
use jetinfer_producer::{Client, ClientConfig};
use jetinfer_schemas::{
    decode_job, encode_result, headers, Embeddings, JobResult, Limits, ModelInfo, Timings,
};

const STALL: Duration = Duration::from_secs(2);

/// Answers jobs one at a time, after sleeping `STALL` on the first.
async fn stalling_responder(server: &NatsServer) -> tokio::task::JoinHandle<()> {
    let client = jetinfer_nats::connect(&common::nats_config(server))
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let stream = jetinfer_nats::provision_stream(&js, &StreamSettings::default(), "minilm")
        .await
        .unwrap();
    let consumer =
        jetinfer_nats::provision_consumer(&stream, "minilm", &ConsumerSettings::default())
            .await
            .unwrap();
    tokio::spawn(async move {
        let mut messages = consumer.messages().await.unwrap();
        let mut first = true;
        while let Some(Ok(message)) = messages.next().await {
            if std::mem::take(&mut first) {
                tokio::time::sleep(STALL).await;
            }
            let job = decode_job(&message.payload, &Limits::default()).unwrap();
            let reply_to = message
                .headers
                .as_ref()
                .unwrap()
                .get(headers::REPLY_TO)
                .unwrap()
                .to_string();
            let result = JobResult::ok(
                job.id,
                Embeddings {
                    model: ModelInfo {
                        id: "stall".into(),
                        revision: "0".into(),
                        dimension: 1,
                    },
                    embeddings: vec![vec![1.0]],
                    token_counts: vec![3],
                    truncated: vec![false],
                    timings: Timings::default(),
                },
            );
            client
                .publish(reply_to, encode_result(&result).into())
                .await
                .unwrap();
            client.flush().await.unwrap();
            message.ack().await.unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_latency_counts_from_the_intended_start_through_a_stall() {
    let server = NatsServer::start();
    let responder = stalling_responder(&server).await;
    let client = Client::connect(ClientConfig {
        nats: common::nats_config(&server),
        timeout: Duration::from_secs(20),
        ..ClientConfig::default()
    })
    .await
    .unwrap();
    // 10 jobs/s for 1.5 s: slots at 0, 100, ..., 1400 ms; one job in flight.
    let scenario = Scenario {
        name: "stall".into(),
        mode: Mode::Open,
        rate: 10.0,
        duration: Duration::from_millis(1500),
        max_in_flight: 1,
        timeout: Duration::from_secs(20),
        mix: common::singles(),
        ..Scenario::default()
    };
    let jobs = JobSource::new(vec!["a text".into()], &scenario.mix, "minilm", 1);

    let s =
        jetinfer_loadgen::run::run(client, &scenario, jobs, Duration::from_secs(1), false).await;
    responder.abort();

    // The schedule did not thin out during the stall: every slot was sent.
    assert_eq!(s.jobs_sent, 15);
    assert_eq!(s.jobs_ok, 15, "{:?}", s.errors_by_kind);
    // The first job waited the whole stall...
    assert!(s.latency.max_ms >= 2000.0, "max {}", s.latency.max_ms);
    // ...and so did every job queued behind it, counted from its slot: the
    // median slot (700 ms) went out after 2 s, so >= 1.3 s of latency.
    assert!(s.latency.p50_ms >= 1300.0, "p50 {}", s.latency.p50_ms);
    // Timed from the moment they were actually sent, the same jobs look fast:
    // the number coordinated omission would have reported.
    assert!(
        s.service_time.p50_ms < 1000.0,
        "service p50 {}",
        s.service_time.p50_ms
    );
}
