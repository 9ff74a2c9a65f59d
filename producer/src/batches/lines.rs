//! The Batch API's line formats. Input lines are
//! `{"custom_id", "method": "POST", "url": "/v1/embeddings", "body": {model,
//! input, encoding_format?, dimensions?, user?}}`, checked as the bulk
//! reader checks its own ([`crate::bulk::input`]: bounded lines, line
//! numbers); output and error lines are OpenAI's `{"id", "custom_id",
//! "response": {"status_code", "request_id", "body"}, "error"}`, the body
//! being the embeddings response OpenAI would return.

use base64::Engine;
use jetinfer_nats::subjects;
use jetinfer_schemas::{Embeddings, ErrorCode, Job, JobError, JobOptions};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::bulk::input::{custom_id, kind, Parsed};
use crate::bulk::job_id;

/// OpenAI's ceiling on inputs per embeddings request.
pub const MAX_INPUTS_PER_REQUEST: usize = 2048;
/// Largest `dimensions` screened as plausible (no served model is wider).
pub const MAX_DIMENSIONS: u64 = 65_536;
const FIELDS: &str = "custom_id, method, url, body";
const BODY_FIELDS: &str = "model, input, encoding_format, dimensions, user";

/// How a request wants its response written: screened at parse time,
/// applied when its result is written. `dimensions` is not here: it is the
/// job's own option ([`JobOptions::dimensions`]), applied (and checked
/// against the model's width) by the worker, as for `/v1/embeddings`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineOptions {
    pub base64: bool,
    /// The request's `body.model`, the response's `model` as
    /// `/v1/embeddings` answers it.
    pub model: String,
}

/// Parses one input line of a batch for `endpoint` into its `custom_id`, its
/// job in run `run`, and its output options.
pub fn parse(
    bytes: &[u8],
    run: &str,
    endpoint: &str,
) -> Result<(String, Job, LineOptions), (Option<String>, String)> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| (None, format!("not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err((None, format!("expected a JSON object with {FIELDS}")));
    };
    let custom_id = custom_id(&fields).map_err(|why| (None, why))?;
    let with_id = |why: String| (Some(custom_id.clone()), why);
    if let Some(unknown) = fields
        .keys()
        .find(|k| !FIELDS.split(", ").any(|f| f == k.as_str()))
    {
        return Err(with_id(format!(
            "unknown field {unknown:?} (expected {FIELDS})"
        )));
    }
    match fields.get("method") {
        Some(Value::String(m)) if m == "POST" => {}
        _ => return Err(with_id("\"method\" must be \"POST\"".into())),
    }
    match fields.get("url") {
        Some(Value::String(u)) if u == endpoint => {}
        _ => {
            return Err(with_id(format!(
                "\"url\" must be {endpoint:?}, the batch's endpoint"
            )))
        }
    }
    let body = match fields.get("body") {
        Some(Value::Object(body)) => body,
        Some(other) => {
            return Err(with_id(format!(
                "\"body\" must be an object, not {}",
                kind(other)
            )))
        }
        None => return Err(with_id("missing \"body\"".into())),
    };
    let (job, options) = body_job(body).map_err(with_id)?;
    let job = job.with_id(job_id(run, &custom_id));
    Ok((custom_id, job, options))
}

/// [`parse`] as the bulk reader takes it (the options are looked up again
/// when the result is written).
pub fn parse_job(bytes: &[u8], run: &str, endpoint: &str) -> Parsed {
    parse(bytes, run, endpoint).map(|(id, job, _)| (id, job))
}

