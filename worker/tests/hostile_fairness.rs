//! F7, "limits count jobs, not work", on a real nats-server with the shipped
//! secure configuration (`Secured`): tenants acme and globex, a worker with
//! the echo backend simulating 20 µs per token. acme floods with jobs of 256
//! inputs, within and beyond its limits (jobs, tokens, and jobs costing more
//! than its token burst); globex, a calm tenant with small jobs and a few
//! users, is timed before and during the flood. Rate limits by cost keep
//! acme's sustained work bounded; fair batching keeps globex's inputs from
//! queueing behind acme's backlog.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jetinfer_producer::{Client, SubmitError};
use jetinfer_schemas::{ErrorCode, Job};
use jetinfer_worker::config::{BackendKind, BatchConfig, TenantRate, WorkerConfig};
use jetinfer_worker::Worker;

use common::secured::Secured;

/// Longest a test waits for one job's answer.
const PATIENCE: Duration = Duration::from_secs(60);
/// The echo backend's simulated compute per (padded) token.
const ECHO_DELAY_PER_TOKEN_US: u64 = 20;
/// Inputs of one of acme's jobs: the most a job may carry.
const FLOOD_INPUTS: usize = 256;

fn worker_config(secured: &Secured) -> WorkerConfig {
    let mut config = secured.worker_config(BackendKind::Echo, BatchConfig::default());
    config.model.echo_delay_per_token_us = ECHO_DELAY_PER_TOKEN_US;
    config
}

async fn start_worker(config: WorkerConfig) -> Worker {
    let backend = jetinfer_worker::load_backend(&config.model).expect("echo backend loads");
    common::start_worker(config, backend).await
}

