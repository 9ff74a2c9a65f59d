//! The gateway's integration tests, one module per concern, in one test
//! binary (see worker/tests/integration.rs for why one):
//! `cargo test -p jetinfer-gateway --test integration edge::` runs one module.
//! `metrics` and `shutdown` stay binaries of their own: they read the
//! process-wide metrics recorder (request counters, the in-flight gauge),
//! which every test here would add to.

mod harness;

mod catalogue_user;
mod edge;
mod openai_sdk;
mod openai_sdk_batches;
mod rerank;
mod tls_jwt;
