//! jetinfer's metrics, all in one place: every metric name is a constant in
//! [`names`], described and given its histogram buckets in [`install`], and
//! recorded through the small functions below, so the worker's stages make
//! one-line calls and a name appears once in Rust code.
//!
//! Labels: a served model's metrics carry `model`; the ones a reader splits
//! by kind of work (jobs received and finished, inputs, tokens, latencies,
//! batches, the loaded model) carry `task` too, what the model does
//! (`embed` or `rerank`, the wire's names). A model serves one task, so
//! `task` adds no series, and its values are those two only.
//!
//! The Prometheus rules, Alertmanager config and Grafana dashboards that use
//! these names live beside this crate in `monitoring/`; the tests in
//! `monitoring/tests/` check them against a real Prometheus scraping a real
//! worker, so a rename here that they miss fails there.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::Unit;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub mod process;

/// Every metric name. Prometheus conventions: `jetinfer_` prefix, base units
/// (seconds, bytes), `_total` on counters. The process metrics keep the
/// names every Prometheus client library uses, so stock dashboards work.
pub mod names {
    pub const BUILD_INFO: &str = "jetinfer_build_info";

    pub const JOBS_RECEIVED: &str = "jetinfer_jobs_received_total";
    pub const JOBS_FINISHED: &str = "jetinfer_jobs_finished_total";
    pub const JOBS_IN_FLIGHT: &str = "jetinfer_jobs_in_flight";
    pub const JOBS_REDELIVERED: &str = "jetinfer_jobs_redelivered_total";
    pub const JOBS_DEAD_LETTERED: &str = "jetinfer_jobs_dead_lettered_total";
    pub const JOBS_NOT_BURIED: &str = "jetinfer_jobs_not_buried_total";
    pub const JOBS_EXPIRED: &str = "jetinfer_jobs_expired_total";
    pub const INPUTS: &str = "jetinfer_inputs_total";
    pub const TOKENS: &str = "jetinfer_tokens_total";

    pub const QUEUE_WAIT: &str = "jetinfer_job_queue_wait_seconds";
    pub const END_TO_END: &str = "jetinfer_job_end_to_end_seconds";
    pub const INFERENCE: &str = "jetinfer_batch_inference_seconds";
    pub const BATCH_SIZE: &str = "jetinfer_batch_size_inputs";
    pub const BATCH_PADDED_TOKENS: &str = "jetinfer_batch_padded_tokens";
    pub const BATCH_PADDING_WASTE: &str = "jetinfer_batch_padding_waste_ratio";

    pub const MODEL_LOADED: &str = "jetinfer_model_loaded";
    pub const MODEL_LOAD_DURATION: &str = "jetinfer_model_load_duration_seconds";
    pub const MODEL_LOAD_FAILURES: &str = "jetinfer_model_load_failures_total";

    /// Fixed: the deployment files (autoscaling) already use these two.
    pub const QUEUE_PENDING: &str = "jetinfer_queue_pending_jobs";
    pub const QUEUE_TIME_TO_DRAIN: &str = "jetinfer_queue_time_to_drain_seconds";
    pub const QUEUE_ACK_PENDING: &str = "jetinfer_queue_ack_pending_jobs";
    pub const STREAM_BYTES: &str = "jetinfer_stream_bytes";
    pub const STREAM_MAX_BYTES: &str = "jetinfer_stream_max_bytes";
    pub const STREAM_MESSAGES: &str = "jetinfer_stream_messages";
    pub const STREAM_MAX_MESSAGES: &str = "jetinfer_stream_max_messages";

    pub const GPU_MEMORY_USED: &str = "jetinfer_gpu_memory_used_bytes";
    pub const GPU_MEMORY_TOTAL: &str = "jetinfer_gpu_memory_total_bytes";

