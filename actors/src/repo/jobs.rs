//! The job repository: job records (`bulk_jobs`), their leases and the epoch fence.
//!
//! A lease is `(leaseOwner, leaseUntil, leaseEpoch)` in the record. "Free" is
//! judged on the store's clock (for MongoDB, the server's: see
//! [`super::MongoJobs`]): never leased, released, or `leaseUntil` in the past.
//! Every acquisition bumps the epoch; every write of the holder names its epoch
//! (the fence), so a holder that lost the lease (paused, partitioned, slow)
//! writes nothing once another has taken the job. Writes set absolute values,
//! so a write whose reply was lost can be sent again and lands once.

use std::time::Duration;

use async_trait::async_trait;
use bson::{oid::ObjectId, DateTime};

use crate::error::{Dependency, JobError};
use crate::model::{Checkpoint, Counts, DeleteInflight, ExportFile, JobRecord, JobStatus};

/// A lease held by this instance: who and which acquisition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The instance.
    pub owner: String,
    /// The acquisition (`leaseEpoch` of the record).
    pub epoch: i64,
}

/// What a holder writes to its job, beside renewing the lease. Every field left
/// `None` is left as it is; an empty patch only renews the lease (and reads the
/// cancel flag back).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobPatch {
    /// The start-up phase is done: `status: processing`, `initialised`, and
    /// `startedAt` set to this time.
    pub started_at: Option<DateTime>,
    /// Upper bound on `_id` frozen at start.
    pub snapshot_max_id: Option<ObjectId>,
    /// Matching documents at start (`Some(None)`: not counted yet).
    pub total: Option<Option<i64>>,
    /// Custom-field keys discovered at start (`Some(None)`: none asked for).
    pub custom_keys: Option<Option<Vec<String>>>,
    /// Rows exported or contacts handled.
    pub processed: Option<i64>,
    /// Resume point.
    pub checkpoint: Option<Checkpoint>,
    /// Documents deleted or put back.
    pub counts: Option<Counts>,
    /// Contacts a restore left alone.
    pub skipped: Option<i64>,
    /// Until when what a delete removed is kept.
    pub restorable_until: Option<DateTime>,
    /// The delete batches in flight: `inflight` and `inflightNext`.
    pub inflight: Option<(Option<DeleteInflight>, Option<DeleteInflight>)>,
    /// What the job waits for (`Some(None)`: nothing any more).
    pub waiting: Option<Option<Dependency>>,
}

/// How a held job ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// Done; an export's file with it.
    Completed(Option<ExportFile>),
    /// Stopped on request.
    Cancelled,
    /// Given up, with the reason.
    Failed(String),
}

impl Ending {
    /// The terminal status it writes.
    pub fn status(&self) -> JobStatus {
        match self {
            Ending::Completed(_) => JobStatus::Completed,
            Ending::Cancelled => JobStatus::Cancelled,
            Ending::Failed(_) => JobStatus::Failed,
        }
    }
}

/// What a retention pass found due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Ended exports whose file is due to expire.
    Exports,
    /// Ended jobs whose record is due to go.
    Records,
}

