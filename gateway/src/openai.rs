//! OpenAI's request, response and error shapes for the routes the gateway
//! serves, exactly as the official SDKs send and read them. Their schemas
//! are what `/openapi.json` describes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    /// A string, an array of strings, or token ids (refused: the worker
    /// tokenises text itself).
    #[schema(value_type = Object)]
    pub input: Input,
    pub model: String,
    /// `float` (default) or `base64` (little-endian f32), which the Python
    /// SDK asks for when its caller names none.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Keep the first N values of each embedding, re-normalised.
    #[serde(default)]
    pub dimensions: Option<u32>,
    /// Accepted and ignored.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub user: Option<serde_json::Value>,
}

/// What `input` may be.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: &'static str,
    /// Floats, or a base64 string of little-endian f32.
    #[schema(value_type = Object)]
    pub embedding: Embedding,
    pub index: usize,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Embedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Model>,
}

/// `GET /v1/models/{id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unknown to the queue: 0.
    pub created: u64,
    pub owned_by: &'static str,
}

/// Every error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

/// `POST /v1/rerank`, as Infinity and Cohere take it; `texts` (and
/// `return_text`) are text-embeddings-inference's names for the same.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RerankRequest {
    pub model: String,
    pub query: String,
    /// The documents to score (Infinity, Cohere).
    #[serde(default)]
    pub documents: Option<Vec<String>>,
    /// The same, by text-embeddings-inference's name; one of the two.
    #[serde(default)]
    pub texts: Option<Vec<String>>,
    /// Return only the best N (all when absent).
    #[serde(default)]
    pub top_n: Option<u32>,
    /// Echo each document's text in its result.
    #[serde(default)]
    pub return_documents: Option<bool>,
    /// text-embeddings-inference's `return_documents`.
    #[serde(default)]
    pub return_text: Option<bool>,
    /// Accepted and ignored.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub user: Option<serde_json::Value>,
}

/// The answer to `POST /v1/rerank`: Infinity's shape (Cohere's `results`
/// with `index` and `relevance_score`, `document` the text itself).
#[derive(Debug, Serialize, ToSchema)]
pub struct RerankResponse {
    /// The job's id.
    pub id: String,
    /// Always `rerank`.
    pub object: &'static str,
    /// Best first.
    pub results: Vec<RerankResult>,
    pub model: String,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RerankResult {
    /// The document's position in the request.
    pub index: u32,
    /// `sigmoid(logit)` of the cross-encoder, in 0..1.
    pub relevance_score: f32,
    /// The document's text, when `return_documents` asked for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
}