fn body_job(body: &Map<String, Value>) -> Result<(Job, LineOptions), String> {
    if let Some(unknown) = body
        .keys()
        .find(|k| !BODY_FIELDS.split(", ").any(|f| f == k.as_str()))
    {
        return Err(format!(
            "unknown parameter \"body.{unknown}\" (expected {BODY_FIELDS})"
        ));
    }
    let model = match body.get("model") {
        Some(Value::String(model)) => model.clone(),
        Some(other) => {
            return Err(format!(
                "\"body.model\" must be a string, not {}",
                kind(other)
            ))
        }
        None => return Err("missing \"body.model\"".into()),
    };
    subjects::check_token("model", &model).map_err(|e| e.to_string())?;
    let inputs = match body.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err("\"body.input\" is empty: give at least one text".into());
            }
            if items.len() > MAX_INPUTS_PER_REQUEST {
                return Err(format!(
                    "\"body.input\" has {} items, more than {MAX_INPUTS_PER_REQUEST}",
                    items.len()
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, t)| match t {
                    Value::String(t) => Ok(t.clone()),
                    Value::Number(_) | Value::Array(_) => Err(
                        "\"body.input\" as token ids is not supported: send the texts".to_string(),
                    ),
                    other => Err(format!(
                        "\"body.input\"[{i}] must be a string, not {}",
                        kind(other)
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(other) => {
            return Err(format!(
                "\"body.input\" must be a string or a list of strings, not {}",
                kind(other)
            ))
        }
        None => return Err("missing \"body.input\"".into()),
    };
    if inputs.iter().any(String::is_empty) {
        return Err("\"body.input\" must not contain an empty string".into());
    }
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => return Err("\"body.encoding_format\" must be \"float\" or \"base64\"".into()),
    };
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(d @ 1..=MAX_DIMENSIONS) => Some(d as u32),
            _ => {
                return Err(format!(
                    "\"body.dimensions\" must be an integer from 1 to {MAX_DIMENSIONS}"
                ))
            }
        },
        Some(other) => {
            return Err(format!(
                "\"body.dimensions\" must be an integer, not {}",
                kind(other)
            ))
        }
    };
    match body.get("user") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(other) => {
            return Err(format!(
                "\"body.user\" must be a string, not {}",
                kind(other)
            ))
        }
    }
    let job = Job::new(model.clone(), inputs).with_options(JobOptions {
        dimensions,
        ..JobOptions::default()
    });
    Ok((job, LineOptions { base64, model }))
}

/// One line of an output or error file.
#[derive(Serialize)]
struct OutLine<'a> {
    id: String,
    custom_id: Option<&'a str>,
    response: Option<Response>,
    error: Option<LineError<'a>>,
}

#[derive(Serialize)]
struct Response {
    status_code: u16,
    request_id: String,
    body: Value,
}

#[derive(Serialize)]
struct LineError<'a> {
    code: &'a str,
    message: &'a str,
}

fn request_line_id() -> String {
    format!("batch_req_{}", ulid::Ulid::new())
}

