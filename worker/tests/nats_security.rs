//! The shipped NATS configs (`deploy/nats/nats-secure.conf`, `nats-tls.conf`,
//! both with `accounts.conf`) on a real nats-server, loaded as shipped: only
//! the users' public NKeys (from the environment, as in production), the
//! port and the store directory come from the test.
//!
//! Tenants are in accounts of their own, so most of what a tenant must not
//! do is simply not there for it: the workers' streams and subjects do not
//! exist in its account. Those tests observe the outcome (nothing stored,
//! nothing delivered, the API answering "not found"); a worker's and an
//! operator's limits inside the workers' account are permissions, and each
//! refusal there is observed as the server's permissions violation. And a
//! real worker and producer complete jobs under the same config with no
//! violation at all, so the permissions are not too tight either.
//! The hostile-tenant attacks are in `hostile_accounts.rs`.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jetinfer_nats::testing::{plain_text_session, NatsServer, TestPki};
use jetinfer_nats::{
    dead_letter, results, Auth, ConnectError, ConsumerSettings, NatsConfig, StreamSettings, Tenant,
    TlsConfig,
};
use jetinfer_producer::{bulk, Client, ClientConfig};
use jetinfer_schemas::{decode_result, encode_result, ErrorCode, Job, JobResult};
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::config::{BackendKind, BatchConfig};

use common::secured::{seed_path, Observed, Secured};
use common::*;

/// Streams and the minilm consumer, provisioned the way a worker does it,
/// as the worker role; and each tenant's own results stream, the way its
/// producer makes it.
async fn provision(secured: &Secured, worker: &Observed) {
    let stream = jetinfer_nats::provision_stream(&worker.js, &StreamSettings::default(), "minilm")
        .await
        .expect("worker provisions the jobs stream");
    jetinfer_nats::provision_consumer(&stream, "minilm", &ConsumerSettings::default())
        .await
        .expect("worker provisions its consumer");
    dead_letter::provision(&worker.js, 1)
        .await
        .expect("worker provisions the dead-letter stream");
    for tenant in ["acme", "globex"] {
        secured.provision_tenant(tenant).await;
    }
}

