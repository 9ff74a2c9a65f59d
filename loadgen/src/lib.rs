//! jetinfer-loadgen: load tests for jetinfer with reports people can read.
//!
//! A run goes: pick a [`scenario`] (a named preset, overridden by a TOML file
//! and the command line), draw jobs from a [`corpus`] by the scenario's mix,
//! offer them closed- or open-loop ([`run`]), record every job into HDR
//! histograms per fixed window ([`stats`]), scrape the worker's metrics before
//! and after ([`metrics`]), judge [`threshold`]s, and write the [`report`]
//! (table, JSON, CSV, self-contained HTML). Jobs go over NATS through the
//! producer's `Client`, or over [`http`] as OpenAI embeddings requests to a
//! gateway. [`raw`] is a bare JetStream responder to measure the queue's
//! ceiling against.
//!
//! `main.rs` only parses arguments; [`execute`] is the whole run, so tests
//! drive it directly.

pub mod corpus;
pub mod duration;
pub mod http;
pub mod metrics;
pub mod raw;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod threshold;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use report::Report;
pub use run::{Target, Via};
pub use scenario::Scenario;
pub use threshold::Threshold;

/// Everything [`execute`] needs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub target: Target,
    pub corpus: PathBuf,
    pub thresholds: Vec<Threshold>,
    pub metrics_url: Option<String>,
    /// Bearer token for `metrics_url`, when the worker requires one.
    pub metrics_token: Option<metrics::MetricsToken>,
    /// Where report.json, windows.csv and report.html go; `None`: nowhere.
    pub out_dir: Option<PathBuf>,
    pub window: Duration,
    pub seed: u64,
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    #[error(transparent)]
    Corpus(#[from] corpus::CorpusError),
    #[error(transparent)]
    Run(#[from] run::RunError),
    #[error("writing the report: {0}")]
    Write(#[from] std::io::Error),
}

/// Runs a plan end to end and returns its report (files written if asked).
pub async fn execute(plan: &Plan) -> Result<(Report, Option<report::Files>), LoadgenError> {
    plan.scenario.validate()?;
    let texts = corpus::load(&plan.corpus)?;
    let jobs = corpus::JobSource::new(texts, &plan.scenario.mix, &plan.target.model, plan.seed);
    let client = run::connect(&plan.target, plan.scenario.timeout).await?;
    let metrics_url = plan.metrics_url.as_deref();
    let metrics_token = plan.metrics_token.as_ref();
    let before = metrics::before(metrics_url, metrics_token).await;
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let summary = run::run(client, &plan.scenario, jobs, plan.window, plan.progress).await;
    let worker = metrics::after(metrics_url, metrics_token, before).await;
    let thresholds = plan.thresholds.iter().map(|t| t.check(&summary)).collect();
    let report = Report {
        scenario: plan.scenario.clone(),
        target: plan.target.shown(),
        model: plan.target.model.clone(),
        corpus: plan.corpus.display().to_string(),
        started_unix_ms,
        summary,
        thresholds,
        worker,
    };
    let files = match &plan.out_dir {
        Some(dir) => Some(report::write_files(&report, dir)?),
        None => None,
    };
    Ok((report, files))
}
