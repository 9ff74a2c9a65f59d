//! Authentication and TLS against real nats-server processes, through
//! `jetinfer_nats::connect` as the worker, producer and loadgen use it: each
//! kind of `nats.auth` works with the right secret and is refused without
//! one or with a wrong one (and the refusal never shows the secret); a
//! TLS-only server refuses plain text and untrusted clients; mutual TLS works
//! with certificates the test makes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jetinfer_nats::testing::{plain_text_session, NatsServer, TestPki};
use jetinfer_nats::{connect, Auth, ConnectError, NatsConfig, TlsConfig};

/// A server from `conf` (a config file body), and the directory it lives in.
fn server(conf: &str) -> (NatsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.conf");
    std::fs::write(&path, conf).unwrap();
    (NatsServer::start_with_config(&path, &[]), dir)
}

fn secret_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    // As `echo secret > file` writes it: the newline is not part of the secret.
    std::fs::write(&path, format!("{content}\n")).unwrap();
    path
}

fn config(server: &NatsServer, auth: Auth) -> NatsConfig {
    NatsConfig {
        urls: vec![server.url()],
        connect_timeout: Duration::from_secs(3),
        startup_retry_for: Duration::from_secs(3),
        auth,
        ..NatsConfig::default()
    }
}

/// Connected for real: a round trip through the server succeeds.
async fn assert_works(config: &NatsConfig) {
    let client = connect(config)
        .await
        .expect("connects with the right secret");
    let mut sub = client.subscribe("auth.check").await.unwrap();
    client.publish("auth.check", "ping".into()).await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut sub))
        .await
        .expect("own message comes back")
        .unwrap();
    assert_eq!(&message.payload[..], b"ping");
}

/// Refused by the server, with an error that names the auth kind but shows
/// none of the `secrets`.
async fn assert_refused(config: &NatsConfig, secrets: &[&str]) {
    let err = connect(config)
        .await
        .map(|_| ())
        .expect_err("connection refused");
    assert!(
        matches!(err, ConnectError::Refused { .. }),
        "expected a refusal, got: {err}"
    );
    let shown = format!("{err} {err:?} {config:?}");
    for secret in secrets {
        assert!(!shown.contains(secret), "secret shown in {shown}");
    }
}

#[tokio::test]
async fn token_is_accepted_and_a_wrong_or_missing_token_is_refused() {
    let (server, dir) = server("authorization { token: \"t0ken-right-8b1f\" }\n");
    let right = secret_file(dir.path(), "right", "t0ken-right-8b1f");
    let wrong = secret_file(dir.path(), "wrong", "t0ken-wrong-77aa");

    assert_works(&config(&server, Auth::Token { token_file: right })).await;
    assert_refused(
        &config(&server, Auth::Token { token_file: wrong }),
        &["t0ken-wrong-77aa", "t0ken-right-8b1f"],
    )
    .await;
    assert_refused(&config(&server, Auth::None), &[]).await;
}

#[tokio::test]
async fn user_and_password_are_accepted_and_a_wrong_password_or_user_is_refused() {
    let (server, dir) =
        server("authorization { users: [ { user: alice, password: \"pw-alice-3c9d\" } ] }\n");
    let right = secret_file(dir.path(), "right", "pw-alice-3c9d");
    let wrong = secret_file(dir.path(), "wrong", "pw-guess-0000");
    let as_user = |user: &str, password_file: &Path| {
        config(
            &server,
            Auth::UserPassword {
                user: user.into(),
                password_file: password_file.into(),
            },
        )
    };

    assert_works(&as_user("alice", &right)).await;
    assert_refused(
        &as_user("alice", &wrong),
        &["pw-guess-0000", "pw-alice-3c9d"],
    )
    .await;
    assert_refused(&as_user("mallory", &right), &["pw-alice-3c9d"]).await;
    assert_refused(&config(&server, Auth::None), &[]).await;
}

