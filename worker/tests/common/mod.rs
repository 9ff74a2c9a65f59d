//! Shared set-up for the worker's end-to-end tests: a real nats-server, a
//! worker in this process, and a producer client.

#![allow(dead_code)]

pub mod fixtures;
pub mod gateway;
pub mod golden;
pub mod observe;
pub mod observe_setup;
pub mod runs;
pub mod secured;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jetinfer_nats::testing::{workspace_root, NatsServer};
use jetinfer_nats::NatsConfig;
use jetinfer_producer::{Client, ClientConfig};
use jetinfer_worker::backend::Backend;
use jetinfer_worker::config::{BackendKind, BatchConfig, WorkerConfig};
use jetinfer_worker::Worker;

pub fn model_dir() -> PathBuf {
    std::env::var_os("JETINFER_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cache/models/all-MiniLM-L6-v2"))
}

/// `../shared/data` beside the checkout, or `$JETINFER_SHARED_DATA`.
pub fn shared_data() -> PathBuf {
    std::env::var_os("JETINFER_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data"))
}

pub fn worker_config(
    server: &NatsServer,
    backend: BackendKind,
    batch: BatchConfig,
) -> WorkerConfig {
    let mut config = WorkerConfig {
        nats: nats_config(server),
        batch,
        ..WorkerConfig::default()
    };
    config.model.backend = backend;
    config.model.path = model_dir();
    config
}

pub fn nats_config(server: &NatsServer) -> NatsConfig {
    NatsConfig {
        urls: vec![server.url()],
        startup_retry_for: Duration::from_secs(5),
        ..NatsConfig::default()
    }
}

pub async fn client(server: &NatsServer) -> Client {
    Client::connect(ClientConfig {
        nats: nats_config(server),
        timeout: Duration::from_secs(120),
        ..ClientConfig::default()
    })
    .await
    .expect("client connects")
}

pub async fn start_worker(config: WorkerConfig, backend: Arc<dyn Backend>) -> Worker {
    Worker::start(config, backend).await.expect("worker starts")
}

pub use fixtures::cosine;

/// Publishes raw bytes on a job subject, as a misbehaving producer would,
/// with `reply_to` (if any) as the reply-subject header.
pub async fn publish_raw(
    js: &async_nats::jetstream::Context,
    subject: &str,
    reply_to: Option<&str>,
    id: &str,
    payload: Vec<u8>,
) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(jetinfer_schemas::headers::MSG_ID, id);
    if let Some(reply_to) = reply_to {
        h.insert(jetinfer_schemas::headers::REPLY_TO, reply_to);
    }
    js.publish_with_headers(subject.to_string(), h, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// `(pending, ack-pending)` of `consumer` on `stream` once both are 0, or
/// as they are after 10 s. A job's error reply goes out before its dead
/// letter is stored and the job terminated, so a test that has seen every
/// reply may still be a moment ahead of the last settlement.
pub async fn settled_state(
    stream: &mut async_nats::jetstream::stream::Stream,
    consumer: &str,
) -> (u64, usize) {
    let waiting = std::time::Instant::now();
    loop {
        let info = stream.consumer_info(consumer).await.unwrap();
        let state = (info.num_pending, info.num_ack_pending);
        if state == (0, 0) || waiting.elapsed() > Duration::from_secs(10) {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
