//! Which runner drives a batch: a lease kept in the batch's own record, so
//! that several gateway replicas serving one tenant run each batch once.
//!
//! The record in `JETINFER_BATCHES` is OpenAI's Batch object plus a `lease`
//! field (`owner`, `expires_at_ms`) that the API never shows ([`Record`]).
//! Every change is a compare-and-set on the entry's revision, so:
//!
//! - a runner takes a batch ([`Batches::acquire`]) only when its record has
//!   no lease, an expired one, or its own; of two runners trying at once,
//!   one write wins and the other sees `WrongLastRevision` and leaves it;
//! - the owner renews the lease every third of its TTL while it drives
//!   ([`Batches::hold_lease`]), and each of its own writes of the record
//!   ([`Batches::update_owned`]) checks that the lease is still its own and
//!   extends it; a write finding another owner is [`BatchError::LeaseLost`]
//!   and that drive stops where it stands;
//! - an owner that cannot renew (NATS away) stops driving once its lease
//!   could have expired, by its own monotonic clock, before anyone may take
//!   it over;
//! - a killed owner's lease expires `lease_ttl` after its last write and a
//!   surviving runner's next scan takes the batch over, resuming it from
//!   the record and the results stream as a restart does.
//!
//! Expiry is the owner's wall clock plus the TTL, judged by the taker's
//! wall clock: replicas' clocks must agree to within the TTL less the
//! renewal interval (two thirds of it), which NTP-kept hosts do by far.
//! A process paused for longer than its TTL (SIGSTOP, a frozen VM) can,
//! when it wakes, write at most the progress counts and output files it was
//! busy with before its next record write fails; the files it stores are
//! complete for the results it saw, under the same ids the new owner uses.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use super::{Batch, BatchError, Batches};

/// How long a lease lasts unless renewed: the longest a killed replica's
/// batches wait before a survivor takes them over.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// The shortest lease a handle accepts.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
/// Renewals per TTL: two may fail before the lease could lapse.
const RENEWALS_PER_TTL: u32 = 3;

/// A runner's claim on a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Lease {
    /// The runner's id ([`Batches::owner`]).
    pub owner: String,
    /// Unix milliseconds, by the owner's clock.
    pub expires_at_ms: i64,
}

/// A batch record as stored: OpenAI's object and, beside it, its lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    #[serde(flatten)]
    pub batch: Batch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a batch record serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, BatchError> {
        serde_json::from_slice(bytes)
            .map_err(|e| BatchError::Store(format!("a batch record is not readable: {e}")))
    }
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

impl Batches {
    /// This handle's runner id in leases: the process id (for operators
    /// reading a record) and a ULID (unique per handle).
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    fn lease_ttl(&self) -> Duration {
        self.inner.config.lease_ttl
    }

    fn fresh_lease(&self) -> Lease {
        Lease {
            owner: self.inner.owner.clone(),
            expires_at_ms: now_ms().saturating_add(ttl_ms(self.lease_ttl())),
        }
    }

    /// Takes batch `id`'s lease for this handle's runner when the batch is
    /// unfinished and its lease is absent, expired or already this
    /// runner's. `None`: another runner holds it, won the race for it, or
    /// the batch is finished or gone.
    pub(super) async fn acquire(&self, id: &str) -> Result<Option<Batch>, BatchError> {
        let key = self.key(id)?;
        let Some(entry) = self
            .inner
            .records
            .entry(key.clone())
            .await
            .map_err(BatchError::store)?
            .filter(|e| e.operation == kv::Operation::Put)
        else {
            return Ok(None);
        };
        let mut record = Record::decode(&entry.value)?;
        if record.batch.status.is_terminal() {
            return Ok(None);
        }
        let previous = record.lease.take();
        if let Some(lease) = &previous {
            if lease.owner != self.inner.owner && now_ms() < lease.expires_at_ms {
                return Ok(None);
            }
        }
        record.lease = Some(self.fresh_lease());
        match self
            .inner
            .records
            .update(key, record.encode().into(), entry.revision)
            .await
        {
            Ok(_) => {
                match previous {
                    Some(lease) if lease.owner != self.inner.owner => tracing::info!(
                        batch = %id, from = %lease.owner, owner = %self.inner.owner,
                        "taking over a batch whose runner's lease expired"
                    ),
                    _ => tracing::info!(batch = %id, owner = %self.inner.owner, "driving a batch"),
                }
                Ok(Some(record.batch))
            }
            // Another runner (or a cancel) wrote first: the next scan looks again.
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(err) => Err(BatchError::store(err)),
        }
    }

