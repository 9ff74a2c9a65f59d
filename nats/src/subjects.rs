//! The subject scheme. Every subject jetinfer uses is built here.
//!
//! - Jobs: `jobs.<model>.<tenant>`. The tenant is the last token so server
//!   permissions can confine a producer to `jobs.*.<tenant>`, and a worker can
//!   trust the subject, not the payload, for the tenant.
//! - Results: `results.<tenant>.<client>`, a per-client inbox the producer
//!   subscribes to; results are matched to jobs by the job id inside them.
//!   A bulk run's inbox is `results.<tenant>.bulk-<run>`.
//! - Bulk runs: keys `run.<tenant>.<run>` and `cancel.<tenant>.<run>` in the
//!   `JETINFER_BULK` key-value bucket of the tenant's own account, and the
//!   cancel notice workers follow, `cancels.<tenant>` (payload: the run id),
//!   in the workers' `JETINFER_CANCELS` stream. One subject per tenant, so
//!   the stream's per-subject limit bounds what each tenant can store there.

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

/// `jobs.>`: every job subject (the jobs stream's subjects before they were
/// kept per served model; see `provision::provision_stream`).
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

/// `results.>`: the results stream's subjects.
pub fn all_results() -> String {
    format!("{RESULTS_PREFIX}.>")
}

/// `results.<tenant>.<client>`: a client's result inbox.
pub fn result_inbox(tenant: &Tenant, client_id: &str) -> Result<String, SubjectError> {
    check_token("client id", client_id)?;
    Ok(format!("{RESULTS_PREFIX}.{tenant}.{client_id}"))
}

/// Stands for the job's tenant in a reply-subject pattern.
pub const TENANT_PLACEHOLDER: &str = "{tenant}";
/// Longest reply subject a worker publishes to.
pub const MAX_REPLY_SUBJECT_LEN: usize = 256;

/// The default reply allow-list: `results.{tenant}.>`, so a job may only ask
/// for its result on its own tenant's result inboxes.
pub fn default_reply_patterns() -> Vec<String> {
    vec![format!("{RESULTS_PREFIX}.{TENANT_PLACEHOLDER}.>")]
}

/// Why a reply-subject pattern cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reply subject pattern {pattern:?} {why}")]
pub struct ReplyPatternError {
    pub pattern: String,
    pub why: &'static str,
}

/// Why a worker will not publish to a job's reply subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reply subject {shown} refused: {why}")]
pub struct ForbiddenReply {
    /// The subject as safe to log: escaped and cut to a few dozen characters.
    pub shown: String,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternToken {
    Literal(String),
    Tenant,
    /// `*`: any one token.
    One,
    /// `>`: one or more tokens, last only.
    Rest,
}

/// The subjects a worker may publish a job's result to, as patterns with a
/// `{tenant}` token filled from the subject the job was published on (which
/// server permissions confine), never from the job itself.
///
/// A reply subject is accepted only if it is a literal subject (tokens of
/// `A-Z a-z 0-9 - _`, so no wildcard, `$` system prefix, whitespace or
/// non-ASCII) of at most [`MAX_REPLY_SUBJECT_LEN`] bytes that matches one of
/// the patterns for the job's own tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyPolicy {
    patterns: Vec<Vec<PatternToken>>,
    shown: Vec<String>,
}

impl Default for ReplyPolicy {
    fn default() -> Self {
        Self::new(&default_reply_patterns()).expect("the default reply pattern is valid")
    }
}

