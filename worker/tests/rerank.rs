//! Rerank jobs end to end through a real nats-server, on the random-weight
//! cross-encoder fixture `worker/tests/fixtures/models/cross-encoder`
//! (`BertForSequenceClassification`, hidden 32, 2 layers, one label, 64
//! positions), whose reference logits transformers computed on the same
//! weights (`scripts/fixtures/make_models.py`); the same cases on the
//! XLM-RoBERTa fixture `xlm-roberta-cross-encoder`
//! (`XLMRobertaForSequenceClassification`: no pooler, `classifier.dense` +
//! tanh + `out_proj` on `<s>`, pairs `<s> A </s></s> B </s>`, random weights
//! and a small trained Unigram tokenizer); and the typed errors of bad
//! rerank jobs. The embedding fixture `bert-cls` stands in for a worker that
//! serves embeddings only.

use crate::common;

use std::time::Duration;

use common::golden::*;
use common::*;
use futures::StreamExt;
use jetinfer_bert::Matmul;
use jetinfer_nats::testing::NatsServer;
use jetinfer_schemas::{decode_result, ErrorCode, Job, JobOptions, Truncation};
use jetinfer_worker::config::{BackendKind, BatchConfig, ForwardKind, WorkerConfig};
use jetinfer_worker::load_backend;

/// The model name the test workers serve.
const MODEL: &str = "minilm";

fn rerank_config(server: &NatsServer, matmul: Matmul) -> WorkerConfig {
    let mut config = worker_config(
        server,
        BackendKind::Candle,
        BatchConfig {
            max_inputs: 8,
            max_tokens: 512,
            max_wait: Duration::from_millis(20),
        },
    );
    config.model.path = fixture("cross-encoder");
    config.model.forward = ForwardKind::Packed;
    config.model.matmul = matmul;
    config.limits.max_documents_per_rerank = 6;
    config
}

/// Product kinds this CPU has for the packed forward.
/// (`auto` included: for a classifier it must pick an f32-accurate kind.)
/// Plain bf16 products are refused for a classifier, and tested so below.
fn products() -> Vec<Matmul> {
    if Matmul::amx_available() {
        vec![Matmul::Auto, Matmul::F32, Matmul::AmxBf16x3]
    } else {
        eprintln!("this CPU or kernel offers no AMX: AMX products not checked");
        vec![Matmul::Auto, Matmul::F32]
    }
}

/// The plain bf16 kinds this CPU runs.
fn bf16_products() -> Vec<Matmul> {
    let mut kinds = Vec::new();
    if Matmul::amx_available() {
        kinds.push(Matmul::AmxBf16);
    }
    if Matmul::avx512_bf16_available() {
        kinds.push(Matmul::Avx512Bf16);
    }
    if kinds.is_empty() {
        eprintln!("this CPU offers no bf16 products: their refusal not checked");
    }
    kinds
}

