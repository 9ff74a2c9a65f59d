//! The intake stage: pulls job messages from the model's consumer, screens
//! them ([`JobHeaders::read`] and [`screen`]: headers, reply subject, size,
//! decoding, limits, model, deadline), applies the tenant's limits (held
//! jobs, jobs and inputs per second), tokenises their inputs off the
//! runtime, charges the tokens to the tenant's token rate, and hands
//! admitted jobs to the batcher. A job that can never succeed is
//! answered here with a typed error and never reaches the model.

use std::sync::Arc;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::HeaderMap;
use futures::StreamExt;
use jetinfer_nats::publish::valid_traceparent;
use jetinfer_nats::subjects::{self, ForbiddenReply, ReplyPolicy};
use jetinfer_schemas::{
    decode_job, escape_within, headers, ErrorCode, Job, JobError, Limits, Task, Truncation,
    Untrusted,
};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use std::sync::atomic::AtomicBool;

use crate::backend::{Backend, BackendError, Tokens};
use crate::cancel::{cancelled_error, Cancellations};
use crate::config::PullConfig;
use crate::job::{deadline_error, expired, InFlightJob};
use crate::rate_limit::TenantLimits;
use crate::settle::{Delivery, Settler};

/// Pause before pulling again after a pull failed (e.g. while the server
/// restarts).
const REPULL_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// Most bytes of text a chunk may hold for intake to tokenise it on the
/// runtime instead of on a blocking thread. The hop to a blocking thread and
/// back is two thread wake-ups, and on a busy machine each can wait
/// milliseconds for a core; tokenising a text of about 100 bytes (the
/// corpus's median single text) took about 50 us, 500 bytes about 250 us
/// (MiniLM's tokenizer, loaded 2-core machine), so this bound keeps a
/// chunk's time on the runtime near 100 us (docs/benchmarks.md,
/// "Light load, issue 20 (c)").
const INLINE_TOKENIZE_BYTES: usize = 256;

pub struct Intake {
    pub consumer: PullConsumer,
    pub backend: Arc<dyn Backend>,
    pub model: String,
    pub limits: Limits,
    pub pull: PullConfig,
    pub settler: Settler,
    /// Where results may go (reply-subject confinement).
    pub reply: ReplyPolicy,
    /// Shared by every model's intake: a tenant's rates are per worker.
    pub rates: Arc<TenantLimits>,
    pub cancellations: Arc<Cancellations>,
}

