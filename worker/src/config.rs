//! The worker's configuration: one typed struct, loaded by figment from
//! defaults, an optional TOML file and `JETINFER_*` environment variables
//! (nested keys joined by `__`, e.g. `JETINFER_BATCH__MAX_INPUTS=16`).
//!
//! A worker serves one model (`[model]` and `[batch]`) or several
//! (`[[models]]`, each entry a `[model]` table with its own `batch`): what
//! an entry leaves out it takes from `[model]` and `[batch]`, so those two
//! are the defaults of every entry. [`WorkerConfig::served`] is the list
//! either way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use jetinfer_nats::{ConsumerSettings, NatsConfig, StreamSettings};
use jetinfer_schemas::Limits;
use serde::{Deserialize, Serialize};

/// Default model name: the subject token producers address (`jobs.minilm.<tenant>`).
pub const DEFAULT_MODEL_NAME: &str = "minilm";
/// Default model directory, as laid out by `scripts/setup.sh`.
pub const DEFAULT_MODEL_PATH: &str = ".cache/models/all-MiniLM-L6-v2";
/// Batch size that gave the most texts/s with the packed CPU forward
/// (`scripts/bench-throughput.sh`, docs/benchmarks.md); the padded candle
/// forward is held near 8 by the token budget below on realistic lengths.
pub const DEFAULT_MAX_BATCH_INPUTS: usize = 32;
/// Token budget per batch, counted as the forward pays (`batch::Cost`): real
/// tokens when packed, longest input x inputs when padded (8 inputs at the
/// model's 256-token maximum).
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
/// No wait for company: an idle model takes what waits at once, and a busy
/// one lets the next batch grow while it runs (`batch::run`). A wait buys
/// nothing at saturation, where the model is never idle (ARCHITECTURE.md,
/// "Batching").
pub const DEFAULT_MAX_BATCH_WAIT: Duration = Duration::ZERO;
/// Messages requested per JetStream pull.
pub const DEFAULT_PULL_BATCH: usize = 128;
/// How long one pull request waits for messages; also bounds how long a
/// draining worker waits for a pull it already sent.
pub const DEFAULT_PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Time a stopping worker has to finish what it holds before it NAKs the rest.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// First and largest delay before a job that failed transiently is redelivered.
pub const DEFAULT_RETRY_MIN_DELAY: Duration = Duration::from_secs(1);
pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);
/// Metrics and probes on loopback unless the operator opens them up.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9464";
/// How often the worker reads queue depth from JetStream.
pub const DEFAULT_QUEUE_POLL: Duration = Duration::from_secs(5);
/// How long the worker may stay disconnected from NATS before it exits:
/// longer than a server restart or a cluster failover takes, short enough
/// that an orchestrator replaces a worker whose network is gone.
pub const DEFAULT_MAX_DISCONNECTED: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerConfig {
    pub nats: NatsConfig,
    pub stream: StreamSettings,
    pub consumer: ConsumerSettings,
    /// The model, when `models` is empty; else the defaults of its entries.
    pub model: ModelConfig,
    /// `model`'s batch limits; else the defaults of every entry's `batch`.
    pub batch: BatchConfig,
    /// Several models in one worker: one consumer, batcher and inference
    /// thread each. Empty: the one model `model` and `batch` describe.
    pub models: Vec<ServedModel>,
    pub pull: PullConfig,
    pub limits: Limits,
    pub reply: ReplyConfig,
    pub rate_limit: RateLimitConfig,
    pub retry: RetryConfig,
    pub shutdown: ShutdownConfig,
    pub supervision: SupervisionConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub monitoring: MonitoringConfig,
}

