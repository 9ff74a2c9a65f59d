//! Property tests of everything intake checks before any work, over hostile
//! input: arbitrary payload bytes, arbitrary headers (the reply subject, job
//! id, traceparent and bulk run, plus any other names and values, repeated,
//! oversized, holding control characters, or the client's mark of a
//! malformed block) and arbitrary job subjects. Whatever arrives, intake
//! never panics, never admits a job that breaks a limit or a header rule,
//! and never answers on a reply subject its policy forbids. A fixed number
//! of cases keeps CI's run time the same every time. Header values here
//! never hold CR or LF and names are ASCII 33-126: a header map cannot hold
//! others (the NATS client leaves such lines out of the map and marks the
//! message, `headers::MALFORMED`; `hostile_headers.rs` sends them raw).

use async_nats::HeaderMap;
use jetinfer_nats::publish::valid_traceparent;
use jetinfer_nats::subjects::{self, ReplyPolicy};
use jetinfer_schemas::{encode_job, headers, ErrorCode, Job, JobOptions, Limits, Task, Truncation};
use jetinfer_worker::intake::{screen, JobHeaders, Refusal, Rules};
use proptest::prelude::*;
use time::OffsetDateTime;

const MODEL: &str = "minilm";
/// Small limits, so generated jobs land on both sides of each.
const LIMITS: Limits = Limits {
    max_job_bytes: 512,
    max_inputs_per_job: 4,
    max_chars_per_input: 30,
    max_documents_per_rerank: 4,
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

/// A job subject and its reply subject: a well-behaved tenant's pair, or
/// each drawn on its own (mostly a mismatch or an injection).
fn subject_and_reply() -> impl Strategy<Value = (String, Option<String>)> {
    prop_oneof![
        2 => ("[a-z0-9_-]{1,10}", "[A-Za-z0-9]{1,20}").prop_map(|(t, c)| {
            (format!("jobs.{MODEL}.{t}"), Some(format!("results.{t}.{c}")))
        }),
        3 => (subject(), reply_to()),
    ]
}

fn traceparent() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        3 => "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
        1 => "[ -~]{0,80}",
        1 => "[^\\r\\n]{0,80}",
    ])
}

fn job_bytes() -> impl Strategy<Value = Vec<u8>> {
    let job = (
        prop_oneof![Just(MODEL.to_string()), "[a-z]{0,8}"],
        prop_oneof![3 => "[!-~]{1,24}", 1 => ".{0,24}"],
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
                    dimensions: None,
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

/// A job id header: mostly a plausible id, sometimes anything a header
/// value can hold (control characters, non-ASCII, over the limit).
fn msg_id() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[!-~]{1,40}",
        1 => "[!-~]{180,195}",
        1 => "[^\\r\\n]{0,200}",
    ]
}

fn bulk_run() -> impl Strategy<Value = Option<String>> {
    proptest::option::weighted(
        0.2,
        prop_oneof![
            6 => "[A-Za-z0-9_-]{1,26}",
            1 => "[A-Za-z0-9_-]{27,40}",
            1 => "[^\\r\\n]{0,30}",
            1 => "r{60000}",
        ],
    )
}

/// Headers beside jetinfer's: any valid name (or one jetinfer reads again,
/// or the client's malformed mark) with any value a header can hold.
fn extra_headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        12 => "[!-9;-~]{1,20}",
        1 => proptest::sample::select(&headers::READ_ONCE[..]).prop_map(str::to_string),
        1 => Just(headers::MALFORMED.to_string()),
    ];
    let value = prop_oneof![
        12 => "[ -~]{0,40}",
        2 => "[^\\r\\n]{0,40}",
        1 => "[ -~]{4000,4100}",
    ];
    proptest::collection::vec((name, value), 0..2)
}

fn header_map(
    reply_to: &Option<String>,
    msg_id: &str,
    traceparent: &Option<String>,
    bulk_run: &Option<String>,
    extra: &[(String, String)],
) -> HeaderMap {
    let mut map = HeaderMap::new();
    if let Some(reply_to) = reply_to {
        map.insert(headers::REPLY_TO, reply_to.as_str());
    }
    map.insert(headers::MSG_ID, msg_id);
    if let Some(t) = traceparent {
        map.insert(headers::TRACEPARENT, t.as_str());
    }
    if let Some(run) = bulk_run {
        map.insert(headers::BULK_RUN, run.as_str());
    }
    for (name, value) in extra {
        map.append(name.as_str(), value.as_str());
    }
    map
}

