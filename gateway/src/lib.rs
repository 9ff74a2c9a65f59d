//! jetinfer's OpenAI-compatible front door: `POST /v1/embeddings` and
//! `GET /v1/models` over the producer library, for services that already
//! speak OpenAI's API. It never touches worker internals: a request becomes
//! one job, published through its tenant's [`jetinfer_producer::Client`].
//!
//! The gateway is the trust boundary for callers without NATS credentials:
//! each API key (or JWT) maps to a tenant, the gateway holds that tenant's
//! NATS identity (one `Client` per tenant, as `deploy/nats/render-accounts.sh`
//! issues them), and nothing from the request but the texts and options
//! reaches NATS.
//!
//! Reading order: [`config`] → [`serve`] (listener, TLS, connection limits)
//! → [`edge`] (timeouts, metrics, CORS, security headers) → [`auth`] (the
//! [`auth::Caller`] extractor) → [`rate_limit`] → [`embeddings`] and
//! [`rerank`]; beside
//! them [`models`] (the catalogue), [`error`] (every refusal, OpenAI-shaped)
//! and [`openai`] (the wire types).
//!
//! The Batch API ([`batches`]) takes [`auth::Caller`] as every route does; it
//! carries the tenant's [`TenantHandle`] (its `Client`, its `Batches` handle
//! and runner), the key id and role.

pub mod auth;
pub mod batches;
pub mod config;
pub mod edge;
pub mod embeddings;
pub mod error;
pub mod jwt_crypto;
pub mod models;
pub mod openai;
pub mod rate_limit;
pub mod rerank;
pub mod serve;
mod submit;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jetinfer_monitoring::PrometheusHandle;
use jetinfer_producer::batches::{Batches, BatchesConfig, Runner};
use jetinfer_producer::{Client, ClientConfig};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::auth::{Caller, Credentials};
use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::models::Catalog;
use crate::openai::{Model, ModelList};
use crate::rate_limit::{KeyLimits, Limiter};

/// One tenant as the gateway serves it: its NATS identity and its limit.
pub struct TenantHandle {
    pub name: String,
    pub client: Client,
    /// The tenant's cost limit over all its keys, if configured.
    pub limiter: Option<Limiter>,
    /// The tenant's Batch API: files and batches in its own account.
    pub batches: Batches,
    /// Drives the tenant's batches that this replica holds the lease of,
    /// until [`Gateway::shutdown`] stops it and gives the leases up (or the
    /// process dies and they lapse); another replica, or the next gateway,
    /// resumes them.
    runner: std::sync::Mutex<Option<Runner>>,
}

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<GatewayConfig>,
    pub tenants: Arc<HashMap<String, Arc<TenantHandle>>>,
    pub credentials: Credentials,
    pub jwt: Option<Arc<config::JwtConfig>>,
    pub key_limits: Arc<KeyLimits>,
    pub catalog: Catalog,
    pub metrics: PrometheusHandle,
    /// SHA-256 of the `/metrics` token, when one is configured.
    pub metrics_token: Option<[u8; 32]>,
    /// Cancelled when the gateway stops: `/readyz` turns 503 at once.
    pub stopping: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("tenant {tenant:?}: {source}")]
    Tenant {
        tenant: String,
        source: jetinfer_producer::SubmitError,
    },
    #[error("tenant {tenant:?}: opening the Batch API: {source}")]
    Batches {
        tenant: String,
        source: jetinfer_producer::batches::BatchError,
    },
    #[error(transparent)]
    Keys(#[from] auth::KeysError),
    #[error(transparent)]
    Tls(#[from] serve::TlsError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading the metrics token file: {0}")]
    MetricsToken(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] jetinfer_monitoring::InstallError),
}

