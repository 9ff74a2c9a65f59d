//! A BERT encoder forward pass written for one job: sentence embeddings on
//! CPU, as fast as the cores allow.
//!
//! What it does differently from candle's generic `BertModel`:
//! - **No padding.** A batch is packed: the tokens of all its inputs are rows
//!   of one `[tokens, hidden]` matrix. Every dense layer (about 95% of the
//!   FLOPs) runs once over real tokens only; attention runs per input over
//!   its own rows, so there is no mask and no compute on pad tokens.
//! - **Fused, pre-laid-out projections.** Query, key and value are one
//!   `[hidden, 3 x hidden]` product; every weight is transposed once at load
//!   so products stream through contiguous memory; bias and residual are
//!   accumulated in place by the product itself.
//! - **Vectorised element-wise work.** GELU, softmax and LayerNorm run as
//!   AVX-512 / AVX2 loops chosen at run time ([`kernels`]).
//! - **Both cores busy.** Products are split by `gemm` across rayon's pool;
//!   attention runs (input, head) pairs in parallel.
//!
//! It runs BERT, XLM-RoBERTa / RoBERTa and MPNet checkpoints ([`Family`]):
//! the same encoder, RoBERTa's position ids starting after its padding index,
//! and MPNet's relative position bias added to every attention score
//! ([`position_bias`]).
//!
//! It computes the same function as the straightforward forward: the crate's
//! tests compare it with candle's `BertModel` on random mixed-length batches,
//! and the worker's golden test compares it with sentence-transformers.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16;
mod heads;
mod kernels;
mod matmul;
mod position_bias;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use matmul::Linear;
pub use position_bias::relative_position_bucket;
use position_bias::RelativeBias;

/// Rows per parallel task in the element-wise passes: big enough that the
/// task overhead is noise, small enough to split a batch across cores.
const ROWS_PER_TASK: usize = 32;

/// The fields of a Hugging Face `config.json` this forward needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// `bert`, `roberta`, `xlm-roberta` or `mpnet` ([`Config::family`]);
    /// absent in old BERT checkpoints, which it then means.
    #[serde(default)]
    pub model_type: Option<String>,
    /// RoBERTa's `padding_idx`: its position ids start at `pad_token_id + 1`
    /// (1 when absent, as in every RoBERTa and XLM-R checkpoint). Unused by
    /// BERT, and by MPNet, whose padding index transformers fixes at 1.
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    /// MPNet's rows of `encoder.relative_attention_bias` (32 in every
    /// checkpoint). Unused by the other families.
    #[serde(default)]
    pub relative_attention_num_buckets: Option<usize>,
}

/// The encoder families the packed forward runs: one shape, three ways of
/// telling the model where a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Positions 0, 1, 2, ... (`model_type` `bert`, or none).
    Bert,
    /// RoBERTa's positions `padding_idx + 1`, `padding_idx + 2`, ... (a
    /// token that is the padding id, spelled out in a text, takes
    /// `padding_idx` and is skipped, as in transformers) (`model_type`
    /// `roberta` or `xlm-roberta`).
    Roberta,
    /// MPNet (`model_type` `mpnet`, all-mpnet-base-v2): RoBERTa's positions
    /// after padding index 1, no token types, differently named attention
    /// weights, and a relative position bias shared by all layers added to
    /// each head's attention scores.
    Mpnet,
}

/// RoBERTa's `padding_idx` where `config.json` names none.
const ROBERTA_PADDING_IDX: usize = 1;
/// MPNet's `padding_idx`: transformers' `MPNetEmbeddings` fixes it at 1,
/// whatever `pad_token_id` says.
const MPNET_PADDING_IDX: usize = 1;

impl Config {
    /// The family `model_type` names, or why the packed forward runs none.
    pub fn family(&self) -> Result<Family, LoadError> {
        match self.model_type.as_deref() {
            None | Some("bert") => Ok(Family::Bert),
            Some("roberta" | "xlm-roberta") => Ok(Family::Roberta),
            Some("mpnet") => Ok(Family::Mpnet),
            Some(other) => Err(LoadError::Unsupported(format!(
                "model_type `{other}` (the packed forward runs `bert`, `roberta`, `xlm-roberta` and `mpnet`)"
            ))),
        }
    }

