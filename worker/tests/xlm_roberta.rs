//! XLM-RoBERTa served end to end: the random-weight fixture
//! `worker/tests/fixtures/models/xlm-roberta` (an `XLMRobertaModel`, hidden
//! 32, 2 layers, 66 positions after padding_idx 1, a small Unigram tokenizer
//! with XLM-R's special tokens, mean pooling, `max_seq_length` 64; written by
//! `scripts/fixtures/make_models.py`), whose `reference.json` holds the token
//! ids and normalised embeddings sentence-transformers computed on the same
//! weights. The vectors mean nothing; they pin what the worker must compute.

use crate::common;

use jetinfer_worker::config::{ForwardKind, ModelConfig};
use jetinfer_worker::load_backend;

use common::fixtures::{fixture, SentenceReference};
use common::golden::{assert_served_through_nats, edited, load_error};

fn reference() -> SentenceReference {
    SentenceReference::load("xlm-roberta")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xlm_roberta_answers_sentence_transformers_embeddings_through_nats_with_every_product() {
    assert_served_through_nats("xlm-roberta").await;
}

#[test]
fn declared_length_past_the_positions_after_padding_idx_is_capped_there() {
    // 66 positions, RoBERTa's first two unused: 64 tokens, whatever the
    // tokenizer declares (sentence-transformers 6 keeps the model's
    // `max_seq_length` there).
    let dir = edited("xlm-roberta", "tokenizer_config.json", |text| {
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
    let dir = edited("xlm-roberta", "config.json", |text| {
        text.replace(
            "\"model_type\": \"xlm-roberta\"",
            "\"model_type\": \"distilbert\"",
        )
    });
    let message = load_error(dir.path(), ForwardKind::Auto);
    assert!(
        message.contains("distilbert") && message.contains("config.json"),
        "{message}"
    );
    // It says which types do load.
    assert!(message.contains("`mpnet`"), "{message}");
}
