//! The gateway over real HTTP (curl) in front of a real worker (echo
//! backend) and nats-server with the shipped secure config: OpenAI's shapes,
//! every refusal with its status, the security headers, rate limits, key
//! rotation, metrics, a slow client cut off, a connection past the limit
//! answered 503, timeouts and a graceful stop.

use crate::harness;

use std::time::Duration;

use base64::Engine;
use harness::*;
use jetinfer_worker::config::BackendKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECURITY_HEADERS: [(&str, &str); 5] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("content-security-policy", "default-src 'none'"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
];

fn assert_security_headers(reply: &Reply) {
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(reply.header(name), Some(value), "{name} on {reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_come_back_in_openai_shape_as_floats_or_base64_with_usage() {
    let stack = Stack::start(BackendKind::Echo, |_| {}).await;

    let float = post_embeddings(
        &stack,
        Some(ACME_KEY),
        r#"{"model":"minilm","input":["hello world","a"],"user":"someone"}"#,
    )
    .await;
    assert_eq!(float.status, 200, "{}", float.body);
    let body = float.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "minilm");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert_eq!(item["embedding"].as_array().unwrap().len(), 8);
    }
    let tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens >= 2, "{body}");
    assert_eq!(body["usage"]["total_tokens"].as_u64(), Some(tokens));

    let base64 = post_embeddings(
        &stack,
        Some(ACME_KEY),
        r#"{"model":"minilm","input":"hello world","encoding_format":"base64"}"#,
    )
    .await;
    assert_eq!(base64.status, 200, "{}", base64.body);
    let encoded = base64.json()["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string")
        .to_string();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // JSON carries each f32 in its shortest form, which reads back exactly.
    let floats: Vec<f32> = data[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(
        decoded, floats,
        "base64 is the same little-endian f32 vector"
    );

    let four = post_embeddings(
        &stack,
        Some(ACME_KEY),
        r#"{"model":"minilm","input":"hello world","dimensions":4}"#,
    )
    .await;
    assert_eq!(four.status, 200, "{}", four.body);
    let v: Vec<f64> = four.json()["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(v.len(), 4);
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "re-normalised, norm {norm}");
    stack.stop().await;
}