#[derive(OpenApi)]
#[openapi(
    info(title = "jetinfer gateway", description = "OpenAI-compatible embeddings over a JetStream queue"),
    paths(
        embeddings::create, rerank::create, list_models, get_model,
        openapi, healthz, readyz, metrics,
        batches::create_file, batches::list_files, batches::get_file, batches::file_content, batches::delete_file,
        batches::create_batch, batches::get_batch, batches::cancel_batch, batches::list_batches
    ),
    components(schemas(
        batches::CreateBatchRequest,
        openai::EmbeddingsRequest, openai::EmbeddingsResponse, openai::EmbeddingData,
        openai::EncodingFormat, openai::Usage,
        openai::RerankRequest, openai::RerankResponse, openai::RerankResult, openai::ModelList, openai::Model,
        openai::ErrorBody, openai::ErrorDetail,
        jetinfer_producer::batches::FileObject, jetinfer_producer::batches::FileDeleted,
        jetinfer_producer::batches::Batch, jetinfer_producer::batches::BatchStatus,
        jetinfer_producer::batches::RequestCounts, jetinfer_producer::batches::BatchErrors,
        jetinfer_producer::batches::BatchErrorData
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// A running gateway.
pub struct Gateway {
    pub local_addr: SocketAddr,
    pub state: AppState,
    /// The TLS certificate in use, when TLS is on: reloaded when its files
    /// change, and by [`serve::ServerCert::reload_logged`] on SIGHUP.
    pub tls_cert: Option<Arc<serve::ServerCert>>,
    stop: CancellationToken,
    serving: JoinHandle<()>,
}

impl Gateway {
    /// Connects every tenant, loads the keys, binds and serves.
    pub async fn start(config: GatewayConfig) -> Result<Self, StartError> {
        let metrics = jetinfer_monitoring::install()?;
        jwt_crypto::install();
        let stop = CancellationToken::new();
        let mut tenants = HashMap::new();
        for (name, tenant) in &config.tenants {
            let client_config = ClientConfig {
                nats: config.tenant_nats(name, tenant),
                tenant: name.clone(),
                timeout: config.limits.job_timeout,
                ..ClientConfig::default()
            };
            let client = Client::connect(client_config.clone())
                .await
                .map_err(|source| StartError::Tenant {
                    tenant: name.clone(),
                    source,
                })?;
            let batches = Batches::open(
                &ClientConfig {
                    nats: jetinfer_nats::NatsConfig {
                        name: format!("jetinfer-gateway-{name}-batches"),
                        ..client_config.nats.clone()
                    },
                    ..client_config
                },
                BatchesConfig {
                    max_file_bytes: config.batches.max_file_bytes,
                    max_file_lines: config.batches.max_file_lines,
                    in_flight: config.batches.in_flight,
                    work_dir: config.batches.work_dir.join(name),
                    lease_ttl: config.batches.lease_ttl,
                    ..BatchesConfig::default()
                },
            )
            .await
            .map_err(|source| StartError::Batches {
                tenant: name.clone(),
                source,
            })?;
            // One runner per tenant, for the life of the process: it resumes
            // every batch a previous gateway left unfinished, and drives each
            // batch only while it holds the batch's lease, so replicas share
            // a tenant's batches without running one twice.
            let runner = batches.runner();
            tracing::info!(tenant = %name, owner = %batches.owner(), "batch runner started");
            tenants.insert(
                name.clone(),
                Arc::new(TenantHandle {
                    name: name.clone(),
                    client,
                    limiter: tenant.rate.and_then(Limiter::new),
                    batches,
                    runner: std::sync::Mutex::new(Some(runner)),
                }),
            );
        }
        let credentials = Credentials::default();
        if let Some(keys) = &config.keys_file {
            let count = credentials.reload_keys(keys)?;
            tracing::info!(keys = count, "API keys loaded");
        }
        if let Some(jwt) = &config.jwt {
            credentials.reload_jwks(&jwt.jwks_file)?;
        }
        let metrics_token = match &config.metrics_token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(StartError::MetricsToken)?;
                Some(Sha256::digest(token.trim().as_bytes()).into())
            }
            None => None,
        };
        let catalog = Catalog::default();
        if let Some(nats) = config.discovery_nats() {
            tokio::spawn(catalog.clone().follow(
                nats,
                config.discovery.stream.clone(),
                config.discovery.refresh,
                stop.clone(),
            ));
        }
        tokio::spawn(auth::watch(
            credentials.clone(),
            config.keys_file.clone(),
            config.jwt.as_ref().map(|j| j.jwks_file.clone()),
            config.reload_interval,
            stop.clone(),
        ));
        let tls_cert = config
            .tls
            .as_ref()
            .map(serve::ServerCert::load)
            .transpose()?;
        let tls = tls_cert.clone().map(serve::tls_acceptor).transpose()?;
        if let Some(cert) = &tls_cert {
            tokio::spawn(serve::watch_cert(
                Arc::clone(cert),
                config.reload_interval,
                stop.clone(),
            ));
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let state = AppState {
            jwt: config.jwt.clone().map(Arc::new),
            config: Arc::new(config.clone()),
            tenants: Arc::new(tenants),
            credentials,
            key_limits: Arc::default(),
            catalog,
            metrics,
            metrics_token,
            stopping: stop.clone(),
        };
        let listener = serve::Listener {
            listener,
            tls: tls.clone(),
            limits: config.limits.clone(),
            busy: busy_router(tls.is_some()),
        };
        let local_addr = listener.local_addr();
        let app = router(state.clone(), tls.is_some());
        let serving = tokio::spawn(listener.run(app, stop.clone()));
        tracing::info!(addr = %local_addr, tls = tls.is_some(), "gateway listening");
        Ok(Self {
            local_addr,
            state,
            tls_cert,
            stop,
            serving,
        })
    }

    /// Stops accepting, lets requests in flight finish (within
    /// `limits.shutdown_grace`), stops the batch runners (giving their
    /// leases up), then returns.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.stopped().await;
    }

    /// The token whose cancelling starts [`Gateway::shutdown`]'s drain.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until serving has ended (after the stop token is cancelled),
    /// then stops the batch runners, giving their leases up so another
    /// replica takes the batches at once.
    pub async fn stopped(self) {
        let _ = self.serving.await;
        for tenant in self.state.tenants.values() {
            let runner = tenant.runner.lock().expect("not poisoned").take();
            if let Some(runner) = runner {
                runner.stop().await;
            }
        }
    }
}

