//! The worker's HTTP endpoints for operators and orchestrators:
//!
//! - `/metrics`: Prometheus exposition (names and buckets in `jetinfer-monitoring`);
//! - `/healthz`: the process is alive (200 from the moment it listens, even
//!   while the model loads, so a startup probe can wait for it);
//! - `/readyz`: 200 only while connected to NATS (and the connection
//!   answers), with the model loaded and the consumer bound; 503 with the
//!   reasons otherwise (also while draining, and for good once the worker
//!   stops on a failure: a stage gone, the connection lost).
//!
//! The binary starts this first, so the endpoints answer during model load;
//! [`Health`] is shared with the worker, which flips its flags.
//!
//! Hardening: the default address is loopback (`[http] addr`); every
//! response carries `X-Content-Type-Options: nosniff` and
//! `Cache-Control: no-store`; with `[http] metrics_token_file`, `/metrics`
//! answers 401 unless the request carries `Authorization: Bearer <token>`
//! (compared in constant time; the probes stay open for orchestrators).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use jetinfer_monitoring::PrometheusHandle;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What `/readyz` checks. Cheap to clone; all clones share state.
#[derive(Clone, Default)]
pub struct Health {
    state: Arc<RwLock<HealthState>>,
}

#[derive(Default)]
struct HealthState {
    client: Option<async_nats::Client>,
    model_loaded: bool,
    consumer_bound: bool,
    /// The connection watch's last flush did not go through in time.
    connection_silent: bool,
    /// The client's connection task is gone: it never reconnects.
    connection_gone: bool,
    /// Why the worker stopped on its own, if it did.
    failure: Option<String>,
}

impl Health {
    pub fn set_client(&self, client: async_nats::Client) {
        self.state.write().expect("health lock").client = Some(client);
    }

    pub fn set_model_loaded(&self, loaded: bool) {
        self.state.write().expect("health lock").model_loaded = loaded;
    }

    pub fn set_consumer_bound(&self, bound: bool) {
        self.state.write().expect("health lock").consumer_bound = bound;
    }

    /// Whether the connection watch's last flush went through in time.
    pub fn set_connection_answering(&self, answering: bool) {
        self.state.write().expect("health lock").connection_silent = !answering;
    }

    /// The client's connection task is gone; its last state no longer counts.
    pub fn set_connection_gone(&self) {
        self.state.write().expect("health lock").connection_gone = true;
    }

    /// The worker stopped on its own: not ready for good, saying why.
    pub fn set_failed(&self, why: String) {
        self.state.write().expect("health lock").failure = Some(why);
    }

    /// What keeps the worker from being ready; empty when it is ready.
    pub fn not_ready(&self) -> Vec<String> {
        let state = self.state.read().expect("health lock");
        let connected = !state.connection_gone
            && state
                .client
                .as_ref()
                .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
        let mut reasons = Vec::new();
        if let Some(why) = &state.failure {
            reasons.push(format!("stopped: {why}"));
        }
        if !connected {
            reasons.push("not connected to NATS".to_string());
        } else if state.connection_silent {
            reasons.push("NATS connection not answering".to_string());
        }
        if !state.model_loaded {
            reasons.push("model not loaded".to_string());
        }
        if !state.consumer_bound {
            reasons.push("consumer not bound".to_string());
        }
        reasons
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: PrometheusHandle,
}

/// A running HTTP server.
pub struct HttpServer {
    pub local_addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// The bearer token `/metrics` requires. Only its SHA-256 digest is kept, so
/// the comparison takes the same time whatever the length or content of the
/// token presented; `Debug` never shows it.
#[derive(Clone)]
pub struct MetricsToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(redacted)")
    }
}

impl MetricsToken {
    /// `None` for an empty token: an empty secret protects nothing.
    pub fn new(token: &str) -> Option<Self> {
        (!token.is_empty()).then(|| Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Reads the token from `path`; surrounding whitespace (a trailing
    /// newline) is not part of it.
    pub fn from_file(path: &Path) -> Result<Self, HttpError> {
        let text = std::fs::read_to_string(path).map_err(|source| HttpError::TokenFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(text.trim()).ok_or_else(|| HttpError::EmptyToken {
            path: path.to_path_buf(),
        })
    }

    fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(digest.ct_eq(&self.digest))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("reading the metrics token from {path}: {source}; check [http] metrics_token_file (JETINFER_HTTP__METRICS_TOKEN_FILE)")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the metrics token file {path} is empty; put the token in it or unset [http] metrics_token_file")]
    EmptyToken { path: PathBuf },
    #[error("binding the HTTP endpoint on {addr}: {source}; set [http] addr (JETINFER_HTTP__ADDR) to a free address")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] jetinfer_monitoring::InstallError),
}

impl HttpServer {
    /// Installs the metrics recorder and serves the endpoints on `addr`
    /// (port 0 picks a free port; see `local_addr`), `/metrics` open.
    pub async fn start(addr: SocketAddr, health: Health) -> Result<Self, HttpError> {
        Self::serve(addr, health, None).await
    }

    /// Serves as `config` says: its address, and its metrics token if any.
    pub async fn from_config(
        config: &crate::config::HttpConfig,
        health: Health,
    ) -> Result<Self, HttpError> {
        let token = config
            .metrics_token_file
            .as_deref()
            .map(MetricsToken::from_file)
            .transpose()?;
        Self::serve(config.addr, health, token).await
    }

    /// Serves on `addr`; with `token`, `/metrics` requires it.
    pub async fn serve(
        addr: SocketAddr,
        health: Health,
        token: Option<MetricsToken>,
    ) -> Result<Self, HttpError> {
        let metrics = jetinfer_monitoring::install()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| HttpError::Bind { addr, source })?;
        let guarded = token.is_some();
        let mut metrics_route = get(metrics_text);
        if let Some(token) = token {
            metrics_route = metrics_route.route_layer(middleware::from_fn_with_state(
                Arc::new(token),
                require_token,
            ));
        }
        let app = Router::new()
            .route("/metrics", metrics_route)
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(AppState { health, metrics })
            .layer(middleware::map_response(no_sniff_no_store));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(err) = served {
                tracing::error!(error = %jetinfer_schemas::Untrusted(&err), "HTTP endpoint failed");
            }
        });
        tracing::info!(addr = %local_addr, metrics_token = guarded, "serving /metrics, /healthz, /readyz");
        Ok(Self {
            local_addr,
            shutdown,
            task,
        })
    }

    /// Stops serving (after in-flight requests finish).
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Every response: never sniffed as another content type, never cached.
async fn no_sniff_no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// 401 unless the request carries `Authorization: Bearer <token>`.
async fn require_token(
    State(token): State<Arc<MetricsToken>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, credentials) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| credentials.trim())
        });
    match presented {
        Some(presented) if token.accepts(presented) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"jetinfer-metrics\"",
            )],
            "a bearer token is required for /metrics\n",
        )
            .into_response(),
    }
}

async fn metrics_text(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        jetinfer_monitoring::render(&app.metrics),
    )
}

async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    let reasons = app.health.not_ready();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, reasons.join("\n") + "\n")
    }
}
