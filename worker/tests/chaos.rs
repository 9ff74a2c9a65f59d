//! Chaos: one run of many jobs (`JETINFER_CHAOS_JOBS`, default small; 50,000
//! from `scripts/chaos.sh`) while every fault the worker claims to survive
//! happens in it, on real nats-server processes (loopback only, every loop
//! bounded), and the figures counted in code:
//!
//! - phase `single` (three fifths of the jobs): one nats-server; two
//!   `jetinfer-worker` processes (echo backend) SIGKILLed in turn and
//!   restarted; the server SIGKILLed and restarted on its store half-way.
//! - phase `cluster` (the rest): a 3-node cluster with every stream
//!   replicated 3 times; the same worker kills; the jobs stream's leader
//!   SIGKILLed and, a while later, started again.
//!
//! In both, one job in [`PANIC_MODEL_EVERY`] goes to a model served by a
//! worker in this process whose echo backend panics on [`PANIC_MARKER`] (the
//! worker binary cannot be told to), one in [`MARKER_EVERY`] of those holds
//! it; and one job in [`POISON_EVERY`] is poison published raw (undecodable,
//! no inputs, another model, no reply subject, a reply subject of another
//! tenant), each of which must end as a dead letter with its reason.
//!
//! Printed per phase and in total, measured: jobs submitted, answered,
//! error replies by code, dead letters by reason, lost (accepted, neither
//! answered nor dead-lettered), computed twice (job ids with more than one
//! result stored in the results stream: each stored result is one worker
//! run that finished it) and answered twice at the client (results that
//! reached the client's inbox for a job already answered, counted by the
//! client before its de-duplication: `Client::results_unawaited`).

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use jetinfer_nats::testing::{NatsCluster, NatsServer};
use jetinfer_nats::{dead_letter, NatsConfig};
use jetinfer_producer::{Client, ClientConfig, SubmitError};
use jetinfer_schemas::{encode_job, ErrorCode, Job};
use jetinfer_worker::backend::echo::{EchoBackend, EchoFault};
use jetinfer_worker::config::{BackendKind, WorkerConfig};
use jetinfer_worker::Worker;

use common::model_dir;
use common::runs::*;

/// The model the worker processes serve.
const MODEL: &str = "minilm";
/// The model the in-process worker serves, with a backend that panics.
const PANIC_MODEL: &str = "chaos-panics";
const PANIC_MARKER: &str = "kaboom";
/// One job in this many goes to [`PANIC_MODEL`].
const PANIC_MODEL_EVERY: usize = 20;
/// One [`PANIC_MODEL`] job in this many holds [`PANIC_MARKER`].
const MARKER_EVERY: usize = 10;
/// One poison job is published per this many jobs submitted.
const POISON_EVERY: usize = 100;
/// Jobs awaiting their results at once (below the consumer's
/// `max_ack_pending`).
const IN_FLIGHT: usize = 1000;
/// Worker processes per phase, killed in turn.
const WORKERS: usize = 2;
/// Worker SIGKILLs per phase.
const WORKER_KILLS: usize = 6;
/// Submissions of one job the producer is told were not taken before the
/// run gives up on it, and the pause between them.
const SUBMIT_ATTEMPTS: usize = 40;
const RESUBMIT_DELAY: Duration = Duration::from_millis(500);
/// Worker processes that may exit on their own in one phase (started again
/// each time) before the run counts as a crash loop.
const MAX_RESTARTS: usize = 50;
/// Where the poison jobs that may be answered are answered.
const POISON_INBOX: &str = "results.default.chaos-poison";
/// A reply subject of another tenant: forbidden to the `default` tenant.
const FOREIGN_INBOX: &str = "results.globex.chaos-stolen";
/// How long a phase's jobs may take, at most, per thousand jobs (on top of
/// [`PATIENCE`]): a bound against a hang, not a speed check.
const PER_THOUSAND_JOBS: Duration = Duration::from_secs(30);

enum Servers {
    One(NatsServer),
    Three(NatsCluster),
}

impl Servers {
    fn urls(&self) -> Vec<String> {
        match self {
            Servers::One(server) => vec![server.url()],
            Servers::Three(cluster) => cluster.urls(),
        }
    }

    fn replicas(&self) -> usize {
        match self {
            Servers::One(_) => 1,
            Servers::Three(_) => 3,
        }
    }
}

