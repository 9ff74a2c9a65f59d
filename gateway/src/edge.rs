//! What wraps every route: the request timeout, metrics, CORS (only for
//! configured origins) and the security headers, in that order from the
//! inside out, so even a timed-out or unmatched request is counted and
//! carries the headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::embeddings::ModelLabel;
use crate::error::ApiError;

/// HSTS when TLS is on: a year, subdomains included.
pub const HSTS: &str = "max-age=31536000; includeSubDomains";

/// What the header layer needs.
#[derive(Clone)]
pub struct EdgeState {
    pub tls: bool,
    pub allowed_origins: Arc<Vec<String>>,
    pub request_timeout: Duration,
}

/// The security headers on every response; HSTS when served over TLS.
pub async fn security_headers(
    State(edge): State<EdgeState>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let fixed: [(HeaderName, &str); 5] = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "default-src 'none'"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if edge.tls {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        );
    }
    response
}

/// CORS for the configured origins only; with none configured, no
/// `Access-Control-*` header is ever sent and browsers refuse cross-origin
/// calls.
pub async fn cors(State(edge): State<EdgeState>, request: Request, next: Next) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .filter(|o| edge.allowed_origins.iter().any(|allowed| allowed == o))
        .map(str::to_string);
    let Some(origin) = origin else {
        return next.run(request).await;
    };
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    if let Ok(origin) = HeaderValue::from_str(&origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    if preflight {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    response
}

/// Counts and times every request by its route pattern (never the raw path:
/// the label stays bounded), status and served model.
pub async fn metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let started = Instant::now();
    jetinfer_monitoring::gateway_request_started();
    // Counted as finished even when the client goes away mid-request and
    // this future is dropped.
    let mut guard = Finished {
        route,
        started,
        status: None,
        model: String::new(),
    };
    let response = next.run(request).await;
    guard.status = Some(response.status().as_u16());
    if let Some(ModelLabel(model)) = response.extensions().get::<ModelLabel>() {
        guard.model = model.clone();
    }
    response
}

struct Finished {
    route: String,
    started: Instant,
    /// None when the client went away before the answer (recorded as 499,
    /// as nginx does).
    status: Option<u16>,
    model: String,
}

impl Drop for Finished {
    fn drop(&mut self) {
        jetinfer_monitoring::gateway_request_finished(
            &self.route,
            self.status.unwrap_or(499),
            &self.model,
            self.started.elapsed(),
        );
    }
}

/// Cuts a request off after the configured time, body read and job wait
/// included: 504, saying a job already queued may still complete.
pub async fn timeout(State(edge): State<EdgeState>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(edge.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::timed_out(format!(
            "The request took longer than {}s; a job it queued may still complete",
            edge.request_timeout.as_secs()
        ))
        .into_response(),
    }
}
