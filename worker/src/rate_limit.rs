//! Per-tenant rate limits, checked at intake before a job costs any
//! tokenisation or inference. A tenant over its rate gets a `rate_limited`
//! error reply carrying `retry_after`, and the job is terminated: it was
//! answered, so nothing is lost, and retrying is the client's call.
//!
//! Limits are per worker process (GCRA from the `governor` crate): with N
//! workers serving a model a tenant may reach N times its configured rate.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use jetinfer_nats::subjects::Tenant;

use crate::config::{RateLimitConfig, TenantRate};

/// Forget idle tenants' state every this many checks, so the keyed limiter's
/// memory follows the tenants active now, not every tenant ever seen.
const FORGET_IDLE_EVERY: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate_limit: jobs_per_second for {who} must be a finite number >= 0, not {rate}")]
    Rate { who: String, rate: f64 },
    #[error("rate_limit.tenants: {0}")]
    Tenant(#[from] jetinfer_nats::SubjectError),
}

/// The limiters of every tenant. Cheap to check from one task; shared by
/// reference.
pub struct TenantLimits {
    /// Tenants without an override; `None`: unlimited.
    default: Option<DefaultKeyedRateLimiter<String>>,
    /// Tenants with their own rate; `None`: unlimited.
    overrides: HashMap<String, Option<DefaultDirectRateLimiter>>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl TenantLimits {
    pub fn new(config: &RateLimitConfig) -> Result<Self, RateLimitError> {
        let default = quota("the default", &config.default)?.map(RateLimiter::keyed);
        let mut overrides = HashMap::with_capacity(config.tenants.len());
        for (tenant, rate) in &config.tenants {
            Tenant::new(tenant.clone())?;
            let limiter = quota(&format!("tenant {tenant}"), rate)?.map(RateLimiter::direct);
            overrides.insert(tenant.clone(), limiter);
        }
        Ok(Self {
            default,
            overrides,
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        })
    }

    /// Counts one job for `tenant`: `Ok` if it is within its rate, else how
    /// long until the tenant may send one again.
    pub fn check(&self, tenant: &str) -> Result<(), Duration> {
        let outcome = match self.overrides.get(tenant) {
            Some(None) => return Ok(()),
            Some(Some(limiter)) => limiter.check(),
            None => match &self.default {
                None => return Ok(()),
                Some(limiter) => {
                    if self.checks.fetch_add(1, Ordering::Relaxed) % FORGET_IDLE_EVERY == 0 {
                        limiter.retain_recent();
                    }
                    limiter.check_key(&tenant.to_string())
                }
            },
        };
        outcome.map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// The GCRA quota for `rate`, or `None` for no limit (a rate of 0).
fn quota(who: &str, rate: &TenantRate) -> Result<Option<Quota>, RateLimitError> {
    let per_second = rate.jobs_per_second;
    if !per_second.is_finite() || per_second < 0.0 {
        return Err(RateLimitError::Rate {
            who: who.to_string(),
            rate: per_second,
        });
    }
    if per_second == 0.0 {
        return Ok(None);
    }
    let Some(quota) = Quota::with_period(Duration::from_secs_f64(1.0 / per_second)) else {
        return Err(RateLimitError::Rate {
            who: who.to_string(),
            rate: per_second,
        });
    };
    // Without a stated burst, a second's worth of jobs may come at once.
    let burst = NonZeroU32::new(rate.burst)
        .or_else(|| NonZeroU32::new(per_second.ceil().min(f64::from(u32::MAX)) as u32))
        .unwrap_or(NonZeroU32::MIN);
    Ok(Some(quota.allow_burst(burst)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(jobs_per_second: f64, burst: u32) -> TenantRate {
        TenantRate {
            jobs_per_second,
            burst,
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
            assert!(limits.check("acme").is_ok());
        }
        let wait = limits.check("acme").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another tenant on the default has its own bucket.
        assert!(limits.check("other").is_ok());
        // An override of 0 is unlimited; a slower override is slower.
        for _ in 0..100 {
            assert!(limits.check("vip").is_ok());
        }
        assert!(limits.check("slow").is_ok());
        let wait = limits.check("slow").unwrap_err();
        assert!(wait > Duration::from_secs(1), "{wait:?}");
    }

    #[test]
    fn no_configured_rate_means_no_limit_and_bad_rates_are_refused() {
        let limits = TenantLimits::new(&RateLimitConfig::default()).unwrap();
        for _ in 0..10_000 {
            assert!(limits.check("acme").is_ok());
        }
        let bad = RateLimitConfig {
            default: rate(-1.0, 0),
            ..RateLimitConfig::default()
        };
        assert!(TenantLimits::new(&bad).is_err());
        let mut bad = RateLimitConfig::default();
        bad.tenants.insert("a.b".into(), rate(1.0, 1));
        assert!(TenantLimits::new(&bad).is_err());
    }
}
