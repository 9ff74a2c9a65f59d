//! The wire format round-trips, stays readable across versions, validates with
//! its named limits, and never panics on hostile bytes.

use jetinfer_schemas::*;
use proptest::prelude::*;

fn sample_result() -> JobResult {
    JobResult::ok(
        "job-1".into(),
        Embeddings {
            model: ModelInfo {
                id: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: "abc".into(),
                dimension: 3,
            },
            embeddings: vec![vec![0.1, -0.2, 0.3], vec![1.0, 0.0, -1.0]],
            token_counts: vec![5, 7],
            truncated: vec![false, true],
            timings: Timings {
                queue_wait_us: 10,
                inference_us: 20,
                batch_size: 4,
            },
        },
    )
}

#[test]
fn job_round_trips_through_messagepack() {
    let job = Job::new("minilm", vec!["hello".into(), "".into(), "héllo 🌍".into()])
        .with_options(JobOptions {
            normalize: false,
            truncation: Truncation::Reject,
            dimensions: Some(8),
        })
        .with_deadline_unix_ms(1_700_000_000_000);
    let decoded = decode_job(&encode_job(&job), &Limits::default()).unwrap();
    assert_eq!(decoded, job);
}

#[test]
fn results_and_errors_round_trip() {
    let ok = sample_result();
    assert_eq!(decode_result(&encode_result(&ok)).unwrap(), ok);
    let err = JobResult::error(
        "job-2".into(),
        JobError::new(ErrorCode::DeadlineExceeded, "too late"),
    );
    assert_eq!(decode_result(&encode_result(&err)).unwrap(), err);
}

#[test]
fn fields_are_named_on_the_wire_so_they_can_be_added_later() {
    // A reader that knows only some fields still reads a job written with more.
    #[derive(serde::Serialize)]
    struct FutureJob<'a> {
        version: u16,
        id: &'a str,
        model: &'a str,
        inputs: Vec<&'a str>,
        priority: u8,
    }
    let bytes = rmp_serde::to_vec_named(&FutureJob {
        version: 1,
        id: "j",
        model: "m",
        inputs: vec!["a"],
        priority: 9,
    })
    .unwrap();
    let job = decode_job(&bytes, &Limits::default()).unwrap();
    assert_eq!(job.id, "j");
    assert_eq!(
        job.options,
        JobOptions::default(),
        "missing options take defaults"
    );
    assert!(job.options.normalize);
}

#[test]
fn unknown_error_code_from_a_newer_worker_still_decodes() {
    #[derive(serde::Serialize)]
    struct Err<'a> {
        code: &'a str,
        message: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Out<'a> {
        error: Err<'a>,
    }
    #[derive(serde::Serialize)]
    struct Res<'a> {
        version: u16,
        job_id: &'a str,
        outcome: Out<'a>,
    }
    let bytes = rmp_serde::to_vec_named(&Res {
        version: 1,
        job_id: "j",
        outcome: Out {
            error: Err {
                code: "gpu_on_fire",
                message: "m",
            },
        },
    })
    .unwrap();
    let err = decode_result(&bytes).unwrap().into_result().unwrap_err();
    assert_eq!(err.code, ErrorCode::Unknown);
}

#[test]
fn too_costly_errors_round_trip_under_their_wire_name_without_retry_after() {
    let refused = JobResult::error(
        "job-5".into(),
        JobError::new(ErrorCode::TooCostly, "more tokens than the burst"),
    );
    let bytes = encode_result(&refused);
    assert!(bytes.windows(10).any(|w| w == b"too_costly"));
    let back = decode_result(&bytes).unwrap().into_result().unwrap_err();
    assert_eq!(back.code, ErrorCode::TooCostly);
    assert_eq!(back.code.as_str(), "too_costly");
    // Waiting would not help, so the worker names no wait.
    assert_eq!(back.retry_after(), None);
}

