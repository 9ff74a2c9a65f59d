//! Supervision: a worker is never silently stuck. Each pipeline stage runs
//! under a [`Supervisor`], which reports a stage that ends (returns or
//! panics) while the worker is not stopping; [`watch_connection`] reports a
//! NATS connection that is gone or stays disconnected past
//! `[supervision] max_disconnected`. The first report is a [`Failure`]:
//! the worker reports not ready, stops its progress acks, hands back what
//! it holds and returns it from `Worker::run_until_stopped`, and the binary
//! exits with [`Failure::exit_code`], so an orchestrator restarts it.
//!
//! Panics are kept as text for logs, error replies and dead letters only
//! through [`panic_message`]: escaped and bounded, whatever the payload held.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::http::Health;

/// Most characters of a panic message kept (after escaping).
pub const MAX_PANIC_MESSAGE_CHARS: usize = 200;
/// How often the connection watch looks at the NATS connection.
const CONNECTION_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a flush may take before the connection counts as not answering.
const FLUSH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reports kept until the worker reads them; the first one is what counts.
const REPORTS: usize = 8;

/// Exit status of the binary after a failure while running (1 is a failure
/// to start: configuration, model, NATS at start-up).
pub const EXIT_STAGE_GONE: u8 = 2;
pub const EXIT_CONNECTION_LOST: u8 = 3;

/// A pipeline stage, named as operators see it in logs and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Intake,
    Batch,
    Infer,
    Publish,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Intake => "intake",
            Stage::Batch => "batch",
            Stage::Infer => "infer",
            Stage::Publish => "publish",
        })
    }
}

/// Why a running worker stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// A stage ended while the worker was not stopping: nothing after it
    /// (or before it) can make progress. `model`: the served model whose
    /// pipeline it is (each model has its own stages).
    #[error("pipeline stage {stage}{} is gone: {why}", of_model(model.as_deref()))]
    StageGone {
        stage: Stage,
        model: Option<String>,
        why: String,
    },
    /// The client's connection task is gone (it panicked, or the connection
    /// was closed): it never reconnects.
    #[error("the NATS connection is gone for good: {0}")]
    ConnectionGone(String),
    /// Disconnected (reconnecting) for longer than the configured bound.
    #[error("disconnected from NATS for more than {0:?} ([supervision] max_disconnected)")]
    ConnectionLost(Duration),
}

/// " of model NAME", or nothing for a stage of no one model.
fn of_model(model: Option<&str>) -> String {
    model.map(|m| format!(" of model {m}")).unwrap_or_default()
}

impl Failure {
    /// The binary's exit status for this failure (never 0).
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::StageGone { .. } => EXIT_STAGE_GONE,
            Failure::ConnectionGone(_) | Failure::ConnectionLost(_) => EXIT_CONNECTION_LOST,
        }
    }

    /// Whether NATS is out of reach: nothing said to it would arrive.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            Failure::ConnectionGone(_) | Failure::ConnectionLost(_)
        )
    }
}

/// Runs the stages and reports the ones that end too soon. Cheap to clone.
///
/// Role in shutdown: it reads the worker's shutdown token only to tell a
/// stage that ends because the worker is stopping (normal) from one that
/// ends on its own (a [`Failure`]); it never cancels anything itself.
#[derive(Clone)]
pub struct Supervisor {
    stopping: CancellationToken,
    reports: mpsc::Sender<Failure>,
    /// The model whose stages this one runs ([`Supervisor::for_model`]):
    /// a worker serving several says which one failed.
    model: Option<Arc<str>>,
}

impl Supervisor {
    /// A supervisor and the receiver of its reports. A stage ending after
    /// `stopping` fired is not reported.
    pub fn new(stopping: CancellationToken) -> (Self, mpsc::Receiver<Failure>) {
        let (reports, receiver) = mpsc::channel(REPORTS);
        (
            Self {
                stopping,
                reports,
                model: None,
            },
            receiver,
        )
    }

    /// The same supervisor for `model`'s stages: the failures it reports
    /// name the model.
    pub fn for_model(&self, model: &str) -> Self {
        Self {
            model: Some(model.into()),
            ..self.clone()
        }
    }

    /// Reports `stage` of this supervisor's model gone, for `why`.
    pub fn stage_gone(&self, stage: Stage, why: impl Into<String>) {
        self.report(Failure::StageGone {
            stage,
            model: self.model.as_deref().map(str::to_string),
            why: why.into(),
        });
    }

    /// Reports `failure` unless the worker is already stopping. Never
    /// blocks (callable from the inference thread); reports beyond the
    /// first few are dropped, as only the first one is acted on.
    pub fn report(&self, failure: Failure) {
        if self.stopping.is_cancelled() {
            return;
        }
        tracing::error!(%failure, "worker failure");
        let _ = self.reports.try_send(failure);
    }

    /// Spawns `stage` on the runtime; when it returns or panics while the
    /// worker is not stopping, that is reported. The stage's future is
    /// dropped only after the report, so the stages it was feeding see their
    /// input close after the root cause is on record.
    pub fn spawn<F>(&self, stage: Stage, run: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let supervisor = self.clone();
        tokio::spawn(async move {
            let mut run = std::pin::pin!(AssertUnwindSafe(run).catch_unwind());
            let outcome = run.as_mut().await;
            supervisor.ended(stage, outcome);
        })
    }

