//! A real `jetinfer-gateway` process for the monitoring tests, when its
//! binary has been built; and the clear reason when it has not.
//!
//! The gateway is another package's binary, so Cargo does not build it for
//! these tests: `cargo build -p jetinfer-gateway` leaves it beside them
//! (`target/<profile>/jetinfer-gateway`), or `JETINFER_GATEWAY_BIN` names
//! it. Without it a test skips its gateway part and says why;
//! `JETINFER_REQUIRE_GATEWAY=1` turns that skip into a failure.
//!
//! What the gateway is given is what the deployment files give it
//! (deploy/gateway/gateway.toml, deploy/k8s/gateway-configmap.yaml):
//! `--config FILE` with `listen`, `keys_file`, `[nats] urls` and the tenant
//! it submits for (`[tenants.default]`: one account, no credentials), the
//! model catalogue (`[discovery]`, anonymous), and a
//! keys file of `[[keys]]` entries (`id`, `sha256` of the key, `tenant`,
//! `role`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jetinfer_nats::testing::{free_port, NatsServer};
use sha2::{Digest, Sha256};

use super::observe::http_get;

/// The environment variable that makes a missing gateway a failure.
pub const REQUIRE_GATEWAY: &str = "JETINFER_REQUIRE_GATEWAY";
/// The API key the test's gateway accepts, for tenant `default`.
pub const TEST_KEY: &str = "jetinfer-monitoring-test-key";
/// How long a starting gateway may take to answer `/readyz` 200.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `JETINFER_REQUIRE_GATEWAY=1` is set.
pub fn gateway_required() -> bool {
    std::env::var(REQUIRE_GATEWAY).is_ok_and(|v| v == "1")
}

/// The gateway binary, or why there is none.
pub fn gateway_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("JETINFER_GATEWAY_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "JETINFER_GATEWAY_BIN={} is not a file",
                path.display()
            ))
        };
    }
    // target/<profile>/deps/<this test> -> target/<profile>/jetinfer-gateway
    let exe = std::env::current_exe().map_err(|e| format!("no path to this test: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or("this test is not in target/<profile>/deps")?;
    let path = profile_dir.join("jetinfer-gateway");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no gateway binary at {} (build it with `cargo build -p jetinfer-gateway`, \
             or name it in JETINFER_GATEWAY_BIN)",
            path.display()
        ))
    }
}

/// A running gateway, killed on drop, with its config, keys file and log
/// in a temporary directory.
pub struct Gateway {
    child: Child,
    pub addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Starts `binary` against `server` (one account, no credentials: tenant
    /// `default`), on a free loopback port, and waits for `/readyz` 200.
    pub async fn start(binary: &std::path::Path, server: &NatsServer) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let keys = dir.path().join("keys.toml");
        std::fs::write(
            &keys,
            format!(
                "[[keys]]\nid = \"monitoring-test\"\nsha256 = \"{}\"\n\
                 tenant = \"default\"\nrole = \"user\"\n",
                hex(&Sha256::digest(TEST_KEY.as_bytes()))
            ),
        )
        .expect("writing keys file");
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\nkeys_file = \"{}\"\n\n\
                 [nats]\nurls = [\"{}\"]\n\n[tenants.default]\n\n\
                 [discovery]\nauth = {{ kind = \"none\" }}\n",
                keys.display(),
                server.url()
            ),
        )
        .expect("writing gateway config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut gateway = Gateway { child, addr, dir };
        gateway.wait_ready().await;
        gateway
    }

    async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(&self.addr, "/readyz").await {
                return;
            }
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && started.elapsed() < START_TIMEOUT,
                "the gateway at {} is not ready within {START_TIMEOUT:?} ({}); its log:\n{}",
                self.addr,
                exited.map_or("still running".to_string(), |s| format!("exited {s}")),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What the gateway wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
