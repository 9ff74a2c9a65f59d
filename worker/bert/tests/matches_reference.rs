//! The packed forward computes the same embeddings as the references: candle's
//! stock `BertModel` (padded, masked) on random batches of mixed lengths, and
//! sentence-transformers' vectors in `../shared/data/minilm_golden.json`.
//!
//! Runs on the real all-MiniLM-L6-v2 weights that `scripts/setup.sh` puts in
//! `.cache/models/all-MiniLM-L6-v2`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as CandleConfig};
use jetinfer_bert::{Bert, Config, Matmul, Pooling};
use proptest::prelude::*;

const CLS: u32 = 101;
const SEP: u32 = 102;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    let dir = workspace_root().join(".cache/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "no model at {}: run scripts/setup.sh",
        dir.display()
    );
    dir
}

fn config_json() -> String {
    std::fs::read_to_string(model_dir().join("config.json")).unwrap()
}

fn packed() -> Bert {
    packed_with(Matmul::Auto)
}

fn packed_with(matmul: Matmul) -> Bert {
    let config: Config = serde_json::from_str(&config_json()).unwrap();
    Bert::load(&model_dir().join("model.safetensors"), config, matmul).unwrap()
}

/// Every kind of product this machine can run, with the least cosine and
/// the largest element difference each must keep against the reference (the
/// difference scaled by the reference's largest magnitude where that is above
/// 1: max-pooled vectors are not normalised, and a bf16 product's error grows
/// with the value).
/// f32 products always; AMX and AVX512_BF16 ones where the CPU has them (a
/// machine without says so, since then they cannot be checked here, and
/// fails where `JETINFER_REQUIRE_AVX512_BF16=1` says it must have them).
fn products() -> Vec<(Matmul, f32, f32)> {
    let mut products = vec![(Matmul::F32, 0.99999, 1e-3)];
    if Matmul::amx_available() {
        products.push((Matmul::AmxBf16x3, 0.99999, 1e-3));
        // Reduced precision: held to the bound the project sets for outputs.
        products.push((Matmul::AmxBf16, 0.9999, 2e-2));
    } else {
        eprintln!("this CPU or kernel offers no AMX: AMX products not checked");
    }
    if Matmul::avx512_bf16_available() {
        // The arithmetic of `AmxBf16`, so the same bounds.
        products.push((Matmul::Avx512Bf16, 0.9999, 2e-2));
    } else {
        assert!(
            std::env::var("JETINFER_REQUIRE_AVX512_BF16").as_deref() != Ok("1"),
            "JETINFER_REQUIRE_AVX512_BF16=1 but this CPU offers no AVX512_BF16"
        );
        eprintln!("this CPU offers no AVX512_BF16: avx512_bf16 products not checked");
    }
    products
}

fn reference() -> BertModel {
    let config: CandleConfig = serde_json::from_str(&config_json()).unwrap();
    let weights = model_dir().join("model.safetensors");
    // SAFETY: the model file is not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .unwrap();
    BertModel::load(vb, &config).unwrap()
}

/// The straightforward forward: pad to the longest input, mask, pool.
fn reference_embed(model: &BertModel, batch: &[Vec<u32>], pooling: Pooling) -> Vec<Vec<f32>> {
    let width = batch.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for input in batch {
        ids.extend_from_slice(input);
        ids.resize(ids.len() + width - input.len(), 0);
        mask.extend(std::iter::repeat_n(1u32, input.len()));
        mask.resize(mask.len() + width - input.len(), 0);
    }
    let ids = Tensor::from_vec(ids, (batch.len(), width), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (batch.len(), width), &Device::Cpu).unwrap();
    let hidden = model
        .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
        .unwrap();
    let pooled = match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(),
        Pooling::Mean => {
            let mask = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
            let summed = hidden.broadcast_mul(&mask).unwrap().sum(1).unwrap();
            summed.broadcast_div(&mask.sum(1).unwrap()).unwrap()
        }
        Pooling::Max => {
            // Padding pushed far below any value, so it never wins.
            let pad = mask
                .to_dtype(DType::F32)
                .unwrap()
                .affine(1e9, -1e9)
                .unwrap()
                .unsqueeze(2)
                .unwrap();
            hidden.broadcast_add(&pad).unwrap().max(1).unwrap()
        }
    };
    pooled.to_vec2().unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// A batch of 1 to 12 inputs, each `[CLS] ids.. [SEP]`, 2 to 130 tokens.
