//! MongoDB access for job records (`bulk_jobs`) and the indexes every job query relies on.
//!
//! Leases are judged by the database's clock: "expired" is `leaseUntil <
//! $$NOW`, evaluated by the server, and `leaseUntil` itself is set on the
//! database's clock too (this instance's clock corrected by the offset to the
//! server's `hello.localTime`, measured at start and at every scan; the
//! server cannot add to a date in a query or update itself). An instance
//! whose clock is off can neither steal a live job nor keep a dead one.
//!
//! Every acquisition bumps `leaseEpoch`; every write of the holder names its
//! epoch in its filter (the fence), so a holder that lost the lease (paused,
//! partitioned, slow) cannot write anything once another has taken it.

use std::time::Duration;

use bson::{doc, oid::ObjectId, DateTime, Document};
use futures::TryStreamExt;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{FindOneAndUpdateOptions, IndexOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};

use crate::error::JobError;
use crate::model::{JobRecord, JobStatus};

/// Collection names, in one place.
pub mod names {
    /// Job records.
    pub const JOBS: &str = "bulk_jobs";
    /// Export file chunks.
    pub const CHUNKS: &str = "export_chunks";
    /// Audit log.
    pub const EVENT_LOGS: &str = "event_logs";
    /// Assignee notifications.
    pub const NOTIFICATIONS: &str = "notifications";
    /// Conversations of contacts.
    pub const CONVERSATIONS: &str = "conversations";
    /// Messages of conversations.
    pub const MESSAGES: &str = "messages";
    /// Pipelines with their stages.
    pub const PIPELINES: &str = "pipelines";
    /// CRM users (assignees).
    pub const USERS: &str = "users";
    /// What deletes removed, kept for restores (`restore::kept`).
    pub const KEPT: &str = "bulk_kept";
}

/// True when a MongoDB error is a duplicate-key violation (E11000).
pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().all(|w| w.code == 11000)),
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

/// Job records and leases.
#[derive(Clone, Debug)]
pub struct JobStore {
    db: Database,
    jobs: Collection<JobRecord>,
    clock_offset_ms: i64,
    /// The database's clock minus this instance's (with its test offset).
    db_offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// A lease held by this instance: who and which acquisition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The instance.
    pub owner: String,
    /// The acquisition (`leaseEpoch` of the record).
    pub epoch: i64,
}

/// Filter of a job nobody holds: never leased, released, or expired by the
/// database's clock.
fn lease_free() -> Document {
    doc! {"$or": [
        {"leaseOwner": null},
        {"$expr": {"$lt": ["$leaseUntil", "$$NOW"]}},
    ]}
}

/// Filter of a job held under `lease` and not finished.
fn held(job_id: &str, lease: &Lease) -> Document {
    doc! {
        "_id": job_id,
        "leaseOwner": &lease.owner,
        "leaseEpoch": lease.epoch,
        "status": {"$in": ["pending", "processing"]},
    }
}

fn after() -> FindOneAndUpdateOptions {
    FindOneAndUpdateOptions::builder()
        .return_document(ReturnDocument::After)
        .build()
}

impl JobStore {
    /// Wraps the CRM database.
    pub fn new(db: Database) -> JobStore {
        let jobs = db.collection(names::JOBS);
        JobStore {
            db,
            jobs,
            clock_offset_ms: 0,
            db_offset_ms: Default::default(),
        }
    }

    /// Measures the offset of the database's clock to this instance's
    /// (`hello.localTime`, corrected by half the round trip).
    pub async fn sync_clock(&self) -> Result<(), JobError> {
        use std::sync::atomic::Ordering;
        let sent = self.now().timestamp_millis();
        let hello = self.db.run_command(doc! {"hello": 1}).await?;
        let back = self.now().timestamp_millis();
        match hello.get_datetime("localTime") {
            Ok(server) => {
                let offset = server.timestamp_millis() - (sent + back) / 2;
                let before = self.db_offset_ms.swap(offset, Ordering::Relaxed);
                if (offset - before).abs() > 1000 {
                    tracing::info!(offset_ms = offset, "database clock offset");
                }
            }
            Err(_) => tracing::warn!("hello without localTime: leases use this instance's clock"),
        }
        Ok(())
    }

    /// Now on the database's clock, as well as this instance can tell.
    pub fn db_now(&self) -> DateTime {
        let offset = self.db_offset_ms.load(std::sync::atomic::Ordering::Relaxed);
        DateTime::from_millis(self.now().timestamp_millis() + offset)
    }

    /// When a lease taken or renewed now ends, on the database's clock.
    fn lease_until(&self, ttl: Duration) -> DateTime {
        DateTime::from_millis(self.db_now().timestamp_millis() + ttl.as_millis() as i64)
    }

