//! Scenarios: the named presets (warm-up, light, medium, heavy, spike, soak,
//! bulk) and how a TOML file and then the command line override them.
//!
//! A scenario is either closed-loop (virtual users, each sending one job,
//! awaiting its result, then thinking) or open-loop (jobs arrive at a fixed
//! rate whatever the system does). Either way it is bounded by a duration and
//! a job count, whichever comes first.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::{self, ParseDurationError};

/// Longest a single job may wait for its result by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Jobs in flight at most in open-loop mode; when reached, the scheduler
/// waits, and that wait is counted in the latency of the jobs it delays.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Length of one reporting window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);
/// Default upper bound on jobs for presets that do not set one.
pub const DEFAULT_MAX_JOBS: u64 = 1_000_000;

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `users` virtual users, each: send, await the result, think, repeat.
    Closed,
    /// Jobs start at `rate` per second on a fixed schedule; latency runs from
    /// each job's intended start, so a stall cannot hide (coordinated omission).
    Open,
}

/// A step of a ramp: move linearly to `target` users (closed) or jobs/s
/// (open) over `duration`, as k6 stages do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    #[serde(with = "duration::serde_str")]
    pub duration: Duration,
    pub target: f64,
}

/// One kind of job in the mix: `weight` relative to the others, with between
/// `min_inputs` and `max_inputs` texts drawn from the corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobKind {
    pub name: String,
    pub weight: u32,
    pub min_inputs: usize,
    pub max_inputs: usize,
}

impl JobKind {
    fn new(name: &str, weight: u32, min_inputs: usize, max_inputs: usize) -> Self {
        Self {
            name: name.into(),
            weight,
            min_inputs,
            max_inputs,
        }
    }
}

/// The standard mix: mostly single texts, some small multi-text jobs, a few
/// large ones.
pub fn default_mix() -> Vec<JobKind> {
    vec![
        JobKind::new("single", 70, 1, 1),
        JobKind::new("small", 25, 2, 8),
        JobKind::new("large", 5, 16, 64),
    ]
}

/// Everything that defines a run's load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub mode: Mode,
    /// Closed-loop: virtual users when no stages are given.
    pub users: usize,
    /// Closed-loop: pause between a user's result and its next job.
    #[serde(with = "duration::serde_str")]
    pub think_time: Duration,
    /// Open-loop: jobs per second when no stages are given.
    pub rate: f64,
    /// Optional ramp; when given, the run lasts their total duration (capped
    /// by `duration`).
    pub stages: Vec<Stage>,
    /// Longest the run offers load.
    #[serde(with = "duration::serde_str")]
    pub duration: Duration,
    /// Most jobs the run sends.
    pub max_jobs: u64,
    /// Open-loop: most jobs awaiting results at once.
    pub max_in_flight: usize,
    /// Longest one job waits for its result (then it counts as `timeout`).
    #[serde(with = "duration::serde_str")]
    pub timeout: Duration,
    pub mix: Vec<JobKind>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "custom".into(),
            mode: Mode::Closed,
            users: 1,
            think_time: Duration::ZERO,
            rate: 1.0,
            stages: Vec::new(),
            duration: Duration::from_secs(30),
            max_jobs: DEFAULT_MAX_JOBS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            timeout: DEFAULT_TIMEOUT,
            mix: default_mix(),
        }
    }
}

