//! The Batch API library (`jetinfer_producer::batches`) end to end: a real
//! nats-server, a real worker in this process (echo backend for the
//! lifecycle, candle with all-MiniLM-L6-v2 against the golden file), files
//! in the object store and batches driven by the runner, restarted
//! mid-batch, cancelled mid-batch, and under the shipped secure config for
//! tenant isolation.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jetinfer_nats::testing::NatsServer;
use jetinfer_producer::batches::{
    Batch, BatchError, BatchStatus, Batches, BatchesConfig, EMBEDDINGS_ENDPOINT,
};
use jetinfer_producer::ClientConfig;
use jetinfer_worker::backend::echo::{EchoBackend, ECHO_MAX_SEQ_LEN};
use jetinfer_worker::config::{BackendKind, BatchConfig};
use jetinfer_worker::{load_backend, Worker};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use common::secured::Secured;
use common::*;

/// Longest a batch is waited for in these tests.
const BATCH_WAIT: Duration = Duration::from_secs(120);

fn client_config(server: &NatsServer) -> ClientConfig {
    ClientConfig {
        nats: nats_config(server),
        ..ClientConfig::default()
    }
}

fn batches_config(dir: &tempfile::TempDir, in_flight: usize) -> BatchesConfig {
    BatchesConfig {
        in_flight,
        work_dir: dir.path().to_path_buf(),
        ..BatchesConfig::default()
    }
}

async fn echo_worker(server: &NatsServer, delay_per_token: Duration) -> Worker {
    let mut config = worker_config(server, BackendKind::Echo, BatchConfig::default());
    config.model.backend = BackendKind::Echo;
    let backend = Arc::new(EchoBackend::new(ECHO_MAX_SEQ_LEN, delay_per_token));
    start_worker(config, backend).await
}

fn text(i: usize) -> String {
    format!("request number {i} about topic {} and more", i % 31)
}

fn request(custom_id: &str, body: Value) -> String {
    format!(
        "{}\n",
        json!({"custom_id": custom_id, "method": "POST", "url": EMBEDDINGS_ENDPOINT, "body": body})
    )
}

fn requests(n: usize) -> String {
    (0..n)
        .map(|i| {
            request(
                &format!("req-{i}"),
                json!({"model": "minilm", "input": text(i)}),
            )
        })
        .collect()
}

