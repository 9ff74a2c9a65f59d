//! Hostile headers (issue 15: F1, the header half of F5, F11) on real
//! nats-server processes. The jobs tests are run as tenant acme under the
//! shipped secure configuration (`Secured`), against a worker with the echo
//! backend in this process. A hostile publisher needs no special client: the
//! server forwards a header block verbatim, so a raw `HPUB` over a plain TCP
//! session (INFO, the nonce signed with the tenant's NKey seed, CONNECT)
//! carries any bytes it likes.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use base64::Engine as _;
use futures::StreamExt;
use jetinfer_nats::dead_letter;
use jetinfer_nats::testing::NatsServer;
use jetinfer_nats::{Auth, NatsConfig};
use jetinfer_producer::{Client, ClientConfig};
use jetinfer_schemas::{
    decode_result, encode_job, escape_for_log, headers, ErrorCode, Job, JobError, JobResult,
};
use jetinfer_worker::backend::echo::EchoBackend;
use jetinfer_worker::config::{BackendKind, BatchConfig};
use jetinfer_worker::Worker;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use common::secured::Secured;
use common::*;

/// Longest a test waits for something that should happen in milliseconds.
const PATIENCE: Duration = Duration::from_secs(30);
/// The inbox acme's hostile jobs ask to be answered on.
const REPLIES: &str = "results.acme.hostile";

/// A worker for model minilm under the shipped config, and acme's producer
/// (whose connecting provisions what acme needs).
async fn worker_and_acme(secured: &Secured) -> (Worker, Client) {
    let config = secured.worker_config(BackendKind::Echo, BatchConfig::default());
    let worker = start_worker(config, Arc::new(EchoBackend::new(256, Duration::ZERO))).await;
    let acme = Client::connect(ClientConfig {
        nats: secured.nats("acme"),
        tenant: "acme".into(),
        timeout: PATIENCE,
        ..ClientConfig::default()
    })
    .await
    .expect("acme's producer connects");
    (worker, acme)
}

/// A job for minilm with id `id`, encoded.
fn job(id: &str) -> Vec<u8> {
    encode_job(&Job::new("minilm", vec!["hello".into()]).with_id(id))
}

/// A plain TCP session speaking the NATS client protocol by hand, as a
/// hostile publisher would.
struct RawSession {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    inbox: String,
    sent: u64,
}

impl RawSession {
    /// Connects as the user of `nats` (its NKey seed file signs the
    /// server's nonce), with headers enabled.
    async fn connect(nats: &NatsConfig) -> Self {
        let url = &nats.urls[0];
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let (read, writer) = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap()
            .into_split();
        let mut session = Self {
            reader: BufReader::new(read),
            writer,
            inbox: format!("{}.raw", nats.inbox_prefix),
            sent: 0,
        };
        let info = session.line().await;
        let info: serde_json::Value =
            serde_json::from_str(info.strip_prefix("INFO ").expect("INFO first")).unwrap();
        let mut connect = serde_json::json!({
            "verbose": false, "pedantic": false, "lang": "raw", "version": "0",
            "protocol": 1, "headers": true, "no_responders": true, "name": "hostile-raw",
        });
        if let Auth::Nkey { seed_file } = &nats.auth {
            let seed = std::fs::read_to_string(seed_file).unwrap();
            let key = nkeys::KeyPair::from_seed(seed.trim()).unwrap();
            let nonce = info["nonce"].as_str().expect("the server sends a nonce");
            let sig = key.sign(nonce.as_bytes()).unwrap();
            connect["nkey"] = key.public_key().into();
            connect["sig"] = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sig)
                .into();
        }
        let hello = format!("CONNECT {connect}\r\nSUB {}.> 1\r\nPING\r\n", session.inbox);
        session.send(hello.as_bytes()).await;
        loop {
            match session.line().await.as_str() {
                "PONG" => break,
                "+OK" => {}
                other if other.starts_with("INFO") => {}
                other => panic!("the server refused the raw session: {other}"),
            }
        }
        session
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// The next protocol line, without its CRLF; answers the server's PINGs.
    async fn line(&mut self) -> String {
        loop {
            let mut line = Vec::new();
            let read = tokio::time::timeout(PATIENCE, self.reader.read_until(b'\n', &mut line))
                .await
                .expect("the server answers")
                .unwrap();
            assert!(read > 0, "the server closed the raw session");
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if line == "PING" {
                self.send(b"PONG\r\n").await;
                continue;
            }
            return line;
        }
    }

