//! Shared set-up for loadgen's tests: a real nats-server, an in-process
//! worker with the echo backend, the shared corpus, small bounded scenarios.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jetinfer_loadgen::scenario::{JobKind, Mode, Scenario};
use jetinfer_loadgen::{Target, Via};
use jetinfer_nats::testing::{workspace_root, NatsServer};
use jetinfer_nats::NatsConfig;
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::config::{BackendKind, WorkerConfig};
use jetinfer_worker::Worker;

/// `../shared/data/bench_corpus.json`, or `$JETINFER_SHARED_DATA/bench_corpus.json`.
pub fn corpus() -> PathBuf {
    std::env::var_os("JETINFER_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data"))
        .join("bench_corpus.json")
}

pub fn nats_config(server: &NatsServer) -> NatsConfig {
    NatsConfig {
        urls: vec![server.url()],
        startup_retry_for: Duration::from_secs(5),
        ..NatsConfig::default()
    }
}

pub fn target(server: &NatsServer) -> Target {
    Target {
        via: Via::Nats(nats_config(server)),
        model: "minilm".into(),
        tenant: "loadtest".into(),
    }
}

pub async fn echo_worker(server: &NatsServer) -> Worker {
    let mut config = WorkerConfig {
        nats: nats_config(server),
        ..WorkerConfig::default()
    };
    config.model.backend = BackendKind::Echo;
    Worker::start(config, Arc::new(EchoBackend::default()))
        .await
        .expect("worker starts")
}

/// Single-text jobs only.
pub fn singles() -> Vec<JobKind> {
    vec![JobKind {
        name: "single".into(),
        weight: 1,
        min_inputs: 1,
        max_inputs: 1,
    }]
}

/// A short closed-loop scenario: a few users, bounded by 2 s and 60 jobs.
pub fn short_closed() -> Scenario {
    Scenario {
        name: "test-closed".into(),
        mode: Mode::Closed,
        users: 4,
        think_time: Duration::from_millis(50),
        duration: Duration::from_secs(2),
        max_jobs: 60,
        timeout: Duration::from_secs(20),
        ..Scenario::default()
    }
}