async fn jobs_stored(ops: &Observed) -> u64 {
    let mut stream = ops.js.get_stream("JETINFER_JOBS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// No message arrives on `sub` within a second.
async fn nothing_arrives(sub: &mut async_nats::Subscriber) {
    let got = tokio::time::timeout(Duration::from_secs(1), sub.next()).await;
    assert!(
        !matches!(got, Ok(Some(_))),
        "a message was delivered: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_producer_complete_jobs_under_the_shipped_permissions() {
    let secured = Secured::start();
    let mut config = secured.worker_config(BackendKind::Echo, BatchConfig::default());
    // Queue-depth reads run often, so a refused one would show below.
    config.monitoring.queue_poll = Duration::from_millis(100);
    let worker = start_worker(config, Arc::new(EchoBackend::new(256, Duration::ZERO))).await;

    let since = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    let client = Client::connect(ClientConfig {
        nats: secured.nats("acme"),
        tenant: "acme".into(),
        timeout: Duration::from_secs(30),
        ..ClientConfig::default()
    })
    .await
    .expect("acme's producer connects");
    for text in ["first", "second"] {
        let result = client
            .submit(Job::new("minilm", vec![text.into()]))
            .await
            .expect("job answered");
        let embeddings = result.into_result().expect("embeddings, not an error");
        assert_eq!(embeddings.embeddings.len(), 1);
    }

    // The producer's catch-up path (after a reconnect) reads its results
    // back from JETINFER_RESULTS.
    let acme = secured.connect("acme").await;
    let stored = results::since(&acme.js, client.inbox(), since)
        .await
        .expect("acme reads its own stored results");
    assert_eq!(stored.len(), 2, "both results stored for catching up");

    // A bad job: typed error reply, dead letter, which the ops role can list.
    let mut replies = acme.client.subscribe("results.acme.raw").await.unwrap();
    publish_raw(
        &acme.js,
        "jobs.minilm.acme",
        Some("results.acme.raw"),
        "garbage-1",
        b"\x00\xffnot msgpack".to_vec(),
    )
    .await;
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("error reply arrives")
        .unwrap();
    let reply: JobResult = decode_result(&reply.payload).unwrap();
    assert_eq!(
        reply.into_result().unwrap_err().code,
        ErrorCode::InvalidInput
    );
    let ops = secured.connect("ops").await;
    let letters = dead_letter::list(&ops.js, 10)
        .await
        .expect("ops lists dead letters");
    assert!(
        letters.iter().any(|l| l.job_id == "garbage-1"),
        "dead letter stored"
    );

    // A bulk run of acme's, its status, and its cancellation.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: String = (0..20)
        .map(|i| format!("{{\"custom_id\":\"doc-{i}\",\"text\":\"text {i}\"}}\n"))
        .collect();
    std::fs::write(&input, lines).unwrap();
    let acme_config = ClientConfig {
        nats: secured.nats("acme"),
        tenant: "acme".into(),
        timeout: Duration::from_secs(30),
        ..ClientConfig::default()
    };
    let summary = bulk::submit(
        &acme_config,
        bulk::SubmitOptions {
            input,
            output: dir.path().join("out.jsonl"),
            errors: None,
            run_id: None,
            model: "minilm".into(),
            in_flight: 8,
            progress: bulk::ProgressMode::Off,
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "acme's bulk run completes: {e}; {:#?}",
            secured.violations()
        )
    });
    assert_eq!((summary.ok, summary.failed), (20, 0));
    let status = bulk::status(&acme_config, &summary.run)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "acme reads its run's status: {e}; {:#?}",
                secured.violations()
            )
        });
    assert_eq!(status.done, 20);
    let cancelled = bulk::cancel(&acme_config, &summary.run)
        .await
        .unwrap_or_else(|e| panic!("acme cancels its own run: {e}; {:#?}", secured.violations()));
    assert!(cancelled.cancelled);

    // Ops reads the queue: everything settled. And finds the worker through
    // the NATS Services API, which the worker answers.
    let mut stream = ops.js.get_stream("JETINFER_JOBS").await.unwrap();
    assert_eq!(settled_state(&mut stream, "worker-minilm").await, (0, 0));
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    let pong = ops
        .client
        .request("$SRV.PING.jetinfer-worker", "".into())
        .await
        .expect("the worker answers a Services API ping");
    assert!(String::from_utf8_lossy(&pong.payload).contains("jetinfer-worker"));

    worker.shutdown().await;
    let violations = secured.violations();
    assert!(
        violations.is_empty(),
        "the shipped permissions refused something jetinfer needs: {violations:#?}"
    );
    for role in [&acme, &ops] {
        assert!(role.errors.lock().unwrap().is_empty());
    }
}

#[tokio::test]
async fn unauthenticated_and_unknown_clients_are_refused() {
    let secured = Secured::start();
    let anonymous = NatsConfig {
        auth: Auth::None,
        ..secured.nats("acme")
    };
    let err = jetinfer_nats::connect(&anonymous)
        .await
        .map(|_| ())
        .expect_err("refused");
    assert!(matches!(err, ConnectError::Refused { .. }), "{err}");

    // A well-formed NKey the server does not know.
    let stranger = nkeys::KeyPair::new_user();
    std::fs::write(
        seed_path(secured.seeds.path(), "stranger"),
        stranger.seed().unwrap(),
    )
    .unwrap();
    let unknown = NatsConfig {
        auth: Auth::Nkey {
            seed_file: seed_path(secured.seeds.path(), "stranger"),
        },
        ..secured.nats("acme")
    };
    let err = jetinfer_nats::connect(&unknown)
        .await
        .map(|_| ())
        .expect_err("refused");
    assert!(matches!(err, ConnectError::Refused { .. }), "{err}");
}

