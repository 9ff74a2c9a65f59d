//! `jetinfer bulk` end to end: a real nats-server, a real worker (echo
//! backend) in this process, and the submitter as the real `jetinfer` binary
//! (killed and resumed) or through the library.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jetinfer_nats::testing::NatsServer;
use jetinfer_nats::NatsConfig;
use jetinfer_producer::bulk::{self, ProgressMode, SubmitOptions, Summary};
use jetinfer_producer::ClientConfig;
use jetinfer_worker::backend::echo::{EchoBackend, ECHO_MAX_SEQ_LEN};
use jetinfer_worker::backend::Backend;
use jetinfer_worker::config::{BackendKind, WorkerConfig};
use jetinfer_worker::Worker;
use serde_json::Value;

fn nats(server: &NatsServer) -> NatsConfig {
    NatsConfig {
        urls: vec![server.url()],
        startup_retry_for: Duration::from_secs(5),
        ..NatsConfig::default()
    }
}

fn client_config(server: &NatsServer) -> ClientConfig {
    ClientConfig {
        nats: nats(server),
        ..ClientConfig::default()
    }
}

/// A worker on the echo backend, `delay` of simulated compute per token.
async fn start_worker(server: &NatsServer, delay: Duration, dedup: Option<Duration>) -> Worker {
    let mut config = WorkerConfig {
        nats: nats(server),
        ..WorkerConfig::default()
    };
    config.model.backend = BackendKind::Echo;
    if let Some(window) = dedup {
        config.stream.duplicate_window = window;
    }
    let backend: Arc<dyn Backend> = Arc::new(EchoBackend::new(ECHO_MAX_SEQ_LEN, delay));
    Worker::start(config, backend).await.expect("worker starts")
}

fn text(i: usize) -> String {
    format!("document number {i} about topic {} and more", i % 97)
}

fn write_input(path: &Path, lines: usize) {
    let body: String = (0..lines)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"custom_id": format!("doc-{i}"), "text": text(i)})
            )
        })
        .collect();
    std::fs::write(path, body).unwrap();
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every written line is JSON"))
        .collect()
}

fn complete_lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

fn options(dir: &Path, run: Option<&str>) -> SubmitOptions {
    SubmitOptions {
        input: dir.join("in.jsonl"),
        output: dir.join("out.jsonl"),
        errors: None,
        run_id: run.map(str::to_string),
        model: "minilm".into(),
        in_flight: 1000,
        progress: ProgressMode::Off,
    }
}

