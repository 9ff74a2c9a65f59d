//! `POST /v1/rerank` over curl, against the shipped secure config, a real
//! worker serving the random-weight cross-encoder fixture
//! (`worker/tests/fixtures/models/cross-encoder`, whose reference scores
//! transformers computed) and a second worker serving embeddings (echo):
//! scores within 1e-4 of the reference in its order and equal to
//! `Client::rerank`'s, `top_n`, `return_documents`, TEI's `texts`, usage
//! from the worker's token counts; every refusal OpenAI-shaped with its
//! status (unknown model 404, an embedding model 400 `unsupported_task`, too
//! many documents 413, bad requests 400); and a document costs one input of
//! the caller's rate limit.

use crate::harness;

use std::time::Duration;

use harness::*;
use jetinfer_nats::testing::workspace_root;
use jetinfer_worker::config::{BackendKind, BatchConfig, ForwardKind};
use jetinfer_worker::{load_backend, Worker};
use serde::Deserialize;
use serde_json::json;

/// Largest difference from the reference a score may have.
const TOLERANCE: f32 = 1e-4;
/// The name the cross-encoder worker serves.
const RANKER: &str = "ranker";
/// The name the embedding worker serves.
const EMBEDDER: &str = "embedder";
/// Documents per request, the worker's and the gateway's limit here.
const MAX_DOCUMENTS: usize = 6;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    query: String,
    documents: Vec<String>,
    logits: Vec<f32>,
    scores: Vec<f32>,
    token_counts: Vec<u32>,
}

fn fixture() -> std::path::PathBuf {
    workspace_root().join("worker/tests/fixtures/models/cross-encoder")
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixture().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Document indices by reference logit, best first (the scores, a sigmoid
/// of them, may tie in f32 where the logits do not).
fn reference_order(case: &Case) -> Vec<u32> {
    let mut order: Vec<u32> = (0..case.logits.len() as u32).collect();
    order.sort_by(|&a, &b| case.logits[b as usize].total_cmp(&case.logits[a as usize]));
    order
}

async fn post_rerank(stack: &Stack, key: &str, body: serde_json::Value) -> Reply {
    let file = stack
        .dir
        .path()
        .join(format!("rerank-{}.json", ulid::Ulid::new()));
    std::fs::write(&file, body.to_string()).unwrap();
    let data = format!("@{}", file.display());
    let auth = format!("Authorization: Bearer {key}");
    let url = stack.url("/v1/rerank");
    let reply = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-H",
        &auth,
        "--data-binary",
        &data,
        &url,
    ])
    .await;
    let _ = std::fs::remove_file(&file);
    reply
}

