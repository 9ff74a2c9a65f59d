//! Rerank rate on `../shared/data/bench_corpus.json` (issue 18): a
//! cross-encoder's backend called directly, and the whole worker end to end
//! through a real nats-server at saturation, on the rerank jobs of a pairs
//! file, beside sentence-transformers' `CrossEncoder` on the same pairs when
//! its figures are given. Run by `scripts/bench-rerank.sh`, which writes
//! both files:
//!
//!     BENCH_RERANK_MODEL=.cache/models/minilm-cross-encoder \
//!     BENCH_RERANK_PAIRS=pairs.json [BENCH_RERANK_PEER=peer.json] \
//!         cargo bench -p jetinfer-worker --bench rerank
//!
//! `BENCH_BATCHES` (default 32,64): `batch.max_inputs` (pairs per forward
//! pass); `BENCH_FORWARDS` (default `packed`): the packed forward's products
//! as `packed` (auto) or `packed:<matmul>`. The peer file
//! (`scripts/bench_rerank.py peer`) holds its pairs/s and its logits; the
//! table then has the ratio and the largest difference between jetinfer's
//! logits (and sigmoid scores) and CrossEncoder's.
//!
//! Not a test: it asserts nothing about speed and prints a table.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jetinfer_bert::Matmul;
use jetinfer_nats::testing::{workspace_root, NatsServer};
use jetinfer_nats::NatsConfig;
use jetinfer_producer::{Client, ClientConfig};
use jetinfer_schemas::Job;
use jetinfer_worker::backend::{sigmoid, Backend, Tokens};
use jetinfer_worker::config::{BatchConfig, ForwardKind, ModelConfig, WorkerConfig};
use jetinfer_worker::{load_backend, Worker};
use serde::Deserialize;

const DEFAULT_BATCHES: &str = "32,64";
const DEFAULT_FORWARDS: &str = "packed";
/// Jobs in flight from the producer: every job of the file at once.
const IN_FLIGHT: usize = 1024;
/// The model name the benchmark's worker serves.
const MODEL: &str = "reranker";

#[derive(Deserialize)]
struct Pairs {
    jobs: Vec<RerankJob>,
}

#[derive(Deserialize)]
struct RerankJob {
    query: String,
    documents: Vec<String>,
}

/// `scripts/bench_rerank.py peer`'s output.
#[derive(Deserialize)]
struct Peer {
    peer: String,
    max_length: usize,
    tokens: usize,
    best: PeerRun,
    /// One logit per document, per job, in the pairs file's order.
    logits: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct PeerRun {
    batch: usize,
    pairs_per_s: f64,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).map(|p| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            workspace_root().join(p)
        }
    })
}

