//! The HTTP target: each job as one OpenAI-shaped `POST /v1/embeddings`
//! (its texts as the `input` array) to a jetinfer gateway, over pooled
//! keep-alive HTTP/1.1 connections, so the same scenarios measure the
//! gateway against the NATS `Client`.
//!
//! Plain `http://` only: the loadgen measures a gateway on loopback, where
//! TLS would add a cost the NATS target does not pay. What comes back is
//! untrusted: a body is read up to [`MAX_RESPONSE_BYTES`], and an error is
//! counted under its status and OpenAI `code` only when that code is a short
//! plain word (else `other`), so a server cannot flood the report's keys.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jetinfer_schemas::Job;
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::stats::JobOutcome;

/// Longest response body read; a 64-text job in base64 is about 130 KiB.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Idle pooled connections kept per host; closed-loop users each hold one.
const POOL_IDLE_PER_HOST: usize = 1024;
/// Longest a pooled connection waits unused before it is closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest an OpenAI error code counted as its own kind.
const MAX_CODE_LEN: usize = 40;
/// The embeddings route under the base URL.
const EMBEDDINGS_PATH: &str = "/v1/embeddings";

/// Where and how the HTTP target sends: the gateway's base URL and the API
/// key it presents (never shown: `Debug` redacts it).
#[derive(Clone)]
pub struct HttpTarget {
    /// Base URL, e.g. `http://127.0.0.1:8080`; `/v1/embeddings` is appended.
    pub url: String,
    pub api_key: String,
    /// `float` or `base64` (what the official OpenAI SDKs ask by default).
    pub encoding_format: EncodingFormat,
}

impl fmt::Debug for HttpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTarget")
            .field("url", &self.url)
            .field("api_key", &"<redacted>")
            .field("encoding_format", &self.encoding_format)
            .finish()
    }
}

/// The `encoding_format` each request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodingFormat {
    Float,
    #[default]
    Base64,
}

impl EncodingFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            EncodingFormat::Float => "float",
            EncodingFormat::Base64 => "base64",
        }
    }
}

impl std::str::FromStr for EncodingFormat {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "float" => Ok(EncodingFormat::Float),
            "base64" => Ok(EncodingFormat::Base64),
            other => Err(format!("{other:?}: expected float or base64")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpTargetError {
    #[error(
        "{0:?} is not an http:// URL with a host (https is not supported: measure on loopback)"
    )]
    Url(String),
    #[error("reading the API key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the API key file {0} is empty")]
    EmptyKey(String),
}

impl HttpTarget {
    /// A target at `url` presenting the key held in `key_file` (its first
    /// line, trimmed).
    pub fn with_key_file(
        url: &str,
        key_file: &Path,
        encoding_format: EncodingFormat,
    ) -> Result<Self, HttpTargetError> {
        let shown = key_file.display().to_string();
        let text =
            std::fs::read_to_string(key_file).map_err(|source| HttpTargetError::KeyFile {
                path: shown.clone(),
                source,
            })?;
        let api_key = text.lines().next().unwrap_or("").trim().to_string();
        if api_key.is_empty() {
            return Err(HttpTargetError::EmptyKey(shown));
        }
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            api_key,
            encoding_format,
        })
    }
}

/// A pooled HTTP client bound to one gateway.
#[derive(Clone)]
pub struct HttpClient {
    client: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    authorization: String,
    encoding_format: EncodingFormat,
    timeout: Duration,
}

#[derive(serde::Serialize)]
struct EmbeddingsRequest<'a> {
    model: &'a str,
    input: &'a [String],
    encoding_format: &'static str,
}

#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<IgnoredAny>,
    usage: Usage,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: Option<String>,
}

