//! Per-tenant rate limits, by count and by cost, checked at intake: jobs
//! and inputs per second before a job costs any tokenisation, tokens per
//! second right after it, before the job reaches the batcher. A tenant over
//! a rate gets a `rate_limited` error reply carrying `retry_after`, and the
//! job is terminated: it was answered, so nothing is lost, and retrying is
//! the client's call. A job that costs more than a burst could never pass,
//! so it is answered `too_costly` instead of being told to wait for ever.
//!
//! Limits are per worker process (GCRA from the `governor` crate): with N
//! workers serving a model a tenant may reach N times its configured rate.
//!
//! State is bounded: tenants with their own entry in the config have theirs
//! from the start; other tenants get buckets on first sight, at most
//! [`MAX_TRACKED_TENANTS`] at once. A bucket left unused long enough to be
//! full again is forgotten (it is the same as a new one). Past the cap,
//! tenants not yet tracked share one set of buckets with the default rate,
//! so they are limited together, never let through unlimited, and tracked
//! tenants keep theirs (an attacker cannot reset them by pushing them out).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jetinfer_nats::subjects::Tenant;
use jetinfer_schemas::{ErrorCode, JobError};

use crate::config::{RateLimitConfig, TenantRate};

/// Most tenants on the default rate tracked at once (each costs a few
/// hundred bytes: tenant names are at most 64 characters).
pub const MAX_TRACKED_TENANTS: usize = 4096;
/// Forget idle tenants' buckets every this many checks, so memory follows
/// the tenants active now, not every tenant ever seen.
const FORGET_IDLE_EVERY: u64 = 4096;
/// What a job refused at a tenant's `max_held_jobs` is told to wait: its
/// held jobs are answered in about a batch each, so a second is plenty.
pub const HELD_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate_limit: {what} for {who} must be a finite number >= 0, not {rate}")]
    Rate {
        who: String,
        what: &'static str,
        rate: f64,
    },
    #[error("rate_limit.tenants: {0}")]
    Tenant(#[from] jetinfer_nats::SubjectError),
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Jobs,
    Inputs,
    Tokens,
}

impl Measure {
    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Jobs => "jobs",
            Measure::Inputs => "inputs",
            Measure::Tokens => "tokens",
        }
    }

    /// The config key of this measure's burst.
    fn burst_key(self) -> &'static str {
        match self {
            Measure::Jobs => "burst",
            Measure::Inputs => "inputs_burst",
            Measure::Tokens => "tokens_burst",
        }
    }

    fn rate_key(self) -> &'static str {
        match self {
            Measure::Jobs => "jobs_per_second",
            Measure::Inputs => "inputs_per_second",
            Measure::Tokens => "tokens_per_second",
        }
    }
}

/// Why a job did not pass its tenant's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Over the rate now; the job may pass after `wait`.
    Wait { measure: Measure, wait: Duration },
    /// The job costs more than the burst: it can never pass.
    TooCostly {
        measure: Measure,
        cost: u64,
        burst: u32,
    },
    /// The tenant already has `held` jobs in this worker, its cap.
    Held { held: usize },
}

impl Refused {
    /// The error reply for a job of `tenant` refused this way.
    pub fn error(&self, tenant: &str) -> JobError {
        match *self {
            Refused::Wait { measure, wait } => JobError::rate_limited(
                format!(
                    "tenant {tenant} is over its rate limit of {}; submit again after the wait",
                    measure.rate_key()
                ),
                wait,
            ),
            Refused::TooCostly {
                measure,
                cost,
                burst,
            } => JobError::new(
                ErrorCode::TooCostly,
                format!(
                    "the job costs {cost} {}, more than tenant {tenant}'s burst of {burst} \
                     (rate_limit {}), so it can never pass; split it into smaller jobs",
                    measure.as_str(),
                    measure.burst_key()
                ),
            ),
            Refused::Held { held } => JobError::rate_limited(
                format!(
                    "tenant {tenant} already has {held} jobs in this worker (rate_limit \
                     max_held_jobs); submit again after the wait"
                ),
                HELD_RETRY_AFTER,
            ),
        }
    }
}

/// One limit as configured: its quota and its burst.
#[derive(Debug, Clone, Copy)]
struct Limit {
    quota: Quota,
    burst: NonZeroU32,
}

impl Limit {
    /// How long an empty bucket takes to be full again.
    fn refill(&self) -> Duration {
        self.quota.replenish_interval() * self.burst.get()
    }
}

