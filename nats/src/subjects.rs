//! The subject scheme. Every subject jetinfer uses is built here.
//!
//! - Jobs: `jobs.<model>.<tenant>`. The tenant is the last token so server
//!   permissions can confine a producer to `jobs.*.<tenant>`, and a worker can
//!   trust the subject, not the payload, for the tenant.
//! - Results: `results.<tenant>.<client>`, a per-client inbox the producer
//!   subscribes to; results are matched to jobs by the job id inside them.
//!   A bulk run's inbox is `results.<tenant>.bulk-<run>`.
//! - Bulk runs: keys `run.<tenant>.<run>` and `cancel.<tenant>.<run>` in the
//!   `JETINFER_BULK` key-value bucket.

use crate::config::DEFAULT_STREAM_NAME;

/// Prefix of every job subject.
pub const JOBS_PREFIX: &str = "jobs";
/// Prefix of every result subject.
pub const RESULTS_PREFIX: &str = "results";
/// Prefix of every dead-letter subject.
pub const DEAD_LETTER_PREFIX: &str = "dlq";
/// Name of the dead-letter stream.
pub const DEAD_LETTER_STREAM: &str = "JETINFER_DLQ";
/// Name of the results stream.
pub const RESULTS_STREAM: &str = "JETINFER_RESULTS";
/// Longest model or tenant name.
pub const MAX_TOKEN_LEN: usize = 64;

/// Why a name cannot be used as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} must be 1 to {MAX_TOKEN_LEN} characters of A-Z, a-z, 0-9, '-' or '_'")]
pub struct SubjectError {
    pub what: &'static str,
    pub value: String,
}

/// Checks that `value` is a single, literal subject token.
pub fn check_token(what: &'static str, value: &str) -> Result<(), SubjectError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_TOKEN_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SubjectError {
            what,
            value: value.to_string(),
        })
    }
}

/// A validated tenant name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant(String);

impl Tenant {
    pub fn new(name: impl Into<String>) -> Result<Self, SubjectError> {
        let name = name.into();
        check_token("tenant", &name)?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tenant used when none is configured.
pub const DEFAULT_TENANT: &str = "default";

/// `jobs.<model>.<tenant>`: where a job for `model` from `tenant` is published.
pub fn job(model: &str, tenant: &Tenant) -> Result<String, SubjectError> {
    check_token("model", model)?;
    Ok(format!("{JOBS_PREFIX}.{model}.{tenant}"))
}

/// `jobs.<model>.*`: what a model's consumer filters on.
pub fn jobs_for_model(model: &str) -> Result<String, SubjectError> {
    check_token("model", model)?;
    Ok(format!("{JOBS_PREFIX}.{model}.*"))
}

/// `jobs.>`: the jobs stream's subjects.
pub fn all_jobs() -> String {
    format!("{JOBS_PREFIX}.>")
}

/// Model and tenant of a job subject, or `None` if it is not one.
pub fn parse_job(subject: &str) -> Option<(&str, &str)> {
    let mut parts = subject.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(JOBS_PREFIX), Some(model), Some(tenant), None) => Some((model, tenant)),
        _ => None,
    }
}

/// `dlq.<model>.<tenant>`: where a job that cannot be answered is kept.
pub fn dead_letter(model: &str, tenant: &str) -> Result<String, SubjectError> {
    check_token("model", model)?;
    check_token("tenant", tenant)?;
    Ok(format!("{DEAD_LETTER_PREFIX}.{model}.{tenant}"))
}

/// `dlq.>`: the dead-letter stream's subjects.
pub fn all_dead_letters() -> String {
    format!("{DEAD_LETTER_PREFIX}.>")
}

/// The advisory JetStream publishes when a job of `consumer` on `stream` hit
/// its consumer's `max_deliver`.
pub fn max_deliveries_advisory(stream: &str, consumer: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}")
}

/// `results.>`: the results stream's subjects.
pub fn all_results() -> String {
    format!("{RESULTS_PREFIX}.>")
}

/// `results.<tenant>.<client>`: a client's result inbox.
pub fn result_inbox(tenant: &Tenant, client_id: &str) -> Result<String, SubjectError> {
    check_token("client id", client_id)?;
    Ok(format!("{RESULTS_PREFIX}.{tenant}.{client_id}"))
}

