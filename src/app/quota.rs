//! Per-organisation quotas (contract section 10): job-starting requests a minute
//! and jobs waiting, shared by every instance through MongoDB.
//!
//! The rate is a fixed window: one counter per organisation and UTC minute
//! (`<orgId>:<minute>`), counted atomically by the [`QuotaRepo`] (MongoDB's
//! `bulk_quota`), so instances behind the queue group share one count. The
//! pending limit counts the organisation's `pending` job records ([`JobRepo`]).
//! The policy lives here, the counting in the repositories: unit-tested on
//! their in-memory fakes.
//!
//! The HTTP layer reads the last decision of a request through
//! [`RateSlot`] (a task-local the admission fills in) to set the
//! `X-RateLimit-*` headers on success and on refusal alike.

use std::cell::RefCell;
use std::time::Duration;

use std::sync::Arc;

use bson::{oid::ObjectId, DateTime};
use contact_bulk_actors::repo::{JobRepo, QuotaRepo};
use contact_bulk_actors::JobError;

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
    windows: Arc<dyn QuotaRepo>,
    jobs: Arc<dyn JobRepo>,
    per_minute: u32,
    max_pending: u64,
}

impl Quota {
    /// Quotas counted in `windows`; `per_minute == 0` or `max_pending == 0`
    /// turn that limit off.
    pub fn new(
        windows: Arc<dyn QuotaRepo>,
        jobs: Arc<dyn JobRepo>,
        per_minute: u32,
        max_pending: u64,
    ) -> Quota {
        Quota {
            windows,
            jobs,
            per_minute,
            max_pending,
        }
    }

    /// Counts one request of `org`; refuses it with `rate_limited` beyond the
    /// minute's limit or, for [`Admission::Job`], when too many jobs wait.
    pub async fn admit(&self, org: ObjectId, what: Admission) -> Result<RateInfo, JobError> {
        self.admit_at(org, what, now_ms()).await
    }