    /// Shifts this instance's clock (tests of clock skew only): every time the
    /// instance itself stamps reads it; leases never do.
    pub fn with_clock_offset(mut self, ms: i64) -> JobStore {
        self.clock_offset_ms = ms;
        self
    }

    /// This instance's clock (with the test offset).
    pub fn now(&self) -> DateTime {
        DateTime::from_millis(DateTime::now().timestamp_millis() + self.clock_offset_ms)
    }

    /// The database.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// The job records.
    pub fn jobs(&self) -> &Collection<JobRecord> {
        &self.jobs
    }

    /// Creates the indexes jobs rely on. Index builds over existing data can take
    /// a while, so each one is logged.
    pub async fn ensure_indexes(&self) -> Result<(), JobError> {
        let unique_sparse = || IndexOptions::builder().unique(true).sparse(true).build();
        let plan: Vec<(&str, IndexModel)> = vec![
            (
                names::JOBS,
                IndexModel::builder()
                    .keys(doc! {"commandKey": 1})
                    .options(unique_sparse())
                    .build(),
            ),
            (
                names::JOBS,
                // The scan for jobs to start: per organisation, oldest first.
                IndexModel::builder()
                    .keys(doc! {"status": 1, "orgId": 1, "createdAt": 1})
                    .build(),
            ),
            (
                names::JOBS,
                IndexModel::builder()
                    .keys(doc! {"orgId": 1, "createdAt": -1})
                    .build(),
            ),
            (
                names::JOBS,
                // The n-th restore of a delete: one at a time, and how a
                // delete's restores are found.
                IndexModel::builder()
                    .keys(doc! {"restoreKey": 1})
                    .options(unique_sparse())
                    .build(),
            ),
            (
                names::KEPT,
                // Kept documents go when their retention ends (the server's
                // TTL monitor; restores also refuse expired deletes themselves).
                IndexModel::builder()
                    .keys(doc! {"expiresAt": 1})
                    .options(
                        IndexOptions::builder()
                            .expire_after(Duration::from_secs(0))
                            .build(),
                    )
                    .build(),
            ),
            (
                names::CHUNKS,
                IndexModel::builder()
                    .keys(doc! {"jobId": 1, "n": 1})
                    .options(IndexOptions::builder().unique(true).build())
                    .build(),
            ),
            (
                names::EVENT_LOGS,
                // `<orgId>:<contactId>` of bulk-delete entries: one per deleted
                // contact, and how a job finds its own by contact id range.
                // Sparse, so the CRM's own entries are not constrained.
                IndexModel::builder()
                    .keys(doc! {"bulkKey": 1})
                    .options(unique_sparse())
                    .build(),
            ),
            (
                names::NOTIFICATIONS,
                IndexModel::builder()
                    .keys(doc! {"bulkKey": 1})
                    .options(unique_sparse())
                    .build(),
            ),
            (
                names::CONVERSATIONS,
                IndexModel::builder().keys(doc! {"contactId": 1}).build(),
            ),
            (
                names::MESSAGES,
                IndexModel::builder().keys(doc! {"contactId": 1}).build(),
            ),
        ];
        let mut plan = plan;
        for coll in ["contacts", "applications"] {
            plan.push((
                coll,
                IndexModel::builder()
                    .keys(doc! {"orgId": 1, "stageId": 1, "_id": 1})
                    .build(),
            ));
            plan.push((
                coll,
                IndexModel::builder()
                    .keys(doc! {"orgId": 1, "_id": 1})
                    .build(),
            ));
        }
        for (coll, model) in plan {
            let keys = model.keys.clone();
            let started = std::time::Instant::now();
            tracing::info!(collection = coll, keys = %keys, "ensuring index");
            self.db
                .collection::<Document>(coll)
                .create_index(model)
                .await?;
            tracing::info!(collection = coll, keys = %keys, elapsed_ms = started.elapsed().as_millis() as u64, "index ready");
        }
        Ok(())
    }

