//! The reference outputs the golden tests compare against, and the checks
//! they share: all-MiniLM-L6-v2's embeddings from sentence-transformers
//! (`../shared/data/minilm_golden.json`), and the random-weight fixtures in
//! `worker/tests/fixtures/models` (`scripts/fixtures/make_models.py`), whose
//! references transformers / sentence-transformers computed on the same
//! weights.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use jetinfer_nats::testing::NatsServer;
use jetinfer_schemas::{ErrorCode, Job, JobOptions, Reranked, Truncation};
use jetinfer_worker::config::{BackendKind, BatchConfig, ForwardKind, ModelConfig};
use jetinfer_worker::load_backend;
use serde::Deserialize;

pub use super::fixtures::{fixture, MIN_COSINE};
use super::fixtures::{products, SentenceReference};
use super::{client, cosine, shared_data, start_worker, worker_config};

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

/// Serves the sentence model fixture `name` with each kind of products this
/// CPU offers (packed forward) through a real nats-server, and asserts what
/// a user gets matches its `reference.json`: the tokenizer's ids, every
/// embedding (one job per text, batched by the worker, and all texts in one
/// job), token counts and truncation flags, and a typed error for the text
/// past `max_seq_length` when the job asks to reject rather than truncate.
pub async fn assert_served_through_nats(name: &str) {
    let want = SentenceReference::load(name);
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
        config.model.name = name.into();
        config.model.path = fixture(name);
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
                "{name} text {i}"
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
                    "{name} {matmul:?} text {i} {:?}: cosine {cos} to sentence-transformers'",
                    want.texts[i]
                );
                lowest = lowest.min(cos);
            }
            let counts: Vec<u32> = texts.iter().map(|&i| want.token_counts[i]).collect();
            let truncated: Vec<bool> = texts.iter().map(|&i| want.truncated[i]).collect();
            assert_eq!(result.token_counts, counts, "job {j}");
            assert_eq!(result.truncated, truncated, "job {j}");
        }
        eprintln!("{name} through NATS, {matmul:?}: lowest cosine {lowest}");

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
            .expect_err("a text past max_seq_length with truncation `reject`");
        assert_eq!(error.code, ErrorCode::InputTooLong);
        worker.shutdown().await;
    }
}

/// A copy of the fixture `name` (its files and module folders such as
/// `1_Pooling`) with `edit` applied to one of its files.
pub fn edited(name: &str, file: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
    fn copy_dir(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir(&target).unwrap();
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&fixture(name), copy.path());
    let path = copy.path().join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
    copy
}

/// Why the model directory `dir` fails to load with `forward`.
pub fn load_error(dir: &Path, forward: ForwardKind) -> String {
    match load_backend(&ModelConfig {
        path: dir.to_path_buf(),
        forward,
        ..Default::default()
    }) {
        Ok(_) => panic!("{} loaded with {forward:?}", dir.display()),
        Err(err) => err.to_string(),
    }
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
