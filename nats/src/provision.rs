//! Idempotent provisioning of the jobs stream and each model's durable pull
//! consumer. Every worker runs it at start-up; running it twice, or from many
//! workers at once, converges on the same configuration.
//!
//! The jobs stream listens only on the subjects of models a worker serves
//! (`jobs.<model>.*`, one per model, added by that model's workers): a job
//! for any other model finds no stream, so its producer is told at once
//! (no responders) and nothing is stored. No tenant can fill the shared
//! queue through made-up model names, each with a quota of its own.

use async_nats::jetstream::{self, consumer, stream};

use crate::config::{ConsumerSettings, StreamSettings};
use crate::subjects::{self, SubjectError};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Subject(#[from] SubjectError),
    #[error("creating or updating stream {name}: {source}")]
    Stream {
        name: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("creating or updating consumer {name}: {source}")]
    Consumer {
        name: String,
        source: jetstream::stream::ConsumerError,
    },
}

/// Attempts at adding a model's subject to the jobs stream when workers of
/// other models update it at the same moment (each update replaces the list).
const SUBJECT_ATTEMPTS: usize = 8;

/// The jobs stream's configuration for the served models' `subjects`:
/// WorkQueue retention (a job is removed once acked), file storage, refusing
/// new jobs when full so producers see back-pressure instead of old jobs
/// being dropped. With a per-tenant quota, each subject
/// `jobs.<model>.<tenant>` holds at most that many jobs and a tenant past it
/// is refused on its own (discard new per subject).
pub fn stream_config(settings: &StreamSettings, subjects: Vec<String>) -> stream::Config {
    let quota = settings.max_jobs_per_tenant > 0;
    stream::Config {
        max_messages_per_subject: if quota {
            settings.max_jobs_per_tenant
        } else {
            -1
        },
        discard_new_per_subject: quota,
        name: settings.name.clone(),
        subjects,
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_bytes: settings.max_bytes,
        max_messages: settings.max_messages,
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// Creates the jobs stream for `model`, or updates it to `settings` and adds
/// `model`'s subject to the ones it has (a stream from before subjects were
/// kept per model, listening on `jobs.>`, is narrowed to the served models).
pub async fn provision_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    model: &str,
) -> Result<stream::Stream, ProvisionError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| ProvisionError::Stream {
        name: settings.name.clone(),
        source,
    };
    let ours = subjects::jobs_for_model(model)?;
    for _ in 0..SUBJECT_ATTEMPTS {
        let served = match js.get_stream(&settings.name).await {
            Ok(mut stream) => {
                let info = stream.info().await.map_err(|err| failed(err.into()))?;
                served_subjects(&info.config.subjects, &ours)
            }
            Err(err) if is_not_found(&err) => vec![ours.clone()],
            Err(err) => return Err(failed(err.into())),
        };
        js.create_or_update_stream(stream_config(settings, served))
            .await
            .map_err(|err| failed(err.into()))?;
        let mut stream = js
            .get_stream(&settings.name)
            .await
            .map_err(|err| failed(err.into()))?;
        // A worker of another model may have replaced the list between our
        // read and our update: read it back, and add ours again if it is gone.
        let now = stream.info().await.map_err(|err| failed(err.into()))?;
        if now.config.subjects.contains(&ours) {
            return Ok(stream);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Err(failed(
        format!(
            "{ours} kept disappearing from the stream's subjects while other workers updated it"
        )
        .into(),
    ))
}

/// Whether the jobs stream still listens on `model`'s subject (another
/// model's worker may have replaced the list concurrently at start-up).
pub async fn serves(stream: &mut stream::Stream, model: &str) -> Result<bool, ProvisionError> {
    let ours = subjects::jobs_for_model(model)?;
    let name = stream.cached_info().config.name.clone();
    let info = stream.info().await.map_err(|err| ProvisionError::Stream {
        name,
        source: err.into(),
    })?;
    Ok(info.config.subjects.contains(&ours))
}

/// Whether getting a stream failed because it does not exist.
pub fn is_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(ref e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// The served models' subjects: those the stream has, without the catch-all
/// `jobs.>` of older versions, plus `ours`.
fn served_subjects(existing: &[String], ours: &str) -> Vec<String> {
    let all = subjects::all_jobs();
    let mut served: Vec<String> = existing
        .iter()
        .filter(|s| **s != all && s.as_str() != ours)
        .cloned()
        .collect();
    served.push(ours.to_string());
    served.sort();
    served
}

/// JetStream's "no limit" for a consumer's `max_deliver`.
pub const UNLIMITED_DELIVERIES: i64 = -1;

/// The durable pull consumer shared by all workers of `model`.
pub fn consumer_config(
    model: &str,
    settings: &ConsumerSettings,
) -> Result<consumer::pull::Config, SubjectError> {
    let name = subjects::consumer_name(model)?;
    Ok(consumer::pull::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        description: Some(format!("jetinfer workers for model {model}")),
        filter_subject: subjects::jobs_for_model(model)?,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        // Unlimited: the worker counts deliveries against
        // `settings.max_deliver` and buries a job itself, so a job past them
        // stays deliverable until one does (no advisory to miss).
        max_deliver: UNLIMITED_DELIVERIES,
        max_ack_pending: settings.max_ack_pending,
        ..Default::default()
    })
}

/// Creates `model`'s consumer on `stream`, or updates it to `settings`.
pub async fn provision_consumer(
    stream: &stream::Stream,
    model: &str,
    settings: &ConsumerSettings,
) -> Result<consumer::PullConsumer, ProvisionError> {
    let config = consumer_config(model, settings)?;
    let name = config.durable_name.clone().unwrap_or_default();
    stream
        .create_consumer(config)
        .await
        .map_err(|source| ProvisionError::Consumer { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_subject_joins_the_served_ones_and_the_catch_all_goes() {
        assert_eq!(
            served_subjects(&["jobs.>".into()], "jobs.minilm.*"),
            vec!["jobs.minilm.*".to_string()]
        );
        assert_eq!(
            served_subjects(
                &["jobs.e5.*".into(), "jobs.minilm.*".into()],
                "jobs.minilm.*"
            ),
            vec!["jobs.e5.*".to_string(), "jobs.minilm.*".to_string()]
        );
    }
}
