//! Runs of many jobs under faults, shared by `faults.rs` and `chaos.rs`:
//! `jetinfer-worker` processes that can be SIGKILLed, a patient producer
//! client, submitting a run and counting what came back, and reading the
//! results stream back to count results stored per job id.

use std::collections::HashMap;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use jetinfer_nats::testing::NatsServer;
use jetinfer_nats::NatsConfig;
use jetinfer_producer::{Client, ClientConfig};
use jetinfer_schemas::{decode_result, Job};

use super::{model_dir, nats_config};

/// Upper bound for any one wait in these tests; generous, never a speed check.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// `$var` as a count, or `default`.
pub fn count_from_env(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A worker running as its own process, so it can be killed.
pub struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    pub fn start(server: &NatsServer, backend: &str, extra_env: &[(&str, &str)]) -> Self {
        Self::start_at(&[server.url()], backend, extra_env)
    }

    /// A worker connected to the servers at `urls` (a cluster's nodes).
    pub fn start_at(urls: &[String], backend: &str, extra_env: &[(&str, &str)]) -> Self {
        Self::start_logged(urls, backend, extra_env, None)
    }

    /// [`WorkerProcess::start_at`], appending the worker's log (standard
    /// error) to `log` if given.
    pub fn start_logged(
        urls: &[String],
        backend: &str,
        extra_env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Self {
        let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        // Only the worker package's tests have the binary (other crates'
        // tests share this module for its other helpers).
        let Some(binary) = option_env!("CARGO_BIN_EXE_jetinfer-worker") else {
            panic!("a worker process can be started from jetinfer-worker's tests only")
        };
        let mut command = Command::new(binary);
        command
            .env("JETINFER_NATS__URLS", format!("[{}]", urls.join(",")))
            .env("JETINFER_MODEL__BACKEND", backend)
            .env("JETINFER_MODEL__PATH", model_dir())
            // Several workers run at once: each takes its own metrics port.
            .env("JETINFER_HTTP__ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        if let Some(log) = log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("opening the worker log");
            command.stderr(file);
        }
        Self {
            child: command.spawn().expect("spawning jetinfer-worker"),
        }
    }

    /// The exit status, if the process has ended on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("sending SIGTERM");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "worker did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Counts results per job id as they cross the wire, duplicates included.
pub struct WireCounter {
    seen: Arc<Mutex<HashMap<String, usize>>>,
}

impl WireCounter {
    pub async fn start(server: &NatsServer) -> Self {
        let nats = async_nats::connect(server.url()).await.unwrap();
        let mut results = nats.subscribe("results.>").await.unwrap();
        nats.flush().await.unwrap();
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counts = Arc::clone(&seen);
        tokio::spawn(async move {
            let _keep = nats;
            while let Some(message) = results.next().await {
                if let Ok(result) = decode_result(&message.payload) {
                    *counts.lock().unwrap().entry(result.job_id).or_default() += 1;
                }
            }
        });
        Self { seen }
    }

    pub fn computed_twice(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .values()
            .filter(|&&n| n > 1)
            .count()
    }
}

/// The jobs stream, its consumer and the results stream, for a failure
/// message.
pub async fn queue_state(js: &jetstream::Context) -> String {
    let mut jobs = js.get_stream("JETINFER_JOBS").await.unwrap();
    let jobs_state = jobs
        .info()
        .await
        .map(|i| (i.state.clone(), i.cluster.clone()));
    let consumer = jobs.consumer_info("worker-minilm").await.map(|c| {
        format!(
            "pending {} ack-pending {} redelivered {} delivered to seq {} ack floor seq {} cluster {:?}",
            c.num_pending,
            c.num_ack_pending,
            c.num_redelivered,
            c.delivered.stream_sequence,
            c.ack_floor.stream_sequence,
            c.cluster
        )
    });
    let mut results = js.get_stream("JETINFER_RESULTS").await.unwrap();
    let results_state = results
        .info()
        .await
        .map(|i| (i.state.clone(), i.cluster.clone()));
    format!(
        "jobs stream: {jobs_state:?}\nconsumer: {consumer:?}\nresults stream: {results_state:?}"
    )
}

pub async fn patient_client(server: &NatsServer) -> Client {
    patient_client_at(nats_config(server)).await
}

/// A client that waits [`PATIENCE`] for each result.
pub async fn patient_client_at(nats: NatsConfig) -> Client {
    Client::connect(ClientConfig {
        nats,
        timeout: PATIENCE,
        ..ClientConfig::default()
    })
    .await
    .unwrap()
}

/// What the caller of a run got back.
pub struct Outcomes {
    pub ok: usize,
    pub failed: Vec<String>,
    /// Job ids `submit_many` handed back more than one outcome for.
    pub answered_twice: usize,
}

/// Submits `n` single-text jobs at once; counts finished jobs in `done` as
/// they come back.
pub async fn submit_all(
    client: &Client,
    n: usize,
    prefix: &str,
    done: Arc<AtomicUsize>,
) -> Outcomes {
    let jobs: Vec<Job> = (0..n)
        .map(|i| {
            Job::new(
                "minilm",
                vec![format!("{prefix} job number {i} of the fault run")],
            )
            .with_id(format!("{prefix}-{i}"))
        })
        .collect();
    let outcomes: Vec<_> = client
        .submit_many(jobs, n)
        .inspect(|_| {
            done.fetch_add(1, Ordering::Relaxed);
        })
        .collect()
        .await;
    let mut ok = 0;
    let mut failed = Vec::new();
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for (id, outcome) in outcomes {
        *per_job.entry(id.to_string()).or_default() += 1;
        match outcome.map(|r| r.into_result()) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(err)) => failed.push(format!("{id}: {err}")),
            Err(err) => failed.push(format!("{id}: {err}")),
        }
    }
    Outcomes {
        ok,
        failed,
        answered_twice: per_job.values().filter(|&&n| n > 1).count(),
    }
}

