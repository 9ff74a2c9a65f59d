//! The gateway's own NATS user (`HTTP_GATEWAY` in the shipped
//! `accounts.conf`) reads the jobs stream's info, which is how
//! `GET /v1/models` learns the served models, and may do nothing else: no
//! job, no other stream, no consumer, no results.

use crate::harness;

use harness::Secured;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_user_reads_the_jobs_streams_info_and_nothing_else() {
    let secured = Secured::start();
    // The workers' account has its jobs stream once a worker made it; the
    // worker role makes it here the way a worker does.
    let worker = secured.connect("worker").await;
    jetinfer_nats::provision_stream(
        &worker.js,
        &jetinfer_nats::StreamSettings::default(),
        "minilm",
    )
    .await
    .expect("the worker makes the jobs stream");

    let gateway = secured.connect("gateway").await;
    let stream = gateway
        .js
        .get_stream("JETINFER_JOBS")
        .await
        .expect("the catalogue user reads the jobs stream's info");
    assert!(stream
        .cached_info()
        .config
        .subjects
        .contains(&"jobs.minilm.*".to_string()));

    gateway
        .client
        .publish("jobs.minilm.acme", "x".into())
        .await
        .unwrap();
    gateway.violation("jobs.minilm.acme").await;
    assert!(gateway.js.get_stream("JETINFER_DLQ").await.is_err());
    gateway.violation("$JS.API.STREAM.INFO.JETINFER_DLQ").await;
    gateway
        .client
        .publish(
            "$JS.API.CONSUMER.INFO.JETINFER_JOBS.worker-minilm",
            "".into(),
        )
        .await
        .unwrap();
    gateway
        .violation("$JS.API.CONSUMER.INFO.JETINFER_JOBS.worker-minilm")
        .await;
    assert!(gateway.client.subscribe("results.>").await.is_ok());
    gateway.violation("results.>").await;
}
