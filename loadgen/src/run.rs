//! Offering load: the closed-loop users and the open-loop scheduler, both
//! driving one [`Sender`] (a jetinfer [`Client`] over NATS, or an
//! [`HttpClient`] to a gateway) and recording every job into a [`Recorder`].
//!
//! Both are bounded twice: no job starts after the scenario's run time and no
//! more than `max_jobs` start; every job ends within the scenario's timeout,
//! so a run lasts at most run time + timeout.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jetinfer_nats::NatsConfig;
use jetinfer_producer::{Client, ClientConfig, SubmitError};
use jetinfer_schemas::{Job, Outcome};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::corpus::JobSource;
use crate::http::{HttpClient, HttpTarget, HttpTargetError};
use crate::scenario::{Mode, Scenario};
use crate::stats::{JobOutcome, Recorder, Summary};

/// How often an idle ramped-down user or a zero-rate schedule looks again.
const RAMP_POLL: Duration = Duration::from_millis(50);
/// Progress line interval on a terminal, and when stderr is a file or pipe.
const PROGRESS_TTY: Duration = Duration::from_secs(1);
const PROGRESS_LOG: Duration = Duration::from_secs(5);

/// Where and what to send.
#[derive(Debug, Clone)]
pub struct Target {
    pub via: Via,
    pub model: String,
    /// The tenant jobs are submitted for over NATS; over HTTP the API key
    /// decides it.
    pub tenant: String,
}

/// How jobs reach jetinfer.
#[derive(Debug, Clone)]
pub enum Via {
    /// Straight onto JetStream through the producer's `Client`.
    Nats(NatsConfig),
    /// As OpenAI embeddings requests to a gateway.
    Http(HttpTarget),
}

impl Target {
    /// What the report names as the target: the NATS URLs or the gateway's.
    pub fn shown(&self) -> String {
        match &self.via {
            Via::Nats(nats) => nats.urls.join(","),
            Via::Http(http) => http.url.clone(),
        }
    }
}

/// What a run sends jobs through.
#[derive(Clone)]
pub enum Sender {
    Nats(Client),
    Http(Box<HttpClient>),
}

impl From<Client> for Sender {
    fn from(client: Client) -> Self {
        Sender::Nats(client)
    }
}

impl Sender {
    async fn submit(&self, job: Job) -> JobOutcome {
        match self {
            Sender::Nats(client) => submit(client, job).await,
            Sender::Http(client) => client.submit(&job).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("connecting to {urls}: {source}")]
    Connect { urls: String, source: SubmitError },
    #[error("the probe job before the run failed: {0}")]
    Probe(SubmitError),
    #[error(transparent)]
    Http(#[from] HttpTargetError),
    #[error("the probe request to {url} failed: {kind}")]
    HttpProbe { url: String, kind: String },
}

/// The error kind a failed submission is counted under.
pub fn error_kind(err: &SubmitError) -> &'static str {
    match err {
        SubmitError::Timeout { .. } => "timeout",
        SubmitError::QueueFull => "queue_full",
        SubmitError::QuotaExceeded { .. } => "quota_exceeded",
        SubmitError::UnknownModel(_) => "unknown_model",
        SubmitError::Publish(_) => "publish",
        SubmitError::Closed => "closed",
        SubmitError::Subject(_) => "invalid_subject",
        SubmitError::Connect(_) => "connect",
        SubmitError::Subscribe(_) => "subscribe",
        SubmitError::Provision(_) => "provision",
        SubmitError::Results(_) => "results",
    }
}

async fn submit(client: &Client, job: Job) -> JobOutcome {
    match client.submit(job).await {
        Ok(result) => match result.outcome {
            Outcome::Ok(e) => JobOutcome::Ok {
                inputs: e.embeddings.len() as u64,
                tokens: e.token_counts.iter().map(|&t| u64::from(t)).sum(),
            },
            Outcome::Reranked(r) => JobOutcome::Ok {
                inputs: r.token_counts.len() as u64,
                tokens: r.token_counts.iter().map(|&t| u64::from(t)).sum(),
            },
            Outcome::Error(err) => JobOutcome::Error(err.code.as_str().into()),
        },
        Err(err) => JobOutcome::Error(error_kind(&err).into()),
    }
}

/// Shared state of one run.
struct Run {
    sender: Sender,
    scenario: Scenario,
    jobs: Mutex<JobSource>,
    recorder: Mutex<Recorder>,
    start: Instant,
    deadline: Instant,
    /// Jobs that may still start.
    budget: AtomicU64,
    active_users: AtomicUsize,
}

impl Run {
    fn take_job(&self) -> Option<Job> {
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .ok()?;
        self.recorder.lock().expect("recorder lock").sent();
        Some(self.jobs.lock().expect("jobs lock").next_job().0)
    }

