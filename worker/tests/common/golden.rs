//! The reference outputs the golden tests compare against, and the checks
//! they share: all-MiniLM-L6-v2's embeddings from sentence-transformers
//! (`../shared/data/minilm_golden.json`), and the random-weight fixtures in
//! `worker/tests/fixtures/models` (`scripts/fixtures/make_models.py`), whose
//! references transformers / sentence-transformers computed on the same
//! weights.

use std::path::PathBuf;

use jetinfer_nats::testing::workspace_root;
use jetinfer_schemas::Reranked;
use serde::Deserialize;

use super::{cosine, shared_data};

/// Lowest cosine an embedding may have to its reference.
pub const MIN_COSINE: f32 = 0.9999;
/// Largest difference from the reference a rerank score or logit may have.
pub const RERANK_TOLERANCE: f32 = 1e-4;

/// all-MiniLM-L6-v2's reference embeddings.
#[derive(Deserialize)]
pub struct Golden {
    pub max_seq_length: usize,
    pub texts: Vec<String>,
    pub embeddings: Vec<Vec<f32>>,
}

pub fn golden() -> Golden {
    let path = shared_data().join("minilm_golden.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden file parses")
}

/// A fixture model directory under `worker/tests/fixtures/models`.
pub fn fixture(name: &str) -> PathBuf {
    workspace_root()
        .join("worker/tests/fixtures/models")
        .join(name)
}

/// Asserts an embedding matches its reference (cosine) and is normalised;
/// returns the cosine.
pub fn assert_matches(text: &str, got: &[f32], want: &[f32]) -> f32 {
    let cos = cosine(got, want);
    assert!(
        cos >= MIN_COSINE,
        "cosine {cos} < {MIN_COSINE} for {:?}",
        text.chars().take(60).collect::<String>()
    );
    let norm = got.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-4,
        "result is normalised, norm {norm}"
    );
    cos
}

/// The cross-encoder fixture's reference logits and scores.
#[derive(Deserialize)]
pub struct RerankReference {
    pub max_length: usize,
    pub cases: Vec<RerankCase>,
}

#[derive(Deserialize)]
pub struct RerankCase {
    pub query: String,
    pub documents: Vec<String>,
    pub logits: Vec<f32>,
    pub scores: Vec<f32>,
    pub token_counts: Vec<u32>,
    pub truncated: Vec<bool>,
}

pub fn rerank_reference() -> RerankReference {
    rerank_reference_of("cross-encoder")
}

/// The reference of the cross-encoder fixture `name`.
pub fn rerank_reference_of(name: &str) -> RerankReference {
    let path = fixture(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

impl RerankCase {
    /// Document indices by reference logit, best first.
    pub fn order(&self) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.logits.len() as u32).collect();
        order.sort_by(|&a, &b| self.logits[b as usize].total_cmp(&self.logits[a as usize]));
        order
    }

    /// Asserts `got` ranks the documents as the reference does, with every
    /// logit and score within [`RERANK_TOLERANCE`], and the same token counts.
    pub fn assert_matches(&self, got: &Reranked, what: &str) {
        let order: Vec<u32> = got.results.iter().map(|s| s.index).collect();
        assert_eq!(order, self.order(), "{what} {:?}", self.query);
        for s in &got.results {
            let i = s.index as usize;
            assert!(
                (s.logit - self.logits[i]).abs() < RERANK_TOLERANCE
                    && (s.score - self.scores[i]).abs() < RERANK_TOLERANCE,
                "{what} {:?} document {i}: logit {} score {}, reference {} {}",
                self.query,
                s.logit,
                s.score,
                self.logits[i],
                self.scores[i]
            );
        }
        assert_eq!(got.token_counts, self.token_counts, "{:?}", self.query);
        assert_eq!(got.truncated, self.truncated, "{:?}", self.query);
    }
}