    /// Changes batch `id` as [`Batches::update`] does, but only while this
    /// runner holds its lease, which the write extends; another owner's
    /// lease is [`BatchError::LeaseLost`].
    pub(super) async fn update_owned(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Batch) -> Result<bool, BatchError>,
    ) -> Result<Batch, BatchError> {
        let owner = self.inner.owner.clone();
        self.update_record(id, |record| {
            match &record.lease {
                Some(lease) if lease.owner == owner => {}
                other => {
                    return Err(BatchError::LeaseLost {
                        batch: id.to_string(),
                        owner: other.as_ref().map(|l| l.owner.clone()),
                    })
                }
            }
            if !change(&mut record.batch)? {
                return Ok(false);
            }
            record.lease = Some(self.fresh_lease());
            Ok(true)
        })
        .await
    }

    /// Renews batch `id`'s lease every third of its TTL; returns only when
    /// the lease is lost: another runner holds it, or renewing failed for
    /// so long that it may have expired. Run beside the drive, which stops
    /// when this returns.
    pub(super) async fn hold_lease(&self, id: &str) -> BatchError {
        let every = self.lease_ttl() / RENEWALS_PER_TTL;
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.update_owned(id, |_| Ok(true)).await {
                Ok(_) => renewed = Instant::now(),
                Err(err @ BatchError::LeaseLost { .. }) => return err,
                // Gone (aged out, deleted): nothing left to drive.
                Err(err @ BatchError::NotFound { .. }) => return err,
                Err(err) => {
                    // The next attempt would come after the lease could have
                    // lapsed: stop before another runner may take it.
                    if renewed.elapsed() + every >= self.lease_ttl() {
                        tracing::warn!(batch = %id, error = %err, "the batch's lease could not be renewed in time; this runner stops driving it");
                        return BatchError::LeaseLost {
                            batch: id.to_string(),
                            owner: None,
                        };
                    }
                    tracing::warn!(batch = %id, error = %err, "renewing a batch's lease; trying again");
                }
            }
        }
    }

    /// Gives batch `id`'s lease up if this runner holds it, so another
    /// replica need not wait for it to expire.
    pub(super) async fn release(&self, id: &str) -> Result<(), BatchError> {
        let owner = self.inner.owner.clone();
        self.update_record(id, |record| {
            if record.lease.as_ref().is_some_and(|l| l.owner == owner) {
                record.lease = None;
                Ok(true)
            } else {
                Ok(false)
            }
        })
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batches::{BatchStatus, RequestCounts};

    fn batch() -> Batch {
        Batch {
            id: "batch_01J".into(),
            object: "batch".into(),
            endpoint: "/v1/embeddings".into(),
            errors: None,
            input_file_id: "file-01J".into(),
            completion_window: "24h".into(),
            status: BatchStatus::InProgress,
            output_file_id: None,
            error_file_id: None,
            created_at: 1,
            in_progress_at: Some(2),
            expires_at: Some(3),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts {
                total: 3,
                completed: 1,
                failed: 0,
            },
            metadata: Some([("k".to_string(), "v".to_string())].into()),
        }
    }

    #[test]
    fn a_record_keeps_its_lease_beside_the_batch_and_the_batch_json_stays_openais() {
        let record = Record {
            batch: batch(),
            lease: Some(Lease {
                owner: "42-01J".into(),
                expires_at_ms: 7,
            }),
        };
        let bytes = record.encode();
        let back = Record::decode(&bytes).unwrap();
        assert_eq!(back.batch, batch());
        assert_eq!(back.lease, record.lease);
        // What the API returns has no lease.
        let shown = serde_json::to_value(&back.batch).unwrap();
        assert!(shown.get("lease").is_none(), "{shown}");
    }

    #[test]
    fn a_record_written_before_leases_reads_as_unleased() {
        let bytes = serde_json::to_vec(&batch()).unwrap();
        let record = Record::decode(&bytes).unwrap();
        assert_eq!(record.batch, batch());
        assert_eq!(record.lease, None);
    }
}
