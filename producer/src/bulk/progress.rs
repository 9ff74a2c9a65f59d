//! Progress of a bulk run: an `indicatif` bar (done/total, rate, ETA) on a
//! terminal, a plain line every few seconds otherwise (logs, CI, pipes).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on stderr; for terminals.
    Bar,
    /// A plain line on stderr at this interval.
    Lines(Duration),
    /// Nothing.
    Off,
}

/// Plain progress lines when stderr is not a terminal.
pub const DEFAULT_LINE_INTERVAL: Duration = Duration::from_secs(5);

pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    run: String,
    total: u64,
    start_position: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(mode: ProgressMode, run: &str, total: u64, position: u64) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_position(position);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} lines  {per_sec}  ETA {eta}  {msg}",
                )
                .expect("a valid progress template"),
            );
            bar.set_prefix(format!("bulk {run}"));
            bar.reset_eta();
            bar
        });
        Self {
            mode,
            bar,
            run: run.to_string(),
            total,
            start_position: position,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    /// Shows `position` lines done of which `failed` went to the error file.
    pub fn update(&mut self, position: u64, failed: u64) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(position);
                    bar.set_message(format!("{failed} failed"));
                }
            }
            ProgressMode::Lines(every) if self.last_line.elapsed() >= every => {
                self.last_line = Instant::now();
                eprintln!("{}", self.line(position, failed));
            }
            _ => {}
        }
    }

    fn line(&self, position: u64, failed: u64) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = position.saturating_sub(self.start_position) as f64 / elapsed.max(1e-3);
        let left = self.total.saturating_sub(position);
        let eta = if rate > 0.0 {
            format!("{:.0} s", left as f64 / rate)
        } else {
            "unknown".to_string()
        };
        format!(
            "jetinfer bulk {}: {position}/{} lines done ({failed} failed), {rate:.0} lines/s, ETA {eta}",
            self.run, self.total
        )
    }

    pub fn finish(&mut self, position: u64, failed: u64) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = self.bar.take() {
                    bar.set_position(position);
                    bar.set_message(format!("{failed} failed"));
                    bar.finish();
                }
            }
            ProgressMode::Lines(_) => eprintln!("{}", self.line(position, failed)),
            ProgressMode::Off => {}
        }
    }
}
