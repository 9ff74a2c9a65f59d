//! Cost limits at the edge, in inputs: each API key's own (from the keys
//! file) and each tenant's over all its keys (from the config), both
//! governor GCRA limiters charged the request's input count. A refusal is
//! 429 with the wait governor computes; a request costlier than a burst
//! could ever allow is 413 (waiting would not help: split it).
//!
//! Per-key limiters exist only for keys of the keys file (bounded by it);
//! JWT callers are limited by their tenant's limiter.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::Rate;
use crate::error::ApiError;

/// One limiter for one rate.
pub struct Limiter {
    rate: Rate,
    limiter: DefaultDirectRateLimiter,
}

impl Limiter {
    pub fn new(rate: Rate) -> Option<Self> {
        let per_second = NonZeroU32::new(rate.inputs_per_second)?;
        let burst = NonZeroU32::new(rate.burst_inputs.max(rate.inputs_per_second))?;
        Some(Self {
            rate,
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
        })
    }

    /// Charges `cost` inputs, or says how long to wait.
    pub fn charge(&self, cost: u32, whose: &str) -> Result<(), ApiError> {
        let Some(cost) = NonZeroU32::new(cost) else {
            return Ok(());
        };
        match self.limiter.check_n(cost) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(ApiError::rate_limited(
                    format!(
                        "Rate limit reached for {whose}: {} inputs per second; retry after the time in Retry-After",
                        self.rate.inputs_per_second
                    ),
                    wait,
                ))
            }
            Err(_) => Err(ApiError::too_large(
                Some("input"),
                format!(
                    "This request's {cost} inputs exceed {whose}'s burst of {}: split it into smaller requests",
                    self.rate.burst_inputs.max(self.rate.inputs_per_second)
                ),
            )),
        }
    }
}

/// The per-key limiters, made on a key's first request and remade when its
/// rate in the keys file changes; keys gone from the file are forgotten on
/// the next [`KeyLimits::retain`].
#[derive(Default)]
pub struct KeyLimits {
    limiters: Mutex<HashMap<String, Arc<Limiter>>>,
}

impl KeyLimits {
    pub fn charge(&self, key_id: &str, rate: Rate, cost: u32) -> Result<(), ApiError> {
        let limiter = {
            let mut limiters = self.limiters.lock().expect("key limits lock");
            match limiters.get(key_id) {
                Some(existing) if existing.rate == rate => Arc::clone(existing),
                _ => match Limiter::new(rate) {
                    Some(made) => {
                        let made = Arc::new(made);
                        limiters.insert(key_id.to_string(), Arc::clone(&made));
                        made
                    }
                    // A zero rate: the key may not embed at all.
                    None => {
                        return Err(ApiError::forbidden(
                            "This key's rate limit is zero: it may not submit inputs",
                        ))
                    }
                },
            }
        };
        limiter.charge(cost, "this key")
    }

    /// Keeps only the limiters of `known` keys.
    pub fn retain(&self, known: impl Fn(&str) -> bool) {
        self.limiters
            .lock()
            .expect("key limits lock")
            .retain(|id, _| known(id));
    }
}
