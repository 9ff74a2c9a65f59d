//! `POST /v1/rerank`: a query and documents scored by a cross-encoder a
//! worker serves, in the shape Infinity and Cohere answer (see
//! [`crate::openai::RerankRequest`]). One request is one rerank job
//! ([`jetinfer_producer::Client::rerank`]); the caller's limits are charged
//! the number of documents, as embeddings are charged their inputs.
//!
//! Refusals are OpenAI-shaped like every route's: an unknown model 404, a
//! model serving embeddings 400 `unsupported_task` (the worker's code), too
//! many documents or too long a text 413, as `limits` says.

use axum::extract::State;
use axum::response::Response;

use crate::auth::Caller;
use crate::embeddings::read_request;
use crate::error::ApiError;
use crate::openai::{RerankRequest, RerankResponse, RerankResult, Usage};
use crate::submit::{respond, submit, Charge, Failed};
use crate::AppState;

#[utoipa::path(
    post,
    path = "/v1/rerank",
    request_body = RerankRequest,
    responses(
        (status = 200, body = RerankResponse),
        (status = 400, body = crate::openai::ErrorBody, description = "invalid input, or a model that does not rerank (code unsupported_task)"),
        (status = 401, body = crate::openai::ErrorBody, description = "missing or bad key"),
        (status = 403, body = crate::openai::ErrorBody, description = "not allowed"),
        (status = 404, body = crate::openai::ErrorBody, description = "unknown model"),
        (status = 413, body = crate::openai::ErrorBody, description = "body, a text or the number of documents too large"),
        (status = 429, body = crate::openai::ErrorBody, description = "rate limited or quota full; see Retry-After"),
        (status = 503, body = crate::openai::ErrorBody, description = "queue full or unreachable"),
        (status = 504, body = crate::openai::ErrorBody, description = "timed out; the job may still complete"),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    request: axum::extract::Request,
) -> Response {
    let headers = request.headers().clone();
    respond(rerank(&state, &caller, &headers, request.into_body()).await)
}

async fn rerank(
    state: &AppState,
    caller: &Caller,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(String, RerankResponse), Failed> {
    let fail = |err: ApiError| -> Failed { (None, err) };
    caller.require_user("rerank documents").map_err(fail)?;
    let limits = &state.config.limits;
    let request: RerankRequest = read_request(headers, body, limits.max_body_bytes)
        .await
        .map_err(fail)?;
    let documents = match (request.documents, request.texts) {
        (Some(documents), None) | (None, Some(documents)) => documents,
        (Some(_), Some(_)) => {
            return Err(fail(ApiError::invalid(
                "documents",
                "send the documents as `documents` or as `texts`, not both",
            )))
        }
        (None, None) => {
            return Err(fail(ApiError::invalid(
                "documents",
                "documents is required: the texts to score against the query",
            )))
        }
    };
    if documents.is_empty() {
        return Err(fail(ApiError::invalid(
            "documents",
            "documents must not be empty",
        )));
    }
    if documents.len() > limits.max_documents {
        return Err(fail(ApiError::too_large(
            Some("documents"),
            format!(
                "{} documents in one request; the limit is {}: split the request",
                documents.len(),
                limits.max_documents
            ),
        )));
    }
    let too_long = |text: &str| {
        text.len() > limits.max_chars_per_input && text.chars().count() > limits.max_chars_per_input
    };
    if too_long(&request.query) {
        return Err(fail(ApiError::too_large(
            Some("query"),
            format!(
                "the query is longer than {} characters",
                limits.max_chars_per_input
            ),
        )));
    }
    if let Some(index) = documents.iter().position(|d| too_long(d)) {
        return Err(fail(ApiError::too_large(
            Some("documents"),
            format!(
                "documents[{index}] is longer than {} characters",
                limits.max_chars_per_input
            ),
        )));
    }
    if request.top_n == Some(0) {
        return Err(fail(ApiError::invalid("top_n", "top_n must be at least 1")));
    }
    if jetinfer_nats::subjects::check_token("model", &request.model).is_err() {
        return Err(fail(ApiError::model_not_found(&request.model)));
    }
    let cost = documents.len();
    let model = request.model;
    let keep = request
        .return_documents
        .or(request.return_text)
        .unwrap_or(false)
        .then(|| documents.clone());
    let job = jetinfer_schemas::Job::rerank(model.clone(), request.query, documents, request.top_n);
    let id = job.id.to_string();
    let charge = Charge {
        cost,
        param: "documents",
        noun: "documents",
    };
    let result = submit(state, caller, headers, job, charge).await?;
    let reranked = result
        .into_reranked()
        .map_err(|e| (Some(model.clone()), ApiError::from_job(e)))?;
    let tokens: u64 = reranked.token_counts.iter().map(|&t| u64::from(t)).sum();
    let results = reranked
        .results
        .into_iter()
        .map(|score| RerankResult {
            index: score.index,
            relevance_score: score.score,
            document: keep
                .as_ref()
                .and_then(|docs| docs.get(score.index as usize).cloned()),
        })
        .collect();
    Ok((
        model.clone(),
        RerankResponse {
            id,
            object: "rerank",
            results,
            model,
            usage: Usage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        },
    ))
}
