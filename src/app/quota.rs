//! Per-organisation quotas (contract section 10): job-starting requests a minute
//! and jobs waiting, shared by every instance through MongoDB.
//!
//! The rate is a fixed window: one counter document per organisation and UTC
//! minute (`bulk_quota`, `_id` `<orgId>:<minute>`), bumped with an atomic
//! `$inc` upsert, so instances behind the queue group share one count. The
//! pending limit counts the organisation's `pending` job records.
//!
//! The HTTP layer reads the last decision of a request through
//! [`RateSlot`] (a task-local the admission fills in) to set the
//! `X-RateLimit-*` headers on success and on refusal alike.

use std::cell::RefCell;
use std::time::Duration;

use bson::{doc, oid::ObjectId, DateTime, Document};
use contact_bulk_actors::repo::JobRepo;
use contact_bulk_actors::store::is_duplicate_key;
use contact_bulk_actors::JobError;
use mongodb::options::{FindOneAndUpdateOptions, ReturnDocument};
use mongodb::{Collection, Database};

/// Counter documents of the rate windows.
pub const QUOTA_COLLECTION: &str = "bulk_quota";

const WINDOW_MS: i64 = 60_000;

/// How long a caller refused for too many waiting jobs is told to wait: jobs
/// of an organisation start as its running slots free up, which takes seconds.
const PENDING_RETRY_MS: u64 = 5_000;

/// What a request asks of the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Creates a job: counts against the rate and needs room among waiting jobs.
    Job,
    /// A count, a dry run or a streamed export: counts against the rate only.
    Check,
}

/// The rate window as a caller sees it (the `X-RateLimit-*` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// Requests allowed a minute.
    pub limit: u32,
    /// Requests left in this minute.
    pub remaining: u32,
    /// Seconds until the window resets.
    pub reset_secs: u64,
    /// Set when the request was refused: wait this long before retrying.
    pub retry_after_ms: Option<u64>,
}

tokio::task_local! {
    static SLOT: RefCell<Option<RateInfo>>;
}

/// The task-local through which an HTTP request learns its quota decision.
pub struct RateSlot;

impl RateSlot {
    /// Runs `f` with an empty slot and returns its output with what was put in it.
    pub async fn scope<F: std::future::Future>(f: F) -> (F::Output, Option<RateInfo>) {
        SLOT.scope(RefCell::new(None), async move {
            let out = f.await;
            let info = SLOT.with(|s| s.borrow_mut().take());
            (out, info)
        })
        .await
    }

    fn put(info: RateInfo) {
        // Outside an HTTP request (NATS) there is no slot, and nothing to do.
        let _ = SLOT.try_with(|s| *s.borrow_mut() = Some(info));
    }
}

/// The quotas of every organisation.
#[derive(Clone, Debug)]
pub struct Quota {
    windows: Collection<Document>,
    jobs: std::sync::Arc<dyn JobRepo>,
    per_minute: u32,
    max_pending: u64,
}

impl Quota {
    /// Quotas over `db`; `per_minute == 0` or `max_pending == 0` turn that limit off.
    pub fn new(
        db: &Database,
        jobs: std::sync::Arc<dyn JobRepo>,
        per_minute: u32,
        max_pending: u64,
    ) -> Quota {
        Quota {
            windows: db.collection(QUOTA_COLLECTION),
            jobs,
            per_minute,
            max_pending,
        }
    }

    /// Counts one request of `org`; refuses it with `rate_limited` beyond the
    /// minute's limit or, for [`Admission::Job`], when too many jobs wait.
    pub async fn admit(&self, org: ObjectId, what: Admission) -> Result<RateInfo, JobError> {
        let info = self.take(org).await?;
        if let Some(retry) = info.retry_after_ms {
            RateSlot::put(info);
            contact_bulk_actors::metrics::quota_rejected();
            return Err(JobError::RateLimited {
                message: format!(
                    "the organisation has used its {} job-starting requests of this minute",
                    self.per_minute
                ),
                retry_after_ms: retry,
            });
        }
        if what == Admission::Job && self.max_pending > 0 {
            let waiting = self.jobs.count_pending(Some(org)).await?;
            if waiting >= self.max_pending {
                RateSlot::put(RateInfo {
                    retry_after_ms: Some(PENDING_RETRY_MS),
                    ..info
                });
                contact_bulk_actors::metrics::quota_rejected();
                return Err(JobError::RateLimited {
                    message: format!(
                        "{waiting} jobs of this organisation are already waiting to start (at most {})",
                        self.max_pending
                    ),
                    retry_after_ms: PENDING_RETRY_MS,
                });
            }
        }
        RateSlot::put(info);
        Ok(info)
    }