impl Intake {
    /// Pulls until `shutdown` fires; dropping `jobs` on return lets the
    /// batcher flush and the pipeline drain behind it.
    ///
    /// Pulls are discrete requests (`pull.batch` messages, expiring after
    /// `pull.expires`), so on shutdown the worker knows exactly what it was
    /// sent: messages of the last request that arrive after shutdown are
    /// NAKed for another worker at once instead of waiting out `ack_wait`.
    ///
    /// If the batcher is gone (the worker is failing, see
    /// [`crate::supervise`]), intake stops the same way: the rest of the
    /// request is handed back, and the job it could not pass on stays in the
    /// ledger for the stopping worker to hand back.
    pub async fn run(self, jobs: mpsc::Sender<Arc<InFlightJob>>, shutdown: CancellationToken) {
        let mut downstream_gone = false;
        while !shutdown.is_cancelled() && !downstream_gone {
            let request = self
                .consumer
                .batch()
                .max_messages(self.pull.batch)
                .expires(self.pull.expires)
                .messages()
                .await;
            let messages = match request {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(error = %Untrusted(&err), "pull failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(REPULL_DELAY) => continue,
                    }
                }
            };
            // Every message already arrived is taken at once, so the jobs of
            // one chunk are tokenised in one blocking call: one hop to a
            // blocking thread per chunk, not per job.
            let mut chunks = messages.ready_chunks(self.pull.batch.max(1));
            'pull: while let Some(chunk) = chunks.next().await {
                let mut ready: Vec<(Ready, tracing::Span)> = Vec::with_capacity(chunk.len());
                let mut interrupted = false;
                for next in chunk {
                    // From here on only the Settler can ack, NAK or term it.
                    let delivery = match next {
                        Ok(message) => Delivery::new(message),
                        Err(err) => {
                            tracing::warn!(error = %Untrusted(&err), "pull interrupted; pulling again");
                            interrupted = true;
                            break;
                        }
                    };
                    if shutdown.is_cancelled() || downstream_gone {
                        self.settler.hand_back_unread(delivery).await;
                        continue;
                    }
                    let headers = JobHeaders::read(delivery.headers());
                    let span = job_span(&headers);
                    // Jobs of this chunk not yet in the ledger count as held.
                    let held =
                        |tenant: &str| ready.iter().filter(|(r, _)| r.tenant == tenant).count();
                    if let Some(job) = self
                        .screen_delivery(delivery, headers, held)
                        .instrument(span.clone())
                        .await
                    {
                        ready.push((job, span));
                    }
                }
                let tokens = self.tokenize_all(&ready).await;
                for ((job, span), tokens) in ready.into_iter().zip(tokens) {
                    let Some(job) = self.admit(job, tokens).instrument(span.clone()).await else {
                        continue;
                    };
                    let job = Arc::new(job.with_span(span));
                    self.settler.admitted(&job);
                    if !downstream_gone && jobs.send(job).await.is_err() {
                        downstream_gone = true;
                    }
                }
                if interrupted {
                    tokio::time::sleep(REPULL_DELAY).await;
                    break 'pull;
                }
            }
        }
    }

    /// Screens a message and applies every limit that needs no tokens:
    /// what passes waits for its tokens ([`Ready`]); anything else is
    /// settled here and `None` returned. `held_in_chunk` counts a tenant's
    /// jobs that passed earlier in the same chunk (not yet in the ledger).
    async fn screen_delivery(
        &self,
        delivery: Delivery,
        headers: JobHeaders,
        held_in_chunk: impl Fn(&str) -> usize,
    ) -> Option<Ready> {
        let delivered = delivery.delivered();
        jetinfer_monitoring::job_received(&self.model, self.backend.task().as_str(), delivered);
        if self.settler.past_last_delivery(delivered) {
            crate::exhausted::bury_arrived(&self.settler, &delivery, &self.reply).await;
            return None;
        }
        let rules = Rules {
            model: &self.model,
            task: self.backend.task(),
            limits: &self.limits,
            reply: &self.reply,
        };
        let screened = match screen(
            delivery.subject(),
            &headers,
            delivery.payload(),
            &rules,
            OffsetDateTime::now_utc(),
        ) {
            Ok(screened) => screened,
            Err(Refusal::ForbiddenReply(why)) => {
                self.settler
                    .forbid_reply(&delivery, &headers.msg_id, &why)
                    .await;
                return None;
            }
            Err(Refusal::Error {
                reply_to,
                job_id,
                error,
            }) => {
                // An expired job is late, not poison: no dead letter.
                let keep = error.code != ErrorCode::DeadlineExceeded;
                self.settler
                    .give_up(&delivery, reply_to.as_deref(), &job_id, error, keep)
                    .await;
                return None;
            }
        };
        let Screened {
            job,
            reply_to,
            tenant,
        } = screened;
        // Needs the model's width, which only the backend knows: invalid
        // input like screen's refusals, so kept as a dead letter too.
        if let Err(error) = job.options.check_dimensions(self.backend.info().dimension) {
            self.settler
                .give_up(&delivery, Some(&reply_to), &job.id, error, true)
                .await;
            return None;
        }
        let cancel_flag = self.cancel_flag(delivery.subject(), headers.bulk_run.as_deref());
        if crate::cancel::is_cancelled(&cancel_flag) {
            // Answered, not poison: no dead letter. Before the rate limit,
            // so a cancelled run costs its tenant none of its rate.
            self.settler
                .give_up(
                    &delivery,
                    Some(&reply_to),
                    &job.id,
                    cancelled_error(),
                    false,
                )
                .await;
            return None;
        }
        // Before any work: the tenant's share of this worker, then its rates
        // by count and inputs. A refused job is answered, so not a dead
        // letter: retrying (or splitting a too costly job) is the client's call.
        let admitted = self
            .rates
            .check_held(
                &tenant,
                self.settler.ledger().held_by(&tenant) + held_in_chunk(&tenant),
            )
            .and_then(|()| self.rates.check_job(&tenant, job.inputs.len()));
        if let Err(refused) = admitted {
            let error = refused.error(&tenant);
            self.answer_refused(&delivery, &reply_to, &job.id, error)
                .await;
            return None;
        }
        Some(Ready {
            delivery,
            job,
            reply_to,
            tenant,
            cancel_flag,
        })
    }

    /// Tokenises the inputs of every job in `ready` in one blocking call,
    /// each job's result on its own; a chunk of at most
    /// [`INLINE_TOKENIZE_BYTES`] of text is tokenised here, on the runtime.
    async fn tokenize_all(
        &self,
        ready: &[(Ready, tracing::Span)],
    ) -> Vec<Result<Vec<Tokens>, JobError>> {
        if ready.is_empty() {
            return Vec::new();
        }
        let backend = Arc::clone(&self.backend);
        let inputs: Vec<TokenizeInputs> = ready
            .iter()
            .map(|(r, _)| TokenizeInputs {
                inputs: r.job.inputs.clone(),
                query: r.job.rerank.as_ref().map(|q| q.query.clone()),
            })
            .collect();
        let count = inputs.len();
        let tokenize = move || {
            inputs
                .into_iter()
                .map(|job| job.tokenize(backend.as_ref()))
                .collect::<Vec<_>>()
        };
        let bytes: usize = ready.iter().map(|(r, _)| r.text_bytes()).sum();
        // A panic in the tokenizer is the chunk's error either way, as
        // `spawn_blocking` reports it.
        let tokenized = if bytes <= INLINE_TOKENIZE_BYTES {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(tokenize))
                .map_err(|payload| crate::supervise::panic_message(payload.as_ref()))
        } else {
            tokio::task::spawn_blocking(tokenize)
                .await
                .map_err(|err| err.to_string())
        };
        match tokenized {
            Ok(all) => ready
                .iter()
                .zip(all)
                .map(|((r, _), tokens)| self.checked_tokens(&r.job, tokens))
                .collect(),
            Err(message) => {
                let error = JobError::new(ErrorCode::Internal, message);
                vec![Err(error); count]
            }
        }
    }

    /// Admits a screened job with its tokens (charged to its tenant's token
    /// rate), or settles it and returns `None`.
    async fn admit(
        &self,
        ready: Ready,
        tokens: Result<Vec<Tokens>, JobError>,
    ) -> Option<InFlightJob> {
        let Ready {
            delivery,
            job,
            reply_to,
            tenant,
            cancel_flag,
        } = ready;
        let (key, delivered, published) = match delivery.info() {
            Ok(info) => (info.stream_sequence, info.delivered, info.published),
            Err(_) => (0, 1, OffsetDateTime::now_utc()),
        };
        let tokens = match tokens {
            Ok(tokens) => tokens,
            Err(error) => {
                self.settler
                    .give_up(&delivery, Some(&reply_to), &job.id, error, true)
                    .await;
                return None;
            }
        };
        let cost = tokens.iter().map(|t| t.ids.len()).sum();
        if let Err(refused) = self.rates.check_tokens(&tenant, cost) {
            let error = refused.error(&tenant);
            self.answer_refused(&delivery, &reply_to, &job.id, error)
                .await;
            return None;
        }
        let admitted = InFlightJob::new(
            key,
            delivered,
            job.id,
            job.options,
            job.deadline_unix_ms,
            reply_to,
            delivery,
            published,
            tokens,
        )
        .with_cancel_flag(cancel_flag)
        .with_tenant(tenant);
        Some(match job.rerank {
            Some(rerank) if job.task == Task::Rerank => admitted.with_rerank(rerank.top_n),
            _ => admitted,
        })
    }

    /// Answers a job a limit refused and terminates it: no dead letter, since
    /// retrying (or splitting a too costly job) is the client's call.
    async fn answer_refused(&self, delivery: &Delivery, reply_to: &str, id: &str, error: JobError) {
        self.settler
            .give_up(delivery, Some(reply_to), id, error, false)
            .await;
    }

    /// The cancel flag of the bulk run the job belongs to, if it names one
    /// (`run`: screened, a valid run id). The tenant comes from the subject,
    /// never from the producer's header.
    fn cancel_flag(&self, subject: &str, run: Option<&str>) -> Option<Arc<AtomicBool>> {
        let (_, tenant) = subjects::parse_job(subject)?;
        Some(self.cancellations.flag(tenant, run?))
    }

    /// A job's tokens as the backend made them, or the error it is refused
    /// with (a query too long, or an input too long under `reject`).
    fn checked_tokens(
        &self,
        job: &Job,
        tokens: Result<Vec<Tokens>, BackendError>,
    ) -> Result<Vec<Tokens>, JobError> {
        let reject_long = job.options.truncation == Truncation::Reject;
        let tokens = tokens.map_err(|e| match e {
            BackendError::QueryTooLong { .. } => {
                JobError::new(ErrorCode::InputTooLong, format!("{e}: shorten the query"))
            }
            other => JobError::new(ErrorCode::Internal, other.to_string()),
        })?;
        if reject_long {
            if let Some(index) = tokens.iter().position(|t| t.truncated) {
                let what = match job.task {
                    Task::Rerank => format!("document {index} with the query"),
                    _ => format!("input {index}"),
                };
                return Err(JobError::new(
                    ErrorCode::InputTooLong,
                    format!(
                        "{what} is longer than the model's {} tokens; shorten it or allow truncation",
                        self.backend.max_seq_len()
                    ),
                ));
            }
        }
        Ok(tokens)
    }
}