/// A tenant's limits: one per measure (`None`: unlimited) and the held cap.
#[derive(Debug, Clone, Copy)]
struct Plan {
    jobs: Option<Limit>,
    inputs: Option<Limit>,
    tokens: Option<Limit>,
    max_held_jobs: usize,
}

impl Plan {
    fn new(who: &str, rate: &TenantRate) -> Result<Self, RateLimitError> {
        Ok(Self {
            jobs: limit(who, Measure::Jobs, rate.jobs_per_second, rate.burst)?,
            inputs: limit(
                who,
                Measure::Inputs,
                rate.inputs_per_second,
                rate.inputs_burst,
            )?,
            tokens: limit(
                who,
                Measure::Tokens,
                rate.tokens_per_second,
                rate.tokens_burst,
            )?,
            max_held_jobs: rate.max_held_jobs,
        })
    }

    /// Whether no rate applies, so the tenant needs no buckets.
    fn unmetered(&self) -> bool {
        self.jobs.is_none() && self.inputs.is_none() && self.tokens.is_none()
    }

    /// After this long unused, the tenant's buckets are full again.
    fn refill(&self) -> Duration {
        [self.jobs, self.inputs, self.tokens]
            .iter()
            .flatten()
            .map(Limit::refill)
            .max()
            .unwrap_or_default()
    }
}

/// The buckets of one tenant (or of every tenant past the cap).
struct Buckets {
    jobs: Option<(Limit, DefaultDirectRateLimiter)>,
    inputs: Option<(Limit, DefaultDirectRateLimiter)>,
    tokens: Option<(Limit, DefaultDirectRateLimiter)>,
}

impl Buckets {
    fn new(plan: &Plan) -> Self {
        let make = |l: Option<Limit>| l.map(|l| (l, RateLimiter::direct(l.quota)));
        Self {
            jobs: make(plan.jobs),
            inputs: make(plan.inputs),
            tokens: make(plan.tokens),
        }
    }

    fn bucket(&self, measure: Measure) -> Option<&(Limit, DefaultDirectRateLimiter)> {
        match measure {
            Measure::Jobs => self.jobs.as_ref(),
            Measure::Inputs => self.inputs.as_ref(),
            Measure::Tokens => self.tokens.as_ref(),
        }
    }

    /// Takes `costs` from their buckets, in order. A cost over its burst is
    /// refused before anything is taken; a bucket that is short refuses
    /// with the wait, and what earlier buckets gave stays spent (the job
    /// cost intake that much work).
    fn take(&self, costs: &[(Measure, u64)], clock: &DefaultClock) -> Result<(), Refused> {
        for &(measure, cost) in costs {
            if let Some((limit, _)) = self.bucket(measure) {
                if cost > u64::from(limit.burst.get()) {
                    return Err(Refused::TooCostly {
                        measure,
                        cost,
                        burst: limit.burst.get(),
                    });
                }
            }
        }
        for &(measure, cost) in costs {
            let (Some((_, bucket)), Some(n)) = (
                self.bucket(measure),
                NonZeroU32::new(u32::try_from(cost).unwrap_or(u32::MAX)),
            ) else {
                continue;
            };
            match bucket.check_n(n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    return Err(Refused::Wait {
                        measure,
                        wait: not_until.wait_time_from(clock.now()),
                    })
                }
                // Checked against the burst above; kept for safety.
                Err(capacity) => {
                    return Err(Refused::TooCostly {
                        measure,
                        cost,
                        burst: capacity.0,
                    })
                }
            }
        }
        Ok(())
    }
}

/// Tenants on the default rate, as far as they are tracked.
struct Tracked {
    tenants: HashMap<String, Entry>,
    /// Shared by every tenant first seen while `tenants` was full.
    overflow: Arc<Buckets>,
    checks: u64,
    /// Whether the cap was hit since it was last logged.
    full_logged: bool,
}

struct Entry {
    buckets: Arc<Buckets>,
    last_used: Instant,
}

/// The limiters of every tenant. Checked from intake's one task; shared by
/// reference.
pub struct TenantLimits {
    default: Plan,
    /// After this long unused, a default tenant's buckets are full again.
    default_refill: Duration,
    /// Tenants with their own entry: their plan and buckets, for good.
    overrides: HashMap<String, (Plan, Arc<Buckets>)>,
    tracked: Mutex<Tracked>,
    clock: DefaultClock,
}

