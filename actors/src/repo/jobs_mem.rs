//! [`JobRepo`] in memory: the fake the unit tests run the job machinery on.
//!
//! Same semantics as [`super::MongoJobs`] (leases free once `leaseUntil` is
//! past, epochs bumped by every acquisition, every holder write fenced by
//! owner and epoch, idempotent creation by `commandKey`/`restoreKey`), with
//! the store's clock following tokio's: under `tokio::time::pause` a lease
//! expires when the test advances time past it. Clones share the records, so
//! two clones with different owners act as two instances of the service.
//! [`MemJobs::set_down`] makes every call fail as a MongoDB outage would.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bson::{oid::ObjectId, DateTime};

use super::jobs::{holdable, Ending, JobPatch, JobRepo, Lease, Sweep};
use crate::error::{Dependency, JobError};
use crate::model::{JobKind, JobRecord, JobStatus};

#[derive(Debug, Clone)]
struct Entry {
    job: JobRecord,
    /// `expiredAt`: the export's file was expired by retention.
    expired_at: Option<DateTime>,
    /// Insertion order, the tie-break of equal `createdAt`s.
    seq: u64,
    /// `cleanupPending` with its claim (`cleanupOwner`, `cleanupUntil`).
    cleanup: Option<(Option<String>, Option<DateTime>)>,
}

#[derive(Debug, Default)]
struct Records {
    jobs: BTreeMap<String, Entry>,
    seq: u64,
}

/// In-memory job records; see the module docs.
#[derive(Debug, Clone)]
pub struct MemJobs {
    records: Arc<Mutex<Records>>,
    down: Arc<AtomicBool>,
    /// The store's clock at `origin`.
    base: DateTime,
    origin: tokio::time::Instant,
    clock_offset_ms: i64,
    writes: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for MemJobs {
    fn default() -> Self {
        MemJobs::new()
    }
}

impl MemJobs {
    /// An empty store whose clock starts now and follows tokio's.
    pub fn new() -> MemJobs {
        MemJobs {
            records: Default::default(),
            down: Default::default(),
            base: DateTime::now(),
            origin: tokio::time::Instant::now(),
            clock_offset_ms: 0,
            writes: Default::default(),
        }
    }

    /// The same records seen by an instance whose own clock is off by `ms`
    /// (leases do not read it).
    pub fn with_clock_offset(&self, ms: i64) -> MemJobs {
        MemJobs {
            clock_offset_ms: ms,
            ..self.clone()
        }
    }

    /// Makes every call fail as during a MongoDB outage (`true`), or work again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Holder writes (`update_held`) applied so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// The store's clock (for MongoDB, the server's).
    pub fn store_now(&self) -> DateTime {
        let elapsed = self.origin.elapsed().as_millis() as i64;
        DateTime::from_millis(self.base.timestamp_millis() + elapsed)
    }

    /// A record as stored, outage or not (tests).
    pub fn peek(&self, job_id: &str) -> Option<JobRecord> {
        self.records().jobs.get(job_id).map(|e| e.job.clone())
    }

    /// Whether the clean-up of a job that failed for good is still owed (tests).
    pub fn cleanup_owed(&self, job_id: &str) -> bool {
        self.records()
            .jobs
            .get(job_id)
            .is_some_and(|e| e.cleanup.is_some())
    }

    /// Every record, oldest first, outage or not (tests).
    pub fn all(&self) -> Vec<JobRecord> {
        let r = self.records();
        let mut all: Vec<&Entry> = r.jobs.values().collect();
        all.sort_by_key(|e| (e.job.created_at, e.seq));
        all.into_iter().map(|e| e.job.clone()).collect()
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The records, or the error of an outage while set down.
    fn lock(&self) -> Result<MutexGuard<'_, Records>, JobError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(JobError::Unavailable {
                service: Dependency::Mongodb,
                message: "in-memory store set down".into(),
            });
        }
        Ok(self.records())
    }

    fn until(&self, ttl: Duration) -> DateTime {
        DateTime::from_millis(self.store_now().timestamp_millis() + ttl.as_millis() as i64)
    }

    fn free(&self, job: &JobRecord) -> bool {
        // As `$lt: ["$leaseUntil", "$$NOW"]`: a missing date sorts first.
        job.lease_owner.is_none() || job.lease_until.is_none_or(|u| u < self.store_now())
    }
}

