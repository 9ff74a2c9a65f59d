//! F5, "unbounded worker memory" (issue 15), on a real nats-server with the
//! shipped secure configuration (`Secured`): tenant acme, in its own
//! account, sends jobs that each name a bulk run never seen before, with
//! header blocks at the 4 KiB limit, jobs whose `Jetinfer-Bulk-Run` is 60 kB
//! (refused at screening), and cancel notices for runs never seen before.
//! The worker is the `jetinfer-worker` binary with the echo backend, run as
//! a child process, so the resident memory read from `/proc/<pid>/status` is
//! its own. Every per-run and per-tenant structure in it is bounded (cancel
//! flags and cancelled runs, rate-limit buckets, the ledger, the batcher's
//! lanes): its RSS after the load has settled stays within a bound of its
//! RSS after a warm-up. Loopback only, every wait bounded.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture};
use futures::StreamExt;
use jetinfer_nats::dead_letter::DEFAULT_MAX_LETTERS_PER_TENANT;
use jetinfer_nats::testing::free_port;
use jetinfer_schemas::{decode_result, encode_job, headers, Job};
use jetinfer_worker::config::{BackendKind, BatchConfig};

use common::observe::http_get;
use common::secured::{Observed, Secured};

/// Longest any one phase (start-up, warm-up, load) may take; generous, so
/// it fails with a message instead of hanging, never a speed check.
const PATIENCE: Duration = Duration::from_secs(180);
/// Jobs run before the first reading, so pools, buffers and the allocator's
/// arenas are in use before memory is measured.
const WARM_UP_JOBS: usize = 200;
/// Valid jobs, each of its own bulk run, header block at the limit.
const UNIQUE_RUN_JOBS: usize = 8_000;
/// Jobs whose `Jetinfer-Bulk-Run` holds [`BIG_RUN_BYTES`].
const BIG_HEADER_JOBS: usize = 2_000;
const BIG_RUN_BYTES: usize = 60_000;
/// Cancel notices, each for a run never seen before.
const CANCELS: usize = 1_000;
/// Most the worker's RSS may grow between the warm-up and the settled load.
/// Issue 15 saw 446 MiB of growth from 8,000 unique 60 kB run headers. What
/// the worker holds at once is bounded by the consumer's `max_ack_pending`
/// and the pull batch, and what it remembers by the caps of `cancel.rs`
/// and `rate_limit.rs` (run ids of at most 26 bytes), not by the jobs or
/// runs seen.
const RSS_GROWTH_BOUND_KIB: u64 = 64 * 1024;
/// Where acme's jobs ask to be answered.
const REPLIES: &str = "results.acme.f5";
/// PubAcks awaited together while publishing.
const PUBLISH_WINDOW: usize = 256;

/// The `jetinfer-worker` binary, started with a TOML config file; killed on
/// drop. Its log goes to a file shown when the test fails.
struct WorkerProcess {
    child: Child,
    http: String,
    log: std::path::PathBuf,
}