impl WorkerConfig {
    /// Defaults, then `file` (if given), then `JETINFER_*` variables; each
    /// `[[models]]` entry then completed from `[model]` and `[batch]`.
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(WorkerConfig::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let figment = figment.merge(Env::prefixed("JETINFER_").split("__"));
        let mut config: WorkerConfig = figment.extract().map_err(Box::new)?;
        // Extracted above with the built-in defaults; again with the top level's.
        if figment.find_value("models").is_ok() {
            let entries: Vec<figment::value::Value> =
                figment.extract_inner("models").map_err(Box::new)?;
            config.models = entries
                .into_iter()
                .enumerate()
                .map(|(index, entry)| config.inherit(index, entry))
                .collect::<Result<_, _>>()?;
        }
        config
            .check_models()
            .map_err(|e| Box::new(e.to_string().into()))?;
        Ok(config)
    }

    /// `[[models]]` entry `index` with what it leaves out taken from
    /// `[model]` and `[batch]`. Its `name` it must give.
    fn inherit(
        &self,
        index: usize,
        entry: figment::value::Value,
    ) -> Result<ServedModel, Box<figment::Error>> {
        if entry.find_ref("name").is_none() {
            return Err(Box::new(
                format!("[[models]] entry {index} has no name: each model needs its own").into(),
            ));
        }
        let defaults = ServedModel {
            model: self.model.clone(),
            batch: self.batch,
        };
        Figment::from(Serialized::defaults(defaults))
            .merge(Serialized::defaults(entry))
            .extract()
            .map_err(|e| Box::new(e.with_path(&format!("models[{index}]"))))
    }

    /// Every model this worker serves: the `[[models]]` entries, or the one
    /// `[model]` with `[batch]` when there are none.
    pub fn served(&self) -> Vec<ServedModel> {
        if self.models.is_empty() {
            vec![ServedModel {
                model: self.model.clone(),
                batch: self.batch,
            }]
        } else {
            self.models.clone()
        }
    }

    /// Refuses two entries of one name: they would share one queue.
    pub fn check_models(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::BTreeSet::new();
        for served in &self.models {
            if !seen.insert(served.model.name.as_str()) {
                return Err(ConfigError::DuplicateModel(served.model.name.clone()));
            }
        }
        Ok(())
    }
}

/// A configuration that cannot be served as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("[[models]] names {0:?} twice: each model is served once per worker")]
    DuplicateModel(String),
}

/// One model a worker serves: a `[model]` table (flattened: `name`, `path`,
/// `backend`, `forward`, `matmul`, ...) and its own batch limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServedModel {
    #[serde(flatten)]
    pub model: ModelConfig,
    #[serde(default)]
    pub batch: BatchConfig,
}

/// Which inference backend serves the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// The BERT-family model at `path`, run by candle.
    #[default]
    Candle,
    /// Deterministic vectors without a model, for testing the queue.
    Echo,
}

/// Where candle runs the model: `cpu`, `cuda` (the GPU `model.cuda_ordinal`
/// names, 0 unless set) or `cuda:N` (GPU N).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// A CUDA GPU (needs the `cuda` cargo feature); `None`: the one
    /// `model.cuda_ordinal` names.
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| Self::Cuda(Some(n)))
                .ok_or_else(|| format!("{other:?}: expected cpu, cuda or cuda:N (N a GPU number)")),
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The number type candle's forward computes in (`model.dtype`). The packed
/// CPU forward has its own knob, `model.matmul`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// Full precision: the golden bound (cosine >= 0.9999) holds.
    #[default]
    F32,
    /// Half precision (weights and activations; softmax and layer norm
    /// accumulate in f32 inside candle's kernels). For GPUs: half the
    /// memory traffic, tensor cores. docs/benchmarks.md has its accuracy.
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa, for GPUs with bf16
    /// tensor cores (Ampere and later).
    Bf16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