    /// [`Quota::admit`] at `now` (ms since the epoch).
    async fn admit_at(
        &self,
        org: ObjectId,
        what: Admission,
        now: i64,
    ) -> Result<RateInfo, JobError> {
        let info = self.take(org, now).await?;
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
        let (id, reset_secs, _) = window(org, now_ms());
        let used = match self.windows.used(&id).await {
            Ok(n) => n,
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

    /// Bumps the organisation's counter of the minute of `now`.
    async fn take(&self, org: ObjectId, now: i64) -> Result<RateInfo, JobError> {
        let (id, reset_secs, ends_at) = window(org, now);
        if self.per_minute == 0 {
            return Ok(RateInfo {
                limit: 0,
                remaining: 0,
                reset_secs,
                retry_after_ms: None,
            });
        }
        let used = self
            .windows
            .bump(org, &id, DateTime::from_millis(ends_at))
            .await?;
        let over = used > i64::from(self.per_minute);
        Ok(RateInfo {
            limit: self.per_minute,
            remaining: remaining(self.per_minute, used),
            reset_secs,
            retry_after_ms: over.then(|| (ends_at - now).max(1) as u64),
        })
    }

    /// Removes counters of windows that ended more than a minute ago.
    pub async fn sweep(&self) -> Result<u64, JobError> {
        let cutoff = now_ms() - WINDOW_MS;
        self.windows.sweep(DateTime::from_millis(cutoff)).await
    }
}

fn now_ms() -> i64 {
    DateTime::now().timestamp_millis()
}

/// `(id, seconds to reset, end in ms)` of the window of `org` at `now`.
fn window(org: ObjectId, now: i64) -> (String, u64, i64) {
    let minute = now.div_euclid(WINDOW_MS);
    let ends_at = (minute + 1) * WINDOW_MS;
    let reset_secs = Duration::from_millis((ends_at - now) as u64)
        .as_secs_f64()
        .ceil() as u64;
    (format!("{}:{minute}", org.to_hex()), reset_secs, ends_at)
}

fn remaining(limit: u32, used: i64) -> u32 {
    (i64::from(limit) - used).clamp(0, i64::from(limit)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_per_org_and_minute() {
        let (a, reset, ends) = window(ObjectId::new(), now_ms());
        let (b, _, _) = window(ObjectId::new(), now_ms());
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

    mod on_fakes {
        use super::super::*;
        use contact_bulk_actors::model::{JobKind, JobRecord};
        use contact_bulk_actors::repo::{MemJobs, MemQuota};

        /// A minute's start, plus 15 s: the window ends 45 s later.
        const NOW: i64 = 29_000_000 * WINDOW_MS + 15_000;

        fn quota(per_minute: u32, max_pending: u64) -> (Quota, MemQuota, Arc<MemJobs>) {
            let windows = MemQuota::new();
            let jobs = Arc::new(MemJobs::new());
            let q = Quota::new(
                Arc::new(windows.clone()),
                jobs.clone(),
                per_minute,
                max_pending,
            );
            (q, windows, jobs)
        }

        fn pending(org: ObjectId) -> JobRecord {
            JobRecord::new(JobKind::Export, org, None, None, Default::default(), None)
        }

        fn retry_of(r: Result<RateInfo, JobError>) -> u64 {
            match r {
                Err(JobError::RateLimited { retry_after_ms, .. }) => retry_after_ms,
                other => panic!("not rate limited: {other:?}"),
            }
        }

        #[tokio::test]
        async fn each_organisation_has_its_own_minute_cap() {
            let (q, _, _) = quota(3, 0);
            let (a, b) = (ObjectId::new(), ObjectId::new());
            for left in [2, 1, 0] {
                let info = q.admit_at(a, Admission::Check, NOW).await.unwrap();
                assert_eq!((info.limit, info.remaining, info.reset_secs), (3, left, 45));
            }
            let refused = q.admit_at(a, Admission::Job, NOW + 5_000).await;
            assert_eq!(retry_of(refused), 40_000, "until the window ends");
            // Another organisation is not held back by the first one's use.
            let other = q.admit_at(b, Admission::Job, NOW).await.unwrap();
            assert_eq!(other.remaining, 2);
            // The next minute starts from zero.
            let next = q.admit_at(a, Admission::Job, NOW + WINDOW_MS).await;
            assert_eq!(next.unwrap().remaining, 2);
        }

        #[tokio::test]
        async fn concurrent_requests_never_get_more_than_the_cap() {
            let (q, windows, _) = quota(25, 0);
            let org = ObjectId::new();
            let all =
                futures::future::join_all((0..40).map(|_| q.admit_at(org, Admission::Check, NOW)))
                    .await;
            let admitted = all.iter().filter(|r| r.is_ok()).count();
            assert_eq!(admitted, 25);
            let (id, _, _) = window(org, NOW);
            assert_eq!(
                windows.used(&id).await.unwrap(),
                40,
                "refused ones count too"
            );
        }

        #[tokio::test]
        async fn waiting_jobs_cap_job_requests_until_one_starts() {
            let (q, _, jobs) = quota(0, 2);
            let (org, other) = (ObjectId::new(), ObjectId::new());
            let first = jobs.create(pending(org)).await.unwrap().0;
            jobs.create(pending(org)).await.unwrap();
            let refused = q.admit_at(org, Admission::Job, NOW).await;
            assert_eq!(retry_of(refused), PENDING_RETRY_MS);
            // Counts and dry runs start nothing: not held by waiting jobs.
            q.admit_at(org, Admission::Check, NOW).await.unwrap();
            q.admit_at(other, Admission::Job, NOW).await.unwrap();
            // A waiting job that ends (here: cancelled before it started)
            // releases its slot.
            let (gone, _) = jobs.request_cancel(org, &first.job_id).await.unwrap();
            assert!(gone.status.is_terminal());
            q.admit_at(org, Admission::Job, NOW).await.unwrap();
            jobs.create(pending(org)).await.unwrap();
            let refused = q.admit_at(org, Admission::Job, NOW).await;
            assert_eq!(retry_of(refused), PENDING_RETRY_MS, "full again");
        }

        #[tokio::test]
        async fn a_replay_reads_the_window_without_counting() {
            let (q, windows, _) = quota(5, 0);
            let org = ObjectId::new();
            q.admit(org, Admission::Check).await.unwrap();
            let ((), seen) = RateSlot::scope(q.peek(org)).await;
            let (id, _, _) = window(org, now_ms());
            let used = windows.used(&id).await.unwrap();
            // A minute boundary between admit and peek leaves a fresh window.
            assert!(used <= 1, "peek counted: {used}");
            assert_eq!(seen.map(|i| i.remaining), Some(5 - used as u32));
        }

        #[tokio::test]
        async fn sweeping_drops_only_windows_ended_a_minute_ago() {
            let (q, windows, _) = quota(5, 0);
            let org = ObjectId::new();
            let old = DateTime::from_millis(now_ms() - 3 * WINDOW_MS);
            windows.bump(org, "old", old).await.unwrap();
            q.admit(org, Admission::Check).await.unwrap();
            assert_eq!(q.sweep().await.unwrap(), 1);
            assert_eq!(windows.windows(), 1, "the current window stays");
        }
    }
}
