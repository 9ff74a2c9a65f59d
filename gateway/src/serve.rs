//! The listener: serves at most `max_connections` at once; a connection
//! past them is answered 503 with `Retry-After` at once and closed (at most
//! [`MAX_REFUSING`] being answered so; past those it is closed unanswered),
//! rather than left waiting in the kernel's backlog. It does the TLS
//! handshake when configured (bounded by the header read timeout too), with
//! the certificate [`ServerCert`] holds at that moment (reloaded when its
//! files change or on SIGHUP), and serves HTTP/1.1 with hyper's header read
//! timeout, so a client that trickles its request head is cut off.
//!
//! Shutdown: cancelling the token stops accepting; every open connection is
//! told to finish its request in flight and close (hyper's graceful
//! shutdown), and [`Listener::run`] returns once they have, or after
//! `shutdown_grace`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{EdgeLimits, TlsFiles};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading TLS certificates from {path}: {message}")]
    Certs { path: String, message: String },
    #[error("reading the TLS key from {path}: {message}")]
    Key { path: String, message: String },
    #[error("the TLS certificate and key do not make a server configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Connections past `max_connections` being answered 503 at once; one
/// more is closed unanswered, so a flood costs a bounded amount of work.
pub const MAX_REFUSING: usize = 64;
/// What a connection refused at the limit is told to wait.
pub const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The server's certificate and key from PEM files, swappable: every TLS
/// handshake takes the pair held at that moment ([`ResolvesServerCert`]),
/// so after [`ServerCert::reload`] new connections get the new certificate
/// while open ones keep the session they made.
#[derive(Debug)]
pub struct ServerCert {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCert {
    pub fn load(files: &TlsFiles) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            files: files.clone(),
            current: RwLock::new(Arc::new(certified_key(files)?)),
        }))
    }

    /// Reads the files again; on an error the previous pair stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(certified_key(&self.files)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// [`ServerCert::reload`], logging the outcome (for SIGHUP and the
    /// file watcher).
    pub fn reload_logged(&self) {
        match self.reload() {
            Ok(()) => {
                tracing::info!(file = %self.files.cert_file.display(), "TLS certificate loaded")
            }
            Err(err) => {
                tracing::error!(error = %err, "TLS certificate not reloaded; the previous one stays")
            }
        }
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// The chain and key of `files`, checked to belong together.
fn certified_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let shown = |p: &Path| p.display().to_string();
    let certs = CertificateDer::pem_file_iter(&files.cert_file)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs {
            path: shown(&files.cert_file),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certs {
            path: shown(&files.cert_file),
            message: "no PEM certificate in it".into(),
        });
    }
    // The key's error never quotes the key.
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|_| TlsError::Key {
        path: shown(&files.key_file),
        message: "not a PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(key)?;
    let pair = CertifiedKey::new(certs, signing);
    match pair.keys_match() {
        // A key type that cannot tell its public key is taken on trust.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(err) => Err(TlsError::Config(err)),
    }
}

/// A rustls acceptor over `cert` (HTTP/1.1 only, by ALPN).
pub fn tls_acceptor(cert: Arc<ServerCert>) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Reloads `cert` when its files' modification time or size changes,
/// checked every `every`, until `stop` (as [`crate::auth::watch`] does
/// the keys file).
pub async fn watch_cert(cert: Arc<ServerCert>, every: Duration, stop: CancellationToken) {
    let stamp = |path: &Path| -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    let stamps = || (stamp(&cert.files.cert_file), stamp(&cert.files.key_file));
    let mut seen = stamps();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = stamps();
        if now != seen {
            seen = now;
            cert.reload_logged();
        }
    }
}

/// The bound socket and what serving needs.
pub struct Listener {
    pub listener: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub limits: EdgeLimits,
    /// What answers a connection past `max_connections` (every request:
    /// 503 with `Retry-After`), served on it once before it is closed.
    pub busy: Router,
}

impl Listener {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener")
    }

    /// Serves `app` until `stop`, then drains (see the module header).
    pub async fn run(self, app: Router, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections.max(1)));
        let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
        let graceful = GracefulShutdown::new();
        let header_timeout = self.limits.header_read_timeout;
        loop {
            let (stream, _peer) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: pause, go on.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            // Full: answer 503 at once rather than queue the connection.
            let (permit, service, keep_alive) = match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => (permit, TowerToHyperService::new(app.clone()), true),
                Err(_) => match Arc::clone(&refusing).try_acquire_owned() {
                    Ok(permit) => (permit, TowerToHyperService::new(self.busy.clone()), false),
                    Err(_) => {
                        drop(stream);
                        continue;
                    }
                },
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(keep_alive);
            let tls = self.tls.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _permit = permit;
                match tls {
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(header_timeout, acceptor.accept(stream)).await;
                        let Ok(Ok(stream)) = handshake else {
                            return;
                        };
                        let conn = http.serve_connection(TokioIo::new(stream), service);
                        let _ = watcher.watch(conn).await;
                    }
                    None => {
                        let conn = http.serve_connection(TokioIo::new(stream), service);
                        let _ = watcher.watch(conn).await;
                    }
                }
            });
        }
        drop(self.listener);
        if tokio::time::timeout(self.limits.shutdown_grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.limits.shutdown_grace,
                "connections still open after the shutdown grace; closing them"
            );
        }
    }
}
