//! The worker's HTTP endpoints for operators and orchestrators:
//!
//! - `/metrics`: Prometheus exposition (names and buckets in `jetinfer-monitoring`);
//! - `/healthz`: the process is alive (200 from the moment it listens, even
//!   while the model loads, so a startup probe can wait for it);
//! - `/readyz`: 200 only while connected to NATS, with the model loaded and
//!   the consumer bound; 503 with the reasons otherwise (also while draining).
//!
//! The binary starts this first, so the endpoints answer during model load;
//! [`Health`] is shared with the worker, which flips its flags.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use jetinfer_monitoring::PrometheusHandle;
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

    /// What keeps the worker from being ready; empty when it is ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let state = self.state.read().expect("health lock");
        let connected = state
            .client
            .as_ref()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
        let mut reasons = Vec::new();
        if !connected {
            reasons.push("not connected to NATS");
        }
        if !state.model_loaded {
            reasons.push("model not loaded");
        }
        if !state.consumer_bound {
            reasons.push("consumer not bound");
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

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
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
    /// (port 0 picks a free port; see `local_addr`).
    pub async fn start(addr: SocketAddr, health: Health) -> Result<Self, HttpError> {
        let metrics = jetinfer_monitoring::install()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| HttpError::Bind { addr, source })?;
        let app = Router::new()
            .route("/metrics", get(metrics_text))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(AppState { health, metrics });
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "HTTP endpoint failed");
            }
        });
        tracing::info!(addr = %local_addr, "serving /metrics, /healthz, /readyz");
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
