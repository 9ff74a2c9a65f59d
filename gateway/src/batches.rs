//! The OpenAI Batch API over HTTP: `/v1/files` and `/v1/batches` on the
//! tenant's [`jetinfer_producer::batches::Batches`] handle (one per tenant,
//! opened at start with its [`jetinfer_producer::batches::Runner`], so
//! unfinished batches resume when a gateway starts).
//!
//! Every route takes [`Caller`] (reads are open to read-only keys, changes
//! need a user key), charges the caller's limits one input per request (the
//! batch's jobs are bounded by the worker's per-tenant limits and
//! `batches.in_flight`), and answers refusals OpenAI-shaped
//! ([`ApiError::from_batch`]). An upload is streamed from the multipart
//! body into the object store, never held whole; a file's content is
//! streamed back the same way. A tenant's files and batches live in its own
//! NATS account: another tenant's ids are simply not found (404).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::multipart::{Field, Multipart, MultipartRejection};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::TryStreamExt;
use jetinfer_producer::batches::{Batch, BatchError, Batches, FileDeleted, FileObject, List};
use serde::Deserialize;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::auth::Caller;
use crate::error::{shown, ApiError};
use crate::AppState;

/// Bytes a multipart body may hold beyond the file: framing and the
/// `purpose` field.
pub const MULTIPART_SLACK: usize = 64 * 1024;
/// Longest text field (`purpose`, or one the gateway ignores) read.
const MAX_FIELD_BYTES: usize = 1024;

/// `POST /v1/batches`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBatchRequest {
    pub input_file_id: String,
    /// `/v1/embeddings`, the one endpoint served.
    pub endpoint: String,
    /// `24h`.
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `GET /v1/batches`'s query.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<usize>,
}

/// `GET /v1/files`'s query.
#[derive(Debug, Deserialize)]
pub struct FileListQuery {
    pub purpose: Option<String>,
    pub after: Option<String>,
    pub limit: Option<usize>,
    /// Only `desc` (newest first) is served.
    pub order: Option<String>,
}

