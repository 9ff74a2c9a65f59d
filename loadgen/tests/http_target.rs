//! The HTTP target against a real stack: nats-server under the shipped
//! accounts, an echo worker and a `jetinfer-gateway`, started by the
//! gateway's own test harness (shared, not copied). Each job is one OpenAI
//! embeddings request; the report counts what the responses say.

#[path = "../../gateway/tests/harness/mod.rs"]
mod harness;

use std::time::Duration;

use harness::{Stack, ACME_KEY, ACME_LIMITED_KEY};
use jetinfer_loadgen::http::{EncodingFormat, HttpTarget};
use jetinfer_loadgen::scenario::{Mode, Scenario};
use jetinfer_loadgen::{execute, Plan, Target, Via};
use jetinfer_worker::config::BackendKind;

use crate::common;

fn plan(stack: &Stack, key: &str, scenario: Scenario) -> Plan {
    let key_file = stack.dir.path().join(format!("key-{}", ulid::Ulid::new()));
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let http =
        HttpTarget::with_key_file(&stack.url(""), &key_file, EncodingFormat::Base64).unwrap();
    Plan {
        scenario,
        target: Target {
            via: Via::Http(http),
            model: "minilm".into(),
            tenant: "unused-over-http".into(),
        },
        corpus: common::corpus(),
        thresholds: vec![],
        metrics_url: None,
        metrics_token: None,
        out_dir: None,
        window: Duration::from_millis(500),
        seed: 7,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_run_through_the_gateway_answers_every_job_with_its_inputs_and_usage_tokens() {
    let stack = Stack::start(BackendKind::Echo, |_| {}).await;
    // The standard mix: single texts and arrays of up to 64 per request.
    let scenario = common::short_closed();

    let (report, _) = execute(&plan(&stack, ACME_KEY, scenario))
        .await
        .expect("run completes");
    stack.stop().await;

    let s = &report.summary;
    assert!(
        s.jobs_sent > 0 && s.jobs_sent <= 60,
        "bounded: {}",
        s.jobs_sent
    );
    assert_eq!(s.jobs_ok, s.jobs_sent, "errors: {:?}", s.errors_by_kind);
    assert!(s.inputs > s.jobs_ok, "multi-text jobs went as input arrays");
    assert!(s.tokens > s.inputs, "usage.prompt_tokens is counted");
    assert!(s.latency.count == s.jobs_ok && s.latency.p50_ms > 0.0);
    assert!(
        report.target.starts_with("http://127.0.0.1:"),
        "{}",
        report.target
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_counted_by_http_status_and_openai_code() {
    let stack = Stack::start(BackendKind::Echo, |_| {}).await;
    // One input per second for this key: the probe passes, most jobs after
    // it are refused 429 by the gateway's rate limit.
    let scenario = Scenario {
        name: "test-limited".into(),
        mode: Mode::Closed,
        users: 2,
        think_time: Duration::from_millis(20),
        duration: Duration::from_secs(2),
        max_jobs: 20,
        timeout: Duration::from_secs(20),
        mix: common::singles(),
        ..Scenario::default()
    };

    let (report, _) = execute(&plan(&stack, ACME_LIMITED_KEY, scenario))
        .await
        .expect("run completes");
    let refused = execute(&plan(&stack, "sk-not-a-key", common::short_closed())).await;
    stack.stop().await;

    let s = &report.summary;
    assert_eq!(s.jobs_sent, 20);
    let limited = s
        .errors_by_kind
        .get("http_429_rate_limit_exceeded")
        .copied();
    assert!(limited.unwrap_or(0) > 0, "{:?}", s.errors_by_kind);
    assert_eq!(s.jobs_ok + s.jobs_failed, s.jobs_sent, "{s:?}");
    let Err(err) = refused else {
        panic!("a bad key must fail the probe");
    };
    let err = err.to_string();
    assert!(err.contains("http_401_invalid_api_key"), "{err}");
}