impl TenantLimits {
    pub fn new(config: &RateLimitConfig) -> Result<Self, RateLimitError> {
        let default = Plan::new("the default", &config.default)?;
        let mut overrides = HashMap::with_capacity(config.tenants.len());
        for (tenant, rate) in &config.tenants {
            Tenant::new(tenant.clone())?;
            let plan = Plan::new(&format!("tenant {tenant}"), rate)?;
            overrides.insert(tenant.clone(), (plan, Arc::new(Buckets::new(&plan))));
        }
        Ok(Self {
            default_refill: default.refill(),
            tracked: Mutex::new(Tracked {
                tenants: HashMap::new(),
                overflow: Arc::new(Buckets::new(&default)),
                checks: 0,
                full_logged: false,
            }),
            default,
            overrides,
            clock: DefaultClock::default(),
        })
    }

    /// Checks `tenant`'s cap on jobs held by this worker, given that it
    /// holds `held` now.
    pub fn check_held(&self, tenant: &str, held: usize) -> Result<(), Refused> {
        let cap = self.plan(tenant).max_held_jobs;
        if cap > 0 && held >= cap {
            Err(Refused::Held { held })
        } else {
            Ok(())
        }
    }

    /// Counts one job of `inputs` inputs for `tenant`, before tokenisation.
    pub fn check_job(&self, tenant: &str, inputs: usize) -> Result<(), Refused> {
        let inputs = u64::try_from(inputs).unwrap_or(u64::MAX);
        self.take(tenant, &[(Measure::Jobs, 1), (Measure::Inputs, inputs)])
    }

    /// Counts a job's `tokens` for `tenant`, after tokenisation.
    pub fn check_tokens(&self, tenant: &str, tokens: usize) -> Result<(), Refused> {
        let tokens = u64::try_from(tokens).unwrap_or(u64::MAX);
        self.take(tenant, &[(Measure::Tokens, tokens)])
    }

    /// How many default-rate tenants have buckets now (for tests and
    /// diagnostics; at most [`MAX_TRACKED_TENANTS`]).
    pub fn tracked(&self) -> usize {
        self.lock().tenants.len()
    }

    fn plan(&self, tenant: &str) -> &Plan {
        self.overrides
            .get(tenant)
            .map(|(plan, _)| plan)
            .unwrap_or(&self.default)
    }

    fn take(&self, tenant: &str, costs: &[(Measure, u64)]) -> Result<(), Refused> {
        match self.buckets(tenant) {
            Some(buckets) => buckets.take(costs, &self.clock),
            None => Ok(()),
        }
    }

    /// `tenant`'s buckets, or `None` when no rate applies to it.
    fn buckets(&self, tenant: &str) -> Option<Arc<Buckets>> {
        if let Some((plan, buckets)) = self.overrides.get(tenant) {
            return (!plan.unmetered()).then(|| Arc::clone(buckets));
        }
        if self.default.unmetered() {
            return None;
        }
        let now = Instant::now();
        let mut tracked = self.lock();
        tracked.checks = tracked.checks.wrapping_add(1);
        if tracked.checks.is_multiple_of(FORGET_IDLE_EVERY) {
            self.forget_idle(&mut tracked, now);
        }
        if let Some(entry) = tracked.tenants.get_mut(tenant) {
            entry.last_used = now;
            return Some(Arc::clone(&entry.buckets));
        }
        if tracked.tenants.len() >= MAX_TRACKED_TENANTS {
            self.forget_idle(&mut tracked, now);
        }
        if tracked.tenants.len() >= MAX_TRACKED_TENANTS {
            if !std::mem::replace(&mut tracked.full_logged, true) {
                tracing::warn!(
                    tenants = MAX_TRACKED_TENANTS,
                    "rate limits track the most tenants they may; new tenants share one limit"
                );
            }
            return Some(Arc::clone(&tracked.overflow));
        }
        tracked.full_logged = false;
        let buckets = Arc::new(Buckets::new(&self.default));
        tracked.tenants.insert(
            tenant.to_string(),
            Entry {
                buckets: Arc::clone(&buckets),
                last_used: now,
            },
        );
        Some(buckets)
    }

    /// Drops the buckets unused for long enough to be full again.
    fn forget_idle(&self, tracked: &mut Tracked, now: Instant) {
        let refill = self.default_refill;
        tracked
            .tenants
            .retain(|_, entry| now.duration_since(entry.last_used) < refill);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.tracked.lock().expect("rate limit lock")
    }
}

