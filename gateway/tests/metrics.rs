//! The gateway's `/metrics`, alone in its test binary: the recorder is
//! process-wide, so no other test's requests are counted here.

mod harness;

use harness::*;
use jetinfer_worker::config::BackendKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_status_and_served_model_only() {
    let stack = Stack::start(BackendKind::Echo, |_| {}).await;
    let one = r#"{"model":"minilm","input":"a"}"#;
    assert_eq!(
        post_embeddings(&stack, Some(ACME_KEY), one).await.status,
        200
    );
    post_embeddings(
        &stack,
        Some(ACME_KEY),
        r#"{"model":"made-up-1","input":"a"}"#,
    )
    .await
    .openai_error(404);
    post_embeddings(&stack, None, one).await.openai_error(401);
    let metrics = get(&stack, None, "/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.body;
    let line = |want: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("jetinfer_gateway_requests_total{")
                    && want.split(',').all(|w| l.contains(w))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
    };
    assert_eq!(
        line(r#"route="/v1/embeddings",status="200",model="minilm""#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        line(r#"route="/v1/embeddings",status="401",model="""#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        line(r#"status="404",model="""#),
        Some(1.0),
        "an unknown model is no label: {text}"
    );
    assert!(!text.contains("made-up-1"), "{text}");
    assert!(
        text.contains(r#"jetinfer_gateway_request_duration_seconds_bucket{route="/v1/embeddings""#),
        "{text}"
    );
    assert!(
        text.contains("jetinfer_gateway_in_flight_requests"),
        "{text}"
    );
    stack.stop().await;
}