#[tokio::test]
async fn a_producer_cannot_consume_jobs_or_submit_for_another_tenant() {
    let secured = Secured::start();
    let worker = secured.connect("worker").await;
    provision(&secured, &worker).await;
    let ops = secured.connect("ops").await;
    let acme = secured.connect("acme").await;

    // Its own tenant's job is stored (and stays queued: no worker runs).
    jetinfer_nats::publish_job(
        &acme.js,
        &Tenant::new("acme").unwrap(),
        &Job::new("minilm", vec!["mine".into()]),
        "results.acme.c1",
    )
    .await
    .expect("acme submits for acme");
    assert_eq!(jobs_stored(&ops).await, 1);

    // Another tenant's subject leads nowhere from acme's account: refused
    // (no stream answers), nothing stored.
    let refused = jetinfer_nats::publish_job(
        &acme.js,
        &Tenant::new("globex").unwrap(),
        &Job::new("minilm", vec!["not mine".into()]),
        "results.acme.c1",
    )
    .await;
    assert!(
        matches!(refused, Err(jetinfer_nats::PublishJobError::NoStream)),
        "published as globex: {refused:?}"
    );
    assert_eq!(jobs_stored(&ops).await, 1);

    // Reading jobs: a live subscription sees nothing (jobs are not in its
    // account), the jobs stream and the workers' consumer do not exist for
    // it, and a pull request gets the API's "not found".
    let mut sneaky = acme.client.subscribe("jobs.>").await.unwrap();
    assert!(
        acme.js.get_stream("JETINFER_JOBS").await.is_err(),
        "acme sees the jobs stream"
    );
    let pull = "$JS.API.CONSUMER.MSG.NEXT.JETINFER_JOBS.worker-minilm";
    let pulled = tokio::time::timeout(
        Duration::from_secs(2),
        acme.client
            .request(pull, r#"{"batch":1,"no_wait":true}"#.into()),
    )
    .await;
    if let Ok(Ok(answer)) = &pulled {
        assert!(
            answer.payload.is_empty() && answer.headers.is_some(),
            "acme pulled a job: {answer:?}"
        );
    }
    nothing_arrives(&mut sneaky).await;

    // The job is still there, undelivered, for a worker.
    let stream = ops.js.get_stream("JETINFER_JOBS").await.unwrap();
    let info = stream.consumer_info("worker-minilm").await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (1, 0));
    assert_eq!(jobs_stored(&ops).await, 1);
}

#[tokio::test]
async fn a_producer_cannot_read_another_tenants_results() {
    let secured = Secured::start();
    let worker = secured.connect("worker").await;
    provision(&secured, &worker).await;
    let acme = secured.connect("acme").await;
    let globex = secured.connect("globex").await;
    let mut acme_sees = acme.client.subscribe("results.acme.>").await.unwrap();
    let mut globex_wildcard = globex.client.subscribe("results.>").await.unwrap();
    let mut globex_all = globex.client.subscribe(">").await.unwrap();
    // The subscriptions are in place at the server before the result comes:
    // a request on the same connection is answered only after the server
    // has read the subscription before it.
    acme.js.query_account().await.unwrap();
    globex.js.query_account().await.unwrap();

    // A worker stores a result for acme: into acme's own results stream.
    let result = JobResult::error(
        "j1".into(),
        jetinfer_schemas::JobError::new(ErrorCode::Internal, "x"),
    );
    results::publish(
        &worker.client,
        &worker.js,
        "results.acme.c1",
        encode_result(&result).into(),
    )
    .await
    .expect("worker stores acme's result");
    let delivered = tokio::time::timeout(Duration::from_secs(5), acme_sees.next())
        .await
        .expect("acme receives its result")
        .unwrap();
    assert_eq!(delivered.subject.as_str(), "results.acme.c1");
    nothing_arrives(&mut globex_wildcard).await;
    // On `>` globex sees only its own account's JetStream traffic.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(seen)) = tokio::time::timeout_at(deadline, globex_all.next()).await {
        let own = seen.subject.starts_with("$JS.") || seen.subject.starts_with("_INBOX_globex.");
        assert!(own, "globex saw {:?}", seen.subject);
    }

    // Nor from the results stream: globex's own holds nothing of acme's.
    let epoch = time::OffsetDateTime::UNIX_EPOCH;
    let seen = results::since(&globex.js, "results.acme.c1", epoch)
        .await
        .expect("globex reads its own results stream");
    assert!(seen.is_empty(), "globex read acme's results: {seen:?}");
    // acme reads it back from its own.
    let own = results::since(&acme.js, "results.acme.c1", epoch)
        .await
        .unwrap();
    assert_eq!(own.len(), 1);

    // Nor can globex cancel acme's bulk runs: its cancel notices can only
    // be its own (the import names globex), and acme's bucket is not there.
    let stored = globex
        .js
        .publish("cancels.acme", "r1".into())
        .await
        .unwrap()
        .await;
    assert!(stored.is_err(), "globex announced a cancel as acme");
    assert!(
        jetinfer_nats::bulk::bucket(&globex.js).await.is_err()
            || jetinfer_nats::bulk::get_record(
                &jetinfer_nats::bulk::bucket(&globex.js).await.unwrap(),
                &Tenant::new("acme").unwrap(),
                "r1"
            )
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        secured.violations().is_empty(),
        "{:?}",
        secured.violations()
    );
}

