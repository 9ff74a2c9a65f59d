//! Hostile tenants against the shipped tenancy design (issue 15: F2, F3, F4,
//! F8, F9, F10), on real nats-server processes started from the shipped
//! configuration (`deploy/nats/nats-secure.conf` and the accounts
//! `deploy/nats/render-accounts.sh` writes): two tenants, acme and globex,
//! each in an account of its own, a worker and an operator in JETINFER.
//! acme is the attacker; each test asserts what globex and the workers see.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use jetinfer_nats::{PublishJobError, StreamSettings, Tenant};
use jetinfer_producer::{Client, ClientConfig, SubmitError};
use jetinfer_schemas::{encode_job, headers, Job};
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::config::{BackendKind, BatchConfig, WorkerConfig};
use jetinfer_worker::Worker;

use common::secured::{Observed, Secured};

const PATIENCE: Duration = Duration::from_secs(30);

fn tenant(name: &str) -> Tenant {
    Tenant::new(name).unwrap()
}

async fn worker(secured: &Secured, configure: impl FnOnce(&mut WorkerConfig)) -> Worker {
    let mut config = secured.worker_config(BackendKind::Echo, BatchConfig::default());
    configure(&mut config);
    common::start_worker(config, Arc::new(EchoBackend::new(256, Duration::ZERO))).await
}

/// Messages stored on each subject of `stream` matching `filter`, as the
/// operator sees them.
async fn stored(ops: &Observed, stream: &str, filter: &str) -> Vec<(String, usize)> {
    let stream = ops.js.get_stream(stream).await.unwrap();
    let mut subjects: Vec<(String, usize)> = stream
        .info_with_subjects(filter)
        .await
        .unwrap()
        .map(|s| s.unwrap())
        .collect()
        .await;
    subjects.sort();
    subjects
}

/// `client`'s job of one `text` is answered with embeddings.
async fn assert_served(client: &Client, text: &str) {
    let result = client
        .submit(Job::new("minilm", vec![text.into()]))
        .await
        .expect("the job is answered");
    assert!(result.into_result().is_ok(), "embeddings for {text:?}");
}

/// No message arrives on `sub` for a second.
async fn nothing_arrives(sub: &mut async_nats::Subscriber, what: &str) {
    let got = tokio::time::timeout(Duration::from_secs(1), sub.next()).await;
    assert!(!matches!(got, Ok(Some(_))), "{what}: {got:?}");
}

/// F2: a job publish's NATS reply subject (where JetStream sends the PubAck)
/// aimed at another tenant's inbox, its job subject, or its cancel notices.
/// The PubAck comes back through the server's reply mapping into acme's own
/// account, whatever acme named: globex receives nothing, no job, dead
/// letter or cancel notice appears under globex.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_a_pubacks_reply_subject_cannot_reach_another_tenant_or_the_workers() {
    let secured = Secured::start();
    let worker = worker(&secured, |_| {}).await;
    let globex_client = secured.client("globex", PATIENCE).await;
    let _acme_client = secured.client("acme", PATIENCE).await;
    let acme = secured.connect("acme").await;
    let globex = secured.connect("globex").await;
    let ops = secured.connect("ops").await;
    let mut globex_inbox = globex.client.subscribe("results.globex.>").await.unwrap();
    globex.js.query_account().await.unwrap();

    let aims = [
        "results.globex.client7",
        "jobs.minilm.globex",
        "cancels.globex",
        "dlq.minilm.globex",
        "$JS.API.STREAM.DELETE.JETINFER_JOBS",
    ];
    for (n, aim) in aims.iter().enumerate() {
        let job = Job::new("minilm", vec![format!("aimed {n}")]);
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, job.id.as_str());
        h.insert(headers::REPLY_TO, "results.acme.f2");
        acme.client
            .publish_with_reply_and_headers(
                "jobs.minilm.acme",
                aim.to_string(),
                h,
                encode_job(&job).into(),
            )
            .await
            .unwrap();
    }
    acme.client.flush().await.unwrap();
    acme.js.query_account().await.unwrap();

    nothing_arrives(&mut globex_inbox, "a PubAck reached globex's inbox").await;
    let mut jobs = ops.js.get_stream("JETINFER_JOBS").await.unwrap();
    assert_eq!(
        common::settled_state(&mut jobs, "worker-minilm").await,
        (0, 0),
        "acme's jobs answered"
    );
    assert!(stored(&ops, "JETINFER_JOBS", "jobs.*.globex")
        .await
        .is_empty());
    assert!(stored(&ops, "JETINFER_DLQ", "dlq.*.globex")
        .await
        .is_empty());
    assert!(stored(&ops, "JETINFER_CANCELS", "cancels.globex")
        .await
        .is_empty());
    assert!(ops.js.get_stream("JETINFER_JOBS").await.is_ok());
    // globex still works.
    assert_served(&globex_client, "calm").await;
    worker.shutdown().await;
}

