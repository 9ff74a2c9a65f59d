//! `jetinfer dlq list` prints one line per dead letter, whatever text the
//! letter carries: a letter's fields came off the wire, so a line break or
//! a terminal escape in them is printed escaped, never raw (it could forge
//! a line an operator or a script reads, or drive the operator's terminal).

use std::process::Command;

use bytes::Bytes;
use jetinfer_nats::dead_letter;
use jetinfer_nats::testing::NatsServer;

#[tokio::test]
async fn dlq_list_prints_each_letter_on_one_line_with_hostile_text_escaped() {
    let server = NatsServer::start();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    dead_letter::provision(&js, 1).await.unwrap();
    // Written raw, as a writer other than this release's worker could (an
    // older worker, an operator's tool): `dead_letter::publish` would
    // replace the control characters itself.
    for (job_id, reason, detail) in [
        ("job-1", "invalid_job", "forged\t2\tjob-x\tok"),
        (
            "job-2\u{1b}[2J",
            "internal\u{1b}]0;owned\u{7}",
            "rings\u{7}",
        ),
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(dead_letter::JOB_ID, job_id);
        headers.insert(dead_letter::REASON, reason);
        headers.insert(dead_letter::DETAIL, detail);
        headers.insert(dead_letter::ORIGINAL_SUBJECT, "jobs.minilm.default");
        headers.insert(dead_letter::DELIVERIES, "1");
        js.publish_with_headers("dlq.minilm.default", headers, Bytes::from_static(b"x"))
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let out = Command::new(env!("CARGO_BIN_EXE_jetinfer"))
        .args(["--nats-url", &server.url(), "--timeout", "5", "dlq", "list"])
        .env_remove("JETINFER_NATS_URL")
        .env_remove("JETINFER_NATS_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one line per letter: {stdout:?}");
    assert!(
        !stdout.contains('\u{1b}') && !stdout.contains('\u{7}'),
        "no raw control character reaches the terminal: {stdout:?}"
    );
    let fields: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(
        fields.len(),
        7,
        "a tab in a field cannot add a column: {:?}",
        lines[0]
    );
    assert!(lines[0].contains("forged\\u{9}2\\u{9}job-x"), "{stdout:?}");
    assert!(lines[1].contains("job-2\\u{1b}[2J"), "{stdout:?}");
}