#[test]
fn rate_limited_errors_carry_retry_after_and_older_readers_still_decode_them() {
    let limited = JobResult::error(
        "job-3".into(),
        JobError::rate_limited("slow down", std::time::Duration::from_millis(1500)),
    );
    let bytes = encode_result(&limited);
    let back = decode_result(&bytes).unwrap().into_result().unwrap_err();
    assert_eq!(back.code, ErrorCode::RateLimited);
    assert_eq!(back.code.as_str(), "rate_limited");
    assert_eq!(
        back.retry_after(),
        Some(std::time::Duration::from_millis(1500))
    );

    // A reader built before `retry_after_ms` existed ignores it.
    #[derive(serde::Deserialize)]
    struct OldError {
        code: String,
        message: String,
    }
    #[derive(serde::Deserialize)]
    struct OldOutcome {
        error: OldError,
    }
    #[derive(serde::Deserialize)]
    struct OldResult {
        outcome: OldOutcome,
    }
    let old: OldResult = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(old.outcome.error.code, "rate_limited");
    assert_eq!(old.outcome.error.message, "slow down");

    // Other errors leave the field off the wire entirely.
    let plain = encode_result(&JobResult::error(
        "job-4".into(),
        JobError::new(ErrorCode::Internal, "x"),
    ));
    assert!(!plain.windows(14).any(|w| w == b"retry_after_ms"));
}

#[test]
fn an_input_that_is_not_utf8_is_a_typed_invalid_input_error() {
    let mut bytes = encode_job(&Job::new("minilm", vec!["QQQQ".into()]).with_id("utf8"));
    let at = bytes.windows(4).position(|w| w == b"QQQQ").unwrap();
    bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    let err: JobError = decode_job(&bytes, &Limits::default()).unwrap_err().into();
    assert_eq!(err.code, ErrorCode::InvalidInput);
}

#[test]
fn oversized_payload_is_refused_before_parsing() {
    let limits = Limits {
        max_job_bytes: 16,
        ..Limits::default()
    };
    let job = Job::new("minilm", vec!["a fairly long input text".into()]);
    let err = decode_job(&encode_job(&job), &limits).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { limit: 16, .. }));
    assert_eq!(JobError::from(err).code, ErrorCode::PayloadTooLarge);
}

#[test]
fn garbage_is_a_typed_invalid_input_error() {
    let err = decode_job(b"\xc1not msgpack", &Limits::default()).unwrap_err();
    assert_eq!(JobError::from(err).code, ErrorCode::InvalidInput);
}

#[test]
fn validation_names_the_limit_that_was_broken() {
    let limits = Limits {
        max_job_bytes: 1 << 20,
        max_inputs_per_job: 2,
        max_chars_per_input: 5,
        ..Limits::default()
    };
    let code = |job: Job| job.validate(&limits).unwrap_err().code;

    assert!(Job::new("m", vec!["ok".into()]).validate(&limits).is_ok());
    assert_eq!(code(Job::new("m", vec![])), ErrorCode::InvalidInput);
    assert_eq!(
        code(Job::new("m", vec!["a".into(), "b".into(), "c".into()])),
        ErrorCode::TooManyInputs
    );
    assert_eq!(
        code(Job::new("m", vec!["abcdef".into()])),
        ErrorCode::InputTooLong
    );
    // Five characters in more than five bytes is within the limit.
    assert!(Job::new("m", vec!["ééééé".into()])
        .validate(&limits)
        .is_ok());
    assert_eq!(
        code(Job::new("", vec!["a".into()])),
        ErrorCode::InvalidInput
    );
    assert_eq!(
        code(Job::new("m", vec!["a".into()]).with_id("has space")),
        ErrorCode::InvalidInput
    );
    assert_eq!(
        code(Job::new("m", vec!["a".into()]).with_id("x".repeat(129))),
        ErrorCode::InvalidInput
    );
    let mut future = Job::new("m", vec!["a".into()]);
    future.version = WIRE_VERSION + 1;
    assert_eq!(code(future), ErrorCode::UnsupportedVersion);
}

