//! A graceful stop, alone in its test binary (it watches the process-wide
//! in-flight gauge): a request in flight when the gateway stops is answered.

mod harness;

use std::time::Duration;

use harness::*;
use jetinfer_worker::config::BackendKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_request_in_flight_finish() {
    let stack = Stack::start_with(
        BackendKind::Echo,
        |w| w.model.echo_delay_per_token_us = 300_000,
        |_| {},
    )
    .await;
    let url = stack.url("/v1/embeddings");
    let auth = format!("Authorization: Bearer {ACME_KEY}");
    let request = tokio::spawn(async move {
        curl(&[
            "-X",
            "POST",
            url.as_str(),
            "-H",
            auth.as_str(),
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            r#"{"model":"minilm","input":"one two three four"}"#,
        ])
        .await
    });
    let mut in_flight = false;
    for _ in 0..100 {
        let text = jetinfer_monitoring::render(&stack.gateway.state.metrics);
        if text
            .lines()
            .any(|l| l.starts_with("jetinfer_gateway_in_flight_requests ") && !l.ends_with(" 0"))
        {
            in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(in_flight, "the request never started");
    let addr = stack.gateway.local_addr;
    stack.gateway.shutdown().await;
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
    stack.worker.shutdown().await;
}
