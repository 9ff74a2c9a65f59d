//! Side by side in one run, for docs/benchmarks.md:
//!
//! (b) the queue's ceiling: the same bulk load (single-text jobs, 256 in
//!     flight) through a jetinfer worker with the echo backend, and through a
//!     raw async-nats JetStream consume-reply-ack loop (`raw::RawResponder`),
//!     each on its own fresh nats-server;
//! (c) latency at light load (10 users, think 5 s, single-text jobs) through a
//!     worker with the candle backend, against the candle backend's own time
//!     for one text (tokenise + forward pass, called directly).
//!
//!     cargo bench -p jetinfer-loadgen --bench ceiling
//!     CEILING_JOBS=3000 LIGHT_SECONDS=20 cargo bench -p jetinfer-loadgen --bench ceiling
//!
//! Not a test: it asserts nothing about speed and prints a table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jetinfer_loadgen::corpus::{self, JobSource};
use jetinfer_loadgen::raw::RawResponder;
use jetinfer_loadgen::scenario::{preset, JobKind, Scenario};
use jetinfer_loadgen::stats::Summary;
use jetinfer_loadgen::{run, Target, Via};
use jetinfer_nats::testing::{workspace_root, NatsServer};
use jetinfer_nats::NatsConfig;
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::backend::Backend;
use jetinfer_worker::config::{ModelConfig, WorkerConfig};
use jetinfer_worker::{load_backend, Worker};

const DEFAULT_JOBS: u64 = 3000;
const DEFAULT_LIGHT_SECONDS: u64 = 20;
/// Single texts timed directly, one at a time.
const DIRECT_SAMPLES: usize = 100;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn singles() -> Vec<JobKind> {
    vec![JobKind {
        name: "single".into(),
        weight: 1,
        min_inputs: 1,
        max_inputs: 1,
    }]
}

fn nats_config(server: &NatsServer) -> NatsConfig {
    NatsConfig {
        urls: vec![server.url()],
        ..NatsConfig::default()
    }
}

fn target(server: &NatsServer) -> Target {
    Target {
        via: Via::Nats(nats_config(server)),
        model: "minilm".into(),
        tenant: "bench".into(),
    }
}

async fn drive(server: &NatsServer, scenario: &Scenario, texts: &[String]) -> Summary {
    let client = run::connect(&target(server), scenario.timeout)
        .await
        .unwrap();
    let jobs = JobSource::new(texts.to_vec(), &scenario.mix, "minilm", 1);
    run::run(client, scenario, jobs, Duration::from_secs(1), false).await
}

async fn worker(server: &NatsServer, backend: Arc<dyn Backend>) -> Worker {
    let config = WorkerConfig {
        nats: nats_config(server),
        ..WorkerConfig::default()
    };
    Worker::start(config, backend).await.unwrap()
}

fn line(what: &str, s: &Summary) {
    println!(
        "| {what} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
        s.jobs_ok,
        s.jobs_per_s,
        s.latency.p50_ms,
        s.latency.p99_ms,
        s.latency.max_ms,
        s.jobs_failed
    );
}

fn main() {
    let jobs: u64 = env_or("CEILING_JOBS", DEFAULT_JOBS);
    let light_secs: u64 = env_or("LIGHT_SECONDS", DEFAULT_LIGHT_SECONDS);
    let texts = corpus::load(&workspace_root().join("../shared/data/bench_corpus.json"))
        .expect("bench corpus");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut bulk = preset("bulk").unwrap();
    bulk.max_jobs = jobs;
    bulk.mix = singles();

    println!("(b) bulk, {jobs} single-text jobs, 256 in flight, fresh nats-server each");
    println!();
    println!("| responder | jobs ok | jobs/s | p50 ms | p99 ms | max ms | failed |");
    println!("|---|---|---|---|---|---|---|");
    runtime.block_on(async {
        let server = NatsServer::start();
        let w = worker(&server, Arc::new(EchoBackend::default())).await;
        line(
            "jetinfer worker, echo backend",
            &drive(&server, &bulk, &texts).await,
        );
        w.shutdown().await;

        let server = NatsServer::start();
        let _raw = RawResponder::start(&nats_config(&server), "minilm")
            .await
            .unwrap();
        line(
            "raw JetStream consume-reply-ack",
            &drive(&server, &bulk, &texts).await,
        );
    });

    let model = ModelConfig {
        path: workspace_root().join(".cache/models/all-MiniLM-L6-v2"),
        ..ModelConfig::default()
    };
    let backend = load_backend(&model).expect("model loads (run scripts/setup.sh)");
    // Warm-up, then one text at a time, as a light-load job runs.
    for t in texts.iter().take(8) {
        let ids = backend.tokenize(t).unwrap().ids;
        backend.embed(&[&ids]).unwrap();
    }
    let mut direct: Vec<f64> = texts
        .iter()
        .take(DIRECT_SAMPLES)
        .map(|t| {
            let started = Instant::now();
            let ids = backend.tokenize(t).unwrap().ids;
            backend.embed(&[&ids]).unwrap();
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    direct.sort_by(f64::total_cmp);
    let pct = |q: f64| direct[((direct.len() - 1) as f64 * q).round() as usize];

    let mut light = preset("light").unwrap();
    light.duration = Duration::from_secs(light_secs);
    light.mix = singles();
    println!();
    println!("(c) light load ({} users, think {:?}, {light_secs} s, single-text jobs) vs one text through the backend directly", light.users, light.think_time);
    println!();
    println!("| what | samples | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| candle backend directly, one text (tokenise + forward) | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
        direct.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    runtime.block_on(async {
        let server = NatsServer::start();
        let w = worker(&server, Arc::clone(&backend)).await;
        let s = drive(&server, &light, &texts).await;
        w.shutdown().await;
        println!(
            "| loadgen light through jetinfer (end to end) | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.latency.count, s.latency.p50_ms, s.latency.p90_ms, s.latency.p99_ms, s.latency.max_ms
        );
    });
}