/// Which forward pass computes a BERT model's embeddings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardKind {
    /// `packed` on CPU, `candle` on CUDA.
    #[default]
    Auto,
    /// jetinfer's own CPU forward (`jetinfer-bert`): batches packed without
    /// padding, fused projections, vectorised kernels. CPU only.
    Packed,
    /// candle's stock `BertModel`, inputs padded to the longest of the batch.
    Candle,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// Name producers use in subjects and jobs.
    pub name: String,
    pub backend: BackendKind,
    /// Directory with config.json, tokenizer.json, model.safetensors and
    /// (optionally) sentence_bert_config.json.
    pub path: PathBuf,
    /// Reported model id; defaults to the directory's name.
    pub id: Option<String>,
    /// Reported revision; defaults to a hash of the weights.
    pub revision: Option<String>,
    pub device: DeviceKind,
    /// The GPU `device = "cuda"` runs on (`cuda:N` names one directly).
    pub cuda_ordinal: usize,
    /// Candle forward only: the number type it computes in.
    pub dtype: Dtype,
    /// Candle backend only: which forward pass runs the model.
    pub forward: ForwardKind,
    /// Packed forward only: how its dense layers multiply. `auto` (bf16
    /// products with f32 accumulation on AMX tiles, else on AVX512_BF16 on
    /// an AMD CPU, else f32 on AVX-512/AVX2; f32 for a cross-encoder and for
    /// MPNet),
    /// `f32`, `amx_bf16x3` (f32 accuracy on AMX),
    /// `amx_bf16` or `avx512_bf16` (see docs/benchmarks.md for their
    /// measured accuracy).
    pub matmul: jetinfer_bert::Matmul,
    /// Echo backend only: simulated compute per padded token, in microseconds.
    pub echo_delay_per_token_us: u64,
}

impl ModelConfig {
    /// The CUDA device the model runs on, `None` on CPU.
    pub fn cuda_device(&self) -> Option<usize> {
        match self.device {
            DeviceKind::Cpu => None,
            DeviceKind::Cuda(n) => Some(n.unwrap_or(self.cuda_ordinal)),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_MODEL_NAME.to_string(),
            backend: BackendKind::Candle,
            path: PathBuf::from(DEFAULT_MODEL_PATH),
            id: None,
            revision: None,
            device: DeviceKind::Cpu,
            cuda_ordinal: 0,
            dtype: Dtype::F32,
            forward: ForwardKind::Auto,
            matmul: jetinfer_bert::Matmul::Auto,
            echo_delay_per_token_us: 0,
        }
    }
}

/// The three batching knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchConfig {
    /// Most inputs (across jobs) in one forward pass.
    pub max_inputs: usize,
    /// Most padded tokens in one forward pass (longest input x inputs).
    pub max_tokens: usize,
    /// Longest an input waits for company once it is first in line and the
    /// model is idle (0: none; a busy model lets batches grow anyway).
    #[serde(with = "millis")]
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_inputs: DEFAULT_MAX_BATCH_INPUTS,
            max_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_wait: DEFAULT_MAX_BATCH_WAIT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PullConfig {
    /// Messages requested per pull.
    pub batch: usize,
    /// How long one pull request waits for messages.
    #[serde(with = "millis")]
    pub expires: Duration,
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            batch: DEFAULT_PULL_BATCH,
            expires: DEFAULT_PULL_EXPIRES,
        }
    }
}

/// Redelivery of jobs that failed for a reason that may pass (a backend
/// error, a reply that could not be published): NAK with a growing delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryConfig {
    #[serde(with = "millis")]
    pub min_delay: Duration,
    #[serde(with = "millis")]
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            min_delay: DEFAULT_RETRY_MIN_DELAY,
            max_delay: DEFAULT_RETRY_MAX_DELAY,
        }
    }
}

