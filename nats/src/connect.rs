//! Connecting to NATS from [`NatsConfig`]: credentials (token, user and
//! password, NKey, `.creds`) and TLS (custom CA, client certificate), with
//! start-up retries while the server is unreachable. Refused credentials and
//! failed TLS handshakes are not retried: they will not get better.

use std::path::Path;
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, ServerAddr};
use backon::{ExponentialBuilder, Retryable};

use crate::config::{Auth, NatsConfig, TlsConfig};

/// First and largest pause between start-up connection attempts.
const RETRY_MIN_DELAY: Duration = Duration::from_millis(100);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(2);

/// Why no connection was made. No variant carries a secret: auth errors name
/// the file a secret came from, never its content.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no NATS server URL configured")]
    NoUrl,
    #[error("invalid NATS server URL {url:?}: {source}")]
    InvalidUrl { url: String, source: std::io::Error },
    /// A secret or certificate file could not be read or is unusable.
    #[error("NATS {what} {path}: {problem}")]
    Credentials {
        what: &'static str,
        path: String,
        problem: String,
    },
    /// The TLS settings contradict each other.
    #[error("NATS TLS settings: {0}")]
    TlsConfig(&'static str),
    /// The server refused the credentials: retrying cannot help.
    #[error(
        "NATS at {urls} refused the credentials (auth kind {kind}): {source}; check nats.auth and the server's users"
    )]
    Refused {
        urls: String,
        kind: &'static str,
        source: async_nats::ConnectError,
    },
    /// The TLS handshake failed (untrusted or mismatched certificate, plain
    /// server while TLS is required, client certificate refused).
    #[error("TLS with NATS at {urls} failed: {source}; check nats.tls (ca_file, cert_file, key_file, required)")]
    Tls {
        urls: String,
        source: async_nats::ConnectError,
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
            .map_err(|source| match source.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    ConnectError::Refused {
                        urls: urls.clone(),
                        kind: config.auth.kind(),
                        source,
                    }
                }
                _ if tls_failure(&source) => ConnectError::Tls {
                    urls: urls.clone(),
                    source,
                },
                _ => ConnectError::Unreachable {
                    urls: urls.clone(),
                    retry_for: config.startup_retry_for,
                    source,
                },
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
            |err, after| tracing::warn!(error = %jetinfer_schemas::Untrusted(err), retry_in = ?after, "NATS not reachable yet"),
        )
        .await
}

/// Whether the connection failed in the TLS handshake. async-nats reports
/// most of those (an untrusted certificate, a refused client certificate) as
/// I/O errors wrapping the rustls error, so the chain is searched for one.
fn tls_failure(err: &async_nats::ConnectError) -> bool {
    use async_nats::rustls;
    use std::error::Error;
    if err.kind() == ConnectErrorKind::Tls {
        return true;
    }
    let mut next: Option<&(dyn Error + 'static)> = err.source();
    while let Some(cause) = next {
        let wrapped = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<rustls::Error>());
        if wrapped || cause.is::<rustls::Error>() {
            return true;
        }
        next = cause.source();
    }
    false
}

/// Connection options from `config`: credentials read from their files now,
/// TLS files checked now, so a mistake is reported before any retrying.
async fn options(config: &NatsConfig) -> Result<ConnectOptions, ConnectError> {
    let options = match &config.auth {
        Auth::None => ConnectOptions::new(),
        Auth::Token { token_file } => {
            ConnectOptions::with_token(read_secret("token file", token_file).await?)
        }
        Auth::UserPassword {
            user,
            password_file,
        } => {
            if user.is_empty() {
                return Err(ConnectError::Credentials {
                    what: "user for password file",
                    path: password_file.display().to_string(),
                    problem: "nats.auth.user is empty".into(),
                });
            }
            let password = read_secret("password file", password_file).await?;
            ConnectOptions::with_user_and_password(user.clone(), password)
        }
        Auth::Nkey { seed_file } => {
            let seed = read_secret("NKey seed file", seed_file).await?;
            // Checked here: async-nats would only fail at the handshake, vaguely.
            if nkeys::KeyPair::from_seed(&seed).is_err() {
                return Err(ConnectError::Credentials {
                    what: "NKey seed file",
                    path: seed_file.display().to_string(),
                    problem: "does not hold an NKey seed (one line starting with S, e.g. SU...)"
                        .into(),
                });
            }
            ConnectOptions::with_nkey(seed)
        }
        Auth::Creds { creds_file } => ConnectOptions::with_credentials_file(creds_file)
            .await
            .map_err(|err| ConnectError::Credentials {
                what: "creds file",
                path: creds_file.display().to_string(),
                problem: err.to_string(),
            })?,
    };
    let options = tls(options, &config.tls)?;
    Ok(options
        .name(&config.name)
        .custom_inbox_prefix(&config.inbox_prefix)
        .connection_timeout(config.connect_timeout))
}

fn tls(mut options: ConnectOptions, tls: &TlsConfig) -> Result<ConnectOptions, ConnectError> {
    if let Some(ca) = &tls.ca_file {
        check_readable("TLS CA file", ca)?;
        options = options.add_root_certificates(ca.clone());
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            check_readable("TLS client certificate", cert)?;
            check_readable("TLS client key", key)?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(ConnectError::TlsConfig(
                "cert_file is set but key_file is not",
            ))
        }
        (None, Some(_)) => {
            return Err(ConnectError::TlsConfig(
                "key_file is set but cert_file is not",
            ))
        }
    }
    if tls.handshake_first {
        options = options.tls_first();
    }
    Ok(options.require_tls(tls.required || tls.handshake_first))
}

/// The secret in `path`, without surrounding whitespace (files written with
/// `echo` end in a newline). The error names the file, never the content.
async fn read_secret(what: &'static str, path: &Path) -> Result<String, ConnectError> {
    let failed = |problem: String| ConnectError::Credentials {
        what,
        path: path.display().to_string(),
        problem,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|err| failed(err.to_string()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(failed("is empty".into()));
    }
    Ok(secret.to_string())
}

fn check_readable(what: &'static str, path: &Path) -> Result<(), ConnectError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|err| ConnectError::Credentials {
            what,
            path: path.display().to_string(),
            problem: err.to_string(),
        })
}