fn held<'a>(r: &'a mut Records, job_id: &str, lease: &Lease) -> Option<&'a mut Entry> {
    r.jobs.get_mut(job_id).filter(|e| {
        e.job.lease_owner.as_deref() == Some(lease.owner.as_str())
            && e.job.lease_epoch == lease.epoch
            && holdable(e.job.status)
    })
}

fn lost(job_id: &str) -> JobError {
    JobError::Conflict(format!("lease on job {job_id} lost"))
}

fn apply(job: &mut JobRecord, patch: &JobPatch) {
    if let Some(at) = patch.started_at {
        job.initialised = true;
        job.status = JobStatus::Processing;
        job.started_at = Some(at);
    }
    if let Some(max_id) = patch.snapshot_max_id {
        job.snapshot_max_id = Some(max_id);
    }
    if let Some(total) = patch.total {
        job.total = total;
    }
    if let Some(keys) = &patch.custom_keys {
        job.custom_keys = keys.clone();
    }
    if let Some(processed) = patch.processed {
        job.processed = processed;
    }
    if let Some(checkpoint) = &patch.checkpoint {
        job.checkpoint = checkpoint.clone();
    }
    if let Some(counts) = patch.counts {
        job.counts = counts;
    }
    if let Some(skipped) = patch.skipped {
        job.skipped = skipped;
    }
    if let Some(until) = patch.restorable_until {
        job.restorable_until = Some(until);
    }
    if let Some((first, next)) = &patch.inflight {
        job.inflight = first.clone();
        job.inflight_next = next.clone();
    }
    if let Some(waiting) = patch.waiting {
        job.waiting = waiting;
    }
}

fn ended(status: JobStatus) -> bool {
    status.is_terminal()
}

#[async_trait]
impl JobRepo for MemJobs {
    fn now(&self) -> DateTime {
        DateTime::from_millis(self.store_now().timestamp_millis() + self.clock_offset_ms)
    }

    async fn sync_clock(&self) -> Result<(), JobError> {
        self.lock().map(drop)
    }

    async fn create(&self, job: JobRecord) -> Result<(JobRecord, bool), JobError> {
        let mut r = self.lock()?;
        let same = |e: &&Entry| {
            e.job.job_id == job.job_id
                || (job.command_key.is_some() && e.job.command_key == job.command_key)
                || (job.restore_key.is_some() && e.job.restore_key == job.restore_key)
        };
        if let Some(existing) = r.jobs.values().find(same) {
            return Ok((existing.job.clone(), false));
        }
        r.seq += 1;
        let seq = r.seq;
        r.jobs.insert(
            job.job_id.clone(),
            Entry {
                job: job.clone(),
                expired_at: None,
                seq,
                cleanup: None,
            },
        );
        Ok((job, true))
    }

    async fn get(&self, org: ObjectId, job_id: &str) -> Result<JobRecord, JobError> {
        self.lock()?
            .jobs
            .get(job_id)
            .filter(|e| e.job.org_id == org)
            .map(|e| e.job.clone())
            .ok_or_else(|| JobError::NotFound(format!("job {job_id}")))
    }

    async fn get_any(&self, job_id: &str) -> Result<Option<JobRecord>, JobError> {
        Ok(self.lock()?.jobs.get(job_id).map(|e| e.job.clone()))
    }

    async fn get_by_command(&self, org: ObjectId, command_id: &str) -> Result<JobRecord, JobError> {
        let key = format!("{}:{command_id}", org.to_hex());
        self.lock()?
            .jobs
            .values()
            .find(|e| e.job.org_id == org && e.job.command_key.as_deref() == Some(&key))
            .map(|e| e.job.clone())
            .ok_or_else(|| JobError::NotFound(format!("command {command_id}")))
    }

    async fn list(&self, org: ObjectId, limit: i64) -> Result<Vec<JobRecord>, JobError> {
        drop(self.lock()?);
        let mut mine: Vec<JobRecord> = self.all().into_iter().filter(|j| j.org_id == org).collect();
        mine.reverse();
        mine.truncate(limit.max(0) as usize);
        Ok(mine)
    }

    async fn count_pending(&self, org: Option<ObjectId>) -> Result<u64, JobError> {
        Ok(self
            .lock()?
            .jobs
            .values()
            .filter(|e| e.job.status == JobStatus::Pending && org.is_none_or(|o| e.job.org_id == o))
            .count() as u64)
    }