    /// Publishes with `header_block` as sent, byte for byte, and returns the
    /// PubAck JetStream sends (or the server's error).
    async fn hpub(&mut self, subject: &str, header_block: &[u8], payload: &[u8]) -> String {
        self.sent += 1;
        let ack = format!("{}.{}", self.inbox, self.sent);
        let mut frame = format!(
            "HPUB {subject} {ack} {} {}\r\n",
            header_block.len(),
            header_block.len() + payload.len()
        )
        .into_bytes();
        frame.extend_from_slice(header_block);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.send(&frame).await;
        loop {
            let line = self.line().await;
            if line.starts_with("-ERR") {
                return line;
            }
            let Some(args) = line.strip_prefix("MSG ") else {
                continue;
            };
            let args: Vec<&str> = args.split(' ').collect();
            let len: usize = args.last().unwrap().parse().unwrap();
            let mut body = vec![0; len + 2];
            self.reader.read_exact(&mut body).await.unwrap();
            if args[0] == ack {
                return String::from_utf8_lossy(&body[..len]).into_owned();
            }
        }
    }

    /// Publishes with no reply subject (core NATS), then waits for the
    /// server's PONG, so the message has been processed.
    async fn hpub_core(&mut self, subject: &str, header_block: &[u8], payload: &[u8]) {
        let mut frame = format!(
            "HPUB {subject} {} {}\r\n",
            header_block.len(),
            header_block.len() + payload.len()
        )
        .into_bytes();
        frame.extend_from_slice(header_block);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\nPING\r\n");
        self.send(&frame).await;
        loop {
            let line = self.line().await;
            assert!(!line.starts_with("-ERR"), "{line}");
            if line == "PONG" {
                return;
            }
        }
    }
}

/// The job results arriving on `sub`, by job id, once `ids` all arrived.
async fn replies_for(
    sub: &mut async_nats::Subscriber,
    ids: &[&str],
) -> std::collections::HashMap<String, JobResult> {
    let mut got = std::collections::HashMap::new();
    let started = Instant::now();
    while !ids.iter().all(|id| got.contains_key(*id)) {
        let left = PATIENCE.saturating_sub(started.elapsed());
        let next = tokio::time::timeout(left, sub.next()).await;
        let Ok(Some(message)) = next else {
            panic!("replies for {:?} of {ids:?} after {PATIENCE:?}", got.keys());
        };
        let result = decode_result(&message.payload).expect("a job result");
        got.insert(result.job_id.clone(), result);
    }
    got
}

/// The dead letters whose job ids are `ids`, once all are stored.
async fn letters_for(js: &jetstream::Context, ids: &[&str]) -> Vec<dead_letter::Stored> {
    letters_where(js, ids.len(), |l| ids.contains(&l.job_id.as_str())).await
}

