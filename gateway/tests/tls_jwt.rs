//! TLS and JWT at the edge, with curl: HTTPS from PEM files with HSTS (plain
//! text refused on that port), the certificate replaced on disk served to
//! new connections while an open one keeps working, and JWT bearer tokens verified against a
//! local JWKS file: accepted when valid, 401 for a bad signature, an expired
//! token, a wrong audience or issuer, or a forged HMAC token.

use crate::harness;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// A TLS connection to the gateway trusting only `ca`, and the server
/// certificate it was shown.
async fn tls_connect(
    port: u16,
    ca: &std::path::Path,
) -> std::io::Result<(
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
)> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let shown = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok((stream, shown))
}

/// `GET /healthz` on an open connection (kept alive): its status line.
async fn healthz_on(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // The whole answer: its head and the two-byte body "ok".
    tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.ends_with(b"\r\n\r\nok") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer within 10 s");
    String::from_utf8_lossy(&seen)
        .lines()
        .next()
        .unwrap()
        .to_string()
}

/// The DER of the first certificate in PEM file `path`.
fn der_of(path: &std::path::Path) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_to_new_connections_while_open_ones_keep_working() {
    let (old, new) = (TestPki::generate(), TestPki::generate());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&old.server_cert, &cert).unwrap();
    std::fs::copy(&old.server_key, &key).unwrap();
    let stack = Stack::start(BackendKind::Echo, |c| {
        c.tls = Some(TlsFiles {
            cert_file: cert.clone(),
            key_file: key.clone(),
        });
    })
    .await;
    let port = stack.gateway.local_addr.port();
    let (mut open, shown) = tls_connect(port, &old.ca_cert)
        .await
        .expect("TLS with the old CA");
    assert_eq!(shown, der_of(&old.server_cert));
    assert_eq!(healthz_on(&mut open).await, "HTTP/1.1 200 OK");

    // Replaced as a Secret volume is: new files moved into place.
    for (from, to) in [(&new.server_cert, &cert), (&new.server_key, &key)] {
        let staged = to.with_extension("new");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    }
    let mut reloaded = false;
    for _ in 0..100 {
        if let Ok((_, shown)) = tls_connect(port, &new.ca_cert).await {
            assert_eq!(shown, der_of(&new.server_cert));
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reloaded,
        "a new connection saw the new certificate within 10 s"
    );
    assert!(
        tls_connect(port, &old.ca_cert).await.is_err(),
        "the old certificate is no longer served"
    );
    // The connection made before keeps working.
    assert_eq!(healthz_on(&mut open).await, "HTTP/1.1 200 OK");

    // A broken file is refused and the certificate in use stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut fresh, shown) = tls_connect(port, &new.ca_cert)
        .await
        .expect("still served after a broken file");
    assert_eq!(shown, der_of(&new.server_cert));
    assert_eq!(healthz_on(&mut fresh).await, "HTTP/1.1 200 OK");
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