    /// The window as it stands, without counting (a `commandId` replay).
    pub async fn peek(&self, org: ObjectId) {
        if self.per_minute == 0 {
            return;
        }
        let (id, reset_secs, _) = window(org);
        let used = match self.windows.find_one(doc! {"_id": &id}).await {
            Ok(d) => d.map_or(0, |d| count_of(&d)),
            Err(e) => {
                tracing::debug!(error = %e, "quota window not read");
                return;
            }
        };
        RateSlot::put(RateInfo {
            limit: self.per_minute,
            remaining: remaining(self.per_minute, used),
            reset_secs,
            retry_after_ms: None,
        });
    }

    /// Bumps the organisation's counter of this minute.
    async fn take(&self, org: ObjectId) -> Result<RateInfo, JobError> {
        let (id, reset_secs, ends_at) = window(org);
        if self.per_minute == 0 {
            return Ok(RateInfo {
                limit: 0,
                remaining: 0,
                reset_secs,
                retry_after_ms: None,
            });
        }
        let opts = FindOneAndUpdateOptions::builder()
            .upsert(true)
            .return_document(ReturnDocument::After)
            .build();
        let update = doc! {
            "$inc": {"count": 1i64},
            "$setOnInsert": {"orgId": org, "endsAt": DateTime::from_millis(ends_at)},
        };
        let mut tries = 0;
        let doc = loop {
            let r = self
                .windows
                .find_one_and_update(doc! {"_id": &id}, update.clone())
                .with_options(opts.clone())
                .await;
            match r {
                // Two first requests of a minute racing to insert: the loser
                // finds the document on its next try.
                Err(e) if is_duplicate_key(&e) && tries < 3 => tries += 1,
                r => break r?,
            }
        };
        let used = doc.as_ref().map_or(1, count_of);
        let over = used > i64::from(self.per_minute);
        let now = DateTime::now().timestamp_millis();
        Ok(RateInfo {
            limit: self.per_minute,
            remaining: remaining(self.per_minute, used),
            reset_secs,
            retry_after_ms: over.then(|| (ends_at - now).max(1) as u64),
        })
    }

    /// Removes counters of windows that ended more than a minute ago.
    pub async fn sweep(&self) -> Result<u64, JobError> {
        let cutoff = DateTime::now().timestamp_millis() - WINDOW_MS;
        let r = self
            .windows
            .delete_many(doc! {"endsAt": {"$lt": DateTime::from_millis(cutoff)}})
            .await?;
        Ok(r.deleted_count)
    }
}

/// `(_id, seconds to reset, end in ms)` of the current window of `org`.
fn window(org: ObjectId) -> (String, u64, i64) {
    let now = DateTime::now().timestamp_millis();
    let minute = now.div_euclid(WINDOW_MS);
    let ends_at = (minute + 1) * WINDOW_MS;
    let reset_secs = Duration::from_millis((ends_at - now) as u64)
        .as_secs_f64()
        .ceil() as u64;
    (format!("{}:{minute}", org.to_hex()), reset_secs, ends_at)
}

fn count_of(d: &Document) -> i64 {
    match d.get("count") {
        Some(bson::Bson::Int64(n)) => *n,
        Some(bson::Bson::Int32(n)) => i64::from(*n),
        Some(bson::Bson::Double(n)) => *n as i64,
        _ => 0,
    }
}

fn remaining(limit: u32, used: i64) -> u32 {
    (i64::from(limit) - used).clamp(0, i64::from(limit)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_per_org_and_minute() {
        let (a, reset, ends) = window(ObjectId::new());
        let (b, _, _) = window(ObjectId::new());
        assert_ne!(a, b);
        assert!((1..=60).contains(&reset), "reset {reset}");
        assert_eq!(ends % WINDOW_MS, 0);
    }

    #[test]
    fn remaining_never_goes_negative() {
        assert_eq!(remaining(30, 1), 29);
        assert_eq!(remaining(30, 30), 0);
        assert_eq!(remaining(30, 99), 0);
    }

    #[tokio::test]
    async fn the_slot_carries_the_decision_of_its_request_only() {
        let info = RateInfo {
            limit: 5,
            remaining: 4,
            reset_secs: 10,
            retry_after_ms: None,
        };
        let ((), seen) = RateSlot::scope(async { RateSlot::put(info) }).await;
        assert_eq!(seen, Some(info));
        let ((), seen) = RateSlot::scope(async {}).await;
        assert_eq!(seen, None);
        // Without a scope (a NATS command) putting is a no-op, not a panic.
        RateSlot::put(info);
    }
}
