//! The official OpenAI Python SDK (pinned, in `.cache/openai-venv`, made by
//! `scripts/deps/openai-sdk.sh`), unchanged, against the gateway in front of
//! a real MiniLM worker and nats-server with the shipped secure config: one
//! and many inputs, base64 (the SDK's default) and float, `dimensions`,
//! models, a bad key (401), a read-only key (403), an unknown model (404), an
//! oversized body (413), and a rate-limited key (429 with Retry-After, which
//! the SDK's retry honours). Embeddings match the golden file (cosine >=
//! 0.9999). The checks are in `tests/sdk/openai_sdk_check.py`.

use crate::harness;

use harness::common::shared_data;
use harness::*;
use jetinfer_nats::testing::workspace_root;
use jetinfer_worker::config::BackendKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_embeds_through_the_gateway_and_matches_the_golden_file() {
    let python = workspace_root().join(".cache/openai-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/deps/openai-sdk.sh",
        python.display()
    );
    let stack = Stack::start(BackendKind::Candle, |_| {}).await;
    stack.wait_for_model("minilm").await;
    let script = workspace_root().join("gateway/tests/sdk/openai_sdk_check.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .env("JETINFER_GATEWAY_URL", stack.url(""))
        .env("ACME_KEY", ACME_KEY)
        .env("ACME_LIMITED_KEY", ACME_LIMITED_KEY)
        .env("ACME_READ_ONLY_KEY", ACME_READ_ONLY_KEY)
        .env("JETINFER_GOLDEN", shared_data().join("minilm_golden.json"))
        // The SDK's own proxy settings must not route loopback elsewhere.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all SDK checks passed"), "{stdout}");
    stack.stop().await;
}
