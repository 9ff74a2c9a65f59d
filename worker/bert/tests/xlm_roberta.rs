//! The packed forward runs XLM-RoBERTa: on the random-weight fixture
//! `worker/tests/fixtures/models/xlm-roberta` (`scripts/fixtures/make_models.py`),
//! whose `reference.json` holds the token ids sentence-transformers fed the
//! same weights and the normalised mean-pooled embeddings it computed.

#[path = "../../tests/common/fixtures.rs"]
mod fixtures;

use std::path::PathBuf;

use fixtures::{cosine, products, SentenceReference, MIN_COSINE};
use jetinfer_bert::{Bert, Config, Family, ForwardError, LoadError, Matmul, Pooling};

const NAME: &str = "xlm-roberta";

fn weights() -> PathBuf {
    fixtures::fixture(NAME).join("model.safetensors")
}

fn config() -> Config {
    fixtures::config(NAME)
}

#[test]
fn xlm_roberta_config_numbers_positions_after_the_padding_index() {
    let config = config();
    assert_eq!(config.family().unwrap(), Family::Roberta);
    assert_eq!(config.position_offset(), 2);
    // 66 positions, less the two up to padding_idx 1 that no counted token takes.
    assert_eq!(config.max_tokens(), 64);
}

#[test]
fn packed_forward_matches_sentence_transformers_on_xlm_roberta_in_one_batch_and_alone() {
    let want = SentenceReference::load(NAME);
    let batch = want.batch();
    for matmul in products() {
        let bert = Bert::load(&weights(), config(), matmul).unwrap();
        let together = bert.embed(&batch, Pooling::Mean).unwrap();
        let mut lowest = 1.0f32;
        for (i, ids) in batch.iter().enumerate() {
            let alone = bert.embed(&[ids], Pooling::Mean).unwrap().remove(0);
            for got in [&together[i], &alone] {
                let cos = cosine(got, &want.embeddings[i]);
                assert!(cos >= MIN_COSINE, "{matmul:?} text {i}: cosine {cos}");
                lowest = lowest.min(cos);
            }
        }
        eprintln!("xlm-roberta {matmul:?}: lowest cosine {lowest}");
    }
}

#[test]
fn xlm_roberta_input_longer_than_its_positions_is_refused_not_read_past() {
    let bert = Bert::load(&weights(), config(), Matmul::F32).unwrap();
    let ids: Vec<u32> = std::iter::once(0)
        .chain(std::iter::repeat_n(5, 63))
        .collect();
    assert_eq!(bert.embed(&[&ids], Pooling::Mean).unwrap().len(), 1);
    let longer: Vec<u32> = ids.iter().copied().chain([2]).collect();
    assert_eq!(
        bert.embed(&[&longer], Pooling::Mean).unwrap_err(),
        ForwardError::TooLong {
            index: 0,
            len: 65,
            max: 64
        }
    );
}

#[test]
fn weights_prefixed_roberta_load_as_bare_ones() {
    let tensors = candle_core::safetensors::load(weights(), &candle_core::Device::Cpu).unwrap();
    let prefixed = tensors
        .iter()
        .map(|(name, t)| (format!("roberta.{name}"), t.clone()))
        .collect();
    let bare = Bert::from_tensors(tensors, config(), Matmul::F32).unwrap();
    let prefixed = Bert::from_tensors(prefixed, config(), Matmul::F32).unwrap();
    let ids = SentenceReference::load(NAME).token_ids.remove(3);
    assert_eq!(
        bare.embed(&[&ids], Pooling::Mean).unwrap(),
        prefixed.embed(&[&ids], Pooling::Mean).unwrap()
    );
}

#[test]
fn other_model_types_fail_to_load_naming_the_type_and_those_that_load() {
    for model_type in ["distilbert", "deberta-v2"] {
        let json =
            fixtures::config_json(NAME).replace("\"xlm-roberta\"", &format!("\"{model_type}\""));
        let config: Config = serde_json::from_str(&json).unwrap();
        let err = Bert::load(&weights(), config, Matmul::F32)
            .err()
            .expect("an unsupported model type loaded");
        assert!(matches!(err, LoadError::Unsupported(_)), "{err}");
        let message = err.to_string();
        assert!(message.contains(model_type), "{message}");
        for supported in ["`bert`", "`xlm-roberta`", "`mpnet`"] {
            assert!(message.contains(supported), "{message}");
        }
    }
}
