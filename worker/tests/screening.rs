//! Property tests of everything intake checks before any work, over hostile
//! input: arbitrary payload bytes, arbitrary header values (reply subject,
//! job id, traceparent) and arbitrary job subjects. Whatever arrives, intake
//! never panics, never admits a job that breaks a limit, and never answers on
//! a reply subject its policy forbids. A fixed number of cases keeps CI's
//! run time the same every time. Header values never hold CR or LF: the
//! NATS protocol cannot carry them (async-nats refuses to build such a
//! header), so no message on the wire has one.

use async_nats::HeaderMap;
use jetinfer_nats::publish::valid_traceparent;
use jetinfer_nats::subjects::ReplyPolicy;
use jetinfer_schemas::{encode_job, headers, ErrorCode, Job, JobOptions, Limits, Truncation};
use jetinfer_worker::intake::{screen, JobHeaders, Refusal, Rules};
use proptest::prelude::*;
use time::OffsetDateTime;

const MODEL: &str = "minilm";
/// Small limits, so generated jobs land on both sides of each.
const LIMITS: Limits = Limits {
    max_job_bytes: 512,
    max_inputs_per_job: 4,
    max_chars_per_input: 30,
};

const INJECTIONS: &[&str] = &[
    "$JS.API.STREAM.DELETE.JETINFER_JOBS",
    "jobs.minilm.x",
    "results.>",
    "results.*.x",
    "results.othertenant.x",
    "_INBOX.x",
    "dlq.minilm.default",
];

fn tenant() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("default".to_string()),
        Just("othertenant".to_string()),
        "[a-z0-9_-]{1,10}",
        "[^\\r\\n]{0,12}",
    ]
}

fn subject() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (prop_oneof![Just(MODEL.to_string()), "[a-z]{1,6}"], tenant())
            .prop_map(|(m, t)| format!("jobs.{m}.{t}")),
        1 => ".{0,40}",
    ]
}

/// A reply subject: the job's own inbox, an injection attempt, or anything.
fn reply_to() -> impl Strategy<Value = Option<String>> {
    proptest::option::weighted(
        0.9,
        prop_oneof![
            3 => (tenant(), "[A-Za-z0-9]{1,20}").prop_map(|(t, c)| format!("results.{t}.{c}")),
            2 => proptest::sample::select(INJECTIONS).prop_map(str::to_string),
            1 => "results\\.default\\.[a-z]{250,300}",
            1 => "results\\.default\\.[à-ÿ]{1,10}",
            1 => "[^\\r\\n]{0,60}",
        ],
    )
}

fn traceparent() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
        "[^\\r\\n]{0,80}",
    ])
}

fn job_bytes() -> impl Strategy<Value = Vec<u8>> {
    let job = (
        prop_oneof![Just(MODEL.to_string()), "[a-z]{0,8}"],
        ".{0,24}",
        proptest::collection::vec(".{0,40}", 0..7),
        any::<bool>(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(model, id, inputs, reject, deadline)| {
            let mut job = Job::new(model, inputs)
                .with_id(id)
                .with_options(JobOptions {
                    normalize: true,
                    truncation: if reject {
                        Truncation::Reject
                    } else {
                        Truncation::Truncate
                    },
                });
            job.deadline_unix_ms = deadline;
            encode_job(&job)
        });
    prop_oneof![
        3 => job.clone().boxed(),
        1 => (job, any::<usize>(), any::<u8>()).prop_map(|(mut bytes, at, b)| {
            let at = at % bytes.len();
            bytes[at] = b;
            bytes
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..700),
    ]
}

fn header_map(reply_to: &Option<String>, msg_id: &str, traceparent: &Option<String>) -> HeaderMap {
    let mut map = HeaderMap::new();
    if let Some(reply_to) = reply_to {
        map.insert(headers::REPLY_TO, reply_to.as_str());
    }
    map.insert(headers::MSG_ID, msg_id);
    if let Some(t) = traceparent {
        map.insert(headers::TRACEPARENT, t.as_str());
    }
    map
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn intake_screening_never_panics_never_admits_a_bad_job_never_replies_where_forbidden(
        subject in subject(),
        reply_to in reply_to(),
        msg_id in "[^\\r\\n]{0,150}",
        traceparent in traceparent(),
        payload in job_bytes(),
    ) {
        let policy = ReplyPolicy::default();
        let rules = Rules { model: MODEL, limits: &LIMITS, reply: &policy };
        let headers = JobHeaders::read(Some(&header_map(&reply_to, &msg_id, &traceparent)));
        prop_assert_eq!(&headers.reply_to, &reply_to);
        if let Some(t) = &headers.traceparent {
            prop_assert!(valid_traceparent(t), "malformed traceparent kept: {t:?}");
        }
        let reply_allowed = reply_to.as_deref().map(|r| policy.check(&subject, r).is_ok());

        match screen(&subject, &headers, &payload, &rules, OffsetDateTime::now_utc()) {
            Ok(admitted) => {
                let tenant = subject.rsplit('.').next().unwrap();
                prop_assert_eq!(&admitted.tenant, tenant);
                prop_assert_eq!(Some(&admitted.reply_to), reply_to.as_ref());
                let own_results = format!("results.{tenant}.");
                prop_assert!(admitted.reply_to.starts_with(&own_results));
                prop_assert!(admitted.reply_to.len() <= 256 && admitted.reply_to.is_ascii());
                prop_assert!(payload.len() <= LIMITS.max_job_bytes);
                prop_assert!(admitted.job.validate(&LIMITS).is_ok());
                prop_assert_eq!(admitted.job.model.as_str(), MODEL);
                let own_jobs = format!("jobs.{MODEL}.{tenant}");
                prop_assert_eq!(subject.as_str(), own_jobs.as_str());
            }
            Err(Refusal::ForbiddenReply(_)) => {
                prop_assert_eq!(reply_allowed, Some(false));
            }
            Err(Refusal::Error { reply_to: answer_on, error, .. }) => {
                // Either no reply at all, or one on an allowed subject.
                prop_assert_eq!(answer_on.is_some(), reply_allowed == Some(true));
                if payload.len() > LIMITS.max_job_bytes && answer_on.is_some() {
                    prop_assert_eq!(error.code, ErrorCode::PayloadTooLarge);
                }
            }
        }
    }

    #[test]
    fn headers_alone_never_panic_and_keep_only_well_formed_trace_context(
        reply_to in proptest::option::of("[^\\r\\n]{0,300}"),
        msg_id in "[^\\r\\n]{0,300}",
        traceparent in traceparent(),
    ) {
        let headers = JobHeaders::read(Some(&header_map(&reply_to, &msg_id, &traceparent)));
        prop_assert_eq!(&headers.msg_id, &msg_id);
        prop_assert_eq!(
            headers.traceparent.is_some(),
            traceparent.as_deref().is_some_and(valid_traceparent)
        );
        prop_assert_eq!(JobHeaders::read(None), JobHeaders::default());
    }
}
