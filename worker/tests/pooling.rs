//! Pooling comes from the model directory (`1_Pooling/config.json`), checked
//! on random-weight fixtures whose reference embeddings sentence-transformers
//! computed on the same weights (`scripts/fixtures/make_models.py`):
//! - `worker/tests/fixtures/models/bert-cls`: a 2-layer BERT (hidden 32),
//!   CLS pooling, `max_seq_length` 48, written by sentence-transformers 6.2
//!   (`"pooling_mode": "cls"`).
//! - `worker/tests/fixtures/models/bert-max`: the same encoder, max pooling.
//!
//! Mean pooling is all-MiniLM-L6-v2's, checked by `golden.rs`.

use crate::common;

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use jetinfer_bert::Matmul;
use jetinfer_nats::testing::NatsServer;
use jetinfer_schemas::Job;
use jetinfer_worker::backend::l2_normalize;
use jetinfer_worker::config::{BackendKind, BatchConfig, ForwardKind, ModelConfig};
use jetinfer_worker::load_backend;
use serde::Deserialize;

use common::golden::{fixture, MIN_COSINE};
use common::*;

#[derive(Deserialize)]
struct Reference {
    max_seq_length: usize,
    texts: Vec<String>,
    token_counts: Vec<u32>,
    embeddings: Vec<Vec<f32>>,
}

fn reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference parses")
}

/// Every forward this CPU has: packed with each product kind, and candle's.
fn forwards() -> Vec<(ForwardKind, Matmul)> {
    let mut forwards = vec![
        (ForwardKind::Packed, Matmul::F32),
        (ForwardKind::Candle, Matmul::Auto),
    ];
    if Matmul::amx_available() {
        forwards.push((ForwardKind::Packed, Matmul::AmxBf16x3));
        forwards.push((ForwardKind::Packed, Matmul::AmxBf16));
    } else {
        eprintln!("this CPU or kernel offers no AMX: AMX products not checked");
    }
    forwards
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cls_pooled_model_answers_sentence_transformers_embeddings_through_nats() {
    let dir = fixture("bert-cls");
    let want = reference(&dir);
    let server = NatsServer::start();
    let mut config = worker_config(
        &server,
        BackendKind::Candle,
        BatchConfig {
            max_inputs: 8,
            max_tokens: 1024,
            max_wait: Duration::from_millis(20),
        },
    );
    config.model.path = dir;
    let backend = load_backend(&config.model).expect("fixture loads");
    assert_eq!(backend.max_seq_len(), want.max_seq_length);
    let worker = start_worker(config, backend).await;
    let client = client(&server).await;

    let jobs: Vec<Job> = want
        .texts
        .iter()
        .map(|t| Job::new("minilm", vec![t.clone()]))
        .collect();
    let results: Vec<_> = client.submit_many(jobs, want.texts.len()).collect().await;
    for (i, (_, result)) in results.into_iter().enumerate() {
        let result = result.expect("submitted").into_result().expect("embedded");
        let cos = cosine(&result.embeddings[0], &want.embeddings[i]);
        assert!(
            cos >= MIN_COSINE,
            "text {i} {:?}: cosine {cos} to sentence-transformers' CLS embedding",
            want.texts[i]
        );
        assert_eq!(result.token_counts, vec![want.token_counts[i]], "text {i}");
    }
    worker.shutdown().await;
}

#[test]
fn cls_and_max_pooled_models_match_sentence_transformers_with_every_forward() {
    for name in ["bert-cls", "bert-max"] {
        let dir = fixture(name);
        let want = reference(&dir);
        for (forward, matmul) in forwards() {
            let config = ModelConfig {
                path: dir.clone(),
                forward,
                matmul,
                ..Default::default()
            };
            let backend = load_backend(&config).expect("fixture loads");
            let tokens: Vec<Vec<u32>> = want
                .texts
                .iter()
                .map(|t| backend.tokenize(t).unwrap().ids)
                .collect();
            let batch: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
            let together = backend.embed(&batch).expect("batch embeds");
            let mut lowest = 1.0f32;
            for (i, ids) in batch.iter().enumerate() {
                assert_eq!(ids.len() as u32, want.token_counts[i], "{name} text {i}");
                let alone = backend.embed(&[ids]).expect("text embeds");
                for mut got in [together[i].clone(), alone[0].clone()] {
                    l2_normalize(&mut got);
                    let cos = cosine(&got, &want.embeddings[i]);
                    assert!(
                        cos >= MIN_COSINE,
                        "{name} {forward:?} {matmul:?} text {i}: cosine {cos}"
                    );
                    lowest = lowest.min(cos);
                }
            }
            eprintln!("{name} {forward:?} {matmul:?}: lowest cosine {lowest}");
        }
    }
}

/// A copy of the CLS fixture with `pooling` as its `1_Pooling/config.json`.
fn with_pooling_config(pooling: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    let from = fixture("bert-cls");
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    std::fs::create_dir(copy.path().join("1_Pooling")).unwrap();
    std::fs::write(copy.path().join("1_Pooling/config.json"), pooling).unwrap();
    copy
}

fn load_error(dir: &Path) -> String {
    let config = ModelConfig {
        path: dir.to_path_buf(),
        ..Default::default()
    };
    match load_backend(&config) {
        Ok(_) => panic!("a model with an unsupported pooling mode loaded"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn unsupported_pooling_modes_fail_to_load_naming_the_mode() {
    let weighted =
        with_pooling_config(r#"{"embedding_dimension": 32, "pooling_mode": "weightedmean"}"#);
    let message = load_error(weighted.path());
    assert!(
        message.contains("weightedmean") && message.contains("1_Pooling/config.json"),
        "{message}"
    );

    let legacy = with_pooling_config(
        r#"{"word_embedding_dimension": 32, "pooling_mode_mean_sqrt_len_tokens": true}"#,
    );
    let message = load_error(legacy.path());
    assert!(message.contains("mean_sqrt_len_tokens"), "{message}");

    let several = with_pooling_config(
        r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}"#,
    );
    let message = load_error(several.path());
    assert!(
        message.contains("cls") && message.contains("mean"),
        "{message}"
    );
}

#[test]
fn pooling_file_without_a_mode_means_mean_as_in_sentence_transformers() {
    let none_set = with_pooling_config(
        r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": false}"#,
    );
    let missing = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("bert-cls")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), missing.path().join(entry.file_name())).unwrap();
        }
    }
    let mean = with_pooling_config(r#"{"pooling_mode": "mean"}"#);
    let embed = |dir: &Path| {
        let backend = load_backend(&ModelConfig {
            path: dir.to_path_buf(),
            ..Default::default()
        })
        .expect("loads");
        let ids = backend.tokenize("the cat is on the mat").unwrap().ids;
        backend.embed(&[&ids]).unwrap().remove(0)
    };
    let mean = embed(mean.path());
    let cls = embed(&fixture("bert-cls"));
    assert_eq!(embed(none_set.path()), mean);
    assert_eq!(embed(missing.path()), mean);
    assert!(
        cosine(&mean, &cls) < MIN_COSINE,
        "mean and CLS differ on this model"
    );
}
