//! The official OpenAI Python SDK's Batch API (pinned, in
//! `.cache/openai-venv`, made by `scripts/deps/openai-sdk.sh`), unchanged,
//! against the gateway under the shipped secure config. The checks are in
//! `tests/sdk/batch_check.py`:
//!
//! - with a MiniLM worker: files.create -> batches.create -> poll ->
//!   files.content, every custom_id once, embeddings matching the golden
//!   file (cosine >= 0.9999); cancel; list pagination; bad files in
//!   OpenAI's error shapes; tenant B's key gets 404 for tenant A's file and
//!   batch;
//! - with an echo worker slowed per token: the `jetinfer-gateway` binary
//!   SIGKILLed mid-batch and a new one started on the same config, after
//!   which the batch completes with every line exactly once;
//! - two `jetinfer-gateway` replicas on one nats-server: a batch is driven
//!   by one of them only (one lease owner seen for its whole run, nothing of
//!   it in the other's log) and completes with every line once; the owner
//!   of a second batch SIGKILLed mid-batch, the survivor takes it over once
//!   the lease expires and completes it with every line once.

use crate::harness;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::common::shared_data;
use harness::*;
use jetinfer_nats::testing::workspace_root;
use jetinfer_worker::config::{BackendKind, BatchConfig};
use jetinfer_worker::{load_backend, Worker};

fn python() -> std::path::PathBuf {
    let python = workspace_root().join(".cache/openai-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/deps/openai-sdk.sh",
        python.display()
    );
    python
}

/// Runs `batch_check.py` with `args` against the gateway at `url`.
async fn sdk(url: &str, args: &[&str]) -> String {
    let script = workspace_root().join("gateway/tests/sdk/batch_check.py");
    let out = tokio::process::Command::new(python())
        .arg(&script)
        .args(args)
        .env("JETINFER_GATEWAY_URL", url)
        .env("ACME_KEY", ACME_KEY)
        .env("ACME_READ_ONLY_KEY", ACME_READ_ONLY_KEY)
        .env("GLOBEX_KEY", GLOBEX_KEY)
        .env("JETINFER_GOLDEN", shared_data().join("minilm_golden.json"))
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "SDK checks {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_runs_the_batch_api_through_the_gateway() {
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().to_path_buf();
    let stack = Stack::start(BackendKind::Candle, |c| {
        c.batches.work_dir = work_dir;
        // Small, so the test can pass it: batch_check.py's 413s.
        c.batches.max_file_bytes = 1 << 20;
    })
    .await;
    stack.wait_for_model("minilm").await;
    let out = sdk(&stack.url(""), &["api"]).await;
    assert!(out.contains("all batch SDK checks passed"), "{out}");
    stack.stop().await;
}

/// A `jetinfer-gateway` process on `config_file`.
fn spawn_gateway(config_file: &Path, log: &Path) -> tokio::process::Child {
    let log = std::fs::File::create(log).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_jetinfer-gateway"))
        .arg("--config")
        .arg(config_file)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("the gateway binary starts")
}

