//! One worker serving several models (`[[models]]`) through a real
//! nats-server: all-MiniLM-L6-v2 (embeddings, against sentence-transformers'
//! golden file) beside the random-weight cross-encoder fixture (rerank,
//! against transformers' logits on the same weights), both checked in one
//! run while each model's jobs are in flight together; each model in
//! `/metrics` (with the task it does), the Services API and the jobs stream's subjects (what the
//! gateway's `/v1/models` lists); a model that fails to load failing
//! start-up with its name, before anything is provisioned; the drain
//! answering what every model holds; `--print-config` showing each model
//! complete with what it inherited.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jetinfer_nats::testing::NatsServer;
use jetinfer_schemas::Job;
use jetinfer_worker::config::{
    BackendKind, BatchConfig, ForwardKind, ModelConfig, ServedModel, WorkerConfig,
};
use jetinfer_worker::http::{Health, HttpServer};
use jetinfer_worker::{Worker, WorkerError};

use common::golden::*;
use common::observe::http_request;
use common::*;

const EMBED: &str = "minilm";
const RERANK: &str = "rerank";

/// `name` served from `path`, every other setting `[model]`'s default.
fn served(name: &str, path: std::path::PathBuf, batch: BatchConfig) -> ServedModel {
    ServedModel {
        model: ModelConfig {
            name: name.into(),
            path,
            ..ModelConfig::default()
        },
        batch,
    }
}

/// The label sets of metric `name`'s series in a Prometheus text page
/// (label values here never hold a quote or a comma).
fn series(page: &str, name: &str) -> Vec<BTreeMap<String, String>> {
    page.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .map(|rest| {
            let labels = &rest[..rest.rfind('}').expect("a closed label set")];
            labels
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect()
        })
        .collect()
}