    async fn send(&self, job: Job, intended: Instant) {
        let sent = Instant::now();
        let outcome = self.sender.submit(job).await;
        let done = Instant::now();
        self.recorder
            .lock()
            .expect("recorder lock")
            .record(intended, sent, done, outcome);
    }
}

/// Connects to `target` and checks it with one probe job (not counted), so a
/// wrong URL, key or model fails fast instead of filling a report with errors.
pub async fn connect(target: &Target, timeout: Duration) -> Result<Sender, RunError> {
    let nats = match &target.via {
        Via::Nats(nats) => nats,
        Via::Http(http) => {
            let client = HttpClient::new(http, timeout)?;
            let probe = Job::new(target.model.clone(), vec!["loadgen probe".into()]);
            return match client.submit(&probe).await {
                JobOutcome::Ok { .. } => Ok(Sender::Http(Box::new(client))),
                JobOutcome::Error(kind) => Err(RunError::HttpProbe {
                    url: http.url.clone(),
                    kind,
                }),
            };
        }
    };
    let client = Client::connect(ClientConfig {
        nats: nats.clone(),
        tenant: target.tenant.clone(),
        timeout,
        ..ClientConfig::default()
    })
    .await
    .map_err(|source| RunError::Connect {
        urls: nats.urls.join(","),
        source,
    })?;
    client
        .submit(Job::new(target.model.clone(), vec!["loadgen probe".into()]))
        .await
        .map_err(RunError::Probe)?;
    Ok(Sender::Nats(client))
}

/// Runs `scenario` with jobs from `jobs` through `sender`, recording in
/// windows of `window`; prints a progress line to stderr if `progress`.
pub async fn run(
    sender: impl Into<Sender>,
    scenario: &Scenario,
    jobs: JobSource,
    window: Duration,
    progress: bool,
) -> Summary {
    let start = Instant::now();
    let run = Arc::new(Run {
        sender: sender.into(),
        scenario: scenario.clone(),
        jobs: Mutex::new(jobs),
        recorder: Mutex::new(Recorder::new(start, window)),
        start,
        deadline: start + scenario.run_time(),
        budget: AtomicU64::new(scenario.max_jobs),
        active_users: AtomicUsize::new(0),
    });
    let reporter = progress.then(|| tokio::spawn(report_progress(Arc::clone(&run))));
    match scenario.mode {
        Mode::Closed => closed_loop(&run).await,
        Mode::Open => open_loop(&run).await,
    }
    if let Some(reporter) = reporter {
        reporter.abort();
        eprintln!();
    }
    let mut recorder = run.recorder.lock().expect("recorder lock");
    recorder.close(Instant::now());
    recorder.summary()
}

async fn closed_loop(run: &Arc<Run>) {
    let mut users = JoinSet::new();
    for index in 0..run.scenario.peak_users() {
        users.spawn(user(Arc::clone(run), index));
    }
    while users.join_next().await.is_some() {}
}

/// One virtual user: while the ramp counts it in, send, await, think.
///
/// Without a ramp, users start spread over one think time (user i of n after
/// i/n of it), as users arriving at a service would, rather than all in the
/// same instant: 10 users thinking 5 s then offer one job every 0.5 s.
async fn user(run: Arc<Run>, index: usize) {
    if run.scenario.stages.is_empty() && run.scenario.users > 0 {
        let offset = run
            .scenario
            .think_time
            .mul_f64(index as f64 / run.scenario.users as f64);
        let latest = run.deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(offset.min(latest)).await;
    }
    let mut active = false;
    loop {
        let now = Instant::now();
        if now >= run.deadline {
            break;
        }
        let wanted = (index as f64) < run.scenario.target_at(now - run.start);
        if wanted != active {
            active = wanted;
            if wanted {
                run.active_users.fetch_add(1, Ordering::Relaxed);
            } else {
                run.active_users.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if !active {
            tokio::time::sleep(RAMP_POLL.min(run.deadline - now)).await;
            continue;
        }
        let Some(job) = run.take_job() else { break };
        run.send(job, Instant::now()).await;
        let now = Instant::now();
        let think = run
            .scenario
            .think_time
            .min(run.deadline.saturating_duration_since(now));
        tokio::time::sleep(think).await;
    }
    if active {
        run.active_users.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts jobs on a fixed schedule. When `max_in_flight` jobs are waiting the
/// scheduler waits too, but each job keeps its intended start, so the wait
/// shows in its latency instead of silently thinning the load.
async fn open_loop(run: &Arc<Run>) {
    let in_flight = Arc::new(Semaphore::new(run.scenario.max_in_flight));
    let mut jobs = JoinSet::new();
    let mut intended = run.start;
    while intended < run.deadline {
        let rate = run.scenario.target_at(intended - run.start);
        if rate <= 0.0 {
            intended += RAMP_POLL;
            continue;
        }
        tokio::time::sleep_until(intended.into()).await;
        let permit = Arc::clone(&in_flight)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let Some(job) = run.take_job() else { break };
        let job_run = Arc::clone(run);
        jobs.spawn(async move {
            job_run.send(job, intended).await;
            drop(permit);
        });
        // Reap finished jobs so the set stays small on long runs.
        while jobs.try_join_next().is_some() {}
        intended += Duration::from_secs_f64(1.0 / rate);
    }
    while jobs.join_next().await.is_some() {}
}

async fn report_progress(run: Arc<Run>) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { PROGRESS_TTY } else { PROGRESS_LOG };
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    let mut last_finished = 0;
    loop {
        ticks.tick().await;
        let (sent, finished, errors, p95) = {
            let r = run.recorder.lock().expect("recorder lock");
            (
                r.sent_count(),
                r.finished(),
                r.errors(),
                r.latency_quantile(0.95),
            )
        };
        let rate = (finished - last_finished) as f64 / every.as_secs_f64();
        last_finished = finished;
        let load = match run.scenario.mode {
            Mode::Closed => format!("users {}", run.active_users.load(Ordering::Relaxed)),
            Mode::Open => format!(
                "rate {:.1}/s",
                run.scenario
                    .target_at(run.start.elapsed().min(run.deadline - run.start))
            ),
        };
        let line = format!(
            "{:>6.1}s  {}  {load}  sent {sent}  done {finished}  errors {errors}  jobs/s {rate:.1}  p95 {:.1}ms",
            run.start.elapsed().as_secs_f64(),
            run.scenario.name,
            p95.as_secs_f64() * 1e3,
        );
        if tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
}
