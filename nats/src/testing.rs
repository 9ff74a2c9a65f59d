//! A real `nats-server` with JetStream for tests: started on a free loopback
//! port with a temporary store directory, stopped (and its store removed) on drop.
//!
//! The binary is `$JETINFER_NATS_SERVER`, or `.cache/bin/nats-server` at the
//! workspace root as installed by `scripts/setup.sh`.

use std::ffi::OsString;
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
    /// Arguments after the port and store ones, kept for restarts.
    extra: Vec<OsString>,
    /// Environment variables the server was started with (a config file may
    /// refer to them as `$NAME`), kept for restarts.
    env: Vec<(OsString, OsString)>,
    /// The rewritten copy of a config file the server was started from.
    _config: Option<tempfile::TempDir>,
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
        Self::launch(extra.iter().map(OsString::from).collect(), Vec::new(), None)
    }

    /// Starts a server from the config file `config` (e.g. a shipped one in
    /// `deploy/nats/`), with `env` set for the `$NAME` variables it refers
    /// to. The command line overrides the file's listen address (a free
    /// loopback port), store directory (a temporary one) and monitoring port
    /// (another free one), so tests can run side by side. nats-server refuses
    /// a store directory given both in the file and on the command line, so
    /// the server runs from copies of the file and of the files it includes,
    /// without their `store_dir` lines.
    pub fn start_with_config(config: &Path, env: &[(&str, &str)]) -> Self {
        let dir = config.parent().unwrap_or(Path::new("."));
        let name = Path::new(config.file_name().expect("a config file name"));
        let copy_dir = tempfile::tempdir().expect("temp config dir");
        copy_config_for_test(dir, name, copy_dir.path());
        let copy = copy_dir.path().join(name);
        let extra = vec![
            OsString::from("-c"),
            copy.into_os_string(),
            OsString::from("-m"),
            OsString::from(free_port().to_string()),
        ];
        let env = env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        Self::launch(extra, env, Some(copy_dir))
    }

    fn launch(
        extra: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        config: Option<tempfile::TempDir>,
    ) -> Self {
        let store = tempfile::tempdir().expect("temp store dir");
        let port = free_port();
        let child = spawn(port, store.path(), &extra, &env);
        let mut server = Self {
            child,
            port,
            store,
            extra,
            env,
            _config: config,
        };
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

    /// What the server has logged so far (its standard error).
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(self.store.path())).unwrap_or_default()
    }

    /// Where the server's copy of its config files is (for
    /// [`NatsServer::start_with_config`]): a test changes the config the
    /// server reloads there.
    pub fn config_dir(&self) -> Option<&Path> {
        self._config.as_ref().map(|dir| dir.path())
    }

    /// Asks the server to read its config file again (SIGHUP, as
    /// `nats-server --signal reload` does); clients stay connected.
    pub fn reload(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGHUP sent to nats-server");
    }

    /// Stops the server hard (SIGKILL) and starts it again on the same port
    /// and store, as after a crash.
    pub fn restart(&mut self) {
        self.kill();
        self.resume();
    }

    /// Stops the server hard (SIGKILL), keeping its port and store for
    /// [`NatsServer::resume`]: clients see it gone until then.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed server again on the same port and store.
    pub fn resume(&mut self) {
        self.child = spawn(self.port, self.store.path(), &self.extra, &self.env);
        self.wait_ready();
    }

    /// Stops the server with SIGTERM (a clean shutdown), waits for it to
    /// exit, and starts it again on the same port and store.
    pub fn restart_gracefully(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.child = spawn(self.port, self.store.path(), &self.extra, &self.env);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nats-server exited ({status}) before accepting connections:\n{}",
                    self.log()
                );
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "nats-server did not accept connections on port {} within {START_TIMEOUT:?}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn log_path(store: &Path) -> PathBuf {
    store.join("nats-server.log")
}

/// Speaks the NATS protocol in plain text to the server on `port`, as a
/// client without TLS would (connect, ping, publish): returns everything the
/// server sent before it closed the connection. A TLS-only server sends its
/// greeting and then hangs up without ever answering.
pub fn plain_text_session(port: u16) -> String {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // The greeting (INFO) comes first, in plain text.
    let n = socket.read(&mut buf).unwrap();
    received.extend_from_slice(&buf[..n]);
    let _ = socket
        .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\nSUB x 1\r\nPUB x 2\r\nhi\r\nPING\r\n");
    loop {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Copies the nats-server config `name` from `from` into `to`, without its
/// `store_dir` lines, and likewise every file it includes. nats-server reads
/// an `include` relative to the including file, so the copies keep their
/// relative names.
fn copy_config_for_test(from: &Path, name: &Path, to: &Path) {
    let source = from.join(name);
    let text = std::fs::read_to_string(&source)
        .unwrap_or_else(|e| panic!("reading {}: {e}", source.display()));
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start();
        let key = trimmed
            .split(|c: char| c == ':' || c == '=' || c.is_whitespace())
            .next()
            .unwrap_or("");
        if matches!(key, "store_dir" | "storedir") {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("include ") {
            let include = rest.trim().trim_end_matches(';').trim_matches(['"', '\'']);
            copy_config_for_test(from, Path::new(include), to);
        }
        out.push_str(line);
        out.push('\n');
    }
    let target = to.join(name);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).expect("creating the config copy's directory");
    }
    std::fs::write(&target, out).expect("writing the config copy");
}

fn spawn(port: u16, store: &Path, extra: &[OsString], env: &[(OsString, OsString)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(store))
        .expect("opening the nats-server log");
    Command::new(server_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log)
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
            let path = node_config(dir.path(), &names[i]);
            std::fs::write(&path, config).expect("writing node config");
            nodes.push(Some(spawn_node(&path)));
        }
        let cluster = Self {
            nodes,
            names,
            client_ports,
            dir,
        };
        for &port in &cluster.client_ports {
            wait_for_node(port);
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
        let index = self.index(name);
        if let Some(mut child) = self.nodes[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the killed node `name` again on its port and store; it
    /// rejoins the cluster and catches up.
    pub fn resume(&mut self, name: &str) {
        let index = self.index(name);
        if self.nodes[index].is_none() {
            self.nodes[index] = Some(spawn_node(&node_config(self.dir.path(), name)));
            wait_for_node(self.client_ports[index]);
        }
    }

    fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn node_config(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.conf"))
}

fn spawn_node(config: &Path) -> Child {
    Command::new(server_binary())
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning nats-server node")
}

fn wait_for_node(port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < START_TIMEOUT,
            "cluster node on {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
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

/// A throwaway certificate authority with a server certificate for
/// 127.0.0.1/localhost and a client certificate, written as PEM files into a
/// temporary directory: for TLS and mutual-TLS tests against a real server.
pub struct TestPki {
    dir: tempfile::TempDir,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// A new CA and its two leaf certificates, valid from now on.
    pub fn generate() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().expect("pki dir");
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("writing a test certificate");
            path
        };

        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.distinguished_name
            .push(DnType::CommonName, "jetinfer test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
            .expect("self-signing the CA");

        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let mut params = CertificateParams::new(names).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &ca).expect("signing a leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "nats-server",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["jetinfer-worker".into()],
            "jetinfer-worker",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Self {
            ca_cert: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server-key.pem", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client-key.pem", client_key),
            dir,
        }
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
