//! Typed configuration for connections, the jobs stream and consumers. Each
//! default is a named constant next to the field it fills.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long start-up keeps retrying a server that is not up yet.
pub const DEFAULT_STARTUP_RETRY_FOR: Duration = Duration::from_secs(30);

/// How to reach NATS.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsConfig {
    /// Server URLs; the client fails over between them.
    pub urls: Vec<String>,
    /// Connection name shown by `nats server report connections`.
    pub name: String,
    #[serde(with = "humantime_secs")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_secs")]
    pub startup_retry_for: Duration,
    pub auth: Auth,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec![DEFAULT_URL.to_string()],
            name: "jetinfer".to_string(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            startup_retry_for: DEFAULT_STARTUP_RETRY_FOR,
            auth: Auth::None,
        }
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("urls", &self.urls)
            .field("name", &self.name)
            .field("connect_timeout", &self.connect_timeout)
            .field("startup_retry_for", &self.startup_retry_for)
            .field("auth", &self.auth)
            .finish()
    }
}

/// Credentials. Secrets are read from files so they never sit in a config dump;
/// `Debug` shows only which kind is configured.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Auth {
    #[default]
    None,
    /// A `.creds` file (user JWT and NKey seed).
    CredsFile { path: PathBuf },
    /// A file holding a bearer token.
    TokenFile { path: PathBuf },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::CredsFile { path } => write!(f, "CredsFile({})", path.display()),
            Self::TokenFile { path } => write!(f, "TokenFile({}, token redacted)", path.display()),
        }
    }
}

pub const DEFAULT_STREAM_NAME: &str = "JETINFER_JOBS";
pub const DEFAULT_STREAM_MAX_BYTES: i64 = 1024 * 1024 * 1024;
pub const DEFAULT_STREAM_MAX_MESSAGES: i64 = 1_000_000;
/// Default per-tenant queue quota (per model): a tenth of the stream, so no
/// one tenant can fill the queue for everybody.
pub const DEFAULT_MAX_JOBS_PER_TENANT: i64 = DEFAULT_STREAM_MAX_MESSAGES / 10;
/// JetStream de-duplicates on `Nats-Msg-Id` within this window.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The jobs stream: one stream, WorkQueue retention, file storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamSettings {
    pub name: String,
    pub max_bytes: i64,
    pub max_messages: i64,
    #[serde(with = "humantime_secs")]
    pub duplicate_window: Duration,
    /// Replicas of the jobs, results and dead-letter streams.
    pub replicas: usize,
    /// How long the results stream keeps results for producers catching up.
    #[serde(with = "humantime_secs")]
    pub results_max_age: Duration,
    /// Per-tenant queue quota: most jobs one tenant may have queued (stored,
    /// not yet answered) for one model, i.e. on one subject
    /// `jobs.<model>.<tenant>`. Past it JetStream refuses that tenant's new
    /// jobs (`QuotaExceeded`) while other tenants' keep flowing. 0: no quota.
    pub max_jobs_per_tenant: i64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: DEFAULT_STREAM_NAME.to_string(),
            max_bytes: DEFAULT_STREAM_MAX_BYTES,
            max_messages: DEFAULT_STREAM_MAX_MESSAGES,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            replicas: 1,
            results_max_age: crate::results::DEFAULT_RESULTS_MAX_AGE,
            max_jobs_per_tenant: DEFAULT_MAX_JOBS_PER_TENANT,
        }
    }
}

pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_DELIVER: i64 = 5;
pub const DEFAULT_MAX_ACK_PENDING: i64 = 1024;

/// A model's durable pull consumer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsumerSettings {
    /// Time a worker has to answer a job before JetStream redelivers it.
    #[serde(with = "humantime_secs")]
    pub ack_wait: Duration,
    /// Deliveries before JetStream gives up on a job.
    pub max_deliver: i64,
    /// Jobs handed out and not yet acked, across all workers of the model.
    pub max_ack_pending: i64,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            ack_wait: DEFAULT_ACK_WAIT,
            max_deliver: DEFAULT_MAX_DELIVER,
            max_ack_pending: DEFAULT_MAX_ACK_PENDING,
        }
    }
}

/// Durations in config files are written as (fractional) seconds.
pub(crate) mod humantime_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}
