//! jetinfer's NATS layer. Everything that knows a subject name, a stream or
//! consumer setting, or how to connect lives here and nowhere else.
//!
//! - [`subjects`]: the subject scheme (`jobs.<model>.<tenant>`, `results.<tenant>.…`).
//! - [`connect()`]: a client from [`NatsConfig`] (auth, TLS), retried with back-off at start-up.
//! - [`provision`]: idempotent creation of the jobs stream and per-model consumers.
//! - [`publish`]: publishing a job with `Nats-Msg-Id` and awaiting its PubAck.
//! - [`results`]: the durable results stream, publishing into it, catching up.
//! - [`dead_letter`]: the dead-letter stream and storing a job that was given up.
//! - [`bulk`]: the bucket of bulk runs' records and cancel marks.
//! - [`batches`]: the Batch API's object store of files and bucket of batch records.
//! - `testing` (feature `testing`): a real `nats-server` on a free loopback port.

pub mod batches;
pub mod bulk;
mod config;
mod connect;
pub mod dead_letter;
pub mod provision;
pub mod publish;
pub mod results;
pub mod subjects;
#[cfg(feature = "testing")]
pub mod testing;

pub use async_nats;
pub use config::{Auth, ConsumerSettings, NatsConfig, StreamSettings, TlsConfig};
pub use connect::{connect, connect_with_events, ConnectError};
pub use provision::{provision_consumer, provision_stream, ProvisionError};
pub use publish::{publish_bulk_job, publish_job, publish_job_traced, PublishJobError};
pub use subjects::{SubjectError, Tenant};
