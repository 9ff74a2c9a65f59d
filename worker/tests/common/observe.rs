//! Real Prometheus and Alertmanager processes for the monitoring tests, and
//! the bare HTTP the tests need to talk to them (loopback only).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jetinfer_nats::testing::{free_port, workspace_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a starting Prometheus or Alertmanager may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub fn monitoring_dir() -> PathBuf {
    workspace_root().join("monitoring")
}

/// A child process killed on drop, with its temporary data directory.
pub struct Daemon {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Starts `prometheus` (from PATH) with `config` (YAML text) and `rules`
/// (file name, YAML text) written into a temp dir, on a free loopback port.
pub async fn start_prometheus(config: &str, rules: &[(&str, String)]) -> Daemon {
    let dir = tempfile::tempdir().expect("temp dir");
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir(&rules_dir).expect("rules dir");
    for (name, text) in rules {
        std::fs::write(rules_dir.join(name), text).expect("writing rules");
    }
    let config = config.replace("RULES_DIR", &rules_dir.display().to_string());
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("writing config");
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log_file(dir.path()))
        .spawn()
        .expect("starting prometheus (install it: scripts/deps/monitoring.sh)");
    let daemon = Daemon { child, port, dir };
    wait_http_ok(&daemon).await;
    daemon
}

/// The Alertmanager daemon on PATH: Debian's name, else upstream's.
fn alertmanager_binary() -> &'static str {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    if on_path("prometheus-alertmanager") {
        "prometheus-alertmanager"
    } else {
        "alertmanager"
    }
}

/// Starts Alertmanager (from PATH) with `config`, clustering off.
pub async fn start_alertmanager(config: &str, dir: tempfile::TempDir) -> Daemon {
    std::fs::write(dir.path().join("alertmanager.yml"), config).expect("writing config");
    let port = free_port();
    let child = Command::new(alertmanager_binary())
        .arg(format!(
            "--config.file={}",
            dir.path().join("alertmanager.yml").display()
        ))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .arg("--log.level=debug")
        .stdout(Stdio::null())
        .stderr(log_file(dir.path()))
        .spawn()
        .expect("starting alertmanager (install it: scripts/deps/monitoring.sh)");
    let daemon = Daemon { child, port, dir };
    wait_http_ok(&daemon).await;
    daemon
}

/// The daemon's log, kept in its temp dir and shown when it fails to start.
fn log_file(dir: &Path) -> std::fs::File {
    std::fs::File::create(dir.join("log")).expect("log file")
}

async fn wait_http_ok(daemon: &Daemon) {
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = http_get(&daemon.addr(), "/-/ready").await {
            return;
        }
        assert!(
            started.elapsed() < START_TIMEOUT,
            "{} not ready within {START_TIMEOUT:?}; its log:\n{}",
            daemon.addr(),
            std::fs::read_to_string(daemon.dir.path().join("log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP response: status, header block and body.
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A GET over HTTP/1.0 (no chunking, server closes), with `extra` header
/// lines (each ending in CRLF), given at most 10 s.
pub async fn http_request(addr: &str, path: &str, extra: &str) -> std::io::Result<HttpResponse> {
    exchange(
        addr,
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n").into_bytes(),
    )
    .await
}

/// A POST of a JSON `body` over HTTP/1.0, with `extra` header lines (each
/// ending in CRLF), given at most 10 s.
pub async fn http_post_json(
    addr: &str,
    path: &str,
    extra: &str,
    body: &str,
) -> std::io::Result<HttpResponse> {
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{extra}\r\n",
        body.len()
    );
    exchange(addr, [head.as_bytes(), body.as_bytes()].concat()).await
}

/// Sends `request` and reads the response until the server closes.
async fn exchange(addr: &str, request: Vec<u8>) -> std::io::Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(&request).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 10 s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// A GET over HTTP/1.0: status and body.
pub async fn http_get(addr: &str, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let response = http_request(addr, path_and_query, "").await?;
    Ok((response.status, response.body))
}

pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query against Prometheus's HTTP API: the result vector.
pub async fn query(prometheus: &str, expr: &str) -> Vec<serde_json::Value> {
    let path = format!("/api/v1/query?query={}", url_encode(expr));
    let Ok((200, body)) = http_get(prometheus, &path).await else {
        return Vec::new();
    };
    let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    value["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