fn read<T: for<'de> Deserialize<'de>>(path: &PathBuf) -> T {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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

/// The backend alone: every pair tokenised, sorted by length and cut into
/// batches of `batch`, as the batcher forms them under saturation.
fn direct(backend: &dyn Backend, jobs: &[RerankJob], batch: usize) -> (f64, usize) {
    let mut pairs: Vec<Tokens> = jobs
        .iter()
        .flat_map(|j| backend.tokenize_pairs(&j.query, &j.documents).unwrap())
        .collect();
    pairs.sort_by_key(|t| t.ids.len());
    let started = Instant::now();
    for chunk in pairs.chunks(batch) {
        let refs: Vec<&Tokens> = chunk.iter().collect();
        backend.classify(&refs).unwrap();
    }
    (started.elapsed().as_secs_f64(), pairs.len())
}

/// Every job through a worker at once; each job's logits in document order,
/// and the tokens the worker counted.
async fn end_to_end(
    backend: Arc<dyn Backend>,
    jobs: &[RerankJob],
    batch: usize,
) -> (f64, Vec<Vec<f32>>, usize) {
    let server = NatsServer::start();
    let nats = NatsConfig {
        urls: vec![server.url()],
        ..NatsConfig::default()
    };
    let mut config = WorkerConfig {
        nats: nats.clone(),
        batch: BatchConfig {
            max_inputs: batch,
            max_tokens: batch * backend.max_seq_len(),
            ..BatchConfig::default()
        },
        ..WorkerConfig::default()
    };
    config.model.name = MODEL.into();
    let documents = jobs.iter().map(|j| j.documents.len()).max().unwrap_or(1);
    config.limits.max_documents_per_rerank = config.limits.max_documents_per_rerank.max(documents);
    let worker = Worker::start(config, backend).await.unwrap();
    let client = Client::connect(ClientConfig {
        nats,
        timeout: Duration::from_secs(1800),
        ..ClientConfig::default()
    })
    .await
    .unwrap();
    let submitted: Vec<Job> = jobs
        .iter()
        .map(|j| Job::rerank(MODEL, &j.query, j.documents.clone(), None))
        .collect();
    let index: HashMap<_, _> = submitted
        .iter()
        .enumerate()
        .map(|(i, job)| (job.id.clone(), i))
        .collect();
    let mut logits: Vec<Vec<f32>> = jobs
        .iter()
        .map(|j| vec![f32::NAN; j.documents.len()])
        .collect();
    let mut tokens = 0;
    let started = Instant::now();
    let mut results = client.submit_many(submitted, IN_FLIGHT);
    while let Some((id, result)) = results.next().await {
        let reranked = result
            .expect("submitted")
            .into_reranked()
            .unwrap_or_else(|e| panic!("job {id}: {e:?}"));
        let job = &mut logits[index[&id]];
        for score in reranked.results {
            job[score.index as usize] = score.logit;
        }
        tokens += reranked
            .token_counts
            .iter()
            .map(|&t| t as usize)
            .sum::<usize>();
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(results);
    worker.shutdown().await;
    (elapsed, logits, tokens)
}

/// The largest differences between jetinfer's logits and the peer's, and
/// between their sigmoid scores.
fn largest_differences(got: &[Vec<f32>], peer: &[Vec<f64>]) -> (f64, f64) {
    assert_eq!(got.len(), peer.len(), "the peer ran another pairs file");
    let mut logit: f64 = 0.0;
    let mut score: f64 = 0.0;
    for (g, p) in got.iter().zip(peer) {
        assert_eq!(g.len(), p.len(), "the peer ran another pairs file");
        for (&g, &p) in g.iter().zip(p) {
            logit = logit.max((f64::from(g) - p).abs());
            let peer_score = 1.0 / (1.0 + (-p).exp());
            score = score.max((f64::from(sigmoid(g)) - peer_score).abs());
        }
    }
    (logit, score)
}

fn main() {
    let model = env_path("BENCH_RERANK_MODEL")
        .unwrap_or_else(|| workspace_root().join(".cache/models/minilm-cross-encoder"));
    let pairs_file = env_path("BENCH_RERANK_PAIRS")
        .expect("BENCH_RERANK_PAIRS: the pairs file (scripts/bench-rerank.sh writes it)");
    let jobs = read::<Pairs>(&pairs_file).jobs;
    let peer: Option<Peer> = env_path("BENCH_RERANK_PEER").map(|p| read(&p));
    let batches: Vec<usize> = std::env::var("BENCH_BATCHES")
        .unwrap_or_else(|_| DEFAULT_BATCHES.into())
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    let forwards: Vec<Matmul> = std::env::var("BENCH_FORWARDS")
        .unwrap_or_else(|_| DEFAULT_FORWARDS.into())
        .split(',')
        .map(|f| match f.trim().split_once(':') {
            None if f.trim() == "packed" => Matmul::Auto,
            Some(("packed", matmul)) => matmul
                .parse()
                .unwrap_or_else(|e| panic!("BENCH_FORWARDS: {e}")),
            _ => panic!("BENCH_FORWARDS: unknown forward `{f}` (packed, packed:<matmul>)"),
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let pairs: usize = jobs.iter().map(|j| j.documents.len()).sum();

    println!(
        "jetinfer rerank: {} jobs, {pairs} (query, document) pairs of bench_corpus.json, {}",
        jobs.len(),
        model.display()
    );
    println!("machine: {}", machine());
    if let Some(peer) = &peer {
        println!(
            "{}: best batch {}, {:.1} pairs/s, max_length {}, {} tokens",
            peer.peer, peer.best.batch, peer.best.pairs_per_s, peer.max_length, peer.tokens
        );
    }
    println!();
    println!("| products | batch | direct pairs/s | end-to-end pairs/s | e2e / CrossEncoder | largest logit difference | largest score difference |");
    println!("|---|---|---|---|---|---|---|");
    for matmul in forwards {
        let config = ModelConfig {
            path: model.clone(),
            forward: ForwardKind::Packed,
            matmul,
            ..ModelConfig::default()
        };
        let backend = match load_backend(&config) {
            Ok(backend) => backend,
            Err(e) if matmul != Matmul::Auto => {
                println!("| {matmul:?} | - | not run: {e} | | | | |");
                continue;
            }
            Err(e) => panic!("model loads (scripts/bench-rerank.sh makes it): {e}"),
        };
        let label = backend.compute();
        // Warm-up: first forward passes pay for page faults and allocations.
        direct(backend.as_ref(), &jobs[..jobs.len().min(4)], 16);
        for &batch in &batches {
            let (secs, _) = direct(backend.as_ref(), &jobs, batch);
            let direct_rate = pairs as f64 / secs;
            let (e2e_secs, logits, tokens) =
                runtime.block_on(end_to_end(Arc::clone(&backend), &jobs, batch));
            let e2e_rate = pairs as f64 / e2e_secs;
            let (ratio, logit, score) = match &peer {
                Some(peer) => {
                    if peer.tokens != tokens || peer.max_length != backend.max_seq_len() {
                        println!(
                            "note: tokens {tokens} (max {}) here, {} (max {}) in CrossEncoder",
                            backend.max_seq_len(),
                            peer.tokens,
                            peer.max_length
                        );
                    }
                    let (logit, score) = largest_differences(&logits, &peer.logits);
                    (
                        format!("{:.2}", e2e_rate / peer.best.pairs_per_s),
                        format!("{logit:.2e}"),
                        format!("{score:.2e}"),
                    )
                }
                None => ("n/a".into(), "n/a".into(), "n/a".into()),
            };
            println!(
                "| {label} | {batch} | {direct_rate:.1} | {e2e_rate:.1} | {ratio} | {logit} | {score} |"
            );
        }
    }
}