/// Results stored on `inbox` in the results stream, per job id (a few
/// bounded tries: right after a server loss JetStream may not answer yet).
pub async fn stored_per_job(js: &jetstream::Context, inbox: &str) -> HashMap<String, usize> {
    results_replicas_current(js).await;
    let mut tries = 0;
    let stored = loop {
        match jetinfer_nats::results::since(js, inbox, time::OffsetDateTime::UNIX_EPOCH).await {
            Ok(stored) => break stored,
            Err(err) => {
                tries += 1;
                assert!(tries < 60, "reading the results stream: {err}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for payload in &stored {
        let result = decode_result(payload).expect("a stored result decodes");
        *per_job.entry(result.job_id).or_default() += 1;
    }
    per_job
}

/// Waits (bounded by [`PATIENCE`]) until every online replica of the results
/// stream is current. A consumer reads its own server's replica
/// (`results::since`), and a server restarted moments ago (after a leader
/// kill) may still be catching up: read before, it misses the newest results.
async fn results_replicas_current(js: &jetstream::Context) {
    let started = Instant::now();
    while started.elapsed() < PATIENCE {
        let cluster = match js.get_stream(jetinfer_nats::subjects::RESULTS_STREAM).await {
            Ok(mut stream) => stream.info().await.ok().map(|info| info.cluster.clone()),
            Err(_) => None,
        };
        match cluster {
            // A single server: nothing to catch up.
            Some(None) => return,
            Some(Some(cluster))
                if cluster.leader.is_some()
                    && cluster.replicas.iter().all(|r| r.offline || r.current) =>
            {
                return
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// `answered_twice_at_client=.. results_stored_twice=..` for a finished run
/// on `client`: the first from what the caller got (asserted 0), the second
/// from the results stream, read back on the client's inbox.
pub async fn duplicates(js: &jetstream::Context, client: &Client, run: &Outcomes) -> String {
    assert_eq!(
        run.answered_twice, 0,
        "the caller got two outcomes for one job"
    );
    let per_job = stored_per_job(js, client.inbox()).await;
    format!(
        "answered_twice_at_client={} results_stored_twice={}",
        run.answered_twice,
        per_job.values().filter(|&&n| n > 1).count()
    )
}

/// Waits for a run of `n` jobs, prints its figures after `label`, and asserts
/// that every job was answered.
pub async fn finish_run(
    run: tokio::task::JoinHandle<Outcomes>,
    n: usize,
    label: &str,
    js: &jetstream::Context,
    client: &Client,
) {
    let outcomes = tokio::time::timeout(PATIENCE * 2, run)
        .await
        .expect("run finished")
        .unwrap();
    let (ok, failed) = (outcomes.ok, &outcomes.failed);
    eprintln!(
        "{label} answered={ok} lost={} {}",
        n - ok - failed.len(),
        duplicates(js, client, &outcomes).await
    );
    assert!(
        failed.is_empty(),
        "failed jobs: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert_eq!(ok, n);
}

/// Waits until a worker serving `model` has provisioned the stream and
/// answers jobs.
pub async fn wait_for_model(client: &Client, model: &str) {
    let started = Instant::now();
    while client
        .submit(Job::new(model, vec!["warm-up".into()]))
        .await
        .is_err()
    {
        assert!(started.elapsed() < PATIENCE, "workers did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a `minilm` worker answers jobs.
pub async fn wait_for_workers(client: &Client) {
    wait_for_model(client, "minilm").await;
}

pub async fn wait_until(done: &AtomicUsize, at_least: usize) {
    let started = Instant::now();
    while done.load(Ordering::Relaxed) < at_least {
        assert!(started.elapsed() < PATIENCE, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
