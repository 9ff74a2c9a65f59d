//! Throughput on `../shared/data/bench_corpus.json`, in one run: the candle
//! backend called directly at a given batch size, and the whole worker end to
//! end through a real nats-server at saturation with the same batch size.
//!
//!     cargo bench -p jetinfer-worker --bench throughput
//!     BENCH_TEXTS=1024 BENCH_BATCHES=8,32 BENCH_FORWARDS=packed,candle \
//!         cargo bench -p jetinfer-worker --bench throughput
//!
//! `BENCH_FORWARDS` names the forward passes to compare (`model.forward`),
//! the packed one optionally with its products (`model.matmul`):
//! `packed` (auto), `packed:f32`, `packed:amx_bf16x3`, `packed:amx_bf16`,
//! `packed:avx512_bf16`, `candle`;
//! `BENCH_MODEL`, a model directory (relative to the workspace root; default
//! `.cache/models/all-MiniLM-L6-v2`), is the model both sides run;
//! `BENCH_ST_TEXTS_PER_S`, when set (scripts/bench-throughput.sh sets it from
//! a sentence-transformers run on the same texts: its fastest backend that
//! keeps cosine >= 0.9999, named by `BENCH_ST_NAME`), adds the ratio to it.
//!
//! Not a test: it asserts nothing about speed and prints a table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jetinfer_bert::Matmul;
use jetinfer_nats::testing::{workspace_root, NatsServer};
use jetinfer_nats::NatsConfig;
use jetinfer_producer::{Client, ClientConfig};
use jetinfer_schemas::Job;
use jetinfer_worker::backend::Backend;
use jetinfer_worker::config::{BatchConfig, ForwardKind, ModelConfig, WorkerConfig};
use jetinfer_worker::{load_backend, Worker};

const DEFAULT_TEXTS: usize = 1024;
const DEFAULT_BATCHES: &str = "8,32";
const DEFAULT_FORWARDS: &str = "packed,packed:f32,candle";
/// Jobs in flight from the producer: enough to keep the worker saturated.
const IN_FLIGHT: usize = 512;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

/// The backend alone: texts sorted by token length and cut into batches of
/// `batch`, as the worker's batcher would form them under saturation.
fn direct(backend: &dyn Backend, texts: &[String], batch: usize) -> (f64, usize) {
    let mut tokens: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| backend.tokenize(t).unwrap().ids)
        .collect();
    tokens.sort_by_key(|t| t.len());
    let total_tokens = tokens.iter().map(Vec::len).sum();
    let started = Instant::now();
    for chunk in tokens.chunks(batch) {
        let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        backend.embed(&refs).unwrap();
    }
    (started.elapsed().as_secs_f64(), total_tokens)
}

async fn end_to_end(backend: Arc<dyn Backend>, texts: &[String], batch: usize) -> f64 {
    let server = NatsServer::start();
    let nats = NatsConfig {
        urls: vec![server.url()],
        ..NatsConfig::default()
    };
    let config = WorkerConfig {
        nats: nats.clone(),
        batch: BatchConfig {
            max_inputs: batch,
            max_tokens: batch * 256,
            ..BatchConfig::default()
        },
        ..WorkerConfig::default()
    };
    let worker = Worker::start(config, backend).await.unwrap();
    let client = Client::connect(ClientConfig {
        nats,
        timeout: Duration::from_secs(600),
        ..ClientConfig::default()
    })
    .await
    .unwrap();
    let jobs: Vec<Job> = texts
        .iter()
        .map(|t| Job::new("minilm", vec![t.clone()]))
        .collect();
    let started = Instant::now();
    let failures = client
        .submit_many(jobs, IN_FLIGHT)
        .filter(|(_, r)| {
            futures::future::ready(!matches!(r, Ok(r) if r.clone().into_result().is_ok()))
        })
        .count()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(failures, 0, "every job must succeed");
    worker.shutdown().await;
    elapsed
}

