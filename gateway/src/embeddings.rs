//! `POST /v1/embeddings`: one request is one job. The body is read within
//! the size limit and parsed here (not by an extractor), so every refusal,
//! malformed JSON included, is OpenAI-shaped. The caller's limits are
//! charged the input count, the job is published through the tenant's
//! `Client` and its result awaited up to `limits.job_timeout`.
//!
//! A job accepted into the queue ends as this response, an error response,
//! or, when the caller went away or the wait ran out (504), as a result in
//! the tenant's results stream: the worker answers it either way.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine;
use http_body_util::BodyExt;
use jetinfer_schemas::{Job, JobOptions};

use crate::auth::Caller;
use crate::error::{shown, ApiError};
use crate::openai::{
    Embedding, EmbeddingData, EmbeddingsRequest, EmbeddingsResponse, EncodingFormat, Input, Usage,
};
use crate::submit::{respond, submit, Charge, Failed};
use crate::AppState;

/// The model label of a request, set by the handler once the model is known
/// to be served, so the metric's `model` label is bounded by the served set.
#[derive(Clone)]
pub struct ModelLabel(pub String);

#[utoipa::path(
    post,
    path = "/v1/embeddings",
    request_body = EmbeddingsRequest,
    responses(
        (status = 200, body = EmbeddingsResponse),
        (status = 400, body = crate::openai::ErrorBody, description = "invalid input"),
        (status = 401, body = crate::openai::ErrorBody, description = "missing or bad key"),
        (status = 403, body = crate::openai::ErrorBody, description = "not allowed"),
        (status = 404, body = crate::openai::ErrorBody, description = "unknown model"),
        (status = 413, body = crate::openai::ErrorBody, description = "body or input too large"),
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
    respond(embed(&state, &caller, &headers, request.into_body()).await)
}

async fn embed(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
) -> Result<(String, EmbeddingsResponse), Failed> {
    let fail = |err: ApiError| -> Failed { (None, err) };
    caller.require_user("create embeddings").map_err(fail)?;
    let limits = &state.config.limits;
    let request: EmbeddingsRequest = read_request(headers, body, limits.max_body_bytes)
        .await
        .map_err(fail)?;
    let inputs = inputs(request.input, limits).map_err(fail)?;
    if let Some(dimensions) = request.dimensions {
        if dimensions == 0 {
            return Err(fail(ApiError::invalid(
                "dimensions",
                "dimensions must be at least 1",
            )));
        }
    }
    if jetinfer_nats::subjects::check_token("model", &request.model).is_err() {
        return Err(fail(ApiError::model_not_found(&request.model)));
    }
    let cost = inputs.len();
    let job = Job::new(request.model.clone(), inputs).with_options(JobOptions {
        dimensions: request.dimensions,
        ..JobOptions::default()
    });
    let model = request.model;
    let charge = Charge {
        cost,
        param: "input",
        noun: "inputs",
    };
    let result = submit(state, caller, headers, job, charge).await?;
    let embeddings = result
        .into_result()
        .map_err(|e| (Some(model.clone()), ApiError::from_job(e)))?;
    let format = request.encoding_format.unwrap_or_default();
    let tokens: u64 = embeddings.token_counts.iter().map(|&t| u64::from(t)).sum();
    let data = embeddings
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, vector)| EmbeddingData {
            object: "embedding",
            embedding: match format {
                EncodingFormat::Float => Embedding::Float(vector),
                EncodingFormat::Base64 => Embedding::Base64(base64_f32(&vector)),
            },
            index,
        })
        .collect();
    Ok((
        model.clone(),
        EmbeddingsResponse {
            object: "list",
            data,
            model,
            usage: Usage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        },
    ))
}

/// How much of a too-large body is read (and dropped) before the 413, so
/// the client, still sending, reads the answer instead of a reset
/// connection. A body declared larger is refused without reading it.
const MAX_DRAIN_BYTES: usize = 16 * 1024 * 1024;

/// Reads at most `limit` bytes of JSON: 413 past it, 400 for anything that
/// is not the request (any JSON body of the gateway's routes).
pub(crate) async fn read_request<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    let too_large = || {
        ApiError::too_large(
            None,
            format!("The request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let drain = MAX_DRAIN_BYTES.max(limit);
    if declared.is_some_and(|n| n > drain as u64) {
        return Err(too_large());
    }
    let mut body = body;
    let mut bytes = Vec::with_capacity(declared.map_or(0, |n| n.min(limit as u64) as usize));
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        // Cut off by the client, or by the request timeout: not 413.
        let frame =
            frame.map_err(|_| ApiError::invalid("body", "The request body could not be read"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > drain {
            break;
        }
        if seen <= limit {
            bytes.extend_from_slice(&data);
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        // serde's message names the field and what was wrong; the text it
        // quotes is the caller's own, escaped and cut short.
        let message = match e.classify() {
            serde_json::error::Category::Data => {
                format!("Invalid request: {}", shown(&e.to_string()))
            }
            _ => format!(
                "We could not parse the JSON body of your request (line {}, column {})",
                e.line(),
                e.column()
            ),
        };
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            .code("invalid_json")
    })
}

/// The texts of `input`, within the limits.
fn inputs(input: Input, limits: &crate::config::EdgeLimits) -> Result<Vec<String>, ApiError> {
    let texts = match input {
        Input::One(text) => vec![text],
        Input::Many(texts) => texts,
        Input::Tokens(_) | Input::ManyTokens(_) => {
            return Err(ApiError::invalid(
                "input",
                "Token-id inputs are not supported: send text (the worker tokenises it with the model's own tokenizer)",
            ))
        }
    };
    if texts.is_empty() {
        return Err(ApiError::invalid("input", "input must not be empty"));
    }
    if texts.len() > limits.max_inputs {
        return Err(ApiError::too_large(
            Some("input"),
            format!(
                "{} inputs in one request; the limit is {}: split the request",
                texts.len(),
                limits.max_inputs
            ),
        ));
    }
    for (index, text) in texts.iter().enumerate() {
        if text.len() > limits.max_chars_per_input
            && text.chars().count() > limits.max_chars_per_input
        {
            return Err(ApiError::too_large(
                Some("input"),
                format!(
                    "input[{index}] is longer than {} characters",
                    limits.max_chars_per_input
                ),
            ));
        }
    }
    Ok(texts)
}

/// OpenAI's base64 encoding: the vector's little-endian f32 bytes.
pub fn base64_f32(vector: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(vector.len() * 4);
    for value in vector {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        let encoded = base64_f32(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(&bytes[..4], &1.0f32.to_le_bytes());
        assert_eq!(&bytes[4..], &(-2.5f32).to_le_bytes());
    }
}