/// What is sent, with which key, and the status and `code` that must come back.
type Case<'a> = (&'a str, Option<&'a str>, &'a str, u16, Option<&'a str>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_of_every_kind_gets_an_openai_error_with_its_status() {
    let stack = Stack::start(BackendKind::Echo, |c| {
        c.limits.max_body_bytes = 64 * 1024;
        c.limits.max_chars_per_input = 1000;
    })
    .await;
    let many: Vec<String> = (0..257).map(|i| format!("text {i}")).collect();
    let many = serde_json::json!({"model": "minilm", "input": many}).to_string();
    let long = serde_json::json!({"model": "minilm", "input": "x".repeat(1001)}).to_string();
    let huge = serde_json::json!({"model": "minilm", "input": "y ".repeat(40_000)}).to_string();
    let cases: Vec<Case> = vec![
        (
            "no key",
            None,
            r#"{"model":"minilm","input":"a"}"#,
            401,
            Some("invalid_api_key"),
        ),
        (
            "bad key",
            Some("sk-nobody"),
            r#"{"model":"minilm","input":"a"}"#,
            401,
            Some("invalid_api_key"),
        ),
        (
            "read-only key",
            Some(ACME_READ_ONLY_KEY),
            r#"{"model":"minilm","input":"a"}"#,
            403,
            Some("permission_denied"),
        ),
        (
            "tenant not served here",
            Some(STRAY_KEY),
            r#"{"model":"minilm","input":"a"}"#,
            403,
            Some("permission_denied"),
        ),
        (
            "not JSON",
            Some(ACME_KEY),
            "{model: minilm",
            400,
            Some("invalid_json"),
        ),
        (
            "no model",
            Some(ACME_KEY),
            r#"{"input":"a"}"#,
            400,
            Some("invalid_json"),
        ),
        (
            "input a number",
            Some(ACME_KEY),
            r#"{"model":"minilm","input":5}"#,
            400,
            Some("invalid_json"),
        ),
        (
            "input empty",
            Some(ACME_KEY),
            r#"{"model":"minilm","input":[]}"#,
            400,
            Some("invalid_value"),
        ),
        (
            "token ids",
            Some(ACME_KEY),
            r#"{"model":"minilm","input":[101, 2023]}"#,
            400,
            Some("invalid_value"),
        ),
        (
            "unknown encoding",
            Some(ACME_KEY),
            r#"{"model":"minilm","input":"a","encoding_format":"hex"}"#,
            400,
            Some("invalid_json"),
        ),
        (
            "dimensions 0",
            Some(ACME_KEY),
            r#"{"model":"minilm","input":"a","dimensions":0}"#,
            400,
            Some("invalid_value"),
        ),
        (
            "dimensions past the width",
            Some(ACME_KEY),
            r#"{"model":"minilm","input":"a","dimensions":9}"#,
            400,
            Some("invalid_value"),
        ),
        (
            "unknown model",
            Some(ACME_KEY),
            r#"{"model":"gpt-4","input":"a"}"#,
            404,
            Some("model_not_found"),
        ),
        (
            "model not a subject token",
            Some(ACME_KEY),
            r#"{"model":"a.>","input":"a"}"#,
            404,
            Some("model_not_found"),
        ),
        (
            "too many inputs",
            Some(ACME_KEY),
            &many,
            413,
            Some("request_too_large"),
        ),
        (
            "input too long",
            Some(ACME_KEY),
            &long,
            413,
            Some("request_too_large"),
        ),
        (
            "body too large",
            Some(ACME_KEY),
            &huge,
            413,
            Some("request_too_large"),
        ),
    ];
    for (what, key, body, status, code) in cases {
        let reply = post_embeddings(&stack, key, body).await;
        let error = reply.openai_error(status);
        assert_eq!(error["code"].as_str(), code, "{what}: {}", reply.body);
        assert_security_headers(&reply);
    }
    let unknown_route = get(&stack, Some(ACME_KEY), "/v1/nothing-here").await;
    unknown_route.openai_error(404);
    stack.wait_for_model("minilm").await;
    let models = get(&stack, Some(ACME_KEY), "/v1/models").await;
    assert_eq!(models.status, 200, "{}", models.body);
    let listed: Vec<String> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ["minilm"]);
    let one = get(&stack, Some(ACME_READ_ONLY_KEY), "/v1/models/minilm").await;
    assert_eq!(one.status, 200, "a read-only key may list models");
    assert_eq!(one.json()["object"], "model");
    let missing = get(&stack, Some(ACME_KEY), "/v1/models/gpt-4").await;
    assert_eq!(missing.openai_error(404)["code"], "model_not_found");
    let anonymous = get(&stack, None, "/v1/models").await;
    anonymous.openai_error(401);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_the_security_headers_and_no_cors_or_hsts_unless_configured() {
    let stack = Stack::start(BackendKind::Echo, |_| {}).await;
    let origin = "Origin: https://evil.example";
    for path in [
        "/healthz",
        "/readyz",
        "/v1/models",
        "/nope",
        "/openapi.json",
    ] {
        let url = stack.url(path);
        let reply = curl(&[url.as_str(), "-H", origin]).await;
        assert_security_headers(&reply);
        assert_eq!(
            reply.header("strict-transport-security"),
            None,
            "no HSTS over plain HTTP"
        );
        assert_eq!(
            reply.header("access-control-allow-origin"),
            None,
            "CORS is off"
        );
    }
    stack.stop().await;

    let allowed = "https://app.example";
    let stack = Stack::start(BackendKind::Echo, |c| {
        c.cors.allowed_origins = vec![allowed.into()];
    })
    .await;
    let url = stack.url("/v1/embeddings");
    let preflight = curl(&[
        "-X",
        "OPTIONS",
        url.as_str(),
        "-H",
        "Origin: https://app.example",
        "-H",
        "Access-Control-Request-Method: POST",
    ])
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some(allowed)
    );
    assert_security_headers(&preflight);
    let other = curl(&[
        "-X",
        "OPTIONS",
        url.as_str(),
        "-H",
        origin,
        "-H",
        "Access-Control-Request-Method: POST",
    ])
    .await;
    assert_eq!(other.header("access-control-allow-origin"), None);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_describes_every_route_the_router_serves_and_no_other() {
    let stack = Stack::start(BackendKind::Echo, |_| {}).await;
    let doc = get(&stack, None, "/openapi.json").await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    // Path parameters by position: the router's `{id}` is the document's
    // `{file_id}` or `{batch_id}`.
    let shape = |path: &str| -> String {
        path.split('/')
            .map(|part| if part.starts_with('{') { "{}" } else { part })
            .collect::<Vec<_>>()
            .join("/")
    };
    let documented: std::collections::BTreeMap<String, Vec<String>> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, ops)| {
            (
                shape(path),
                ops.as_object().unwrap().keys().cloned().collect(),
            )
        })
        .collect();
    let served = jetinfer_gateway::served_routes();
    for (path, methods) in &served {
        let ops = documented
            .get(&shape(path))
            .unwrap_or_else(|| panic!("{path} is served and not in the document"));
        for method in *methods {
            assert!(
                ops.iter().any(|op| op == method),
                "{method} {path} is served and not in the document ({ops:?})"
            );
        }
    }
    for (path, ops) in &documented {
        let methods = served
            .iter()
            .find(|(p, _)| shape(p) == *path)
            .unwrap_or_else(|| panic!("{path} is documented and not served"))
            .1;
        for op in ops {
            assert!(
                methods.contains(&op.as_str()),
                "{op} {path} is documented and not served"
            );
        }
    }
    let schemas = &doc["components"]["schemas"];
    for schema in [
        "EmbeddingsRequest",
        "RerankRequest",
        "RerankResponse",
        "CreateBatchRequest",
        "FileObject",
        "FileDeleted",
        "Batch",
        "BatchStatus",
    ] {
        assert!(
            schemas.get(schema).is_some(),
            "schema {schema} in {schemas}"
        );
    }
    // The batch and file routes name their response schemas.
    let ok = |path: &str, method: &str| {
        doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
            .to_string()
    };
    assert!(
        ok("/v1/batches/{batch_id}", "get").contains("Batch"),
        "{}",
        ok("/v1/batches/{batch_id}", "get")
    );
    assert!(ok("/v1/files/{file_id}", "get").contains("FileObject"));
    assert!(
        ok("/v1/batches", "get").contains("Batch"),
        "{}",
        ok("/v1/batches", "get")
    );
    assert!(ok("/v1/files", "post").contains("FileObject"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_with_retry_after_and_a_tenant_limit_covers_all_its_keys() {
    let stack = Stack::start(BackendKind::Echo, |c| {
        c.tenants.get_mut("globex").unwrap().rate = Some(jetinfer_gateway::config::Rate {
            inputs_per_second: 1,
            burst_inputs: 2,
        });
    })
    .await;
    let one = r#"{"model":"minilm","input":"a"}"#;
    assert_eq!(
        post_embeddings(&stack, Some(ACME_LIMITED_KEY), one)
            .await
            .status,
        200
    );
    let limited = post_embeddings(&stack, Some(ACME_LIMITED_KEY), one).await;
    let error = limited.openai_error(429);
    assert_eq!(error["type"], "rate_limit_error");
    let after: u64 = limited
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&after), "Retry-After {after}");
    assert!(limited.header("retry-after-ms").is_some());
    // The other keys of the tenant have no limit of their own.
    assert_eq!(
        post_embeddings(&stack, Some(ACME_KEY), one).await.status,
        200
    );
    // More than the burst could ever allow: 413, not a wait.
    let two = r#"{"model":"minilm","input":["a","b"]}"#;
    assert_eq!(
        post_embeddings(&stack, Some(ACME_LIMITED_KEY), two)
            .await
            .openai_error(413)["param"],
        "input"
    );

    // globex: 2 inputs of burst over all its keys.
    assert_eq!(
        post_embeddings(&stack, Some(GLOBEX_KEY), two).await.status,
        200
    );
    post_embeddings(&stack, Some(GLOBEX_KEY), one)
        .await
        .openai_error(429);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_keys_file_takes_effect_without_a_restart() {
    let stack = Stack::start(BackendKind::Echo, |_| {}).await;
    let one = r#"{"model":"minilm","input":"a"}"#;
    assert_eq!(
        post_embeddings(&stack, Some(ACME_KEY), one).await.status,
        200
    );
    let new_key = "sk-acme-rotated-987654321";
    std::fs::write(
        &stack.keys_file,
        format!(
            "[[keys]]\nid = \"acme-rotated\"\nsha256 = \"{}\"\ntenant = \"acme\"\nrole = \"user\"\n",
            sha256_hex(new_key)
        ),
    )
    .unwrap();
    let mut status = (0, 0);
    for _ in 0..50 {
        status = (
            post_embeddings(&stack, Some(ACME_KEY), one).await.status,
            post_embeddings(&stack, Some(new_key), one).await.status,
        );
        if status == (401, 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status, (401, 200), "old key refused, new key accepted");
    // A broken file keeps the keys loaded before.
    std::fs::write(&stack.keys_file, "[[keys]]\nid = 3\n").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        post_embeddings(&stack, Some(new_key), one).await.status,
        200
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_after_the_header_read_timeout() {
    let stack = Stack::start(BackendKind::Echo, |c| {
        c.limits.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(stack.gateway.local_addr)
        .await
        .unwrap();
    // Half a request head, then nothing more.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was still open after 20 s");
    let seen = String::from_utf8_lossy(&seen);
    assert!(
        seen.is_empty() || seen.starts_with("HTTP/1.1 408"),
        "{seen}"
    );
    // A whole request on a new connection is still answered.
    assert_eq!(get(&stack, None, "/healthz").await.status, 200);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_limit_is_answered_503_with_retry_after_not_queued() {
    let stack = Stack::start(BackendKind::Echo, |c| {
        c.limits.max_connections = 1;
    })
    .await;
    // The one slot, held by a connection that has sent nothing yet.
    let held = tokio::net::TcpStream::connect(stack.gateway.local_addr)
        .await
        .unwrap();
    // Bounded: the held connection is surely accepted by the first tries.
    let mut refused = None;
    for _ in 0..50 {
        let reply = get(&stack, Some(ACME_KEY), "/v1/models").await;
        if reply.status == 503 {
            refused = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = refused.expect("a connection past the limit was answered 503");
    let error = reply.openai_error(503);
    assert_eq!(error["code"], "server_busy", "{error}");
    assert_eq!(reply.header("retry-after"), Some("1"), "{reply:?}");
    assert_eq!(reply.header("connection"), Some("close"), "{reply:?}");
    assert_security_headers(&reply);

    // The slot freed, the next connection is served.
    drop(held);
    let mut served = false;
    for _ in 0..100 {
        if get(&stack, Some(ACME_KEY), "/v1/models").await.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a connection after the held one closed was served");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_slower_than_the_wait_is_504_saying_it_may_still_complete() {
    let stack = Stack::start_with(
        BackendKind::Echo,
        |w| w.model.echo_delay_per_token_us = 1_000_000,
        |c| c.limits.job_timeout = Duration::from_millis(500),
    )
    .await;
    let reply = post_embeddings(
        &stack,
        Some(ACME_KEY),
        r#"{"model":"minilm","input":"a b c"}"#,
    )
    .await;
    let error = reply.openai_error(504);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("may still complete"),
        "{error}"
    );
    stack.stop().await;
}

#[test]
fn print_config_shows_secret_files_by_path_only() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("acme.nk");
    std::fs::write(&seed, "SUAM-NOT-A-REAL-SEED-BUT-SECRET").unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "keys_file = \"{0}/keys.toml\"\n[tenants.acme]\nauth = {{ kind = \"nkey\", seed_file = \"{1}\" }}\n",
            dir.path().display(),
            seed.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jetinfer-gateway"))
        .args(["--config", config.to_str().unwrap(), "--print-config"])
        .env("JETINFER_GATEWAY_LIMITS__MAX_INPUTS", "64")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(seed.to_str().unwrap()), "{text}");
    assert!(
        text.contains("max_inputs = 64"),
        "the environment overrides: {text}"
    );
    assert!(!text.contains("SUAM-NOT-A-REAL-SEED"), "{text}");
}