/// The output line of a request answered with embeddings: the body is what
/// `/v1/embeddings` answers for the same request (its `model` the one
/// asked for; the worker already applied `dimensions`).
pub fn answered(custom_id: &str, job_id: &str, e: &Embeddings, options: &LineOptions) -> Vec<u8> {
    let data: Vec<Value> = e
        .embeddings
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if options.base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = e.token_counts.iter().map(|&t| u64::from(t)).sum();
    let body = json!({
        "object": "list",
        "data": data,
        "model": options.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    line(OutLine {
        id: request_line_id(),
        custom_id: Some(custom_id),
        response: Some(Response {
            status_code: 200,
            request_id: job_id.to_string(),
            body,
        }),
        error: None,
    })
}

/// The error line of a request whose job got a typed error reply: the HTTP
/// response OpenAI would have given, or for a cancelled or expired batch's
/// request, no response and the batch's error.
pub fn failed(custom_id: &str, job_id: &str, error: &JobError) -> Vec<u8> {
    let (status, kind, code) = match error.code {
        ErrorCode::Cancelled => {
            return line(OutLine {
                id: request_line_id(),
                custom_id: Some(custom_id),
                response: None,
                error: Some(LineError {
                    code: "batch_cancelled",
                    message: "the batch was cancelled before this request ran",
                }),
            })
        }
        ErrorCode::UnknownModel => (404, "invalid_request_error", "model_not_found"),
        ErrorCode::RateLimited => (429, "rate_limit_exceeded", "rate_limit_exceeded"),
        ErrorCode::DeadlineExceeded => (504, "server_error", "timeout"),
        ErrorCode::Internal | ErrorCode::Unknown => (500, "server_error", "server_error"),
        ErrorCode::InvalidInput
        | ErrorCode::InvalidHeader
        | ErrorCode::InputTooLong
        | ErrorCode::TooManyInputs
        | ErrorCode::PayloadTooLarge
        | ErrorCode::UnsupportedVersion
        | ErrorCode::UnsupportedTask
        | ErrorCode::TooCostly => (400, "invalid_request_error", error.code.as_str()),
    };
    http_error(custom_id, job_id, status, kind, None, code, &error.message)
}

fn http_error(
    custom_id: &str,
    job_id: &str,
    status: u16,
    kind: &str,
    param: Option<&str>,
    code: &str,
    message: &str,
) -> Vec<u8> {
    line(OutLine {
        id: request_line_id(),
        custom_id: Some(custom_id),
        response: Some(Response {
            status_code: status,
            request_id: job_id.to_string(),
            body: json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
        }),
        error: None,
    })
}

/// The error line of an input line refused before submission.
pub fn refused(custom_id: Option<&str>, code: &str, message: &str) -> Vec<u8> {
    let code = match code {
        "unknown_model" => "model_not_found",
        _ => "invalid_request",
    };
    line(OutLine {
        id: request_line_id(),
        custom_id,
        response: None,
        error: Some(LineError { code, message }),
    })
}

fn line(out: OutLine<'_>) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&out).expect("an output line serialises");
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_why(line: &str) -> String {
        parse(line.as_bytes(), "r1", "/v1/embeddings")
            .unwrap_err()
            .1
    }

    #[test]
    fn an_openai_request_line_becomes_a_job_with_its_output_options() {
        let (id, job, options) = parse(
            br#"{"custom_id":"r-1","method":"POST","url":"/v1/embeddings","body":{"model":"minilm","input":["a","b"],"encoding_format":"base64","dimensions":8,"user":"u"}}"#,
            "run1",
            "/v1/embeddings",
        )
        .unwrap();
        assert_eq!(id, "r-1");
        assert_eq!(job.id, "run1:r-1");
        assert_eq!(job.model, "minilm");
        assert_eq!(job.inputs, ["a", "b"]);
        assert_eq!(job.options.dimensions, Some(8));
        assert_eq!(
            options,
            LineOptions {
                base64: true,
                model: "minilm".into()
            }
        );
    }

    #[test]
    fn bad_request_lines_say_what_is_wrong() {
        let ok = |body: &str| {
            format!(r#"{{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{body}}}"#)
        };
        assert!(refused_why("{nope").contains("not valid JSON"));
        assert!(refused_why(r#"{"method":"POST"}"#).contains("custom_id"));
        assert!(refused_why(
            r#"{"custom_id":"a","method":"GET","url":"/v1/embeddings","body":{}}"#
        )
        .contains("POST"));
        assert!(refused_why(
            r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}"#
        )
        .contains("url"));
        assert!(refused_why(&ok(r#"{"input":"x"}"#)).contains("body.model"));
        assert!(refused_why(&ok(r#"{"model":"m"}"#)).contains("body.input"));
        assert!(refused_why(&ok(r#"{"model":"m","input":[]}"#)).contains("empty"));
        assert!(refused_why(&ok(r#"{"model":"m","input":""}"#)).contains("empty string"));
        assert!(refused_why(&ok(r#"{"model":"m","input":[[1,2]]}"#)).contains("token ids"));
        assert!(
            refused_why(&ok(r#"{"model":"m","input":"x","encoding_format":"hex"}"#))
                .contains("encoding_format")
        );
        assert!(
            refused_why(&ok(r#"{"model":"m","input":"x","dimensions":0}"#)).contains("dimensions")
        );
        assert!(
            refused_why(&ok(r#"{"model":"m","input":"x","temperature":1}"#))
                .contains("unknown parameter")
        );
        assert!(refused_why(&ok(r#"{"model":"a.b","input":"x"}"#)).contains("model"));
    }
}