/// A job of `inputs` inputs of `words` words each: with the echo backend,
/// `inputs x (words + 2)` tokens.
fn costly_job(inputs: usize, words: usize, tag: &str) -> Job {
    let text: Vec<String> = (0..words).map(|w| format!("{tag}w{w}")).collect();
    Job::new("minilm", vec![text.join(" "); inputs])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `users` calm users, each sending `jobs_each` one-input jobs, one every
/// `every` (or at once if the last took longer), each awaited and timed.
/// Their latencies, sorted.
async fn calm_run(
    client: &Client,
    users: usize,
    jobs_each: usize,
    every: Duration,
) -> Vec<Duration> {
    let runs = (0..users).map(|u| {
        let client = client.clone();
        async move {
            let start = tokio::time::Instant::now();
            let mut took = Vec::with_capacity(jobs_each);
            for j in 0..jobs_each {
                tokio::time::sleep_until(start + every * j as u32).await;
                let job = Job::new("minilm", vec![format!("calm user {u} job {j} text")]);
                let started = Instant::now();
                let result = client.submit(job).await.expect("calm job answered");
                assert!(result.into_result().is_ok(), "calm job failed");
                took.push(started.elapsed());
            }
            took
        }
    });
    let mut all: Vec<Duration> = futures::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    all.sort();
    all
}

/// How a flood's job ended: `ok`, an error code, or a submit error; and the
/// error's message.
fn outcome(submitted: Result<jetinfer_schemas::JobResult, SubmitError>) -> (String, String) {
    match submitted {
        Ok(result) => match result.into_result() {
            Ok(_) => ("ok".to_string(), String::new()),
            Err(err) => {
                if err.code == ErrorCode::RateLimited {
                    assert!(
                        err.retry_after().is_some_and(|w| w > Duration::ZERO),
                        "rate_limited without retry_after: {err}"
                    );
                }
                if err.code == ErrorCode::TooCostly {
                    assert!(err.message.contains("tokens_burst"), "{err}");
                    assert_eq!(err.retry_after(), None, "{err}");
                }
                (err.code.to_string(), err.message)
            }
        },
        Err(other) => (format!("submit error: {other}"), String::new()),
    }
}

/// One tenant floods with 256-input jobs at twice its job rate and far past
/// its token rate (and sends jobs costing more than its token burst); the
/// other tenant's p95 stays within the stated bound of its own baseline,
/// measured in the same test, and every one of its jobs completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f7_a_tenant_flooding_with_costly_jobs_barely_moves_another_tenants_latency() {
    /// acme's limits: the 20 jobs/s (burst 10), and by cost 25,000
    /// tokens/s with a burst of 50,000: about half the echo worker's
    /// capacity sustained (50,000 tokens/s at 20 µs per token), and a
    /// second of all of it at once.
    const ACME_JOBS_PER_SECOND: f64 = 20.0;
    const ACME_BURST: u32 = 10;
    const ACME_TOKENS_PER_SECOND: f64 = 25_000.0;
    const ACME_TOKENS_BURST: u32 = 50_000;
    /// Words per input of a flood job: 10 tokens each, 2,560 per job.
    const FLOOD_WORDS: usize = 8;
    const FLOOD_TOKENS: usize = FLOOD_INPUTS * (FLOOD_WORDS + 2);
    /// Twice acme's job rate, for this long.
    const FLOOD_RATE: f64 = 2.0 * ACME_JOBS_PER_SECOND;
    const FLOOD_FOR: Duration = Duration::from_secs(3);
    /// Jobs of 256 x 202 = 51,712 tokens: more than the burst, never runnable.
    const OVERSIZED: usize = 2;
    const OVERSIZED_WORDS: usize = 200;
    /// The calm tenant: 4 users, a one-input job every 100 ms each, for
    /// as long as the flood lasts.
    const CALM_USERS: usize = 4;
    const CALM_EVERY: Duration = Duration::from_millis(100);
    const CALM_JOBS_EACH: usize = 30;
    /// Stated bound: flood p95 <= 3 x baseline p95 + 250 ms. Without fair
    /// batching the calm jobs would queue behind the second of acme's work
    /// its token burst lets in; without limits by cost, behind all of it
    /// (the issue saw 4,348 ms p50).
    const BOUND_FACTOR: u32 = 3;
    const BOUND_SLACK: Duration = Duration::from_millis(250);

    let secured = Secured::start();
    let mut config = worker_config(&secured);
    config.rate_limit.tenants.insert(
        "acme".into(),
        TenantRate {
            jobs_per_second: ACME_JOBS_PER_SECOND,
            burst: ACME_BURST,
            tokens_per_second: ACME_TOKENS_PER_SECOND,
            tokens_burst: ACME_TOKENS_BURST,
            ..TenantRate::default()
        },
    );
    let worker = start_worker(config).await;
    let calm = secured.client("globex", PATIENCE).await;
    let acme = secured.client("acme", PATIENCE).await;
    // Warm both clients and the worker.
    calm_run(&calm, CALM_USERS, 1, Duration::ZERO).await;
    let warm = acme.submit(costly_job(1, 1, "warm")).await.unwrap();
    assert!(warm.into_result().is_ok());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let baseline = calm_run(&calm, CALM_USERS, CALM_JOBS_EACH, CALM_EVERY).await;

    let flood_jobs = (FLOOD_RATE * FLOOD_FOR.as_secs_f64()) as usize;
    let gap = FLOOD_FOR / flood_jobs as u32;
    let flooder = {
        let acme = acme.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut pending = Vec::with_capacity(flood_jobs + OVERSIZED);
            for i in 0..OVERSIZED {
                let acme = acme.clone();
                let job = costly_job(FLOOD_INPUTS, OVERSIZED_WORDS, &format!("big{i}"));
                pending.push(tokio::spawn(async move { acme.submit(job).await }));
            }
            let mut ticker = tokio::time::interval(gap);
            for i in 0..flood_jobs {
                ticker.tick().await;
                let acme = acme.clone();
                let job = costly_job(FLOOD_INPUTS, FLOOD_WORDS, &format!("f{i}"));
                pending.push(tokio::spawn(async move { acme.submit(job).await }));
            }
            let sent_for = started.elapsed();
            let mut counts = BTreeMap::<String, usize>::new();
            for job in pending {
                *counts.entry(outcome(job.await.unwrap()).0).or_default() += 1;
            }
            (counts, sent_for)
        })
    };
    // Let the flood's burst reach the worker first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let flood_started = Instant::now();
    let flooded = calm_run(&calm, CALM_USERS, CALM_JOBS_EACH, CALM_EVERY).await;
    let calm_within_flood = flood_started.elapsed();
    let (counts, sent_for) = flooder.await.unwrap();

    let (base_p50, base_p95) = (percentile(&baseline, 0.5), percentile(&baseline, 0.95));
    let (flood_p50, flood_p95) = (percentile(&flooded, 0.5), percentile(&flooded, 0.95));
    let flood_max = *flooded.last().unwrap();
    let bound = base_p95 * BOUND_FACTOR + BOUND_SLACK;
    let ok = counts.get("ok").copied().unwrap_or(0);
    println!(
        "calm tenant globex, {} jobs, {CALM_USERS} users: baseline p50 {base_p50:?} p95 {base_p95:?}; \
         during the flood p50 {flood_p50:?} p95 {flood_p95:?} max {flood_max:?} (bound {bound:?}; \
         calm run took {calm_within_flood:?}); acme sent {flood_jobs} jobs of {FLOOD_INPUTS} inputs \
         ({FLOOD_TOKENS} tokens) in {sent_for:?} at {FLOOD_RATE}/s against {ACME_JOBS_PER_SECOND} \
         jobs/s and {ACME_TOKENS_PER_SECOND} tokens/s (burst {ACME_TOKENS_BURST}), plus {OVERSIZED} \
         of {} tokens: {counts:?}; {} tokens computed for acme",
        CALM_USERS * CALM_JOBS_EACH,
        FLOOD_INPUTS * (OVERSIZED_WORDS + 2),
        ok * FLOOD_TOKENS,
    );

    assert_eq!(baseline.len(), CALM_USERS * CALM_JOBS_EACH);
    assert_eq!(
        flooded.len(),
        CALM_USERS * CALM_JOBS_EACH,
        "every calm job completes"
    );
    assert!(
        flood_p95 <= bound,
        "calm p95 {flood_p95:?} over the bound {bound:?}"
    );
    // Every flood job is answered: run, told to wait, or told it never fits.
    let limited = counts.get("rate_limited").copied().unwrap_or(0);
    let too_costly = counts.get("too_costly").copied().unwrap_or(0);
    assert_eq!(too_costly, OVERSIZED, "{counts:?}");
    assert_eq!(
        ok + limited + too_costly,
        flood_jobs + OVERSIZED,
        "{counts:?}"
    );
    assert!(ok > 0 && limited > 0, "{counts:?}");
    // At most the token burst plus the token rate over the flood (with a
    // second's slack) was computed for acme.
    let allowed =
        ACME_TOKENS_BURST as f64 + ACME_TOKENS_PER_SECOND * (sent_for.as_secs_f64() + 1.0);
    assert!(
        (ok * FLOOD_TOKENS) as f64 <= allowed,
        "acme got {ok} jobs ({} tokens) through, more than {allowed}",
        ok * FLOOD_TOKENS
    );
    // Refused jobs were answered, so none is a dead letter.
    let ops = secured.connect("ops").await;
    let letters = jetinfer_nats::dead_letter::list(&ops.js, 100)
        .await
        .expect("ops reads dead letters");
    assert!(letters.is_empty(), "{} dead letters", letters.len());
    worker.shutdown().await;
}

