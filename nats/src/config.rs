//! Typed configuration for connections, the jobs stream and consumers. Each
//! default is a named constant next to the field it fills.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long start-up keeps retrying a server that is not up yet.
pub const DEFAULT_STARTUP_RETRY_FOR: Duration = Duration::from_secs(30);

/// Prefix of reply inboxes when none is configured: async-nats' own.
pub const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

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
    pub tls: TlsConfig,
    /// Prefix of this client's reply subjects (JetStream API replies, PubAcks,
    /// pulled jobs). A server that confines its users gives each role its own
    /// (`_INBOX_<role>`, see `deploy/nats/accounts.conf`), so no user can
    /// subscribe to another's replies.
    pub inbox_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec![DEFAULT_URL.to_string()],
            name: "jetinfer".to_string(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            startup_retry_for: DEFAULT_STARTUP_RETRY_FOR,
            auth: Auth::None,
            tls: TlsConfig::default(),
            inbox_prefix: DEFAULT_INBOX_PREFIX.to_string(),
        }
    }
}

impl NatsConfig {
    /// `base`, then the `[nats]` table of the TOML `file` (if given; a
    /// worker's config file will do), then `JETINFER_NATS__*` environment
    /// variables: the same keys, in the same order, as the worker reads. For
    /// the producer CLI and loadgen, which have no config struct of their own.
    pub fn load(base: NatsConfig, file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        use figment::providers::{Env, Format, Serialized, Toml};
        let mut figment = figment::Figment::from(Serialized::default("nats", base));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            .merge(Env::prefixed("JETINFER_").split("__"))
            .extract_inner("nats")
            .map_err(Box::new)
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
            .field("tls", &self.tls)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

/// How the client proves who it is. Secrets are never config values: each
/// kind names a file that holds the secret (mount it from a secret store, or
/// point a `JETINFER_NATS__AUTH__*_FILE` variable at it), read only when
/// connecting. So neither the config dump nor `Debug` can show one.
///
/// ```toml
/// [nats.auth]
/// kind = "nkey"                          # none | token | user_password | nkey | creds
/// seed_file = "/run/secrets/nats-seed"
/// ```
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Auth {
    #[default]
    None,
    /// A file holding a token (server `authorization { token }`).
    Token { token_file: PathBuf },
    /// A user name and a file holding its password.
    UserPassword {
        user: String,
        password_file: PathBuf,
    },
    /// A file holding a user NKey seed (`SU...`); the server knows only the
    /// public key.
    Nkey { seed_file: PathBuf },
    /// A `.creds` file (decentralised JWT auth): the user JWT and its NKey seed.
    Creds { creds_file: PathBuf },
}

impl Auth {
    /// The kind as written in config, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Token { .. } => "token",
            Self::UserPassword { .. } => "user_password",
            Self::Nkey { .. } => "nkey",
            Self::Creds { .. } => "creds",
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths and the user name only; the secrets are not in memory here anyway.
        match self {
            Self::None => f.write_str("None"),
            Self::Token { token_file } => {
                write!(f, "Token(file {}, redacted)", token_file.display())
            }
            Self::UserPassword {
                user,
                password_file,
            } => write!(
                f,
                "UserPassword(user {user:?}, password file {}, redacted)",
                password_file.display()
            ),
            Self::Nkey { seed_file } => {
                write!(f, "Nkey(seed file {}, redacted)", seed_file.display())
            }
            Self::Creds { creds_file } => {
                write!(f, "Creds(file {}, redacted)", creds_file.display())
            }
        }
    }
}

/// TLS towards the server. A server with a `tls` block gets TLS whatever is
/// set here (it asks for it); these settings say whom to trust and who we are.
///
/// ```toml
/// [nats.tls]
/// required = true                         # never talk to a server in plain text
/// ca_file = "/etc/jetinfer/nats-ca.pem"   # trust this CA instead of the system's
/// cert_file = "/etc/jetinfer/client.pem"  # mutual TLS: this client's certificate
/// key_file = "/run/secrets/client-key.pem"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    /// Refuse to connect unless the connection is encrypted, even to a server
    /// that does not ask for TLS (or a `nats://` URL).
    pub required: bool,
    /// PEM file of the CA certificates that sign the server's certificate;
    /// without it the system's roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`. A secret: only its path is configured.
    pub key_file: Option<PathBuf>,
    /// Start TLS before the server's greeting (server `handshake_first`).
    pub handshake_first: bool,
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
    /// Each tenant has a NATS account of its own (`deploy/nats/accounts.conf`):
    /// its results stream and bulk bucket live there, made by its producers,
    /// so workers make neither. False: workers and producers share one
    /// account, where workers make both.
    pub tenant_accounts: bool,
    /// Dead letters kept per model and tenant (`dlq.<model>.<tenant>`):
    /// past it, that tenant's oldest make way for its newest.
    pub max_dead_letters_per_tenant: i64,
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
            tenant_accounts: false,
            max_dead_letters_per_tenant: crate::dead_letter::DEFAULT_MAX_LETTERS_PER_TENANT,
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
    /// Deliveries a job gets before the worker gives up on it (a dead letter
    /// with reason `max_deliveries`); 0 or less: no limit. The consumer
    /// itself redelivers without limit: the worker counts.
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
