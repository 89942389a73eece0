//! MongoDB access for job records (`bulk_jobs`) and the indexes every job query relies on.

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
}

impl JobStore {
    /// Wraps the CRM database.
    pub fn new(db: Database) -> JobStore {
        let jobs = db.collection(names::JOBS);
        JobStore { db, jobs }
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
                IndexModel::builder()
                    .keys(doc! {"status": 1, "leaseUntil": 1})
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

    /// Non-terminal jobs nobody holds (never leased, or lease expired), oldest first.
    pub async fn resumable(&self, limit: i64) -> Result<Vec<JobRecord>, JobError> {
        let now = DateTime::now();
        let cursor = self
            .jobs
            .find(doc! {
                "status": {"$in": ["pending", "processing"]},
                "$or": [{"leaseUntil": null}, {"leaseUntil": {"$lt": now}}],
            })
            .sort(doc! {"createdAt": 1})
            .limit(limit)
            .await?;
        Ok(cursor.try_collect().await?)
    }

    /// Takes the job for `owner` if it is not terminal and nobody else holds a live lease;
    /// counts the attempt. `None` when someone else has it or it is finished.
    pub async fn acquire(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<JobRecord>, JobError> {
        let now = DateTime::now();
        let until = lease_until(ttl);
        let opts = FindOneAndUpdateOptions::builder()
            .return_document(ReturnDocument::After)
            .build();
        Ok(self
            .jobs
            .find_one_and_update(
                doc! {
                    "_id": job_id,
                    "status": {"$in": ["pending", "processing"]},
                    "$or": [{"leaseUntil": null}, {"leaseUntil": {"$lt": now}}, {"leaseOwner": owner}],
                },
                doc! {"$set": {"leaseOwner": owner, "leaseUntil": until}, "$inc": {"attempts": 1}},
            )
            .with_options(opts)
            .await?)
    }

    /// Applies `update` to a job this instance holds, renewing the lease, and
    /// returns the record after it. `LeaseLost` (as `Conflict`) when another
    /// instance took the job or it reached a terminal state.
    pub async fn update_held(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
        mut update: Document,
    ) -> Result<JobRecord, JobError> {
        let set = update
            .entry("$set".to_string())
            .or_insert_with(|| bson::Bson::Document(Document::new()));
        if let bson::Bson::Document(set) = set {
            set.insert("leaseUntil", lease_until(ttl));
        }
        let opts = FindOneAndUpdateOptions::builder()
            .return_document(ReturnDocument::After)
            .build();
        self.jobs
            .find_one_and_update(
                doc! {"_id": job_id, "leaseOwner": owner, "status": {"$in": ["pending", "processing"]}},
                update,
            )
            .with_options(opts)
            .await?
            .ok_or_else(|| JobError::Conflict(format!("lease on job {job_id} lost")))
    }

    /// Moves a held job to a terminal state and drops the lease.
    pub async fn finish(
        &self,
        job_id: &str,
        owner: &str,
        status: JobStatus,
        mut set: Document,
    ) -> Result<JobRecord, JobError> {
        set.insert("status", status.as_str());
        set.insert("finishedAt", DateTime::now());
        set.insert("leaseOwner", bson::Bson::Null);
        set.insert("leaseUntil", bson::Bson::Null);
        set.insert("inflight", bson::Bson::Null);
        set.insert("inflightNext", bson::Bson::Null);
        let opts = FindOneAndUpdateOptions::builder()
            .return_document(ReturnDocument::After)
            .build();
        self.jobs
            .find_one_and_update(
                doc! {"_id": job_id, "leaseOwner": owner, "status": {"$in": ["pending", "processing"]}},
                doc! {"$set": set},
            )
            .with_options(opts)
            .await?
            .ok_or_else(|| JobError::Conflict(format!("lease on job {job_id} lost")))
    }

    /// Marks a job nobody holds as failed (attempts exhausted while it was not running).
    pub async fn fail_unheld(
        &self,
        job_id: &str,
        error: &str,
    ) -> Result<Option<JobRecord>, JobError> {
        let opts = FindOneAndUpdateOptions::builder()
            .return_document(ReturnDocument::After)
            .build();
        let failed = self
            .jobs
            .find_one_and_update(
                doc! {"_id": job_id, "status": {"$in": ["pending", "processing"]}},
                doc! {"$set": {"status": "failed", "error": error, "finishedAt": DateTime::now(),
                "leaseOwner": null, "leaseUntil": null}},
            )
            .with_options(opts)
            .await?;
        if let Some(job) = &failed {
            match job.kind {
                // The contacts its unfinished batches had not deleted go back
                // to being anyone's: a later job may delete them.
                crate::model::JobKind::Delete => {
                    crate::delete::release_undecided(&self.db, job).await?
                }
                // Likewise the contacts a restore decided on but did not put
                // back: a later restore of the same delete puts them back.
                crate::model::JobKind::Restore => {
                    crate::restore::release_undecided(&self.db, job).await?
                }
                crate::model::JobKind::Export => {}
            }
        }
        Ok(failed)
    }

    /// Gives the job back without changing its state, so it stays resumable (drain on shutdown).
    pub async fn release(&self, job_id: &str, owner: &str) -> Result<(), JobError> {
        self.jobs
            .update_one(
                doc! {"_id": job_id, "leaseOwner": owner},
                doc! {"$set": {"leaseOwner": null, "leaseUntil": null}},
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
        let now = DateTime::now();
        let opts = FindOneAndUpdateOptions::builder()
            .return_document(ReturnDocument::After)
            .build();
        let cancelled = self
            .jobs
            .find_one_and_update(
                doc! {
                    "_id": job_id, "orgId": org, "status": "pending",
                    "$or": [{"leaseUntil": null}, {"leaseUntil": {"$lt": now}}],
                },
                doc! {"$set": {"status": "cancelled", "finishedAt": now, "cancelRequested": true}},
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

fn lease_until(ttl: Duration) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() + ttl.as_millis() as i64)
}
