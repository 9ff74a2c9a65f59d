//! MPNet's relative position bias: one learned scalar per (bucket of the
//! distance between a query and a key, head), added to that head's attention
//! scores before the softmax, the same in every layer.
//!
//! transformers computes it per padded batch from `arange(len)`; in a packed
//! batch positions restart at each input, so the bias of a score depends only
//! on `j - i` within its input. It is laid out at load, per head, by relative
//! position over every distance the model's positions allow: the forward adds
//! one contiguous slice per score row, with no per-batch work or allocation.

use crate::{Config, LoadError, Weights};

/// Buckets transformers' `MPNetEncoder.compute_position_bias` sorts relative
/// positions into: it passes 32 whatever `relative_attention_num_buckets`
/// says (32 in every MPNet checkpoint).
const BUCKETS: i64 = 32;
/// Distance from which on every key falls into its direction's last bucket.
const MAX_DISTANCE: i64 = 128;

/// The bucket of a key at `relative_position` (`j - i`) from its query `i`,
/// as transformers' `MPNetEncoder.relative_position_bucket` computes it
/// (T5's bidirectional bucketing): keys before the query in 0..16, after it
/// in 16..32; distances below 8 exact, then logarithmic up to 128, further
/// ones in the last bucket. The logarithm runs in f32 as torch runs it:
/// distances 16, 32 and 64 land exactly on bucket edges, where arithmetic
/// that rounded otherwise would pick the bucket below.
pub fn relative_position_bucket(relative_position: i64) -> usize {
    let half = BUCKETS / 2;
    let max_exact = half / 2;
    // transformers buckets n = -(j - i): positive for keys before the query.
    let n = -relative_position;
    let direction = if n < 0 { half } else { 0 };
    let n = n.abs();
    let within = if n < max_exact {
        n
    } else {
        let span = ((MAX_DISTANCE as f64) / (max_exact as f64)).ln() as f32;
        let log = (n as f32 / max_exact as f32).ln() / span * (half - max_exact) as f32;
        // torch's `.to(torch.long)` truncates toward zero.
        (max_exact + log as i64).min(half - 1)
    };
    (direction + within) as usize
}

/// Each head's bias for every relative position an input can have.
pub(crate) struct RelativeBias {
    /// `[heads, 2 x max_tokens - 1]`: head `h`'s bias for `j - i = r` at
    /// `h * width + r + max_tokens - 1`.
    table: Vec<f32>,
    width: usize,
    max_tokens: usize,
}

impl RelativeBias {
    /// `encoder.relative_attention_bias.weight` (`[buckets, heads]`), laid
    /// out by relative position for inputs up to [`Config::max_tokens`].
    pub(crate) fn load(weights: &Weights, config: &Config) -> Result<Self, LoadError> {
        let heads = config.num_attention_heads;
        let rows = config
            .relative_attention_num_buckets
            .unwrap_or(BUCKETS as usize);
        if rows < BUCKETS as usize {
            return Err(LoadError::Unsupported(format!(
                "relative_attention_num_buckets {rows} (MPNet sorts relative positions into {BUCKETS} buckets)"
            )));
        }
        let weight = weights.get("encoder.relative_attention_bias.weight", &[rows, heads])?;
        let max_tokens = config.max_tokens();
        let width = 2 * max_tokens - 1;
        let mut table = vec![0.0; heads * width];
        for r in 0..width {
            let bucket = relative_position_bucket(r as i64 - (max_tokens as i64 - 1));
            for (head, bias) in weight[bucket * heads..][..heads].iter().enumerate() {
                table[head * width + r] = *bias;
            }
        }
        Ok(Self {
            table,
            width,
            max_tokens,
        })
    }

    /// Adds `head`'s bias to one input's `[len, len]` attention scores
    /// (`len` at most `max_tokens`, which `Bert::check` holds).
    pub(crate) fn add(&self, scores: &mut [f32], len: usize, head: usize) {
        let by_position = &self.table[head * self.width..][..self.width];
        for (i, row) in scores.chunks_exact_mut(len).enumerate() {
            // Key j of query i sits at j - i + max_tokens - 1.
            let bias = &by_position[self.max_tokens - 1 - i..][..len];
            row.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
        }
    }
}