#[tokio::test]
async fn nkey_seed_is_accepted_and_another_seed_is_refused() {
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let (server, dir) = server(&format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
        user.public_key()
    ));
    let seed = user.seed().unwrap();
    let other_seed = stranger.seed().unwrap();
    let right = secret_file(dir.path(), "right.nk", &seed);
    let wrong = secret_file(dir.path(), "wrong.nk", &other_seed);

    assert_works(&config(&server, Auth::Nkey { seed_file: right })).await;
    assert_refused(
        &config(&server, Auth::Nkey { seed_file: wrong }),
        &[other_seed.as_str(), seed.as_str()],
    )
    .await;
    assert_refused(&config(&server, Auth::None), &[]).await;

    // Not a seed at all: refused before any connection, without echoing it.
    let garbage = secret_file(dir.path(), "garbage.nk", "not-a-seed-5e5e");
    let err = connect(&config(&server, Auth::Nkey { seed_file: garbage }))
        .await
        .map(|_| ())
        .expect_err("unusable seed file refused");
    assert!(matches!(err, ConnectError::Credentials { .. }), "{err}");
    assert!(err.to_string().contains("garbage.nk"), "{err}");
    assert!(!err.to_string().contains("not-a-seed-5e5e"), "{err}");
}

#[tokio::test]
async fn a_missing_secret_file_is_named_in_the_error() {
    let (server, dir) = server("authorization { token: \"t0ken\" }\n");
    let missing = dir.path().join("no-such-token");
    let err = connect(&config(
        &server,
        Auth::Token {
            token_file: missing,
        },
    ))
    .await
    .map(|_| ())
    .expect_err("missing file refused");
    assert!(matches!(err, ConnectError::Credentials { .. }), "{err}");
    assert!(err.to_string().contains("no-such-token"), "{err}");
}

fn tls_server(pki: &TestPki, verify_clients: bool) -> (NatsServer, tempfile::TempDir) {
    server(&format!(
        "tls {{\n cert_file: \"{}\"\n key_file: \"{}\"\n ca_file: \"{}\"\n verify: {verify_clients}\n timeout: 2\n}}\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca_cert.display(),
    ))
}

fn tls_config(server: &NatsServer, tls: TlsConfig) -> NatsConfig {
    NatsConfig {
        tls,
        ..config(server, Auth::None)
    }
}

#[tokio::test]
async fn a_tls_server_refuses_plain_text_and_accepts_clients_that_trust_its_ca() {
    let pki = TestPki::generate();
    let (server, _dir) = tls_server(&pki, false);

    // A client that does not do TLS gets no service: no PONG, no message,
    // and the connection is closed.
    let port = server.port();
    let session = tokio::task::spawn_blocking(move || plain_text_session(port))
        .await
        .unwrap();
    assert!(session.contains("\"tls_required\":true"), "{session}");
    assert!(
        !session.contains("PONG"),
        "plain text got an answer: {session}"
    );
    assert!(
        !session.contains("MSG x"),
        "plain text got a message: {session}"
    );

    // A TLS client that does not trust the server's CA refuses it.
    let err = connect(&tls_config(&server, TlsConfig::default()))
        .await
        .map(|_| ())
        .expect_err("untrusted server certificate refused");
    assert!(matches!(err, ConnectError::Tls { .. }), "{err}");

    // Trusting the CA, it works.
    assert_works(&tls_config(
        &server,
        TlsConfig {
            required: true,
            ca_file: Some(pki.ca_cert.clone()),
            ..TlsConfig::default()
        },
    ))
    .await;
}

#[tokio::test]
async fn a_client_that_requires_tls_refuses_a_plain_server() {
    let server = NatsServer::start();
    let result = connect(&tls_config(
        &server,
        TlsConfig {
            required: true,
            ..TlsConfig::default()
        },
    ))
    .await;
    assert!(
        result.is_err(),
        "connected to a plain server with tls.required"
    );
}

#[tokio::test]
async fn mutual_tls_accepts_the_cas_client_certificate_and_refuses_others() {
    let pki = TestPki::generate();
    let (server, _dir) = tls_server(&pki, true);
    let trusting = |cert: Option<&Path>, key: Option<&Path>| {
        tls_config(
            &server,
            TlsConfig {
                required: true,
                ca_file: Some(pki.ca_cert.clone()),
                cert_file: cert.map(Path::to_path_buf),
                key_file: key.map(Path::to_path_buf),
                ..TlsConfig::default()
            },
        )
    };

    assert_works(&trusting(Some(&pki.client_cert), Some(&pki.client_key))).await;

    // No client certificate: the server ends the handshake.
    assert!(
        connect(&trusting(None, None)).await.is_err(),
        "connected without a client certificate"
    );
    // A certificate from another CA: refused too.
    let stranger = TestPki::generate();
    assert!(
        connect(&trusting(
            Some(&stranger.client_cert),
            Some(&stranger.client_key)
        ))
        .await
        .is_err(),
        "connected with a certificate from an unknown CA"
    );
    // Half a client identity is a configuration error, caught up front.
    let err = connect(&trusting(Some(&pki.client_cert), None))
        .await
        .map(|_| ())
        .expect_err("certificate without key refused");
    assert!(matches!(err, ConnectError::TlsConfig(_)), "{err}");
}

