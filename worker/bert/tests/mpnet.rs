//! The packed forward runs MPNet (all-mpnet-base-v2's architecture): on the
//! random-weight fixture `worker/tests/fixtures/models/mpnet`
//! (`scripts/fixtures/make_models.py`), whose `reference.json` holds the
//! token ids sentence-transformers fed the same weights, the normalised
//! mean-pooled embeddings it computed, and transformers' bucket of every
//! relative position. The fixture's relative position bias is scaled up so
//! that leaving it out or mirroring it costs far more than the cosine bound
//! (the script asserts so: 0.98 and 0.96 at the time of writing).

#[path = "../../tests/common/fixtures.rs"]
mod fixtures;

use std::path::PathBuf;

use fixtures::{cosine, products, SentenceReference, MIN_COSINE};
use jetinfer_bert::{
    relative_position_bucket, Bert, Config, Family, ForwardError, LoadError, Matmul, Pooling,
};
use serde::Deserialize;

const NAME: &str = "mpnet";

fn weights() -> PathBuf {
    fixtures::fixture(NAME).join("model.safetensors")
}

fn config() -> Config {
    fixtures::config(NAME)
}

/// transformers' `MPNetEncoder.relative_position_bucket` of every relative
/// position from `-reach` to `reach`.
#[derive(Deserialize)]
struct Buckets {
    relative_position_reach: i64,
    relative_position_buckets: Vec<usize>,
}

#[test]
fn mpnet_config_numbers_positions_after_padding_index_one() {
    let config = config();
    assert_eq!(config.family().unwrap(), Family::Mpnet);
    assert_eq!(config.padding_idx(), Some(1));
    assert_eq!(config.position_offset(), 2);
    // 146 positions, less the two up to padding_idx 1.
    assert_eq!(config.max_tokens(), 144);
}

#[test]
fn relative_positions_fall_into_the_buckets_transformers_gives_them() {
    let path = fixtures::fixture(NAME).join("reference.json");
    let want: Buckets = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let reach = want.relative_position_reach;
    // Past all-mpnet-base-v2's 512 tokens each way, every bucket reached.
    assert!(reach >= 512, "{reach}");
    assert_eq!(want.relative_position_buckets.len() as i64, 2 * reach + 1);
    let mut seen = [false; 32];
    for (i, &bucket) in want.relative_position_buckets.iter().enumerate() {
        let relative = i as i64 - reach;
        assert_eq!(
            relative_position_bucket(relative),
            bucket,
            "relative position {relative}"
        );
        seen[bucket] = true;
    }
    // Every bucket but 16, which would be a key after the query at distance 0.
    let unseen: Vec<usize> = (0..seen.len()).filter(|&b| !seen[b]).collect();
    assert_eq!(unseen, [16]);
}

#[test]
fn packed_forward_matches_sentence_transformers_on_mpnet_in_one_batch_and_alone() {
    let want = SentenceReference::load(NAME);
    // The texts reach past 128 tokens (the last buckets) and one spells out
    // the pad token (id 1), which takes position padding_idx.
    assert!(want.token_ids.iter().any(|ids| ids.len() > 129));
    assert!(want.token_ids.iter().any(|ids| ids.contains(&1)));
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
        eprintln!("mpnet {matmul:?}: lowest cosine {lowest}");
    }
}

#[test]
fn mpnet_input_longer_than_its_positions_is_refused_not_read_past() {
    let bert = Bert::load(&weights(), config(), Matmul::F32).unwrap();
    let ids: Vec<u32> = std::iter::once(0)
        .chain(std::iter::repeat_n(10, 142))
        .chain([2])
        .collect();
    assert_eq!(bert.embed(&[&ids], Pooling::Mean).unwrap().len(), 1);
    let longer: Vec<u32> = ids.iter().copied().chain([2]).collect();
    assert_eq!(
        bert.embed(&[&longer], Pooling::Mean).unwrap_err(),
        ForwardError::TooLong {
            index: 0,
            len: 145,
            max: 144
        }
    );
}

fn tensors() -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(weights(), &candle_core::Device::Cpu).unwrap()
}

#[test]
fn weights_prefixed_mpnet_load_as_bare_ones() {
    let tensors = tensors();
    let prefixed = tensors
        .iter()
        .map(|(name, t)| (format!("mpnet.{name}"), t.clone()))
        .collect();
    let bare = Bert::from_tensors(tensors, config(), Matmul::F32).unwrap();
    let prefixed = Bert::from_tensors(prefixed, config(), Matmul::F32).unwrap();
    let ids = SentenceReference::load(NAME).token_ids.remove(8);
    assert_eq!(
        bare.embed(&[&ids], Pooling::Mean).unwrap(),
        prefixed.embed(&[&ids], Pooling::Mean).unwrap()
    );
}

#[test]
fn mpnet_without_its_relative_attention_bias_fails_to_load_naming_it() {
    let mut tensors = tensors();
    tensors.remove("encoder.relative_attention_bias.weight");
    let err = Bert::from_tensors(tensors, config(), Matmul::F32)
        .err()
        .expect("loaded without the bias");
    assert!(
        matches!(&err, LoadError::Missing(name) if name == "encoder.relative_attention_bias.weight"),
        "{err}"
    );
}

#[test]
fn mpnet_with_fewer_buckets_than_transformers_reads_fails_to_load() {
    let json = fixtures::config_json(NAME).replace(
        "\"relative_attention_num_buckets\": 32",
        "\"relative_attention_num_buckets\": 16",
    );
    let config: Config = serde_json::from_str(&json).unwrap();
    let err = Bert::load(&weights(), config, Matmul::F32)
        .err()
        .expect("loaded with 16 buckets");
    assert!(matches!(err, LoadError::Unsupported(_)), "{err}");
    assert!(
        err.to_string()
            .contains("relative_attention_num_buckets 16"),
        "{err}"
    );
}

#[test]
fn mpnet_as_a_classifier_is_refused() {
    let err = Bert::load_classifier(&weights(), config(), Matmul::F32, 1)
        .err()
        .expect("an MPNet classifier loaded");
    assert!(matches!(err, LoadError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("MPNet"), "{err}");
}

#[test]
fn auto_products_for_mpnet_never_round_to_plain_bf16() {
    // all-mpnet-base-v2 misses the 0.9999 bound with them on a long text:
    // `auto` takes f32 for MPNet, as for a classifier, whatever the CPU has.
    let bert = Bert::load(&weights(), config(), Matmul::Auto).unwrap();
    assert_eq!(bert.matmul(), Matmul::F32);
    if Matmul::avx512_bf16_available() {
        let asked = Bert::load(&weights(), config(), Matmul::Avx512Bf16).unwrap();
        assert_eq!(
            asked.matmul(),
            Matmul::Avx512Bf16,
            "asked for by name, it runs"
        );
    }
}
