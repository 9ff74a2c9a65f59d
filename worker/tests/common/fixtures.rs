//! The random-weight sentence models in `worker/tests/fixtures/models`
//! (`scripts/fixtures/make_models.py`) and the checks their tests share,
//! for the worker's tests (`common::fixtures`) and the packed forward's
//! (`worker/bert/tests`, which include this file by path): it needs
//! nothing but `jetinfer-bert`, serde and the standard library.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use jetinfer_bert::Matmul;
use serde::Deserialize;

/// Lowest cosine an embedding may have to its reference.
pub const MIN_COSINE: f32 = 0.9999;

/// A fixture model directory under `worker/tests/fixtures/models`, found
/// from the crate that includes this file (the worker or `worker/bert`).
pub fn fixture(name: &str) -> PathBuf {
    let models = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("worker/tests/fixtures/models"))
        .find(|dir| dir.is_dir())
        .expect("worker/tests/fixtures/models above the crate");
    models.join(name)
}

/// A sentence model fixture's `reference.json`: what sentence-transformers
/// fed the model and computed from the same weights.
#[derive(Deserialize)]
pub struct SentenceReference {
    pub max_seq_length: usize,
    pub texts: Vec<String>,
    /// Token ids with special tokens, cut at `max_seq_length`.
    pub token_ids: Vec<Vec<u32>>,
    pub token_counts: Vec<u32>,
    pub truncated: Vec<bool>,
    /// Normalised, pooled as `1_Pooling/config.json` says.
    pub embeddings: Vec<Vec<f32>>,
}

impl SentenceReference {
    /// The reference of the fixture `name`.
    pub fn load(name: &str) -> Self {
        let path = fixture(name).join("reference.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).expect("reference.json parses")
    }

    /// The token ids of every text, as one batch.
    pub fn batch(&self) -> Vec<&[u32]> {
        self.token_ids.iter().map(Vec::as_slice).collect()
    }
}

/// The fixture's `config.json`, as text (tests edit it) and parsed.
pub fn config_json(name: &str) -> String {
    std::fs::read_to_string(fixture(name).join("config.json")).expect("config.json")
}

pub fn config(name: &str) -> jetinfer_bert::Config {
    serde_json::from_str(&config_json(name)).expect("config.json parses")
}

/// Every kind of products this CPU offers the packed forward: f32 always,
/// the bf16 ones where the CPU (and kernel, for AMX) has them.
pub fn products() -> Vec<Matmul> {
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

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}