/// A job that passed screening and every limit that needs no tokens,
/// waiting for its tokens.
struct Ready {
    delivery: Delivery,
    job: Job,
    reply_to: String,
    tenant: String,
    cancel_flag: Option<Arc<AtomicBool>>,
}

impl Ready {
    /// Bytes of text tokenising the job reads: each input, and for a rerank
    /// job the query once per document (each pair is tokenised whole).
    fn text_bytes(&self) -> usize {
        let inputs: usize = self.job.inputs.iter().map(String::len).sum();
        let query = self.job.rerank.as_ref().map_or(0, |q| q.query.len());
        inputs + query * self.job.inputs.len()
    }
}

/// What intake tokenises for one job: each text of an embedding
/// job, each (query, document) pair of a rerank job.
struct TokenizeInputs {
    inputs: Vec<String>,
    query: Option<String>,
}

impl TokenizeInputs {
    fn tokenize(self, backend: &dyn Backend) -> Result<Vec<Tokens>, BackendError> {
        match self.query {
            Some(query) => backend.tokenize_pairs(&query, &self.inputs),
            None => self
                .inputs
                .iter()
                .map(|text| backend.tokenize(text))
                .collect(),
        }
    }
}

/// The headers intake reads from a job message, whatever bytes they hold,
/// and the first rule the message's header block breaks, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobHeaders {
    /// Where the producer wants the result (`Jetinfer-Reply-To`), unchecked:
    /// [`screen`] checks it against the reply policy.
    pub reply_to: Option<String>,
    /// The job id from `Nats-Msg-Id` (without its de-duplication tag), or
    /// empty: what a job that cannot be decoded is answered and buried under.
    /// Raw: show it only through [`Untrusted`].
    pub msg_id: String,
    /// The producer's W3C `traceparent`, only if well-formed: anything else
    /// is dropped rather than carried into logs.
    pub traceparent: Option<String>,
    /// The bulk run the job belongs to (`Jetinfer-Bulk-Run`); a valid run id
    /// whenever `invalid` is `None`.
    pub bulk_run: Option<String>,
    /// Why the headers are refused; [`screen`] refuses the job with
    /// `invalid_header` before reading anything else.
    pub invalid: Option<HeaderError>,
}

