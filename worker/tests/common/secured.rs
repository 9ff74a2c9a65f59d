//! The shipped NATS security configuration (`deploy/nats/nats-secure.conf`,
//! `nats-tls.conf`, with `accounts.conf`) on a real nats-server, loaded as
//! shipped: only the users' public NKeys (from the environment, as in
//! production), the port and the store directory come from the test. Each
//! role connects with its own seed and inbox prefix; [`Observed`] records
//! what the server refuses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use jetinfer_nats::testing::{workspace_root, NatsServer, TestPki};
use jetinfer_nats::{Auth, NatsConfig, TlsConfig};

/// The roles of `accounts.conf`: user name in tests, the environment
/// variable its public key comes from, and its inbox prefix.
pub const ROLES: [(&str, &str, &str); 5] = [
    ("worker", "JETINFER_WORKER_NKEY", "_INBOX_worker"),
    ("ops", "JETINFER_OPS_NKEY", "_INBOX_ops"),
    ("gateway", "JETINFER_GATEWAY_NKEY", "_INBOX_gateway"),
    ("acme", "JETINFER_PRODUCER_ACME_NKEY", "_INBOX_acme"),
    ("globex", "JETINFER_PRODUCER_GLOBEX_NKEY", "_INBOX_globex"),
];

/// A server running a shipped config, and each role's seed file.
pub struct Secured {
    pub server: NatsServer,
    pub seeds: tempfile::TempDir,
    pub tls: Option<TlsConfig>,
    /// The copied config, when the test renders its own tenant list.
    rendered: Option<tempfile::TempDir>,
}

/// The environment variable a tenant's public NKey comes from, as
/// `deploy/nats/render-accounts.sh` names it.
pub fn tenant_key_var(tenant: &str) -> String {
    format!(
        "JETINFER_PRODUCER_{}_NKEY",
        tenant.to_uppercase().replace('-', "_")
    )
}

