//! A real stack for the gateway's tests: nats-server with the shipped secure
//! config (`deploy/nats/nats-secure.conf` and the tenant accounts), a worker
//! in this process under the worker role, and the gateway holding each
//! tenant's NKey and the catalogue's `gateway` user, with a keys file the
//! test writes. Requests go over real loopback HTTP, through curl.

#![allow(dead_code)]

/// What the gateway's tests take of the worker's test helpers: the shipped
/// secure config (`secured.rs`) and the two functions it and they need.
/// Not the whole of `worker/tests/common`, whose fault-run helpers need the
/// worker's own binary and dev-dependencies.
#[path = "../../../worker/tests/common"]
pub mod common {
    use std::path::PathBuf;
    use std::time::Duration;

    use jetinfer_nats::testing::{workspace_root, NatsServer};
    use jetinfer_nats::NatsConfig;
    use jetinfer_worker::config::{BackendKind, BatchConfig, WorkerConfig};

    pub mod secured;

    pub fn model_dir() -> PathBuf {
        std::env::var_os("JETINFER_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(".cache/models/all-MiniLM-L6-v2"))
    }

    /// `../shared/data` beside the checkout, or `$JETINFER_SHARED_DATA`.
    pub fn shared_data() -> PathBuf {
        std::env::var_os("JETINFER_SHARED_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("../shared/data"))
    }

    /// As `worker/tests/common::worker_config`.
    pub fn worker_config(
        server: &NatsServer,
        backend: BackendKind,
        batch: BatchConfig,
    ) -> WorkerConfig {
        let mut config = WorkerConfig {
            nats: NatsConfig {
                urls: vec![server.url()],
                startup_retry_for: Duration::from_secs(5),
                ..NatsConfig::default()
            },
            batch,
            ..WorkerConfig::default()
        };
        config.model.backend = backend;
        config.model.path = model_dir();
        config
    }
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

use jetinfer_gateway::config::{DiscoveryConfig, GatewayConfig, Rate, TenantConfig};
use jetinfer_gateway::Gateway;
use jetinfer_nats::Auth;
use jetinfer_worker::config::{BackendKind, BatchConfig};
use jetinfer_worker::{load_backend, Worker};
use sha2::{Digest, Sha256};

pub use common::secured::{seed_path, Secured};

/// The keys the tests present, and what the keys file says of each.
pub const ACME_KEY: &str = "sk-acme-user-0123456789";
pub const ACME_READ_ONLY_KEY: &str = "sk-acme-read-only-0123456789";
pub const ACME_LIMITED_KEY: &str = "sk-acme-limited-0123456789";
pub const GLOBEX_KEY: &str = "sk-globex-user-0123456789";
/// A key whose tenant this gateway holds no NATS identity for.
pub const STRAY_KEY: &str = "sk-initech-0123456789";

pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn keys_file_text() -> String {
    let entry = |id: &str, key: &str, tenant: &str, role: &str, rate: &str| {
        format!(
            "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\ntenant = \"{tenant}\"\nrole = \"{role}\"\n{rate}\n",
            sha256_hex(key)
        )
    };
    [
        entry("acme-user", ACME_KEY, "acme", "user", ""),
        entry("acme-ro", ACME_READ_ONLY_KEY, "acme", "read_only", ""),
        entry(
            "acme-limited",
            ACME_LIMITED_KEY,
            "acme",
            "user",
            "rate = { inputs_per_second = 1, burst_inputs = 1 }",
        ),
        entry("globex-user", GLOBEX_KEY, "globex", "user", ""),
        entry("initech-user", STRAY_KEY, "initech", "user", ""),
    ]
    .concat()
}

pub struct Stack {
    pub secured: Secured,
    pub worker: Worker,
    pub gateway: Gateway,
    pub dir: tempfile::TempDir,
    pub keys_file: PathBuf,
}

impl Stack {
    /// The stack with `backend`, the gateway's config changed by `tweak`.
    pub async fn start(backend: BackendKind, tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        Self::start_with(backend, |_| {}, tweak).await
    }

    /// [`Stack::start`], the worker's config changed by `worker`.
    pub async fn start_with(
        backend: BackendKind,
        worker: impl FnOnce(&mut jetinfer_worker::config::WorkerConfig),
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        let secured = Secured::start();
        let batch = BatchConfig {
            max_inputs: 32,
            max_tokens: 8192,
            max_wait: Duration::from_millis(5),
        };
        let mut config = secured.worker_config(backend, batch);
        worker(&mut config);
        let loaded = load_backend(&config.model).expect("model loads");
        let worker = Worker::start(config, loaded).await.expect("worker starts");
        let dir = tempfile::tempdir().unwrap();
        let keys_file = dir.path().join("keys.toml");
        std::fs::write(&keys_file, keys_file_text()).unwrap();
        let mut config = gateway_config(&secured, &keys_file);
        tweak(&mut config);
        let gateway = Gateway::start(config).await.expect("gateway starts");
        Self {
            secured,
            worker,
            gateway,
            dir,
            keys_file,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.local_addr)
    }

    /// Waits (bounded) until `/v1/models` lists `model`.
    pub async fn wait_for_model(&self, model: &str) {
        for _ in 0..100 {
            if self.gateway.state.catalog.contains(model) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the catalogue never listed {model}");
    }

    pub async fn stop(self) {
        self.gateway.shutdown().await;
        self.worker.shutdown().await;
    }
}

/// The gateway's config for `secured`: each tenant's NKey seed, the
/// catalogue's `gateway` user, loopback on a free port.
pub fn gateway_config(secured: &Secured, keys_file: &Path) -> GatewayConfig {
    let mut config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        keys_file: Some(keys_file.to_path_buf()),
        reload_interval: Duration::from_millis(200),
        ..GatewayConfig::default()
    };
    config.nats.urls = vec![secured.server.url()];
    config.nats.startup_retry_for = Duration::from_secs(5);
    config.limits.job_timeout = Duration::from_secs(60);
    config.limits.request_timeout = Duration::from_secs(90);
    config.tenants = BTreeMap::from([
        ("acme".to_string(), tenant(secured, "acme")),
        ("globex".to_string(), tenant(secured, "globex")),
    ]);
    config.discovery = DiscoveryConfig {
        auth: Some(Auth::Nkey {
            seed_file: seed_path(secured.seeds.path(), "gateway"),
        }),
        refresh: Duration::from_millis(200),
        ..DiscoveryConfig::default()
    };
    config
}

fn tenant(secured: &Secured, name: &str) -> TenantConfig {
    TenantConfig {
        auth: Auth::Nkey {
            seed_file: seed_path(secured.seeds.path(), name),
        },
        inbox_prefix: None,
        rate: None::<Rate>,
    }
}

/// What curl saw: status, headers (lower-cased names) and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts an OpenAI-shaped error with `status` and returns its `error`.
    pub fn openai_error(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status, status, "status; body {}", self.body);
        let body = self.json();
        let error = body["error"].clone();
        assert!(error["message"].is_string(), "{body}");
        assert!(error["type"].is_string(), "{body}");
        assert!(
            error.get("param").is_some() && error.get("code").is_some(),
            "{body}"
        );
        error
    }
}

/// Runs curl with `args` (`-sS -i` added, 30 s cap) and parses what came back.
pub async fn curl(args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "30"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_reply(&String::from_utf8_lossy(&out.stdout))
}

pub fn parse_reply(raw: &str) -> Reply {
    // With a 100-continue, curl prints that head first: take the last head.
    let mut rest = raw;
    loop {
        let (head, body) = rest.split_once("\r\n\r\n").expect("a response head");
        if head.starts_with("HTTP/1.1 100") {
            rest = body;
            continue;
        }
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        return Reply {
            status,
            headers,
            body: body.to_string(),
        };
    }
}

/// `POST /v1/embeddings` with `body` (sent from a file: it may be large)
/// and `key` (none: no header).
pub async fn post_embeddings(stack: &Stack, key: Option<&str>, body: &str) -> Reply {
    let file = stack
        .dir
        .path()
        .join(format!("body-{}.json", ulid::Ulid::new()));
    std::fs::write(&file, body).unwrap();
    let data = format!("@{}", file.display());
    let auth = key.map(|k| format!("Authorization: Bearer {k}"));
    let mut args = vec![
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        data.as_str(),
    ];
    if let Some(auth) = &auth {
        args.extend(["-H", auth.as_str()]);
    }
    let url = stack.url("/v1/embeddings");
    args.push(&url);
    let reply = curl(&args).await;
    let _ = std::fs::remove_file(&file);
    reply
}

/// `GET path` with `key`.
pub async fn get(stack: &Stack, key: Option<&str>, path: &str) -> Reply {
    let auth = key.map(|k| format!("Authorization: Bearer {k}"));
    let url = stack.url(path);
    let mut args = vec![url.as_str()];
    if let Some(auth) = &auth {
        args.extend(["-H", auth.as_str()]);
    }
    curl(&args).await
}