    /// RoBERTa's and MPNet's `padding_idx`: the token id whose tokens take
    /// position `padding_idx` and are not counted in the others' positions
    /// (transformers' `create_position_ids_from_input_ids`). None for BERT.
    pub fn padding_idx(&self) -> Option<usize> {
        match self.family() {
            Ok(Family::Roberta) => Some(self.pad_token_id.unwrap_or(ROBERTA_PADDING_IDX)),
            Ok(Family::Mpnet) => Some(MPNET_PADDING_IDX),
            _ => None,
        }
    }

    /// The position id of an input's first token: 0 for BERT,
    /// `padding_idx + 1` for RoBERTa and MPNet.
    pub fn position_offset(&self) -> usize {
        self.padding_idx().map_or(0, |idx| idx + 1)
    }

    /// Longest input in tokens, special tokens included: the positions the
    /// model has (`max_position_embeddings`, less RoBERTa's and MPNet's
    /// `padding_idx + 1`: 512 for XLM-R's and all-mpnet-base-v2's 514).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_hidden_act() -> String {
    "gelu".into()
}

fn default_position_embedding_type() -> String {
    "absolute".into()
}

/// How the dense layers (about 95% of the FLOPs) multiply.
///
/// Measured accuracy on all-MiniLM-L6-v2 (lowest cosine to the f32
/// reference over the golden texts and random mixed-length batches; see
/// docs/benchmarks.md): f32 and bf16x3 0.999999, bf16 (AMX or AVX512_BF16)
/// 0.99997.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Matmul {
    /// The fastest products that keep cosine >= 0.9999 to the f32 model:
    /// [`Matmul::AmxBf16`] where the CPU and kernel offer AMX, else
    /// [`Matmul::Avx512Bf16`] on an AMD CPU with AVX512_BF16, else
    /// [`Matmul::F32`]; each only where the model's widths fit it (see
    /// [`Cpu::auto`]). An Intel core without AMX issues one 512-bit
    /// `vdpbf16ps` per cycle against two f32 FMAs: the same peak, plus the
    /// conversions, and it measured 0.59x the f32 products on an Emerald
    /// Rapids with AMX hidden by its hypervisor (docs/benchmarks.md). For a
    /// classifier and for MPNet, [`Matmul::F32`]: plain bf16 products miss
    /// their bounds (for MPNet, all-mpnet-base-v2 gave a 384-token text
    /// cosine 0.9995 with them; docs/benchmarks.md).
    #[default]
    Auto,
    /// f32 products on the AVX-512 / AVX2 units.
    F32,
    /// AMX tile products on operands split into two bf16 parts each
    /// ("bf16x3": three bf16 products per f32 product): f32 accuracy (about
    /// 2^-17 relative per product), a little faster than [`Matmul::F32`].
    /// Loading fails where there is no AMX.
    AmxBf16x3,
    /// AMX tile products on bf16 operands with f32 accumulation: reduced
    /// precision (cosine about 0.99997 to f32), about twice as fast as
    /// [`Matmul::F32`]. Loading fails where there is no AMX.
    AmxBf16,
    /// `vdpbf16ps` products (AVX512_BF16: AMD Zen 4 and later, Intel Cooper
    /// Lake and Sapphire Rapids and later): the arithmetic of
    /// [`Matmul::AmxBf16`] (bf16 operands, f32 accumulation) on the vector
    /// units, for CPUs without AMX. Loading fails where the CPU lacks
    /// AVX512_BF16.
    Avx512Bf16,
}

impl Matmul {
    /// Whether this CPU and kernel offer AMX tiles to this process.
    pub fn amx_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return amx::available();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    /// Whether this CPU runs [`Matmul::Avx512Bf16`] products (it has every
    /// feature their code is compiled for: AVX-512F and AVX512_BF16).
    pub fn avx512_bf16_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return avx512_bf16::available();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    /// Whether this CPU (and kernel) can run these products; `Auto` always.
    pub fn available(self) -> bool {
        match self {
            Matmul::Auto | Matmul::F32 => true,
            Matmul::AmxBf16x3 | Matmul::AmxBf16 => Self::amx_available(),
            Matmul::Avx512Bf16 => Self::avx512_bf16_available(),
        }
    }