    /// What a stage's end means: a panic with its message, or a return.
    pub fn ended(&self, stage: Stage, outcome: Result<(), Box<dyn Any + Send>>) {
        let why = match outcome {
            Ok(()) => "it ended".to_string(),
            Err(payload) => format!("it panicked: {}", panic_message(payload.as_ref())),
        };
        self.stage_gone(stage, why);
    }
}

/// A panic's message, escaped (control characters, quotes and non-ASCII
/// shown as escapes) and cut to [`MAX_PANIC_MESSAGE_CHARS`], safe for logs,
/// error replies and dead letters.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    let raw = if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.as_str()
    } else {
        "(a panic without a message)"
    };
    bounded_escape(raw, MAX_PANIC_MESSAGE_CHARS)
}

/// `text` with every character outside printable ASCII escaped, at most
/// `limit` characters long (then ending in `…`).
pub fn bounded_escape(text: &str, limit: usize) -> String {
    let mut shown = String::new();
    let mut count = 0;
    for c in text.chars() {
        let escaped: String = if c == ' ' || (c.is_ascii_graphic() && c != '\\') {
            c.to_string()
        } else {
            c.escape_default().collect()
        };
        // Escapes are ASCII: bytes are characters.
        if count + escaped.len() > limit {
            shown.push('…');
            return shown;
        }
        count += escaped.len();
        shown.push_str(&escaped);
    }
    shown
}

/// Watches the NATS connection until `stop` fires. While disconnected,
/// `/readyz` says so (the client's state, read live by [`Health`]); a
/// connection task that is gone, or a disconnection longer than
/// `max_disconnected`, is reported as a [`Failure`]. A reconnect within the
/// bound starts the count again.
///
/// Role in shutdown: a side task, stopped with the others after the drain.
pub async fn watch_connection(
    client: async_nats::Client,
    max_disconnected: Duration,
    health: Health,
    supervisor: Supervisor,
    stop: CancellationToken,
) {
    use async_nats::client::FlushErrorKind;
    use async_nats::connection::State;
    let mut ticker = tokio::time::interval(CONNECTION_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut away_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // The state alone is not enough: a connection task that panicked
        // leaves its last state (Connected) behind. A flush goes through
        // that task, so it fails at once when the task is gone. While
        // disconnected a flush would only wait for the reconnect: skipped.
        let connected = client.connection_state() == State::Connected;
        if connected {
            let answering = match tokio::time::timeout(FLUSH_PROBE_TIMEOUT, client.flush()).await {
                Ok(Ok(())) => true,
                Ok(Err(err)) if err.kind() == FlushErrorKind::SendError => {
                    health.set_connection_gone();
                    supervisor.report(Failure::ConnectionGone(err.to_string()));
                    return;
                }
                Ok(Err(_)) | Err(_) => false,
            };
            health.set_connection_answering(answering);
            if answering {
                if away_since.take().is_some() {
                    tracing::info!("NATS connection back");
                }
                continue;
            }
        }
        let since = *away_since.get_or_insert_with(|| {
            tracing::warn!(bound = ?max_disconnected, "NATS connection lost; reconnecting");
            Instant::now()
        });
        if since.elapsed() >= max_disconnected {
            supervisor.report(Failure::ConnectionLost(max_disconnected));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_escaped_and_bounded() {
        let payload: Box<dyn Any + Send> = Box::new("a\u{1b}[2J\r\nb\"".to_string());
        assert_eq!(panic_message(payload.as_ref()), "a\\u{1b}[2J\\r\\nb\"");
        let long: Box<dyn Any + Send> = Box::new("x".repeat(1000));
        let shown = panic_message(long.as_ref());
        assert_eq!(shown.chars().count(), MAX_PANIC_MESSAGE_CHARS + 1);
        assert!(shown.ends_with('…'));
        let other: Box<dyn Any + Send> = Box::new(42u32);
        assert_eq!(panic_message(other.as_ref()), "(a panic without a message)");
    }

    #[tokio::test]
    async fn a_stage_that_panics_or_returns_is_reported_unless_stopping() {
        let stopping = CancellationToken::new();
        let (supervisor, mut reports) = Supervisor::new(stopping.clone());
        supervisor
            .spawn(Stage::Publish, async { panic!("boom\n") })
            .await
            .unwrap();
        assert_eq!(
            reports.recv().await,
            Some(Failure::StageGone {
                stage: Stage::Publish,
                model: None,
                why: "it panicked: boom\\n".into()
            })
        );
        // A model's stages name it.
        let reranker = supervisor.for_model("reranker");
        reranker.spawn(Stage::Batch, async {}).await.unwrap();
        let failure = reports.recv().await.expect("reported");
        assert_eq!(
            failure,
            Failure::StageGone {
                stage: Stage::Batch,
                model: Some("reranker".into()),
                why: "it ended".into()
            }
        );
        assert_eq!(
            failure.to_string(),
            "pipeline stage batch of model reranker is gone: it ended"
        );
        drop(reranker);
        stopping.cancel();
        supervisor.spawn(Stage::Intake, async {}).await.unwrap();
        drop(supervisor);
        assert_eq!(
            reports.recv().await,
            None,
            "a stage ending on stop is normal"
        );
    }

    #[test]
    fn every_failure_exits_non_zero() {
        let failures = [
            Failure::StageGone {
                stage: Stage::Infer,
                model: None,
                why: String::new(),
            },
            Failure::ConnectionGone(String::new()),
            Failure::ConnectionLost(Duration::from_secs(1)),
        ];
        for failure in failures {
            assert_ne!(failure.exit_code(), 0, "{failure}");
            assert_ne!(failure.exit_code(), 1, "1 is a failure to start");
        }
    }
}
