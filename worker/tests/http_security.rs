//! The HTTP endpoints' hardening, over real HTTP requests: loopback by
//! default, `nosniff` and `no-store` on every response, and an optional
//! bearer token on `/metrics` that is never shown.

use crate::common;

use common::observe::{http_request, HttpResponse};
use jetinfer_worker::config::{HttpConfig, WorkerConfig};
use jetinfer_worker::http::{Health, HttpServer, MetricsToken};

/// A GET to `addr` with optional extra header lines.
async fn get(addr: std::net::SocketAddr, path: &str, extra: &str) -> HttpResponse {
    http_request(&addr.to_string(), path, extra).await.unwrap()
}

fn assert_hardened(response: &HttpResponse, what: &str) {
    assert_eq!(
        response.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(response.header("cache-control"), Some("no-store"), "{what}");
}

#[test]
fn endpoints_bind_to_loopback_unless_configured_otherwise() {
    assert!(HttpConfig::default().addr.ip().is_loopback());
    assert!(WorkerConfig::default().http.metrics_token_file.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_says_nosniff_and_no_store() {
    let server = HttpServer::start("127.0.0.1:0".parse().unwrap(), Health::default())
        .await
        .unwrap();
    for (path, status) in [
        ("/metrics", 200),
        ("/healthz", 200),
        ("/readyz", 503),
        ("/nope", 404),
    ] {
        let response = get(server.local_addr, path, "").await;
        assert_eq!(response.status, status, "{path}");
        assert_hardened(&response, path);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_require_the_configured_bearer_token_and_probes_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-metrics-token";
    let file = dir.path().join("metrics-token");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let config = HttpConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        metrics_token_file: Some(file.clone()),
    };
    let server = HttpServer::from_config(&config, Health::default())
        .await
        .unwrap();
    let addr = server.local_addr;

    for (what, extra) in [
        ("no token", String::new()),
        (
            "wrong token",
            "Authorization: Bearer s3cret-metrics-tokex\r\n".to_string(),
        ),
        (
            "prefix of the token",
            "Authorization: Bearer s3cret\r\n".to_string(),
        ),
        ("wrong scheme", format!("Authorization: Basic {secret}\r\n")),
        ("empty bearer", "Authorization: Bearer \r\n".to_string()),
    ] {
        let response = get(addr, "/metrics", &extra).await;
        assert_eq!(response.status, 401, "{what}");
        assert!(
            response
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "{what}"
        );
        assert!(
            !response.body.contains("jetinfer_"),
            "{what}: metrics leaked"
        );
        assert_hardened(&response, what);
    }
    let response = get(
        addr,
        "/metrics",
        &format!("Authorization: Bearer {secret}\r\n"),
    )
    .await;
    assert_eq!(response.status, 200);
    assert!(
        response.body.contains("jetinfer_build_info"),
        "{}",
        response.body
    );
    assert_hardened(&response, "authorised scrape");
    let response = get(
        addr,
        "/metrics",
        &format!("authorization: bearer {secret}\r\n"),
    )
    .await;
    assert_eq!(response.status, 200, "the scheme is case-insensitive");

    // Orchestrators' probes need no token.
    assert_eq!(get(addr, "/healthz", "").await.status, 200);
    assert_eq!(get(addr, "/readyz", "").await.status, 503);

    // The token is never shown: not in the config dump, not in Debug.
    let shown = format!(
        "{config:?} {:?} {}",
        MetricsToken::from_file(&file).unwrap(),
        serde_json::to_string(&config).unwrap()
    );
    assert!(!shown.contains(secret), "{shown}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_missing_token_file_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    for path in [empty, dir.path().join("missing")] {
        let config = HttpConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            metrics_token_file: Some(path.clone()),
        };
        let err = HttpServer::from_config(&config, Health::default())
            .await
            .err();
        let err = err.unwrap_or_else(|| panic!("{} accepted", path.display()));
        assert!(err.to_string().contains("metrics"), "{err}");
    }
}
