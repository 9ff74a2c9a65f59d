//! What the job routes (`/v1/embeddings`, `/v1/rerank`) share once a request
//! is screened: charging the caller's limits, bounding the job's encoded
//! size, submitting it with the request's trace context, and labelling the
//! response with the model for the metrics. Each route builds its own job
//! and its own answer; the steps between are one path, so a limit or an
//! error mapping cannot drift between routes.

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use jetinfer_producer::SubmitError;
use jetinfer_schemas::{Job, JobResult};

use crate::auth::Caller;
use crate::embeddings::ModelLabel;
use crate::error::ApiError;
use crate::AppState;

/// A refusal, with the model to label it by once the model is known to be
/// served (so the `model` label stays bounded by the served set).
pub(crate) type Failed = (Option<String>, ApiError);

/// What a job route's request is charged and bounded by: `cost` inputs of
/// the caller's rate limits, and the job's size, blamed on `param` (the
/// request field that makes it large, `noun` in the message).
pub(crate) struct Charge {
    pub cost: usize,
    pub param: &'static str,
    pub noun: &'static str,
}

/// Charges `charge.cost` to the caller's key and tenant limits, refuses a
/// job larger than `limits.max_job_bytes`, then submits it and awaits its
/// result. A valid `traceparent` header is carried to the worker.
pub(crate) async fn submit(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    job: Job,
    charge: Charge,
) -> Result<JobResult, Failed> {
    let fail = |err: ApiError| -> Failed { (None, err) };
    let cost = u32::try_from(charge.cost).unwrap_or(u32::MAX);
    if let Some(rate) = caller.rate {
        state
            .key_limits
            .charge(&caller.key_id, rate, cost)
            .map_err(fail)?;
    }
    if let Some(limiter) = &caller.tenant.limiter {
        limiter.charge(cost, "this tenant").map_err(fail)?;
    }
    let limit = state.config.limits.max_job_bytes;
    let size = jetinfer_schemas::encode_job(&job).len();
    if size > limit {
        return Err(fail(ApiError::too_large(
            Some(charge.param),
            format!(
                "The request makes a {size}-byte job; the limit is {limit}: send fewer or shorter {}",
                charge.noun
            ),
        )));
    }
    let model = job.model.clone();
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|t| jetinfer_nats::publish::valid_traceparent(t));
    caller
        .tenant
        .client
        .submit_traced(job, traceparent)
        .await
        .map_err(|e| {
            let served = !matches!(e, SubmitError::UnknownModel(_) | SubmitError::Subject(_));
            (
                served.then(|| model.clone()),
                ApiError::from_submit(e, &model),
            )
        })
}

/// The route's answer: JSON on success, the OpenAI-shaped error otherwise,
/// labelled with the model where one is known.
pub(crate) fn respond<T: serde::Serialize>(outcome: Result<(String, T), Failed>) -> Response {
    let (model, mut response) = match outcome {
        Ok((model, body)) => (Some(model), Json(body).into_response()),
        Err((model, err)) => (model, err.into_response()),
    };
    if let Some(model) = model {
        response.extensions_mut().insert(ModelLabel(model));
    }
    response
}
