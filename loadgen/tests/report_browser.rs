//! The HTML report opened in headless Chromium (Debian `chromium`, installed
//! by scripts/deps/chromium.sh): it renders, and each chart is present and
//! carries data points with real coordinates in the DOM the browser built.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jetinfer_loadgen::metrics::WorkerMetrics;
use jetinfer_loadgen::report::{write_files, Report};
use jetinfer_loadgen::scenario::preset;
use jetinfer_loadgen::stats::{JobOutcome, Recorder};

const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest Chromium may take to render the report.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// A report of 20 s of synthetic jobs: a latency wave, some errors.
fn report() -> Report {
    let start = Instant::now();
    let mut r = Recorder::new(start, Duration::from_secs(1));
    for i in 0..400u64 {
        let sent = start + Duration::from_millis(i * 50);
        let latency = Duration::from_millis(20 + (i % 40) * 3 + if i % 97 == 0 { 400 } else { 0 });
        r.sent();
        let outcome = if i % 50 == 7 {
            JobOutcome::Error(if i % 100 == 7 { "timeout" } else { "internal" }.into())
        } else {
            JobOutcome::Ok {
                inputs: 1 + i % 3,
                tokens: 30 + i % 17,
            }
        };
        r.record(sent, sent, sent + latency, outcome);
    }
    Report {
        scenario: preset("light").unwrap(),
        target: "nats://127.0.0.1:4222".into(),
        model: "minilm".into(),
        corpus: "bench_corpus.json".into(),
        started_unix_ms: 0,
        summary: r.summary(),
        thresholds: vec![
            "p95<250ms"
                .parse::<jetinfer_loadgen::Threshold>()
                .unwrap()
                .check(&r.summary()),
            "errors<1%"
                .parse::<jetinfer_loadgen::Threshold>()
                .unwrap()
                .check(&r.summary()),
        ],
        worker: WorkerMetrics::NotAvailable {
            url: "http://127.0.0.1:9464/metrics".into(),
            reason: "connection refused".into(),
        },
    }
}

/// Runs Chromium headless on `args`, killed if it outlives `BROWSER_TIMEOUT`.
fn chromium(profile: &Path, args: &[String]) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} missing: run scripts/deps/chromium.sh (Debian package chromium)"
    );
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromium");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium exited with {status}");
            break;
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {BROWSER_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// Numbers in attribute `name="..."` of every element in `tag`.
fn attribute_values<'a>(dom: &'a str, name: &str) -> Vec<&'a str> {
    let needle = format!(" {name}=\"");
    dom.match_indices(&needle)
        .map(|(i, _)| {
            let rest = &dom[i + needle.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect()
}

/// The part of the DOM inside the `<svg id="...">` element.
fn chart<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("<svg id=\"{id}\""))
        .unwrap_or_else(|| panic!("chart {id} missing from the rendered DOM"));
    let end = dom[start..].find("</svg>").unwrap() + start;
    &dom[start..end]
}

#[test]
fn the_html_report_renders_in_chromium_with_charts_that_carry_data() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_files(&report(), dir.path()).unwrap();
    let url = format!("file://{}", files.html.display());
    let profile = tempfile::tempdir().unwrap();

    let dom = chromium(profile.path(), &["--dump-dom".into(), url.clone()]);

    assert!(dom.contains("jetinfer load test: light"), "page rendered");
    assert!(dom.contains("<table id=\"summary\""));
    assert!(
        dom.contains("FAIL"),
        "the failed errors<1% threshold is shown"
    );
    assert!(
        dom.contains("Not available at"),
        "absent worker metrics are said so"
    );
    for id in [
        "chart-latency",
        "chart-throughput",
        "chart-errors-time",
        "chart-tokens",
    ] {
        let svg = chart(&dom, id);
        let xs: Vec<f64> = attribute_values(svg, "cx")
            .iter()
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(xs.len() >= 20, "{id}: {} points", xs.len());
        assert!(
            xs.windows(2).any(|w| w[0] != w[1]),
            "{id}: points spread over time"
        );
        let paths = attribute_values(svg, "d");
        assert!(
            paths
                .iter()
                .any(|d| d.starts_with('M') && d.matches('L').count() >= 10),
            "{id}: a drawn line"
        );
    }
    for id in ["chart-distribution", "chart-errors"] {
        let heights: Vec<f64> = attribute_values(chart(&dom, id), "height")
            .iter()
            .filter_map(|v| v.parse().ok())
            .collect();
        assert!(heights.iter().any(|&h| h > 1.0), "{id}: bars with height");
    }

    // A screenshot too, to prove it paints; kept when LOADGEN_SCREENSHOT names a path.
    let shot = dir.path().join("report.png");
    chromium(
        profile.path(),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,1600".into(),
            url,
        ],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    if let Some(keep) = std::env::var_os("LOADGEN_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