    /// The gateway's (`jetinfer-gateway`): requests by route, status and
    /// model (served models only; empty otherwise), their duration by route,
    /// and requests being answered now.
    pub const GATEWAY_REQUESTS: &str = "jetinfer_gateway_requests_total";
    pub const GATEWAY_REQUEST_DURATION: &str = "jetinfer_gateway_request_duration_seconds";
    pub const GATEWAY_IN_FLIGHT: &str = "jetinfer_gateway_in_flight_requests";

    pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
    pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
    pub const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
    pub const PROCESS_START_TIME: &str = "process_start_time_seconds";
}

/// Outcome label of a job answered with embeddings; errors use their code.
pub const OUTCOME_OK: &str = "ok";
/// The error code (`ErrorCode`'s wire name) that marks an expired job.
pub const OUTCOME_DEADLINE_EXCEEDED: &str = "deadline_exceeded";

/// Latency buckets, seconds: 1 ms to 2 min, roughly x2.5 apart.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Inputs per batch: the default `max_inputs` is 8; larger knobs land in the top buckets.
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Padded tokens per batch, up to and past the default budget of 2048.
const PADDED_TOKEN_BUCKETS: &[f64] = &[
    16.0, 64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0,
];
const RATIO_BUCKETS: &[f64] = &[0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

#[derive(Debug, thiserror::Error)]
#[error("installing the Prometheus recorder: {0}")]
pub struct InstallError(String);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the
/// same handle), describes every metric and publishes build info. Render
/// `/metrics` with [`render`].
pub fn install() -> Result<PrometheusHandle, InstallError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    // One installer at a time: without this, a caller that loses the race
    // inside `metrics` could look for the winner's handle before the winner
    // has stored it, and fail (seen in parallel worker tests).
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let buckets = [
        (names::QUEUE_WAIT, LATENCY_BUCKETS),
        (names::END_TO_END, LATENCY_BUCKETS),
        (names::INFERENCE, LATENCY_BUCKETS),
        (names::GATEWAY_REQUEST_DURATION, LATENCY_BUCKETS),
        (names::BATCH_SIZE, BATCH_SIZE_BUCKETS),
        (names::BATCH_PADDED_TOKENS, PADDED_TOKEN_BUCKETS),
        (names::BATCH_PADDING_WASTE, RATIO_BUCKETS),
    ];
    let mut builder = PrometheusBuilder::new();
    for (name, values) in buckets {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), values)
            .map_err(|e| InstallError(e.to_string()))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| InstallError(e.to_string()))?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    describe();
    gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "cuda" => cfg!(feature = "cuda").to_string())
        .set(1.0);
    Ok(handle)
}

/// The exposition text for `/metrics`, with process metrics read just now.
pub fn render(handle: &PrometheusHandle) -> String {
    process::record();
    handle.run_upkeep();
    handle.render()
}

