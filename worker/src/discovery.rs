//! Makes the worker discoverable with ordinary NATS tooling through the NATS
//! Services API: it answers `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` (also
//! `$SRV.<verb>.jetinfer-worker`) with its model, version and batching knobs,
//! e.g. `nats micro info jetinfer-worker`. A worker serving several models
//! registers one instance per model, each with that model's metadata, so
//! a reader of one instance's metadata sees the same keys either way.

use std::collections::HashMap;

use async_nats::service::{Service, ServiceExt};
use jetinfer_schemas::ModelInfo;

use crate::config::ServedModel;

/// The service name every jetinfer worker registers under.
pub const SERVICE_NAME: &str = "jetinfer-worker";

/// What a worker tells `$SRV.INFO`: model, revision and batching knobs.
pub fn metadata(served: &ServedModel, model: &ModelInfo) -> HashMap<String, String> {
    let batch = &served.batch;
    HashMap::from([
        ("model".to_string(), served.model.name.clone()),
        ("model_id".to_string(), model.id.clone()),
        ("model_revision".to_string(), model.revision.clone()),
        ("dimension".to_string(), model.dimension.to_string()),
        ("batch_max_inputs".to_string(), batch.max_inputs.to_string()),
        ("batch_max_tokens".to_string(), batch.max_tokens.to_string()),
        (
            "batch_max_wait_ms".to_string(),
            batch.max_wait.as_millis().to_string(),
        ),
    ])
}

/// Registers the worker's instance for `served` with the Services API; it
/// answers until stopped.
pub async fn announce(
    client: &async_nats::Client,
    served: &ServedModel,
    model: &ModelInfo,
) -> Result<Service, async_nats::Error> {
    client
        .service_builder()
        .description(format!(
            "jetinfer embedding worker for model {}",
            served.model.name
        ))
        .metadata(metadata(served, model))
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
}