/// The dead letters `wanted` picks, once there are `count` of them.
async fn letters_where(
    js: &jetstream::Context,
    count: usize,
    wanted: impl Fn(&dead_letter::Stored) -> bool,
) -> Vec<dead_letter::Stored> {
    let started = Instant::now();
    loop {
        let letters: Vec<_> = dead_letter::list(js, 1000)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|l| wanted(l))
            .collect();
        if letters.len() >= count {
            return letters;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{} of {count} dead letters after {PATIENCE:?}",
            letters.len(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_of(result: &JobResult) -> JobError {
    result.clone().into_result().expect_err("an error reply")
}

/// The header block of a job of acme's: its id, its reply subject, then
/// `line` as given and the closing blank line.
fn block_with(id: &str, line: &[u8]) -> Vec<u8> {
    let mut block = format!(
        "NATS/1.0\r\n{}: {id}\r\n{}: {REPLIES}\r\n",
        headers::MSG_ID,
        headers::REPLY_TO
    )
    .into_bytes();
    block.extend_from_slice(line);
    block.extend_from_slice(b"\r\n\r\n");
    block
}

/// F1: one job with a lone CR in a header value (and the other header
/// blocks a raw `HPUB` can carry that are no headers: a lone LF, names
/// outside ASCII 33-126, bytes that are not UTF-8, a line without `:`, a
/// foreign version line) used to stop a worker's connection handler
/// (panic) or drop its connection, on every worker in turn. Now each is
/// refused with `invalid_header` naming what was wrong, answered on its
/// reply subject and dead-lettered on its first delivery, and the same
/// worker answers acme's next job; a trailing lone CR is trimmed like
/// trailing space, so that job is simply served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_a_header_with_a_lone_cr_is_dead_lettered_and_no_worker_loses_its_connection() {
    let secured = Secured::start();
    let (worker, acme) = worker_and_acme(&secured).await;
    let listener = secured.connect("acme").await;
    let mut replies = listener.client.subscribe(REPLIES).await.unwrap();
    listener.client.flush().await.unwrap();

    let refused: [(&str, Vec<u8>, &str); 8] = [
        (
            "f1-lone-cr",
            block_with("f1-lone-cr", b"X-Anything: a\rb"),
            "value of header X-Anything holds a CR or LF: \"a\\rb\"",
        ),
        (
            "f1-lone-lf",
            block_with("f1-lone-lf", b"X-Anything: a\nb"),
            "header line \"b\" has no ':'",
        ),
        (
            "f1-name-space",
            block_with("f1-name-space", b"X Anything: v"),
            "header name \"X Anything\" is not ASCII 33-126",
        ),
        (
            "f1-name-control",
            block_with("f1-name-control", b"X\x01Anything: v"),
            "header name \"X\\u{1}Anything\" is not ASCII 33-126",
        ),
        (
            "f1-name-utf8",
            block_with("f1-name-utf8", "Ünïcode: v".as_bytes()),
            "header name \"\\u{dc}n\\u{ef}code\" is not ASCII 33-126",
        ),
        (
            "f1-not-utf8",
            block_with("f1-not-utf8", b"X-Anything: \xff\xfe"),
            "header block is not valid UTF-8",
        ),
        (
            "f1-no-colon",
            block_with("f1-no-colon", b"garbage"),
            "header line \"garbage\" has no ':'",
        ),
        (
            "f1-version",
            [
                &b"HTTP/1.1\r\n"[..],
                &block_with("f1-version", b"X-Anything: v")[10..],
            ]
            .concat(),
            "version line \"HTTP/1.1\" does not begin with NATS/1.0",
        ),
    ];
    let mut raw = RawSession::connect(&secured.nats("acme")).await;
    for (id, block, _) in &refused {
        let ack = raw.hpub("jobs.minilm.acme", block, &job(id)).await;
        assert!(ack.contains("\"seq\""), "job {id} not stored: {ack}");
    }
    let trailing_cr = "f1-trailing-cr";
    let ack = raw
        .hpub(
            "jobs.minilm.acme",
            &block_with(trailing_cr, b"X-Anything: ab\r"),
            &job(trailing_cr),
        )
        .await;
    assert!(ack.contains("\"seq\""), "{ack}");

    let mut ids: Vec<&str> = refused.iter().map(|(id, _, _)| *id).collect();
    ids.push(trailing_cr);
    let got = replies_for(&mut replies, &ids).await;
    for (id, _, reason) in &refused {
        let error = error_of(&got[*id]);
        assert_eq!(error.code, ErrorCode::InvalidHeader, "{id}: {error:?}");
        assert!(error.message.contains(reason), "{id}: {:?}", error.message);
    }
    let served = got[trailing_cr].clone().into_result().expect("served");
    assert_eq!(served.embeddings.len(), 1);

    let ops = secured.connect("ops").await;
    let letters = letters_for(&ops.js, &ids[..refused.len()]).await;
    for (id, _, reason) in &refused {
        let letter = letters.iter().find(|l| l.job_id == *id).unwrap();
        assert_eq!(letter.reason, "invalid_header", "{id}");
        assert!(letter.detail.contains(reason), "{id}: {:?}", letter.detail);
        assert_eq!(letter.deliveries, 1, "{id} was delivered again");
    }

    // The same worker, still connected, answers acme's next job.
    let result = acme
        .submit(Job::new("minilm", vec!["after the attack".into()]))
        .await
        .expect("acme's next job is answered");
    assert_eq!(result.into_result().unwrap().embeddings.len(), 1);
    assert!(
        worker.health().not_ready().is_empty(),
        "{:?}",
        worker.health().not_ready()
    );
    let mut stream = ops.js.get_stream("JETINFER_JOBS").await.unwrap();
    assert_eq!(settled_state(&mut stream, "worker-minilm").await, (0, 0));
    worker.shutdown().await;
}

/// F5 (the header half) and header screening: header values over their
/// limits (a 60 kB `Jetinfer-Bulk-Run`, a 200-byte `Nats-Msg-Id`, 5 kB of
/// headers in all), control characters in a value, a repeated header
/// jetinfer reads and a run id that is no run id are refused before
/// anything else is read: `invalid_header` replies and dead letters with a
/// short reason naming the header, each on its first delivery, and the
/// worker serves acme's next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_header_values_are_refused_with_a_short_reason_naming_the_header() {
    let secured = Secured::start();
    let (worker, acme) = worker_and_acme(&secured).await;
    let listener = secured.connect("acme").await;
    let mut replies = listener.client.subscribe(REPLIES).await.unwrap();
    listener.client.flush().await.unwrap();

    let long_id = "i".repeat(200);
    type Extra = Vec<(&'static str, String)>;
    let cases: Vec<(&str, Extra, String)> = vec![
        (
            "f5-long-run",
            vec![(headers::BULK_RUN, "r".repeat(60_000))],
            format!(
                "header {} is 60000 bytes, the limit is 26",
                headers::BULK_RUN
            ),
        ),
        (
            "f5-bad-run",
            vec![(headers::BULK_RUN, "a.b".into())],
            format!("header {} is not a run id", headers::BULK_RUN),
        ),
        (
            "f5-two-runs",
            vec![
                (headers::BULK_RUN, "one".into()),
                (headers::BULK_RUN, "two".into()),
            ],
            format!("header {} appears 2 times", headers::BULK_RUN),
        ),
        (
            "f5-padding",
            vec![("X-Padding", "p".repeat(5_000))],
            "the headers take".to_string(),
        ),
        (
            "f5-escape",
            vec![("X-Evil", "\u{1b}[2J".into())],
            "header X-Evil holds control character \\u{1b}".to_string(),
        ),
    ];
    for (id, extra, _) in &cases {
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::MSG_ID, *id);
        map.insert(headers::REPLY_TO, REPLIES);
        for (name, value) in extra {
            map.append(*name, value.as_str());
        }
        listener
            .js
            .publish_with_headers("jobs.minilm.acme", map, job(id).into())
            .await
            .unwrap()
            .await
            .expect("stored");
    }
    // A job id over the limit cannot be answered by id: it is answered with
    // an empty one.
    let mut map = async_nats::HeaderMap::new();
    map.insert(headers::MSG_ID, long_id.as_str());
    map.insert(headers::REPLY_TO, REPLIES);
    listener
        .js
        .publish_with_headers("jobs.minilm.acme", map, job("f5-long-id").into())
        .await
        .unwrap()
        .await
        .expect("stored");

    let mut ids: Vec<&str> = cases.iter().map(|(id, _, _)| *id).collect();
    ids.push("");
    let got = replies_for(&mut replies, &ids).await;
    for (id, _, reason) in &cases {
        let error = error_of(&got[*id]);
        assert_eq!(error.code, ErrorCode::InvalidHeader, "{id}: {error:?}");
        assert!(error.message.contains(reason), "{id}: {:?}", error.message);
        assert!(error.message.len() < 200, "{id}: {:?}", error.message);
    }
    let error = error_of(&got[""]);
    assert!(
        error.message.contains(&format!(
            "header Nats-Msg-Id is 200 bytes, the limit is {}",
            jetinfer_schemas::headers::MAX_MSG_ID_LEN
        )),
        "{:?}",
        error.message
    );

    let ops = secured.connect("ops").await;
    let letters = letters_for(&ops.js, &ids[..cases.len()]).await;
    for (id, _, reason) in &cases {
        let letter = letters.iter().find(|l| l.job_id == *id).unwrap();
        assert_eq!(letter.reason, "invalid_header", "{id}");
        assert!(letter.detail.contains(reason), "{id}: {:?}", letter.detail);
        assert!(letter.detail.len() < 200, "{id}: {:?}", letter.detail);
        assert_eq!(letter.deliveries, 1, "{id}");
    }
    // The id it cannot keep is kept only escaped and cut short.
    let long = letters_where(&ops.js, 1, |l| l.detail.contains("Nats-Msg-Id is 200")).await;
    assert_eq!(long[0].reason, "invalid_header");
    assert!(long[0].job_id.len() < long_id.len(), "{:?}", long[0].job_id);

    let result = acme
        .submit(Job::new("minilm", vec!["still served".into()]))
        .await
        .expect("acme's next job is answered");
    assert_eq!(result.into_result().unwrap().embeddings.len(), 1);
    let mut stream = ops.js.get_stream("JETINFER_JOBS").await.unwrap();
    assert_eq!(settled_state(&mut stream, "worker-minilm").await, (0, 0));
    worker.shutdown().await;
}

/// Log output captured from the worker's own log layers.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// This process's log, in the worker's text and JSON formats at once (the
/// binary writes one of them, `log.json`, through the same layers).
fn captured_logs() -> &'static (Capture, Capture) {
    static LOGS: OnceLock<(Capture, Capture)> = OnceLock::new();
    LOGS.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        let (text, json) = (Capture::default(), Capture::default());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("debug"))
            .with(jetinfer_worker::logging::layer(false, text.clone()))
            .with(jetinfer_worker::logging::layer(true, json.clone()));
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        (text, json)
    })
}