/// Job records, leases and fenced writes.
#[async_trait]
pub trait JobRepo: Send + Sync + std::fmt::Debug + 'static {
    /// This instance's clock: the times the instance itself stamps
    /// (`startedAt`). Leases never read it.
    fn now(&self) -> DateTime;

    /// Measures the store's clock against this instance's again (leases are
    /// written on the store's clock).
    async fn sync_clock(&self) -> Result<(), JobError>;

    /// Inserts a new job. With a `commandKey` (or `restoreKey`) already used,
    /// returns the existing job instead (`created == false`): the store
    /// decides, so two racing submissions cannot both create a job.
    async fn create(&self, job: JobRecord) -> Result<(JobRecord, bool), JobError>;

    /// A job of this organisation by id; `NotFound` otherwise.
    async fn get(&self, org: ObjectId, job_id: &str) -> Result<JobRecord, JobError>;

    /// A job by id, whatever its organisation (internal use only).
    async fn get_any(&self, job_id: &str) -> Result<Option<JobRecord>, JobError>;

    /// A job of this organisation by its command id; `NotFound` otherwise.
    async fn get_by_command(&self, org: ObjectId, command_id: &str) -> Result<JobRecord, JobError>;

    /// The organisation's most recent jobs, newest first.
    async fn list(&self, org: ObjectId, limit: i64) -> Result<Vec<JobRecord>, JobError>;

    /// Jobs waiting to start (`pending`), of one organisation or of all.
    async fn count_pending(&self, org: Option<ObjectId>) -> Result<u64, JobError>;

    /// Every restore of the delete `source` (their `restoreKey` is `<source>#<n>`).
    async fn restores_of(&self, source: &str) -> Result<Vec<JobRecord>, JobError>;

    /// Ended jobs of these organisations created since `created_since` and
    /// finished within `finished` (inclusive): what webhooks may have missed.
    async fn ended_within(
        &self,
        orgs: &[ObjectId],
        created_since: DateTime,
        finished: (DateTime, DateTime),
    ) -> Result<Vec<JobRecord>, JobError>;

    /// Organisations with jobs nobody holds (pending, or abandoned), the one
    /// waiting longest first, at most `limit` of them.
    async fn resumable_orgs(&self, limit: i64) -> Result<Vec<ObjectId>, JobError>;

    /// An organisation's jobs nobody holds, oldest first, at most `limit`.
    async fn resumable_of(&self, org: ObjectId, limit: i64) -> Result<Vec<JobRecord>, JobError>;

    /// Takes the job for `owner` if it is not terminal and nobody else holds a
    /// live lease, bumping the epoch. Costs no attempt: only failures do (a
    /// first start makes `attempts` 1). `None` when someone else has it or it
    /// is finished.
    async fn acquire(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<JobRecord>, JobError>;

    /// Applies `patch` to a job held under `lease`, renewing the lease, and
    /// returns the record after it. `Conflict` when the lease is lost (another
    /// instance took the job, or it reached a terminal state): nothing written.
    async fn update_held(
        &self,
        job_id: &str,
        lease: &Lease,
        ttl: Duration,
        patch: &JobPatch,
    ) -> Result<JobRecord, JobError>;

    /// Moves a job held under `lease` to a terminal state and drops the lease.
    /// A retry of a terminal write whose reply was lost finds the job finished
    /// under the same epoch and returns it, so the caller still announces it.
    async fn finish(
        &self,
        job_id: &str,
        lease: &Lease,
        ending: &Ending,
    ) -> Result<JobRecord, JobError>;

    /// Counts a failure of the job's own work against its attempts and lets the
    /// lease go, so the job restarts from its checkpoint. The record after it,
    /// `None` when the lease was lost meanwhile.
    async fn count_failure(
        &self,
        job_id: &str,
        lease: &Lease,
        error: &str,
    ) -> Result<Option<JobRecord>, JobError>;

    /// Gives the job back without changing its state, so it stays resumable
    /// (drain on shutdown). Fenced: a lease already lost is left alone.
    async fn release(&self, job_id: &str, lease: &Lease) -> Result<(), JobError>;

    /// Claims, for `ttl`, the clean-up of a job that failed for good and was
    /// not cleaned up yet (`Failed` leaves it owed, in the same write): this
    /// one (`job_id`) or the one that failed first. `None` when none is owed
    /// or another instance's claim is still live. An instance that dies
    /// mid-clean-up leaves the claim to expire, and the next scan redoes it.
    async fn claim_cleanup(
        &self,
        job_id: Option<&str>,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<JobRecord>, JobError>;

    /// The clean-up claimed by `owner` is done: nothing is owed any more. A
    /// claim lost meanwhile is left to its new owner.
    async fn cleaned(&self, job_id: &str, owner: &str) -> Result<(), JobError>;

    /// Asks for a cancel. A pending job nobody holds is cancelled at once; a
    /// running one gets `cancelRequested` and stops at its next batch boundary.
    /// Returns the record after the change (unchanged when already terminal)
    /// and whether this call itself moved a pending job to `cancelled` (no
    /// actor will announce that change: the caller must).
    async fn request_cancel(
        &self,
        org: ObjectId,
        job_id: &str,
    ) -> Result<(JobRecord, bool), JobError>;

    /// Ids of ended jobs finished at or before `finished_by` that a retention
    /// pass is due to handle, at most `limit`: exports whose file has not
    /// expired yet, or any job (its record).
    async fn due(
        &self,
        what: Sweep,
        finished_by: DateTime,
        limit: i64,
    ) -> Result<Vec<String>, JobError>;

    /// Marks these ended exports' files expired (`result.expired`,
    /// `expiredAt`); how many were not marked before.
    async fn mark_expired(&self, ids: &[String]) -> Result<u64, JobError>;

    /// Removes these jobs' records if they have ended; how many went.
    async fn remove_ended(&self, ids: &[String]) -> Result<u64, JobError>;
}

/// Whether a job in `status` can still be held (not terminal).
pub(crate) fn holdable(status: JobStatus) -> bool {
    matches!(status, JobStatus::Pending | JobStatus::Processing)
}