/// The GCRA limit for `rate` per second with `burst`, or `None` for no
/// limit (a rate of 0).
fn limit(
    who: &str,
    measure: Measure,
    per_second: f64,
    burst: u32,
) -> Result<Option<Limit>, RateLimitError> {
    let bad = || RateLimitError::Rate {
        who: who.to_string(),
        what: measure.rate_key(),
        rate: per_second,
    };
    if !per_second.is_finite() || per_second < 0.0 {
        return Err(bad());
    }
    if per_second == 0.0 {
        return Ok(None);
    }
    let Some(quota) = Quota::with_period(Duration::from_secs_f64(1.0 / per_second)) else {
        return Err(bad());
    };
    // Without a stated burst, a second's worth may come at once.
    let burst = NonZeroU32::new(burst)
        .or_else(|| NonZeroU32::new(per_second.ceil().min(f64::from(u32::MAX)) as u32))
        .unwrap_or(NonZeroU32::MIN);
    Ok(Some(Limit {
        quota: quota.allow_burst(burst),
        burst,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(jobs_per_second: f64, burst: u32) -> TenantRate {
        TenantRate {
            jobs_per_second,
            burst,
            ..TenantRate::default()
        }
    }

    fn waited(refused: Result<(), Refused>) -> (Measure, Duration) {
        match refused {
            Err(Refused::Wait { measure, wait }) => (measure, wait),
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn a_tenant_past_its_burst_is_told_how_long_to_wait_and_others_are_not() {
        let mut config = RateLimitConfig {
            default: rate(1.0, 3),
            ..RateLimitConfig::default()
        };
        config.tenants.insert("vip".into(), rate(0.0, 0));
        config.tenants.insert("slow".into(), rate(0.5, 1));
        let limits = TenantLimits::new(&config).unwrap();
        for _ in 0..3 {
            assert!(limits.check_job("acme", 1).is_ok());
        }
        let (measure, wait) = waited(limits.check_job("acme", 1));
        assert_eq!(measure, Measure::Jobs);
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another tenant on the default has its own bucket.
        assert!(limits.check_job("other", 1).is_ok());
        // An override of 0 is unlimited; a slower override is slower.
        for _ in 0..100 {
            assert!(limits.check_job("vip", 1).is_ok());
        }
        assert!(limits.check_job("slow", 1).is_ok());
        let (_, wait) = waited(limits.check_job("slow", 1));
        assert!(wait > Duration::from_secs(1), "{wait:?}");
    }

    #[test]
    fn no_configured_rate_means_no_limit_and_bad_rates_are_refused() {
        let limits = TenantLimits::new(&RateLimitConfig::default()).unwrap();
        for _ in 0..10_000 {
            assert!(limits.check_job("acme", 256).is_ok());
            assert!(limits.check_tokens("acme", 65_536).is_ok());
        }
        assert_eq!(limits.tracked(), 0, "an unlimited tenant needs no state");
        let bad = RateLimitConfig {
            default: rate(-1.0, 0),
            ..RateLimitConfig::default()
        };
        assert!(TenantLimits::new(&bad).is_err());
        let bad = RateLimitConfig {
            default: TenantRate {
                tokens_per_second: f64::NAN,
                ..TenantRate::default()
            },
            ..RateLimitConfig::default()
        };
        let err = TenantLimits::new(&bad).err().expect("NaN refused");
        assert!(err.to_string().contains("tokens_per_second"), "{err}");
        let mut bad = RateLimitConfig::default();
        bad.tenants.insert("a.b".into(), rate(1.0, 1));
        assert!(TenantLimits::new(&bad).is_err());
    }

    #[test]
    fn inputs_and_tokens_are_limited_by_cost_whatever_the_job_count() {
        let config = RateLimitConfig {
            default: TenantRate {
                jobs_per_second: 100.0,
                inputs_per_second: 10.0,
                inputs_burst: 300,
                tokens_per_second: 100.0,
                tokens_burst: 1000,
                ..TenantRate::default()
            },
            ..RateLimitConfig::default()
        };
        let limits = TenantLimits::new(&config).unwrap();
        // One job of 256 inputs fits the inputs burst; a second does not,
        // though the job count is far below its rate.
        assert!(limits.check_job("acme", 256).is_ok());
        let (measure, wait) = waited(limits.check_job("acme", 256));
        assert_eq!(measure, Measure::Inputs);
        // 212 inputs short at 10/s.
        assert!(wait > Duration::from_secs(20), "{wait:?}");
        // Tokens: 900 of the 1000 pass, the next 200 must wait a second.
        assert!(limits.check_tokens("acme", 900).is_ok());
        let (measure, wait) = waited(limits.check_tokens("acme", 200));
        assert_eq!(measure, Measure::Tokens);
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        // A small job of another tenant is untouched.
        assert!(limits.check_job("globex", 1).is_ok());
        assert!(limits.check_tokens("globex", 10).is_ok());
    }

    #[test]
    fn a_job_costing_more_than_the_burst_is_too_costly_and_spends_nothing() {
        let config = RateLimitConfig {
            default: TenantRate {
                jobs_per_second: 1.0,
                burst: 1,
                inputs_per_second: 100.0,
                inputs_burst: 100,
                tokens_per_second: 1000.0,
                tokens_burst: 5000,
                ..TenantRate::default()
            },
            ..RateLimitConfig::default()
        };
        let limits = TenantLimits::new(&config).unwrap();
        let refused = limits.check_job("acme", 101).unwrap_err();
        assert_eq!(
            refused,
            Refused::TooCostly {
                measure: Measure::Inputs,
                cost: 101,
                burst: 100
            }
        );
        let error = refused.error("acme");
        assert_eq!(error.code, ErrorCode::TooCostly);
        assert_eq!(error.retry_after(), None);
        assert!(error.message.contains("inputs_burst"), "{}", error.message);
        let refused = limits.check_tokens("acme", 5001).unwrap_err();
        assert!(matches!(
            refused,
            Refused::TooCostly {
                measure: Measure::Tokens,
                cost: 5001,
                burst: 5000
            }
        ));
        // Neither refusal spent the job's one-job burst or any tokens.
        assert!(limits.check_job("acme", 100).is_ok());
        assert!(limits.check_tokens("acme", 5000).is_ok());
    }

    #[test]
    fn a_tenant_at_its_held_cap_is_told_to_wait_and_the_cap_is_per_tenant() {
        let mut config = RateLimitConfig {
            default: TenantRate {
                max_held_jobs: 2,
                ..TenantRate::default()
            },
            ..RateLimitConfig::default()
        };
        config.tenants.insert("bulk".into(), TenantRate::default());
        let limits = TenantLimits::new(&config).unwrap();
        assert!(limits.check_held("acme", 1).is_ok());
        let refused = limits.check_held("acme", 2).unwrap_err();
        let error = refused.error("acme");
        assert_eq!(error.code, ErrorCode::RateLimited);
        assert_eq!(error.retry_after(), Some(HELD_RETRY_AFTER));
        assert!(limits.check_held("bulk", 10_000).is_ok(), "0 is no cap");
    }

    #[test]
    fn tracked_tenants_stay_bounded_and_past_the_cap_new_ones_share_a_limit() {
        let config = RateLimitConfig {
            // Refills in 100 s: nobody becomes idle during the test.
            default: rate(0.01, 1),
            ..RateLimitConfig::default()
        };
        let limits = TenantLimits::new(&config).unwrap();
        for i in 0..MAX_TRACKED_TENANTS {
            assert!(limits.check_job(&format!("t{i}"), 1).is_ok());
        }
        assert_eq!(limits.tracked(), MAX_TRACKED_TENANTS);
        // Every tracked tenant is active (used within its refill time), so
        // none is forgotten: newcomers share one bucket...
        assert!(limits.check_job("new-1", 1).is_ok());
        assert!(
            matches!(limits.check_job("new-2", 1), Err(Refused::Wait { .. })),
            "past the cap, new tenants are limited together"
        );
        assert_eq!(limits.tracked(), MAX_TRACKED_TENANTS);
        // ...and tracked tenants keep their own state.
        assert!(matches!(
            limits.check_job("t0", 1),
            Err(Refused::Wait { .. })
        ));
    }

    #[test]
    fn idle_tenants_are_forgotten_once_their_buckets_are_full_again() {
        let config = RateLimitConfig {
            // Refills in 2 ms.
            default: rate(1000.0, 2),
            ..RateLimitConfig::default()
        };
        let limits = TenantLimits::new(&config).unwrap();
        for i in 0..10 {
            assert!(limits.check_job(&format!("t{i}"), 1).is_ok());
        }
        assert_eq!(limits.tracked(), 10);
        std::thread::sleep(Duration::from_millis(20));
        // One busy tenant's checks carry the periodic sweep.
        for _ in 0..FORGET_IDLE_EVERY {
            let _ = limits.check_job("busy", 1);
        }
        assert_eq!(limits.tracked(), 1, "only the busy tenant is left");
    }
}