/// The unit vector the echo backend gives for `text`.
fn expected(text: &str) -> Vec<f32> {
    let mut v = EchoBackend::default().expected(text);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

async fn upload(batches: &Batches, body: String) -> String {
    batches
        .create_file("input.jsonl", "batch", body.as_bytes())
        .await
        .expect("the input file is stored")
        .id
}

async fn start_batch(batches: &Batches, file: &str) -> Batch {
    let metadata = BTreeMap::from([("job".to_string(), "nightly".to_string())]);
    batches
        .create_batch(file, EMBEDDINGS_ENDPOINT, "24h", Some(metadata))
        .await
        .expect("the batch is created")
}

/// Polls batch `id` until `done` holds, at most [`BATCH_WAIT`].
async fn wait_for(batches: &Batches, id: &str, what: &str, done: impl Fn(&Batch) -> bool) -> Batch {
    let started = Instant::now();
    loop {
        let batch = batches.batch(id).await.expect("the batch is readable");
        if done(&batch) {
            return batch;
        }
        assert!(
            started.elapsed() < BATCH_WAIT,
            "batch not {what} within {BATCH_WAIT:?}: {batch:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn content(batches: &Batches, id: &str) -> Vec<Value> {
    let mut reader = batches
        .file_content(id)
        .await
        .expect("the file is readable");
    let mut text = String::new();
    reader.read_to_string(&mut text).await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

/// Output lines by `custom_id`, asserting each appears once.
fn by_custom_id(lines: &[Value]) -> HashMap<String, Value> {
    let mut seen = HashMap::new();
    for line in lines {
        let id = line["custom_id"].as_str().expect("a custom_id").to_string();
        assert!(
            seen.insert(id.clone(), line.clone()).is_none(),
            "custom_id {id} twice in the output"
        );
    }
    seen
}

fn embedding_of(line: &Value, index: usize) -> Vec<f32> {
    line["response"]["body"]["data"][index]["embedding"]
        .as_array()
        .expect("a float embedding")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_from_file_to_output_with_each_custom_id_once_and_bad_lines_in_the_error_file()
{
    const GOOD: usize = 300;
    let server = NatsServer::start();
    let worker = echo_worker(&server, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let batches = Batches::open(&client_config(&server), batches_config(&dir, 64))
        .await
        .expect("the Batch API opens");
    let _runner = batches.runner();

    let mut body = requests(GOOD);
    body.push_str(&request(
        "b64",
        json!({"model": "minilm", "input": ["alpha", "beta"], "encoding_format": "base64", "dimensions": 4}),
    ));
    body.push_str("{not json\n");
    body.push_str(&request("no-input", json!({"model": "minilm"})));
    body.push_str(
        &request("chat", json!({"model": "minilm", "input": "x"}))
            .replace(EMBEDDINGS_ENDPOINT, "/v1/chat/completions"),
    );
    body.push_str(&request(
        "too-wide",
        json!({"model": "minilm", "input": "x", "dimensions": 100_000}),
    ));
    // Wider than the echo model's 8: the worker refuses the job, as it
    // refuses the same request to /v1/embeddings.
    body.push_str(&request(
        "wider",
        json!({"model": "minilm", "input": "x", "dimensions": 9}),
    ));
    let file = batches
        .create_file("input.jsonl", "batch", body.as_bytes())
        .await
        .expect("the input file is stored");
    assert_eq!(file.object, "file");
    assert_eq!(file.bytes, body.len() as u64);
    assert_eq!(file.purpose, "batch");
    assert_eq!(batches.file(&file.id).await.unwrap(), file);

    let created = start_batch(&batches, &file.id).await;
    assert_eq!(created.status, BatchStatus::Validating);
    let shape = serde_json::to_value(&created).unwrap();
    for field in [
        "id",
        "object",
        "endpoint",
        "errors",
        "input_file_id",
        "completion_window",
        "status",
        "output_file_id",
        "error_file_id",
        "created_at",
        "in_progress_at",
        "expires_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
        "request_counts",
        "metadata",
    ] {
        assert!(shape.get(field).is_some(), "the batch object has {field}");
    }
    assert_eq!(shape["object"], "batch");
    assert_eq!(shape["status"], "validating");

    let done = wait_for(&batches, &created.id, "completed", |b| {
        b.status == BatchStatus::Completed
    })
    .await;
    let total = GOOD as u64 + 6;
    assert_eq!(done.request_counts.total, total);
    assert_eq!(done.request_counts.completed, GOOD as u64 + 1);
    assert_eq!(done.request_counts.failed, 5);
    assert!(
        done.in_progress_at.is_some()
            && done.finalizing_at.is_some()
            && done.completed_at.is_some()
    );

    let output = content(
        &batches,
        done.output_file_id.as_deref().expect("an output file"),
    )
    .await;
    let output = by_custom_id(&output);
    assert_eq!(output.len(), GOOD + 1);
    for i in 0..GOOD {
        let line = &output[&format!("req-{i}")];
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(line["response"]["body"]["object"], "list");
        // The model asked for, as /v1/embeddings answers it.
        assert_eq!(line["response"]["body"]["model"], "minilm");
        assert!(
            line["response"]["body"]["usage"]["prompt_tokens"]
                .as_u64()
                .unwrap()
                > 0
        );
        assert!(line["error"].is_null());
        let got = embedding_of(line, 0);
        let want = expected(&text(i));
        assert!(
            cosine(&got, &want) > 0.9999,
            "req-{i}: the echo embedding of its text"
        );
    }
    let b64 = &output["b64"]["response"]["body"]["data"];
    for index in 0..2 {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(
                b64[index]["embedding"]
                    .as_str()
                    .expect("a base64 embedding"),
            )
            .unwrap();
        let v: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(v.len(), 4, "dimensions keeps the first 4");
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "re-normalised");
    }

    let errors = content(
        &batches,
        done.error_file_id.as_deref().expect("an error file"),
    )
    .await;
    assert_eq!(errors.len(), 5, "{errors:?}");
    let errors = by_custom_id(
        &errors
            .into_iter()
            .filter(|l| !l["custom_id"].is_null())
            .collect::<Vec<_>>(),
    );
    assert!(errors["no-input"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("body.input"));
    assert!(errors["chat"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("url"));
    assert_eq!(errors["too-wide"]["error"]["code"], "invalid_request");
    assert_eq!(errors["wider"]["response"]["status_code"], 400);
    assert!(errors["wider"]["response"]["body"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("dimensions"));

    let page = batches.list(None, Some(10)).await.unwrap();
    assert_eq!(page.object, "list");
    assert_eq!(page.data.len(), 1);
    assert_eq!(page.first_id.as_deref(), Some(created.id.as_str()));
    assert!(!page.has_more);
    assert!(batches
        .list(Some(&created.id), None)
        .await
        .unwrap()
        .data
        .is_empty());

    let deleted = batches.delete_file(&file.id).await.unwrap();
    assert!(deleted.deleted);
    assert!(matches!(
        batches.file(&file.id).await,
        Err(BatchError::NotFound { .. })
    ));
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_custom_ids_fail_validation_and_oversized_files_are_refused() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = BatchesConfig {
        max_file_bytes: 4096,
        ..batches_config(&dir, 16)
    };
    let batches = Batches::open(&client_config(&server), config)
        .await
        .unwrap();
    let _runner = batches.runner();

    let mut body = requests(3);
    body.push_str(&request(
        "req-1",
        json!({"model": "minilm", "input": "again"}),
    ));
    let file = upload(&batches, body).await;
    let batch = start_batch(&batches, &file).await;
    let failed = wait_for(&batches, &batch.id, "failed", |b| {
        b.status == BatchStatus::Failed
    })
    .await;
    let errors = failed.errors.expect("validation errors");
    assert_eq!(errors.data.len(), 1);
    assert_eq!(errors.data[0].code, "duplicate_custom_id");
    assert_eq!(errors.data[0].line, Some(4));
    assert!(failed.output_file_id.is_none());

    let big = requests(100);
    assert!(big.len() > 4096);
    let refused = batches
        .create_file("big.jsonl", "batch", big.as_bytes())
        .await;
    assert!(
        matches!(refused, Err(BatchError::TooLarge(_))),
        "{refused:?}"
    );
    let wrong = batches
        .create_file("x.jsonl", "fine-tune", &b"{}"[..])
        .await;
    assert!(matches!(
        wrong,
        Err(BatchError::Invalid {
            param: "purpose",
            ..
        })
    ));
    let window = batches
        .create_batch(&file, EMBEDDINGS_ENDPOINT, "1h", None)
        .await;
    assert!(matches!(
        window,
        Err(BatchError::Invalid {
            param: "completion_window",
            ..
        })
    ));
    let missing = batches.batch("batch_nope").await;
    assert!(matches!(missing, Err(BatchError::NotFound { .. })));
    assert!(matches!(
        batches.cancel(&batch.id).await,
        Err(BatchError::Conflict(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_stops_and_ends_cancelled_with_its_partial_output() {
    const LINES: usize = 2000;
    let server = NatsServer::start();
    let worker = echo_worker(&server, Duration::from_millis(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let batches = Batches::open(&client_config(&server), batches_config(&dir, 32))
        .await
        .unwrap();
    let _runner = batches.runner();
    let file = upload(&batches, requests(LINES)).await;
    let batch = start_batch(&batches, &file).await;
    wait_for(&batches, &batch.id, "partly done", |b| {
        b.request_counts.completed >= 50
    })
    .await;

    let cancelling = batches.cancel(&batch.id).await.expect("cancel is accepted");
    assert!(matches!(
        cancelling.status,
        BatchStatus::Cancelling | BatchStatus::Cancelled
    ));
    let cancelled = wait_for(&batches, &batch.id, "cancelled", |b| {
        b.status == BatchStatus::Cancelled
    })
    .await;
    assert!(cancelled.cancelling_at.is_some() && cancelled.cancelled_at.is_some());
    let counts = cancelled.request_counts;
    assert!(counts.completed >= 50);
    assert!(
        counts.completed + counts.failed < LINES as u64,
        "the cancel stopped submitting: {counts:?}"
    );
    let output = content(
        &batches,
        cancelled.output_file_id.as_deref().expect("partial output"),
    )
    .await;
    assert_eq!(output.len() as u64, counts.completed);
    by_custom_id(&output);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resumed_by_a_new_runner_after_a_restart_has_every_line_exactly_once() {
    const LINES: usize = 3000;
    let server = NatsServer::start();
    let worker = echo_worker(&server, Duration::from_millis(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = client_config(&server);
    // Short, so the new runner takes the dropped one's lease over soon.
    let batches_config = |dir, in_flight| BatchesConfig {
        lease_ttl: Duration::from_secs(2),
        ..batches_config(dir, in_flight)
    };
    let (id, file) = {
        let batches = Batches::open(&config, batches_config(&dir, 64))
            .await
            .unwrap();
        let runner = batches.runner();
        let file = upload(&batches, requests(LINES)).await;
        let batch = start_batch(&batches, &file).await;
        let partly = wait_for(&batches, &batch.id, "partly done", |b| {
            b.request_counts.completed >= 300
        })
        .await;
        assert!(
            partly.request_counts.completed < LINES as u64,
            "stopped before the end"
        );
        // The gateway dies: handle and runner gone mid-batch, its lease
        // left to lapse.
        drop(runner);
        (batch.id, file)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let batches = Batches::open(&config, batches_config(&dir, 64))
        .await
        .unwrap();
    let _runner = batches.runner();
    let done = wait_for(&batches, &id, "completed", |b| {
        b.status == BatchStatus::Completed
    })
    .await;
    assert_eq!(done.input_file_id, file);
    assert_eq!(done.request_counts.total, LINES as u64);
    assert_eq!(done.request_counts.completed, LINES as u64);
    assert_eq!(done.request_counts.failed, 0);
    let output = content(&batches, done.output_file_id.as_deref().unwrap()).await;
    assert_eq!(output.len(), LINES);
    let output = by_custom_id(&output);
    for i in (0..LINES).step_by(97) {
        let got = embedding_of(&output[&format!("req-{i}")], 0);
        assert!(cosine(&got, &expected(&text(i))) > 0.9999);
    }
    assert!(done.error_file_id.is_none());
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_shipped_accounts_one_tenant_cannot_read_another_tenants_files_or_batches() {
    let secured = Secured::start();
    let config = secured.worker_config(BackendKind::Echo, BatchConfig::default());
    let worker = start_worker(config, Arc::new(EchoBackend::new(256, Duration::ZERO))).await;
    let dir = tempfile::tempdir().unwrap();
    let open = |tenant: &str| {
        let config = ClientConfig {
            nats: secured.nats(tenant),
            tenant: tenant.into(),
            ..ClientConfig::default()
        };
        let batches = batches_config(&dir, 16);
        async move { Batches::open(&config, batches).await }
    };
    let acme = open("acme").await.expect("acme opens its Batch API");
    let globex = open("globex").await.expect("globex opens its Batch API");
    let _acme_runner = acme.runner();

    let file = upload(&acme, requests(20)).await;
    let batch = start_batch(&acme, &file).await;
    let done = wait_for(&acme, &batch.id, "completed", |b| {
        b.status == BatchStatus::Completed
    })
    .await;
    let output = done.output_file_id.clone().unwrap();
    assert_eq!(by_custom_id(&content(&acme, &output).await).len(), 20);

    for id in [&file, &output] {
        assert!(
            matches!(globex.file(id).await, Err(BatchError::NotFound { .. })),
            "{id}"
        );
        assert!(matches!(
            globex.file_content(id).await,
            Err(BatchError::NotFound { .. })
        ));
        assert!(matches!(
            globex.delete_file(id).await,
            Err(BatchError::NotFound { .. })
        ));
    }
    assert!(matches!(
        globex.batch(&batch.id).await,
        Err(BatchError::NotFound { .. })
    ));
    assert!(matches!(
        globex.cancel(&batch.id).await,
        Err(BatchError::NotFound { .. })
    ));
    assert!(globex.list(None, None).await.unwrap().data.is_empty());
    assert!(acme.file(&file).await.is_ok(), "acme still has its file");
    assert_eq!(
        secured.violations(),
        Vec::<String>::new(),
        "nothing refused on the way"
    );
    worker.shutdown().await;
}

#[derive(serde::Deserialize)]
struct Golden {
    texts: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minilm_batch_output_matches_the_golden_embeddings() {
    let golden: Golden = serde_json::from_str(
        &std::fs::read_to_string(shared_data().join("minilm_golden.json")).expect("golden file"),
    )
    .unwrap();
    let server = NatsServer::start();
    let config = worker_config(&server, BackendKind::Candle, BatchConfig::default());
    let backend = load_backend(&config.model).expect("model loads");
    let worker = start_worker(config, backend).await;
    let dir = tempfile::tempdir().unwrap();
    let batches = Batches::open(&client_config(&server), batches_config(&dir, 64))
        .await
        .unwrap();
    let _runner = batches.runner();
    let body: String = golden
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| request(&format!("g-{i}"), json!({"model": "minilm", "input": t})))
        .collect();
    let file = upload(&batches, body).await;
    let batch = start_batch(&batches, &file).await;
    let done = wait_for(&batches, &batch.id, "completed", |b| {
        b.status == BatchStatus::Completed
    })
    .await;
    let output = by_custom_id(&content(&batches, done.output_file_id.as_deref().unwrap()).await);
    // OpenAI refuses an empty input string; the golden file has one.
    let empty: Vec<usize> = (0..golden.texts.len())
        .filter(|&i| golden.texts[i].is_empty())
        .collect();
    assert_eq!(output.len(), golden.texts.len() - empty.len());
    let errors = by_custom_id(&content(&batches, done.error_file_id.as_deref().unwrap()).await);
    for i in &empty {
        assert!(
            errors.contains_key(&format!("g-{i}")),
            "the empty input is an error line"
        );
    }
    let mut lowest = 1.0f32;
    for (i, want) in golden.embeddings.iter().enumerate() {
        if empty.contains(&i) {
            continue;
        }
        let got = embedding_of(&output[&format!("g-{i}")], 0);
        let cos = cosine(&got, want);
        assert!(cos >= 0.9999, "g-{i}: cosine {cos} to the golden embedding");
        lowest = lowest.min(cos);
    }
    eprintln!("lowest cosine of a batch output line to the golden file: {lowest}");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_its_completion_window_ends_expired_without_running() {
    let server = NatsServer::start();
    let worker = echo_worker(&server, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let batches = Batches::open(&client_config(&server), batches_config(&dir, 16))
        .await
        .unwrap();
    let file = upload(&batches, requests(50)).await;
    let batch = start_batch(&batches, &file).await;
    // Its 24 h window passed while no runner ran: the record says so.
    let js =
        async_nats::jetstream::new(jetinfer_nats::connect(&nats_config(&server)).await.unwrap());
    let records = js.get_key_value("JETINFER_BATCHES").await.unwrap();
    let key = format!("default.{}", batch.id);
    let mut stale = batch.clone();
    stale.expires_at = Some(batch.created_at - 1);
    records
        .put(&key, serde_json::to_vec(&stale).unwrap().into())
        .await
        .unwrap();

    let _runner = batches.runner();
    let expired = wait_for(&batches, &batch.id, "expired", |b| {
        b.status == BatchStatus::Expired
    })
    .await;
    assert!(expired.expired_at.is_some());
    assert_eq!(expired.request_counts.completed, 0, "nothing was run");
    assert!(expired.output_file_id.is_none());
    worker.shutdown().await;
}