/// What a connection past `limits.max_connections` is answered, whatever
/// it asks: 503 with `Retry-After`, counted and with the security headers
/// like every response; the listener then closes it.
pub fn busy_router(tls: bool) -> Router {
    let edge = edge::EdgeState {
        tls,
        allowed_origins: Arc::default(),
        request_timeout: config::DEFAULT_REQUEST_TIMEOUT,
    };
    Router::new()
        .fallback(|| async {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The gateway is at its connection limit; retry after the time in Retry-After",
            )
            .code("server_busy")
            .retry_after(serve::BUSY_RETRY_AFTER)
        })
        .layer(axum::middleware::from_fn(edge::metrics))
        .layer(axum::middleware::from_fn_with_state(
            edge,
            edge::security_headers,
        ))
}

/// Every route the gateway serves: its path, its methods and their
/// handlers. [`router`] mounts exactly these, and `/openapi.json` must
/// describe each path and method (`tests/edge.rs` holds it to that).
fn routes(
    max_file_bytes: u64,
) -> Vec<(
    &'static str,
    &'static [&'static str],
    axum::routing::MethodRouter<AppState>,
)> {
    let upload_limit = DefaultBodyLimit::max(
        usize::try_from(max_file_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(batches::MULTIPART_SLACK),
    );
    vec![
        ("/v1/embeddings", &["post"], post(embeddings::create)),
        ("/v1/rerank", &["post"], post(rerank::create)),
        ("/v1/models", &["get"], get(list_models)),
        ("/v1/models/{id}", &["get"], get(get_model)),
        (
            "/v1/files",
            &["post", "get"],
            post(batches::create_file)
                .layer(upload_limit)
                .get(batches::list_files),
        ),
        (
            "/v1/files/{id}",
            &["get", "delete"],
            get(batches::get_file).delete(batches::delete_file),
        ),
        (
            "/v1/files/{id}/content",
            &["get"],
            get(batches::file_content),
        ),
        (
            "/v1/batches",
            &["post", "get"],
            post(batches::create_batch).get(batches::list_batches),
        ),
        ("/v1/batches/{id}", &["get"], get(batches::get_batch)),
        (
            "/v1/batches/{id}/cancel",
            &["post"],
            post(batches::cancel_batch),
        ),
        ("/openapi.json", &["get"], get(openapi)),
        ("/healthz", &["get"], get(healthz)),
        ("/readyz", &["get"], get(readyz)),
        ("/metrics", &["get"], get(metrics)),
    ]
}

/// The paths and methods [`router`] serves, for checking the OpenAPI
/// document against them.
pub fn served_routes() -> Vec<(&'static str, &'static [&'static str])> {
    routes(0)
        .into_iter()
        .map(|(path, methods, _)| (path, methods))
        .collect()
}

/// Every route, wrapped in the edge layers.
pub fn router(state: AppState, tls: bool) -> Router {
    let edge = edge::EdgeState {
        tls,
        allowed_origins: Arc::new(state.config.cors.allowed_origins.clone()),
        request_timeout: state.config.limits.request_timeout,
    };
    let mut app = Router::new();
    for (path, _, route) in routes(state.config.batches.max_file_bytes) {
        app = app.route(path, route);
    }
    app.fallback(|| async {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "Unknown request URL",
        )
        .code("unknown_url")
    })
    .with_state(state)
    .layer(axum::middleware::from_fn_with_state(
        edge.clone(),
        edge::timeout,
    ))
    .layer(axum::middleware::from_fn(edge::metrics))
    .layer(axum::middleware::from_fn_with_state(
        edge.clone(),
        edge::cors,
    ))
    .layer(axum::middleware::from_fn_with_state(
        edge,
        edge::security_headers,
    ))
}

fn model_object(id: String) -> Model {
    Model {
        id,
        object: "model",
        created: 0,
        owned_by: "jetinfer",
    }
}

/// The models workers serve (see [`models`]).
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)), security(("bearer" = [])))]
pub async fn list_models(State(state): State<AppState>, _caller: Caller) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state
            .catalog
            .models()
            .into_iter()
            .map(model_object)
            .collect(),
    })
}