fn describe() {
    use names::*;
    describe_gauge!(
        BUILD_INFO,
        "Always 1; labels carry the worker's version and whether it was built with CUDA"
    );
    describe_counter!(
        JOBS_RECEIVED,
        "Job messages pulled from JetStream, redeliveries included"
    );
    describe_counter!(
        JOBS_FINISHED,
        "Jobs answered, by outcome: ok or the error code sent back"
    );
    describe_gauge!(
        JOBS_IN_FLIGHT,
        "Jobs admitted and not yet answered and acked"
    );
    describe_counter!(
        JOBS_REDELIVERED,
        "Job messages JetStream delivered more than once"
    );
    describe_counter!(
        JOBS_DEAD_LETTERED,
        "Job messages given up on (terminated) without a result, by reason"
    );
    describe_counter!(
        JOBS_NOT_BURIED,
        "Attempts to store a given-up job as a dead letter that failed, by reason; the job stays in the jobs stream and is tried again"
    );
    describe_counter!(JOBS_EXPIRED, "Jobs answered deadline_exceeded");
    describe_counter!(
        INPUTS,
        "Inputs run through the model: texts (task embed) or (query, document) pairs (task rerank)"
    );
    describe_counter!(TOKENS, "Real (unpadded) tokens run through the model");
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "From JetStream storing a job to its first batch starting"
    );
    describe_histogram!(
        END_TO_END,
        Unit::Seconds,
        "From JetStream storing a job to its result being sent"
    );
    describe_histogram!(INFERENCE, Unit::Seconds, "Forward pass time per batch");
    describe_histogram!(BATCH_SIZE, "Inputs per batch");
    describe_histogram!(
        BATCH_PADDED_TOKENS,
        "Padded tokens per batch (longest input x inputs)"
    );
    describe_histogram!(
        BATCH_PADDING_WASTE,
        "Share of a batch's padded tokens that are padding"
    );
    describe_gauge!(
        MODEL_LOADED,
        "1 while the model is loaded and served; labels carry its id and revision"
    );
    describe_gauge!(
        MODEL_LOAD_DURATION,
        Unit::Seconds,
        "How long the last model load took"
    );
    describe_counter!(MODEL_LOAD_FAILURES, "Model loads that failed");
    describe_gauge!(
        QUEUE_PENDING,
        "Jobs stored and not yet delivered to any worker, from JetStream consumer info"
    );
    describe_gauge!(
        QUEUE_ACK_PENDING,
        "Jobs delivered to workers and not yet acked, from JetStream consumer info"
    );
    describe_gauge!(QUEUE_TIME_TO_DRAIN, Unit::Seconds, "Pending plus ack-pending jobs over the consumer's recent completion rate (+Inf: backlog, no progress); the autoscaling signal");
    describe_gauge!(STREAM_BYTES, Unit::Bytes, "Bytes stored in the jobs stream");
    describe_gauge!(
        STREAM_MAX_BYTES,
        Unit::Bytes,
        "The jobs stream's byte limit (absent when unlimited)"
    );
    describe_gauge!(STREAM_MESSAGES, "Messages stored in the jobs stream");
    describe_gauge!(
        STREAM_MAX_MESSAGES,
        "The jobs stream's message limit (absent when unlimited)"
    );
    describe_gauge!(
        GPU_MEMORY_USED,
        Unit::Bytes,
        "GPU memory in use on the worker's device (CUDA builds only)"
    );
    describe_gauge!(
        GPU_MEMORY_TOTAL,
        Unit::Bytes,
        "GPU memory on the worker's device (CUDA builds only)"
    );
    describe_counter!(
        GATEWAY_REQUESTS,
        "HTTP requests the gateway answered, by route, status and model (served models only)"
    );
    describe_histogram!(
        GATEWAY_REQUEST_DURATION,
        Unit::Seconds,
        "From a request's head read to its response, by route"
    );
    describe_gauge!(
        GATEWAY_IN_FLIGHT,
        "HTTP requests the gateway is answering now"
    );
    describe_gauge!(
        PROCESS_CPU,
        Unit::Seconds,
        "User and system CPU time of the worker process"
    );
    describe_gauge!(
        PROCESS_RESIDENT_MEMORY,
        Unit::Bytes,
        "Resident memory of the worker process"
    );
    describe_gauge!(
        PROCESS_VIRTUAL_MEMORY,
        Unit::Bytes,
        "Virtual memory of the worker process"
    );
    describe_gauge!(
        PROCESS_START_TIME,
        Unit::Seconds,
        "Start time of the worker process, Unix seconds"
    );
}

/// Creates `model`'s counters at zero, so rates and alerts see a series from
/// the start instead of one that appears on the first event. `task`: what
/// the model does, the wire's name for it (`embed`, `rerank`).
pub fn register_model(model: &str, task: &'static str) {
    let model = model.to_string();
    for name in [names::JOBS_REDELIVERED, names::MODEL_LOAD_FAILURES] {
        counter!(name, "model" => model.clone()).increment(0);
    }
    for name in [
        names::JOBS_RECEIVED,
        names::JOBS_EXPIRED,
        names::INPUTS,
        names::TOKENS,
    ] {
        counter!(name, "model" => model.clone(), "task" => task).increment(0);
    }
    counter!(names::JOBS_FINISHED, "model" => model.clone(), "task" => task, "outcome" => OUTCOME_OK)
        .increment(0);
    counter!(names::JOBS_DEAD_LETTERED, "model" => model.clone(), "reason" => REASON_NO_REPLY_SUBJECT)
        .increment(0);
    counter!(names::JOBS_NOT_BURIED, "model" => model.clone(), "reason" => REASON_MAX_DELIVERIES)
        .increment(0);
    gauge!(names::JOBS_IN_FLIGHT, "model" => model).set(0.0);
}