/// F3: jobs for models no worker serves. The jobs stream listens only on
/// served models, so each such publish is refused at once and nothing is
/// stored; acme at its quota for the served model does not refuse globex.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f3_jobs_for_models_no_worker_serves_are_refused_and_never_stored() {
    const QUOTA: i64 = 5;
    let secured = Secured::start();
    let worker_js = secured.connect("worker").await;
    // The queue as a worker provisions it, with nobody consuming, so jobs stay.
    let settings = StreamSettings {
        max_jobs_per_tenant: QUOTA,
        max_messages: 4 * QUOTA,
        ..StreamSettings::default()
    };
    let stream = jetinfer_nats::provision_stream(&worker_js.js, &settings, "minilm")
        .await
        .unwrap();
    jetinfer_nats::provision_consumer(&stream, "minilm", &Default::default())
        .await
        .unwrap();
    let acme = secured.connect("acme").await;
    let globex = secured.connect("globex").await;
    let ops = secured.connect("ops").await;

    for n in 0..10 {
        let refused = jetinfer_nats::publish_job(
            &acme.js,
            &tenant("acme"),
            &Job::new(format!("fake{n}"), vec!["x".into()]),
            "results.acme.f3",
        )
        .await;
        assert!(
            matches!(refused, Err(PublishJobError::NoStream)),
            "fake{n}: {refused:?}"
        );
    }
    let client = secured.client("acme", PATIENCE).await;
    let err = client
        .submit(Job::new("fake0", vec!["x".into()]))
        .await
        .expect_err("refused");
    assert!(
        matches!(err, SubmitError::UnknownModel(ref m) if m == "fake0"),
        "{err}"
    );
    assert!(
        stored(&ops, "JETINFER_JOBS", ">").await.is_empty(),
        "nothing stored for made-up models"
    );

    // acme fills its own quota for the served model; globex is still accepted.
    let mut refused_at = None;
    for n in 0..(2 * QUOTA) {
        let published = jetinfer_nats::publish_job(
            &acme.js,
            &tenant("acme"),
            &Job::new("minilm", vec![format!("flood {n}")]),
            "results.acme.f3",
        )
        .await;
        if let Err(err) = published {
            assert!(
                matches!(err, PublishJobError::QuotaExceeded { .. }),
                "{err}"
            );
            refused_at.get_or_insert(n);
        }
    }
    assert_eq!(refused_at, Some(QUOTA), "acme refused past its quota");
    jetinfer_nats::publish_job(
        &globex.js,
        &tenant("globex"),
        &Job::new("minilm", vec!["calm".into()]),
        "results.globex.f3",
    )
    .await
    .expect("globex's job is accepted while acme is at its quota");
    assert_eq!(
        stored(&ops, "JETINFER_JOBS", ">").await,
        vec![
            ("jobs.minilm.acme".to_string(), QUOTA as usize),
            ("jobs.minilm.globex".to_string(), 1)
        ]
    );
}