/// The unit vector the echo backend gives for `text`.
fn expected(text: &str) -> Vec<f32> {
    let mut v = EchoBackend::default().expected(text);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Results stored on the run's inbox: one per computation of a job.
async fn stored_results(server: &NatsServer, run: &str) -> u64 {
    let client = jetinfer_nats::connect(&nats(server)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let tenant = jetinfer_nats::Tenant::new("default").unwrap();
    let inbox = jetinfer_nats::subjects::bulk_inbox(&tenant, run).unwrap();
    let stream = js
        .get_stream(jetinfer_nats::subjects::RESULTS_STREAM)
        .await
        .unwrap();
    let info = stream.info_with_subjects(&inbox).await.unwrap();
    use futures::TryStreamExt;
    let counts: Vec<(String, usize)> = info.try_collect().await.unwrap();
    counts.into_iter().map(|(_, n)| n as u64).sum()
}

async fn jobs_queued(server: &NatsServer) -> u64 {
    let client = jetinfer_nats::connect(&nats(server)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("JETINFER_JOBS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_submitter_resumes_without_recomputing_finished_jobs() {
    const LINES: usize = 10_000;
    let server = NatsServer::start();
    // A one-second duplicate window, waited out before resuming: JetStream's
    // de-duplication cannot hide a resubmitted finished job; only the
    // resume logic can avoid recomputing it.
    let dedup = Duration::from_secs(1);
    let worker = start_worker(&server, Duration::from_micros(150), Some(dedup)).await;
    let dir = tempfile::tempdir().unwrap();
    write_input(&dir.path().join("in.jsonl"), LINES);
    let out = dir.path().join("out.jsonl");
    let submit = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_jetinfer"));
        command
            .args(["--nats-url", &server.url(), "bulk", "submit", "--input"])
            .arg(dir.path().join("in.jsonl"))
            .arg("--output")
            .arg(&out)
            .args([
                "--in-flight",
                "256",
                "--progress",
                "lines",
                "--progress-every",
                "1",
            ]);
        command
    };

    let mut first = submit()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let waiting = Instant::now();
    while complete_lines(&out) < LINES / 5 {
        assert!(waiting.elapsed() < Duration::from_secs(120), "no progress");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the submitter ended early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap(); // SIGKILL: no flush, no goodbye
    first.wait().unwrap();
    let at_kill = complete_lines(&out);
    assert!(at_kill < LINES, "killed after the end");

    // Jobs published before the kill are finished while no submitter runs.
    let waiting = Instant::now();
    while jobs_queued(&server).await > 0 {
        assert!(
            waiting.elapsed() < Duration::from_secs(120),
            "queue not drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(dedup * 2).await;

    let resumed = submit().output().unwrap();
    assert!(
        resumed.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let summary: Summary = serde_json::from_slice(&resumed.stdout).unwrap();
    let run = std::fs::read_to_string(bulk::state_path(&out)).unwrap();
    let run: Value = serde_json::from_str(&run).unwrap();
    let run = run["run_id"].as_str().unwrap().to_string();
    assert_eq!(summary.run, run);
    assert!(summary.already_done as usize >= at_kill);
    assert!(
        summary.recovered > 0,
        "results finished while the submitter was down come from the stream: {summary:?}"
    );
    assert_eq!(
        summary.submitted,
        LINES as u64 - summary.already_done - summary.recovered,
        "only lines without a result are submitted again"
    );
    assert_eq!(
        (summary.ok, summary.failed, summary.refused),
        (LINES as u64, 0, 0)
    );

    let lines = read_lines(&out);
    assert_eq!(lines.len(), LINES, "one output line per input line");
    let mut ids = HashSet::new();
    for line in &lines {
        let id = line["custom_id"].as_str().unwrap();
        assert!(ids.insert(id.to_string()), "{id} written twice");
        let i: usize = id.strip_prefix("doc-").unwrap().parse().unwrap();
        let got: Vec<f32> = serde_json::from_value(line["embeddings"][0].clone()).unwrap();
        let want = expected(&text(i));
        assert!(
            got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
            "{id} carries another text's vector"
        );
    }
    assert_eq!(ids.len(), LINES);
    assert!(read_lines(&bulk::errors_path(&out)).is_empty());
    assert_eq!(
        stored_results(&server, &run).await,
        LINES as u64,
        "every job computed exactly once: none finished before the kill ran again"
    );
    let status = bulk::status(&client_config(&server), &run).await.unwrap();
    assert_eq!(
        (status.done, status.failed, status.queued),
        (LINES as u64, 0, Some(0))
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_jobs_and_status_counts_each_state() {
    const LINES: usize = 300;
    let server = NatsServer::start();
    // ~40 ms of compute per job: the queue is long when the cancel comes.
    let worker = start_worker(&server, Duration::from_millis(5), None).await;
    let dir = tempfile::tempdir().unwrap();
    write_input(&dir.path().join("in.jsonl"), LINES);
    let config = client_config(&server);
    let run = "cancel-me";
    let submitting = tokio::spawn({
        let (config, options) = (config.clone(), options(dir.path(), Some(run)));
        async move { bulk::submit(&config, options).await }
    });

    let waiting = Instant::now();
    let before = loop {
        let status = bulk::status(&config, run).await.unwrap();
        if status.done >= 8 && status.queued.is_some_and(|q| q > 0) {
            break status;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "no progress: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(before.failed + before.cancelled_jobs, 0);
    let at_cancel = bulk::cancel(&config, run).await.unwrap();
    assert!(at_cancel.cancelled);

    let summary = tokio::time::timeout(Duration::from_secs(60), submitting)
        .await
        .expect("the submitter ends once its jobs are answered")
        .unwrap()
        .unwrap();
    assert!(summary.cancelled);
    let out = dir.path().join("out.jsonl");
    let done = read_lines(&out);
    let errors = read_lines(&bulk::errors_path(&out));
    assert!(
        errors.iter().all(|e| e["error"]["code"] == "cancelled"),
        "{errors:?}"
    );
    assert_eq!(
        done.len() + errors.len(),
        LINES,
        "every line ends in one file"
    );
    assert!(
        errors.len() > LINES / 2,
        "most queued jobs were not computed: {} cancelled",
        errors.len()
    );

    let after = bulk::status(&config, run).await.unwrap();
    assert!(after.cancelled);
    assert_eq!(after.done as usize, done.len());
    assert_eq!(after.cancelled_jobs as usize, errors.len());
    assert_eq!((after.failed, after.queued), (0, Some(0)));

    // A cancelled run is not resumed by accident.
    let again = bulk::submit(&config, options(dir.path(), None)).await;
    assert!(matches!(again, Err(bulk::BulkError::Cancelled(r)) if r == run));
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_lines_go_to_the_error_file_with_their_line_number() {
    let server = NatsServer::start();
    let worker = start_worker(&server, Duration::ZERO, None).await;
    let dir = tempfile::tempdir().unwrap();
    let input = [
        r#"{"custom_id": "a", "text": "first good line"}"#,
        r#"{"custom_id": "b", "text": "#,
        r#"{"text": "no id"}"#,
        "",
        r#"{"custom_id": "a", "text": "same id again"}"#,
        r#"{"custom_id": "c", "texts": []}"#,
        r#"{"custom_id": "d", "text": "for a model nobody serves", "model": "nosuch"}"#,
        r#"{"custom_id": "e", "texts": ["second", "good line"], "options": {"normalize": false}}"#,
    ];
    std::fs::write(dir.path().join("in.jsonl"), input.join("\n")).unwrap();
    let config = client_config(&server);

    let summary = bulk::submit(&config, options(dir.path(), None))
        .await
        .unwrap();
    assert_eq!((summary.ok, summary.failed, summary.refused), (2, 0, 5));
    let out = dir.path().join("out.jsonl");
    let ok: Vec<String> = read_lines(&out)
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        HashSet::<String>::from_iter(ok),
        HashSet::from(["a".into(), "e".into()])
    );
    let errors = read_lines(&bulk::errors_path(&out));
    let refused: Vec<(u64, &str)> = errors
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["error"]["message"].as_str().unwrap(),
            )
        })
        .collect();
    let numbers: Vec<u64> = refused.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [2, 3, 5, 6, 7]);
    for (line, message) in &refused {
        assert!(message.starts_with(&format!("line {line}: ")), "{message}");
    }
    assert!(refused[0].1.contains("not valid JSON"));
    assert!(refused[1].1.contains("custom_id"));
    assert!(refused[2].1.contains("duplicate custom_id \"a\""));
    assert!(refused[3].1.contains("empty"));
    assert!(refused[4].1.contains("nosuch"));
    assert_eq!(errors[4]["error"]["code"], "unknown_model");

    // Running it again changes nothing and writes nothing twice.
    let again = bulk::submit(&config, options(dir.path(), None))
        .await
        .unwrap();
    assert_eq!(
        (again.submitted, again.already_done, again.refused),
        (0, 2, 5)
    );
    assert_eq!(read_lines(&out).len(), 2);
    assert_eq!(read_lines(&bulk::errors_path(&out)).len(), 5);
    worker.shutdown().await;
}
