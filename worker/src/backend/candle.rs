//! A BERT-family model run by candle: a sentence-embedding model (pooling
//! from `1_Pooling/config.json`, mean when absent), truncation at
//! `max_seq_length` from `sentence_bert_config.json`, and padding only to the
//! longest input of each batch; or a cross-encoder for rerank jobs, when
//! `config.json` names `BertForSequenceClassification` (either forward) or
//! `XLMRobertaForSequenceClassification` (packed forward).
//! XLM-RoBERTa / RoBERTa and MPNet models (`model_type`) run on the packed
//! forward only, their length capped at the positions after `padding_idx`.
//!
//! Two forward passes compute the same embeddings: jetinfer's own packed CPU
//! forward (`jetinfer-bert`, the default on CPU: no padding at all) and
//! candle's stock `BertModel` (inputs padded to the batch's longest; the one
//! that runs on CUDA). `model.forward` picks one.
//!
//! The model's `tokenizer.json` may carry its own fixed padding and truncation
//! (all-MiniLM-L6-v2's pads everything to 128 and cuts at 128); both are
//! replaced here, or most compute goes to padding and long texts embed wrongly.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use jetinfer_bert::Pooling;
use jetinfer_schemas::{ModelInfo, Task};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenizers::{PostProcessor, Tokenizer, TruncationParams};

use super::{Backend, BackendError, Tokens};
use crate::config::{DeviceKind, Dtype, ForwardKind, ModelConfig};

/// BERT's `[CLS]`, and `[SEP]` after each of query and document: a pair's
/// special tokens where the tokenizer has no post-processor to say (XLM-R's
/// `<s> A </s></s> B </s>` has 4).
const PAIR_SPECIAL_TOKENS: usize = 3;

/// Hex digits of the weights' SHA-256 used as revision when none is configured.
const REVISION_HEX_LEN: usize = 12;

/// `sentence_bert_config.json`. sentence-transformers 6 leaves
/// `max_seq_length` out and keeps it as the tokenizer's `model_max_length`
/// (`tokenizer_config.json`).
#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// `tokenizer_config.json`.
#[derive(Deserialize)]
struct TokenizerConfig {
    model_max_length: Option<f64>,
}

/// `1_Pooling/config.json` (sentence-transformers): `pooling_mode`, a mode
/// name or a list of them (concatenated), or in older files one
/// `pooling_mode_*` flag per mode. Read as sentence-transformers reads it:
/// `pooling_mode` wins, no flag set means mean.
#[derive(Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode: Option<PoolingModes>,
    #[serde(flatten)]
    flags: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PoolingModes {
    One(String),
    Several(Vec<String>),
}

/// The older files' flags and the mode each stands for, in
/// sentence-transformers' order.
const POOLING_FLAGS: [(&str, &str); 6] = [
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
    ("pooling_mode_weightedmean_tokens", "weightedmean"),
    ("pooling_mode_lasttoken", "lasttoken"),
];

impl PoolingConfig {
    /// The pooling the file asks for, or why jetinfer cannot compute it:
    /// mean, CLS and max are computed; any other mode, or several at once,
    /// refuses to load, naming them.
    fn pooling(&self) -> Result<Pooling, String> {
        let modes: Vec<String> = match &self.pooling_mode {
            Some(PoolingModes::One(mode)) => vec![mode.clone()],
            Some(PoolingModes::Several(modes)) => modes.clone(),
            None => POOLING_FLAGS
                .iter()
                .filter(|(flag, _)| self.flags.get(*flag).and_then(|v| v.as_bool()) == Some(true))
                .map(|(_, mode)| mode.to_string())
                .collect(),
        };
        match modes.as_slice() {
            [] => Ok(Pooling::Mean),
            [one] => match one.as_str() {
                "mean" => Ok(Pooling::Mean),
                "cls" => Ok(Pooling::Cls),
                "max" => Ok(Pooling::Max),
                other => Err(format!(
                    "pooling mode {other:?} is not supported: jetinfer computes mean, cls or max"
                )),
            },
            several => Err(format!(
                "pooling modes {several:?} together (concatenated) are not supported: jetinfer computes one of mean, cls or max"
            )),
        }
    }
}

/// What `config.json` says about the model's kind.
#[derive(Deserialize)]
struct Architecture {
    #[serde(default)]
    architectures: Vec<String>,
    /// Labels of a classification head: one per output.
    #[serde(default)]
    id2label: BTreeMap<String, serde_json::Value>,
}