fn two_models(server: &NatsServer) -> WorkerConfig {
    let batch = BatchConfig {
        max_inputs: 8,
        max_tokens: 1024,
        max_wait: Duration::from_millis(20),
    };
    let mut rerank = served(RERANK, fixture("cross-encoder"), batch);
    rerank.model.forward = ForwardKind::Packed;
    // rerank.rs holds the fixture's logits to f32 products (its nearly tied
    // logits are ordered differently in bf16); MiniLM runs `auto`.
    rerank.model.matmul = jetinfer_bert::Matmul::F32;
    WorkerConfig {
        nats: nats_config(server),
        models: vec![served(EMBED, model_dir(), batch), rerank],
        ..WorkerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_embeddings_and_reranks_both_matching_their_references() {
    let golden = golden();
    let reranks = rerank_reference();
    let server = NatsServer::start();
    let health = Health::default();
    let http = HttpServer::start("127.0.0.1:0".parse().unwrap(), health.clone())
        .await
        .unwrap();
    // The builder loads both models itself, as the binary does.
    let worker = Worker::builder(two_models(&server))
        .health(health.clone())
        .start()
        .await
        .expect("both models load and the worker starts");
    assert!(health.not_ready().is_empty(), "{:?}", health.not_ready());
    let client = client(&server).await;

    // Both models' jobs in flight at once: two queues, two batchers.
    let embed_jobs: Vec<Job> = golden
        .texts
        .iter()
        .map(|t| Job::new(EMBED, vec![t.clone()]))
        .collect();
    let rerank_jobs: Vec<Job> = reranks
        .cases
        .iter()
        .map(|c| Job::rerank(RERANK, &c.query, c.documents.clone(), None))
        .collect();
    let (embedded, reranked) = tokio::join!(
        client
            .submit_many(embed_jobs, golden.texts.len())
            .collect::<Vec<_>>(),
        client
            .submit_many(rerank_jobs, reranks.cases.len())
            .collect::<Vec<_>>(),
    );
    assert_eq!(embedded.len(), golden.texts.len());
    for ((_, result), (text, want)) in embedded
        .into_iter()
        .zip(golden.texts.iter().zip(&golden.embeddings))
    {
        let result = result.expect("submitted").into_result().expect("embedded");
        let dir = model_dir();
        assert_eq!(
            Some(result.model.id.as_str()),
            dir.file_name().and_then(|n| n.to_str())
        );
        assert_matches(text, &result.embeddings[0], want);
    }
    assert_eq!(reranked.len(), reranks.cases.len());
    for ((_, result), case) in reranked.into_iter().zip(&reranks.cases) {
        let got = result
            .expect("submitted")
            .into_reranked()
            .expect("reranked");
        case.assert_matches(&got, RERANK);
    }

    // The jobs stream listens on both models' subjects: what the gateway's
    // catalogue (`models::Catalog`) reads for `/v1/models`.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let mut stream = js.get_stream("JETINFER_JOBS").await.unwrap();
    let subjects: BTreeSet<String> = stream
        .info()
        .await
        .unwrap()
        .config
        .subjects
        .iter()
        .cloned()
        .collect();
    assert!(
        subjects.contains("jobs.minilm.*") && subjects.contains("jobs.rerank.*"),
        "{subjects:?}"
    );
    for model in [EMBED, RERANK] {
        let consumer = format!("worker-{model}");
        assert_eq!(
            settled_state(&mut stream, &consumer).await,
            (0, 0),
            "{consumer} has every job settled"
        );
    }

    // The Services API: one instance per model, each with its metadata.
    let nc = async_nats::connect(server.url()).await.unwrap();
    let inbox = nc.new_inbox();
    let mut replies = nc.subscribe(inbox.clone()).await.unwrap();
    nc.publish_with_reply("$SRV.INFO.jetinfer-worker", inbox, "".into())
        .await
        .unwrap();
    let mut announced = BTreeSet::new();
    let asked = Instant::now();
    while announced.len() < 2 && asked.elapsed() < Duration::from_secs(10) {
        let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(1), replies.next()).await
        else {
            continue;
        };
        let info: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        let metadata = &info["metadata"];
        assert_eq!(metadata["batch_max_inputs"], "8", "{info}");
        announced.insert(metadata["model"].as_str().unwrap().to_string());
    }
    assert_eq!(
        announced,
        BTreeSet::from([EMBED.to_string(), RERANK.to_string()])
    );

    // /metrics: every model under its own label, and the task each does
    // beside it: jobs, inputs and latencies of the reranker read `rerank`,
    // the embedding model's `embed`, and no model shows the other's task.
    let metrics = http_request(&http.local_addr.to_string(), "/metrics", "")
        .await
        .unwrap()
        .body;
    let want = BTreeSet::from([
        (EMBED.to_string(), "embed".to_string()),
        (RERANK.to_string(), "rerank".to_string()),
    ]);
    for name in [
        "jetinfer_model_loaded",
        "jetinfer_jobs_received_total",
        "jetinfer_jobs_finished_total",
        "jetinfer_inputs_total",
        "jetinfer_tokens_total",
        "jetinfer_job_end_to_end_seconds_count",
        "jetinfer_job_queue_wait_seconds_count",
        "jetinfer_batch_inference_seconds_count",
    ] {
        // The recorder is the process's: other tests' models show too.
        let tasks: BTreeSet<(String, String)> = series(&metrics, name)
            .into_iter()
            .filter(|labels| [EMBED, RERANK].contains(&labels["model"].as_str()))
            .map(|mut labels| {
                let task = labels.remove("task").unwrap_or_default();
                (labels["model"].clone(), task)
            })
            .collect();
        assert_eq!(tasks, want, "{name}: (model, task) in /metrics");
    }
    worker.shutdown().await;
    http.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_fails_start_up_naming_it_before_any_queue_is_made() {
    let server = NatsServer::start();
    let mut config = two_models(&server);
    config.models[0].model.backend = BackendKind::Echo;
    config.models[1] = served(
        "broken",
        "/nonexistent/model".into(),
        BatchConfig::default(),
    );
    let err = Worker::builder(config)
        .start()
        .await
        .err()
        .expect("start-up fails");
    assert!(
        matches!(&err, WorkerError::Load { model, .. } if model == "broken"),
        "{err}"
    );
    assert!(
        err.to_string().contains("broken") && err.to_string().contains("/nonexistent/model"),
        "{err}"
    );
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    assert!(
        js.get_stream("JETINFER_JOBS").await.is_err(),
        "nothing provisioned for a worker that could not load its models"
    );
}

/// Two echo models at `delay` per token, under their own names.
fn two_echo_models(server: &NatsServer) -> WorkerConfig {
    let batch = BatchConfig {
        max_inputs: 4,
        ..BatchConfig::default()
    };
    let mut config = WorkerConfig {
        nats: nats_config(server),
        models: vec![
            served("slow-a", model_dir(), batch),
            served("slow-b", model_dir(), batch),
        ],
        ..WorkerConfig::default()
    };
    for served in &mut config.models {
        served.model.backend = BackendKind::Echo;
        // 4 inputs of about 4 tokens: some 30 ms a batch per model, so
        // both models still hold jobs when the drain starts.
        served.model.echo_delay_per_token_us = 2_000;
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_answers_the_jobs_every_model_holds() {
    const JOBS: usize = 40;
    let server = NatsServer::start();
    let mut worker = Worker::builder(two_echo_models(&server))
        .start()
        .await
        .expect("worker starts");
    let client = client(&server).await;
    // Each model's results, with when they arrived.
    let submit = |model: &'static str| {
        let client = client.clone();
        tokio::spawn(async move {
            let jobs: Vec<Job> = (0..JOBS)
                .map(|i| Job::new(model, vec![format!("text {i}")]))
                .collect();
            client
                .submit_many(jobs, JOBS)
                .map(|(_, result)| (Instant::now(), result))
                .collect::<Vec<_>>()
                .await
        })
    };
    let (a, b) = (submit("slow-a"), submit("slow-b"));

    // Both models hold jobs: delivered to this worker and not yet acked.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let held = |model: &str| {
        let js = js.clone();
        let consumer = format!("worker-{model}");
        async move {
            let stream = js.get_stream("JETINFER_JOBS").await.unwrap();
            stream
                .consumer_info(consumer)
                .await
                .unwrap()
                .num_ack_pending
        }
    };
    let waiting = Instant::now();
    while (held("slow-a").await == 0 || held("slow-b").await == 0)
        && waiting.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        held("slow-a").await > 0 && held("slow-b").await > 0,
        "both models hold jobs"
    );

    let draining = Instant::now();
    worker.shutdown_token().cancel();
    worker.join().await;
    let drained = Instant::now();
    assert_eq!(worker.jobs_in_hand(), 0, "every model's ledger is empty");

    // A second worker answers what the first handed back or never pulled.
    let second = Worker::builder(two_echo_models(&server))
        .start()
        .await
        .expect("second worker starts");
    for (model, results) in [("slow-a", a), ("slow-b", b)] {
        let results = tokio::time::timeout(Duration::from_secs(60), results)
            .await
            .expect("every job answered in time")
            .unwrap();
        assert_eq!(results.len(), JOBS, "{model}");
        let in_drain = results
            .iter()
            .filter(|(at, _)| *at >= draining && *at <= drained)
            .count();
        assert!(in_drain > 0, "{model}: the drain answered jobs it held");
        for (_, result) in results {
            result.expect("submitted").into_result().expect("embedded");
        }
    }
    second.shutdown().await;
}

/// `jetinfer-worker --print-config` with `toml` as its config file.
fn print_config(toml: &str) -> serde_json::Value {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, toml.as_bytes()).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_jetinfer-worker"))
        .arg("--print-config")
        .arg("--config")
        .arg(file.path())
        .env_remove("JETINFER_CONFIG")
        .output()
        .expect("jetinfer-worker runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the dump is JSON")
}