/// The worker processes of a phase, tended as an orchestrator would: one
/// that exits on its own (it could not provision while a leader was being
/// elected, or it gave up) is started again, and its exit status counted.
struct Fleet {
    urls: Vec<String>,
    env: Vec<(String, String)>,
    log: Option<std::path::PathBuf>,
    workers: Vec<WorkerProcess>,
    exits: BTreeMap<String, usize>,
}

impl Fleet {
    fn start(
        urls: Vec<String>,
        env: Vec<(String, String)>,
        log: Option<std::path::PathBuf>,
    ) -> Self {
        let mut fleet = Self {
            urls,
            env,
            log,
            workers: Vec::new(),
            exits: BTreeMap::new(),
        };
        fleet.workers = (0..WORKERS).map(|_| fleet.spawn()).collect();
        fleet
    }

    fn spawn(&self) -> WorkerProcess {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        WorkerProcess::start_logged(&self.urls, "echo", &env, self.log.as_deref())
    }

    /// Starts again every worker that exited.
    fn tend(&mut self) {
        for i in 0..self.workers.len() {
            if let Some(status) = self.workers[i].exited() {
                *self.exits.entry(status.to_string()).or_default() += 1;
                assert!(
                    self.exits.values().sum::<usize>() <= MAX_RESTARTS,
                    "workers keep exiting: {:?}",
                    self.exits
                );
                self.workers[i] = self.spawn();
            }
        }
    }

    /// SIGKILLs worker `i` and starts a new one in its place.
    fn kill(&mut self, i: usize) {
        self.workers[i].kill();
        self.workers[i] = self.spawn();
    }
}

/// What one phase (or the whole run) ended with.
#[derive(Default)]
struct Tally {
    submitted: usize,
    /// Of `submitted`, how many the producer was told JetStream did not
    /// take, after every resubmission.
    refused_at_submit: usize,
    /// Times a job was submitted again after being refused.
    refusals_resubmitted: usize,
    answered_ok: usize,
    error_replies: BTreeMap<String, usize>,
    poison: usize,
    panic_markers: usize,
    dead_letters: BTreeMap<String, usize>,
    /// Accepted, and neither answered nor dead-lettered.
    lost: usize,
    /// A result in the results stream that the client never handed its
    /// caller (a client that misses what is stored).
    stored_not_routed: usize,
    computed_twice: usize,
    answered_twice_at_client: u64,
    worker_kills: usize,
    /// Worker processes that exited on their own, by exit status.
    worker_exits: BTreeMap<String, usize>,
    server_kills: usize,
    leader_kills: usize,
    /// Everything that contradicts the guarantee, for the assertion.
    faults: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.submitted += other.submitted;
        self.refused_at_submit += other.refused_at_submit;
        self.refusals_resubmitted += other.refusals_resubmitted;
        self.answered_ok += other.answered_ok;
        for (code, n) in other.error_replies {
            *self.error_replies.entry(code).or_default() += n;
        }
        self.poison += other.poison;
        self.panic_markers += other.panic_markers;
        for (reason, n) in other.dead_letters {
            *self.dead_letters.entry(reason).or_default() += n;
        }
        self.lost += other.lost;
        self.stored_not_routed += other.stored_not_routed;
        self.computed_twice += other.computed_twice;
        self.answered_twice_at_client += other.answered_twice_at_client;
        self.worker_kills += other.worker_kills;
        for (status, n) in other.worker_exits {
            *self.worker_exits.entry(status).or_default() += n;
        }
        self.server_kills += other.server_kills;
        self.leader_kills += other.leader_kills;
        self.faults.extend(other.faults);
    }

    fn line(&self, label: &str) -> String {
        format!(
            "chaos {label}: submitted={} (of them poison={} panic_markers={}) refused_at_submit={} resubmitted_after_refusal={} \
             answered={} error_replies={:?} dead_letters={:?} lost={} stored_not_routed={} \
             computed_twice={} answered_twice_at_client={} worker_kills={} worker_exits={:?} \
             server_kills={} leader_kills={}",
            self.submitted,
            self.poison,
            self.panic_markers,
            self.refused_at_submit,
            self.refusals_resubmitted,
            self.answered_ok,
            self.error_replies,
            self.dead_letters,
            self.lost,
            self.stored_not_routed,
            self.computed_twice,
            self.answered_twice_at_client,
            self.worker_kills,
            self.worker_exits,
            self.server_kills,
            self.leader_kills,
        )
    }
}