impl ReplyPolicy {
    /// Checks `patterns`: at least one; each a subject pattern whose first
    /// token is a literal outside jetinfer's jobs and dead-letter subjects and
    /// the `$` system subjects, holding `{tenant}` as exactly one whole token
    /// (so no two tenants share a reply subject), `>` only last.
    pub fn new(patterns: &[String]) -> Result<Self, ReplyPatternError> {
        if patterns.is_empty() {
            return Err(ReplyPatternError {
                pattern: String::new(),
                why: "list is empty: with no allowed reply subject no job could be answered",
            });
        }
        let parsed = patterns
            .iter()
            .map(|p| parse_pattern(p))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            patterns: parsed,
            shown: patterns.to_vec(),
        })
    }

    /// The patterns as configured.
    pub fn patterns(&self) -> &[String] {
        &self.shown
    }

    /// Whether a worker may publish the result of the job published on
    /// `job_subject` to `reply_to`.
    pub fn check(&self, job_subject: &str, reply_to: &str) -> Result<(), ForbiddenReply> {
        let refuse = |why: String| ForbiddenReply {
            shown: shown(reply_to),
            why,
        };
        let tenant = match parse_job(job_subject) {
            Some((_, tenant)) if check_token("tenant", tenant).is_ok() => tenant,
            _ => {
                return Err(refuse(format!(
                    "the job subject {} names no valid tenant",
                    shown(job_subject)
                )))
            }
        };
        if reply_to.is_empty() || reply_to.len() > MAX_REPLY_SUBJECT_LEN {
            return Err(refuse(format!(
                "a reply subject is 1 to {MAX_REPLY_SUBJECT_LEN} bytes"
            )));
        }
        let literal = reply_to.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if !literal {
            return Err(refuse(
                "a reply subject is dot-separated tokens of A-Z, a-z, 0-9, '-' and '_' (no wildcards)"
                    .to_string(),
            ));
        }
        let tokens: Vec<&str> = reply_to.split('.').collect();
        if self.patterns.iter().any(|p| matches(p, tenant, &tokens)) {
            Ok(())
        } else {
            Err(refuse(format!(
                "tenant {tenant} may only be answered on {}",
                self.shown.join(", ").replace(TENANT_PLACEHOLDER, tenant)
            )))
        }
    }
}

fn parse_pattern(pattern: &str) -> Result<Vec<PatternToken>, ReplyPatternError> {
    let bad = |why| ReplyPatternError {
        pattern: pattern.to_string(),
        why,
    };
    let raw: Vec<&str> = pattern.split('.').collect();
    let mut tokens = Vec::with_capacity(raw.len());
    for (i, token) in raw.iter().enumerate() {
        tokens.push(match *token {
            TENANT_PLACEHOLDER => PatternToken::Tenant,
            "*" => PatternToken::One,
            ">" if i + 1 == raw.len() => PatternToken::Rest,
            ">" => return Err(bad("has '>' before its last token")),
            literal if check_token("token", literal).is_ok() => {
                PatternToken::Literal(literal.to_string())
            }
            _ => {
                return Err(bad(
                    "has a token that is not {tenant}, '*', '>' or A-Z, a-z, 0-9, '-', '_'",
                ))
            }
        });
    }
    match tokens.first() {
        Some(PatternToken::Literal(first))
            if first != JOBS_PREFIX && first != DEAD_LETTER_PREFIX && first != CANCELS_PREFIX => {}
        Some(PatternToken::Literal(_)) => {
            return Err(bad(
                "would let jobs publish into the jobs or dead-letter subjects",
            ))
        }
        _ => return Err(bad("must start with a literal token")),
    }
    if tokens
        .iter()
        .filter(|t| **t == PatternToken::Tenant)
        .count()
        != 1
    {
        return Err(bad("must hold {tenant} exactly once, as a whole token"));
    }
    Ok(tokens)
}

fn matches(pattern: &[PatternToken], tenant: &str, subject: &[&str]) -> bool {
    let mut subject = subject.iter();
    for token in pattern {
        let next = subject.next();
        let ok = match (token, next) {
            (PatternToken::Rest, Some(_)) => return true,
            (_, None) => false,
            (PatternToken::Literal(l), Some(s)) => l == s,
            (PatternToken::Tenant, Some(s)) => *s == tenant,
            (PatternToken::One, Some(_)) => true,
        };
        if !ok {
            return false;
        }
    }
    subject.next().is_none()
}