/// Waits (bounded) until the gateway at `url` answers `/readyz` 200.
async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = tokio::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .arg(format!("{url}/readyz"))
            .output()
            .await
            .expect("curl runs");
        if out.stdout == b"200" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the gateway at {url} was not ready within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_completes_with_every_line_once_after_its_gateway_is_killed_mid_run() {
    const LINES: usize = 400;
    let secured = Secured::start();
    let mut config = secured.worker_config(
        BackendKind::Echo,
        BatchConfig {
            max_inputs: 16,
            max_tokens: 8192,
            max_wait: Duration::from_millis(5),
        },
    );
    // About 8 tokens a request: a few seconds for the whole batch.
    config.model.echo_delay_per_token_us = 2_000;
    let loaded = load_backend(&config.model).expect("echo loads");
    let worker = Worker::start(config, loaded).await.expect("worker starts");

    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(&keys_file, keys_file_text()).unwrap();
    let mut config = gateway_config(&secured, &keys_file);
    // A fixed port, so the second gateway is found where the first was.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    config.batches.work_dir = dir.path().join("work");
    // Short, so the new gateway takes the killed one's lease over soon.
    config.batches.lease_ttl = Duration::from_secs(3);
    let config_file = dir.path().join("gateway.toml");
    std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
    let url = format!("http://127.0.0.1:{port}");

    let mut first = spawn_gateway(&config_file, &dir.path().join("first.log"));
    wait_ready(&url).await;
    let out = sdk(&url, &["start", &LINES.to_string()]).await;
    let batch_id = out
        .lines()
        .find_map(|l| l.strip_prefix("batch="))
        .expect("the script names its batch")
        .to_string();

    // Mid-batch: some lines answered and recorded, not all.
    let deadline = Instant::now() + Duration::from_secs(60);
    let completed_at_kill = loop {
        assert!(Instant::now() < deadline, "the batch never made progress");
        let reply = curl(&[
            "-H",
            &format!("Authorization: Bearer {ACME_KEY}"),
            &format!("{url}/v1/batches/{batch_id}"),
        ])
        .await;
        let batch = reply.json();
        let completed = batch["request_counts"]["completed"].as_u64().unwrap_or(0);
        if completed > 0 {
            assert_eq!(batch["status"], "in_progress", "{batch}");
            break completed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    first.start_kill().expect("SIGKILL the gateway");
    let status = first.wait().await.unwrap();
    assert!(!status.success(), "the first gateway was killed: {status}");
    assert!(
        completed_at_kill < LINES as u64,
        "killed mid-batch: {completed_at_kill} of {LINES} recorded"
    );

    let mut second = spawn_gateway(&config_file, &dir.path().join("second.log"));
    wait_ready(&url).await;
    let out = sdk(&url, &["finish", &batch_id, &LINES.to_string()]).await;
    assert!(out.contains("all restart SDK checks passed"), "{out}");
    second.start_kill().unwrap();
    let _ = second.wait().await;
    worker.shutdown().await;
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The lease owner written in batch `id`'s record in tenant acme's
/// `JETINFER_BATCHES` bucket (read as acme, as the gateway writes it).
async fn lease_owner(records: &async_nats::jetstream::kv::Store, id: &str) -> Option<String> {
    let value = records
        .get(format!("acme.{id}"))
        .await
        .expect("the record reads")?;
    let record: serde_json::Value = serde_json::from_slice(&value).expect("a JSON record");
    record["lease"]["owner"].as_str().map(str::to_string)
}

/// The replica whose process id begins `owner` (`<pid>-<ulid>`).
fn replica_of(owner: &str, pids: &[u32; 2]) -> usize {
    let pid: u32 = owner
        .split_once('-')
        .and_then(|(pid, _)| pid.parse().ok())
        .unwrap_or_else(|| panic!("a lease owner names its process: {owner}"));
    pids.iter()
        .position(|&p| p == pid)
        .unwrap_or_else(|| panic!("owner {owner} is neither replica ({pids:?})"))
}

async fn batch_json(url: &str, id: &str) -> serde_json::Value {
    curl(&[
        "-H",
        &format!("Authorization: Bearer {ACME_KEY}"),
        &format!("{url}/v1/batches/{id}"),
    ])
    .await
    .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_replicas_run_each_batch_once_and_a_survivor_finishes_a_killed_owners_batch() {
    const LINES: usize = 300;
    let secured = Secured::start();
    let mut config = secured.worker_config(
        BackendKind::Echo,
        BatchConfig {
            max_inputs: 16,
            max_tokens: 8192,
            max_wait: Duration::from_millis(5),
        },
    );
    config.model.echo_delay_per_token_us = 2_000;
    let loaded = load_backend(&config.model).expect("echo loads");
    let worker = Worker::start(config, loaded).await.expect("worker starts");

    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(&keys_file, keys_file_text()).unwrap();
    let mut urls = Vec::new();
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let mut config = gateway_config(&secured, &keys_file);
        let port = free_port();
        config.listen = format!("127.0.0.1:{port}").parse().unwrap();
        config.batches.work_dir = dir.path().join(format!("work-{name}"));
        config.batches.lease_ttl = Duration::from_secs(3);
        let config_file = dir.path().join(format!("gateway-{name}.toml"));
        std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
        replicas.push(spawn_gateway(
            &config_file,
            &dir.path().join(format!("{name}.log")),
        ));
        urls.push(format!("http://127.0.0.1:{port}"));
    }
    for url in &urls {
        wait_ready(url).await;
    }
    let pids = [replicas[0].id().unwrap(), replicas[1].id().unwrap()];
    let log = |i: usize| {
        std::fs::read_to_string(dir.path().join(if i == 0 { "a.log" } else { "b.log" })).unwrap()
    };
    let acme = jetinfer_nats::connect(&secured.nats("acme"))
        .await
        .expect("acme connects");
    let records = async_nats::jetstream::new(acme)
        .get_key_value("JETINFER_BATCHES")
        .await
        .expect("the gateways made acme's batch records bucket");

    // Both alive: one owner for the whole run, and it completes once.
    let out = sdk(&urls[0], &["start", &LINES.to_string()]).await;
    let first = out
        .lines()
        .find_map(|l| l.strip_prefix("batch="))
        .expect("the script names its batch")
        .to_string();
    let mut owners = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the first batch never completed");
        if let Some(owner) = lease_owner(&records, &first).await {
            owners.insert(owner);
        }
        if batch_json(&urls[1], &first).await["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(owners.len(), 1, "one runner drove the batch: {owners:?}");
    let owner = replica_of(owners.first().unwrap(), &pids);
    let other = 1 - owner;
    assert!(
        !log(other).contains(&first),
        "the replica that did not own the batch never touched it:\n{}",
        log(other)
    );
    let out = sdk(&urls[other], &["finish", &first, &LINES.to_string()]).await;
    assert!(out.contains("all restart SDK checks passed"), "{out}");

    // The owner of a second batch SIGKILLed mid-batch: the survivor takes
    // the batch over after its lease expires and completes it.
    let out = sdk(&urls[1], &["start", &LINES.to_string()]).await;
    let second = out
        .lines()
        .find_map(|l| l.strip_prefix("batch="))
        .expect("the script names its batch")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (victim, completed_at_kill) = loop {
        assert!(
            Instant::now() < deadline,
            "the second batch never made progress"
        );
        let batch = batch_json(&urls[0], &second).await;
        let completed = batch["request_counts"]["completed"].as_u64().unwrap_or(0);
        if completed > 0 {
            assert_eq!(batch["status"], "in_progress", "{batch}");
            let owner = lease_owner(&records, &second)
                .await
                .expect("a running batch has a lease");
            break (replica_of(&owner, &pids), completed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    replicas[victim].start_kill().expect("SIGKILL the owner");
    let status = replicas[victim].wait().await.unwrap();
    assert!(!status.success(), "the owner was killed: {status}");
    assert!(
        completed_at_kill < LINES as u64,
        "killed mid-batch: {completed_at_kill} of {LINES} recorded"
    );
    let survivor = 1 - victim;
    let out = sdk(&urls[survivor], &["finish", &second, &LINES.to_string()]).await;
    assert!(out.contains("all restart SDK checks passed"), "{out}");
    let owner = lease_owner(&records, &second)
        .await
        .expect("the finished batch names its last owner");
    assert_eq!(
        replica_of(&owner, &pids),
        survivor,
        "the survivor finished the batch"
    );
    assert!(
        log(survivor).contains("taking over a batch whose runner's lease expired"),
        "{}",
        log(survivor)
    );
    replicas[survivor].start_kill().unwrap();
    let _ = replicas[survivor].wait().await;
    worker.shutdown().await;
}
