//! The packed forward runs XLM-RoBERTa: on the random-weight fixture
//! `worker/tests/fixtures/models/xlm-roberta` (`scripts/fixtures/make_models.py`),
//! whose `reference.json` holds the token ids sentence-transformers fed the
//! same weights and the normalised mean-pooled embeddings it computed.

use std::path::PathBuf;

use jetinfer_bert::{Bert, Config, Family, ForwardError, LoadError, Matmul, Pooling};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    token_ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/xlm-roberta")
}

fn config_json() -> String {
    std::fs::read_to_string(fixture().join("config.json")).unwrap()
}

fn config() -> Config {
    serde_json::from_str(&config_json()).unwrap()
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// f32 products always; the bf16 ones where this CPU has them.
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

#[test]
fn xlm_roberta_config_numbers_positions_after_the_padding_index() {
    let config = config();
    assert_eq!(config.family().unwrap(), Family::Roberta);
    assert_eq!(config.position_offset(), 2);
    // 66 positions, the first two (below and at padding_idx 1) never used.
    assert_eq!(config.max_tokens(), 64);
}

#[test]
fn packed_forward_matches_sentence_transformers_on_xlm_roberta_in_one_batch_and_alone() {
    let want = reference();
    let batch: Vec<&[u32]> = want.token_ids.iter().map(Vec::as_slice).collect();
    for matmul in products() {
        let bert = Bert::load(&fixture().join("model.safetensors"), config(), matmul).unwrap();
        let together = bert.embed(&batch, Pooling::Mean).unwrap();
        let mut lowest = 1.0f32;
        for (i, ids) in batch.iter().enumerate() {
            let alone = bert.embed(&[ids], Pooling::Mean).unwrap().remove(0);
            for got in [&together[i], &alone] {
                let cos = cosine(got, &want.embeddings[i]);
                assert!(cos >= 0.9999, "{matmul:?} text {i}: cosine {cos}");
                lowest = lowest.min(cos);
            }
        }
        eprintln!("xlm-roberta {matmul:?}: lowest cosine {lowest}");
    }
}

#[test]
fn xlm_roberta_input_longer_than_its_positions_is_refused_not_read_past() {
    let bert = Bert::load(&fixture().join("model.safetensors"), config(), Matmul::F32).unwrap();
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
    let tensors = candle_core::safetensors::load(
        fixture().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let prefixed = tensors
        .iter()
        .map(|(name, t)| (format!("roberta.{name}"), t.clone()))
        .collect();
    let bare = Bert::from_tensors(tensors, config(), Matmul::F32).unwrap();
    let prefixed = Bert::from_tensors(prefixed, config(), Matmul::F32).unwrap();
    let ids = reference().token_ids.remove(3);
    assert_eq!(
        bare.embed(&[&ids], Pooling::Mean).unwrap(),
        prefixed.embed(&[&ids], Pooling::Mean).unwrap()
    );
}

#[test]
fn other_model_types_fail_to_load_naming_the_type() {
    for model_type in ["mpnet", "distilbert"] {
        let json = config_json().replace("\"xlm-roberta\"", &format!("\"{model_type}\""));
        let config: Config = serde_json::from_str(&json).unwrap();
        let err = Bert::load(&fixture().join("model.safetensors"), config, Matmul::F32)
            .err()
            .expect("an unsupported model type loaded");
        assert!(matches!(err, LoadError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains(model_type), "{err}");
    }
}
