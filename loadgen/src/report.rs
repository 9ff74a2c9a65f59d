//! What a run leaves behind: the summary table on stdout, `report.json`,
//! `windows.csv` and a self-contained `report.html` (inline CSS and SVG
//! charts drawn here; no scripts, fonts or anything fetched).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::metrics::WorkerMetrics;
use crate::scenario::Scenario;
use crate::stats::{LatencySummary, Summary};
use crate::threshold::Verdict;

/// Everything known about a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub target: String,
    pub model: String,
    pub corpus: String,
    pub started_unix_ms: u64,
    pub summary: Summary,
    pub thresholds: Vec<Verdict>,
    pub worker: WorkerMetrics,
}

/// The files [`write_files`] produced.
#[derive(Debug, Clone)]
pub struct Files {
    pub json: PathBuf,
    pub csv: PathBuf,
    pub html: PathBuf,
}

/// Writes `report.json`, `windows.csv` and `report.html` into `dir`.
pub fn write_files(report: &Report, dir: &Path) -> std::io::Result<Files> {
    std::fs::create_dir_all(dir)?;
    let files = Files {
        json: dir.join("report.json"),
        csv: dir.join("windows.csv"),
        html: dir.join("report.html"),
    };
    std::fs::write(&files.json, serde_json::to_vec_pretty(report)?)?;
    write_csv(&report.summary, &files.csv)?;
    std::fs::write(&files.html, html(report))?;
    Ok(files)
}

fn write_csv(summary: &Summary, path: &Path) -> std::io::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record([
        "start_s",
        "jobs_ok",
        "errors",
        "jobs_per_s",
        "inputs_per_s",
        "tokens_per_s",
        "p50_ms",
        "p90_ms",
        "p95_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
    ])?;
    for win in &summary.windows {
        let lat = |f: fn(&LatencySummary) -> f64| {
            win.latency
                .as_ref()
                .map(|l| format!("{:.3}", f(l)))
                .unwrap_or_default()
        };
        w.write_record([
            format!("{:.3}", win.start_s),
            win.jobs_ok.to_string(),
            win.errors.to_string(),
            format!("{:.3}", win.jobs_per_s),
            format!("{:.3}", win.inputs_per_s),
            format!("{:.1}", win.tokens_per_s),
            lat(|l| l.p50_ms),
            lat(|l| l.p90_ms),
            lat(|l| l.p95_ms),
            lat(|l| l.p99_ms),
            lat(|l| l.p999_ms),
            lat(|l| l.max_ms),
        ])?;
    }
    w.flush()
}

/// The end-of-run table, as printed on stdout.
pub fn summary_table(report: &Report) -> String {
    let s = &report.summary;
    let l = &s.latency;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {} ({:?} loop) against {} model {}",
        report.scenario.name, report.scenario.mode, report.target, report.model
    );
    let _ = writeln!(
        out,
        "jobs      {} sent, {} ok, {} failed ({:.2}%) in {:.1}s",
        s.jobs_sent,
        s.jobs_ok,
        s.jobs_failed,
        s.error_rate * 100.0,
        s.elapsed_s
    );
    let _ = writeln!(
        out,
        "rate      {:.1} jobs/s  {:.1} inputs/s  {:.0} tokens/s",
        s.jobs_per_s, s.inputs_per_s, s.tokens_per_s
    );
    let _ = writeln!(
        out,
        "latency   {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "min", "p50", "p90", "p95", "p99", "p99.9", "max"
    );
    for (name, x) in [("end-to-end", l), ("from send", &s.service_time)] {
        let _ = writeln!(
            out,
            "{name:<10}{:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            ms(x.min_ms),
            ms(x.p50_ms),
            ms(x.p90_ms),
            ms(x.p95_ms),
            ms(x.p99_ms),
            ms(x.p999_ms),
            ms(x.max_ms)
        );
    }
    if !s.errors_by_kind.is_empty() {
        let kinds: Vec<String> = s
            .errors_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(out, "errors    {}", kinds.join(", "));
    }
    match &report.worker {
        WorkerMetrics::NotRequested => {}
        WorkerMetrics::NotAvailable { url, reason } => {
            let _ = writeln!(out, "worker    metrics not available at {url}: {reason}");
        }
        WorkerMetrics::Available {
            histograms,
            changed,
            ..
        } => {
            for h in histograms {
                let _ = writeln!(
                    out,
                    "worker    {}: {} observations, mean {:.4}",
                    h.series, h.count, h.mean
                );
            }
            for c in changed {
                let _ = writeln!(out, "worker    {}: {:+}", c.series, c.delta);
            }
        }
    }
    for v in &report.thresholds {
        let _ = writeln!(out, "threshold {v}");
    }
    out
}

fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2}s", v / 1000.0)
    } else {
        format!("{v:.1}ms")
    }
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const CHART_W: f64 = 640.0;
const CHART_H: f64 = 240.0;
const PAD_L: f64 = 56.0;
const PAD_R: f64 = 12.0;
const PAD_T: f64 = 12.0;
const PAD_B: f64 = 32.0;
const COLORS: &[&str] = &["#1b6ac9", "#2f9e44", "#e8590c", "#c92a2a", "#7048e8"];

/// A line series: name and (x, y) points.
struct Series<'a> {
    name: &'a str,
    points: Vec<(f64, f64)>,
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

/// An SVG line chart with axes, gridlines, a legend, and a circle per point
/// (each with a tooltip).
fn line_chart(id: &str, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let x_max = nice_max(xs.fold(0.0, f64::max));
    let y_max = nice_max(ys.fold(0.0, f64::max));
    let plot_w = CHART_W - PAD_L - PAD_R;
    let plot_h = CHART_H - PAD_T - PAD_B;
    let sx = |x: f64| PAD_L + x / x_max * plot_w;
    let sy = |y: f64| PAD_T + plot_h - y / y_max * plot_h;
    let mut svg = format!(
        r#"<figure><figcaption>{}</figcaption><svg id="{id}" class="chart" viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{}">"#,
        esc(title),
        esc(title)
    );
    axes(&mut svg, x_max, y_max, x_label, y_label);
    if series.iter().all(|s| s.points.is_empty()) {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" class="empty">no data</text>"#,
            CHART_W / 2.0,
            CHART_H / 2.0
        );
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if s.points.is_empty() {
            continue;
        }
        let d: Vec<String> = s
            .points
            .iter()
            .enumerate()
            .map(|(j, &(x, y))| {
                format!(
                    "{}{:.1},{:.1}",
                    if j == 0 { 'M' } else { 'L' },
                    sx(x),
                    sy(y)
                )
            })
            .collect();
        let _ = write!(
            svg,
            r#"<path class="series" data-series="{}" d="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            esc(s.name),
            d.join(" ")
        );
        for &(x, y) in &s.points {
            let _ = write!(
                svg,
                r#"<circle class="point" cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"><title>{} at {x:.1}s: {y:.2}</title></circle>"#,
                sx(x),
                sy(y),
                esc(s.name)
            );
        }
        let lx = PAD_L + 8.0 + i as f64 * 90.0;
        let _ = write!(
            svg,
            r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}" class="legend">{}</text>"#,
            PAD_T + 2.0,
            lx + 14.0,
            PAD_T + 11.0,
            esc(s.name)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

fn axes(svg: &mut String, x_max: f64, y_max: f64, x_label: &str, y_label: &str) {
    let plot_w = CHART_W - PAD_L - PAD_R;
    let plot_h = CHART_H - PAD_T - PAD_B;
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let y = PAD_T + plot_h - f * plot_h;
        let x = PAD_L + f * plot_w;
        let _ = write!(
            svg,
            r#"<line x1="{PAD_L}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
            PAD_L + plot_w,
            PAD_L - 4.0,
            y + 4.0,
            tick(y_max * f),
        );
        // Bar charts (x_max 0) label their bars instead.
        if x_max > 0.0 {
            let _ = write!(
                svg,
                r#"<text x="{x:.1}" y="{:.1}" class="tick" text-anchor="middle">{}</text>"#,
                PAD_T + plot_h + 14.0,
                tick(x_max * f)
            );
        }
    }
    let _ = write!(
        svg,
        r#"<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{:.1}" class="axis"/><line x1="{PAD_L}" y1="{:.1}" x2="{:.1}" y2="{:.1}" class="axis"/><text x="{:.1}" y="{:.1}" class="label" text-anchor="middle">{}</text><text x="12" y="{:.1}" class="label" transform="rotate(-90 12 {:.1})" text-anchor="middle">{}</text>"#,
        PAD_T + plot_h,
        PAD_T + plot_h,
        PAD_L + plot_w,
        PAD_T + plot_h,
        PAD_L + plot_w / 2.0,
        CHART_H - 4.0,
        esc(x_label),
        PAD_T + plot_h / 2.0,
        PAD_T + plot_h / 2.0,
        esc(y_label)
    );
}