#[test]
fn generated_job_ids_are_unique_and_valid() {
    let a = Job::new("m", vec!["x".into()]);
    let b = Job::new("m", vec!["x".into()]);
    assert_ne!(a.id, b.id);
    assert!(a.validate(&Limits::default()).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(job) = decode_job(&bytes, &Limits::default()) {
            let _ = job.validate(&Limits::default());
        }
        let _ = decode_result(&bytes);
    }

    #[test]
    fn any_valid_job_round_trips(
        id in "[A-Za-z0-9_-]{1,40}",
        model in "[a-z0-9-]{1,20}",
        inputs in proptest::collection::vec(".{0,50}", 1..8),
        normalize in any::<bool>(),
        deadline in proptest::option::of(any::<u64>()),
    ) {
        let mut job = Job::new(model, inputs).with_id(id).with_options(JobOptions {
            normalize,
            truncation: Truncation::Truncate,
            dimensions: None,
        });
        job.deadline_unix_ms = deadline;
        let decoded = decode_job(&encode_job(&job), &Limits::default()).unwrap();
        prop_assert_eq!(&decoded, &job);
        prop_assert!(decoded.validate(&Limits::default()).is_ok());
    }

    #[test]
    fn mutated_valid_jobs_never_panic(flip in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = encode_job(&Job::new("minilm", vec!["some text".into(), "more".into()]));
        let at = flip % bytes.len();
        bytes[at] = byte;
        if let Ok(job) = decode_job(&bytes, &Limits::default()) {
            let _ = job.validate(&Limits::default());
        }
    }
}

#[test]
fn dimensions_stay_off_the_wire_unless_asked_so_older_workers_read_the_job() {
    let plain = encode_job(&Job::new("minilm", vec!["a".into()]));
    assert!(!plain.windows(10).any(|w| w == b"dimensions"));

    let asked = Job::new("minilm", vec!["a".into()]).with_options(JobOptions {
        dimensions: Some(64),
        ..JobOptions::default()
    });
    let bytes = encode_job(&asked);
    assert_eq!(
        decode_job(&bytes, &Limits::default())
            .unwrap()
            .options
            .dimensions,
        Some(64)
    );
    // A reader built before `dimensions` existed ignores it.
    #[derive(serde::Deserialize)]
    struct OldOptions {
        normalize: bool,
    }
    #[derive(serde::Deserialize)]
    struct OldJob {
        options: OldOptions,
    }
    let old: OldJob = rmp_serde::from_slice(&bytes).unwrap();
    assert!(old.options.normalize);
}

#[test]
fn dimensions_of_zero_or_past_the_model_width_are_invalid_input() {
    let job = |n| {
        Job::new("minilm", vec!["a".into()]).with_options(JobOptions {
            dimensions: Some(n),
            ..JobOptions::default()
        })
    };
    let zero = job(0).validate(&Limits::default()).unwrap_err();
    assert_eq!(zero.code, ErrorCode::InvalidInput);
    assert!(job(384).validate(&Limits::default()).is_ok());
    assert!(job(384).options.check_dimensions(384).is_ok());
    let wide = job(385).options.check_dimensions(384).unwrap_err();
    assert_eq!(wide.code, ErrorCode::InvalidInput);
    assert!(wide.message.contains("384"), "{}", wide.message);
    assert!(JobOptions::default().check_dimensions(384).is_ok());
}

/// The job as a version-1 reader sees it: its fields, by name.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct V1Job {
    version: u16,
    id: String,
    model: String,
    inputs: Vec<String>,
    options: JobOptions,
    #[serde(default)]
    deadline_unix_ms: Option<u64>,
}