#[tokio::test]
async fn a_worker_cannot_publish_jobs_or_use_the_jetstream_api_beyond_its_needs() {
    let secured = Secured::start();
    let worker = secured.connect("worker").await;
    provision(&secured, &worker).await;
    let ops = secured.connect("ops").await;

    // Enqueue work (e.g. a result's reply subject pointed at jobs.>).
    worker
        .client
        .publish("jobs.minilm.acme", "injected".into())
        .await
        .unwrap();
    worker.client.flush().await.unwrap();
    worker.violation("jobs.minilm.acme").await;
    assert_eq!(jobs_stored(&ops).await, 0);

    // Destroy or bypass the queue through the JetStream API.
    assert!(worker.js.delete_stream("JETINFER_JOBS").await.is_err());
    worker
        .violation("$JS.API.STREAM.DELETE.JETINFER_JOBS")
        .await;
    for (subject, body) in [
        ("$JS.API.STREAM.PURGE.JETINFER_JOBS", "{}"),
        ("$JS.API.STREAM.PURGE.JETINFER_DLQ", "{}"),
        ("$JS.API.CONSUMER.DELETE.JETINFER_JOBS.worker-minilm", ""),
        (
            "$JS.API.STREAM.CREATE.SHADOW",
            r#"{"name":"SHADOW","subjects":["shadow.>"]}"#,
        ),
    ] {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            worker.client.request(subject, body.into()),
        )
        .await;
        assert!(
            !matches!(answer, Ok(Ok(_))),
            "{subject} answered: {answer:?}"
        );
        worker.violation(subject).await;
    }
    // Read tenants' results or others' replies.
    let _results = worker.client.subscribe("results.>").await.unwrap();
    worker.violation("results.>").await;
    let _inboxes = worker.client.subscribe("_INBOX.>").await.unwrap();
    worker.violation("_INBOX.>").await;

    // All still there.
    let stream = ops
        .js
        .get_stream("JETINFER_JOBS")
        .await
        .expect("jobs stream kept");
    assert!(
        stream.consumer_info("worker-minilm").await.is_ok(),
        "consumer kept"
    );
    let names: Vec<String> = ops
        .js
        .stream_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(!names.contains(&"SHADOW".to_string()), "{names:?}");
}

