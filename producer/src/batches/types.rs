//! OpenAI's File and Batch objects and list pages, in OpenAI's JSON shape
//! exactly (field names, `object` tags, Unix-second timestamps, `null` for
//! what is not known yet), so the gateway can return them as they are.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `purpose` of an uploaded batch input file.
pub const PURPOSE_BATCH: &str = "batch";
/// `purpose` of the output and error files a batch writes.
pub const PURPOSE_BATCH_OUTPUT: &str = "batch_output";
/// The only endpoint batches are served for.
pub const EMBEDDINGS_ENDPOINT: &str = "/v1/embeddings";
/// The only completion window OpenAI accepts.
pub const COMPLETION_WINDOW: &str = "24h";
/// [`COMPLETION_WINDOW`] in seconds.
pub const COMPLETION_WINDOW_S: i64 = 24 * 3600;

/// A file (`object: "file"`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
}

/// The answer to deleting a file.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDeleted {
    pub id: String,
    pub object: String,
    pub deleted: bool,
}

/// Where a batch stands, as OpenAI names it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// The input file is being checked.
    Validating,
    /// The input file failed validation (see `errors`).
    Failed,
    InProgress,
    /// Every request is answered; the output and error files are written.
    Finalizing,
    Completed,
    /// The completion window passed first; what was done is in the files.
    Expired,
    /// A cancel was asked; in-flight requests are finishing.
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    /// No runner will touch a batch in this status again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `request_counts` of a batch.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// One validation error of a batch's input file.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchErrorData {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<u64>,
}

/// `errors` of a batch: why it failed validation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchErrors {
    pub object: String,
    pub data: Vec<BatchErrorData>,
}

/// A batch (`object: "batch"`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<BTreeMap<String, String>>,
}

/// A page of a list (`object: "list"`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct List<T> {
    pub object: String,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// Now, in Unix seconds.
pub(crate) fn now_s() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