#[test]
fn embedding_jobs_stay_version_1_with_no_new_fields() {
    let job = Job::new("minilm", vec!["hello".into()]);
    assert_eq!(job.version, EMBED_WIRE_VERSION);
    let v1: V1Job = rmp_serde::from_slice(&encode_job(&job)).expect("a v1 reader reads it");
    assert_eq!(v1.version, 1);
    assert!(job.validate(&Limits::default()).is_ok());
    let result = sample_result();
    assert_eq!(result.version, EMBED_WIRE_VERSION);
}

#[test]
fn rerank_jobs_are_version_2_so_version_1_workers_refuse_them() {
    let job = Job::rerank("ce", "cold rain", vec!["warm sun".into()], Some(1));
    assert_eq!(job.version, RERANK_WIRE_VERSION);
    let back = decode_job(&encode_job(&job), &Limits::default()).unwrap();
    assert_eq!(back, job);
    assert_eq!(back.task, Task::Rerank);
    assert_eq!(back.rerank.unwrap().top_n, Some(1));
    // A version-1 worker refuses any job above version 1, typed
    // (`unsupported_version`), rather than embedding its documents.
    assert!(job.version > EMBED_WIRE_VERSION);
}

#[test]
fn a_task_no_version_knows_decodes_and_is_refused_unsupported_task() {
    #[derive(serde::Serialize)]
    struct Newer<'a> {
        version: u16,
        id: &'a str,
        model: &'a str,
        task: &'a str,
        inputs: Vec<&'a str>,
    }
    let bytes = rmp_serde::to_vec_named(&Newer {
        version: 2,
        id: "j",
        model: "m",
        task: "classify",
        inputs: vec!["x"],
    })
    .unwrap();
    let job = decode_job(&bytes, &Limits::default()).expect("decodes");
    assert_eq!(job.task, Task::Unknown);
    let err = job.validate(&Limits::default()).unwrap_err();
    assert_eq!(err.code, ErrorCode::UnsupportedTask);
}

#[test]
fn rerank_validation_names_what_was_wrong() {
    let limits = Limits {
        max_documents_per_rerank: 2,
        max_chars_per_input: 10,
        ..Limits::default()
    };
    let code = |job: Job| job.validate(&limits).unwrap_err().code;
    let docs = |n: usize| vec!["doc".to_string(); n];
    assert!(Job::rerank("m", "q", docs(2), None)
        .validate(&limits)
        .is_ok());
    assert_eq!(
        code(Job::rerank("m", "q", docs(0), None)),
        ErrorCode::InvalidInput
    );
    assert_eq!(
        code(Job::rerank("m", "q", docs(3), None)),
        ErrorCode::TooManyInputs
    );
    assert_eq!(
        code(Job::rerank("m", "q", docs(1), Some(0))),
        ErrorCode::InvalidInput
    );
    assert_eq!(
        code(Job::rerank("m", "a query too long", docs(1), None)),
        ErrorCode::InputTooLong
    );
    let mut no_query = Job::rerank("m", "q", docs(1), None);
    no_query.rerank = None;
    assert_eq!(code(no_query), ErrorCode::InvalidInput);
}

#[test]
fn rerank_results_round_trip_and_are_not_embeddings() {
    let reranked = Reranked {
        model: ModelInfo {
            id: "ce".into(),
            revision: "r".into(),
            dimension: 1,
        },
        results: vec![RerankScore {
            index: 1,
            score: 0.7,
            logit: 0.85,
        }],
        token_counts: vec![5, 7],
        truncated: vec![false, false],
        timings: Timings::default(),
    };
    let result = JobResult::reranked("j".into(), reranked.clone());
    assert_eq!(result.version, RERANK_WIRE_VERSION);
    let back = decode_result(&encode_result(&result)).unwrap();
    assert_eq!(back.clone().into_reranked().unwrap(), reranked);
    assert_eq!(
        back.into_result().unwrap_err().code,
        ErrorCode::UnsupportedTask
    );
}