/// Names of the presets, in the order `scenarios` lists them.
pub const PRESETS: &[&str] = &[
    "warm-up", "light", "medium", "heavy", "spike", "soak", "bulk",
];

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("no scenario named {0:?}; the presets are: {list}", list = PRESETS.join(", "))]
    UnknownPreset(String),
    #[error("reading scenario file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("scenario file {path}: {source}")]
    Toml {
        path: String,
        source: toml::de::Error,
    },
    #[error(transparent)]
    Duration(#[from] ParseDurationError),
    #[error("invalid --mix entry {0:?}: expected NAME=WEIGHT with NAME one of the mix's kinds")]
    Mix(String),
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// The preset called `name`.
pub fn preset(name: &str) -> Result<Scenario, ScenarioError> {
    let secs = Duration::from_secs;
    let base = Scenario {
        name: name.into(),
        ..Scenario::default()
    };
    Ok(match name {
        // A short run to load the model and fill caches before measuring.
        "warm-up" => Scenario {
            users: 4,
            duration: secs(10),
            max_jobs: 200,
            ..base
        },
        // 10 users thinking 5 s: about 2 jobs/s.
        "light" => Scenario {
            users: 10,
            think_time: secs(5),
            duration: secs(60),
            ..base
        },
        // 50 users thinking 5 s: about 10 jobs/s.
        "medium" => Scenario {
            users: 50,
            think_time: secs(5),
            duration: secs(60),
            ..base
        },
        // 200 users thinking 5 s: up to 40 jobs/s, at least 20 if it keeps up.
        "heavy" => Scenario {
            users: 200,
            think_time: secs(5),
            duration: secs(60),
            ..base
        },
        // 0 to 500 users in 5 s, held 10 s, back to 0 in 5 s.
        "spike" => Scenario {
            think_time: secs(2),
            stages: vec![
                Stage {
                    duration: secs(5),
                    target: 500.0,
                },
                Stage {
                    duration: secs(10),
                    target: 500.0,
                },
                Stage {
                    duration: secs(5),
                    target: 0.0,
                },
            ],
            duration: secs(20),
            ..base
        },
        // Steady load for a long time: leaks, drift, slow degradation.
        "soak" => Scenario {
            users: 20,
            think_time: secs(2),
            duration: secs(30 * 60),
            ..base
        },
        // One producer pushing N jobs as fast as backpressure allows: 256 in
        // flight, no think time.
        "bulk" => Scenario {
            users: 256,
            max_jobs: 5000,
            duration: secs(300),
            ..base
        },
        other => return Err(ScenarioError::UnknownPreset(other.into())),
    })
}

/// Overrides from a TOML file or the command line; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// A preset to start from (TOML files may name one).
    pub scenario: Option<String>,
    pub mode: Option<Mode>,
    pub users: Option<usize>,
    pub think_time: Option<String>,
    pub rate: Option<f64>,
    pub stages: Option<Vec<Stage>>,
    pub duration: Option<String>,
    pub max_jobs: Option<u64>,
    pub max_in_flight: Option<usize>,
    pub timeout: Option<String>,
    pub mix: Option<Vec<JobKind>>,
}

impl Overrides {
    /// Reads a scenario TOML file, e.g.
    ///
    /// ```toml
    /// scenario = "medium"
    /// users = 80
    /// think_time = "2s"
    /// [[mix]]
    /// name = "single"
    /// weight = 1
    /// min_inputs = 1
    /// max_inputs = 1
    /// ```
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ScenarioError::Toml {
            path: path.display().to_string(),
            source,
        })
    }

    /// Applies the fields that are set to `scenario`.
    pub fn apply(self, scenario: &mut Scenario) -> Result<(), ScenarioError> {
        if let Some(v) = self.mode {
            scenario.mode = v;
        }
        if let Some(v) = self.users {
            scenario.users = v;
            // Fixed users replace a preset's ramp.
            scenario.stages.clear();
        }
        if let Some(v) = self.think_time {
            scenario.think_time = duration::parse(&v)?;
        }
        if let Some(v) = self.rate {
            scenario.rate = v;
            if self.mode.is_none() {
                // Asking for a rate means open-loop.
                scenario.mode = Mode::Open;
                scenario.stages.clear();
            }
        }
        if let Some(v) = self.stages {
            scenario.stages = v;
        }
        if let Some(v) = self.duration {
            scenario.duration = duration::parse(&v)?;
        }
        if let Some(v) = self.max_jobs {
            scenario.max_jobs = v;
        }
        if let Some(v) = self.max_in_flight {
            scenario.max_in_flight = v;
        }
        if let Some(v) = self.timeout {
            scenario.timeout = duration::parse(&v)?;
        }
        if let Some(v) = self.mix {
            scenario.mix = v;
        }
        Ok(())
    }
}

/// Sets the weights of `mix`'s kinds from `single=70,small=25,large=5`.
pub fn set_mix_weights(mix: &mut [JobKind], spec: &str) -> Result<(), ScenarioError> {
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, weight) = entry
            .split_once('=')
            .ok_or_else(|| ScenarioError::Mix(entry.into()))?;
        let weight: u32 = weight
            .trim()
            .parse()
            .map_err(|_| ScenarioError::Mix(entry.into()))?;
        let kind = mix
            .iter_mut()
            .find(|k| k.name == name.trim())
            .ok_or_else(|| ScenarioError::Mix(entry.into()))?;
        kind.weight = weight;
    }
    Ok(())
}