/// The first raw control character in `log` (C0 other than the `\n` that
/// ends each line, DEL, C1), with its line.
fn raw_control(log: &str) -> Option<(char, &str)> {
    log.lines()
        .find_map(|line| line.chars().find(|c| c.is_control()).map(|c| (c, line)))
}

/// Whether `value` holds the string `wanted` anywhere.
fn holds_string(value: &serde_json::Value, wanted: &str) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains(wanted),
        serde_json::Value::Array(items) => items.iter().any(|v| holds_string(v, wanted)),
        serde_json::Value::Object(map) => map.values().any(|v| holds_string(v, wanted)),
        _ => false,
    }
}

/// F11: control characters a publisher puts in `Nats-Msg-Id` (ESC
/// sequences that clear the screen or set a terminal title, backspace,
/// NUL, DEL, C1), in the bulk-run header, in the reply subject and in the
/// payload's job id (with a newline that would start a forged line) reach
/// the worker's log only escaped, in the text and in the JSON format: no
/// raw control byte in either, every JSON line parses, and the values show
/// in the escaped form of `escape_for_log`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_control_characters_from_the_wire_are_escaped_in_logs() {
    let (text, json) = captured_logs();
    let secured = Secured::start();
    let (worker, _acme) = worker_and_acme(&secured).await;
    let listener = secured.connect("acme").await;
    let mut replies = listener.client.subscribe(REPLIES).await.unwrap();
    listener.client.flush().await.unwrap();

    let msg_id = "f11-\u{1b}[2J\u{1b}]0;pwned\u{7}\u{8}\0\u{7f}\u{85}-id";
    let payload_id = "f11-\u{1b}[31mred\nforged line level=ERROR";
    let publish = |msg_id: &str, reply: &str, run: Option<&str>, payload: Vec<u8>| {
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::MSG_ID, msg_id);
        map.insert(headers::REPLY_TO, reply);
        if let Some(run) = run {
            map.insert(headers::BULK_RUN, run);
        }
        let js = listener.js.clone();
        async move {
            js.publish_with_headers("jobs.minilm.acme", map, payload.into())
                .await
                .unwrap()
                .await
                .expect("stored");
        }
    };
    publish(msg_id, REPLIES, None, job("f11-1")).await;
    publish(
        "f11-run",
        REPLIES,
        Some("\u{1b}[2J\u{8}\u{7f}"),
        job("f11-run"),
    )
    .await;
    publish(
        "f11-reply",
        "results.acme.\u{1b}[2J",
        None,
        job("f11-reply"),
    )
    .await;
    publish("f11-payload", REPLIES, None, job(payload_id)).await;

    // The id-less reply is the one for the bad Nats-Msg-Id; the bad
    // payload id is answered with that id.
    replies_for(&mut replies, &["", "f11-run", payload_id]).await;
    let ops = secured.connect("ops").await;
    letters_for(&ops.js, &["f11-reply", "f11-payload", "f11-run"]).await;
    worker.shutdown().await;

    let text = String::from_utf8(text.0.lock().unwrap().clone()).unwrap();
    let json = String::from_utf8(json.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("job refused"), "nothing logged:\n{text}");
    if let Some((c, line)) = raw_control(&text) {
        panic!("raw {c:?} in the text log: {line:?}");
    }
    if let Some((c, line)) = raw_control(&json) {
        panic!("raw {c:?} in the JSON log: {line:?}");
    }
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    for shown in [escape_for_log(msg_id), escape_for_log(payload_id)] {
        assert!(
            text.contains(&shown),
            "{shown} not in the text log:\n{text}"
        );
        assert!(
            lines.iter().any(|line| holds_string(line, &shown)),
            "{shown} not in the JSON log"
        );
    }
    // Escaped where it was logged, not only by the log's last guard.
    for guarded in ["\\x1b", "\\u001b"] {
        let line = text
            .lines()
            .chain(json.lines())
            .find(|l| l.contains(guarded));
        assert!(line.is_none(), "escaped only by the guard: {line:?}");
    }
}