    async fn restores_of(&self, source: &str) -> Result<Vec<JobRecord>, JobError> {
        let prefix = format!("{source}#");
        Ok(self
            .lock()?
            .jobs
            .values()
            .filter(|e| {
                e.job
                    .restore_key
                    .as_deref()
                    .is_some_and(|k| k.starts_with(&prefix))
            })
            .map(|e| e.job.clone())
            .collect())
    }

    async fn ended_within(
        &self,
        orgs: &[ObjectId],
        created_since: DateTime,
        (from, to): (DateTime, DateTime),
    ) -> Result<Vec<JobRecord>, JobError> {
        Ok(self
            .lock()?
            .jobs
            .values()
            .map(|e| &e.job)
            .filter(|j| {
                orgs.contains(&j.org_id)
                    && j.created_at >= created_since
                    && ended(j.status)
                    && j.finished_at.is_some_and(|f| f >= from && f <= to)
            })
            .cloned()
            .collect())
    }

    async fn resumable_orgs(&self, limit: i64) -> Result<Vec<ObjectId>, JobError> {
        drop(self.lock()?);
        let mut oldest: BTreeMap<ObjectId, DateTime> = BTreeMap::new();
        for j in self.all() {
            if holdable(j.status) && self.free(&j) {
                oldest.entry(j.org_id).or_insert(j.created_at);
            }
        }
        let mut orgs: Vec<(DateTime, ObjectId)> = oldest.into_iter().map(|(o, t)| (t, o)).collect();
        orgs.sort();
        Ok(orgs
            .into_iter()
            .take(limit.max(0) as usize)
            .map(|(_, o)| o)
            .collect())
    }

    async fn resumable_of(&self, org: ObjectId, limit: i64) -> Result<Vec<JobRecord>, JobError> {
        drop(self.lock()?);
        Ok(self
            .all()
            .into_iter()
            .filter(|j| j.org_id == org && holdable(j.status) && self.free(j))
            .take(limit.max(0) as usize)
            .collect())
    }