/// Renders `deploy/nats/accounts.conf` for `tenants` into `dir` with the
/// shipped script, `env` overriding its limits.
pub fn render_accounts(dir: &Path, tenants: &[&str], env: &[(&str, &str)]) {
    let out = std::process::Command::new("bash")
        .arg(workspace_root().join("deploy/nats/render-accounts.sh"))
        .args(tenants)
        .envs(env.iter().copied())
        .output()
        .expect("render-accounts.sh runs");
    assert!(
        out.status.success(),
        "render-accounts.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("accounts.conf"), out.stdout).unwrap();
}

impl Secured {
    /// `deploy/nats/nats-secure.conf` as shipped.
    pub fn start() -> Self {
        let config = workspace_root().join("deploy/nats/nats-secure.conf");
        Self::start_with(&config, None)
    }

    /// `deploy/nats/nats-tls.conf`, its certificate paths pointed at `pki`
    /// (the config files are copied, with only those paths changed).
    pub fn start_tls(pki: &TestPki, dir: &Path) -> Self {
        for entry in std::fs::read_dir(workspace_root().join("deploy/nats")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "conf") {
                let text = std::fs::read_to_string(&path)
                    .unwrap()
                    .replace("/etc/nats/tls/", &format!("{}/", pki.dir().display()));
                std::fs::write(dir.join(path.file_name().unwrap()), text).unwrap();
            }
        }
        let tls = TlsConfig {
            required: true,
            ca_file: Some(pki.ca_cert.clone()),
            cert_file: Some(pki.client_cert.clone()),
            key_file: Some(pki.client_key.clone()),
            handshake_first: false,
        };
        Self::start_with(&dir.join("nats-tls.conf"), Some(tls))
    }

    pub fn start_with(config: &Path, tls: Option<TlsConfig>) -> Self {
        Self::launch(config, tls, &[], None)
    }

    /// `nats-secure.conf` with the accounts `render-accounts.sh` writes for
    /// `tenants` (its limits overridden by `env`), from a copy the test can
    /// render again ([`Secured::render`]) and reload. `keys_for` names
    /// tenants whose keys the server knows from the start, configured or
    /// not yet (a tenant added later needs its key in the environment).
    pub fn start_rendered(tenants: &[&str], keys_for: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            workspace_root().join("deploy/nats/nats-secure.conf"),
            dir.path().join("nats-secure.conf"),
        )
        .unwrap();
        render_accounts(dir.path(), tenants, env);
        let config = dir.path().join("nats-secure.conf");
        Self::launch(&config, None, keys_for, Some(dir))
    }

    /// Renders the accounts for `tenants` again, into the server's copy of
    /// its config, and reloads the server.
    pub fn render(&self, tenants: &[&str], env: &[(&str, &str)]) {
        assert!(self.rendered.is_some(), "started with start_rendered");
        let dir = self
            .server
            .config_dir()
            .expect("the server runs from a copy");
        render_accounts(dir, tenants, env);
        self.server.reload();
    }

    fn launch(
        config: &Path,
        tls: Option<TlsConfig>,
        extra_tenants: &[&str],
        rendered: Option<tempfile::TempDir>,
    ) -> Self {
        let seeds = tempfile::tempdir().unwrap();
        let mut env = Vec::new();
        let roles = ROLES
            .iter()
            .map(|(role, var, _)| (role.to_string(), var.to_string()))
            .chain(
                extra_tenants
                    .iter()
                    .map(|t| (t.to_string(), tenant_key_var(t))),
            );
        for (role, var) in roles {
            let key = nkeys::KeyPair::new_user();
            std::fs::write(seed_path(seeds.path(), &role), key.seed().unwrap()).unwrap();
            env.push((var, key.public_key()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Self {
            server: NatsServer::start_with_config(config, &env),
            seeds,
            tls,
            rendered,
        }
    }

    /// How `role` connects: its NKey seed file and its own inbox prefix.
    pub fn nats(&self, role: &str) -> NatsConfig {
        let inbox = ROLES
            .iter()
            .find(|r| r.0 == role)
            .map(|r| r.2.to_string())
            .unwrap_or_else(|| format!("_INBOX_{role}"));
        NatsConfig {
            urls: vec![self.server.url()],
            name: format!("test-{role}"),
            startup_retry_for: Duration::from_secs(5),
            auth: Auth::Nkey {
                seed_file: seed_path(self.seeds.path(), role),
            },
            tls: self.tls.clone().unwrap_or_default(),
            inbox_prefix: inbox,
            ..NatsConfig::default()
        }
    }

    pub async fn connect(&self, role: &str) -> Observed {
        Observed::connect(&self.nats(role)).await
    }

    /// Every permissions violation the server logged.
    pub fn violations(&self) -> Vec<String> {
        self.server
            .log()
            .lines()
            .filter(|l| l.contains("Violation"))
            .map(str::to_string)
            .collect()
    }
}

pub fn seed_path(dir: &Path, role: &str) -> PathBuf {
    dir.join(format!("{role}.nk"))
}

/// A connection that records the errors the server sends it.
pub struct Observed {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub errors: Arc<Mutex<Vec<String>>>,
}

impl Observed {
    pub async fn connect(config: &NatsConfig) -> Self {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&errors);
        let client = jetinfer_nats::connect_with_events(config, move |event| {
            if let async_nats::Event::ServerError(err) = event {
                sink.lock().unwrap().push(err.to_string());
            }
        })
        .await
        .expect("role connects");
        let mut js = jetstream::new(client.clone());
        // A refused API request gets no answer: do not wait the default 5 s.
        js.set_timeout(Duration::from_secs(2));
        Self { client, js, errors }
    }

    /// Waits for the server to report a permissions violation on `subject`
    /// to this connection, and returns its text.
    pub async fn violation(&self, subject: &str) -> String {
        let wanted = format!("\"{subject}\"");
        for _ in 0..100 {
            if let Some(found) = self
                .errors
                .lock()
                .unwrap()
                .iter()
                .find(|e| e.contains("Permissions Violation") && e.contains(&wanted))
            {
                return found.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "no permissions violation for {subject}; the server said: {:?}",
            self.errors.lock().unwrap()
        );
    }
}

impl Secured {
    /// A worker's config for this server: the worker role's credentials, and
    /// tenants in accounts of their own (the worker makes no results stream).
    pub fn worker_config(
        &self,
        backend: jetinfer_worker::config::BackendKind,
        batch: jetinfer_worker::config::BatchConfig,
    ) -> jetinfer_worker::config::WorkerConfig {
        let mut config = super::worker_config(&self.server, backend, batch);
        config.nats = self.nats("worker");
        config.stream.tenant_accounts = true;
        config
    }

    /// A producer `Client` of `tenant`, waiting at most `timeout` per job.
    pub async fn client(&self, tenant: &str, timeout: Duration) -> jetinfer_producer::Client {
        jetinfer_producer::Client::connect(jetinfer_producer::ClientConfig {
            nats: self.nats(tenant),
            tenant: tenant.into(),
            timeout,
            ..jetinfer_producer::ClientConfig::default()
        })
        .await
        .expect("the tenant's producer connects")
    }

    /// Makes what `tenant`'s producers need on the server before its first
    /// job, the way its own producer does (a `Client` connecting).
    pub async fn provision_tenant(&self, tenant: &str) {
        jetinfer_producer::Client::connect(jetinfer_producer::ClientConfig {
            nats: self.nats(tenant),
            tenant: tenant.into(),
            ..jetinfer_producer::ClientConfig::default()
        })
        .await
        .expect("the tenant's producer connects and provisions");
    }
}