impl RetryConfig {
    /// Delay before the redelivery that follows delivery number `delivered`.
    pub fn delay(&self, delivered: i64) -> Duration {
        use backon::BackoffBuilder;
        let attempt = usize::try_from(delivered.max(1) - 1).unwrap_or(0);
        backon::ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .without_max_times()
            .build()
            .nth(attempt)
            .unwrap_or(self.max_delay)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShutdownConfig {
    /// Seconds a stopping worker spends finishing the jobs it holds; what is
    /// left after that is NAKed so another worker takes it at once.
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// When a running worker gives up on its own (`crate::supervise`): a
/// pipeline stage gone stops it at once; a NATS connection only after this
/// long. While disconnected `/readyz` answers 503 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SupervisionConfig {
    /// Seconds disconnected from NATS (async-nats reconnecting) before the
    /// worker stops and exits non-zero, so an orchestrator restarts it.
    #[serde(with = "secs")]
    pub max_disconnected: Duration,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            max_disconnected: DEFAULT_MAX_DISCONNECTED,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// One JSON object per line instead of human-readable text.
    pub json: bool,
}

/// Long durations in config are written in (fractional) seconds.
mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Duration::try_from_secs_f64(f64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// A file holding a bearer token that `/metrics` then requires
    /// (`Authorization: Bearer <token>`); the probes stay open. Only the path
    /// is ever shown, never the token.
    pub metrics_token_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_HTTP_ADDR.parse().expect("valid default address"),
            metrics_token_file: None,
        }
    }
}

/// Reply-subject confinement: the subjects a job's result may be published
/// to, as patterns in which `{tenant}` stands for the tenant of the job's
/// subject. A job asking for anything else is dead-lettered with reason
/// `forbidden_reply_subject` and nothing is published for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplyConfig {
    pub allow: Vec<String>,
}

impl Default for ReplyConfig {
    fn default() -> Self {
        Self {
            allow: jetinfer_nats::subjects::default_reply_patterns(),
        }
    }
}

/// Per-tenant rate limits of this worker process: `default` for every tenant
/// without an entry in `tenants` (an entry replaces the default as a whole).
/// Every limit of 0 is no limit (the default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimitConfig {
    pub default: TenantRate,
    pub tenants: BTreeMap<String, TenantRate>,
}

/// One tenant's limits, by count and by cost. A job must pass each limit
/// that is set: jobs and inputs are counted before tokenisation, tokens
/// (the sum of the job's inputs' real tokens) after it. A job that costs
/// more than a burst can never pass it and is answered `too_costly`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantRate {
    /// Sustained jobs per second (fractions allowed); 0: unlimited.
    pub jobs_per_second: f64,
    /// Jobs accepted at once after a quiet spell; 0: one second's worth.
    pub burst: u32,
    /// Sustained inputs per second, over all the tenant's jobs; 0: unlimited.
    pub inputs_per_second: f64,
    /// Inputs accepted at once; 0: one second's worth. Also the most inputs
    /// one job may carry under this limit.
    pub inputs_burst: u32,
    /// Sustained tokens per second (real tokens, after truncation); 0:
    /// unlimited.
    pub tokens_per_second: f64,
    /// Tokens accepted at once; 0: one second's worth. Also the most tokens
    /// one job may cost under this limit.
    pub tokens_burst: u32,
    /// Most jobs of the tenant one worker holds at once (admitted, not yet
    /// answered); past it a job is answered `rate_limited`. 0: no cap. It
    /// keeps one tenant from taking every delivery slot the consumer's
    /// `max_ack_pending` allows, which would hold other tenants' jobs in
    /// the stream behind its own.
    pub max_held_jobs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MonitoringConfig {
    /// How often queue depth and stream usage are read from JetStream.
    #[serde(with = "millis")]
    pub queue_poll: Duration,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            queue_poll: DEFAULT_QUEUE_POLL,
        }
    }
}