    /// The name `model.matmul` takes: `auto`, `f32`, `amx_bf16x3`,
    /// `amx_bf16`, `avx512_bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Matmul::Auto => "auto",
            Matmul::F32 => "f32",
            Matmul::AmxBf16x3 => "amx_bf16x3",
            Matmul::AmxBf16 => "amx_bf16",
            Matmul::Avx512Bf16 => "avx512_bf16",
        }
    }

    /// Whether the products round their operands to plain bf16 (f32
    /// accumulation): close enough for embeddings (cosine >= 0.9999), not
    /// for classifier scores.
    pub fn rounds_to_bf16(self) -> bool {
        matches!(self, Matmul::AmxBf16 | Matmul::Avx512Bf16)
    }

    /// Every kind, for parsing names.
    pub const ALL: [Matmul; 5] = [
        Matmul::Auto,
        Matmul::F32,
        Matmul::AmxBf16x3,
        Matmul::AmxBf16,
        Matmul::Avx512Bf16,
    ];

    /// `Auto` made concrete for this machine (for a model whose widths fit
    /// every kind); the others as they are.
    pub fn resolve(self) -> Matmul {
        self.resolve_for(|_| true)
    }

    /// `Auto` made concrete for this machine and a model whose widths
    /// `fits` says each kind can take.
    fn resolve_for(self, fits: impl Fn(Matmul) -> bool) -> Matmul {
        match self {
            Matmul::Auto => Cpu::this().auto(fits),
            other => other,
        }
    }
}

/// What a CPU offers the products, as [`Matmul::Auto`] weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    /// AMX tiles, granted to this process by the kernel.
    pub amx: bool,
    /// AVX-512F and AVX512_BF16 (every feature the `vdpbf16ps` kernels are
    /// compiled for).
    pub avx512_bf16: bool,
    /// An AMD CPU, whose `vdpbf16ps` outruns its f32 FMAs (Zen 4 and 5).
    pub amd: bool,
}

impl Cpu {
    /// This machine.
    pub fn this() -> Cpu {
        Cpu {
            amx: Matmul::amx_available(),
            avx512_bf16: Matmul::avx512_bf16_available(),
            amd: vendor_is_amd(),
        }
    }

    /// The products `auto` takes on this CPU for a model whose widths (and
    /// accuracy bounds) `fits` says each kind can take: AMX bf16 where there
    /// is AMX; AVX512_BF16 only on AMD, the one vendor where it is faster
    /// than f32 without AMX; else f32, which runs everywhere.
    pub fn auto(self, fits: impl Fn(Matmul) -> bool) -> Matmul {
        let offered = [
            (Matmul::AmxBf16, self.amx),
            (Matmul::Avx512Bf16, self.avx512_bf16 && self.amd),
        ];
        offered
            .into_iter()
            .find(|&(matmul, offered)| offered && fits(matmul))
            .map_or(Matmul::F32, |(matmul, _)| matmul)
    }
}

/// Whether CPUID names the vendor AMD (`AuthenticAMD`).
fn vendor_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 0: the vendor string in EBX, EDX, ECX.
        let leaf = std::arch::x86_64::__cpuid(0);
        let vendor = [leaf.ebx, leaf.edx, leaf.ecx]
            .map(u32::to_le_bytes)
            .concat();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl std::str::FromStr for Matmul {
    type Err = String;

    /// Parses the names [`Matmul::name`] gives.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Matmul::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Matmul::ALL.iter().map(|m| m.name()).collect();
                format!("unknown matmul `{name}` (one of {})", names.join(", "))
            })
    }
}

/// Whether every dense product of this model has the widths `matmul`'s
/// products take.
fn widths_fit(matmul: Matmul, config: &Config) -> bool {
    let (hidden, intermediate) = (config.hidden_size, config.intermediate_size);
    let shapes = [
        (hidden, hidden),
        (hidden, intermediate),
        (intermediate, hidden),
    ];
    #[cfg(target_arch = "x86_64")]
    let fits: fn(usize, usize) -> bool = match matmul {
        Matmul::Auto | Matmul::F32 => return true,
        Matmul::AmxBf16x3 | Matmul::AmxBf16 => amx::PackedWeight::fits,
        Matmul::Avx512Bf16 => avx512_bf16::PackedWeight::fits,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let fits = |_: usize, _: usize| matches!(matmul, Matmul::Auto | Matmul::F32);
    shapes.into_iter().all(|(k, n)| fits(k, n))
}

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average of the input's tokens.
    Mean,
    /// The first (`[CLS]`) token.
    Cls,
    /// Each dimension's largest value over the input's tokens.
    Max,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error(
        "weights have no tensor `{0}` (tried bare and with a `bert.`, `roberta.` or `mpnet.` prefix)"
    )]
    Missing(String),
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    Shape {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("input {index} has no tokens")]
    Empty { index: usize },
    #[error("input {index} has {len} tokens; the model takes at most {max}")]
    TooLong {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("input {index} has token id {id}, outside the vocabulary of {vocab}")]
    UnknownToken { index: usize, id: u32, vocab: usize },
    #[error("input {index} has {types} token type ids for {len} tokens, or one outside the model's {type_vocab} types")]
    TokenTypes {
        index: usize,
        len: usize,
        types: usize,
        type_vocab: usize,
    },
    #[error(
        "this model has no sequence classification head (load it with `Bert::load_classifier`)"
    )]
    NoClassifier,
}