/// `(index, relevance_score)` of a 200 rerank reply, best first.
fn scores(reply: &Reply) -> Vec<(u32, f32)> {
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["object"], "rerank", "{body}");
    assert_eq!(body["model"], RANKER, "{body}");
    body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap() as u32,
                r["relevance_score"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_scores_match_the_reference_and_client_rerank_and_refusals_are_openai_shaped() {
    let stack = Stack::start_with(
        BackendKind::Candle,
        |w| {
            w.model.name = RANKER.into();
            w.model.path = fixture();
            w.model.forward = ForwardKind::Packed;
            // f32 products, as the reference's 1e-4 asks: `auto` may pick
            // bf16 ones (cosine 0.99997, scores about 1e-3 off).
            w.model.matmul = serde_json::from_str("\"f32\"").unwrap();
            w.limits.max_documents_per_rerank = MAX_DOCUMENTS;
        },
        |g| g.limits.max_documents = MAX_DOCUMENTS,
    )
    .await;
    let mut embed_config = stack.secured.worker_config(
        BackendKind::Echo,
        BatchConfig {
            max_inputs: 8,
            max_tokens: 1024,
            max_wait: Duration::from_millis(5),
        },
    );
    embed_config.model.name = EMBEDDER.into();
    let embedder = Worker::start(
        embed_config.clone(),
        load_backend(&embed_config.model).expect("echo loads"),
    )
    .await
    .expect("the embedding worker starts");
    stack.wait_for_model(RANKER).await;
    stack.wait_for_model(EMBEDDER).await;
    let client = stack.secured.client("acme", Duration::from_secs(60)).await;
    let want = reference();

    for case in &want.cases {
        let reply = post_rerank(
            &stack,
            ACME_KEY,
            json!({"model": RANKER, "query": case.query, "documents": case.documents}),
        )
        .await;
        let got = scores(&reply);
        let order: Vec<u32> = got.iter().map(|s| s.0).collect();
        assert_eq!(
            order,
            reference_order(case),
            "{:?}: {got:?}, reference logits {:?}",
            case.query,
            case.logits
        );
        for &(index, score) in &got {
            let reference = case.scores[index as usize];
            assert!(
                (score - reference).abs() < TOLERANCE,
                "{:?} document {index}: {score}, reference {reference}",
                case.query
            );
        }
        let tokens: u64 = case.token_counts.iter().map(|&t| u64::from(t)).sum();
        let usage = &reply.json()["usage"];
        assert_eq!(usage["prompt_tokens"], tokens, "{usage}");
        assert_eq!(usage["total_tokens"], tokens, "{usage}");
        assert!(
            reply.json()["results"][0].get("document").is_none(),
            "no document unless asked"
        );

        let library = client
            .rerank(RANKER, &case.query, case.documents.clone(), None)
            .await
            .expect("submitted")
            .into_reranked()
            .expect("reranked");
        let library: Vec<(u32, f32)> = library.results.iter().map(|s| (s.index, s.score)).collect();
        assert_eq!(
            got.iter().map(|s| s.0).collect::<Vec<_>>(),
            library.iter().map(|s| s.0).collect::<Vec<_>>(),
            "same order as Client::rerank"
        );
        for (http, lib) in got.iter().zip(&library) {
            assert!((http.1 - lib.1).abs() < TOLERANCE, "{http:?} {lib:?}");
        }
    }

    // top_n with return_documents, and TEI's names for the same.
    let case = &want.cases[0];
    let order = reference_order(case);
    for body in [
        json!({"model": RANKER, "query": case.query, "documents": case.documents, "top_n": 2, "return_documents": true}),
        json!({"model": RANKER, "query": case.query, "texts": case.documents, "top_n": 2, "return_text": true}),
    ] {
        let reply = post_rerank(&stack, ACME_KEY, body).await;
        let got = scores(&reply);
        assert_eq!(got.iter().map(|s| s.0).collect::<Vec<_>>(), order[..2]);
        for result in reply.json()["results"].as_array().unwrap() {
            let index = result["index"].as_u64().unwrap() as usize;
            assert_eq!(result["document"], case.documents[index], "{result}");
        }
    }

    // Refusals.
    let documents = vec!["a document".to_string(); 2];
    let error = post_rerank(
        &stack,
        ACME_KEY,
        json!({"model": "no-such-model", "query": "q", "documents": documents}),
    )
    .await
    .openai_error(404);
    assert_eq!(error["code"], "model_not_found", "{error}");
    let error = post_rerank(
        &stack,
        ACME_KEY,
        json!({"model": EMBEDDER, "query": "q", "documents": documents}),
    )
    .await
    .openai_error(400);
    assert_eq!(error["code"], "unsupported_task", "{error}");
    assert_eq!(error["param"], "model", "{error}");
    let many = vec!["a document".to_string(); MAX_DOCUMENTS + 1];
    let error = post_rerank(
        &stack,
        ACME_KEY,
        json!({"model": RANKER, "query": "q", "documents": many}),
    )
    .await
    .openai_error(413);
    assert_eq!(error["param"], "documents", "{error}");
    for (body, param) in [
        (
            json!({"model": RANKER, "query": "q", "documents": []}),
            "documents",
        ),
        (json!({"model": RANKER, "query": "q"}), "documents"),
        (
            json!({"model": RANKER, "query": "q", "documents": documents, "texts": documents}),
            "documents",
        ),
        (
            json!({"model": RANKER, "query": "q", "documents": documents, "top_n": 0}),
            "top_n",
        ),
    ] {
        let error = post_rerank(&stack, ACME_KEY, body.clone())
            .await
            .openai_error(400);
        assert_eq!(error["param"], param, "{body}: {error}");
    }
    let error = post_rerank(
        &stack,
        ACME_KEY,
        json!({"model": RANKER, "documents": documents}),
    )
    .await
    .openai_error(400);
    assert_eq!(error["code"], "invalid_json", "no query: {error}");
    post_rerank(
        &stack,
        ACME_READ_ONLY_KEY,
        json!({"model": RANKER, "query": "q", "documents": documents}),
    )
    .await
    .openai_error(403);

    // A document costs one input: two are past the limited key's burst of
    // one, one is within it.
    post_rerank(
        &stack,
        ACME_LIMITED_KEY,
        json!({"model": RANKER, "query": "q", "documents": documents}),
    )
    .await
    .openai_error(413);
    let reply = post_rerank(
        &stack,
        ACME_LIMITED_KEY,
        json!({"model": RANKER, "query": "q", "documents": ["one document"]}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    embedder.shutdown().await;
    stack.stop().await;
}