/// The header rules, written out again independently of intake's code:
/// whether a job with `map` may be admitted.
fn headers_keep_the_rules(map: &HeaderMap) -> bool {
    let mut bytes = "NATS/1.0\r\n\r\n".len();
    for (name, values) in map.iter() {
        let name: &str = name.as_ref();
        let name_ok =
            !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
        if !name_ok || name == headers::MALFORMED {
            return false;
        }
        if headers::READ_ONCE.contains(&name) && values.len() > 1 {
            return false;
        }
        for value in values {
            // The reply policy judges the reply subject's characters.
            if name != headers::REPLY_TO && value.as_str().chars().any(char::is_control) {
                return false;
            }
            bytes += name.len() + ": ".len() + value.as_str().len() + "\r\n".len();
        }
    }
    let id_ok = map.get(headers::MSG_ID).is_none_or(|id| {
        let id = id.as_str();
        // 128 bytes of job id, plus 33 of the producer's tag or 28 of a
        // replay suffix, counted generously: 128 + 33 + 28.
        !id.is_empty() && id.len() <= 189 && id.bytes().all(|b| b.is_ascii_graphic())
    });
    let run_ok = map
        .get(headers::BULK_RUN)
        .is_none_or(|run| subjects::check_run_id(run.as_str()).is_ok());
    bytes <= 4096 && id_ok && run_ok
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn intake_screening_never_panics_never_admits_a_bad_job_never_replies_where_forbidden(
        (subject, reply_to) in subject_and_reply(),
        msg_id in msg_id(),
        traceparent in traceparent(),
        bulk_run in bulk_run(),
        extra in extra_headers(),
        payload in job_bytes(),
    ) {
        let policy = ReplyPolicy::default();
        let rules = Rules { model: MODEL, task: Task::Embed, limits: &LIMITS, reply: &policy };
        let map = header_map(&reply_to, &msg_id, &traceparent, &bulk_run, &extra);
        let headers = JobHeaders::read(Some(&map));
        let reply_to = map.get(headers::REPLY_TO).map(|r| r.as_str().to_string());
        prop_assert_eq!(&headers.reply_to, &reply_to);
        prop_assert_eq!(headers.invalid.is_none(), headers_keep_the_rules(&map), "{:?}", headers.invalid);
        if headers.invalid.is_none() {
            let run = map.get(headers::BULK_RUN).map(|r| r.as_str().to_string());
            prop_assert_eq!(&headers.bulk_run, &run);
        } else {
            prop_assert_eq!(&headers.bulk_run, &None);
        }
        if let Some(t) = &headers.traceparent {
            prop_assert!(valid_traceparent(t), "malformed traceparent kept: {t:?}");
        }
        let reply_allowed = reply_to.as_deref().map(|r| policy.check(&subject, r).is_ok());

        match screen(&subject, &headers, &payload, &rules, OffsetDateTime::now_utc()) {
            Ok(admitted) => {
                prop_assert!(headers_keep_the_rules(&map));
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
                prop_assert!(headers.invalid.is_none());
            }
            Err(Refusal::Error { reply_to: answer_on, error, .. }) => {
                // Either no reply at all, or one on an allowed subject.
                prop_assert_eq!(answer_on.is_some(), reply_allowed == Some(true));
                // A job whose headers break a rule is refused for that first.
                prop_assert_eq!(
                    error.code == ErrorCode::InvalidHeader,
                    headers.invalid.is_some()
                );
                prop_assert!(error.message.len() <= 512, "{}", error.message);
                prop_assert!(!error.message.chars().any(char::is_control), "{}", error.message);
                if payload.len() > LIMITS.max_job_bytes && answer_on.is_some() && headers.invalid.is_none() {
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
        let headers = JobHeaders::read(Some(&header_map(&reply_to, &msg_id, &traceparent, &None, &[])));
        prop_assert_eq!(&headers.msg_id, &msg_id);
        prop_assert_eq!(
            headers.traceparent.is_some(),
            traceparent.as_deref().is_some_and(valid_traceparent)
        );
        prop_assert_eq!(JobHeaders::read(None), JobHeaders::default());
    }
}