#[test]
fn a_cross_encoder_refuses_plain_bf16_products_naming_the_accurate_ones() {
    let server = NatsServer::start();
    for matmul in bf16_products() {
        let config = rerank_config(&server, matmul);
        let err = load_backend(&config.model)
            .err()
            .unwrap_or_else(|| panic!("{matmul:?}: a cross-encoder loaded with bf16 products"))
            .to_string();
        assert!(
            err.contains(matmul.name()) && err.contains("f32") && err.contains("rerank"),
            "{matmul:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_scores_match_transformers_reference_in_the_same_order() {
    for matmul in products() {
        let server = NatsServer::start();
        let config = rerank_config(&server, matmul);
        assert_reranks_like_the_reference(&server, config, &format!("packed {matmul:?}")).await;
    }
}

/// The forward that runs on CUDA (candle's `BertModel` with the
/// classification head on top), here on the CPU in f32: the same scores and
/// order as the packed forward's, within the same bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_on_the_candle_forward_matches_the_reference_in_the_same_order() {
    let server = NatsServer::start();
    let mut config = rerank_config(&server, Matmul::Auto);
    config.model.forward = ForwardKind::Candle;
    let backend = load_backend(&config.model).expect("cross-encoder loads on candle");
    assert!(
        backend.pads_batches(),
        "the candle forward pads its batches"
    );
    assert_reranks_like_the_reference(&server, config, "candle f32").await;
}

/// Serves the cross-encoder with `config`, sends every reference case at
/// once (so pairs of several jobs share batches) and a `top_n` job, and
/// checks scores and order against transformers'.
async fn assert_reranks_like_the_reference(server: &NatsServer, config: WorkerConfig, label: &str) {
    let want = rerank_reference();
    let backend = load_backend(&config.model).expect("cross-encoder loads");
    assert_eq!(backend.max_seq_len(), want.max_length);
    assert_eq!(backend.info().dimension, 1);
    let worker = start_worker(config, backend).await;
    let client = client(server).await;

    let jobs: Vec<Job> = want
        .cases
        .iter()
        .map(|c| Job::rerank(MODEL, &c.query, c.documents.clone(), None))
        .collect();
    let results: Vec<_> = client.submit_many(jobs, want.cases.len()).collect().await;
    let mut shared = 0;
    for ((_, result), case) in results.into_iter().zip(&want.cases) {
        let got = result
            .expect("submitted")
            .into_reranked()
            .expect("reranked");
        case.assert_matches(&got, label);
        shared += usize::from(got.timings.batch_size as usize > case.documents.len());
    }
    assert!(
        shared > 0,
        "{label}: no rerank job shared a batch with another job"
    );

    // top_n: the best n of the same order.
    let case = &want.cases[0];
    let top = client
        .rerank(MODEL, &case.query, case.documents.clone(), Some(2))
        .await
        .expect("submitted")
        .into_reranked()
        .expect("reranked");
    let order: Vec<u32> = top.results.iter().map(|s| s.index).collect();
    assert_eq!(order, case.order()[..2], "{label}");
    assert_eq!(top.token_counts.len(), case.documents.len(), "{label}");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xlm_roberta_rerank_scores_match_transformers_reference_in_the_same_order() {
    let name = "xlm-roberta-cross-encoder";
    let want = rerank_reference_of(name);
    for matmul in products() {
        let server = NatsServer::start();
        let mut config = rerank_config(&server, matmul);
        config.model.path = fixture(name);
        let backend = load_backend(&config.model).expect("XLM-R cross-encoder loads");
        assert_eq!(backend.max_seq_len(), want.max_length);
        assert_eq!(backend.info().dimension, 1);
        let worker = start_worker(config, backend).await;
        let client = client(&server).await;

        let jobs: Vec<Job> = want
            .cases
            .iter()
            .map(|c| Job::rerank(MODEL, &c.query, c.documents.clone(), None))
            .collect();
        let results: Vec<_> = client.submit_many(jobs, want.cases.len()).collect().await;
        for ((_, result), case) in results.into_iter().zip(&want.cases) {
            let got = result
                .expect("submitted")
                .into_reranked()
                .expect("reranked");
            case.assert_matches(&got, &format!("{name} {matmul:?}"));
        }

        // 60 query tokens ("rain" is two pieces here) and XLM-R's four
        // special tokens leave no room in 64 positions (BERT's three would).
        let long_query = vec!["rain"; 30].join(" ");
        let long = client
            .rerank(MODEL, &long_query, vec!["warm sun".into()], None)
            .await
            .expect("submitted")
            .into_reranked()
            .unwrap_err();
        assert_eq!(long.code, ErrorCode::InputTooLong, "{}", long.message);
        worker.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rerank_jobs_get_typed_error_replies_and_the_worker_keeps_serving() {
    let server = NatsServer::start();
    let config = rerank_config(&server, Matmul::F32);
    let backend = load_backend(&config.model).expect("cross-encoder loads");
    let worker = start_worker(config, backend).await;
    let client = client(&server).await;
    let code = |result: Result<jetinfer_schemas::JobResult, _>| {
        result.expect("submitted").into_reranked().unwrap_err().code
    };

    let none = client.rerank(MODEL, "cold rain", vec![], None).await;
    assert_eq!(code(none), ErrorCode::InvalidInput, "no documents");

    let seven = vec!["warm sun".to_string(); 7];
    let many = client.rerank(MODEL, "cold rain", seven, None).await;
    assert_eq!(code(many), ErrorCode::TooManyInputs, "7 documents, limit 6");

    // 61 query tokens + [CLS] [SEP] [SEP] leave no room in 64 positions.
    let long_query = vec!["rain"; 61].join(" ");
    let long = client
        .rerank(MODEL, &long_query, vec!["warm sun".into()], None)
        .await;
    assert_eq!(
        code(long),
        ErrorCode::InputTooLong,
        "query past the model's length"
    );

    let long_document = vec!["water"; 80].join(" ");
    let rejected = client
        .submit(
            Job::rerank(MODEL, "cold rain", vec![long_document], None).with_options(JobOptions {
                truncation: Truncation::Reject,
                ..JobOptions::default()
            }),
        )
        .await;
    assert_eq!(
        code(rejected),
        ErrorCode::InputTooLong,
        "pair past the length, reject asked"
    );

    let zero = client
        .rerank(MODEL, "cold rain", vec!["warm sun".into()], Some(0))
        .await;
    assert_eq!(code(zero), ErrorCode::InvalidInput, "top_n 0");

    let embed = client
        .submit(Job::new(MODEL, vec!["cold rain".into()]))
        .await;
    let error = embed.expect("submitted").into_result().unwrap_err();
    assert_eq!(
        error.code,
        ErrorCode::UnsupportedTask,
        "an embed job for a cross-encoder"
    );

    // A task no version knows, as a newer producer would write it.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let reply = "results.default.raw-unknown-task";
    let mut replies = nats.subscribe(reply).await.unwrap();
    let job = serde_json::json!({
        "version": 2, "id": "classify-1", "model": MODEL, "task": "classify",
        "inputs": ["warm sun"], "rerank": {"query": "cold rain"},
    });
    let js = async_nats::jetstream::new(nats.clone());
    let tenant = jetinfer_nats::subjects::Tenant::new("default").unwrap();
    let subject = jetinfer_nats::subjects::job(MODEL, &tenant).unwrap();
    publish_raw(
        &js,
        &subject,
        Some(reply),
        "classify-1",
        rmp_serde::to_vec_named(&job).unwrap(),
    )
    .await;
    let answer = tokio::time::timeout(Duration::from_secs(30), replies.next())
        .await
        .expect("an answer within 30 s")
        .expect("subscription open");
    let answer = decode_result(&answer.payload).unwrap();
    assert_eq!(answer.job_id, "classify-1");
    assert_eq!(
        answer.into_reranked().unwrap_err().code,
        ErrorCode::UnsupportedTask
    );

    // Nothing above cost the worker its service.
    let ok = client
        .rerank(
            MODEL,
            "cold rain",
            vec!["warm sun".into(), "cold water and rain".into()],
            None,
        )
        .await
        .expect("submitted")
        .into_reranked()
        .expect("still reranking");
    assert_eq!(ok.results.len(), 2);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedding_worker_answers_a_rerank_job_unsupported_task() {
    let server = NatsServer::start();
    let mut config = worker_config(&server, BackendKind::Candle, BatchConfig::default());
    config.model.path = fixture("bert-cls");
    let backend = load_backend(&config.model).expect("embedding fixture loads");
    let worker = start_worker(config, backend).await;
    let client = client(&server).await;
    let result = client
        .rerank(MODEL, "cold rain", vec!["warm sun".into()], None)
        .await
        .expect("submitted");
    assert_eq!(
        result.into_reranked().unwrap_err().code,
        ErrorCode::UnsupportedTask
    );
    let embedded = client
        .submit(Job::new(MODEL, vec!["cold rain".into()]))
        .await
        .expect("submitted")
        .into_result()
        .expect("embeddings");
    assert_eq!(embedded.embeddings[0].len(), 32);
    worker.shutdown().await;
}

#[test]
fn a_cross_encoder_on_candle_refuses_half_precision_naming_f32() {
    use jetinfer_worker::config::Dtype;
    let server = NatsServer::start();
    for dtype in [Dtype::F16, Dtype::Bf16] {
        let mut config = rerank_config(&server, Matmul::Auto);
        config.model.forward = ForwardKind::Candle;
        config.model.dtype = dtype;
        let err = load_backend(&config.model)
            .err()
            .unwrap_or_else(|| panic!("{dtype:?}: a cross-encoder loaded in half precision"))
            .to_string();
        assert!(
            err.contains(dtype.name()) && err.contains("f32") && err.contains("rerank"),
            "{dtype:?}: {err}"
        );
    }
}