/// Most characters of a header's name or value quoted in a refusal.
const SHOWN_IN_REASON: usize = 96;

/// Why a job's headers are refused. The message names the header and shows
/// what it held only escaped and cut short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The NATS client found a line that cannot be a header (it left the
    /// line out and said what it was in [`headers::MALFORMED`]).
    #[error("the header block is malformed: {0}")]
    Malformed(String),
    #[error(
        "the headers take {bytes} bytes, the limit is {}",
        headers::MAX_HEADER_BYTES
    )]
    TooLarge { bytes: usize },
    #[error("header {name} appears {count} times; it may appear once")]
    Repeated { name: &'static str, count: usize },
    #[error("header {name} is {len} bytes, the limit is {max}")]
    TooLong {
        name: &'static str,
        len: usize,
        max: usize,
    },
    #[error("header {name} {why}")]
    Invalid {
        name: &'static str,
        why: &'static str,
    },
    #[error("header name {0} is not ASCII 33-126 without ':'")]
    Name(String),
    #[error("header {name} holds control character {found}; header values are printable text")]
    Control { name: String, found: String },
}

impl JobHeaders {
    /// Reads and screens `headers`, most telling checks first: the client's
    /// mark of a malformed block; each header jetinfer reads (at most once,
    /// and valid: `Nats-Msg-Id` a printable ASCII id of at most
    /// [`headers::MAX_MSG_ID_LEN`] bytes, `Jetinfer-Bulk-Run` a run id); the
    /// total size ([`headers::MAX_HEADER_BYTES`], which bounds the work of
    /// the rest); then every header's name and value bytes, in name order.
    /// The reply subject's bytes are left to the reply policy ([`screen`]).
    pub fn read(headers: Option<&HeaderMap>) -> Self {
        let Some(map) = headers else {
            return Self::default();
        };
        let get = |name: &str| map.get(name).map(|v| v.as_str().to_string());
        let bulk_run = get(headers::BULK_RUN);
        let mut read = Self {
            reply_to: get(headers::REPLY_TO),
            msg_id: get(headers::MSG_ID)
                .map(|id| jetinfer_nats::publish::job_id_of(&id).to_string())
                .unwrap_or_default(),
            traceparent: get(headers::TRACEPARENT).filter(|t| valid_traceparent(t)),
            bulk_run: None,
            invalid: None,
        };
        match check_headers(map, bulk_run.as_deref()) {
            Ok(()) => read.bulk_run = bulk_run,
            Err(invalid) => read.invalid = Some(invalid),
        }
        read
    }

