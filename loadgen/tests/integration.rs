//! The loadgen's integration tests in one test binary (see
//! worker/tests/integration.rs for why one). `worker_metrics` stays a binary
//! of its own: it reads the worker's counters from the process-wide metrics
//! recorder, which every test here would add to.

mod common;

mod http_target;
mod open_loop_stall;
mod real_run;
mod report_browser;