impl HttpClient {
    /// A client for `target`; each request ends within `timeout`.
    pub fn new(target: &HttpTarget, timeout: Duration) -> Result<Self, HttpTargetError> {
        let uri: Uri = format!("{}{EMBEDDINGS_PATH}", target.url)
            .parse()
            .map_err(|_| HttpTargetError::Url(target.url.clone()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(HttpTargetError::Url(target.url.clone()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Ok(Self {
            client,
            uri,
            authorization: format!("Bearer {}", target.api_key),
            encoding_format: target.encoding_format,
            timeout,
        })
    }

    /// Sends `job` as one embeddings request and says how it ended.
    pub async fn submit(&self, job: &Job) -> JobOutcome {
        match tokio::time::timeout(self.timeout, self.exchange(job)).await {
            Ok(outcome) => outcome,
            Err(_) => JobOutcome::Error("timeout".into()),
        }
    }

    async fn exchange(&self, job: &Job) -> JobOutcome {
        let body = serde_json::to_vec(&EmbeddingsRequest {
            model: &job.model,
            input: &job.inputs,
            encoding_format: self.encoding_format.as_str(),
        })
        .expect("a request of strings serialises");
        let request = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, self.authorization.as_str())
            .body(Full::new(Bytes::from(body)))
            .expect("a request from a checked URI builds");
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(err) if err.is_connect() => return JobOutcome::Error("http_connect".into()),
            Err(_) => return JobOutcome::Error("http_transport".into()),
        };
        let status = response.status();
        let body = match Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => return JobOutcome::Error(format!("http_{}_body", status.as_u16())),
        };
        outcome(status, &body, job.inputs.len())
    }
}

/// How a response with `status` and `body` ends a job of `inputs` texts.
pub fn outcome(status: StatusCode, body: &[u8], inputs: usize) -> JobOutcome {
    if status == StatusCode::OK {
        return match serde_json::from_slice::<EmbeddingsResponse>(body) {
            Ok(r) if r.data.len() == inputs => JobOutcome::Ok {
                inputs: r.data.len() as u64,
                tokens: r.usage.prompt_tokens,
            },
            Ok(_) => JobOutcome::Error("http_200_wrong_count".into()),
            Err(_) => JobOutcome::Error("http_200_unreadable".into()),
        };
    }
    let code = serde_json::from_slice::<ErrorResponse>(body)
        .ok()
        .and_then(|e| e.error.code)
        .filter(|c| {
            !c.is_empty()
                && c.len() <= MAX_CODE_LEN
                && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
        .unwrap_or_else(|| "other".into());
    JobOutcome::Error(format!("http_{}_{code}", status.as_u16()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_counts_its_inputs_and_the_usage_tokens() {
        let body = br#"{"object":"list","data":[{"index":0},{"index":1}],"model":"m","usage":{"prompt_tokens":17,"total_tokens":17}}"#;
        assert_eq!(
            outcome(StatusCode::OK, body, 2),
            JobOutcome::Ok {
                inputs: 2,
                tokens: 17
            }
        );
        assert_eq!(
            outcome(StatusCode::OK, body, 3),
            JobOutcome::Error("http_200_wrong_count".into())
        );
        assert_eq!(
            outcome(StatusCode::OK, b"<html>", 1),
            JobOutcome::Error("http_200_unreadable".into())
        );
    }

    #[test]
    fn errors_are_counted_by_status_and_a_plain_openai_code_only() {
        let err = |code: &str| {
            format!(r#"{{"error":{{"message":"m","type":"t","param":null,"code":{code}}}}}"#)
        };
        let kind = |status: u16, body: &str| match outcome(
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            1,
        ) {
            JobOutcome::Error(kind) => kind,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            kind(429, &err("\"rate_limit_exceeded\"")),
            "http_429_rate_limit_exceeded"
        );
        assert_eq!(kind(401, &err("null")), "http_401_other");
        assert_eq!(kind(502, "bad gateway"), "http_502_other");
        assert_eq!(kind(400, &err("\"a\\nb\u{202e}\"")), "http_400_other");
        assert_eq!(
            kind(400, &err(&format!("\"{}\"", "x".repeat(41)))),
            "http_400_other"
        );
    }

    #[test]
    fn only_plain_http_urls_are_taken_and_the_key_is_never_shown() {
        let target = |url: &str| HttpTarget {
            url: url.into(),
            api_key: "sk-secret".into(),
            encoding_format: EncodingFormat::Base64,
        };
        assert!(HttpClient::new(&target("https://127.0.0.1:1"), Duration::from_secs(1)).is_err());
        assert!(HttpClient::new(&target("127.0.0.1:1"), Duration::from_secs(1)).is_err());
        assert!(HttpClient::new(&target("http://127.0.0.1:1"), Duration::from_secs(1)).is_ok());
        assert!(!format!("{:?}", target("http://x")).contains("sk-secret"));
    }
}