/// The architectures a cross-encoder's `config.json` may name: BERT's, and
/// XLM-RoBERTa's and RoBERTa's (`RobertaClassificationHead`, no pooler).
const CROSS_ENCODERS: [&str; 3] = [
    "BertForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "RobertaForSequenceClassification",
];
/// Outputs a cross-encoder must have: one relevance logit per pair.
const RERANK_LABELS: usize = 1;

impl Architecture {
    /// The task the model directory serves, or why it serves none.
    fn task(&self) -> Result<Task, String> {
        if let Some(kind) = self
            .architectures
            .iter()
            .find(|a| CROSS_ENCODERS.contains(&a.as_str()))
        {
            let labels = self.id2label.len().max(1);
            if labels != RERANK_LABELS {
                return Err(format!(
                    "{kind} with {labels} labels: reranking needs one relevance logit"
                ));
            }
            return Ok(Task::Rerank);
        }
        if let Some(other) = self
            .architectures
            .iter()
            .find(|a| a.ends_with("ForSequenceClassification"))
        {
            return Err(format!(
                "architecture {other} is not served: cross-encoders must be one of {}",
                CROSS_ENCODERS.join(", ")
            ));
        }
        Ok(Task::Embed)
    }
}

enum Encoder {
    Packed(Box<jetinfer_bert::Bert>),
    Candle(Box<BertModel>),
    CandleClassifier(Box<CrossEncoder>),
}

/// `BertForSequenceClassification` on candle's `BertModel` (the forward that
/// runs on CUDA): the encoder, then the pooler (dense + tanh on `[CLS]`) and
/// the classifier, as transformers computes it.
struct CrossEncoder {
    bert: BertModel,
    pooler: candle_nn::Linear,
    classifier: candle_nn::Linear,
}

impl CrossEncoder {
    fn load(vb: VarBuilder, config: &BertConfig, labels: usize) -> candle_core::Result<Self> {
        let bert = BertModel::load(vb.clone(), config)?;
        // transformers writes the head beside `bert.*`; checkpoints saved
        // from the bare encoder put the pooler at the top level.
        let pooler = candle_nn::linear(
            config.hidden_size,
            config.hidden_size,
            vb.pp("bert.pooler.dense"),
        )
        .or_else(|_| {
            candle_nn::linear(
                config.hidden_size,
                config.hidden_size,
                vb.pp("pooler.dense"),
            )
        })?;
        let classifier = candle_nn::linear(config.hidden_size, labels, vb.pp("classifier"))?;
        Ok(Self {
            bert,
            pooler,
            classifier,
        })
    }
}

pub struct CandleBackend {
    encoder: Encoder,
    tokenizer: Tokenizer,
    device: Device,
    dtype: Dtype,
    pooling: Pooling,
    task: Task,
    max_seq_len: usize,
    pad_id: u32,
    info: ModelInfo,
}