    /// The id an error reply for these headers carries: the job's
    /// `Nats-Msg-Id` (the producer's job id) when it is a valid one, else
    /// empty.
    fn reply_id(&self) -> &str {
        if headers::valid_msg_id(&self.msg_id) {
            &self.msg_id
        } else {
            ""
        }
    }
}

fn check_headers(map: &HeaderMap, bulk_run: Option<&str>) -> Result<(), HeaderError> {
    if let Some(what) = map.get_all(headers::MALFORMED).next() {
        return Err(HeaderError::Malformed(quote_marker(what.as_str())));
    }
    for name in headers::READ_ONCE {
        let count = map.get_all(name).count();
        if count > 1 {
            return Err(HeaderError::Repeated { name, count });
        }
    }
    if let Some(id) = map.get(headers::MSG_ID).map(|id| id.as_str()) {
        if id.len() > headers::MAX_MSG_ID_LEN {
            return Err(HeaderError::TooLong {
                name: headers::MSG_ID,
                len: id.len(),
                max: headers::MAX_MSG_ID_LEN,
            });
        }
        if !headers::valid_msg_id(id) {
            return Err(HeaderError::Invalid {
                name: headers::MSG_ID,
                why: "is not a job id: printable ASCII without spaces",
            });
        }
    }
    if let Some(run) = bulk_run {
        if run.len() > subjects::MAX_RUN_ID_LEN {
            return Err(HeaderError::TooLong {
                name: headers::BULK_RUN,
                len: run.len(),
                max: subjects::MAX_RUN_ID_LEN,
            });
        }
        if subjects::check_run_id(run).is_err() {
            return Err(HeaderError::Invalid {
                name: headers::BULK_RUN,
                why: "is not a run id: A-Z, a-z, 0-9, '-' and '_' only",
            });
        }
    }
    let lines = map
        .iter()
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(move |v| headers::line_bytes(name, v.as_str()))
        })
        .fold(0usize, usize::saturating_add);
    let bytes = headers::block_bytes(lines);
    if bytes > headers::MAX_HEADER_BYTES {
        return Err(HeaderError::TooLarge { bytes });
    }
    // Under the size limit there are few headers: sorting them makes the
    // reason the same whichever order the map holds them in.
    let mut names: Vec<&str> = map.iter().map(|(name, _)| name.as_ref()).collect();
    names.sort_unstable();
    for name in names {
        if !headers::valid_name(name) {
            return Err(HeaderError::Name(escape_within(name, SHOWN_IN_REASON)));
        }
        // The reply policy judges the reply subject, more strictly (literal
        // tokens of A-Z a-z 0-9 - _), and refuses it as a forbidden reply.
        if name == headers::REPLY_TO {
            continue;
        }
        for value in map.get_all(name) {
            if let Some(c) = headers::control_char(value.as_str()) {
                return Err(HeaderError::Control {
                    name: name.to_string(),
                    found: escape_within(&c.to_string(), 1),
                });
            }
        }
    }
    Ok(())
}

/// The client's description of a malformed block, as it is when it is
/// printable ASCII (the patched client escapes what it quotes), else
/// escaped (a publisher can set the header itself); cut short either way.
fn quote_marker(what: &str) -> String {
    if what.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        let mut shown: String = what.chars().take(SHOWN_IN_REASON).collect();
        if what.len() > shown.len() {
            shown.push('…');
        }
        shown
    } else {
        escape_within(what, SHOWN_IN_REASON)
    }
}