fn batch() -> impl Strategy<Value = Vec<Vec<u32>>> {
    prop::collection::vec(prop::collection::vec(999u32..30_000, 0..128), 1..12).prop_map(|inputs| {
        inputs
            .into_iter()
            .map(|body| {
                let mut ids = vec![CLS];
                ids.extend(body);
                ids.push(SEP);
                ids
            })
            .collect()
    })
}

#[test]
fn random_mixed_length_batches_match_candle_bert() {
    let reference = reference();
    for (matmul, least_cosine, largest_difference) in products() {
        let packed = packed_with(matmul);
        let lowest = std::cell::Cell::new(1.0f32);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 24,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        runner
            .run(
                &(
                    batch(),
                    prop_oneof![Just(Pooling::Mean), Just(Pooling::Cls), Just(Pooling::Max)],
                ),
                |(batch, pooling)| {
                    let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
                    let got = packed.embed(&refs, pooling).unwrap();
                    let want = reference_embed(&reference, &batch, pooling);
                    prop_assert_eq!(got.len(), want.len());
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let c = cosine(g, w);
                        let worst = g
                            .iter()
                            .zip(w)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0f32, f32::max);
                        let scale = w.iter().map(|x| x.abs()).fold(1.0f32, f32::max);
                        let worst = worst / scale;
                        lowest.set(lowest.get().min(c));
                        prop_assert!(
                        c >= least_cosine && worst < largest_difference,
                        "{:?}: input {} of {} ({} tokens, {:?}): cosine {}, largest difference {} (scaled)",
                        matmul,
                        i,
                        batch.len(),
                        batch[i].len(),
                        pooling,
                        c,
                        worst
                    );
                    }
                    Ok(())
                },
            )
            .unwrap();
        eprintln!("{matmul:?}: lowest cosine {}", lowest.get());
    }
}

#[test]
fn an_input_embeds_the_same_alone_and_in_any_batch() {
    let packed = packed();
    let short: Vec<u32> = vec![CLS, 2023, 2003, 1037, 3231, SEP];
    let long: Vec<u32> = std::iter::once(CLS)
        .chain((0..200).map(|i| 2000 + i))
        .chain([SEP])
        .collect();
    let alone = packed.embed(&[&short], Pooling::Mean).unwrap();
    let mixed = packed
        .embed(&[&long, &short, &long], Pooling::Mean)
        .unwrap();
    let c = cosine(&alone[0], &mixed[1]);
    assert!(c >= 0.999999, "cosine {c}");
}

#[test]
fn the_longest_input_the_model_takes_matches_candle_bert() {
    let reference = reference();
    for (matmul, least_cosine, _) in products() {
        let packed = packed_with(matmul);
        let max = packed.config().max_position_embeddings;
        let input: Vec<u32> = std::iter::once(CLS)
            .chain((0..max as u32 - 2).map(|i| 1000 + i * 7))
            .chain([SEP])
            .collect();
        let got = packed.embed(&[&input], Pooling::Mean).unwrap();
        let want = reference_embed(&reference, &[input], Pooling::Mean);
        let c = cosine(&got[0], &want[0]);
        assert!(c >= least_cosine, "{matmul:?}: cosine {c}");
    }
}

#[test]
fn inputs_it_cannot_run_are_refused_with_what_is_wrong() {
    let packed = packed();
    let max = packed.config().max_position_embeddings;
    let too_long = vec![CLS; max + 1];
    let err = packed
        .embed(&[&[CLS, SEP], &too_long], Pooling::Mean)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "input 1 has {} tokens; the model takes at most {max}",
            max + 1
        )
    );
    let err = packed
        .embed(&[&[CLS, 40_000, SEP]], Pooling::Mean)
        .unwrap_err();
    assert!(err.to_string().contains("token id 40000"), "{err}");
    let err = packed.embed(&[&[]], Pooling::Mean).unwrap_err();
    assert_eq!(err.to_string(), "input 0 has no tokens");
}