fn load_err(path: &Path, message: impl std::fmt::Display) -> BackendError {
    BackendError::Load {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, BackendError> {
    let text = std::fs::read_to_string(path).map_err(|e| load_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| load_err(path, e))
}

impl CandleBackend {
    /// Loads the model directory named by `config.path`.
    pub fn load(config: &ModelConfig) -> Result<Self, BackendError> {
        let dir = &config.path;
        let device = device(config)?;
        let config_file = dir.join("config.json");
        // The packed forward's view of config.json: its family (BERT,
        // XLM-RoBERTa / RoBERTa or MPNet) decides the positions an input may
        // take. candle's view is read only for the candle forward: MPNet's
        // config.json has fields candle's BERT requires missing.
        let packed: jetinfer_bert::Config = read_json(&config_file)?;
        let family = packed.family().map_err(|e| load_err(&config_file, e))?;
        let hidden_size = packed.hidden_size;
        let pad_id = packed.pad_token_id.unwrap_or(0) as u32;
        let task = read_json::<Architecture>(&config_file)?
            .task()
            .map_err(|why| load_err(&config_file, why))?;

        let sbert = dir.join("sentence_bert_config.json");
        let tokenizer_config = dir.join("tokenizer_config.json");
        let declared = if sbert.exists() {
            read_json::<SentenceBertConfig>(&sbert)?.max_seq_length
        } else {
            None
        };
        // Only where sentence_bert_config.json exists but is silent: older
        // tokenizers write a huge placeholder, which the cap below absorbs.
        let declared = match declared {
            None if sbert.exists() && tokenizer_config.exists() => {
                read_json::<TokenizerConfig>(&tokenizer_config)?
                    .model_max_length
                    .filter(|m| *m >= 1.0)
                    .map(|m| m.min(usize::MAX as f64) as usize)
            }
            declared => declared,
        };
        // RoBERTa's positions start after padding_idx: XLM-R's 514 take 512.
        let max_seq_len = declared
            .unwrap_or(packed.max_tokens())
            .min(packed.max_tokens());

        let pooling_file = dir.join("1_Pooling/config.json");
        let pooling = if pooling_file.exists() {
            read_json::<PoolingConfig>(&pooling_file)?
                .pooling()
                .map_err(|why| load_err(&pooling_file, why))?
        } else {
            Pooling::Mean
        };

        let tokenizer_file = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_file).map_err(|e| load_err(&tokenizer_file, e))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_len,
                ..Default::default()
            }))
            .map_err(|e| load_err(&tokenizer_file, e))?;

        let weights = dir.join("model.safetensors");
        let revision = match &config.revision {
            Some(revision) => revision.clone(),
            None => file_revision(&weights)?,
        };
        let on_cuda = matches!(config.device, DeviceKind::Cuda(_));
        let encoder = match (config.forward, on_cuda) {
            (ForwardKind::Candle, _) | (ForwardKind::Auto, true)
                if task == Task::Rerank && config.dtype != Dtype::F32 =>
            {
                // Measured on the cross-encoder fixture (candle, CPU): f16
                // moved scores by up to 2e-3 and bf16 by 2e-2, reordering
                // documents; rerank scores are held to 1e-4.
                return Err(load_err(
                    dir,
                    format!(
                        "model.dtype `{}` is too coarse for a rerank model (its scores moved past 1e-4 \
                         and documents changed places): set model.dtype = \"f32\"",
                        config.dtype.name()
                    ),
                ));
            }
            (ForwardKind::Candle, _) | (ForwardKind::Auto, true)
                if family != jetinfer_bert::Family::Bert =>
            {
                let kind = match family {
                    jetinfer_bert::Family::Mpnet => "an MPNet model",
                    _ => "an XLM-RoBERTa / RoBERTa model",
                };
                return Err(load_err(
                    dir,
                    format!(
                        "{kind} runs on the packed forward only (CPU): leave model.forward `auto` or set `packed`"
                    ),
                ));
            }
            (ForwardKind::Candle, _) | (ForwardKind::Auto, true)
                if config.matmul != jetinfer_bert::Matmul::Auto =>
            {
                return Err(load_err(
                    dir,
                    "model.matmul applies to the packed forward only: leave it `auto` with the candle forward",
                ))
            }
            (ForwardKind::Candle, _) | (ForwardKind::Auto, true) => {
                let bert: BertConfig = read_json(&config_file)?;
                // SAFETY: the weights file is memory-mapped read-only and must
                // not be modified while the worker runs, as with any mmapped model.
                let vb = unsafe {
                    VarBuilder::from_mmaped_safetensors(
                        std::slice::from_ref(&weights),
                        candle_dtype(config.dtype),
                        &device,
                    )
                }
                .map_err(|e| load_err(&weights, e))?;
                match task {
                    Task::Rerank => Encoder::CandleClassifier(Box::new(
                        CrossEncoder::load(vb, &bert, RERANK_LABELS)
                            .map_err(|e| load_err(&weights, e))?,
                    )),
                    _ => Encoder::Candle(Box::new(
                        BertModel::load(vb, &bert).map_err(|e| load_err(&weights, e))?,
                    )),
                }
            }
            (_, false) if config.dtype != Dtype::F32 => {
                return Err(load_err(
                    dir,
                    "model.dtype applies to the candle forward only: set model.forward = \"candle\", \
                     or use model.matmul for the packed forward's products",
                ))
            }
            (ForwardKind::Packed, true) => {
                return Err(load_err(
                    dir,
                    "the packed forward runs on CPU only: set model.forward = \"candle\" for CUDA",
                ))
            }
            (ForwardKind::Packed | ForwardKind::Auto, false) => {
                    let bert = match task {
                        Task::Rerank => jetinfer_bert::Bert::load_classifier(
                            &weights,
                            packed,
                            config.matmul,
                            RERANK_LABELS,
                        ),
                        _ => jetinfer_bert::Bert::load(&weights, packed, config.matmul),
                    }
                    .map_err(|e| load_err(&weights, e))?;
                    tracing::info!(products = ?bert.matmul(), "packed forward loaded");
                    Encoder::Packed(Box::new(bert))
                }
            };

        let info = ModelInfo {
            id: config.id.clone().unwrap_or_else(|| dir_name(dir)),
            revision,
            dimension: match task {
                Task::Rerank => RERANK_LABELS as u32,
                _ => hidden_size as u32,
            },
        };
        Ok(Self {
            encoder,
            tokenizer,
            device,
            dtype: config.dtype,
            pooling,
            task,
            max_seq_len,
            pad_id,
            info,
        })
    }

    fn forward(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, BackendError> {
        let forward_err = |e: &dyn std::fmt::Display| BackendError::Forward(e.to_string());
        match &self.encoder {
            Encoder::Packed(bert) => bert.embed(batch, self.pooling).map_err(|e| forward_err(&e)),
            Encoder::Candle(model) => self
                .forward_padded(model, batch)
                .map_err(|e| forward_err(&e)),
            Encoder::CandleClassifier(_) => Err(BackendError::Unusable(
                "a cross-encoder answers rerank jobs, not embeddings".into(),
            )),
        }
    }

    /// candle's `BertModel`: pad to the longest input, mask, pool.
    fn forward_padded(
        &self,
        model: &BertModel,
        batch: &[&[u32]],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let ids = self.padded(batch, self.pad_id)?;
        let mask = self.mask(batch)?;
        let token_types = ids.zeros_like()?;
        // Pooled in f32 whatever the forward computed in: a mean over up to
        // 512 half-precision rows would lose digits the model kept.
        let hidden = model
            .forward(&ids, &token_types, Some(&mask))?
            .to_dtype(DType::F32)?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Max => {
                // Padding must not win the max: it is pushed far below any value.
                let pad = mask
                    .to_dtype(DType::F32)?
                    .affine(1.0, -1.0)?
                    .affine(1e9, 0.0)?;
                hidden.broadcast_add(&pad.unsqueeze(2)?)?.max(1)?
            }
            Pooling::Mean => {
                // Average over real tokens only: padding must not dilute the mean.
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                let counts = mask.sum(1)?;
                summed.broadcast_div(&counts)?
            }
        };
        pooled.to_dtype(DType::F32)?.to_vec2()
    }

    /// The cross-encoder's logits for a batch of tokenised pairs, padded to
    /// the longest (token types padded with 0, masked out anyway).
    fn classify_padded(
        &self,
        model: &CrossEncoder,
        batch: &[&Tokens],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let ids: Vec<&[u32]> = batch.iter().map(|t| t.ids.as_slice()).collect();
        let types: Vec<&[u32]> = batch.iter().map(|t| t.type_ids.as_slice()).collect();
        let mask = self.mask(&ids)?;
        let hidden = model.bert.forward(
            &self.padded(&ids, self.pad_id)?,
            &self.padded(&types, 0)?,
            Some(&mask),
        )?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = cls.apply(&model.pooler)?.tanh()?;
        pooled
            .apply(&model.classifier)?
            .to_dtype(DType::F32)?
            .to_vec2()
    }

    /// `rows` padded with `pad` to the longest, as a `[batch, longest]` tensor.
    fn padded(&self, rows: &[&[u32]], pad: u32) -> candle_core::Result<Tensor> {
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(rows.len() * width);
        for row in rows {
            flat.extend_from_slice(row);
            flat.resize(flat.len() + width - row.len(), pad);
        }
        Tensor::from_vec(flat, (rows.len(), width), &self.device)
    }

    /// 1 over each row's tokens, 0 over its padding.
    fn mask(&self, rows: &[&[u32]]) -> candle_core::Result<Tensor> {
        let ones: Vec<Vec<u32>> = rows.iter().map(|r| vec![1; r.len()]).collect();
        let ones: Vec<&[u32]> = ones.iter().map(Vec::as_slice).collect();
        self.padded(&ones, 0)
    }
}