/// What a job is checked against before any work is spent on it.
pub struct Rules<'a> {
    /// The one model this worker serves: the model allow-list.
    pub model: &'a str,
    /// What that model does (embed or rerank): a job asking for the other
    /// task is answered `unsupported_task`.
    pub task: Task,
    pub limits: &'a Limits,
    pub reply: &'a ReplyPolicy,
}

/// A job that passed every check that needs no tokenizer.
#[derive(Debug)]
pub struct Screened {
    pub job: Job,
    /// Allowed by the reply policy for `tenant`.
    pub reply_to: String,
    /// From the job's subject, never from its payload.
    pub tenant: String,
}

/// Why a job is refused on arrival.
#[derive(Debug)]
pub enum Refusal {
    /// The reply subject is not allowed for the job's tenant: nothing may be
    /// published for this job; it becomes a dead letter.
    ForbiddenReply(ForbiddenReply),
    /// A typed error, replied to `reply_to` when there is one (always an
    /// allowed subject).
    Error {
        reply_to: Option<String>,
        job_id: String,
        error: JobError,
    },
}

/// Every check before tokenisation, cheapest and most important first: the
/// headers ([`JobHeaders::read`]; a refusal is answered only on an allowed
/// reply subject), the reply subject (so not even an error reply goes
/// anywhere it should not),
/// the message size (before decoding), decoding (MessagePack, UTF-8), the
/// limits (per task), the model allow-list, the task the model serves, the
/// deadline.
pub fn screen(
    subject: &str,
    headers: &JobHeaders,
    payload: &[u8],
    rules: &Rules<'_>,
    now: OffsetDateTime,
) -> Result<Screened, Refusal> {
    if let Some(invalid) = &headers.invalid {
        // Answered only where the reply policy allows, as every reply is.
        let reply_to = headers
            .reply_to
            .clone()
            .filter(|r| rules.reply.check(subject, r).is_ok());
        return Err(Refusal::Error {
            reply_to,
            job_id: headers.reply_id().to_string(),
            error: JobError::new(ErrorCode::InvalidHeader, invalid.to_string()),
        });
    }
    if let Some(reply_to) = &headers.reply_to {
        rules
            .reply
            .check(subject, reply_to)
            .map_err(Refusal::ForbiddenReply)?;
    }
    let refuse = |job_id: &str, error: JobError| Refusal::Error {
        reply_to: headers.reply_to.clone(),
        job_id: job_id.to_string(),
        error,
    };
    let job = decode_job(payload, rules.limits).map_err(|e| refuse(&headers.msg_id, e.into()))?;
    let Some(reply_to) = headers.reply_to.clone() else {
        return Err(refuse(
            &job.id,
            JobError::new(
                ErrorCode::InvalidInput,
                format!("job has no {} header: nobody to answer", headers::REPLY_TO),
            ),
        ));
    };
    job.validate(rules.limits).map_err(|e| refuse(&job.id, e))?;
    let parsed = subjects::parse_job(subject);
    let subject_model = parsed.map(|(model, _)| model);
    if job.model != rules.model || subject_model != Some(rules.model) {
        return Err(refuse(
            &job.id,
            JobError::new(
                ErrorCode::UnknownModel,
                format!(
                    "model {:?} is not served on this subject (this worker serves {:?})",
                    job.model, rules.model
                ),
            ),
        ));
    }
    if job.task != rules.task {
        return Err(refuse(
            &job.id,
            JobError::new(
                ErrorCode::UnsupportedTask,
                format!(
                    "model {:?} serves {} jobs, this job asks for {}",
                    rules.model, rules.task, job.task
                ),
            ),
        ));
    }
    if expired(job.deadline_unix_ms, now) {
        return Err(refuse(&job.id, deadline_error()));
    }
    // The reply check passed, so the subject names a valid tenant.
    let tenant = parsed.map(|(_, t)| t.to_string()).unwrap_or_default();
    Ok(Screened {
        job,
        reply_to,
        tenant,
    })
}

/// The span a job's log lines carry from intake to its reply: its JetStream
/// identity (escaped: it is whatever the publisher sent) and the producer's
/// `traceparent` (W3C trace context), if any, so logs join the caller's trace.
fn job_span(headers: &JobHeaders) -> tracing::Span {
    let traceparent = headers.traceparent.as_deref().unwrap_or_default();
    let trace_id = traceparent.split('-').nth(1).unwrap_or_default();
    tracing::info_span!(
        "job",
        id = %Untrusted(&headers.msg_id),
        traceparent = %traceparent,
        trace_id = %trace_id,
    )
}