    /// Inserts a new job. With a `commandId` already used by this organisation,
    /// returns the existing job instead (`created == false`): the unique index
    /// decides, so two racing submissions cannot both create a job.
    pub async fn create(&self, job: JobRecord) -> Result<(JobRecord, bool), JobError> {
        match self.jobs.insert_one(&job).await {
            Ok(_) => Ok((job, true)),
            Err(e) if is_duplicate_key(&e) => {
                // The same command, or (restores) the same n-th restore of a delete.
                let mut found = None;
                if let Some(key) = &job.command_key {
                    found = self.jobs.find_one(doc! {"commandKey": key}).await?;
                }
                if let (None, Some(key)) = (&found, &job.restore_key) {
                    found = self.jobs.find_one(doc! {"restoreKey": key}).await?;
                }
                let existing =
                    found.ok_or_else(|| JobError::Internal("duplicate job vanished".into()))?;
                Ok((existing, false))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A job of this organisation by id.
    pub async fn get(&self, org: ObjectId, job_id: &str) -> Result<JobRecord, JobError> {
        self.jobs
            .find_one(doc! {"_id": job_id, "orgId": org})
            .await?
            .ok_or_else(|| JobError::NotFound(format!("job {job_id}")))
    }

    /// A job by id, whatever its organisation (internal use only).
    pub async fn get_any(&self, job_id: &str) -> Result<Option<JobRecord>, JobError> {
        Ok(self.jobs.find_one(doc! {"_id": job_id}).await?)
    }

    /// A job of this organisation by its command id.
    pub async fn get_by_command(
        &self,
        org: ObjectId,
        command_id: &str,
    ) -> Result<JobRecord, JobError> {
        let key = format!("{}:{command_id}", org.to_hex());
        self.jobs
            .find_one(doc! {"commandKey": key, "orgId": org})
            .await?
            .ok_or_else(|| JobError::NotFound(format!("command {command_id}")))
    }

    /// The organisation's most recent jobs, newest first.
    pub async fn list(&self, org: ObjectId, limit: i64) -> Result<Vec<JobRecord>, JobError> {
        let cursor = self
            .jobs
            .find(doc! {"orgId": org})
            .sort(doc! {"createdAt": -1})
            .limit(limit)
            .await?;
        Ok(cursor.try_collect().await?)
    }

    /// Organisations with jobs nobody holds (pending, or abandoned), the one
    /// waiting longest first, at most `limit` of them.
    pub async fn resumable_orgs(&self, limit: i64) -> Result<Vec<ObjectId>, JobError> {
        let mut filter = doc! {"status": {"$in": ["pending", "processing"]}};
        filter.extend(lease_free());
        let cursor = self
            .db
            .collection::<Document>(names::JOBS)
            .aggregate([
                doc! {"$match": filter},
                doc! {"$group": {"_id": "$orgId", "oldest": {"$min": "$createdAt"}}},
                doc! {"$sort": {"oldest": 1, "_id": 1}},
                doc! {"$limit": limit},
            ])
            .await?;
        let groups: Vec<Document> = cursor.try_collect().await?;
        Ok(groups
            .iter()
            .filter_map(|g| g.get_object_id("_id").ok())
            .collect())
    }

    /// An organisation's jobs nobody holds, oldest first, at most `limit`.
    pub async fn resumable_of(
        &self,
        org: ObjectId,
        limit: i64,
    ) -> Result<Vec<JobRecord>, JobError> {
        let mut filter = doc! {"status": {"$in": ["pending", "processing"]}, "orgId": org};
        filter.extend(lease_free());
        let cursor = self
            .jobs
            .find(filter)
            .sort(doc! {"createdAt": 1})
            .limit(limit)
            .await?;
        Ok(cursor.try_collect().await?)
    }

    /// Takes the job for `owner` if it is not terminal and nobody else holds a
    /// live lease (by the database's clock), bumping the epoch. Costs no
    /// attempt: only failures do (a first start makes `attempts` 1).
    /// `None` when someone else has it or it is finished.
    pub async fn acquire(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<JobRecord>, JobError> {
        let free = lease_free();
        let mut taken = free.get_array("$or").cloned().unwrap_or_default();
        taken.push(bson::Bson::Document(doc! {"leaseOwner": owner}));
        Ok(self
            .jobs
            .find_one_and_update(
                doc! {
                    "_id": job_id,
                    "status": {"$in": ["pending", "processing"]},
                    "$or": taken,
                },
                doc! {
                    "$set": {"leaseOwner": owner, "leaseUntil": self.lease_until(ttl)},
                    "$inc": {"leaseEpoch": 1i64},
                    "$max": {"attempts": 1},
                },
            )
            .with_options(after())
            .await?)
    }

    /// Applies `update` to a job held under `lease`, renewing the lease, and
    /// returns the record after it. `Conflict` when the lease is lost (another
    /// instance took the job, or it reached a terminal state): the write did
    /// nothing.
    pub async fn update_held(
        &self,
        job_id: &str,
        lease: &Lease,
        ttl: Duration,
        mut update: Document,
    ) -> Result<JobRecord, JobError> {
        let set = update
            .entry("$set".to_string())
            .or_insert_with(|| bson::Bson::Document(Document::new()));
        if let bson::Bson::Document(set) = set {
            set.insert("leaseUntil", self.lease_until(ttl));
        }
        self.jobs
            .find_one_and_update(held(job_id, lease), update)
            .with_options(after())
            .await?
            .ok_or_else(|| JobError::Conflict(format!("lease on job {job_id} lost")))
    }

    /// Moves a job held under `lease` to a terminal state and drops the lease.
    /// A retry of a terminal write whose reply was lost finds the job finished
    /// under the same epoch and returns it, so the caller still announces it.
    pub async fn finish(
        &self,
        job_id: &str,
        lease: &Lease,
        status: JobStatus,
        mut set: Document,
    ) -> Result<JobRecord, JobError> {
        set.insert("status", status.as_str());
        set.insert("leaseOwner", bson::Bson::Null);
        set.insert("leaseUntil", bson::Bson::Null);
        set.insert("inflight", bson::Bson::Null);
        set.insert("inflightNext", bson::Bson::Null);
        set.insert("waiting", bson::Bson::Null);
        let done = self
            .jobs
            .find_one_and_update(
                held(job_id, lease),
                doc! {"$set": set, "$currentDate": {"finishedAt": true}},
            )
            .with_options(after())
            .await?;
        if let Some(done) = done {
            return Ok(done);
        }
        match self.get_any(job_id).await? {
            // Nobody took the job since: this lease finished it.
            Some(job) if job.status.is_terminal() && job.lease_epoch == lease.epoch => Ok(job),
            _ => Err(JobError::Conflict(format!("lease on job {job_id} lost"))),
        }
    }

    /// Counts a failure of the job's own work against its attempts and lets the
    /// lease go, so the job restarts from its checkpoint. The record after it,
    /// `None` when the lease was lost meanwhile.
    pub async fn count_failure(
        &self,
        job_id: &str,
        lease: &Lease,
        error: &str,
    ) -> Result<Option<JobRecord>, JobError> {
        Ok(self
            .jobs
            .find_one_and_update(
                held(job_id, lease),
                doc! {
                    "$inc": {"attempts": 1},
                    "$set": {"leaseOwner": null, "leaseUntil": null, "lastError": error, "waiting": null},
                },
            )
            .with_options(after())
            .await?)
    }

    /// Fails a job held under `lease` for good (its attempts are spent), and
    /// gives back what a delete had decided on but not deleted.
    pub async fn fail_held(
        &self,
        job_id: &str,
        lease: &Lease,
        error: &str,
    ) -> Result<JobRecord, JobError> {
        let failed = self
            .finish(job_id, lease, JobStatus::Failed, doc! {"error": error})
            .await?;
        match failed.kind {
            // The contacts its unfinished batches had not deleted go back
            // to being anyone's: a later job may delete them.
            crate::model::JobKind::Delete => {
                crate::delete::release_undecided(&self.db, &failed).await?
            }
            // No file will ever be read.
            crate::model::JobKind::Export => {
                crate::artifact::Artifacts::new(&self.db)
                    .remove_from(job_id, 0)
                    .await?;
            }
            // Likewise the contacts a restore decided on but did not put
            // back: a later restore of the same delete puts them back.
            crate::model::JobKind::Restore => {
                crate::restore::release_undecided(&self.db, &failed).await?
            }
        }
        Ok(failed)
    }

    /// Gives the job back without changing its state, so it stays resumable
    /// (drain on shutdown). Fenced: a lease already lost is left alone.
    pub async fn release(&self, job_id: &str, lease: &Lease) -> Result<(), JobError> {
        self.jobs
            .update_one(
                doc! {"_id": job_id, "leaseOwner": &lease.owner, "leaseEpoch": lease.epoch},
                doc! {"$set": {"leaseOwner": null, "leaseUntil": null, "waiting": null}},
            )
            .await?;
        Ok(())
    }

    /// Asks for a cancel. A pending job nobody holds is cancelled at once; a
    /// running one gets `cancelRequested` and stops at its next batch boundary.
    /// Returns the record after the change (unchanged when already terminal) and
    /// whether this call itself moved a pending job to `cancelled` (no actor will
    /// announce that change: the caller must).
    pub async fn request_cancel(
        &self,
        org: ObjectId,
        job_id: &str,
    ) -> Result<(JobRecord, bool), JobError> {
        let opts = after();
        let mut pending_free = doc! {"_id": job_id, "orgId": org, "status": "pending"};
        pending_free.extend(lease_free());
        let cancelled = self
            .jobs
            .find_one_and_update(
                pending_free,
                doc! {
                    "$set": {"status": "cancelled", "cancelRequested": true},
                    "$currentDate": {"finishedAt": true},
                },
            )
            .with_options(opts.clone())
            .await?;
        if let Some(job) = cancelled {
            return Ok((job, true));
        }
        let requested = self
            .jobs
            .find_one_and_update(
                doc! {"_id": job_id, "orgId": org, "status": {"$in": ["pending", "processing"]}},
                doc! {"$set": {"cancelRequested": true}},
            )
            .with_options(opts)
            .await?;
        match requested {
            Some(job) => Ok((job, false)),
            None => Ok((self.get(org, job_id).await?, false)),
        }
    }
}