impl WorkerProcess {
    fn start(secured: &Secured, dir: &Path) -> Self {
        let mut config = secured.worker_config(BackendKind::Echo, BatchConfig::default());
        config.http.addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let file = dir.join("worker.toml");
        std::fs::write(&file, toml::to_string(&config).expect("config as TOML")).unwrap();
        let log = dir.join("worker.log");
        let child = Command::new(env!("CARGO_BIN_EXE_jetinfer-worker"))
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning jetinfer-worker");
        Self {
            child,
            http: config.http.addr.to_string(),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the worker's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Panics with the log if the process has exited.
    fn assert_running(&mut self, when: &str) {
        if let Ok(Some(exit)) = self.child.try_wait() {
            panic!(
                "the worker exited ({exit}) {when}; its log:\n{}",
                self.log_tail()
            );
        }
    }

    /// Waits (bounded) until `/readyz` answers 200.
    async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(&self.http, "/readyz").await {
                return;
            }
            self.assert_running("before it was ready");
            assert!(
                started.elapsed() < PATIENCE,
                "the worker was not ready within {PATIENCE:?}; its log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(VmRSS, VmHWM)` of process `pid`, in KiB: resident now, and the peak.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A 26-character run id, unique per `kind` and `i`.
fn run_id(kind: &str, i: usize) -> String {
    let id = format!("{kind}{i:0width$}", width = 26 - kind.len());
    assert_eq!(id.len(), jetinfer_nats::subjects::MAX_RUN_ID_LEN);
    id
}

/// Headers of a job of bulk run `run`, padded with `X-Padding` to exactly
/// [`headers::MAX_HEADER_BYTES`] on the wire (when `run` is short enough).
fn job_headers(id: &str, run: &str) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    map.insert(headers::MSG_ID, id);
    map.insert(headers::REPLY_TO, REPLIES);
    map.insert(headers::BULK_RUN, run);
    let used = headers::line_bytes(headers::MSG_ID, id)
        + headers::line_bytes(headers::REPLY_TO, REPLIES)
        + headers::line_bytes(headers::BULK_RUN, run)
        + headers::line_bytes("X-Padding", "");
    let room = headers::MAX_HEADER_BYTES.saturating_sub(headers::block_bytes(used));
    map.insert("X-Padding", "p".repeat(room.max(1)).as_str());
    map
}

/// Publishes as acme, keeping up to [`PUBLISH_WINDOW`] PubAcks in flight.
struct Publisher<'a> {
    js: &'a jetstream::Context,
    pending: Vec<PublishAckFuture>,
}

impl Publisher<'_> {
    async fn job(&mut self, id: &str, run: &str) {
        let payload = encode_job(&Job::new("minilm", vec![format!("text of {id}")]).with_id(id));
        let ack = self
            .js
            .publish_with_headers("jobs.minilm.acme", job_headers(id, run), payload.into())
            .await
            .expect("job published");
        self.push(ack).await;
    }

    async fn cancel(&mut self, run: &str) {
        let ack = self
            .js
            .publish("cancels.acme", run.to_string().into())
            .await
            .expect("cancel notice published");
        self.push(ack).await;
    }

    async fn push(&mut self, ack: PublishAckFuture) {
        self.pending.push(ack);
        if self.pending.len() >= PUBLISH_WINDOW {
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        let acks = self
            .pending
            .drain(..)
            .map(std::future::IntoFuture::into_future);
        for ack in futures::future::join_all(acks).await {
            ack.expect("stored");
        }
    }
}

/// Times the load is sent (`JETINFER_F5_ROUNDS`, default 1).
fn rounds() -> usize {
    std::env::var("JETINFER_F5_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// Counts acme's replies by outcome (`ok` or the error code).
fn count_replies(mut replies: async_nats::Subscriber) -> Arc<Mutex<BTreeMap<String, usize>>> {
    let counts = Arc::new(Mutex::new(BTreeMap::new()));
    let sink = Arc::clone(&counts);
    tokio::spawn(async move {
        while let Some(message) = replies.next().await {
            let outcome = match decode_result(&message.payload) {
                Ok(result) => match result.into_result() {
                    Ok(_) => "ok".to_string(),
                    Err(error) => format!("{:?}", error.code),
                },
                Err(_) => "undecodable".to_string(),
            };
            *sink.lock().unwrap().entry(outcome).or_insert(0) += 1;
        }
    });
    counts
}

/// Waits (bounded) until `total` replies have come and the model's consumer
/// has nothing pending or unacked (every job answered and settled, dead
/// letters stored), and every cancel notice has been read.
async fn settle(
    ops: &Observed,
    worker: &mut WorkerProcess,
    counts: &Mutex<BTreeMap<String, usize>>,
    total: usize,
    phase: &str,
) {
    let started = Instant::now();
    let jobs = ops.js.get_stream("JETINFER_JOBS").await.unwrap();
    let cancels = ops.js.get_stream("JETINFER_CANCELS").await.unwrap();
    loop {
        let replied: usize = counts.lock().unwrap().values().sum();
        let info = jobs.consumer_info("worker-minilm").await.unwrap();
        let state = (info.num_pending, info.num_ack_pending);
        // The worker's ordered consumer of the notices: there, and behind
        // by nothing.
        let (mut followers, mut unread_cancels) = (0, 0);
        let mut listed = cancels.consumers();
        while let Some(consumer) = listed.next().await {
            followers += 1;
            unread_cancels += consumer.unwrap().num_pending;
        }
        if replied >= total && state == (0, 0) && followers > 0 && unread_cancels == 0 {
            return;
        }
        worker.assert_running(phase);
        assert!(
            started.elapsed() < PATIENCE,
            "{phase} not settled within {PATIENCE:?}: {replied} of {total} replies \
             ({:?}), consumer (pending, ack-pending) {state:?}, {unread_cancels} cancel \
             notices unread by {followers} followers; the worker's log:\n{}",
            counts.lock().unwrap(),
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// F5: unique valid runs with headers at the limit, 60 kB run headers and
/// cancel notices for unique runs leave the worker's memory bounded: they
/// are answered (the 60 kB ones refused at screening with
/// `invalid_header`) and the worker's RSS grows by less than
/// [`RSS_GROWTH_BOUND_KIB`] over the warm-up's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f5_per_run_and_per_tenant_state_stays_bounded_under_unique_runs_and_big_headers() {
    let secured = Secured::start();
    secured.provision_tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let mut worker = WorkerProcess::start(&secured, dir.path());
    worker.wait_ready().await;

    let acme = secured.connect("acme").await;
    let ops = secured.connect("ops").await;
    let replies = acme.client.subscribe(REPLIES).await.unwrap();
    acme.client.flush().await.unwrap();
    let counts = count_replies(replies);
    let mut publish = Publisher {
        js: &acme.js,
        pending: Vec::new(),
    };

    for i in 0..WARM_UP_JOBS {
        publish
            .job(&format!("f5-warm-{i}"), &run_id("f5warm", i))
            .await;
    }
    publish.flush().await;
    settle(&ops, &mut worker, &counts, WARM_UP_JOBS, "the warm-up").await;
    let (before, _) = memory_kib(worker.pid());

    // The load, interleaved: every job of its own run, a 60 kB run header
    // every fourth job, a cancel notice every eighth. Repeated with new runs
    // `JETINFER_F5_ROUNDS` times (default 1): the bound stays the same, so
    // more rounds make it stricter against memory that grows with the load.
    let rounds = rounds();
    let load_started = Instant::now();
    let mut after_round = Vec::new();
    for round in 0..rounds {
        let (mut big, mut cancelled) = (0, 0);
        for i in 0..UNIQUE_RUN_JOBS {
            let n = round * UNIQUE_RUN_JOBS + i;
            publish.job(&format!("f5-{n}"), &run_id("f5run", n)).await;
            if i % (UNIQUE_RUN_JOBS / BIG_HEADER_JOBS) == 0 && big < BIG_HEADER_JOBS {
                let n = round * BIG_HEADER_JOBS + big;
                let run = format!("{n:08}{}", "r".repeat(BIG_RUN_BYTES - 8));
                publish.job(&format!("f5-big-{n}"), &run).await;
                big += 1;
            }
            if i % (UNIQUE_RUN_JOBS / CANCELS) == 0 && cancelled < CANCELS {
                let n = round * CANCELS + cancelled;
                publish.cancel(&run_id("f5cancel", n)).await;
                cancelled += 1;
            }
        }
        publish.flush().await;
        assert_eq!((big, cancelled), (BIG_HEADER_JOBS, CANCELS));
        let total = WARM_UP_JOBS + (round + 1) * (UNIQUE_RUN_JOBS + BIG_HEADER_JOBS);
        settle(&ops, &mut worker, &counts, total, "the load").await;
        after_round.push(memory_kib(worker.pid()).0);
    }
    let load_took = load_started.elapsed();
    let (after, peak) = memory_kib(worker.pid());

    let counts = counts.lock().unwrap().clone();
    let letters = ops
        .js
        .get_stream("JETINFER_DLQ")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    let growth = after.saturating_sub(before);
    println!(
        "F5 load: {WARM_UP_JOBS} warm-up jobs, then {rounds} x ({UNIQUE_RUN_JOBS} jobs of unique runs with \
         {}-byte header blocks, {BIG_HEADER_JOBS} jobs with a {BIG_RUN_BYTES}-byte \
         {}, {CANCELS} cancel notices for unique runs); settled in {:.1} s",
        headers::MAX_HEADER_BYTES,
        headers::BULK_RUN,
        load_took.as_secs_f64()
    );
    println!("replies by outcome: {counts:?}; dead letters: {letters}");
    let rounds_mib: Vec<String> = after_round
        .iter()
        .map(|kib| format!("{:.1}", mib(*kib)))
        .collect();
    println!(
        "worker VmRSS after each round, MiB: {}",
        rounds_mib.join(", ")
    );
    println!(
        "worker VmRSS after warm-up {:.1} MiB, after the load {:.1} MiB (growth {:.1} MiB, \
         bound {:.0} MiB); VmHWM (peak) {:.1} MiB",
        mib(before),
        mib(after),
        mib(growth),
        mib(RSS_GROWTH_BOUND_KIB),
        mib(peak)
    );

    worker.assert_running("after the load");
    assert!(
        growth < RSS_GROWTH_BOUND_KIB,
        "the worker's RSS grew by {:.1} MiB ({:.1} -> {:.1}), over the {:.0} MiB bound",
        mib(growth),
        mib(before),
        mib(after),
        mib(RSS_GROWTH_BOUND_KIB)
    );
    let expected = BTreeMap::from([
        ("ok".to_string(), WARM_UP_JOBS + rounds * UNIQUE_RUN_JOBS),
        ("InvalidHeader".to_string(), rounds * BIG_HEADER_JOBS),
    ]);
    assert_eq!(
        counts, expected,
        "every valid job answered, every 60 kB run header refused"
    );
    assert_eq!(
        letters,
        ((rounds * BIG_HEADER_JOBS) as u64).min(DEFAULT_MAX_LETTERS_PER_TENANT as u64),
        "each refused job dead-lettered (a tenant's oldest make way past its bound)"
    );
    assert_eq!(
        http_get(&worker.http, "/readyz").await.unwrap().0,
        200,
        "the worker is still ready"
    );
}
