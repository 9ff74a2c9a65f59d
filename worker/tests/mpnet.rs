//! MPNet served end to end: the random-weight fixture
//! `worker/tests/fixtures/models/mpnet` (an `MPNetModel` as
//! all-mpnet-base-v2, hidden 32, 2 layers, 146 positions after padding_idx 1,
//! a relative position bias scaled up so that getting it wrong shows; MPNet's
//! WordPiece tokenizer with `<s>`/`</s>` from its RobertaProcessing, mean
//! pooling + Normalize, `max_seq_length` 144; written by
//! `scripts/fixtures/make_models.py`), whose `reference.json` holds the token
//! ids and normalised embeddings sentence-transformers computed on the same
//! weights. The vectors mean nothing; they pin what the worker must compute.

use crate::common;

use jetinfer_worker::config::{ForwardKind, ModelConfig};
use jetinfer_worker::load_backend;

use common::fixtures::{fixture, SentenceReference};
use common::golden::{assert_served_through_nats, edited, load_error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpnet_answers_sentence_transformers_embeddings_through_nats_with_every_product() {
    assert_served_through_nats("mpnet").await;
}

#[test]
fn mpnet_tokenizer_wraps_texts_in_its_own_specials_and_keeps_a_spelled_pad() {
    let backend = load_backend(&ModelConfig {
        path: fixture("mpnet"),
        ..Default::default()
    })
    .expect("loads");
    assert_eq!(backend.info().dimension, 32);
    // `<s>` = 0 ... `</s>` = 2, as sentence-transformers fed the model; a
    // text that spells `<pad>` gets the pad id, which the packed forward
    // must place where transformers does.
    let want = SentenceReference::load("mpnet");
    let i = want.texts.iter().position(|t| t.contains("<pad>")).unwrap();
    let ids = backend.tokenize(&want.texts[i]).unwrap().ids;
    assert_eq!((ids[0], *ids.last().unwrap()), (0, 2), "{ids:?}");
    assert!(ids.contains(&1), "{ids:?}");
    assert_eq!(ids, want.token_ids[i]);
    backend.embed(&[&ids]).expect("embeds");
}

#[test]
fn declared_length_past_mpnets_positions_is_capped_there() {
    // all-mpnet-base-v2's sentence_bert_config.json says 384 (of 512); one
    // that says more than the positions allow is held to them.
    let dir = edited("mpnet", "sentence_bert_config.json", |text| {
        text.replacen('{', "{\"max_seq_length\": 384,", 1)
    });
    let backend = load_backend(&ModelConfig {
        path: dir.path().to_path_buf(),
        ..Default::default()
    })
    .expect("loads");
    assert_eq!(backend.max_seq_len(), 144);
    let long = want_long_text();
    let tokens = backend.tokenize(&long).unwrap();
    assert_eq!((tokens.ids.len(), tokens.truncated), (144, true));
    backend.embed(&[&tokens.ids]).expect("the cut text embeds");
}

fn want_long_text() -> String {
    let want = SentenceReference::load("mpnet");
    want.texts[want.truncated.iter().position(|&t| t).unwrap()].clone()
}

#[test]
fn candle_forward_refuses_mpnet_naming_the_packed_forward() {
    let message = load_error(&fixture("mpnet"), ForwardKind::Candle);
    assert!(
        message.contains("MPNet") && message.contains("packed"),
        "{message}"
    );
}
