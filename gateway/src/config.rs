//! The gateway's configuration: defaults, then a TOML file, then
//! `JETINFER_GATEWAY_*` environment variables (`__` between levels), as the
//! worker and producer do. Secrets are never values here, only file paths
//! (API keys as SHA-256 digests in the keys file, NATS credentials and the
//! TLS key as files), so `--print-config` can print it all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use jetinfer_nats::{Auth, NatsConfig};
use serde::{Deserialize, Serialize};

/// Loopback by default: exposing the gateway is a deliberate choice.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Largest request body read; past it the answer is 413 before parsing.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// A client that has not sent its whole request head by then is cut off.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request may take, body read and job wait included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a job's result; below the request timeout so the answer
/// is the job's 504, which says the job may still complete.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(55);
/// Open connections at once; one more is answered 503 with `Retry-After`
/// and closed (`serve`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// How long shutdown waits for in-flight requests before closing them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often the keys, JWKS and TLS files are checked for changes.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// How often the served models are read from the jobs stream.
pub const DEFAULT_MODELS_REFRESH: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// TLS from PEM files; HSTS is sent when set.
    pub tls: Option<TlsFiles>,
    /// The API keys file (see [`crate::auth`]): SHA-256 of each key, its
    /// tenant, role and limits. Reloaded on change and on SIGHUP.
    pub keys_file: Option<PathBuf>,
    #[serde(with = "secs")]
    pub reload_interval: Duration,
    pub jwt: Option<JwtConfig>,
    pub limits: EdgeLimits,
    pub cors: CorsConfig,
    /// Where NATS is (URLs, TLS); each tenant's credentials come from
    /// `tenants`, the model catalogue's from `discovery`.
    pub nats: NatsConfig,
    pub discovery: DiscoveryConfig,
    /// Tenants this gateway submits for, by name, each with its NATS
    /// credentials (as `deploy/nats/render-accounts.sh` issues them).
    pub tenants: BTreeMap<String, TenantConfig>,
    /// With a file, `/metrics` answers 401 without `Authorization: Bearer <token>`.
    pub metrics_token_file: Option<PathBuf>,
    /// The Batch API (`/v1/files`, `/v1/batches`).
    pub batches: BatchApiConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            tls: None,
            keys_file: None,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            jwt: None,
            limits: EdgeLimits::default(),
            cors: CorsConfig::default(),
            nats: NatsConfig {
                name: "jetinfer-gateway".into(),
                ..NatsConfig::default()
            },
            discovery: DiscoveryConfig::default(),
            tenants: BTreeMap::new(),
            metrics_token_file: None,
            batches: BatchApiConfig::default(),
        }
    }
}

