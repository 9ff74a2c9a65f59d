//! The worker's integration tests, one module per concern, in one test
//! binary: `cargo test -p jetinfer-worker --test integration` runs them all,
//! `... --test integration faults::` one module.
//!
//! One binary rather than one per file: each file used to be its own crate,
//! compiling `common` and the generic code of tokio, async-nats and serde
//! again, about 15 s of a 2-core machine each (twenty binaries: five minutes
//! of every clean `scripts/test.sh`), and running one after another, so a
//! file with one long test left a core idle. Tests still run two at a time
//! (libtest's threads, one per core) and start their own servers and
//! workers, so they share nothing but the process.
//!
//! Four stay binaries of their own. Three read something process-wide that
//! every other test here would write to:
//! `hostile_headers` installs a tracing subscriber to read the worker's log,
//! and `monitoring_alerts` and `monitoring_dashboards` read the metrics
//! recorder's whole page through Prometheus. A test that shares the recorder
//! reads only its own model's series (`supervision`, `multi_model`).
//! `hostile_fairness` is alone too: it compares one tenant's latency during
//! another's flood with its own baseline, which other tests' load in the
//! same process would skew between the two phases.

mod common;

mod batches;
mod chaos;
mod faults;
mod golden;
mod hostile_accounts;
mod hostile_dead_letters;
mod hostile_memory;
mod http_security;
mod mpnet;
mod multi_model;
mod nats_security;
mod pipeline;
mod pooling;
mod rerank;
mod screening;
mod security;
mod supervision;
mod xlm_roberta;
