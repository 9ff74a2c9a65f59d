//! A backend without a model: "tokens" are whitespace-separated words hashed to
//! ids, and each embedding is a deterministic function of its token ids. It
//! lets queue and batching tests run in milliseconds and check that every
//! result carries its own inputs' vectors. Tests can make it misbehave on a
//! marker word ([`EchoFault`]); the worker's configuration cannot, so a
//! deployed echo backend never does.

use std::time::Duration;

use jetinfer_schemas::ModelInfo;

use super::{Backend, BackendError, Tokens};

pub const ECHO_DIMENSION: usize = 8;
pub const ECHO_MAX_SEQ_LEN: usize = 256;
const CLS: u32 = 101;
const SEP: u32 = 102;

pub struct EchoBackend {
    info: ModelInfo,
    max_seq_len: usize,
    /// Simulated compute per padded token, so tests can make batches slow.
    delay_per_token: Duration,
    /// Marker words and what the forward pass does when a batch holds one.
    faults: Vec<(u32, EchoFault)>,
}

/// How the echo backend misbehaves on a batch holding a marker word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoFault {
    /// Returns [`BackendError::Forward`], as a model that chokes would.
    Error,
    /// Panics.
    Panic,
    /// Returns one embedding fewer than it was given inputs.
    ShortResult,
    /// Returns [`BackendError::Unusable`], as a lost device would.
    Unusable,
}

/// The message the echo backend panics with ([`EchoFault::Panic`]).
pub const ECHO_PANIC_MESSAGE: &str = "echo: told to panic on a marker input";

impl Default for EchoBackend {
    fn default() -> Self {
        Self::new(ECHO_MAX_SEQ_LEN, Duration::ZERO)
    }
}

impl EchoBackend {
    pub fn new(max_seq_len: usize, delay_per_token: Duration) -> Self {
        Self {
            info: ModelInfo {
                id: "jetinfer/echo".to_string(),
                revision: "1".to_string(),
                dimension: ECHO_DIMENSION as u32,
            },
            max_seq_len,
            delay_per_token,
            faults: Vec::new(),
        }
    }

    /// Makes every batch holding `word` fail, as a model that chokes on one
    /// input would.
    pub fn with_poison(self, word: &str) -> Self {
        self.with_fault(word, EchoFault::Error)
    }

    /// Makes every batch holding `word` misbehave as `fault` says.
    pub fn with_fault(mut self, word: &str, fault: EchoFault) -> Self {
        self.faults.push((word_id(word), fault));
        self
    }

    /// The vector this backend returns for `text`, before normalisation.
    pub fn expected(&self, text: &str) -> Vec<f32> {
        let tokens = self.tokenize(text).expect("echo tokenisation never fails");
        vector(&tokens.ids)
    }
}

fn word_id(word: &str) -> u32 {
    // FNV-1a: stable across runs and platforms.
    let hash = word.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x01000193)
    });
    1000 + hash % 29_000
}

fn vector(ids: &[u32]) -> Vec<f32> {
    let mut v = vec![0f32; ECHO_DIMENSION];
    v[0] = ids.len() as f32;
    for (i, &id) in ids.iter().enumerate() {
        v[1 + i % (ECHO_DIMENSION - 1)] += (id % 997) as f32 / 997.0;
    }
    v
}

impl Backend for EchoBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn compute(&self) -> String {
        "echo".to_string()
    }

    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    fn tokenize(&self, text: &str) -> Result<Tokens, BackendError> {
        let mut ids = vec![CLS];
        ids.extend(text.split_whitespace().map(word_id));
        let truncated = ids.len() + 1 > self.max_seq_len;
        ids.truncate(self.max_seq_len - 1);
        ids.push(SEP);
        Ok(Tokens::single(ids, truncated))
    }

    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, BackendError> {
        let padded = batch.iter().map(|ids| ids.len()).max().unwrap_or(0) * batch.len();
        if !self.delay_per_token.is_zero() {
            std::thread::sleep(self.delay_per_token * padded as u32);
        }
        let mut vectors: Vec<Vec<f32>> = batch.iter().map(|ids| vector(ids)).collect();
        for &(marker, fault) in &self.faults {
            if !batch.iter().any(|ids| ids.contains(&marker)) {
                continue;
            }
            match fault {
                EchoFault::Error => {
                    return Err(BackendError::Forward("echo: poisoned input".into()))
                }
                EchoFault::Panic => panic!("{ECHO_PANIC_MESSAGE}"),
                EchoFault::ShortResult => {
                    vectors.pop();
                }
                EchoFault::Unusable => {
                    return Err(BackendError::Unusable("echo: told to give up".into()))
                }
            }
        }
        Ok(vectors)
    }
}