impl GatewayConfig {
    /// Defaults, then `file` (if given), then `JETINFER_GATEWAY_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(GatewayConfig::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            .merge(Env::prefixed("JETINFER_GATEWAY_").split("__"))
            .extract()
            .map_err(Box::new)
    }

    /// The NATS connection of `tenant`: the shared servers and TLS, the
    /// tenant's own credentials and inbox prefix.
    pub fn tenant_nats(&self, tenant: &str, config: &TenantConfig) -> NatsConfig {
        NatsConfig {
            name: format!("jetinfer-gateway-{tenant}"),
            auth: config.auth.clone(),
            inbox_prefix: config
                .inbox_prefix
                .clone()
                .unwrap_or_else(|| format!("_INBOX_{tenant}")),
            ..self.nats.clone()
        }
    }

    /// The catalogue's NATS connection, if one is configured.
    pub fn discovery_nats(&self) -> Option<NatsConfig> {
        let auth = self.discovery.auth.clone()?;
        Some(NatsConfig {
            name: "jetinfer-gateway-discovery".into(),
            auth,
            inbox_prefix: self.discovery.inbox_prefix.clone(),
            ..self.nats.clone()
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Bounds on what one client can make the gateway hold or do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EdgeLimits {
    pub max_body_bytes: usize,
    /// Inputs in one embeddings request: one request is one job, so the
    /// worker's `limits.max_inputs_per_job` by default.
    pub max_inputs: usize,
    /// Documents in one rerank request, as the worker's
    /// `limits.max_documents_per_rerank` by default; more is 413.
    pub max_documents: usize,
    /// Characters per input (and rerank query or document), as the
    /// worker's `limits.max_chars_per_input`.
    pub max_chars_per_input: usize,
    /// The encoded job's size, as the worker's `limits.max_job_bytes`.
    pub max_job_bytes: usize,
    #[serde(with = "secs")]
    pub header_read_timeout: Duration,
    #[serde(with = "secs")]
    pub request_timeout: Duration,
    #[serde(with = "secs")]
    pub job_timeout: Duration,
    pub max_connections: usize,
    #[serde(with = "secs")]
    pub shutdown_grace: Duration,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        let job = jetinfer_schemas::Limits::default();
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_inputs: job.max_inputs_per_job,
            max_documents: job.max_documents_per_rerank,
            max_chars_per_input: job.max_chars_per_input,
            max_job_bytes: job.max_job_bytes,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Bounds of the Batch API; the defaults are OpenAI's limits. An upload is
/// streamed into the tenant's object store, never held whole: its body may
/// be `max_file_bytes` (plus 64 KiB of multipart framing and fields), not
/// `limits.max_body_bytes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchApiConfig {
    /// Largest input file (at most 200 MiB, OpenAI's).
    pub max_file_bytes: u64,
    /// Most requests in an input file (at most 50,000, OpenAI's).
    pub max_file_lines: u64,
    /// Requests of one batch awaiting results at once.
    pub in_flight: usize,
    /// Where running batches compose their output files (a directory per
    /// tenant below it); the rest of a batch lives in NATS.
    pub work_dir: PathBuf,
    /// How long this replica's lease on a batch it drives lasts unless
    /// renewed (renewed every third of it): how soon another replica takes
    /// over the batches of one that died. Replicas' clocks must agree to
    /// well within it.
    #[serde(with = "secs")]
    pub lease_ttl: Duration,
}

impl Default for BatchApiConfig {
    fn default() -> Self {
        let library = jetinfer_producer::batches::BatchesConfig::default();
        Self {
            max_file_bytes: library.max_file_bytes,
            max_file_lines: library.max_file_lines,
            in_flight: library.in_flight,
            work_dir: std::env::temp_dir().join("jetinfer-gateway-batches"),
            lease_ttl: library.lease_ttl,
        }
    }
}

/// CORS is off (no `Access-Control-*` header is ever sent) unless origins
/// are listed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
}

/// JWT bearer tokens, verified against a local JWKS file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JwtConfig {
    pub jwks_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    /// The claim naming the caller's tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim naming the caller's role; absent means `user`.
    #[serde(default)]
    pub role_claim: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_tenant_claim() -> String {
    "tenant".into()
}

fn default_leeway() -> u64 {
    30
}

/// One tenant's NATS identity and its limits at the edge.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantConfig {
    pub auth: Auth,
    /// Defaults to `_INBOX_<tenant>`, as `accounts.conf` confines it.
    pub inbox_prefix: Option<String>,
    /// The tenant's cost limit over all its keys (inputs per second and the
    /// burst); none when absent.
    pub rate: Option<Rate>,
}

/// A cost limit: inputs per second, with a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub inputs_per_second: u32,
    pub burst_inputs: u32,
}

/// How the gateway learns the served models: a user of the workers' account
/// allowed only to read the jobs stream's info (`GATEWAY` in
/// `deploy/nats/accounts.conf`). Without credentials, `/v1/models` is empty
/// and an unknown model is still found out at submit (404).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DiscoveryConfig {
    pub auth: Option<Auth>,
    pub inbox_prefix: String,
    pub stream: String,
    #[serde(with = "secs")]
    pub refresh: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            auth: None,
            inbox_prefix: "_INBOX_gateway".into(),
            stream: jetinfer_nats::subjects::default_stream().into(),
            refresh: DEFAULT_MODELS_REFRESH,
        }
    }
}

/// Durations in config files are written as (fractional) seconds.
mod secs {
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
