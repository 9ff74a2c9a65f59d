//! Idempotent provisioning of the jobs stream and each model's durable pull
//! consumer. Every worker runs it at start-up; running it twice, or from many
//! workers at once, converges on the same configuration.

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

/// The jobs stream's configuration: WorkQueue retention (a job is removed once
/// acked), file storage, refusing new jobs when full so producers see
/// back-pressure instead of old jobs being dropped. With a per-tenant quota,
/// each subject `jobs.<model>.<tenant>` holds at most that many jobs and a
/// tenant past it is refused on its own (discard new per subject).
pub fn stream_config(settings: &StreamSettings) -> stream::Config {
    let quota = settings.max_jobs_per_tenant > 0;
    stream::Config {
        max_messages_per_subject: if quota {
            settings.max_jobs_per_tenant
        } else {
            -1
        },
        discard_new_per_subject: quota,
        name: settings.name.clone(),
        subjects: vec![subjects::all_jobs()],
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

/// Creates the jobs stream, or updates it to `settings` if it exists.
pub async fn provision_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Stream, ProvisionError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| ProvisionError::Stream {
        name: settings.name.clone(),
        source,
    };
    js.create_or_update_stream(stream_config(settings))
        .await
        .map_err(|err| failed(err.into()))?;
    js.get_stream(&settings.name)
        .await
        .map_err(|err| failed(err.into()))
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