/// Time spent in each stage of the forward, summed over layers and calls:
/// the profile that says where the time goes ([`Bert::embed_profiled`]).
#[derive(Debug, Clone, Default)]
pub struct StageTimes {
    pub embeddings: Duration,
    pub qkv_projection: Duration,
    pub attention: Duration,
    pub attention_output: Duration,
    pub intermediate: Duration,
    /// GELU and the output product: one stage, since on AMX tiles GELU runs
    /// as the product packs its input.
    pub gelu_output: Duration,
    pub layer_norm: Duration,
    pub pooling: Duration,
}

impl StageTimes {
    /// `(stage, time)` pairs in forward order.
    pub fn stages(&self) -> [(&'static str, Duration); 8] {
        [
            ("embeddings", self.embeddings),
            ("qkv projection", self.qkv_projection),
            ("attention", self.attention),
            ("attention output", self.attention_output),
            ("intermediate", self.intermediate),
            ("gelu + output", self.gelu_output),
            ("layer norm", self.layer_norm),
            ("pooling", self.pooling),
        ]
    }
}

/// Adds the time since the last mark to a stage, when profiling.
struct Stopwatch<'a> {
    times: Option<&'a mut StageTimes>,
    last: Instant,
}

impl Stopwatch<'_> {
    fn mark(&mut self, stage: fn(&mut StageTimes) -> &mut Duration) {
        if let Some(times) = self.times.as_deref_mut() {
            let now = Instant::now();
            *stage(times) += now - self.last;
            self.last = now;
        }
    }
}

struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn forward(&self, rows: &mut [f32]) {
        let width = self.gamma.len();
        rows.par_chunks_mut(width * ROWS_PER_TASK)
            .for_each(|chunk| kernels::layer_norm_rows(chunk, &self.gamma, &self.beta, self.eps));
    }
}

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The encoder, weights in the layouts the forward reads.
pub struct Bert {
    config: Config,
    matmul: Matmul,
    /// `[vocab, hidden]`.
    word_embeddings: Vec<f32>,
    /// `[max_position_embeddings, hidden]`: the position embeddings, with
    /// token type 0 already added (MPNet has no token types): sentence
    /// embedding inputs are single segments.
    position_embeddings: Vec<f32>,
    /// [`Config::padding_idx`], as a token id.
    padding_idx: Option<u32>,
    /// `[type_vocab, hidden]`: each token type's embedding minus type 0's,
    /// added for tokens of a second segment (a cross-encoder's document).
    /// Empty for MPNet, which has no token types.
    token_type_deltas: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    /// MPNet's bias on attention scores by relative position, per head.
    position_bias: Option<RelativeBias>,
    /// The sequence classification head, when loaded as a classifier.
    classifier: Option<heads::Classifier>,
    /// Activations kept between calls: fresh multi-megabyte buffers per batch
    /// would be fresh pages, and page faults cost as much as the LayerNorms.
    scratch: Mutex<Scratch>,
}

#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    intermediate: Vec<f32>,
}

/// Resizes `buffer` to `len` without shrinking its allocation.
fn sized(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buffer.resize(len, 0.0);
    &mut buffer[..len]
}

