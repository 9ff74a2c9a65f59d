//! A real `nats-server` with JetStream for tests: started on a free loopback
//! port with a temporary store directory, stopped (and its store removed) on drop.
//!
//! The binary is `$JETINFER_NATS_SERVER`, or `.cache/bin/nats-server` at the
//! workspace root as installed by `scripts/setup.sh`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct NatsServer {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
}

/// Path of the nats-server binary tests use.
pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("JETINFER_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let path = workspace_root().join(".cache/bin/nats-server");
    assert!(
        path.exists(),
        "nats-server not found at {}: run scripts/setup.sh (or set JETINFER_NATS_SERVER)",
        path.display()
    );
    path
}

/// The workspace root, found from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate lives in the workspace")
        .to_path_buf()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

impl NatsServer {
    /// Starts a JetStream-enabled server on a free loopback port.
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Starts a server with extra command-line arguments (e.g. `-c config`).
    pub fn start_with_args(extra: &[&str]) -> Self {
        let store = tempfile::tempdir().expect("temp store dir");
        let port = free_port();
        let child = spawn(port, store.path(), extra);
        let server = Self { child, port, store };
        server.wait_ready();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Stops the server hard (SIGKILL) and starts it again on the same port
    /// and store, as after a crash.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.port, self.store.path(), &[]);
        self.wait_ready();
    }

    /// Stops the server with SIGTERM (a clean shutdown), waits for it to
    /// exit, and starts it again on the same port and store.
    pub fn restart_gracefully(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.child = spawn(self.port, self.store.path(), &[]);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < START_TIMEOUT,
                "nats-server did not accept connections on port {} within {START_TIMEOUT:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn(port: u16, store: &Path, extra: &[&str]) -> Child {
    Command::new(server_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning nats-server")
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JetStream cluster of real nats-server processes on loopback, for
/// failover tests.
pub struct NatsCluster {
    nodes: Vec<Option<Child>>,
    names: Vec<String>,
    client_ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` nodes, routed to each other, each with its own store.
    pub fn start(size: usize) -> Self {
        let dir = tempfile::tempdir().expect("cluster dir");
        let client_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let names: Vec<String> = (0..size).map(|i| format!("n{i}")).collect();
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..size {
            let store = dir.path().join(&names[i]);
            let config = format!(
                "server_name: {name}\nlisten: \"127.0.0.1:{client}\"\njetstream {{ store_dir: \"{store}\" }}\n\
                 cluster {{ name: jetinfer-test\n listen: \"127.0.0.1:{route}\"\n routes: [{routes}] }}\n",
                name = names[i],
                client = client_ports[i],
                store = store.display(),
                route = route_ports[i],
                routes = routes.join(", "),
            );
            let path = dir.path().join(format!("{}.conf", names[i]));
            std::fs::write(&path, config).expect("writing node config");
            let child = Command::new(server_binary())
                .arg("-c")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawning nats-server node");
            nodes.push(Some(child));
        }
        let cluster = Self {
            nodes,
            names,
            client_ports,
            dir,
        };
        for &port in &cluster.client_ports {
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    started.elapsed() < START_TIMEOUT,
                    "cluster node on {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cluster
    }

    /// Client URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    /// SIGKILLs the node named `name` (as reported in a stream's cluster info).
    pub fn kill(&mut self, name: &str) {
        let index = self
            .names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no node named {name}"));
        if let Some(mut child) = self.nodes[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