#[utoipa::path(get, path = "/v1/models/{id}", params(("id" = String, Path)), responses((status = 200, body = Model), (status = 404, body = openai::ErrorBody)), security(("bearer" = [])))]
pub async fn get_model(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Model>, ApiError> {
    if state.catalog.contains(&id) {
        Ok(Json(model_object(id)))
    } else {
        Err(ApiError::model_not_found(&id))
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "the OpenAPI 3 document of every route", content_type = "application/json")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "`ok`", content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// 200 while every tenant's connection and the catalogue's are up and the
/// gateway is not stopping; 503 with the reasons otherwise.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "`ready`", content_type = "text/plain"), (status = 503, description = "the reasons, one a line", content_type = "text/plain")))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    if state.stopping.is_cancelled() {
        reasons.push("stopping".to_string());
    }
    for (name, tenant) in state.tenants.iter() {
        if !tenant.client.connected() {
            reasons.push(format!("tenant {name}: not connected to NATS"));
        }
    }
    if !state.catalog.connected() {
        reasons.push("model catalogue: not connected to NATS".into());
    }
    if reasons.is_empty() {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, reasons.join("\n")).into_response()
    }
}

/// Prometheus metrics; with `metrics_token_file`, only for its bearer token.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain"), (status = 401, body = openai::ErrorBody, description = "the token is configured and missing or wrong")))]
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(want) = state.metrics_token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
        if presented != Some(want) {
            return ApiError::unauthorized("/metrics needs its bearer token").into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        jetinfer_monitoring::render(&state.metrics),
    )
        .into_response()
}
