//! The model behind a small trait, so the queue does not care what computes
//! the embeddings: [`candle::CandleBackend`] runs a BERT-family model,
//! [`echo::EchoBackend`] returns deterministic vectors for queue tests.

pub mod candle;
pub mod echo;

use jetinfer_schemas::{ModelInfo, Task};

/// One tokenised input: a text, or a rerank job's (query, document) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Token ids, special tokens included, at most `max_seq_len` long.
    pub ids: Vec<u32>,
    /// Whether the text was cut to fit `max_seq_len`.
    pub truncated: bool,
    /// A pair's token type ids (0 for `[CLS] query [SEP]`, 1 for
    /// `document [SEP]`), one per id; empty for a single text (all 0).
    pub type_ids: Vec<u32>,
}

impl Tokens {
    /// A single text's tokens (every token type 0).
    pub fn single(ids: Vec<u32>, truncated: bool) -> Self {
        Self {
            ids,
            truncated,
            type_ids: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("loading model from {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenising: {0}")]
    Tokenize(String),
    /// A rerank query that leaves no room for a document within the
    /// model's length: the job is answered `input_too_long`.
    #[error("the query has {tokens} tokens; with a document and the pair's 3 special tokens the model takes at most {max}")]
    QueryTooLong { tokens: usize, max: usize },
    /// A failure that may pass (memory, a busy device): the job is retried.
    #[error("forward pass: {0}")]
    Forward(String),
    /// The forward pass panicked (message escaped and bounded by
    /// `supervise::panic_message`). Caught by the inference stage, never
    /// returned by a backend.
    #[error("the model panicked: {0}")]
    Panicked(String),
    /// The backend broke its contract of one embedding per input. Found by
    /// the inference stage, never returned by a backend.
    #[error("the backend returned {vectors} embeddings for {inputs} inputs")]
    WrongCount { inputs: usize, vectors: usize },
    /// The backend can compute nothing any more (e.g. a lost device): the
    /// inference stage ends and the worker stops, handing its jobs back.
    #[error("the backend is unusable: {0}")]
    Unusable(String),
}

impl BackendError {
    /// Whether running the same input again can only fail the same way (a
    /// panic, a broken contract): its job gets an `internal` error reply and
    /// a dead letter at once rather than redeliveries up to `max_deliver`.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Panicked(_) | Self::WrongCount { .. })
    }
}

/// What the worker needs from a model. Both methods are blocking and are only
/// called from dedicated threads, never on the async runtime.
pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> &ModelInfo;

    /// How the model computes, for operators (the `compute` label of
    /// `jetinfer_model_loaded`): device, forward pass and products, e.g.
    /// `cpu packed amx_bf16`. A worker that fell back to slower products
    /// shows it here.
    fn compute(&self) -> String;

    /// Longest input, in tokens, the model accepts.
    fn max_seq_len(&self) -> usize;

    /// Whether a batch costs its longest input times its inputs (padded, as
    /// most models run) rather than the sum of its inputs' tokens (packed).
    /// The batcher budgets `batch.max_tokens` by this.
    fn pads_batches(&self) -> bool {
        true
    }

    /// Tokenises one text, truncating it to `max_seq_len`.
    fn tokenize(&self, text: &str) -> Result<Tokens, BackendError>;

    /// Pooled (not normalised) embeddings, one per input, in order. The
    /// inference stage checks the count, and catches a panic: the backend
    /// must stay usable after one (hold no state a panic leaves half
    /// updated), or return [`BackendError::Unusable`].
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, BackendError>;

    /// What the model does, decided by its directory: embed, or rerank for a
    /// cross-encoder. Intake answers a job asking for the other task
    /// `unsupported_task`.
    fn task(&self) -> Task {
        Task::Embed
    }

    /// A rerank job's pairs, `[CLS] query [SEP] document [SEP]` with token
    /// type ids, one per document, each cut to `max_seq_len` longest first
    /// (as transformers and sentence-transformers' `CrossEncoder` cut);
    /// [`BackendError::QueryTooLong`] when the query alone leaves no room.
    fn tokenize_pairs(
        &self,
        query: &str,
        documents: &[String],
    ) -> Result<Vec<Tokens>, BackendError> {
        let _ = (query, documents);
        Err(BackendError::Tokenize(
            "this model does not rerank: it has no classification head".into(),
        ))
    }

    /// A cross-encoder's logits, one vector per pair, in order; the same
    /// contract as [`Backend::embed`].
    fn classify(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>, BackendError> {
        let _ = batch;
        Err(BackendError::Unusable(
            "this model does not rerank: it has no classification head".into(),
        ))
    }

    /// What the inference stage runs for a batch: [`Backend::embed`] or,
    /// for a reranking model, [`Backend::classify`].
    fn run(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>, BackendError> {
        match self.task() {
            Task::Rerank => self.classify(batch),
            _ => {
                let ids: Vec<&[u32]> = batch.iter().map(|t| t.ids.as_slice()).collect();
                self.embed(&ids)
            }
        }
    }
}

/// The logistic function: a cross-encoder's logit as a 0..1 relevance score.
pub fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

/// Scales `v` to unit length in place (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}