#[utoipa::path(get, path = "/v1/files", params(("purpose" = Option<String>, Query, description = "only files of this purpose (`batch`, `batch_output`)"), ("after" = Option<String>, Query, description = "a file id: the files after it"), ("limit" = Option<usize>, Query, description = "1 to 10,000, default 10,000"), ("order" = Option<String>, Query, description = "`desc` only")),
    responses((status = 200, body = List<FileObject>, description = "`{object: list, data, first_id, last_id, has_more}`, newest first"), (status = 400, body = crate::openai::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_files(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> Result<Json<List<FileObject>>, ApiError> {
    charge(&state, &caller)?;
    let query = Query::<FileListQuery>::try_from_uri(&uri)
        .map_err(|_| {
            ApiError::invalid(
                "limit",
                "after must be a file id and limit a number from 1 to 10000",
            )
        })?
        .0;
    if query.order.as_deref().is_some_and(|o| o != "desc") {
        return Err(ApiError::invalid(
            "order",
            "only order=desc (newest first) is served",
        ));
    }
    batches_of(&caller)
        .list_files(
            query.purpose.as_deref(),
            query.after.as_deref(),
            query.limit,
        )
        .await
        .map(Json)
        .map_err(batch_error)
}

fn batches_of(caller: &Caller) -> &Batches {
    &caller.tenant.batches
}

/// Charges one input to the caller's key and tenant limits.
fn charge(state: &AppState, caller: &Caller) -> Result<(), ApiError> {
    if let Some(rate) = caller.rate {
        state.key_limits.charge(&caller.key_id, rate, 1)?;
    }
    if let Some(limiter) = &caller.tenant.limiter {
        limiter.charge(1, "this tenant")?;
    }
    Ok(())
}

fn id_of(
    path: Result<Path<String>, PathRejection>,
    param: &'static str,
) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|_| ApiError::invalid(param, format!("{param} is not a valid id")))
}

fn batch_error(err: BatchError) -> ApiError {
    ApiError::from_batch(err)
}

#[utoipa::path(
    post,
    path = "/v1/files",
    request_body(content_type = "multipart/form-data", description = "`file` (JSONL, one request per line) and `purpose` = `batch`"),
    responses(
        (status = 200, body = FileObject, description = "OpenAI's File object"),
        (status = 400, body = crate::openai::ErrorBody, description = "not multipart, no file, purpose not batch"),
        (status = 413, body = crate::openai::ErrorBody, description = "the file is over `batches.max_file_bytes` or `max_file_lines`"),
    ),
    security(("bearer" = []))
)]
pub async fn create_file(
    State(state): State<AppState>,
    caller: Caller,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    caller.require_user("upload files")?;
    charge(&state, &caller)?;
    let mut multipart = multipart.map_err(|_| {
        ApiError::invalid(
            "file",
            "Upload the file as multipart/form-data with the fields file and purpose",
        )
    })?;
    let batches = batches_of(&caller);
    let mut purpose: Option<String> = None;
    let mut stored: Option<FileObject> = None;
    let outcome: Result<(), ApiError> = async {
        while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
            let name = field.name().map(str::to_owned);
            match name.as_deref() {
                Some("file") if stored.is_none() => {
                    let filename = field
                        .file_name()
                        .filter(|n| !n.is_empty())
                        .unwrap_or("file.jsonl")
                        .to_string();
                    // `purpose` normally comes first (the SDKs send fields
                    // before files); if not, the file is stored as a batch
                    // file and removed below unless `purpose` says so.
                    let asked = purpose.clone().unwrap_or_else(|| "batch".into());
                    // A body past its bound fails the field's stream; the
                    // store sees only an I/O error, so the cause is kept.
                    let past_bound = std::sync::atomic::AtomicBool::new(false);
                    let reader = StreamReader::new(field.map_err(|err| {
                        if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
                            past_bound.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        std::io::Error::other(err)
                    }));
                    let created = batches.create_file(&filename, &asked, reader).await;
                    if past_bound.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(too_large_body());
                    }
                    stored = Some(created.map_err(batch_error)?);
                }
                Some("file") => {
                    return Err(ApiError::invalid("file", "Upload one file per request"));
                }
                Some("purpose") => purpose = Some(text_field(field).await?),
                _ => {
                    text_field(field).await?;
                }
            }
        }
        Ok(())
    }
    .await;
    let checked = outcome.and_then(|()| match purpose.as_deref() {
        None => Err(ApiError::invalid(
            "purpose",
            "purpose is required: send purpose=batch",
        )),
        Some("batch") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            "purpose",
            format!(
                "purpose {:?} is not served here: upload batch input files with purpose \"batch\"",
                shown(other)
            ),
        )),
    });
    match (checked, stored) {
        (Ok(()), Some(file)) => Ok(Json(file)),
        (Ok(()), None) => Err(ApiError::invalid("file", "file is required")),
        (Err(err), stored) => {
            // Refused after the file was stored: nothing of it is kept.
            if let Some(file) = stored {
                let _ = batches.delete_file(&file.id).await;
            }
            Err(err)
        }
    }
}

/// A text field's value, at most [`MAX_FIELD_BYTES`].
async fn text_field(mut field: Field<'_>) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if bytes.len() + chunk.len() > MAX_FIELD_BYTES {
            return Err(ApiError::invalid(
                "purpose",
                format!("a form field is longer than {MAX_FIELD_BYTES} bytes"),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes).map_err(|_| ApiError::invalid("purpose", "a form field is not UTF-8"))
}

fn too_large_body() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "The upload is larger than the gateway accepts (batches.max_file_bytes)",
    )
    .param("file")
}

fn multipart_error(err: axum::extract::multipart::MultipartError) -> ApiError {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large_body()
    } else {
        ApiError::invalid("file", "The multipart body could not be read")
    }
}