impl Scenario {
    /// How long load is offered: the stages' total if any, capped by `duration`.
    pub fn run_time(&self) -> Duration {
        if self.stages.is_empty() {
            self.duration
        } else {
            self.stages
                .iter()
                .map(|s| s.duration)
                .sum::<Duration>()
                .min(self.duration)
        }
    }

    /// Target users (closed) or jobs/s (open) at `elapsed` into the run.
    pub fn target_at(&self, elapsed: Duration) -> f64 {
        if self.stages.is_empty() {
            return match self.mode {
                Mode::Closed => self.users as f64,
                Mode::Open => self.rate,
            };
        }
        let mut from = 0.0;
        let mut start = Duration::ZERO;
        for stage in &self.stages {
            let end = start + stage.duration;
            if elapsed < end {
                let f = (elapsed - start).as_secs_f64() / stage.duration.as_secs_f64().max(1e-9);
                return from + (stage.target - from) * f;
            }
            from = stage.target;
            start = end;
        }
        from
    }

    /// Most users the run ever has (closed-loop).
    pub fn peak_users(&self) -> usize {
        if self.stages.is_empty() {
            self.users
        } else {
            self.stages
                .iter()
                .map(|s| s.target.ceil() as usize)
                .max()
                .unwrap_or(0)
        }
    }

    /// Refuses a scenario that cannot run or could run unbounded.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let invalid = |m: &str| Err(ScenarioError::Invalid(m.into()));
        if self.duration.is_zero() {
            return invalid("duration must be above zero");
        }
        if self.max_jobs == 0 {
            return invalid("max_jobs must be at least 1");
        }
        if self.mix.iter().all(|k| k.weight == 0) {
            return invalid("the job mix needs at least one kind with a weight above zero");
        }
        if let Some(k) = self
            .mix
            .iter()
            .find(|k| k.min_inputs == 0 || k.min_inputs > k.max_inputs)
        {
            return invalid(&format!(
                "job kind {:?} needs 1 <= min_inputs <= max_inputs",
                k.name
            ));
        }
        match self.mode {
            Mode::Closed if self.peak_users() == 0 => invalid("closed-loop needs users above zero"),
            Mode::Open if self.stages.is_empty() && self.rate <= 0.0 => {
                invalid("open-loop needs a rate above zero")
            }
            Mode::Open if self.max_in_flight == 0 => invalid("max_in_flight must be at least 1"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_and_bounded() {
        for name in PRESETS {
            let s = preset(name).unwrap();
            s.validate().unwrap();
            assert!(s.run_time() <= s.duration);
        }
        assert!(preset("nope").is_err());
    }

    #[test]
    fn toml_then_cli_override_a_preset() {
        let mut s = preset("medium").unwrap();
        let file: Overrides = toml::from_str("users = 80\nthink_time = \"2s\"").unwrap();
        file.apply(&mut s).unwrap();
        Overrides {
            think_time: Some("500ms".into()),
            ..Overrides::default()
        }
        .apply(&mut s)
        .unwrap();
        assert_eq!(s.users, 80);
        assert_eq!(s.think_time, Duration::from_millis(500));
        assert_eq!(s.mode, Mode::Closed);
    }

    #[test]
    fn a_rate_switches_to_open_loop() {
        let mut s = preset("spike").unwrap();
        Overrides {
            rate: Some(25.0),
            ..Overrides::default()
        }
        .apply(&mut s)
        .unwrap();
        assert_eq!(s.mode, Mode::Open);
        assert_eq!(s.target_at(Duration::from_secs(3)), 25.0);
    }

    #[test]
    fn spike_ramps_up_holds_and_ramps_down() {
        let s = preset("spike").unwrap();
        assert_eq!(s.target_at(Duration::ZERO), 0.0);
        assert_eq!(s.target_at(Duration::from_millis(2500)), 250.0);
        assert_eq!(s.target_at(Duration::from_secs(10)), 500.0);
        assert_eq!(s.target_at(Duration::from_millis(17500)), 250.0);
        assert_eq!(s.peak_users(), 500);
    }

    #[test]
    fn mix_weights_are_set_by_name() {
        let mut mix = default_mix();
        set_mix_weights(&mut mix, "single=1, large=0").unwrap();
        assert_eq!(mix[0].weight, 1);
        assert_eq!(mix[2].weight, 0);
        assert!(set_mix_weights(&mut mix, "huge=3").is_err());
    }
}