fn device(config: &ModelConfig) -> Result<Device, BackendError> {
    let Some(ordinal) = config.cuda_device() else {
        return Ok(Device::Cpu);
    };
    // cudarc loads libcuda when first asked and panics when it cannot (no
    // driver on this machine): that is a load error like any other, said
    // plainly, not a worker that dies with a backtrace.
    let created = std::panic::catch_unwind(|| Device::new_cuda(ordinal)).map_err(|panic| {
        load_err(
            &config.path,
            format!(
                "no CUDA driver could be loaded for GPU {ordinal} ({}): \
                 is an NVIDIA driver installed and the GPU visible?",
                crate::supervise::panic_message(panic.as_ref())
            ),
        )
    })?;
    created.map_err(|e| {
        load_err(
            &config.path,
            format!(
                "GPU {ordinal}: {e} (CUDA needs a build with `--features cuda`, an NVIDIA \
                 driver and a GPU with that number)"
            ),
        )
    })
}

fn candle_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// A short content hash of the weights, so results name exactly what made them.
fn file_revision(path: &PathBuf) -> Result<String, BackendError> {
    let mut file = std::fs::File::open(path).map_err(|e| load_err(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| load_err(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(hex[..REVISION_HEX_LEN].to_string())
}

impl Backend for CandleBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn compute(&self) -> String {
        match &self.encoder {
            Encoder::Packed(bert) => format!("cpu packed {}", bert.matmul().name()),
            Encoder::Candle(_) | Encoder::CandleClassifier(_) => format!(
                "{} candle {}",
                if self.device.is_cuda() { "cuda" } else { "cpu" },
                self.dtype.name()
            ),
        }
    }

    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    fn pads_batches(&self) -> bool {
        matches!(
            self.encoder,
            Encoder::Candle(_) | Encoder::CandleClassifier(_)
        )
    }

    fn tokenize(&self, text: &str) -> Result<Tokens, BackendError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| BackendError::Tokenize(e.to_string()))?;
        Ok(Tokens::single(
            encoding.get_ids().to_vec(),
            !encoding.get_overflowing().is_empty(),
        ))
    }

    fn task(&self) -> Task {
        self.task
    }

    fn tokenize_pairs(
        &self,
        query: &str,
        documents: &[String],
    ) -> Result<Vec<Tokens>, BackendError> {
        if self.task != Task::Rerank {
            return Err(BackendError::Tokenize("this model does not rerank".into()));
        }
        let tokenize_err = |e: tokenizers::Error| BackendError::Tokenize(e.to_string());
        let alone = self.tokenizer.encode(query, false).map_err(tokenize_err)?;
        let query_tokens = alone.get_ids().len()
            + alone
                .get_overflowing()
                .iter()
                .map(|o| o.get_ids().len())
                .sum::<usize>();
        let special = self
            .tokenizer
            .get_post_processor()
            .map_or(PAIR_SPECIAL_TOKENS, |p| p.added_tokens(true));
        if query_tokens + special >= self.max_seq_len {
            return Err(BackendError::QueryTooLong {
                tokens: query_tokens,
                max: self.max_seq_len,
            });
        }
        documents
            .iter()
            .map(|document| {
                let encoding = self
                    .tokenizer
                    .encode((query, document.as_str()), true)
                    .map_err(tokenize_err)?;
                Ok(Tokens {
                    truncated: !encoding.get_overflowing().is_empty(),
                    ids: encoding.get_ids().to_vec(),
                    type_ids: encoding.get_type_ids().to_vec(),
                })
            })
            .collect()
    }

    fn classify(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>, BackendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let forward_err = |e: &dyn std::fmt::Display| BackendError::Forward(e.to_string());
        match &self.encoder {
            Encoder::Packed(bert) => {
                let ids: Vec<&[u32]> = batch.iter().map(|t| t.ids.as_slice()).collect();
                let types: Vec<&[u32]> = batch.iter().map(|t| t.type_ids.as_slice()).collect();
                bert.classify(&ids, &types).map_err(|e| forward_err(&e))
            }
            Encoder::CandleClassifier(model) => self
                .classify_padded(model, batch)
                .map_err(|e| forward_err(&e)),
            Encoder::Candle(_) => Err(BackendError::Unusable(
                "this model embeds: it has no classification head".into(),
            )),
        }
    }

    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, BackendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(batch)
    }
}

/// Used and total memory of CUDA device `ordinal`, in bytes (CUDA builds).
#[cfg(feature = "cuda")]
pub fn gpu_memory(ordinal: usize) -> Option<(u64, u64)> {
    use candle_core::cuda_backend::cudarc::driver::{result, CudaContext};
    // Binds the device's primary context (the one candle uses) to this thread.
    let _context = CudaContext::new(ordinal).ok()?;
    let (free, total) = result::mem_get_info().ok()?;
    Some(((total - free) as u64, total as u64))
}