#[test]
fn print_config_shows_every_model_complete_with_what_it_inherited() {
    let dump = print_config(
        r#"
        [model]
        forward = "packed"
        [batch]
        max_inputs = 8

        [[models]]
        name = "minilm"
        path = "/models/minilm"

        [[models]]
        name = "rerank"
        path = "/models/cross-encoder"
        batch = { max_tokens = 512 }
        "#,
    );
    let models = dump["models"].as_array().expect("models listed");
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["name"], "minilm");
    assert_eq!(models[0]["path"], "/models/minilm");
    assert_eq!(models[1]["name"], "rerank");
    for model in models {
        assert_eq!(model["forward"], "packed", "inherited from [model]");
        assert_eq!(model["batch"]["max_inputs"], 8, "inherited from [batch]");
    }
    assert_eq!(models[0]["batch"]["max_tokens"], 2048);
    assert_eq!(models[1]["batch"]["max_tokens"], 512);

    // A config of today's single-model keys shows its one model the same way.
    let dump = print_config("[model]\nname = \"e5\"\n[batch]\nmax_inputs = 4\n");
    let models = dump["models"].as_array().expect("models listed");
    assert_eq!(models.len(), 1);
    assert_eq!(models[0]["name"], "e5");
    assert_eq!(models[0]["batch"]["max_inputs"], 4);
}