fn main() {
    let n: usize = env_or("BENCH_TEXTS", DEFAULT_TEXTS);
    let batches: Vec<usize> = std::env::var("BENCH_BATCHES")
        .unwrap_or_else(|_| DEFAULT_BATCHES.into())
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    let corpus = workspace_root().join("../shared/data/bench_corpus.json");
    let texts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(&corpus).expect("bench corpus")).unwrap();
    let texts: Vec<String> = texts.into_iter().take(n).collect();

    let forwards: Vec<(ForwardKind, Matmul)> = std::env::var("BENCH_FORWARDS")
        .unwrap_or_else(|_| DEFAULT_FORWARDS.into())
        .split(',')
        .map(|f| match f.trim().split_once(':') {
            None if f.trim() == "packed" => (ForwardKind::Packed, Matmul::Auto),
            None if f.trim() == "candle" => (ForwardKind::Candle, Matmul::Auto),
            Some(("packed", matmul)) => (
                ForwardKind::Packed,
                matmul
                    .parse()
                    .unwrap_or_else(|e| panic!("BENCH_FORWARDS: {e}")),
            ),
            _ => panic!("BENCH_FORWARDS: unknown forward `{f}` (packed, packed:<matmul>, candle)"),
        })
        .collect();
    let sentence_transformers: Option<f64> = std::env::var("BENCH_ST_TEXTS_PER_S")
        .ok()
        .and_then(|v| v.parse().ok());
    let model_dir = workspace_root().join(
        std::env::var_os("BENCH_MODEL").unwrap_or_else(|| ".cache/models/all-MiniLM-L6-v2".into()),
    );
    let model_name = model_dir.file_name().map_or_else(
        || model_dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    println!(
        "jetinfer throughput: {} texts of bench_corpus.json, {model_name} on CPU",
        texts.len()
    );
    println!("machine: {}", machine());
    if let Some(st) = sentence_transformers {
        let name = std::env::var("BENCH_ST_NAME").unwrap_or_else(|_| "best batch size".into());
        println!("fastest accurate sentence-transformers ({name}), same texts: {st:.1} texts/s");
    }
    println!();
    println!("| forward | batch | direct texts/s | direct tokens/s | end-to-end texts/s | e2e / direct | e2e / sentence-transformers |");
    println!("|---|---|---|---|---|---|---|");
    for (forward, matmul) in forwards {
        let model = ModelConfig {
            path: model_dir.clone(),
            forward,
            matmul,
            ..ModelConfig::default()
        };
        let backend = match load_backend(&model) {
            Ok(backend) => backend,
            // AMX products on a CPU without them: say so and go on.
            Err(e) if matmul != Matmul::Auto => {
                println!("| {forward:?} {matmul:?} | - | not run: {e} | | | | |");
                continue;
            }
            Err(e) => panic!("model loads (run scripts/setup.sh): {e}"),
        };
        // What the backend says it runs (`cpu packed f32`, ...): `auto`
        // resolves per model (MPNet and classifiers take f32), so only the
        // loaded backend knows.
        let label = match matmul {
            Matmul::Auto => format!("{} (auto)", backend.compute()),
            _ => backend.compute(),
        };
        // Warm-up: first forward passes pay for page faults and allocations.
        direct(backend.as_ref(), &texts[..texts.len().min(64)], 8);
        for &batch in &batches {
            let (secs, tokens) = direct(backend.as_ref(), &texts, batch);
            let direct_rate = texts.len() as f64 / secs;
            let e2e_secs = runtime.block_on(end_to_end(Arc::clone(&backend), &texts, batch));
            let e2e_rate = texts.len() as f64 / e2e_secs;
            let versus_st = sentence_transformers
                .map(|st| format!("{:.2}", e2e_rate / st))
                .unwrap_or_else(|| "n/a".into());
            println!(
                "| {label} | {batch} | {direct_rate:.1} | {:.0} | {e2e_rate:.1} | {:.2} | {versus_st} |",
                tokens as f64 / secs,
                e2e_rate / direct_rate
            );
        }
    }
}