/// Looks tensors up by name in a safetensors file, bare or with the `bert.`,
/// `roberta.` or `mpnet.` prefix that some checkpoints carry.
struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let tensor = self
            .tensors
            .get(name)
            .or_else(|| self.tensors.get(&format!("bert.{name}")))
            .or_else(|| self.tensors.get(&format!("roberta.{name}")))
            .or_else(|| self.tensors.get(&format!("mpnet.{name}")))
            .ok_or_else(|| LoadError::Missing(name.to_string()))?;
        if tensor.dims() != shape {
            return Err(LoadError::Shape {
                name: name.to_string(),
                actual: tensor.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }

    /// LayerNorm parameters are `weight`/`bias` in new checkpoints and
    /// `gamma`/`beta` in old ones.
    fn layer_norm(&self, prefix: &str, width: usize, eps: f64) -> Result<LayerNorm, LoadError> {
        let gamma = self
            .get(&format!("{prefix}.weight"), &[width])
            .or_else(|_| self.get(&format!("{prefix}.gamma"), &[width]))?;
        let beta = self
            .get(&format!("{prefix}.bias"), &[width])
            .or_else(|_| self.get(&format!("{prefix}.beta"), &[width]))?;
        Ok(LayerNorm {
            gamma,
            beta,
            eps: eps as f32,
        })
    }

    fn linear(&self, prefix: &str, outputs: usize, inputs: usize) -> Result<Linear, LoadError> {
        let weight = self.get(&format!("{prefix}.weight"), &[outputs, inputs])?;
        let bias = self.get(&format!("{prefix}.bias"), &[outputs])?;
        Ok(Linear::from_torch(&weight, bias, outputs, inputs))
    }
}

impl Bert {
    /// Loads a `model.safetensors` (any float dtype; computed in f32).
    pub fn load(weights: &Path, config: Config, matmul: Matmul) -> Result<Self, LoadError> {
        let tensors = candle_core::safetensors::load(weights, &Device::Cpu)?;
        Self::from_tensors(tensors, config, matmul)
    }

    /// From tensors named as in a Hugging Face BERT checkpoint.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        config: Config,
        matmul: Matmul,
    ) -> Result<Self, LoadError> {
        Self::build(tensors, config, matmul, None)
    }

    fn build(
        tensors: HashMap<String, Tensor>,
        config: Config,
        matmul: Matmul,
        labels: Option<usize>,
    ) -> Result<Self, LoadError> {
        // `auto` skips the products that cannot take the model's widths, and
        // for a classifier the ones that round to bf16: its scores are held
        // to 1e-4 of the reference, which plain bf16 products miss (1e-3 on
        // the cross-encoder fixture, with two documents swapped). It skips
        // them for MPNet too: all-mpnet-base-v2 with avx512_bf16 gave one
        // golden text (384 tokens) cosine 0.9995, past the 0.9999 bound
        // `auto` keeps; asked for by name they run.
        let family = config.family()?;
        if labels.is_some() && matmul.rounds_to_bf16() {
            return Err(LoadError::Unsupported(format!(
                "{} products for a classifier: bf16 rounding moves rerank scores by \
                 about 1e-3 and can swap documents; use `auto`, `f32` or `amx_bf16x3`",
                matmul.name()
            )));
        }
        let exact = labels.is_some() || family == Family::Mpnet;
        let matmul =
            matmul.resolve_for(|m| widths_fit(m, &config) && !(exact && m.rounds_to_bf16()));
        if !matmul.available() {
            let missing = match matmul {
                Matmul::Avx512Bf16 => "this CPU offers no AVX512_BF16",
                _ => "this CPU or kernel offers no AMX",
            };
            return Err(LoadError::Unsupported(format!(
                "{matmul:?} products: {missing}"
            )));
        }
        if family == Family::Mpnet && labels.is_some() {
            return Err(LoadError::Unsupported(
                "an MPNet classifier: the packed forward reranks with \
                 BertForSequenceClassification checkpoints only"
                    .into(),
            ));
        }
        if config.max_tokens() == 0 {
            return Err(LoadError::Unsupported(format!(
                "max_position_embeddings {} leaves no position for a token after padding_idx {}",
                config.max_position_embeddings,
                config.position_offset() - 1
            )));
        }
        if config.type_vocab_size == 0 {
            return Err(LoadError::Unsupported(
                "type_vocab_size 0 (at least one token type)".into(),
            ));
        }
        if config.hidden_act != "gelu" {
            return Err(LoadError::Unsupported(format!(
                "hidden_act `{}` (only exact `gelu`)",
                config.hidden_act
            )));
        }
        if config.position_embedding_type != "absolute" {
            return Err(LoadError::Unsupported(format!(
                "position_embedding_type `{}` (only `absolute`)",
                config.position_embedding_type
            )));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(LoadError::Unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        let w = Weights { tensors };
        let hidden = config.hidden_size;
        let eps = config.layer_norm_eps;

        let word_embeddings = w.get(
            "embeddings.word_embeddings.weight",
            &[config.vocab_size, hidden],
        )?;
        let mut position_embeddings = w.get(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, hidden],
        )?;
        let padding_idx = config
            .padding_idx()
            .map(|idx| u32::try_from(idx).unwrap_or(u32::MAX));
        let token_type_deltas = if family == Family::Mpnet {
            Vec::new()
        } else {
            let token_types = w.get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, hidden],
            )?;
            let token_type = &token_types[..hidden];
            for row in position_embeddings.chunks_exact_mut(hidden) {
                for (p, t) in row.iter_mut().zip(token_type) {
                    *p += t;
                }
            }
            token_types
                .chunks_exact(hidden)
                .flat_map(|row| row.iter().zip(token_type).map(|(t, t0)| t - t0))
                .collect()
        };
        let embedding_norm = w.layer_norm("embeddings.LayerNorm", hidden, eps)?;
        let position_bias = match family {
            Family::Mpnet => Some(RelativeBias::load(&w, &config)?),
            Family::Bert | Family::Roberta => None,
        };
        // The same layer under two sets of names: BERT's (RoBERTa's too)
        // and MPNet's.
        let (query, key, value, attention_output, attention_norm) = match family {
            Family::Mpnet => (
                "attention.attn.q",
                "attention.attn.k",
                "attention.attn.v",
                "attention.attn.o",
                "attention.LayerNorm",
            ),
            Family::Bert | Family::Roberta => (
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "attention.output.LayerNorm",
            ),
        };

        let mut layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let qkv = Linear::concat(&[
                    w.linear(&format!("{p}.{query}"), hidden, hidden)?,
                    w.linear(&format!("{p}.{key}"), hidden, hidden)?,
                    w.linear(&format!("{p}.{value}"), hidden, hidden)?,
                ]);
                Ok(Layer {
                    qkv,
                    attention_out: w.linear(&format!("{p}.{attention_output}"), hidden, hidden)?,
                    attention_norm: w.layer_norm(&format!("{p}.{attention_norm}"), hidden, eps)?,
                    intermediate: w.linear(
                        &format!("{p}.intermediate.dense"),
                        config.intermediate_size,
                        hidden,
                    )?,
                    output: w.linear(
                        &format!("{p}.output.dense"),
                        hidden,
                        config.intermediate_size,
                    )?,
                    output_norm: w.layer_norm(&format!("{p}.output.LayerNorm"), hidden, eps)?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;

        for layer in &mut layers {
            for linear in [
                &mut layer.qkv,
                &mut layer.attention_out,
                &mut layer.intermediate,
                &mut layer.output,
            ] {
                linear.prepare(matmul)?;
            }
        }

        let classifier = match labels {
            Some(labels) => Some(heads::Classifier::load(&w, hidden, labels)?),
            None => None,
        };

        Ok(Self {
            config,
            matmul,
            word_embeddings,
            position_embeddings,
            padding_idx,
            token_type_deltas,
            embedding_norm,
            layers,
            position_bias,
            classifier,
            scratch: Mutex::default(),
        })
    }

    /// Loads a `BertForSequenceClassification` (or XLM-RoBERTa's) checkpoint:
    /// the encoder and its head (pooler and classifier, or RoBERTa's
    /// `classifier.dense` and `out_proj`) with `labels` outputs, for
    /// [`Bert::classify`].
    pub fn load_classifier(
        weights: &Path,
        config: Config,
        matmul: Matmul,
        labels: usize,
    ) -> Result<Self, LoadError> {
        let tensors = candle_core::safetensors::load(weights, &Device::Cpu)?;
        Self::build(tensors, config, matmul, Some(labels))
    }

    /// How many logits [`Bert::classify`] returns per input (`None`: this
    /// model has no classification head).
    pub fn labels(&self) -> Option<usize> {
        self.classifier.as_ref().map(heads::Classifier::labels)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The products this model runs (never `Auto`).
    pub fn matmul(&self) -> Matmul {
        self.matmul
    }

    /// One pooled (not normalised) embedding per input, in order. Each input
    /// is token ids with special tokens, at most [`Config::max_tokens`].
    pub fn embed(&self, batch: &[&[u32]], pooling: Pooling) -> Result<Vec<Vec<f32>>, ForwardError> {
        let hidden = self.config.hidden_size;
        self.forward(batch, None, None, |rows| heads::pool(rows, hidden, pooling))
    }

    /// The classifier's logits, one vector per input, in order: each input
    /// token ids with their token type ids (`[CLS] query [SEP]` type 0,
    /// `document [SEP]` type 1), as `BertForSequenceClassification`
    /// computes them. Needs a model loaded by [`Bert::load_classifier`].
    pub fn classify(
        &self,
        batch: &[&[u32]],
        type_ids: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let head = self.classifier.as_ref().ok_or(ForwardError::NoClassifier)?;
        let hidden = self.config.hidden_size;
        self.forward(batch, Some(type_ids), None, |rows| {
            head.forward(&rows[..hidden])
        })
    }

    /// [`Bert::embed`], adding the time of each stage to `times`.
    pub fn embed_profiled(
        &self,
        batch: &[&[u32]],
        pooling: Pooling,
        times: &mut StageTimes,
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let hidden = self.config.hidden_size;
        self.forward(batch, None, Some(times), |rows| {
            heads::pool(rows, hidden, pooling)
        })
    }

    /// The encoder over the packed batch, then `head` on each input's rows
    /// (`[len, hidden]`).
    fn forward(
        &self,
        batch: &[&[u32]],
        type_ids: Option<&[&[u32]]>,
        times: Option<&mut StageTimes>,
        head: impl Fn(&[f32]) -> Vec<f32>,
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let mut clock = Stopwatch {
            times,
            last: Instant::now(),
        };
        let spans = self.check(batch, type_ids)?;
        let tokens: usize = batch.iter().map(|ids| ids.len()).sum();
        let hidden = self.config.hidden_size;

        // One forward at a time per model: the worker calls from one thread.
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let Scratch {
            x,
            qkv,
            context,
            intermediate,
        } = &mut *scratch;
        let x = sized(x, tokens * hidden);
        let qkv = sized(qkv, tokens * 3 * hidden);
        let context = sized(context, tokens * hidden);
        let intermediate = sized(intermediate, tokens * self.config.intermediate_size);

        self.embeddings(batch, type_ids, x);
        clock.mark(|t| &mut t.embeddings);

        for layer in &self.layers {
            layer.qkv.forward(x, qkv, tokens);
            clock.mark(|t| &mut t.qkv_projection);
            self.attention(qkv, context, &spans);
            clock.mark(|t| &mut t.attention);
            layer.attention_out.forward_residual(context, x, tokens);
            clock.mark(|t| &mut t.attention_output);
            layer.attention_norm.forward(x);
            clock.mark(|t| &mut t.layer_norm);

            layer.intermediate.forward(x, intermediate, tokens);
            clock.mark(|t| &mut t.intermediate);
            layer.output.forward_residual_gelu(intermediate, x, tokens);
            clock.mark(|t| &mut t.gelu_output);
            layer.output_norm.forward(x);
            clock.mark(|t| &mut t.layer_norm);
        }

        let pooled = spans
            .iter()
            .map(|&(start, len)| head(&x[start * hidden..(start + len) * hidden]))
            .collect();
        clock.mark(|t| &mut t.pooling);
        Ok(pooled)
    }

    /// Validates the batch and returns each input's `(first row, rows)`.
    fn check(
        &self,
        batch: &[&[u32]],
        type_ids: Option<&[&[u32]]>,
    ) -> Result<Vec<(usize, usize)>, ForwardError> {
        if let Some(types) = type_ids {
            let type_vocab = self.config.type_vocab_size;
            // A batch without one type list per input is the caller's bug:
            // named by the first input that has none.
            for (index, ids) in batch.iter().enumerate() {
                let ok = types.get(index).is_some_and(|t| {
                    t.len() == ids.len() && t.iter().all(|&t| (t as usize) < type_vocab)
                });
                if !ok {
                    return Err(ForwardError::TokenTypes {
                        index,
                        len: ids.len(),
                        types: types.get(index).map_or(0, |t| t.len()),
                        type_vocab,
                    });
                }
            }
        }
        let mut spans = Vec::with_capacity(batch.len());
        let mut start = 0;
        for (index, ids) in batch.iter().enumerate() {
            let max = self.config.max_tokens();
            if ids.is_empty() {
                return Err(ForwardError::Empty { index });
            }
            if ids.len() > max {
                return Err(ForwardError::TooLong {
                    index,
                    len: ids.len(),
                    max,
                });
            }
            if let Some(&id) = ids
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(ForwardError::UnknownToken {
                    index,
                    id,
                    vocab: self.config.vocab_size,
                });
            }
            spans.push((start, ids.len()));
            start += ids.len();
        }
        Ok(spans)
    }

    /// Word + position (+ token type 0) embeddings of every token, and the
    /// second segment's token type where `type_ids` says (checked by
    /// [`Bert::check`]).
    fn embeddings(&self, batch: &[&[u32]], type_ids: Option<&[&[u32]]>, x: &mut [f32]) {
        let hidden = self.config.hidden_size;
        let mut rows = x.chunks_exact_mut(hidden);
        for (index, ids) in batch.iter().enumerate() {
            let types = type_ids.map(|t| t[index]);
            // RoBERTa and MPNet number an input's tokens from padding_idx + 1,
            // skipping any token that is the padding id (a text can spell the
            // pad token out): that one takes position padding_idx.
            let mut next = self.padding_idx.map_or(0, |pad| pad as usize + 1);
            for (position, &id) in ids.iter().enumerate() {
                let row = rows.next().expect("x has one row per token");
                let word = &self.word_embeddings[id as usize * hidden..][..hidden];
                let position_id = match self.padding_idx {
                    None => position,
                    Some(pad) if id == pad => pad as usize,
                    Some(_) => {
                        next += 1;
                        next - 1
                    }
                };
                let pos = &self.position_embeddings[position_id * hidden..][..hidden];
                for ((r, w), p) in row.iter_mut().zip(word).zip(pos) {
                    *r = w + p;
                }
                let token_type = types.map_or(0, |t| t[position] as usize);
                if token_type != 0 {
                    let delta = &self.token_type_deltas[token_type * hidden..][..hidden];
                    row.iter_mut().zip(delta).for_each(|(r, d)| *r += d);
                }
            }
        }
        self.embedding_norm.forward(x);
    }

    /// Scaled dot-product attention of every input with itself, head by
    /// head (MPNet adding its relative position bias to the scores before
    /// the softmax), written into `context` (`[tokens, hidden]`).
    fn attention(&self, qkv: &[f32], context: &mut [f32], spans: &[(usize, usize)]) {
        let heads = self.config.num_attention_heads;
        let hidden = self.config.hidden_size;
        let head_dim = hidden / heads;
        let stride = 3 * hidden;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let out = SharedMut(context.as_mut_ptr());

        (0..spans.len() * heads).into_par_iter().for_each_init(
            Vec::new,
            |scores: &mut Vec<f32>, task| {
                let (start, len) = spans[task / heads];
                let head = task % heads;
                scores.resize(len * len, 0.0);
                // SAFETY: q, k and v point at this input's rows and this head's
                // columns of `qkv` (`[tokens, 3 x hidden]`); each task writes
                // only its own (rows, head columns) block of `context`, so the
                // writes of parallel tasks never overlap.
                unsafe {
                    let q = qkv.as_ptr().add(start * stride + head * head_dim);
                    let k = q.add(hidden);
                    let v = q.add(2 * hidden);
                    // scores = scale * Q K^T: K read transposed through its strides.
                    gemm::gemm(
                        len,
                        len,
                        head_dim,
                        scores.as_mut_ptr(),
                        1,
                        len as isize,
                        false,
                        q,
                        1,
                        stride as isize,
                        k,
                        stride as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    if let Some(bias) = &self.position_bias {
                        bias.add(scores, len, head);
                    }
                    kernels::softmax_rows(scores, len);
                    // context rows of this head = softmax(scores) V.
                    gemm::gemm(
                        len,
                        head_dim,
                        len,
                        out.get().add(start * hidden + head * head_dim),
                        1,
                        hidden as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        len as isize,
                        v,
                        1,
                        stride as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
    }
}

/// A pointer that parallel tasks write through, each to its own region.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

// SAFETY: only used for disjoint writes, see `Bert::attention`.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method, not a field read, so closures capture the whole (Send) value.
    fn get(&self) -> *mut f32 {
        self.0
    }
}