/// Short durations in config are written in milliseconds (`max_wait = 5`).
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_toml(text: &str) -> Result<WorkerConfig, Box<figment::Error>> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        WorkerConfig::load(Some(file.path()))
    }

    #[test]
    fn a_config_without_models_serves_its_one_model_as_before() {
        let config = load_toml(
            r#"
            [model]
            name = "e5"
            path = "/models/e5"
            [batch]
            max_inputs = 8
            "#,
        )
        .unwrap();
        assert!(config.models.is_empty());
        let served = config.served();
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].model.name, "e5");
        assert_eq!(served[0].model.path, PathBuf::from("/models/e5"));
        assert_eq!(served[0].batch.max_inputs, 8);
        assert_eq!(served[0].batch.max_tokens, DEFAULT_MAX_BATCH_TOKENS);
    }

    #[test]
    fn each_models_entry_takes_what_it_leaves_out_from_model_and_batch() {
        let config = load_toml(
            r#"
            [model]
            path = "/models/shared"
            forward = "packed"
            matmul = "f32"
            echo_delay_per_token_us = 7
            [batch]
            max_inputs = 8
            max_wait = 3

            [[models]]
            name = "minilm"

            [[models]]
            name = "rerank"
            path = "/models/cross-encoder"
            backend = "echo"
            matmul = "auto"
            batch = { max_tokens = 512 }
            "#,
        )
        .unwrap();
        let served = config.served();
        assert_eq!(served.len(), 2);
        let (minilm, rerank) = (&served[0], &served[1]);
        assert_eq!(minilm.model.name, "minilm");
        assert_eq!(minilm.model.path, PathBuf::from("/models/shared"));
        assert_eq!(minilm.model.forward, ForwardKind::Packed);
        assert_eq!(minilm.model.matmul, jetinfer_bert::Matmul::F32);
        assert_eq!(minilm.model.backend, BackendKind::Candle);
        assert_eq!(
            minilm.batch,
            BatchConfig {
                max_inputs: 8,
                max_tokens: DEFAULT_MAX_BATCH_TOKENS,
                max_wait: Duration::from_millis(3),
            }
        );
        assert_eq!(rerank.model.name, "rerank");
        assert_eq!(rerank.model.path, PathBuf::from("/models/cross-encoder"));
        assert_eq!(rerank.model.backend, BackendKind::Echo);
        assert_eq!(rerank.model.matmul, jetinfer_bert::Matmul::Auto);
        assert_eq!(rerank.model.forward, ForwardKind::Packed, "inherited");
        assert_eq!(rerank.model.echo_delay_per_token_us, 7, "inherited");
        assert_eq!(
            rerank.batch,
            BatchConfig {
                max_inputs: 8,
                max_tokens: 512,
                max_wait: Duration::from_millis(3),
            },
            "a partial batch table keeps the rest of [batch]"
        );
    }

    #[test]
    fn a_models_entry_without_a_name_or_a_name_twice_is_refused_saying_so() {
        let err = load_toml("[[models]]\npath = \"/m\"\n").unwrap_err();
        assert!(err.to_string().contains("entry 0 has no name"), "{err}");
        let err = load_toml("[[models]]\nname = \"a\"\n[[models]]\nname = \"a\"\n").unwrap_err();
        assert!(err.to_string().contains("\"a\" twice"), "{err}");
    }

    #[test]
    fn a_bad_value_in_a_models_entry_is_refused_naming_the_entry() {
        let err =
            load_toml("[[models]]\nname = \"a\"\n[[models]]\nname = \"b\"\nforward = \"fast\"\n")
                .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("models.1") && text.contains("fast"), "{text}");
    }

    #[test]
    fn a_device_is_cpu_cuda_or_cuda_with_a_gpu_number() {
        let parsed = |text: &str| text.parse::<DeviceKind>();
        assert_eq!(parsed("cpu"), Ok(DeviceKind::Cpu));
        assert_eq!(parsed("cuda"), Ok(DeviceKind::Cuda(None)));
        assert_eq!(parsed("cuda:3"), Ok(DeviceKind::Cuda(Some(3))));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA"] {
            assert!(parsed(bad).is_err(), "{bad} refused");
        }
        let model = |device| ModelConfig {
            device,
            cuda_ordinal: 2,
            ..Default::default()
        };
        assert_eq!(model(DeviceKind::Cpu).cuda_device(), None);
        assert_eq!(model(DeviceKind::Cuda(None)).cuda_device(), Some(2));
        assert_eq!(model(DeviceKind::Cuda(Some(1))).cuda_device(), Some(1));
        assert_eq!(DeviceKind::Cuda(Some(1)).to_string(), "cuda:1");
    }
}
