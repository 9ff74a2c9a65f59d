//! What sits on top of the encoder: sentence pooling, and the sequence
//! classification head of a cross-encoder (`BertForSequenceClassification`:
//! pooler dense + tanh on `[CLS]`, then the classifier;
//! `XLMRobertaForSequenceClassification`'s `RobertaClassificationHead`, the
//! same computation under other names). A head runs once per
//! input, not per token, so plain loops cost nothing next to the encoder and
//! the products stay out of the tuned kernels.

use crate::{LoadError, Pooling, Weights};

/// Pools the rows of one input (`[len, hidden]`) into one vector.
pub(crate) fn pool(rows: &[f32], hidden: usize, pooling: Pooling) -> Vec<f32> {
    let len = rows.len() / hidden;
    match pooling {
        Pooling::Cls => rows[..hidden].to_vec(),
        Pooling::Mean => {
            let mut mean = vec![0.0f32; hidden];
            for row in rows.chunks_exact(hidden) {
                for (m, v) in mean.iter_mut().zip(row) {
                    *m += v;
                }
            }
            mean.iter_mut().for_each(|m| *m /= len as f32);
            mean
        }
        Pooling::Max => {
            let mut max = rows[..hidden].to_vec();
            for row in rows.chunks_exact(hidden).skip(1) {
                for (m, v) in max.iter_mut().zip(row) {
                    *m = m.max(*v);
                }
            }
            max
        }
    }
}

/// A dense layer in PyTorch layout (`[out, in]`), for one vector at a time.
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

impl Dense {
    fn load(w: &Weights, prefix: &str, outputs: usize, inputs: usize) -> Result<Self, LoadError> {
        Ok(Self {
            weight: w.get(&format!("{prefix}.weight"), &[outputs, inputs])?,
            bias: w.get(&format!("{prefix}.bias"), &[outputs])?,
            inputs,
        })
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.weight
            .chunks_exact(self.inputs)
            .zip(&self.bias)
            .map(|(row, b)| b + row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>())
            .collect()
    }
}

/// A sequence classifier's head: logits from the first row (`[CLS]`, `<s>`).
pub(crate) struct Classifier {
    pooler: Dense,
    classifier: Dense,
}

impl Classifier {
    /// BERT's pooler and classifier, or, where the checkpoint has
    /// `classifier.out_proj` (RoBERTa's head: no pooler), its
    /// `classifier.dense` + tanh + `classifier.out_proj`.
    pub(crate) fn load(w: &Weights, hidden: usize, labels: usize) -> Result<Self, LoadError> {
        match Dense::load(w, "classifier.out_proj", labels, hidden) {
            Ok(out_proj) => Ok(Self {
                pooler: Dense::load(w, "classifier.dense", hidden, hidden)?,
                classifier: out_proj,
            }),
            Err(LoadError::Missing(_)) => Ok(Self {
                pooler: Dense::load(w, "pooler.dense", hidden, hidden)?,
                classifier: Dense::load(w, "classifier", labels, hidden)?,
            }),
            Err(other) => Err(other),
        }
    }

    pub(crate) fn labels(&self) -> usize {
        self.classifier.bias.len()
    }

    /// The logits of one input from its first (`[CLS]`) row.
    pub(crate) fn forward(&self, cls: &[f32]) -> Vec<f32> {
        let mut pooled = self.pooler.forward(cls);
        pooled.iter_mut().for_each(|v| *v = v.tanh());
        self.classifier.forward(&pooled)
    }
}
