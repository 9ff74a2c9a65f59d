//! XLM-RoBERTa served end to end: the random-weight fixture
//! `worker/tests/fixtures/models/xlm-roberta` (an `XLMRobertaModel`, hidden
//! 32, 2 layers, 66 positions after padding_idx 1, a small Unigram tokenizer
//! with XLM-R's special tokens, mean pooling, `max_seq_length` 64; written by
//! `scripts/fixtures/make_models.py`), whose `reference.json` holds the token
//! ids and normalised embeddings sentence-transformers computed on the same
//! weights. The vectors mean nothing; they pin what the worker must compute.

mod common;

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use jetinfer_bert::Matmul;
use jetinfer_nats::testing::NatsServer;
use jetinfer_schemas::{ErrorCode, Job, JobOptions, Truncation};
use jetinfer_worker::config::{BackendKind, BatchConfig, ForwardKind, ModelConfig};
use jetinfer_worker::load_backend;
use serde::Deserialize;

use common::golden::{fixture, MIN_COSINE};
use common::*;

#[derive(Deserialize)]
struct Reference {
    max_seq_length: usize,
    texts: Vec<String>,
    token_ids: Vec<Vec<u32>>,
    token_counts: Vec<u32>,
    truncated: Vec<bool>,
    embeddings: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let path = fixture("xlm-roberta").join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("reference parses")
}

