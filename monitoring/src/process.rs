//! Process CPU and memory, read from `/proc/self` at each scrape (Linux).
//! Elsewhere these metrics are absent rather than zero.

use std::sync::OnceLock;

use metrics::gauge;

use crate::names;

/// Records the process metrics now; a no-op where `/proc` is unavailable.
pub fn record() {
    let Some(stat) = read_stat() else { return };
    // A gauge because `metrics` counters are integers; CPU time needs fractions.
    gauge!(names::PROCESS_CPU).set(stat.cpu_seconds);
    gauge!(names::PROCESS_RESIDENT_MEMORY).set(stat.resident_bytes as f64);
    gauge!(names::PROCESS_VIRTUAL_MEMORY).set(stat.virtual_bytes as f64);
    if let Some(start) = start_time_seconds(stat.start_ticks) {
        gauge!(names::PROCESS_START_TIME).set(start);
    }
}

struct Stat {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_ticks: u64,
}

/// Linux's USER_HZ, fixed at 100 on every architecture Linux exposes to user space.
const TICKS_PER_SECOND: f64 = 100.0;
/// Page size assumed for RSS; 4 KiB on the platforms jetinfer ships for.
const PAGE_BYTES: u64 = 4096;

fn read_stat() -> Option<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields resume after its ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, so index 11.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / TICKS_PER_SECOND,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * PAGE_BYTES,
    })
}

/// Boot time plus the process's start offset.
fn start_time_seconds(start_ticks: u64) -> Option<f64> {
    static BOOT: OnceLock<Option<f64>> = OnceLock::new();
    let boot = (*BOOT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    }))?;
    Some(boot + start_ticks as f64 / TICKS_PER_SECOND)
}