#[tokio::test]
async fn ops_reads_queue_state_and_changes_nothing() {
    let secured = Secured::start();
    let worker = secured.connect("worker").await;
    provision(&secured, &worker).await;
    let ops = secured.connect("ops").await;

    let stream = ops
        .js
        .get_stream("JETINFER_JOBS")
        .await
        .expect("stream info");
    let info = stream
        .consumer_info("worker-minilm")
        .await
        .expect("consumer info");
    assert_eq!(info.num_pending, 0);

    assert!(jetinfer_nats::publish_job(
        &ops.js,
        &Tenant::new("acme").unwrap(),
        &Job::new("minilm", vec!["x".into()]),
        "results.acme.c1",
    )
    .await
    .is_err());
    ops.violation("jobs.minilm.acme").await;
    assert!(ops.js.delete_stream("JETINFER_DLQ").await.is_err());
    ops.violation("$JS.API.STREAM.DELETE.JETINFER_DLQ").await;
    assert!(ops.js.get_stream("JETINFER_DLQ").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_variant_serves_mutual_tls_clients_and_refuses_the_rest() {
    let pki = TestPki::generate();
    let dir = tempfile::tempdir().unwrap();
    let secured = Secured::start_tls(&pki, dir.path());

    // Certificate and NKey: a worker provisions and a producer submits.
    let worker = secured.connect("worker").await;
    provision(&secured, &worker).await;
    let acme = secured.connect("acme").await;
    jetinfer_nats::publish_job(
        &acme.js,
        &Tenant::new("acme").unwrap(),
        &Job::new("minilm", vec!["over tls".into()]),
        "results.acme.c1",
    )
    .await
    .expect("acme submits over mutual TLS");

    // Plain text: no service.
    let port = secured.server.port();
    let session = tokio::task::spawn_blocking(move || plain_text_session(port))
        .await
        .unwrap();
    assert!(!session.contains("PONG"), "plain text answered: {session}");

    // The right NKey without a client certificate: refused.
    let no_cert = NatsConfig {
        tls: TlsConfig {
            cert_file: None,
            key_file: None,
            ..secured.tls.clone().unwrap()
        },
        startup_retry_for: Duration::from_secs(2),
        ..secured.nats("acme")
    };
    assert!(jetinfer_nats::connect(&no_cert).await.is_err());
}

/// `jetinfer-worker` configured through `JETINFER_NATS__*` variables.
fn worker_binary(dir: &Path, token: &str) -> std::process::Command {
    let token_file = dir.join("nats-token");
    std::fs::write(&token_file, token).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_jetinfer-worker"));
    cmd.env("JETINFER_NATS__AUTH__KIND", "token")
        .env("JETINFER_NATS__AUTH__TOKEN_FILE", &token_file)
        .env("JETINFER_NATS__TLS__KEY_FILE", dir.join("client-key.pem"))
        .env("JETINFER_NATS__TLS__CERT_FILE", dir.join("client.pem"))
        .env("JETINFER_MODEL__BACKEND", "echo")
        .env("JETINFER_HTTP__ADDR", "127.0.0.1:0")
        .env("JETINFER_NATS__STARTUP_RETRY_FOR", "2");
    cmd
}

#[test]
fn the_config_dump_shows_where_secrets_are_never_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let out = worker_binary(dir.path(), "dump-secret-91d2")
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let dump = String::from_utf8(out.stdout).unwrap();
    let config: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(config["nats"]["auth"]["kind"], "token");
    assert!(
        dump.contains("nats-token") && dump.contains("client-key.pem"),
        "{dump}"
    );
    assert!(!dump.contains("dump-secret-91d2"), "{dump}");
}

#[test]
fn a_refused_worker_says_so_without_showing_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(&conf, "authorization { token: \"server-side-7a7a\" }\n").unwrap();
    let server = NatsServer::start_with_config(&conf, &[]);
    let out = worker_binary(dir.path(), "worker-wrong-3b3b")
        .env("JETINFER_NATS__URLS", format!("[\"{}\"]", server.url()))
        .env_remove("JETINFER_NATS__TLS__KEY_FILE")
        .env_remove("JETINFER_NATS__TLS__CERT_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success(), "worker ran with a wrong token");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(
        !stderr.contains("worker-wrong-3b3b") && !stderr.contains("server-side-7a7a"),
        "{stderr}"
    );
}
