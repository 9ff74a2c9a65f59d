//! TLS and JWT at the edge, with curl: HTTPS from PEM files with HSTS (plain
//! text refused on that port), and JWT bearer tokens verified against a
//! local JWKS file: accepted when valid, 401 for a bad signature, an expired
//! token, a wrong audience or issuer, or a forged HMAC token.

mod harness;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use harness::*;
use jetinfer_gateway::config::{JwtConfig, TlsFiles};
use jetinfer_nats::testing::TestPki;
use jetinfer_worker::config::BackendKind;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_with_hsts_and_refuses_plain_text() {
    let pki = TestPki::generate();
    let stack = Stack::start(BackendKind::Echo, |c| {
        c.tls = Some(TlsFiles {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
        });
    })
    .await;
    let port = stack.gateway.local_addr.port();
    let https = format!("https://localhost:{port}/v1/embeddings");
    let ca = pki.ca_cert.display().to_string();
    let auth = format!("Authorization: Bearer {ACME_KEY}");
    let reply = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &format!("localhost:{port}:127.0.0.1"),
        "-X",
        "POST",
        &https,
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        r#"{"model":"minilm","input":"over TLS"}"#,
    ])
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.header("strict-transport-security"),
        Some(jetinfer_gateway::edge::HSTS)
    );
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));

    let plain = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{port}/healthz"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        !plain.status.success(),
        "plain HTTP answered on the TLS port: {:?}",
        plain
    );
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("ok"));
    stack.stop().await;
}

const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "jetinfer-gateway";

struct Signer {
    key: rcgen::KeyPair,
    kid: &'static str,
}

impl Signer {
    fn new(kid: &'static str) -> Self {
        Self {
            key: rcgen::KeyPair::generate().unwrap(),
            kid,
        }
    }

    fn jwk(&self) -> serde_json::Value {
        let raw = self.key.public_key_raw();
        assert_eq!(raw[0], 4, "an uncompressed P-256 point");
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        })
    }

    fn token(&self, claims: serde_json::Value) -> String {
        jetinfer_gateway::jwt_crypto::install();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.into());
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_ec_der(&self.key.serialize_der()),
        )
        .unwrap()
    }
}

/// An HS256 token made by hand (the gateway's crypto refuses to sign HMAC):
/// what an attacker holding only the public key would try.
fn forged_hmac(claims: &serde_json::Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let head = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = b64(claims.to_string().as_bytes());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"public key bytes");
    let tag = ring::hmac::sign(&key, format!("{head}.{body}").as_bytes());
    format!("{head}.{body}.{}", b64(tag.as_ref()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(aud: &str, exp: u64) -> serde_json::Value {
    serde_json::json!({"iss": ISSUER, "aud": aud, "exp": exp, "sub": "svc-1", "tenant": "acme"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_accepted_when_valid_and_refused_otherwise() {
    let signer = Signer::new("k1");
    let impostor = Signer::new("k1");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({"keys": [signer.jwk()]}).to_string(),
    )
    .unwrap();
    let stack = Stack::start(BackendKind::Echo, |c| {
        c.jwt = Some(JwtConfig {
            jwks_file: jwks.clone(),
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            tenant_claim: "tenant".into(),
            role_claim: None,
            leeway_secs: 5,
        });
    })
    .await;
    let one = r#"{"model":"minilm","input":"a"}"#;
    let valid = signer.token(claims(AUDIENCE, now() + 600));
    let reply = post_embeddings(&stack, Some(&valid), one).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let hmac = forged_hmac(&claims(AUDIENCE, now() + 600));
    let mut no_tenant = claims(AUDIENCE, now() + 600);
    no_tenant.as_object_mut().unwrap().remove("tenant");
    let mut wrong_issuer = claims(AUDIENCE, now() + 600);
    wrong_issuer["iss"] = "https://elsewhere.example".into();
    let mut other_tenant = claims(AUDIENCE, now() + 600);
    other_tenant["tenant"] = "initech".into();
    let refused = [
        (
            "bad signature",
            impostor.token(claims(AUDIENCE, now() + 600)),
            401,
            "bad signature",
        ),
        (
            "expired",
            signer.token(claims(AUDIENCE, now() - 3600)),
            401,
            "expired",
        ),
        (
            "wrong audience",
            signer.token(claims("someone-else", now() + 600)),
            401,
            "wrong audience",
        ),
        (
            "wrong issuer",
            signer.token(wrong_issuer),
            401,
            "wrong issuer",
        ),
        ("forged HMAC", hmac, 401, "algorithm"),
        ("no tenant claim", signer.token(no_tenant), 401, "tenant"),
        (
            "tenant not served here",
            signer.token(other_tenant),
            403,
            "not served",
        ),
    ];
    for (what, token, status, says) in refused {
        let reply = post_embeddings(&stack, Some(&token), one).await;
        let error = reply.openai_error(status);
        assert!(
            error["message"].as_str().unwrap().contains(says),
            "{what}: {}",
            reply.body
        );
    }
    stack.stop().await;
}