/// A tenant whose jobs would take every delivery slot is capped per worker:
/// past `max_held_jobs` its jobs are answered `rate_limited`, and another
/// tenant's job is delivered and served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f7_a_tenant_at_its_held_jobs_cap_is_told_to_wait_while_another_tenant_is_served() {
    const HELD_CAP: usize = 4;
    const FLOOD: usize = 40;
    /// 256 inputs of 22 tokens: about 110 ms of echo compute per job, so
    /// intake meets most of the flood while the first jobs still run.
    const WORDS: usize = 20;

    let secured = Secured::start();
    let mut config = worker_config(&secured);
    config.rate_limit.tenants.insert(
        "acme".into(),
        TenantRate {
            max_held_jobs: HELD_CAP,
            ..TenantRate::default()
        },
    );
    let worker = start_worker(config).await;
    let acme = secured.client("acme", PATIENCE).await;
    let globex = secured.client("globex", PATIENCE).await;

    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            let acme = acme.clone();
            let job = costly_job(FLOOD_INPUTS, WORDS, &format!("h{i}"));
            tokio::spawn(async move { acme.submit(job).await })
        })
        .collect();
    let calm = globex
        .submit(Job::new("minilm", vec!["calm text".into()]))
        .await
        .expect("globex's job is answered");
    assert!(calm.into_result().is_ok(), "globex's job is served");

    let mut counts = BTreeMap::<String, usize>::new();
    let mut capped = 0;
    for job in flood {
        let (kind, message) = outcome(job.await.unwrap());
        capped += usize::from(message.contains("max_held_jobs"));
        *counts.entry(kind).or_default() += 1;
    }
    println!("acme, {FLOOD} jobs at once against max_held_jobs = {HELD_CAP}: {counts:?}");
    let ok = counts.get("ok").copied().unwrap_or(0);
    let limited = counts.get("rate_limited").copied().unwrap_or(0);
    assert_eq!(ok + limited, FLOOD, "every job is answered: {counts:?}");
    assert!(
        ok >= HELD_CAP,
        "the first {HELD_CAP} are admitted: {counts:?}"
    );
    assert!(
        capped > 0 && capped == limited,
        "refused at the cap: {counts:?}"
    );
    worker.shutdown().await;
}