fn tick(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// An SVG bar chart: one bar per (label, value).
fn bar_chart(id: &str, title: &str, y_label: &str, bars: &[(String, f64)]) -> String {
    let y_max = nice_max(bars.iter().map(|b| b.1).fold(0.0, f64::max));
    let plot_w = CHART_W - PAD_L - PAD_R;
    let plot_h = CHART_H - PAD_T - PAD_B;
    let mut svg = format!(
        r#"<figure><figcaption>{}</figcaption><svg id="{id}" class="chart" viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{}">"#,
        esc(title),
        esc(title)
    );
    axes(&mut svg, 0.0, y_max, "", y_label);
    if bars.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" class="empty">none</text>"#,
            CHART_W / 2.0,
            CHART_H / 2.0
        );
    }
    let slot = plot_w / bars.len().max(1) as f64;
    let label_every = (bars.len() / 8).max(1);
    for (i, (label, value)) in bars.iter().enumerate() {
        let h = value / y_max * plot_h;
        let x = PAD_L + i as f64 * slot + slot * 0.1;
        let _ = write!(
            svg,
            r#"<rect class="bar" x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}: {value}</title></rect>"#,
            PAD_T + plot_h - h,
            slot * 0.8,
            COLORS[0],
            esc(label)
        );
        if i % label_every == 0 {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" class="tick" text-anchor="middle">{}</text>"#,
                x + slot * 0.4,
                PAD_T + plot_h + 26.0,
                esc(label)
            );
        }
    }
    svg.push_str("</svg></figure>");
    svg
}

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1360px;color:#1d2126;background:#fafbfc;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde1e6;padding-bottom:.3rem}
.meta{color:#5c6670;font-size:.9rem}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}th,td{padding:.3rem .7rem;border-bottom:1px solid #e6e9ed;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#eef1f4}
.pass{color:#2b8a3e;font-weight:600}.fail{color:#c92a2a;font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:1rem}
figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:.5rem}
figcaption{font-weight:600;font-size:.95rem;margin:.2rem .3rem .4rem}
svg.chart{width:100%;height:auto;display:block}
.grid{stroke:#e9ecef;stroke-width:1}.axis{stroke:#868e96;stroke-width:1}
.tick{font-size:10px;fill:#5c6670}.label{font-size:11px;fill:#343a40}.legend{font-size:11px;fill:#343a40}
.empty{font-size:14px;fill:#868e96;text-anchor:middle}
"#;

/// The self-contained HTML report.
pub fn html(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>jetinfer loadgen: {name}</title><style>{CSS}</style></head><body>
<h1>jetinfer load test: {name}</h1>
<p class="meta">{mode:?} loop against <code>{target}</code>, model <code>{model}</code>, corpus <code>{corpus}</code>; {sent} jobs sent over {elapsed:.1}s; windows of {window}s.</p>"#,
        name = esc(&report.scenario.name),
        mode = report.scenario.mode,
        target = esc(&report.target),
        model = esc(&report.model),
        corpus = esc(&report.corpus),
        sent = s.jobs_sent,
        elapsed = s.elapsed_s,
        window = s.window_s,
    );

    out.push_str("<h2>Summary</h2><table id=\"summary\"><tr><th>jobs ok</th><th>failed</th><th>error rate</th><th>jobs/s</th><th>inputs/s</th><th>tokens/s</th></tr>");
    let _ = write!(
        out,
        "<tr><td>{}</td><td>{}</td><td>{:.2}%</td><td>{:.1}</td><td>{:.1}</td><td>{:.0}</td></tr></table>",
        s.jobs_ok,
        s.jobs_failed,
        s.error_rate * 100.0,
        s.jobs_per_s,
        s.inputs_per_s,
        s.tokens_per_s
    );
    out.push_str("<table id=\"latency\"><tr><th>latency</th><th>min</th><th>mean</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th><th>p99.9</th><th>max</th></tr>");
    for (name, l) in [
        ("end-to-end (from intended start)", &s.latency),
        ("from actual send", &s.service_time),
    ] {
        let _ = write!(
            out,
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ms(l.min_ms),
            ms(l.mean_ms),
            ms(l.p50_ms),
            ms(l.p90_ms),
            ms(l.p95_ms),
            ms(l.p99_ms),
            ms(l.p999_ms),
            ms(l.max_ms)
        );
    }
    out.push_str("</table>");

    if !report.thresholds.is_empty() {
        out.push_str("<h2>Thresholds</h2><table id=\"thresholds\"><tr><th>threshold</th><th>measured</th><th>result</th></tr>");
        for v in &report.thresholds {
            let (class, word) = if v.passed {
                ("pass", "pass")
            } else {
                ("fail", "FAIL")
            };
            let _ = write!(
                out,
                r#"<tr><td>{}</td><td>{}</td><td class="{class}">{word}</td></tr>"#,
                esc(&v.threshold),
                esc(&v.shown)
            );
        }
        out.push_str("</table>");
    }

    out.push_str("<h2>Charts</h2><div class=\"charts\">");
    let windows = &s.windows;
    let pick = |f: fn(&LatencySummary) -> f64| -> Vec<(f64, f64)> {
        windows
            .iter()
            .filter_map(|w| w.latency.as_ref().map(|l| (w.start_s + s.window_s, f(l))))
            .collect()
    };
    out.push_str(&line_chart(
        "chart-latency",
        "Latency percentiles over time",
        "seconds into the run",
        "ms",
        &[
            Series {
                name: "p50",
                points: pick(|l| l.p50_ms),
            },
            Series {
                name: "p90",
                points: pick(|l| l.p90_ms),
            },
            Series {
                name: "p99",
                points: pick(|l| l.p99_ms),
            },
            Series {
                name: "max",
                points: pick(|l| l.max_ms),
            },
        ],
    ));
    let rate = |f: fn(&crate::stats::WindowSummary) -> f64| -> Vec<(f64, f64)> {
        windows
            .iter()
            .map(|w| (w.start_s + s.window_s, f(w)))
            .collect()
    };
    out.push_str(&line_chart(
        "chart-throughput",
        "Throughput over time",
        "seconds into the run",
        "per second",
        &[
            Series {
                name: "jobs/s",
                points: rate(|w| w.jobs_per_s),
            },
            Series {
                name: "inputs/s",
                points: rate(|w| w.inputs_per_s),
            },
        ],
    ));
    let buckets: Vec<(String, f64)> = s
        .distribution
        .iter()
        .map(|b| (ms(b.to_ms), b.count as f64))
        .collect();
    out.push_str(&bar_chart(
        "chart-distribution",
        "Latency distribution (jobs per latency bucket, log-spaced, upper bound shown)",
        "jobs",
        &buckets,
    ));
    let errors: Vec<(String, f64)> = s
        .errors_by_kind
        .iter()
        .map(|(k, &n)| (k.clone(), n as f64))
        .collect();
    out.push_str(&bar_chart(
        "chart-errors",
        "Errors by kind",
        "jobs",
        &errors,
    ));
    out.push_str(&line_chart(
        "chart-errors-time",
        "Errors over time",
        "seconds into the run",
        "errors per window",
        &[Series {
            name: "errors",
            points: windows
                .iter()
                .map(|w| (w.start_s + s.window_s, w.errors as f64))
                .collect(),
        }],
    ));
    out.push_str(&line_chart(
        "chart-tokens",
        "Tokens per second over time",
        "seconds into the run",
        "tokens/s",
        &[Series {
            name: "tokens/s",
            points: rate(|w| w.tokens_per_s),
        }],
    ));
    out.push_str("</div>");

    out.push_str("<h2>Worker metrics</h2>");
    match &report.worker {
        WorkerMetrics::NotRequested => {
            out.push_str("<p id=\"worker\">Not requested (pass <code>--metrics-url</code>).</p>")
        }
        WorkerMetrics::NotAvailable { url, reason } => {
            let _ = write!(
                out,
                "<p id=\"worker\">Not available at <code>{}</code>: {}</p>",
                esc(url),
                esc(reason)
            );
        }
        WorkerMetrics::Available {
            url,
            histograms,
            changed,
        } => {
            let _ = write!(out, "<p class=\"meta\">Scraped <code>{}</code> before and after the run.</p><table id=\"worker\"><tr><th>series</th><th>observations / delta</th><th>mean</th></tr>", esc(url));
            for h in histograms {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{:.4}</td></tr>",
                    esc(&h.series),
                    h.count,
                    h.mean
                );
            }
            for c in changed {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{:+}</td><td></td></tr>",
                    esc(&c.series),
                    c.delta
                );
            }
            out.push_str("</table>");
        }
    }

    let _ = writeln!(
        out,
        "<h2>Scenario</h2><pre>{}</pre></body></html>",
        esc(&serde_json::to_string_pretty(&report.scenario).unwrap_or_default())
    );
    out
}