/// Header blocks as a hostile publisher writes them: mostly `NATS/1.0`
/// then lines of names, colons, spaces, lone CRs and LFs, control and
/// non-ASCII bytes, bytes that are not UTF-8; or clean lines, which must
/// arrive as they were sent.
fn header_blocks() -> impl Strategy<Value = (Vec<u8>, Option<Vec<(String, String)>>)> {
    const ATOMS: &[&[u8]] = &[
        b"X-A",
        b"Nats-Msg-Id",
        b"Jetinfer-Reply-To",
        b"v",
        b":",
        b": ",
        b" ",
        b"\t",
        b"\r",
        b"\n",
        b"\r\n",
        b"\0",
        b"\x1b",
        b"\x7f",
        "é".as_bytes(),
        b"\xff",
        b"\xc2\x85",
        b"NATS/1.0",
        b" 503",
        b"Async-Nats-Malformed-Header",
    ];
    let hostile = (
        proptest::bool::weighted(0.9),
        proptest::collection::vec(proptest::sample::select(ATOMS), 0..24),
    )
        .prop_map(|(version, atoms)| {
            let mut block = if version {
                b"NATS/1.0\r\n".to_vec()
            } else {
                Vec::new()
            };
            block.extend(atoms.concat());
            block.extend_from_slice(b"\r\n\r\n");
            (block, None)
        });
    let clean = proptest::collection::vec(
        ("X-[A-Za-z0-9-]{1,12}", "[ -~&&[^ ]]([ -~]{0,30}[!-~])?"),
        1..6,
    )
    .prop_map(|pairs| {
        let mut block = b"NATS/1.0\r\n".to_vec();
        for (name, value) in &pairs {
            block.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        block.extend_from_slice(b"\r\n");
        (block, Some(pairs))
    });
    proptest::prop_oneof![3 => hostile, 1 => clean]
}

/// F1 at the client: whatever header block a publisher sends, the NATS
/// client jetinfer builds with delivers the message on the same connection
/// (no disconnect, none lost, in order), with only valid headers in its
/// map, and a clean block exactly as sent. Generated cases are fixed
/// (deterministic seed), so every run checks the same blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_header_blocks_never_cost_the_client_its_connection() {
    const CASES: usize = 256;
    let server = NatsServer::start();
    let disconnects = Arc::new(Mutex::new(0usize));
    let seen = Arc::clone(&disconnects);
    let client = jetinfer_nats::connect_with_events(&nats_config(&server), move |event| {
        if matches!(event, async_nats::Event::Disconnected) {
            *seen.lock().unwrap() += 1;
        }
    })
    .await
    .unwrap();
    let mut sub = client.subscribe("hostile.headers").await.unwrap();
    client.flush().await.unwrap();

    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategy = header_blocks();
    let cases: Vec<_> = (0..CASES)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();
    let mut raw = RawSession::connect(&nats_config(&server)).await;
    for (i, (block, _)) in cases.iter().enumerate() {
        raw.hpub_core("hostile.headers", block, i.to_string().as_bytes())
            .await;
    }

    for (i, (block, clean)) in cases.iter().enumerate() {
        let message = tokio::time::timeout(PATIENCE, sub.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "message {i} not delivered: {:?}",
                    String::from_utf8_lossy(block)
                )
            })
            .expect("subscription open");
        assert_eq!(
            message.payload,
            i.to_string().as_bytes(),
            "a message lost or out of order"
        );
        let map = message.headers.unwrap_or_default();
        for (name, values) in map.iter() {
            let name: &str = name.as_ref();
            assert!(headers::valid_name(name), "{name:?} from {block:?}");
            for value in values {
                assert!(
                    !value.as_str().contains(['\r', '\n']),
                    "{value:?} from {block:?}"
                );
            }
        }
        if let Some(pairs) = clean {
            assert!(map.get(headers::MALFORMED).is_none(), "{block:?}: {map:?}");
            for (name, value) in pairs {
                assert!(
                    map.get_all(name.as_str()).any(|v| v.as_str() == value),
                    "{name}: {value:?} lost from {block:?}: {map:?}"
                );
            }
        }
    }
    assert_eq!(
        *disconnects.lock().unwrap(),
        0,
        "the client lost its connection"
    );
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
}
