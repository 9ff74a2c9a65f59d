//! The listener: accepts at most `max_connections` at once (the next accept
//! waits for a slot), does the TLS handshake when configured (bounded by the
//! header read timeout too), and serves HTTP/1.1 with hyper's header read
//! timeout, so a client that trickles its request head is cut off.
//!
//! Shutdown: cancelling the token stops accepting; every open connection is
//! told to finish its request in flight and close (hyper's graceful
//! shutdown), and [`Listener::run`] returns once they have, or after
//! `shutdown_grace`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
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

/// A rustls acceptor from PEM files (HTTP/1.1 only, by ALPN).
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let shown = |p: &Path| p.display().to_string();
    let certs = CertificateDer::pem_file_iter(&files.cert_file)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs {
            path: shown(&files.cert_file),
            message: e.to_string(),
        })?;
    // The key's error never quotes the key.
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|_| TlsError::Key {
        path: shown(&files.key_file),
        message: "not a PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The bound socket and what serving needs.
pub struct Listener {
    pub listener: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub limits: EdgeLimits,
}

impl Listener {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener")
    }

    /// Serves `app` until `stop`, then drains (see the module header).
    pub async fn run(self, app: Router, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections.max(1)));
        let graceful = GracefulShutdown::new();
        let header_timeout = self.limits.header_read_timeout;
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                permit = Arc::clone(&slots).acquire_owned() => permit.expect("never closed"),
            };
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
            let service = TowerToHyperService::new(app.clone());
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
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