/// A subject as safe to show in logs and headers: escaped, at most a few
/// dozen characters.
pub fn shown(subject: &str) -> String {
    const SHOWN_CHARS: usize = 64;
    let mut text: String = subject.chars().take(SHOWN_CHARS).collect();
    if subject.chars().nth(SHOWN_CHARS).is_some() {
        text.push('…');
    }
    format!("{text:?}")
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

/// Name of the stream of cancel notices workers follow.
pub const CANCELS_STREAM: &str = "JETINFER_CANCELS";
/// Prefix of every cancel-notice subject.
pub const CANCELS_PREFIX: &str = "cancels";

/// `cancels.<tenant>`: where `tenant`'s producers announce a cancelled run
/// (the payload is the run id). In the shipped configuration each tenant
/// reaches only its own through an import, so the tenant token cannot be
/// forged.
pub fn bulk_cancels(tenant: &Tenant) -> String {
    format!("{CANCELS_PREFIX}.{tenant}")
}

/// `cancels.*`: the cancel stream's subjects.
pub fn all_bulk_cancels() -> String {
    format!("{CANCELS_PREFIX}.*")
}

/// Tenant of a cancel-notice subject, or `None` if it is not one.
pub fn parse_bulk_cancels(subject: &str) -> Option<&str> {
    let mut parts = subject.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(CANCELS_PREFIX), Some(tenant), None) if check_token("tenant", tenant).is_ok() => {
            Some(tenant)
        }
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
    fn replies_are_confined_to_the_jobs_own_tenant_results() {
        let policy = ReplyPolicy::default();
        let job = "jobs.minilm.acme";
        assert!(policy.check(job, "results.acme.client1").is_ok());
        assert!(policy.check(job, "results.acme.client1.deeper").is_ok());
        let long = format!("results.acme.{}", "x".repeat(MAX_REPLY_SUBJECT_LEN));
        for bad in [
            "$JS.API.STREAM.DELETE.JETINFER_JOBS",
            "jobs.minilm.acme",
            "results.othertenant.x",
            "results.acme",
            "results.>",
            "results.*.x",
            "results.acme.*",
            "results.acme.>",
            "results..acme.x",
            "results.acme.x ",
            "results.acme.ü",
            "",
            long.as_str(),
        ] {
            assert!(policy.check(job, bad).is_err(), "{bad:?} allowed");
        }
        // A job subject without a valid tenant has no allowed reply at all.
        assert!(policy.check("jobs.minilm", "results.acme.x").is_err());
        assert!(policy.check("jobs.minilm.$x", "results.$x.y").is_err());
    }

    #[test]
    fn reply_patterns_must_name_the_tenant_and_stay_out_of_jetinfers_subjects() {
        let ok =
            ReplyPolicy::new(&["_INBOX.{tenant}.>".into(), "replies.*.{tenant}".into()]).unwrap();
        assert!(ok.check("jobs.m.acme", "_INBOX.acme.abc.def").is_ok());
        assert!(ok.check("jobs.m.acme", "replies.x.acme").is_ok());
        assert!(ok.check("jobs.m.acme", "replies.x.other").is_err());
        for bad in [
            "results.>",
            "$JS.{tenant}.>",
            "jobs.{tenant}.>",
            "dlq.{tenant}.>",
            "cancels.{tenant}",
            "{tenant}.>",
            "results.{tenant}x.>",
            "results.{tenant}.{tenant}",
            "results.>.{tenant}",
            "*.{tenant}.>",
        ] {
            assert!(ReplyPolicy::new(&[bad.into()]).is_err(), "{bad:?} accepted");
        }
        assert!(ReplyPolicy::new(&[]).is_err());
    }

    #[test]
    fn bulk_keys_round_trip_and_refuse_long_run_ids() {
        let tenant = Tenant::new("acme").unwrap();
        assert_eq!(bulk_inbox(&tenant, "r1").unwrap(), "results.acme.bulk-r1");
        assert_eq!(bulk_cancel_key(&tenant, "r1").unwrap(), "cancel.acme.r1");
        assert_eq!(parse_bulk_cancels(&bulk_cancels(&tenant)), Some("acme"));
        assert_eq!(parse_bulk_cancels("cancels.acme.r1"), None);
        assert_eq!(parse_bulk_cancels("cancels.a*"), None);
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
