//! Connecting to NATS from [`NatsConfig`], with start-up retries.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};
use backon::{ExponentialBuilder, Retryable};

use crate::config::{Auth, NatsConfig};

/// First and largest pause between start-up connection attempts.
const RETRY_MIN_DELAY: Duration = Duration::from_millis(100);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no NATS server URL configured")]
    NoUrl,
    #[error("invalid NATS server URL {url:?}: {source}")]
    InvalidUrl { url: String, source: std::io::Error },
    #[error("reading credentials from {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "could not connect to NATS at {urls} (gave up after retrying for {retry_for:?}): {source}"
    )]
    Unreachable {
        urls: String,
        retry_for: Duration,
        source: async_nats::ConnectError,
    },
}

/// Connects to the configured servers. A server that is not up yet is retried
/// with exponential back-off for `startup_retry_for`; after the first connection
/// async-nats reconnects on its own.
pub async fn connect(config: &NatsConfig) -> Result<Client, ConnectError> {
    connect_with_events(config, |_| {}).await
}

/// [`connect`], calling `on_event` for every connection event (disconnected,
/// reconnected, ...), e.g. to catch up on what was missed while away.
pub async fn connect_with_events<F>(
    config: &NatsConfig,
    on_event: F,
) -> Result<Client, ConnectError>
where
    F: Fn(async_nats::Event) + Send + Sync + 'static,
{
    let on_event = std::sync::Arc::new(on_event);
    if config.urls.is_empty() {
        return Err(ConnectError::NoUrl);
    }
    let urls = config.urls.join(",");
    let addrs = config
        .urls
        .iter()
        .map(|url| {
            url.parse::<ServerAddr>()
                .map_err(|source| ConnectError::InvalidUrl {
                    url: url.clone(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let attempt = || async {
        let on_event = std::sync::Arc::clone(&on_event);
        let options = options(config).await?.event_callback(move |event| {
            let on_event = std::sync::Arc::clone(&on_event);
            async move { on_event(event) }
        });
        options
            .connect(addrs.as_slice())
            .await
            .map_err(|source| ConnectError::Unreachable {
                urls: urls.clone(),
                retry_for: config.startup_retry_for,
                source,
            })
    };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(RETRY_MIN_DELAY)
                .with_max_delay(RETRY_MAX_DELAY)
                .with_total_delay(Some(config.startup_retry_for))
                .without_max_times(),
        )
        .when(|err| matches!(err, ConnectError::Unreachable { .. }))
        .notify(
            |err, after| tracing::warn!(error = %err, retry_in = ?after, "NATS not reachable yet"),
        )
        .await
}

async fn options(config: &NatsConfig) -> Result<ConnectOptions, ConnectError> {
    let options = match &config.auth {
        Auth::None => ConnectOptions::new(),
        Auth::CredsFile { path } => {
            ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?
        }
        Auth::TokenFile { path } => {
            let token = tokio::fs::read_to_string(path).await.map_err(|source| {
                ConnectError::Credentials {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            ConnectOptions::with_token(token.trim().to_string())
        }
    };
    Ok(options
        .name(&config.name)
        .connection_timeout(config.connect_timeout))
}
