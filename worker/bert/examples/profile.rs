//! Where the forward's time goes, stage by stage, on `bench_corpus.json`.
//!
//!     cargo run --profile dev -p jetinfer-bert --example profile -- [TEXTS] [BATCH...]
//!
//! Tokenises the first TEXTS texts (default 1024) with the model's tokenizer
//! (its fixed padding removed, truncation at 256 as the worker does), sorts
//! them by length as the batcher's grouping would, and runs them in batches
//! of each size given (default 8 32 64), printing texts/s and the share of
//! each stage. Model: `.cache/models/all-MiniLM-L6-v2`.

use std::path::PathBuf;
use std::time::Instant;

use jetinfer_bert::{Bert, Config, Matmul, Pooling, StageTimes};

const MAX_SEQ_LEN: usize = 256;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = root.join(".cache/models/all-MiniLM-L6-v2");
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("numbers"));
    let n = args.next().unwrap_or(1024);
    let mut batches: Vec<usize> = args.collect();
    if batches.is_empty() {
        batches = vec![8, 32, 64];
    }

    let corpus: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(root.join("../shared/data/bench_corpus.json")).unwrap(),
    )
    .unwrap();
    let mut tokenizer = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: MAX_SEQ_LEN,
            ..Default::default()
        }))
        .unwrap();
    let mut tokens: Vec<Vec<u32>> = corpus
        .iter()
        .take(n)
        .map(|t| {
            tokenizer
                .encode(t.as_str(), true)
                .unwrap()
                .get_ids()
                .to_vec()
        })
        .collect();
    tokens.sort_by_key(Vec::len);
    let total: usize = tokens.iter().map(Vec::len).sum();

    let config: Config =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let matmul: Matmul = std::env::var("JETINFER_MATMUL")
        .map(|name| name.parse().unwrap())
        .unwrap_or_default();
    let bert = Bert::load(&model.join("model.safetensors"), config, matmul).unwrap();
    println!("products: {:?}", bert.matmul());
    println!(
        "{} texts, {total} tokens; {} rayon threads",
        tokens.len(),
        rayon::current_num_threads()
    );
    // Warm-up.
    let warm: Vec<&[u32]> = tokens.iter().take(64).map(Vec::as_slice).collect();
    bert.embed(&warm, Pooling::Mean).unwrap();

    for batch in batches {
        let mut times = StageTimes::default();
        let started = Instant::now();
        for chunk in tokens.chunks(batch) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            bert.embed_profiled(&refs, Pooling::Mean, &mut times)
                .unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "batch {batch}: {:.1} texts/s, {:.0} tokens/s",
            tokens.len() as f64 / secs,
            total as f64 / secs
        );
        for (stage, time) in times.stages() {
            println!("  {stage:<18} {:>5.1}%", 100.0 * time.as_secs_f64() / secs);
        }
    }
}