/// Name of the key-value bucket holding bulk runs' records and cancel marks.
pub const BULK_BUCKET: &str = "JETINFER_BULK";
const BULK_RUN_KEY: &str = "run";
const BULK_CANCEL_KEY: &str = "cancel";
/// Longest bulk run id: a job id is `<run>:<custom_id>` and must fit in 128
/// characters.
pub const MAX_RUN_ID_LEN: usize = 26;

/// Checks that `run` can name a bulk run: a single subject token of at most
/// [`MAX_RUN_ID_LEN`] characters.
pub fn check_run_id(run: &str) -> Result<(), SubjectError> {
    check_token("bulk run id", run)?;
    if run.len() > MAX_RUN_ID_LEN {
        return Err(SubjectError {
            what: "bulk run id (at most 26 characters)",
            value: run.to_string(),
        });
    }
    Ok(())
}

/// `results.<tenant>.bulk-<run>`: the inbox of a bulk run. Every invocation
/// of the run uses it, so a resumed run finds the results stored meanwhile.
pub fn bulk_inbox(tenant: &Tenant, run: &str) -> Result<String, SubjectError> {
    check_run_id(run)?;
    result_inbox(tenant, &format!("bulk-{run}"))
}

/// `run.<tenant>.<run>`: the key of a bulk run's record in [`BULK_BUCKET`].
pub fn bulk_run_key(tenant: &Tenant, run: &str) -> Result<String, SubjectError> {
    check_run_id(run)?;
    Ok(format!("{BULK_RUN_KEY}.{tenant}.{run}"))
}

/// `cancel.<tenant>.<run>`: present in [`BULK_BUCKET`] once the run was
/// cancelled.
pub fn bulk_cancel_key(tenant: &Tenant, run: &str) -> Result<String, SubjectError> {
    check_run_id(run)?;
    Ok(format!("{BULK_CANCEL_KEY}.{tenant}.{run}"))
}

/// `cancel.>`: every cancel mark, what workers watch.
pub fn all_bulk_cancels() -> String {
    format!("{BULK_CANCEL_KEY}.>")
}

/// Tenant and run of a cancel-mark key, or `None` if it is not one.
pub fn parse_bulk_cancel_key(key: &str) -> Option<(&str, &str)> {
    let mut parts = key.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(BULK_CANCEL_KEY), Some(tenant), Some(run), None) => Some((tenant, run)),
        _ => None,
    }
}

/// Name of a model's durable pull consumer.
pub fn consumer_name(model: &str) -> Result<String, SubjectError> {
    check_token("model", model)?;
    Ok(format!("worker-{model}"))
}

/// Name of the jobs stream when none is configured.
pub fn default_stream() -> &'static str {
    DEFAULT_STREAM_NAME
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_subjects_carry_model_then_tenant() {
        let tenant = Tenant::new("acme").unwrap();
        assert_eq!(job("minilm", &tenant).unwrap(), "jobs.minilm.acme");
        assert_eq!(parse_job("jobs.minilm.acme"), Some(("minilm", "acme")));
        assert_eq!(parse_job("jobs.minilm"), None);
        assert_eq!(parse_job("jobs.minilm.acme.extra"), None);
        assert_eq!(parse_job("results.minilm.acme"), None);
    }

    #[test]
    fn bulk_keys_round_trip_and_refuse_long_run_ids() {
        let tenant = Tenant::new("acme").unwrap();
        assert_eq!(bulk_inbox(&tenant, "r1").unwrap(), "results.acme.bulk-r1");
        let key = bulk_cancel_key(&tenant, "r1").unwrap();
        assert_eq!(parse_bulk_cancel_key(&key), Some(("acme", "r1")));
        assert_eq!(parse_bulk_cancel_key("run.acme.r1"), None);
        assert!(check_run_id(&"r".repeat(MAX_RUN_ID_LEN)).is_ok());
        assert!(check_run_id(&"r".repeat(MAX_RUN_ID_LEN + 1)).is_err());
        assert!(bulk_run_key(&tenant, "a.b").is_err());
    }

    #[test]
    fn wildcards_and_dots_cannot_be_injected_as_tokens() {
        for bad in ["", "a.b", "*", ">", "a b", "ü", &"x".repeat(65)] {
            assert!(Tenant::new(bad).is_err(), "{bad:?} accepted as tenant");
            assert!(jobs_for_model(bad).is_err(), "{bad:?} accepted as model");
        }
    }
}