/// Decentralised (JWT) auth: an operator, an account and a user, each an
/// NKey, the account JWT signed by the operator and the user JWT by the
/// account, as `nsc` would make them.
mod jwt {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use nkeys::KeyPair;
    use serde_json::{json, Value};

    fn encode(claims: Value, issuer: &KeyPair) -> String {
        let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
        let body = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{body}");
        let signature = issuer.sign(signed.as_bytes()).unwrap();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn claims(issuer: &KeyPair, subject: &str, nats: Value) -> Value {
        json!({
            "jti": format!("test-{subject}"),
            "iat": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            "iss": issuer.public_key(),
            "sub": subject,
            "name": subject,
            "nats": nats,
        })
    }

    pub struct Operator {
        pub jwt: String,
        pub account: String,
        pub account_jwt: String,
        /// The system account JetStream needs in operator mode.
        pub system: String,
        pub system_jwt: String,
        account_key: KeyPair,
    }

    impl Operator {
        pub fn new() -> Self {
            let operator = KeyPair::new_operator();
            let account_key = KeyPair::new_account();
            let jwt = encode(
                claims(
                    &operator,
                    &operator.public_key(),
                    json!({"type": "operator", "version": 2}),
                ),
                &operator,
            );
            let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1,
                "exports": -1, "wildcards": true, "conn": -1, "leaf": -1});
            let account = |key: &KeyPair, limits: Value| {
                encode(
                    claims(
                        &operator,
                        &key.public_key(),
                        json!({"limits": limits, "type": "account", "version": 2}),
                    ),
                    &operator,
                )
            };
            let mut jetstream = unlimited.clone();
            for limit in ["mem_storage", "disk_storage", "streams", "consumer"] {
                jetstream[limit] = json!(-1);
            }
            let system_key = KeyPair::new_account();
            Self {
                jwt,
                account: account_key.public_key(),
                account_jwt: account(&account_key, jetstream),
                system: system_key.public_key(),
                system_jwt: account(&system_key, unlimited),
                account_key,
            }
        }

        /// A `.creds` file's content for a new user of the account: its JWT
        /// signed by the account, or by `forged_by` instead.
        pub fn user_creds(&self, forged_by: Option<&KeyPair>) -> String {
            let user = KeyPair::new_user();
            let signer = forged_by.unwrap_or(&self.account_key);
            let claims = claims(
                signer,
                &user.public_key(),
                json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                       "type": "user", "version": 2}),
            );
            let jwt = encode(claims, signer);
            format!(
                "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
                 ************************* IMPORTANT *************************\n\
                 NKEY Seed printed below can be used to sign and prove identity.\n\n\
                 -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                user.seed().unwrap()
            )
        }
    }
}

#[tokio::test]
async fn creds_file_of_an_account_user_is_accepted_and_a_forged_one_is_refused() {
    let operator = jwt::Operator::new();
    let dir = tempfile::tempdir().unwrap();
    let operator_file = dir.path().join("operator.jwt");
    std::fs::write(&operator_file, &operator.jwt).unwrap();
    let (server, _conf_dir) = server(&format!(
        "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\n\
         resolver_preload: {{ {}: \"{}\", {}: \"{}\" }}\n",
        operator_file.display(),
        operator.system,
        operator.account,
        operator.account_jwt,
        operator.system,
        operator.system_jwt,
    ));
    let creds = |name: &str, content: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        Auth::Creds { creds_file: path }
    };

    assert_works(&config(
        &server,
        creds("user.creds", operator.user_creds(None)),
    ))
    .await;

    // Signed by a key that is not the account's: refused.
    let impostor = nkeys::KeyPair::new_account();
    let forged = creds("forged.creds", operator.user_creds(Some(&impostor)));
    assert_refused(&config(&server, forged), &[]).await;
    assert_refused(&config(&server, Auth::None), &[]).await;
}