/// A model finished loading in `took`; `compute` says how it runs (device,
/// forward pass, products).
pub fn model_loaded(
    model: &str,
    task: &'static str,
    id: &str,
    revision: &str,
    compute: &str,
    took: Duration,
) {
    register_model(model, task);
    gauge!(
        names::MODEL_LOADED,
        "model" => model.to_string(),
        "task" => task,
        "model_id" => id.to_string(),
        "revision" => revision.to_string(),
        "compute" => compute.to_string()
    )
    .set(1.0);
    gauge!(names::MODEL_LOAD_DURATION, "model" => model.to_string()).set(took.as_secs_f64());
}

pub fn model_load_failed(model: &str) {
    counter!(names::MODEL_LOAD_FAILURES, "model" => model.to_string()).increment(1);
}

/// A job message arrived; `delivery` is JetStream's delivery count (1 = first).
pub fn job_received(model: &str, task: &'static str, delivery: i64) {
    counter!(names::JOBS_RECEIVED, "model" => model.to_string(), "task" => task).increment(1);
    if delivery > 1 {
        counter!(names::JOBS_REDELIVERED, "model" => model.to_string()).increment(1);
    }
}

/// A job entered the pipeline (it is answered later by [`job_finished`]).
pub fn job_admitted(model: &str) {
    gauge!(names::JOBS_IN_FLIGHT, "model" => model.to_string()).increment(1.0);
}

/// An admitted job left the pipeline (answered and acked).
pub fn job_released(model: &str) {
    gauge!(names::JOBS_IN_FLIGHT, "model" => model.to_string()).decrement(1.0);
}

/// A job was answered with `outcome` ([`OUTCOME_OK`] or an error code);
/// `end_to_end` is from JetStream storing it to now, when known.
pub fn job_finished(model: &str, task: &'static str, outcome: &str, end_to_end: Option<Duration>) {
    let model = model.to_string();
    counter!(names::JOBS_FINISHED, "model" => model.clone(), "task" => task, "outcome" => outcome.to_string())
        .increment(1);
    if outcome == OUTCOME_DEADLINE_EXCEEDED {
        counter!(names::JOBS_EXPIRED, "model" => model.clone(), "task" => task).increment(1);
    }
    if let Some(took) = end_to_end {
        histogram!(names::END_TO_END, "model" => model, "task" => task).record(took.as_secs_f64());
    }
}

/// Dead-letter reason for a job without a reply subject.
pub const REASON_NO_REPLY_SUBJECT: &str = "no_reply_subject";
/// Dead-letter reason for a job whose reply subject the worker's reply policy
/// forbids (another tenant's, a system or jobs subject, a wildcard...).
pub const REASON_FORBIDDEN_REPLY_SUBJECT: &str = "forbidden_reply_subject";
/// Dead-letter reason for a job that had all its deliveries
/// (`consumer.max_deliver`) and was never answered.
pub const REASON_MAX_DELIVERIES: &str = "max_deliveries";

/// A job was moved to the dead letters; `reason` is an error code or one of
/// the `REASON_*` constants.
pub fn job_dead_lettered(model: &str, reason: &str) {
    counter!(names::JOBS_DEAD_LETTERED, "model" => model.to_string(), "reason" => reason.to_string())
        .increment(1);
}

/// A given-up job's dead letter could not be stored (`reason` as in
/// [`job_dead_lettered`]): the job is left in the jobs stream to be tried
/// again, and an alert fires.
pub fn job_not_buried(model: &str, reason: &str) {
    counter!(names::JOBS_NOT_BURIED, "model" => model.to_string(), "reason" => reason.to_string())
        .increment(1);
}