/// F4: acme publishes, first, jobs whose `Nats-Msg-Id`s are the ids globex
/// is about to use (bare, and with made-up tags). JetStream de-duplicates
/// per stream, but the id it sees is keyed by a secret of globex's
/// producer: globex's jobs are stored, not taken for duplicates, and each
/// is answered to globex.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f4_one_tenants_message_ids_cannot_deduplicate_another_tenants_jobs() {
    let secured = Secured::start();
    let worker = worker(&secured, |_| {}).await;
    let _acme_client = secured.client("acme", PATIENCE).await;
    let acme = secured.connect("acme").await;
    let ids: Vec<String> = (1..=3).map(|n| format!("nightly:doc-{n}")).collect();
    for id in &ids {
        for squatted in [id.clone(), format!("{id}~{}", "0".repeat(32))] {
            let job = Job::new("minilm", vec!["squat".into()]).with_id(id.as_str());
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::MSG_ID, squatted.as_str());
            h.insert(headers::REPLY_TO, "results.acme.f4");
            acme.js
                .publish_with_headers("jobs.minilm.acme", h, encode_job(&job).into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }

    let globex = secured.client("globex", PATIENCE).await;
    for id in &ids {
        let result = tokio::time::timeout(
            PATIENCE,
            globex.submit(Job::new("minilm", vec![format!("globex {id}")]).with_id(id.as_str())),
        )
        .await
        .expect("globex's job is answered, not swallowed as a duplicate")
        .unwrap();
        assert_eq!(&result.job_id, id);
        let embeddings = result.into_result().expect("globex's own embeddings");
        let expected = {
            let mut v = EchoBackend::new(256, Duration::ZERO).expected(&format!("globex {id}"));
            jetinfer_worker::backend::l2_normalize(&mut v);
            v
        };
        assert_eq!(
            embeddings.embeddings,
            vec![expected],
            "computed from globex's input"
        );
    }
    worker.shutdown().await;
}

/// F8: a tenant asks JetStream what exists. In its own account it finds
/// only its own streams and subjects: none of the workers' streams, no
/// other tenant's inboxes or run ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f8_a_tenant_sees_no_subject_of_another_tenant_or_of_the_workers() {
    let secured = Secured::start();
    let worker = worker(&secured, |_| {}).await;
    let globex = secured.client("globex", PATIENCE).await;
    globex
        .submit(Job::new("minilm", vec!["secret".into()]))
        .await
        .unwrap();
    let globex_js = secured.connect("globex").await;
    jetinfer_nats::bulk::ensure_bucket(&globex_js.js, Duration::from_secs(3600), 1)
        .await
        .unwrap();
    let kv = jetinfer_nats::bulk::bucket(&globex_js.js).await.unwrap();
    kv.put("run.globex.secretrun", "{}".into()).await.unwrap();
    let _acme_client = secured.client("acme", PATIENCE).await;
    let acme = secured.connect("acme").await;

    // The workers' streams do not exist for acme, filter or not.
    let request = serde_json::json!({"subjects_filter": ">"}).to_string();
    for name in ["JETINFER_JOBS", "JETINFER_DLQ", "JETINFER_CANCELS"] {
        let answer = acme
            .client
            .request(
                format!("$JS.API.STREAM.INFO.{name}"),
                request.clone().into(),
            )
            .await
            .expect("acme's own JetStream API answers");
        let text = String::from_utf8_lossy(&answer.payload);
        assert!(text.contains("stream not found"), "{name}: {text}");
    }
    // What acme can list is its own.
    let names: Vec<String> = acme.js.stream_names().map(|n| n.unwrap()).collect().await;
    assert_eq!(names, vec!["JETINFER_RESULTS".to_string()], "{names:?}");
    let results = acme.js.get_stream("JETINFER_RESULTS").await.unwrap();
    let seen: Vec<(String, usize)> = results
        .info_with_subjects(">")
        .await
        .unwrap()
        .map(|s| s.unwrap())
        .collect()
        .await;
    assert!(seen.is_empty(), "acme sees subjects: {seen:?}");
    worker.shutdown().await;
}

