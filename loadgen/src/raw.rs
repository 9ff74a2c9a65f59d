//! The queue's ceiling: a raw async-nats JetStream consume-reply-ack loop that
//! stands in for a worker. It pulls jobs from the same stream and consumer a
//! worker would, decodes each (it must know the job id to answer), replies at
//! once with a result carrying one empty vector per input, and acks; no
//! batching, no tokeniser, no model. Driving it with the same loadgen scenario
//! as a worker with the echo backend shows what jetinfer's pipeline costs on
//! top of JetStream itself (docs/benchmarks.md, yardstick b).

use async_nats::jetstream;
use futures::StreamExt;
use jetinfer_nats::{ConsumerSettings, NatsConfig, StreamSettings};
use jetinfer_schemas::{
    decode_job, encode_result, headers, Embeddings, JobResult, Limits, ModelInfo, Timings,
};
use tokio::task::JoinHandle;

/// Messages requested per pull, as many as the worker's default.
const PULL_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error(transparent)]
    Connect(#[from] jetinfer_nats::ConnectError),
    #[error(transparent)]
    Provision(#[from] jetinfer_nats::ProvisionError),
}

/// A running raw responder; stops when dropped.
pub struct RawResponder {
    task: JoinHandle<()>,
}

impl Drop for RawResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawResponder {
    /// Provisions the jobs stream and `model`'s consumer, then answers jobs.
    pub async fn start(nats: &NatsConfig, model: &str) -> Result<Self, RawError> {
        let client = jetinfer_nats::connect(nats).await?;
        let js = jetstream::new(client.clone());
        let stream =
            jetinfer_nats::provision_stream(&js, &StreamSettings::default(), model).await?;
        let consumer =
            jetinfer_nats::provision_consumer(&stream, model, &ConsumerSettings::default()).await?;
        let info = ModelInfo {
            id: "raw-responder".into(),
            revision: "0".into(),
            dimension: 0,
        };
        let task = tokio::spawn(async move {
            let limits = Limits::default();
            let Ok(mut messages) = consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .messages()
                .await
            else {
                tracing::error!("raw responder could not start consuming");
                return;
            };
            while let Some(Ok(message)) = messages.next().await {
                let reply_to = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(headers::REPLY_TO))
                    .map(|v| v.to_string());
                if let (Some(reply_to), Ok(job)) = (reply_to, decode_job(&message.payload, &limits))
                {
                    let n = job.inputs.len();
                    let result = JobResult::ok(
                        job.id,
                        Embeddings {
                            model: info.clone(),
                            embeddings: vec![Vec::new(); n],
                            token_counts: vec![0; n],
                            truncated: vec![false; n],
                            timings: Timings::default(),
                        },
                    );
                    let _ = client
                        .publish(reply_to, encode_result(&result).into())
                        .await;
                }
                let _ = message.ack().await;
            }
        });
        Ok(Self { task })
    }
}