    async fn acquire(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<JobRecord>, JobError> {
        let until = self.until(ttl);
        let mut r = self.lock()?;
        let Some(e) = r.jobs.get_mut(job_id) else {
            return Ok(None);
        };
        let mine = e.job.lease_owner.as_deref() == Some(owner);
        if !holdable(e.job.status) || !(mine || self.free(&e.job)) {
            return Ok(None);
        }
        e.job.lease_owner = Some(owner.to_string());
        e.job.lease_until = Some(until);
        e.job.lease_epoch += 1;
        e.job.attempts = e.job.attempts.max(1);
        Ok(Some(e.job.clone()))
    }

    async fn update_held(
        &self,
        job_id: &str,
        lease: &Lease,
        ttl: Duration,
        patch: &JobPatch,
    ) -> Result<JobRecord, JobError> {
        let until = self.until(ttl);
        let mut r = self.lock()?;
        let e = held(&mut r, job_id, lease).ok_or_else(|| lost(job_id))?;
        apply(&mut e.job, patch);
        e.job.lease_until = Some(until);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(e.job.clone())
    }

    async fn finish(
        &self,
        job_id: &str,
        lease: &Lease,
        ending: &Ending,
    ) -> Result<JobRecord, JobError> {
        let now = self.store_now();
        let mut r = self.lock()?;
        if let Some(e) = held(&mut r, job_id, lease) {
            let job = &mut e.job;
            job.status = ending.status();
            job.lease_owner = None;
            job.lease_until = None;
            job.inflight = None;
            job.inflight_next = None;
            job.waiting = None;
            job.finished_at = Some(now);
            match ending {
                Ending::Completed(Some(file)) => job.result = Some(file.clone()),
                Ending::Failed(error) => job.error = Some(error.clone()),
                Ending::Completed(None) | Ending::Cancelled => {}
            }
            if matches!(ending, Ending::Failed(_)) {
                e.cleanup = Some((None, None));
            }
            return Ok(e.job.clone());
        }
        match r.jobs.get(job_id) {
            // Nobody took the job since: this lease finished it.
            Some(e) if e.job.status.is_terminal() && e.job.lease_epoch == lease.epoch => {
                Ok(e.job.clone())
            }
            _ => Err(lost(job_id)),
        }
    }

    async fn claim_cleanup(
        &self,
        job_id: Option<&str>,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<JobRecord>, JobError> {
        let now = self.store_now();
        let until = self.until(ttl);
        let mut r = self.lock()?;
        let owed = r
            .jobs
            .values_mut()
            .filter(|e| job_id.is_none_or(|id| e.job.job_id == id))
            .filter(|e| e.job.status == JobStatus::Failed)
            .filter(|e| matches!(&e.cleanup, Some((_, u)) if u.is_none_or(|u| u < now)))
            .min_by_key(|e| (e.job.finished_at, e.seq));
        Ok(owed.map(|e| {
            e.cleanup = Some((Some(owner.to_string()), Some(until)));
            e.job.clone()
        }))
    }

    async fn cleaned(&self, job_id: &str, owner: &str) -> Result<(), JobError> {
        let mut r = self.lock()?;
        if let Some(e) = r.jobs.get_mut(job_id) {
            if matches!(&e.cleanup, Some((Some(o), _)) if o == owner) {
                e.cleanup = None;
            }
        }
        Ok(())
    }

    async fn count_failure(
        &self,
        job_id: &str,
        lease: &Lease,
        error: &str,
    ) -> Result<Option<JobRecord>, JobError> {
        let mut r = self.lock()?;
        Ok(held(&mut r, job_id, lease).map(|e| {
            e.job.attempts += 1;
            e.job.lease_owner = None;
            e.job.lease_until = None;
            e.job.waiting = None;
            e.job.last_error = Some(error.to_string());
            e.job.clone()
        }))
    }

    async fn release(&self, job_id: &str, lease: &Lease) -> Result<(), JobError> {
        let mut r = self.lock()?;
        if let Some(e) = r.jobs.get_mut(job_id).filter(|e| {
            e.job.lease_owner.as_deref() == Some(lease.owner.as_str())
                && e.job.lease_epoch == lease.epoch
        }) {
            e.job.lease_owner = None;
            e.job.lease_until = None;
            e.job.waiting = None;
        }
        Ok(())
    }

    async fn request_cancel(
        &self,
        org: ObjectId,
        job_id: &str,
    ) -> Result<(JobRecord, bool), JobError> {
        let now = self.store_now();
        let mut r = self.lock()?;
        let e = r
            .jobs
            .get_mut(job_id)
            .filter(|e| e.job.org_id == org)
            .ok_or_else(|| JobError::NotFound(format!("job {job_id}")))?;
        let free = e.job.lease_owner.is_none() || e.job.lease_until.is_none_or(|u| u < now);
        if e.job.status == JobStatus::Pending && free {
            e.job.status = JobStatus::Cancelled;
            e.job.cancel_requested = true;
            e.job.finished_at = Some(now);
            return Ok((e.job.clone(), true));
        }
        if holdable(e.job.status) {
            e.job.cancel_requested = true;
        }
        Ok((e.job.clone(), false))
    }

    async fn due(
        &self,
        what: Sweep,
        finished_by: DateTime,
        limit: i64,
    ) -> Result<Vec<String>, JobError> {
        Ok(self
            .lock()?
            .jobs
            .values()
            .filter(|e| {
                ended(e.job.status)
                    && e.job.finished_at.is_some_and(|f| f <= finished_by)
                    && match what {
                        Sweep::Records => e.cleanup.is_none(),
                        Sweep::Exports => e.job.kind == JobKind::Export && e.expired_at.is_none(),
                    }
            })
            .take(limit.max(0) as usize)
            .map(|e| e.job.job_id.clone())
            .collect())
    }

    async fn mark_expired(&self, ids: &[String]) -> Result<u64, JobError> {
        let now = self.store_now();
        let mut r = self.lock()?;
        let mut marked = 0;
        for id in ids {
            if let Some(e) = r.jobs.get_mut(id) {
                if let Some(result) = e.job.result.as_mut() {
                    result.expired = true;
                }
                if e.expired_at.is_none() {
                    e.expired_at = Some(now);
                    marked += 1;
                }
            }
        }
        Ok(marked)
    }

    async fn remove_ended(&self, ids: &[String]) -> Result<u64, JobError> {
        let mut r = self.lock()?;
        let before = r.jobs.len();
        r.jobs
            .retain(|id, e| !(ids.contains(id) && ended(e.job.status)));
        Ok((before - r.jobs.len()) as u64)
    }
}