/// F9: consumers a tenant makes stay in its own account, within its
/// account's limit, and a push consumer cannot deliver into the workers' or
/// another tenant's subjects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f9_consumers_a_tenant_makes_stay_in_its_account_and_within_its_limit() {
    const MAX_CONSUMERS: usize = 8;
    let limit = MAX_CONSUMERS.to_string();
    let secured = Secured::start_rendered(
        &["acme", "globex"],
        &[],
        &[("JETINFER_TENANT_MAX_CONSUMERS", limit.as_str())],
    );
    let worker = worker(&secured, |_| {}).await;
    let globex_client = secured.client("globex", PATIENCE).await;
    let acme_client = secured.client("acme", PATIENCE).await;
    let acme = secured.connect("acme").await;
    let ops = secured.connect("ops").await;
    let results = acme.js.get_stream("JETINFER_RESULTS").await.unwrap();

    let mut made = 0;
    for n in 0..(4 * MAX_CONSUMERS) {
        let created = results
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(format!("hoard{n}")),
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => made += 1,
            Err(err) => {
                assert!(err.to_string().contains("maximum consumers"), "{err}");
                break;
            }
        }
    }
    assert!(made <= MAX_CONSUMERS, "{made} consumers made");
    // The workers' account keeps its own room: a worker of another model
    // still makes its consumer.
    let other = worker_with_model(&secured, "e5").await;

    // Push consumers aimed at the workers' jobs and another tenant's cancel
    // notices deliver inside acme's account only.
    for (n, deliver) in ["jobs.minilm.globex", "cancels.globex", "jobs.minilm.acme"]
        .iter()
        .enumerate()
    {
        let _ = results.delete_consumer(&format!("hoard{n}")).await;
        let _ = results
            .create_consumer(jetstream::consumer::push::Config {
                durable_name: Some(format!("push{n}")),
                deliver_subject: deliver.to_string(),
                ..Default::default()
            })
            .await;
    }
    // Something for them to deliver: a result stored in acme's stream.
    acme_client
        .submit(Job::new("minilm", vec!["fodder".into()]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(stored(&ops, "JETINFER_JOBS", "jobs.*.globex")
        .await
        .is_empty());
    assert!(stored(&ops, "JETINFER_CANCELS", "cancels.globex")
        .await
        .is_empty());
    assert_served(&globex_client, "calm").await;
    other.shutdown().await;
    worker.shutdown().await;
}

async fn worker_with_model(secured: &Secured, model: &str) -> Worker {
    let model = model.to_string();
    worker(secured, move |c| c.model.name = model).await
}

/// F10: storage. A tenant's results and bulk records are in its own account
/// and stop at its account's limit; its dead letters and cancel notices in
/// the workers' account stop at a per-tenant count; globex keeps writing
/// and keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f10_a_tenants_storage_is_bounded_and_never_takes_another_tenants() {
    const LETTERS: i64 = 5;
    let secured = Secured::start_rendered(
        &["acme", "globex"],
        &[],
        &[("JETINFER_TENANT_MAX_FILE", "1M")],
    );
    let worker = worker(&secured, |c| c.stream.max_dead_letters_per_tenant = LETTERS).await;
    let globex_client = secured.client("globex", PATIENCE).await;
    let _acme_client = secured.client("acme", PATIENCE).await;
    let acme = secured.connect("acme").await;
    let globex = secured.connect("globex").await;
    let ops = secured.connect("ops").await;

    // acme's own bucket: 64 kB values until its account is full.
    let kv = jetinfer_nats::bulk::ensure_bucket(&acme.js, Duration::from_secs(3600), 1)
        .await
        .expect("acme makes its bucket");
    let value = bytes::Bytes::from(vec![b'x'; 15 * 1024]);
    let mut refused = None;
    for n in 0..200 {
        if let Err(err) = kv.put(format!("run.acme.r{n}"), value.clone()).await {
            refused = Some(err.to_string());
            break;
        }
    }
    let refused = refused.expect("acme's account refuses past its limit");
    assert!(refused.contains("resource limits exceeded"), "{refused}");
    // globex's account is untouched by acme's.
    let globex_kv = jetinfer_nats::bulk::ensure_bucket(&globex.js, Duration::from_secs(3600), 1)
        .await
        .unwrap();
    globex_kv
        .put("run.globex.r1", value.clone())
        .await
        .expect("globex still writes");

    // Dead letters: globex has one; acme sends many bad jobs.
    publish_bad(&globex, "globex", "g-bad").await;
    for n in 0..(3 * LETTERS) {
        publish_bad(&acme, "acme", &format!("a-bad-{n}")).await;
    }
    let mut jobs = ops.js.get_stream("JETINFER_JOBS").await.unwrap();
    assert_eq!(
        common::settled_state(&mut jobs, "worker-minilm").await,
        (0, 0)
    );
    let letters = stored(&ops, "JETINFER_DLQ", ">").await;
    assert_eq!(
        letters,
        vec![
            ("dlq.minilm.acme".to_string(), LETTERS as usize),
            ("dlq.minilm.globex".to_string(), 1)
        ]
    );

    // Cancel notices: acme floods its own subject; globex's stays.
    let globex_tenant = tenant("globex");
    jetinfer_nats::bulk::cancel(&globex.js, &globex_kv, &globex_tenant, "keep")
        .await
        .expect("globex cancels its run");
    for n in 0..(jetinfer_nats::bulk::MAX_CANCELS_PER_TENANT + 50) {
        acme.js
            .publish("cancels.acme", format!("r{n}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert_eq!(
        stored(&ops, "JETINFER_CANCELS", ">").await,
        vec![
            (
                "cancels.acme".to_string(),
                jetinfer_nats::bulk::MAX_CANCELS_PER_TENANT as usize
            ),
            ("cancels.globex".to_string(), 1)
        ]
    );
    assert_served(&globex_client, "calm").await;
    worker.shutdown().await;
}

async fn publish_bad(conn: &Observed, tenant: &str, id: &str) {
    common::publish_raw(
        &conn.js,
        &format!("jobs.minilm.{tenant}"),
        Some(&format!("results.{tenant}.bad")),
        id,
        b"\x00not msgpack".to_vec(),
    )
    .await;
}

/// Tenants come and go by rendering the accounts again. A removed tenant is
/// cut off by a reload (SIGHUP). A new account's users are taken by a
/// reload, but its imports of the workers' services are not wired until the
/// server restarts (nats-server 2.15.1: its jobs find no stream), so adding
/// a tenant is a render and a (rolling) restart of the servers. Either way
/// the running worker is not restarted: it reconnects, and answers the new
/// tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_added_and_removed_by_a_reload_while_workers_keep_serving() {
    let secured = Secured::start_rendered(&["acme", "globex"], &["initech"], &[]);
    let worker = worker(&secured, |_| {}).await;
    let acme = secured.client("acme", PATIENCE).await;
    assert!(
        jetinfer_nats::connect(&secured.nats("initech"))
            .await
            .is_err(),
        "initech is not a tenant yet"
    );

    secured.render(&["acme", "globex", "initech"], &[]);
    let mut secured = secured;
    secured.server.restart_gracefully();
    let initech = connect_when_allowed(&secured, "initech").await;
    let mut answered = None;
    for _ in 0..50 {
        match initech
            .submit(Job::new("minilm", vec!["new tenant".into()]))
            .await
        {
            Ok(result) => {
                answered = Some(result);
                break;
            }
            // The worker may not have reconnected yet.
            Err(SubmitError::UnknownModel(_)) | Err(SubmitError::Publish(_)) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("initech's job: {err}"),
        }
    }
    let answered = answered.expect("the running worker answers the new tenant");
    assert!(answered.into_result().is_ok());

    secured.render(&["acme", "initech"], &[]);
    let mut gone = false;
    for _ in 0..50 {
        if jetinfer_nats::connect(&secured.nats("globex"))
            .await
            .is_err()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "globex still connects after its removal");
    for client in [&acme, &initech] {
        assert_served(client, "still here").await;
    }
    worker.shutdown().await;
}

/// The server reads a reload in the background: connect once it has.
async fn connect_when_allowed(secured: &Secured, tenant: &str) -> Client {
    let mut last = None;
    for _ in 0..50 {
        let attempt = Client::connect(ClientConfig {
            nats: jetinfer_nats::NatsConfig {
                startup_retry_for: Duration::ZERO,
                ..secured.nats(tenant)
            },
            tenant: tenant.into(),
            timeout: PATIENCE,
            ..ClientConfig::default()
        })
        .await;
        match attempt {
            Ok(client) => return client,
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{tenant} cannot connect after the reload: {last:?}\n{}",
        secured
            .server
            .log()
            .lines()
            .filter(|l| l.contains("ERR") || l.contains("WRN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