/// The five kinds of poison, in turn: (reply subject, payload, the reason
/// its dead letter must give).
fn poison(k: usize, id: &str) -> (Option<&'static str>, Vec<u8>, &'static str) {
    match k % 5 {
        0 => (
            Some(POISON_INBOX),
            b"\xc1\xc1 not a job".to_vec(),
            "invalid_input",
        ),
        1 => (
            Some(POISON_INBOX),
            encode_job(&Job::new(MODEL, vec![]).with_id(id)),
            "invalid_input",
        ),
        2 => (
            Some(POISON_INBOX),
            encode_job(&Job::new("other", vec!["x".into()]).with_id(id)),
            "unknown_model",
        ),
        3 => (
            None,
            encode_job(&Job::new(MODEL, vec!["x".into()]).with_id(id)),
            "invalid_input",
        ),
        _ => (
            Some(FOREIGN_INBOX),
            encode_job(&Job::new(MODEL, vec!["x".into()]).with_id(id)),
            jetinfer_monitoring::REASON_FORBIDDEN_REPLY_SUBJECT,
        ),
    }
}

/// Publishes one raw job, retrying (same `Nats-Msg-Id`, so at most one is
/// stored) while the servers are restarting or electing.
async fn publish_poison(
    js: &jetstream::Context,
    id: &str,
    reply_to: Option<&str>,
    payload: Vec<u8>,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(jetinfer_schemas::headers::MSG_ID, id);
    if let Some(reply_to) = reply_to {
        headers.insert(jetinfer_schemas::headers::REPLY_TO, reply_to);
    }
    let started = Instant::now();
    loop {
        let subject = format!("jobs.{MODEL}.default");
        let sent = js
            .publish_with_headers(subject, headers.clone(), payload.clone().into())
            .await;
        let stored = match sent {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if stored {
            return;
        }
        assert!(started.elapsed() < PATIENCE, "poison job {id} never stored");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The in-process worker serving [`PANIC_MODEL`]; retried while a fresh
/// cluster elects its JetStream leader.
async fn panicking_worker(nats: &NatsConfig, replicas: usize) -> Worker {
    let mut config = WorkerConfig {
        nats: nats.clone(),
        ..WorkerConfig::default()
    };
    config.model.backend = BackendKind::Echo;
    config.model.name = PANIC_MODEL.to_string();
    config.model.path = model_dir();
    config.stream.replicas = replicas;
    config.consumer.ack_wait = Duration::from_secs(3);
    let started = Instant::now();
    loop {
        let backend = EchoBackend::new(256, Duration::from_micros(5))
            .with_fault(PANIC_MARKER, EchoFault::Panic);
        match Worker::start(config.clone(), Arc::new(backend)).await {
            Ok(worker) => return worker,
            Err(err) => {
                assert!(
                    started.elapsed() < PATIENCE,
                    "the servers never took the streams: {err}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The jobs stream's leader, as the cluster reports it.
async fn jobs_leader(js: &jetstream::Context) -> String {
    let started = Instant::now();
    loop {
        if let Ok(mut stream) = js.get_stream("JETINFER_JOBS").await {
            if let Ok(info) = stream.info().await {
                if let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                    return leader;
                }
            }
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the jobs stream has no leader"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Submits `job`, and again (same id) each time the producer is told it was
/// not taken, as a careful caller would, a bounded number of times: during
/// a stream leader election JetStream answers "no responders", which the
/// client reports as `UnknownModel`. Returns the outcome and the refusals.
async fn submit_again_if_refused(
    client: &Client,
    job: Job,
) -> (Result<jetinfer_schemas::JobResult, SubmitError>, usize) {
    let mut refusals = 0;
    loop {
        match client.submit(job.clone()).await {
            Err(SubmitError::Timeout { job_id, after }) => {
                return (Err(SubmitError::Timeout { job_id, after }), refusals)
            }
            Err(refused) if refusals < SUBMIT_ATTEMPTS => {
                if refusals == 0 {
                    eprintln!(
                        "chaos: refused at submit, submitting again: {}: {refused}",
                        job.id
                    );
                }
                refusals += 1;
                tokio::time::sleep(RESUBMIT_DELAY).await;
            }
            outcome => return (outcome, refusals),
        }
    }
}

/// Jobs done before the `k`th worker kill of a phase of `n` jobs (the
/// server fault comes with the middle one).
fn fault_at(n: usize, k: usize) -> usize {
    n * (k + 1) / (WORKER_KILLS + 2)
}

/// Waits, bounded by `patience`, until `done` reaches `at_least`.
async fn wait_for(done: &AtomicUsize, at_least: usize, patience: Duration) {
    let started = Instant::now();
    while done.load(Ordering::Relaxed) < at_least {
        assert!(
            started.elapsed() < patience,
            "no progress: {} of {at_least} done",
            done.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The job list of a phase: mostly [`MODEL`], one in [`PANIC_MODEL_EVERY`]
/// for [`PANIC_MODEL`], some of those with the marker.
fn jobs(phase: &str, n: usize) -> Vec<Job> {
    (0..n)
        .map(|i| {
            let id = format!("{phase}-{i}");
            if i % PANIC_MODEL_EVERY == PANIC_MODEL_EVERY / 2 {
                let text = if (i / PANIC_MODEL_EVERY).is_multiple_of(MARKER_EVERY) {
                    format!("{phase} job {i} goes {PANIC_MARKER} in the model")
                } else {
                    format!("{phase} job {i} shares a batch with a panic")
                };
                Job::new(PANIC_MODEL, vec![text]).with_id(id)
            } else {
                Job::new(
                    MODEL,
                    vec![format!("{phase} job number {i} of the chaos run")],
                )
                .with_id(id)
            }
        })
        .collect()
}

fn is_marker(job: &Job) -> bool {
    job.inputs.iter().any(|t| t.contains(PANIC_MARKER))
}

/// Every dead letter on the servers, by job id, once at least `expected`
/// are stored (bounded: settling can trail the last reply).
async fn dead_letters(
    js: &jetstream::Context,
    expected: usize,
    fleet: &mut Fleet,
) -> HashMap<String, String> {
    let started = Instant::now();
    loop {
        fleet.tend();
        let letters = match dead_letter::list(js, usize::MAX).await {
            Ok(letters) => letters,
            Err(err) => {
                assert!(started.elapsed() < PATIENCE, "reading dead letters: {err}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if letters.len() >= expected || started.elapsed() > PATIENCE {
            return letters
                .into_iter()
                .map(|letter| (letter.job_id, letter.reason))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Error replies stored on [`POISON_INBOX`]: read until `expected` are there
/// or patience runs out, as a replica catching up may be read at first.
async fn poison_replies(js: &jetstream::Context, expected: usize) -> usize {
    let started = Instant::now();
    loop {
        let stored: usize = stored_per_job(js, POISON_INBOX).await.values().sum();
        if stored >= expected || started.elapsed() > PATIENCE {
            return stored;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Messages left in the jobs stream once settling is done (bounded wait,
/// the fleet tended meanwhile).
async fn jobs_left(js: &jetstream::Context, fleet: &mut Fleet) -> u64 {
    let started = Instant::now();
    loop {
        fleet.tend();
        let left = match js.get_stream("JETINFER_JOBS").await {
            Ok(mut stream) => stream.info().await.map(|i| i.state.messages).ok(),
            Err(_) => None,
        };
        match left {
            Some(0) => return 0,
            Some(n) if started.elapsed() > PATIENCE => return n,
            None if started.elapsed() > PATIENCE => return u64::MAX,
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

async fn phase(label: &str, mut servers: Servers, n: usize) -> Tally {
    let urls = servers.urls();
    let replicas = servers.replicas();
    let nats = NatsConfig {
        urls: urls.clone(),
        startup_retry_for: Duration::from_secs(30),
        ..NatsConfig::default()
    };
    let panicking = panicking_worker(&nats, replicas).await;
    let env = [
        // Jobs held by a killed worker come back quickly.
        ("JETINFER_CONSUMER__ACK_WAIT", "2".to_string()),
        ("JETINFER_MODEL__ECHO_DELAY_PER_TOKEN_US", "5".to_string()),
        ("JETINFER_BATCH__MAX_INPUTS", "16".to_string()),
        ("JETINFER_STREAM__REPLICAS", replicas.to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .to_vec();
    // `JETINFER_CHAOS_LOGS=<dir>` keeps the worker processes' logs there.
    let log = std::env::var_os("JETINFER_CHAOS_LOGS")
        .map(|dir| std::path::PathBuf::from(dir).join(format!("{label}-workers.log")));
    let mut fleet = Fleet::start(urls.clone(), env, log);
    let client = Client::connect(ClientConfig {
        nats: nats.clone(),
        timeout: PATIENCE,
        ..ClientConfig::default()
    })
    .await
    .expect("client connects");
    wait_for_model(&client, MODEL).await;
    wait_for_model(&client, PANIC_MODEL).await;
    let js = jetstream::new(jetinfer_nats::connect(&nats).await.unwrap());
    let unawaited_before = client.results_unawaited();

    let jobs = jobs(label, n);
    let markers: Vec<String> = jobs
        .iter()
        .filter(|j| is_marker(j))
        .map(|j| j.id.to_string())
        .collect();
    let patience = PATIENCE * 2 + PER_THOUSAND_JOBS * (n / 1000) as u32;
    let done = Arc::new(AtomicUsize::new(0));
    let faults_done = Arc::new(AtomicUsize::new(0));
    let in_flight = (n / 10).clamp(10, IN_FLIGHT);
    let run = {
        let client = client.clone();
        let done = Arc::clone(&done);
        let faults_done = Arc::clone(&faults_done);
        tokio::spawn(async move {
            futures::stream::iter(jobs.into_iter().enumerate())
                .map(move |(i, job)| {
                    let client = client.clone();
                    let done = Arc::clone(&done);
                    let faults_done = Arc::clone(&faults_done);
                    async move {
                        // A job past a fault's point (by a window of jobs in
                        // flight) waits for that fault, so the run cannot end
                        // before every fault has happened.
                        let owed = (0..WORKER_KILLS)
                            .filter(|&k| fault_at(n, k) + in_flight <= i)
                            .count();
                        let waiting = Instant::now();
                        while faults_done.load(Ordering::Relaxed) < owed
                            && waiting.elapsed() < patience
                        {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        let id = job.id.clone();
                        let (outcome, refusals) = submit_again_if_refused(&client, job).await;
                        done.fetch_add(1, Ordering::Relaxed);
                        (id, outcome, refusals)
                    }
                })
                .buffered(in_flight)
                .collect::<Vec<_>>()
                .await
        })
    };
    let poison_count = n / POISON_EVERY;
    let poisoner = {
        let js = js.clone();
        let done = Arc::clone(&done);
        let label = label.to_string();
        tokio::spawn(async move {
            let mut expected = HashMap::new();
            for k in 0..poison_count {
                wait_for(&done, k * POISON_EVERY, patience).await;
                let id = format!("{label}-poison-{k}");
                let (reply_to, payload, reason) = poison(k, &id);
                publish_poison(&js, &id, reply_to, payload).await;
                expected.insert(id, reason);
            }
            expected
        })
    };

    // The faults, spread over the run by jobs done, while the fleet is
    // tended.
    let mut tally = Tally::default();
    let server_fault_at = WORKER_KILLS / 2;
    let mut killed_leader = None;
    let mut kills = 0;
    let deadline = Instant::now() + patience;
    while !run.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the run did not finish: {} of {n} done",
            done.load(Ordering::Relaxed)
        );
        fleet.tend();
        if kills < WORKER_KILLS && done.load(Ordering::Relaxed) >= fault_at(n, kills) {
            if kills == server_fault_at {
                match &mut servers {
                    Servers::One(server) => {
                        tokio::task::block_in_place(|| server.restart());
                        tally.server_kills += 1;
                    }
                    Servers::Three(cluster) => {
                        let leader = jobs_leader(&js).await;
                        cluster.kill(&leader);
                        killed_leader = Some(leader);
                        tally.leader_kills += 1;
                    }
                }
            }
            if kills == server_fault_at + 1 {
                if let (Servers::Three(cluster), Some(leader)) = (&mut servers, &killed_leader) {
                    tokio::task::block_in_place(|| cluster.resume(leader));
                }
            }
            fleet.kill(kills % WORKERS);
            tally.worker_kills += 1;
            kills += 1;
            faults_done.store(kills, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let outcomes = tokio::time::timeout(patience, run)
        .await
        .expect("the run finished")
        .unwrap();
    let expected_poison = tokio::time::timeout(patience, poisoner)
        .await
        .expect("poison published")
        .unwrap();

    // What the caller got.
    tally.submitted = n + poison_count;
    tally.poison = poison_count;
    tally.panic_markers = markers.len();
    let mut unanswered = Vec::new();
    let mut refused = Vec::new();
    for (id, outcome, refusals) in &outcomes {
        tally.refusals_resubmitted += refusals;
        match outcome {
            Ok(result) => match result.clone().into_result() {
                Ok(_) => tally.answered_ok += 1,
                Err(err) => {
                    *tally.error_replies.entry(err.code.to_string()).or_default() += 1;
                    if err.code != ErrorCode::Internal || !markers.contains(&id.to_string()) {
                        tally
                            .faults
                            .push(format!("{id}: unexpected error reply {err}"));
                    }
                }
            },
            Err(SubmitError::Timeout { .. }) => unanswered.push(id.to_string()),
            Err(other) => {
                tally.refused_at_submit += 1;
                refused.push((id.to_string(), other.to_string()));
            }
        }
    }
    tally.answered_twice_at_client = client.results_unawaited() - unawaited_before;

    // What the servers hold: results per job id, dead letters, what is left.
    let stored = stored_per_job(&js, client.inbox()).await;
    tally.computed_twice = stored
        .iter()
        .filter(|(id, &count)| id.starts_with(label) && count > 1)
        .count();
    let left = jobs_left(&js, &mut fleet).await;
    let letters = dead_letters(&js, poison_count + markers.len(), &mut fleet).await;
    for reason in letters.values() {
        *tally.dead_letters.entry(reason.clone()).or_default() += 1;
    }
    for (id, reason) in &expected_poison {
        match letters.get(id) {
            Some(got) if got == reason => {}
            got => tally.faults.push(format!(
                "poison {id}: dead letter {got:?}, expected {reason}"
            )),
        }
    }
    for id in &markers {
        if letters.get(id).map(String::as_str) != Some("internal") {
            tally.faults.push(format!(
                "panic marker {id}: dead letter {:?}",
                letters.get(id)
            ));
        }
    }
    for (id, reason) in &letters {
        if !expected_poison.contains_key(id) && !markers.contains(id) {
            tally
                .faults
                .push(format!("{id}: dead-lettered ({reason}) though it was good"));
        }
    }
    for id in &unanswered {
        if stored.contains_key(id) {
            tally.stored_not_routed += 1;
            tally
                .faults
                .push(format!("{id}: stored but never handed to its caller"));
        } else if !letters.contains_key(id) {
            tally.lost += 1;
            tally.faults.push(format!("{id}: lost"));
        }
    }
    for (id, err) in &refused {
        // Refused at submit, yet stored and answered: not lost, but the
        // producer was told otherwise.
        if stored.contains_key(id) {
            tally
                .faults
                .push(format!("{id}: refused ({err}) yet answered"));
        }
    }
    if left != 0 {
        tally.faults.push(format!(
            "{left} jobs left in the jobs stream\n{}",
            queue_state(&js).await
        ));
    }
    // Nothing answered a poison job on another tenant's subject.
    let foreign = stored_per_job(&js, FOREIGN_INBOX).await;
    if !foreign.is_empty() {
        tally.faults.push(format!(
            "{} replies on another tenant's subject",
            foreign.len()
        ));
    }
    let answerable = (0..poison_count).filter(|k| k % 5 < 3).count();
    let poison_replies = poison_replies(&js, answerable).await;
    if poison_replies < answerable {
        tally.faults.push(format!(
            "poison error replies: {poison_replies} stored, {answerable} expected"
        ));
    }
    tally.worker_exits = fleet.exits.clone();
    if tally.worker_kills != WORKER_KILLS || tally.server_kills + tally.leader_kills != 1 {
        tally.faults.push(format!(
            "the run ended before its faults: {} worker kills, {} server kills, {} leader kills",
            tally.worker_kills, tally.server_kills, tally.leader_kills
        ));
    }
    eprintln!("{}", tally.line(label));

    drop(fleet);
    tokio::time::timeout(PATIENCE, panicking.shutdown())
        .await
        .expect("the in-process worker stops");
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_of_kills_panics_restarts_leader_loss_and_poison_loses_no_job() {
    let n = count_from_env("JETINFER_CHAOS_JOBS", 2000);
    let single = n * 3 / 5;
    let started = Instant::now();
    let mut total = phase("single", Servers::One(NatsServer::start()), single).await;
    total.add(phase("cluster", Servers::Three(NatsCluster::start(3)), n - single).await);
    eprintln!("{}", total.line("total"));
    eprintln!("chaos took {:?}", started.elapsed());
    assert!(
        total.faults.is_empty(),
        "{} faults, first: {:#?}",
        total.faults.len(),
        &total.faults[..total.faults.len().min(10)]
    );
    assert_eq!(total.lost, 0);
}
