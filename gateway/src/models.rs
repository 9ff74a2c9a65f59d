//! The served models, for `GET /v1/models`. Tenants' accounts cannot see the
//! jobs stream, so the gateway reads it with a user of its own in the
//! workers' account, `GATEWAY` in `deploy/nats/accounts.conf`, allowed one
//! request: the jobs stream's info. Its subjects are the served models
//! (`jobs.<model>.*`, one per model a worker has served: the stream takes
//! and keeps their jobs even while no worker runs). The list is read at
//! start and every `discovery.refresh`; a read that fails keeps the last
//! list.
//!
//! Submitting does not depend on it: a job for a model the stream does not
//! listen on is refused by NATS itself (the producer's `UnknownModel`), 404.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

/// The model names last read, sorted.
#[derive(Clone, Default)]
pub struct Catalog {
    models: Arc<RwLock<Vec<String>>>,
    client: Arc<RwLock<Option<async_nats::Client>>>,
}

impl Catalog {
    pub fn models(&self) -> Vec<String> {
        self.models.read().expect("catalog lock").clone()
    }

    pub fn contains(&self, model: &str) -> bool {
        self.models
            .read()
            .expect("catalog lock")
            .iter()
            .any(|m| m == model)
    }

    /// Whether the catalogue's connection is up (true when none is
    /// configured: nothing to wait for).
    pub fn connected(&self) -> bool {
        match &*self.client.read().expect("catalog lock") {
            Some(client) => client.connection_state() == async_nats::connection::State::Connected,
            None => true,
        }
    }

    /// Reads the stream's subjects now.
    pub async fn refresh(&self, js: &jetstream::Context, stream: &str) -> Result<usize, String> {
        // `$JS.API.STREAM.INFO.<stream>`: the one request the catalogue's
        // user may make.
        let stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
        let mut models: Vec<String> = stream
            .cached_info()
            .config
            .subjects
            .iter()
            .filter_map(|s| {
                let model = s.strip_prefix("jobs.")?.strip_suffix(".*")?;
                jetinfer_nats::subjects::check_token("model", model)
                    .ok()
                    .map(|()| model.to_string())
            })
            .collect();
        models.sort();
        models.dedup();
        let count = models.len();
        *self.models.write().expect("catalog lock") = models;
        Ok(count)
    }

    /// Connects with `config` and refreshes every `every` until `stop`.
    pub async fn follow(
        self,
        config: jetinfer_nats::NatsConfig,
        stream: String,
        every: Duration,
        stop: CancellationToken,
    ) {
        let client = match jetinfer_nats::connect(&config).await {
            Ok(client) => client,
            Err(err) => {
                tracing::error!(error = %err, "model catalogue: cannot connect; /v1/models stays empty");
                return;
            }
        };
        *self.client.write().expect("catalog lock") = Some(client.clone());
        let js = jetstream::new(client);
        loop {
            match self.refresh(&js, &stream).await {
                Ok(count) => tracing::debug!(models = count, "model catalogue read"),
                Err(err) => {
                    tracing::warn!(error = %jetinfer_schemas::Untrusted(&err), "model catalogue not read; keeping the last list")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