/// Every kind of products this CPU offers the packed forward.
fn products() -> Vec<Matmul> {
    let mut products = vec![Matmul::F32];
    if Matmul::amx_available() {
        products.extend([Matmul::AmxBf16x3, Matmul::AmxBf16]);
    } else {
        eprintln!("this CPU or kernel offers no AMX: AMX products not checked");
    }
    if Matmul::avx512_bf16_available() {
        products.push(Matmul::Avx512Bf16);
    } else {
        eprintln!("this CPU offers no AVX512_BF16: avx512_bf16 products not checked");
    }
    products
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xlm_roberta_answers_sentence_transformers_embeddings_through_nats_with_every_product() {
    let want = reference();
    let server = NatsServer::start();
    let client = client(&server).await;
    for matmul in products() {
        let mut config = worker_config(
            &server,
            BackendKind::Candle,
            BatchConfig {
                max_inputs: 8,
                max_tokens: 1024,
                max_wait: Duration::from_millis(20),
            },
        );
        config.model.name = "xlm-roberta".into();
        config.model.path = fixture("xlm-roberta");
        config.model.forward = ForwardKind::Packed;
        config.model.matmul = matmul;
        let backend = load_backend(&config.model).expect("fixture loads");
        assert_eq!(backend.max_seq_len(), want.max_seq_length);
        assert_eq!(backend.compute(), format!("cpu packed {}", matmul.name()));
        // The tokenizer.json gives the ids sentence-transformers fed the model.
        for (i, text) in want.texts.iter().enumerate() {
            assert_eq!(
                backend.tokenize(text).unwrap().ids,
                want.token_ids[i],
                "text {i}"
            );
        }
        let model = config.model.name.clone();
        let worker = start_worker(config, backend).await;

        // One job per text, batched together by the worker, then all texts in one job.
        let mut jobs: Vec<Job> = want
            .texts
            .iter()
            .map(|t| Job::new(&model, vec![t.clone()]))
            .collect();
        jobs.push(Job::new(&model, want.texts.clone()));
        let count = jobs.len();
        let results: Vec<_> = client.submit_many(jobs, count).collect().await;
        assert_eq!(results.len(), count);
        let mut lowest = 1.0f32;
        for (j, (_, result)) in results.into_iter().enumerate() {
            let result = result.expect("submitted").into_result().expect("embedded");
            let texts: Vec<usize> = if j < want.texts.len() {
                vec![j]
            } else {
                (0..want.texts.len()).collect()
            };
            assert_eq!(result.embeddings.len(), texts.len(), "job {j}");
            for (k, &i) in texts.iter().enumerate() {
                let cos = cosine(&result.embeddings[k], &want.embeddings[i]);
                assert!(
                    cos >= MIN_COSINE,
                    "{matmul:?} text {i} {:?}: cosine {cos} to sentence-transformers'",
                    want.texts[i]
                );
                lowest = lowest.min(cos);
            }
            let counts: Vec<u32> = texts.iter().map(|&i| want.token_counts[i]).collect();
            let truncated: Vec<bool> = texts.iter().map(|&i| want.truncated[i]).collect();
            assert_eq!(result.token_counts, counts, "job {j}");
            assert_eq!(result.truncated, truncated, "job {j}");
        }
        eprintln!("xlm-roberta through NATS, {matmul:?}: lowest cosine {lowest}");

        // The long text, when the job asks to reject rather than truncate.
        let long = want.texts[want.truncated.iter().position(|&t| t).unwrap()].clone();
        let rejected = client
            .submit(
                Job::new(&model, vec!["a".into(), long]).with_options(JobOptions {
                    truncation: Truncation::Reject,
                    ..JobOptions::default()
                }),
            )
            .await;
        let error = rejected
            .expect("submitted")
            .into_result()
            .expect_err("a text past 64 tokens with truncation `reject`");
        assert_eq!(error.code, ErrorCode::InputTooLong);
        worker.shutdown().await;
    }
}

/// A copy of the fixture with `edit` applied to one of its files.
fn edited(file: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    let from = fixture("xlm-roberta");
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    std::fs::create_dir(copy.path().join("1_Pooling")).unwrap();
    std::fs::copy(
        from.join("1_Pooling/config.json"),
        copy.path().join("1_Pooling/config.json"),
    )
    .unwrap();
    let path = copy.path().join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
    copy
}

fn load_error(dir: &Path, forward: ForwardKind) -> String {
    match load_backend(&ModelConfig {
        path: dir.to_path_buf(),
        forward,
        ..Default::default()
    }) {
        Ok(_) => panic!("{} loaded with {forward:?}", dir.display()),
        Err(err) => err.to_string(),
    }
}

#[test]
fn declared_length_past_the_positions_after_padding_idx_is_capped_there() {
    // 66 positions, RoBERTa's first two unused: 64 tokens, whatever the
    // tokenizer declares (sentence-transformers 6 keeps the model's
    // `max_seq_length` there).
    let dir = edited("tokenizer_config.json", |text| {
        text.replace("\"model_max_length\": 64", "\"model_max_length\": 512")
    });
    assert!(
        std::fs::read_to_string(dir.path().join("tokenizer_config.json"))
            .unwrap()
            .contains("512")
    );
    let backend = load_backend(&ModelConfig {
        path: dir.path().to_path_buf(),
        ..Default::default()
    })
    .expect("loads");
    assert_eq!(backend.max_seq_len(), 64);
    let long = &reference().texts[9];
    let tokens = backend.tokenize(long).unwrap();
    assert_eq!((tokens.ids.len(), tokens.truncated), (64, true));
    backend.embed(&[&tokens.ids]).expect("the cut text embeds");
}

#[test]
fn candle_forward_refuses_xlm_roberta_naming_the_packed_forward() {
    let message = load_error(&fixture("xlm-roberta"), ForwardKind::Candle);
    assert!(
        message.contains("XLM-RoBERTa") && message.contains("packed"),
        "{message}"
    );
}

#[test]
fn unsupported_model_type_fails_to_load_naming_it() {
    let dir = edited("config.json", |text| {
        text.replace(
            "\"model_type\": \"xlm-roberta\"",
            "\"model_type\": \"mpnet\"",
        )
    });
    let message = load_error(dir.path(), ForwardKind::Auto);
    assert!(
        message.contains("mpnet") && message.contains("config.json"),
        "{message}"
    );
}
