//! [`JobRepo`] on MongoDB (`bulk_jobs`): leases judged by the database's clock.
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

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::options::{FindOneAndUpdateOptions, ReturnDocument};
use mongodb::{Collection, Database};

use super::jobs::{Ending, JobPatch, JobRepo, Lease, Sweep};
use crate::error::JobError;
use crate::model::{JobKind, JobRecord};
use crate::store::{is_duplicate_key, names};

/// Statuses of jobs that ended.
const ENDED: [&str; 3] = ["completed", "failed", "cancelled"];

/// Job records in MongoDB.
#[derive(Clone, Debug)]
pub struct MongoJobs {
    db: Database,
    jobs: Collection<JobRecord>,
    clock_offset_ms: i64,
    /// The database's clock minus this instance's (with its test offset).
    db_offset_ms: Arc<AtomicI64>,
}

/// Filter of a job nobody holds: never leased, released, or expired by the
/// database's clock.
fn lease_free() -> Vec<Bson> {
    vec![
        Bson::Document(doc! {"leaseOwner": null}),
        Bson::Document(doc! {"$expr": {"$lt": ["$leaseUntil", "$$NOW"]}}),
    ]
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

/// The `$set` of a patch: every field path of the record written in one place.
fn patch_set(patch: &JobPatch) -> Result<Document, JobError> {
    let mut set = Document::new();
    if let Some(at) = patch.started_at {
        set.insert("initialised", true);
        set.insert("status", "processing");
        set.insert("startedAt", at);
    }
    if let Some(max_id) = patch.snapshot_max_id {
        set.insert("snapshotMaxId", max_id);
    }
    if let Some(total) = patch.total {
        set.insert("total", total.map_or(Bson::Null, Bson::Int64));
    }
    if let Some(keys) = &patch.custom_keys {
        set.insert("customKeys", bson::to_bson(keys)?);
    }
    if let Some(processed) = patch.processed {
        set.insert("processed", processed);
    }
    if let Some(checkpoint) = &patch.checkpoint {
        set.insert("checkpoint", bson::to_bson(checkpoint)?);
    }
    if let Some(counts) = &patch.counts {
        set.insert("counts", bson::to_bson(counts)?);
    }
    if let Some(skipped) = patch.skipped {
        set.insert("skipped", skipped);
    }
    if let Some(until) = patch.restorable_until {
        set.insert("restorableUntil", until);
    }
    if let Some((first, next)) = &patch.inflight {
        set.insert("inflight", bson::to_bson(first)?);
        set.insert("inflightNext", bson::to_bson(next)?);
    }
    if let Some(waiting) = patch.waiting {
        set.insert(
            "waiting",
            waiting.map_or(Bson::Null, |w| Bson::from(w.as_str())),
        );
    }
    Ok(set)
}

impl MongoJobs {
    /// Wraps the CRM database.
    pub fn new(db: &Database) -> MongoJobs {
        MongoJobs {
            db: db.clone(),
            jobs: db.collection(names::JOBS),
            clock_offset_ms: 0,
            db_offset_ms: Default::default(),
        }
    }

    /// Shifts this instance's clock (tests of clock skew only): every time the
    /// instance itself stamps reads it; leases never do.
    pub fn with_clock_offset(mut self, ms: i64) -> MongoJobs {
        self.clock_offset_ms = ms;
        self
    }

    /// Now on the database's clock, as well as this instance can tell.
    pub fn db_now(&self) -> DateTime {
        let offset = self.db_offset_ms.load(Ordering::Relaxed);
        DateTime::from_millis(self.now().timestamp_millis() + offset)
    }

    /// When a lease taken or renewed now ends, on the database's clock.
    fn lease_until(&self, ttl: Duration) -> DateTime {
        DateTime::from_millis(self.db_now().timestamp_millis() + ttl.as_millis() as i64)
    }

    async fn ids(&self, filter: Document, limit: i64) -> Result<Vec<String>, JobError> {
        let docs: Vec<Document> = self
            .db
            .collection::<Document>(names::JOBS)
            .find(filter)
            .projection(doc! {"_id": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(String::from))
            .collect())
    }
}

#[async_trait]
impl JobRepo for MongoJobs {
    fn now(&self) -> DateTime {
        DateTime::from_millis(DateTime::now().timestamp_millis() + self.clock_offset_ms)
    }

    /// Measures the offset of the database's clock to this instance's
    /// (`hello.localTime`, corrected by half the round trip).
    async fn sync_clock(&self) -> Result<(), JobError> {
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

    async fn create(&self, job: JobRecord) -> Result<(JobRecord, bool), JobError> {
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

    async fn get(&self, org: ObjectId, job_id: &str) -> Result<JobRecord, JobError> {
        self.jobs
            .find_one(doc! {"_id": job_id, "orgId": org})
            .await?
            .ok_or_else(|| JobError::NotFound(format!("job {job_id}")))
    }

    async fn get_any(&self, job_id: &str) -> Result<Option<JobRecord>, JobError> {
        Ok(self.jobs.find_one(doc! {"_id": job_id}).await?)
    }

    async fn get_by_command(&self, org: ObjectId, command_id: &str) -> Result<JobRecord, JobError> {
        let key = format!("{}:{command_id}", org.to_hex());
        self.jobs
            .find_one(doc! {"commandKey": key, "orgId": org})
            .await?
            .ok_or_else(|| JobError::NotFound(format!("command {command_id}")))
    }

    async fn list(&self, org: ObjectId, limit: i64) -> Result<Vec<JobRecord>, JobError> {
        let cursor = self
            .jobs
            .find(doc! {"orgId": org})
            .sort(doc! {"createdAt": -1})
            .limit(limit)
            .await?;
        Ok(cursor.try_collect().await?)
    }

    async fn count_pending(&self, org: Option<ObjectId>) -> Result<u64, JobError> {
        let mut filter = doc! {"status": "pending"};
        if let Some(org) = org {
            filter.insert("orgId", org);
        }
        Ok(self.jobs.count_documents(filter).await?)
    }

    async fn restores_of(&self, source: &str) -> Result<Vec<JobRecord>, JobError> {
        Ok(self
            .jobs
            .find(doc! {"restoreKey": {"$gte": format!("{source}#"), "$lt": format!("{source}$")}})
            .await?
            .try_collect()
            .await?)
    }

    async fn ended_within(
        &self,
        orgs: &[ObjectId],
        created_since: DateTime,
        (from, to): (DateTime, DateTime),
    ) -> Result<Vec<JobRecord>, JobError> {
        Ok(self
            .jobs
            .find(doc! {
                "orgId": {"$in": orgs},
                "createdAt": {"$gte": created_since},
                "status": {"$in": ENDED.as_slice()},
                "finishedAt": {"$gte": from, "$lte": to},
            })
            .await?
            .try_collect()
            .await?)
    }

    async fn resumable_orgs(&self, limit: i64) -> Result<Vec<ObjectId>, JobError> {
        let filter = doc! {"status": {"$in": ["pending", "processing"]}, "$or": lease_free()};
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

    async fn resumable_of(&self, org: ObjectId, limit: i64) -> Result<Vec<JobRecord>, JobError> {
        let filter = doc! {
            "status": {"$in": ["pending", "processing"]},
            "orgId": org,
            "$or": lease_free(),
        };
        let cursor = self
            .jobs
            .find(filter)
            .sort(doc! {"createdAt": 1})
            .limit(limit)
            .await?;
        Ok(cursor.try_collect().await?)
    }

    async fn acquire(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<JobRecord>, JobError> {
        let mut taken = lease_free();
        taken.push(Bson::Document(doc! {"leaseOwner": owner}));
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

    async fn update_held(
        &self,
        job_id: &str,
        lease: &Lease,
        ttl: Duration,
        patch: &JobPatch,
    ) -> Result<JobRecord, JobError> {
        let mut set = patch_set(patch)?;
        set.insert("leaseUntil", self.lease_until(ttl));
        self.jobs
            .find_one_and_update(held(job_id, lease), doc! {"$set": set})
            .with_options(after())
            .await?
            .ok_or_else(|| JobError::Conflict(format!("lease on job {job_id} lost")))
    }

    async fn finish(
        &self,
        job_id: &str,
        lease: &Lease,
        ending: &Ending,
    ) -> Result<JobRecord, JobError> {
        let mut set = doc! {
            "status": ending.status().as_str(),
            "leaseOwner": null,
            "leaseUntil": null,
            "inflight": null,
            "inflightNext": null,
            "waiting": null,
        };
        match ending {
            Ending::Completed(Some(file)) => {
                set.insert("result", bson::to_bson(file)?);
            }
            Ending::Failed(error) => {
                set.insert("error", error.as_str());
                // The clean-up is owed from the same write that fails the
                // job, so a crash right after it cannot skip the clean-up.
                set.insert("cleanupPending", true);
            }
            Ending::Completed(None) | Ending::Cancelled => {}
        }
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

    async fn claim_cleanup(
        &self,
        job_id: Option<&str>,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<JobRecord>, JobError> {
        let mut filter = doc! {
            "cleanupPending": true,
            "status": "failed",
            "$or": [
                {"cleanupUntil": null},
                {"$expr": {"$lt": ["$cleanupUntil", "$$NOW"]}},
            ],
        };
        if let Some(id) = job_id {
            filter.insert("_id", id);
        }
        Ok(self
            .jobs
            .find_one_and_update(
                filter,
                doc! {"$set": {"cleanupOwner": owner, "cleanupUntil": self.lease_until(ttl)}},
            )
            .sort(doc! {"finishedAt": 1})
            .with_options(after())
            .await?)
    }

    async fn cleaned(&self, job_id: &str, owner: &str) -> Result<(), JobError> {
        self.jobs
            .update_one(
                doc! {"_id": job_id, "cleanupOwner": owner},
                doc! {"$unset": {"cleanupPending": "", "cleanupOwner": "", "cleanupUntil": ""}},
            )
            .await?;
        Ok(())
    }

    async fn count_failure(
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

    async fn release(&self, job_id: &str, lease: &Lease) -> Result<(), JobError> {
        self.jobs
            .update_one(
                doc! {"_id": job_id, "leaseOwner": &lease.owner, "leaseEpoch": lease.epoch},
                doc! {"$set": {"leaseOwner": null, "leaseUntil": null, "waiting": null}},
            )
            .await?;
        Ok(())
    }

    async fn request_cancel(
        &self,
        org: ObjectId,
        job_id: &str,
    ) -> Result<(JobRecord, bool), JobError> {
        let cancelled = self
            .jobs
            .find_one_and_update(
                doc! {"_id": job_id, "orgId": org, "status": "pending", "$or": lease_free()},
                doc! {
                    "$set": {"status": "cancelled", "cancelRequested": true},
                    "$currentDate": {"finishedAt": true},
                },
            )
            .with_options(after())
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
            .with_options(after())
            .await?;
        match requested {
            Some(job) => Ok((job, false)),
            None => Ok((self.get(org, job_id).await?, false)),
        }
    }

    async fn due(
        &self,
        what: Sweep,
        finished_by: DateTime,
        limit: i64,
    ) -> Result<Vec<String>, JobError> {
        let mut filter = doc! {
            "status": {"$in": ENDED.as_slice()},
            "finishedAt": {"$lte": finished_by},
        };
        if what == Sweep::Exports {
            filter.insert("kind", JobKind::Export.as_str());
            filter.insert("expiredAt", doc! {"$exists": false});
        } else {
            // A record owing its clean-up is what makes the clean-up happen.
            filter.insert("cleanupPending", doc! {"$exists": false});
        }
        self.ids(filter, limit).await
    }

    async fn mark_expired(&self, ids: &[String]) -> Result<u64, JobError> {
        // Only completed exports have a result to mark; failed and cancelled
        // ones just lose their partial chunks.
        self.jobs
            .update_many(
                doc! {"_id": {"$in": ids}, "result": {"$type": "object"}},
                doc! {"$set": {"result.expired": true}},
            )
            .await?;
        let r = self
            .jobs
            .update_many(
                doc! {"_id": {"$in": ids}, "expiredAt": {"$exists": false}},
                doc! {"$set": {"expiredAt": DateTime::now()}},
            )
            .await?;
        Ok(r.modified_count)
    }

    async fn remove_ended(&self, ids: &[String]) -> Result<u64, JobError> {
        let r = self
            .jobs
            .delete_many(doc! {"_id": {"$in": ids}, "status": {"$in": ENDED.as_slice()}})
            .await?;
        Ok(r.deleted_count)
    }
}
