//! How long one small forward takes back to back and after the process sat
//! idle: the light-load latency question of docs/benchmarks.md (c).
//!
//!     cargo run --profile dev -p jetinfer-bert --example idle -- [PAUSE_MS] [SPIN_MS]
//!
//! For each kind of product this CPU has, runs a batch of three inputs (30,
//! 20 and 25 tokens) three times back to back, then three times each after
//! PAUSE_MS (default 500) of sleep, optionally busy-spinning SPIN_MS (default
//! 0) between the sleep and the forward. A forward that is slow after a
//! sleep but fast after sleep plus spin is paying for the CPU waking up, not
//! for anything in the forward. Model: `.cache/models/all-MiniLM-L6-v2`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use jetinfer_bert::{Bert, Config, Matmul, Pooling};

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = root.join(".cache/models/all-MiniLM-L6-v2");
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u64>().expect("milliseconds"));
    let pause = Duration::from_millis(args.next().unwrap_or(500));
    let spin = Duration::from_millis(args.next().unwrap_or(0));
    let config: Config =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();

    let mut products = vec![Matmul::F32];
    if Matmul::amx_available() {
        products.push(Matmul::AmxBf16);
    }
    let ids: Vec<u32> = (0..30).map(|i| 1000 + i * 13).collect();
    let batch = [&ids[..], &ids[..20], &ids[..25]];
    for matmul in products {
        let bert = Bert::load(&model.join("model.safetensors"), config.clone(), matmul).unwrap();
        bert.embed(&batch, Pooling::Mean).unwrap();
        for idle in [false, false, false, true, true, true] {
            if idle {
                std::thread::sleep(pause);
                let started = Instant::now();
                while started.elapsed() < spin {
                    std::hint::spin_loop();
                }
            }
            let started = Instant::now();
            bert.embed(&batch, Pooling::Mean).unwrap();
            let label = if idle { "after idle" } else { "back to back" };
            println!(
                "{matmul:?} {label}: {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
        }
    }
}