#[utoipa::path(get, path = "/v1/files/{file_id}", params(("file_id" = String, Path)),
    responses((status = 200, body = FileObject, description = "OpenAI's File object"), (status = 404, body = crate::openai::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_file(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<FileObject>, ApiError> {
    charge(&state, &caller)?;
    let id = id_of(path, "file_id")?;
    batches_of(&caller)
        .file(&id)
        .await
        .map(Json)
        .map_err(batch_error)
}

#[utoipa::path(get, path = "/v1/files/{file_id}/content", params(("file_id" = String, Path)),
    responses((status = 200, description = "the file's bytes (JSONL), streamed", content_type = "application/octet-stream"), (status = 404, body = crate::openai::ErrorBody)),
    security(("bearer" = [])))]
pub async fn file_content(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    charge(&state, &caller)?;
    let id = id_of(path, "file_id")?;
    let object = batches_of(&caller)
        .file_content(&id)
        .await
        .map_err(batch_error)?;
    let size = object.info.size;
    let mut response = Body::from_stream(ReaderStream::new(object)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size as u64));
    Ok(response)
}

#[utoipa::path(delete, path = "/v1/files/{file_id}", params(("file_id" = String, Path)),
    responses((status = 200, body = FileDeleted, description = "`{id, object: file, deleted: true}`"), (status = 404, body = crate::openai::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_file(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<FileDeleted>, ApiError> {
    caller.require_user("delete files")?;
    charge(&state, &caller)?;
    let id = id_of(path, "file_id")?;
    batches_of(&caller)
        .delete_file(&id)
        .await
        .map(Json)
        .map_err(batch_error)
}

#[utoipa::path(post, path = "/v1/batches", request_body = CreateBatchRequest,
    responses((status = 200, body = Batch, description = "OpenAI's Batch object, `validating`"), (status = 400, body = crate::openai::ErrorBody), (status = 404, body = crate::openai::ErrorBody, description = "no such input file")),
    security(("bearer" = [])))]
pub async fn create_batch(
    State(state): State<AppState>,
    caller: Caller,
    request: axum::extract::Request,
) -> Result<Json<Batch>, ApiError> {
    caller.require_user("create batches")?;
    charge(&state, &caller)?;
    let (parts, body) = request.into_parts();
    let request: CreateBatchRequest =
        crate::embeddings::read_request(&parts.headers, body, state.config.limits.max_body_bytes)
            .await?;
    batches_of(&caller)
        .create_batch(
            &request.input_file_id,
            &request.endpoint,
            &request.completion_window,
            request.metadata,
        )
        .await
        .map(Json)
        .map_err(batch_error)
}

#[utoipa::path(get, path = "/v1/batches/{batch_id}", params(("batch_id" = String, Path)),
    responses((status = 200, body = Batch, description = "OpenAI's Batch object"), (status = 404, body = crate::openai::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_batch(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Batch>, ApiError> {
    charge(&state, &caller)?;
    let id = id_of(path, "batch_id")?;
    batches_of(&caller)
        .batch(&id)
        .await
        .map(Json)
        .map_err(batch_error)
}

#[utoipa::path(post, path = "/v1/batches/{batch_id}/cancel", params(("batch_id" = String, Path)),
    responses((status = 200, body = Batch, description = "OpenAI's Batch object, `cancelling` or `cancelled`"), (status = 404, body = crate::openai::ErrorBody), (status = 409, body = crate::openai::ErrorBody, description = "the batch has ended")),
    security(("bearer" = [])))]
pub async fn cancel_batch(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Batch>, ApiError> {
    caller.require_user("cancel batches")?;
    charge(&state, &caller)?;
    let id = id_of(path, "batch_id")?;
    batches_of(&caller)
        .cancel(&id)
        .await
        .map(Json)
        .map_err(batch_error)
}

#[utoipa::path(get, path = "/v1/batches", params(("after" = Option<String>, Query), ("limit" = Option<usize>, Query, description = "1 to 100, default 20")),
    responses((status = 200, body = List<Batch>, description = "`{object: list, data, first_id, last_id, has_more}`, newest first"), (status = 400, body = crate::openai::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_batches(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> Result<Json<List<Batch>>, ApiError> {
    charge(&state, &caller)?;
    let query = Query::<ListQuery>::try_from_uri(&uri)
        .map_err(|_| {
            ApiError::invalid(
                "limit",
                "after must be a batch id and limit a number from 1 to 100",
            )
        })?
        .0;
    batches_of(&caller)
        .list(query.after.as_deref(), query.limit)
        .await
        .map(Json)
        .map_err(batch_error)
}