/// How long a job waited between JetStream storing it and its first batch.
pub fn job_queue_wait(model: &str, task: &'static str, waited: Duration) {
    histogram!(names::QUEUE_WAIT, "model" => model.to_string(), "task" => task)
        .record(waited.as_secs_f64());
}

/// One forward pass: `inputs` texts holding `tokens` real tokens, padded to
/// `padded_tokens`, computed in `took`.
pub fn record_batch(
    model: &str,
    task: &'static str,
    inputs: usize,
    tokens: usize,
    padded_tokens: usize,
    took: Duration,
) {
    let model = model.to_string();
    counter!(names::INPUTS, "model" => model.clone(), "task" => task).increment(inputs as u64);
    counter!(names::TOKENS, "model" => model.clone(), "task" => task).increment(tokens as u64);
    histogram!(names::BATCH_SIZE, "model" => model.clone(), "task" => task).record(inputs as f64);
    histogram!(names::BATCH_PADDED_TOKENS, "model" => model.clone(), "task" => task)
        .record(padded_tokens as f64);
    if padded_tokens > 0 {
        let waste = 1.0 - tokens as f64 / padded_tokens as f64;
        histogram!(names::BATCH_PADDING_WASTE, "model" => model.clone(), "task" => task)
            .record(waste.max(0.0));
    }
    histogram!(names::INFERENCE, "model" => model, "task" => task).record(took.as_secs_f64());
}

/// The consumer's queue as JetStream reports it, and the drain estimate.
/// `time_to_drain` is `None` until there is a completion rate to estimate from.
pub fn record_queue(consumer: &str, pending: u64, ack_pending: u64, time_to_drain: Option<f64>) {
    gauge!(names::QUEUE_PENDING, "consumer" => consumer.to_string()).set(pending as f64);
    gauge!(names::QUEUE_ACK_PENDING, "consumer" => consumer.to_string()).set(ack_pending as f64);
    if let Some(seconds) = time_to_drain {
        gauge!(names::QUEUE_TIME_TO_DRAIN, "consumer" => consumer.to_string()).set(seconds);
    }
}

/// The jobs stream's usage and limits (a limit of zero or less means none).
pub fn record_stream(stream: &str, bytes: u64, max_bytes: i64, messages: u64, max_messages: i64) {
    gauge!(names::STREAM_BYTES, "stream" => stream.to_string()).set(bytes as f64);
    gauge!(names::STREAM_MESSAGES, "stream" => stream.to_string()).set(messages as f64);
    if max_bytes > 0 {
        gauge!(names::STREAM_MAX_BYTES, "stream" => stream.to_string()).set(max_bytes as f64);
    }
    if max_messages > 0 {
        gauge!(names::STREAM_MAX_MESSAGES, "stream" => stream.to_string()).set(max_messages as f64);
    }
}

/// GPU memory of CUDA device `device` (only CUDA builds call this).
pub fn record_gpu_memory(device: usize, used_bytes: u64, total_bytes: u64) {
    gauge!(names::GPU_MEMORY_USED, "device" => device.to_string()).set(used_bytes as f64);
    gauge!(names::GPU_MEMORY_TOTAL, "device" => device.to_string()).set(total_bytes as f64);
}

/// A gateway request began.
pub fn gateway_request_started() {
    gauge!(names::GATEWAY_IN_FLIGHT).increment(1.0);
}

/// A gateway request was answered: `route` is the matched route pattern,
/// `model` a served model or empty.
pub fn gateway_request_finished(route: &str, status: u16, model: &str, took: Duration) {
    gauge!(names::GATEWAY_IN_FLIGHT).decrement(1.0);
    counter!(names::GATEWAY_REQUESTS, "route" => route.to_string(), "status" => status.to_string(), "model" => model.to_string()).increment(1);
    histogram!(names::GATEWAY_REQUEST_DURATION, "route" => route.to_string())
        .record(took.as_secs_f64());
}
