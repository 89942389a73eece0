//! The delete actor: one per delete job; each `Step` message cascade-deletes one batch.
//!
//! A batch goes through steps that are safe to stop after at any point:
//! 1. pick the next candidate ids after the checkpoint (within the frozen snapshot);
//! 2. claim those that still match the filter (`bulkDeleteJobId` on the contact);
//!    the claim is the decision: a contact moved out of the filter before it is left alone;
//! 3. count their conversations and messages and record the batch as `inflight` on the job;
//! 4. write one `event_logs` CONTACT_DELETE entry per contact (unique per job and contact),
//!    which is also the outbox of what still has to be announced;
//! 5. delete messages, then conversations, then the claimed contacts (`$in`, idempotent);
//! 6. publish `contact_removed` for entries not yet announced (deduplicated by `Nats-Msg-Id`), mark them;
//! 7. notify assignees (one document per assignee and job, each batch applied once);
//! 8. checkpoint: last id, counts from `inflight`, `inflight` cleared.
//!
//! A resumed job with an `inflight` batch redoes 4–8 for it; each of them is idempotent.

use std::collections::BTreeMap;
use std::future::IntoFuture;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::options::{InsertManyOptions, UpdateOptions};
use mongodb::{Collection, Cursor, Database};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::error::JobError;
use crate::events::RemovedContact;
use crate::filter::Filter;
use crate::job::{handle_job_msg, JobEnv, JobMsg, JobRun, JobStep};
use crate::model::{Counts, DeleteInflight, JobRecord, JobStatus};
use crate::snapshot;
use crate::store::{is_duplicate_key, names};

/// The field that marks a contact as claimed by a delete job.
pub const CLAIM_FIELD: &str = "bulkDeleteJobId";

/// The delete actor.
pub struct DeleteActor;

/// Its state, built in `pre_start`.
pub struct DeleteState {
    run: JobRun,
    /// Candidate ids in `_id` order after the checkpoint, read a batch at a
    /// time. One cursor for the whole job: asking afresh for "the next batch
    /// after the checkpoint" costs some servers a scan of everything left.
    candidates: Option<Cursor<Document>>,
}

/// The most contact ids a notification lists; `count` stays exact.
pub const NOTIFICATION_SAMPLE: i32 = 1000;

impl Actor for DeleteActor {
    type Msg = JobMsg;
    type State = DeleteState;
    type Arguments = (JobEnv, JobRecord);

    async fn pre_start(
        &self,
        _myself: ActorRef<JobMsg>,
        (env, job): (JobEnv, JobRecord),
    ) -> Result<DeleteState, ActorProcessingErr> {
        Ok(DeleteState {
            run: JobRun::new(env, job),
            candidates: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<JobMsg>,
        _state: &mut DeleteState,
    ) -> Result<(), ActorProcessingErr> {
        let _ = myself.send_message(JobMsg::Step);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<JobMsg>,
        msg: JobMsg,
        state: &mut DeleteState,
    ) -> Result<(), ActorProcessingErr> {
        handle_job_msg(&myself, msg, state).await
    }
}

impl JobStep for DeleteState {
    fn run(&mut self) -> &mut JobRun {
        &mut self.run
    }

    fn reset(&mut self) {
        // A failed step may have read ids it never claimed: start again from
        // the checkpoint.
        self.candidates = None;
    }

    async fn step(&mut self) -> Result<bool, JobError> {
        step(self).await
    }
}

async fn step(s: &mut DeleteState) -> Result<bool, JobError> {
    let run = &mut s.run;
    if !run.job.initialised {
        initialise(run).await?;
    }
    if let Some(inflight) = run.job.inflight.clone() {
        finish_batch(run, &inflight).await?;
        return Ok(true);
    }
    if run.cancel {
        release_claims(run).await?;
        run.finish(JobStatus::Cancelled, doc! {}).await?;
        return Ok(false);
    }
    let Some(max_id) = run.job.snapshot_max_id else {
        return complete(run).await;
    };
    let job = &run.job;
    let db = run.env.store.db();
    let coll = contacts(db, &job.filter);
    let batch = run.env.settings.delete_batch as usize;
    if s.candidates.is_none() {
        let mut query = job.filter.query(job.org_id);
        let mut range = doc! {"$lte": max_id};
        if let Some(after) = job.checkpoint.last_id {
            range.insert("$gt", after);
        }
        query.insert("_id", range);
        let cursor = coll
            .find(query)
            .sort(doc! {"_id": 1})
            .projection(doc! {"_id": 1})
            .batch_size(batch as u32)
            .await?;
        s.candidates = Some(cursor);
    }
    let mut candidates: Vec<ObjectId> = Vec::with_capacity(batch);
    if let Some(cursor) = s.candidates.as_mut() {
        while candidates.len() < batch {
            match cursor.try_next().await? {
                Some(d) => candidates.extend(d.get_object_id("_id").ok()),
                None => break,
            }
        }
    }
    let Some(upto) = candidates.last().copied() else {
        return complete(run).await;
    };
    // The claim re-checks the filter, so only contacts matching now are taken.
    let mut claim = job.filter.query(job.org_id);
    claim.insert("_id", doc! {"$in": &candidates});
    coll.update_many(claim, doc! {"$set": {CLAIM_FIELD: &job.job_id}})
        .await?;
    let claimed = claimed_ids(&coll, job, job.checkpoint.last_id, upto).await?;
    let (conversations, messages) = if claimed.is_empty() {
        (0, 0)
    } else {
        let children = doc! {"orgId": job.org_id, "contactId": {"$in": &claimed}};
        let conversations = db.collection::<Document>(names::CONVERSATIONS);
        let messages = db.collection::<Document>(names::MESSAGES);
        let conv = conversations.count_documents(children.clone());
        let msgs = messages.count_documents(children);
        let (c, m) = futures::try_join!(conv.into_future(), msgs.into_future())?;
        (c, m)
    };
    let inflight = DeleteInflight {
        upto,
        contacts: claimed.len() as u64,
        conversations,
        messages,
    };
    run.update(doc! {"$set": {"inflight": bson::to_bson(&inflight)?}})
        .await?;
    finish_batch(run, &inflight).await?;
    Ok(true)
}

/// Freezes the snapshot and counts `total`.
async fn initialise(run: &mut JobRun) -> Result<(), JobError> {
    let job = &run.job;
    let db = run.env.store.db();
    let collection = job.filter.pipeline_type.collection();
    let query = job.filter.query(job.org_id);
    let max_id = snapshot::bound(db, collection, &query).await?;
    let total = snapshot::count(db, collection, &query, max_id, None).await?;
    run.update(doc! {"$set": {
        "initialised": true,
        "status": "processing",
        "startedAt": DateTime::now(),
        "snapshotMaxId": max_id,
        "total": total,
        "processed": 0i64,
    }})
    .await?;
    run.status_event().await;
    tracing::info!(job_id = %run.job.job_id, total, "delete started");
    Ok(())
}

/// Ids of contacts this job claimed in `(after, upto]` that still exist.
async fn claimed_ids(
    coll: &Collection<Document>,
    job: &JobRecord,
    after: Option<ObjectId>,
    upto: ObjectId,
) -> Result<Vec<ObjectId>, JobError> {
    Ok(claimed_docs(coll, job, after, upto, doc! {"_id": 1})
        .await?
        .iter()
        .filter_map(|d| d.get_object_id("_id").ok())
        .collect())
}

async fn claimed_docs(
    coll: &Collection<Document>,
    job: &JobRecord,
    after: Option<ObjectId>,
    upto: ObjectId,
    projection: Document,
) -> Result<Vec<Document>, JobError> {
    let mut range = doc! {"$lte": upto};
    if let Some(after) = after {
        range.insert("$gt", after);
    }
    Ok(coll
        .find(doc! {"orgId": job.org_id, CLAIM_FIELD: &job.job_id, "_id": range})
        .projection(projection)
        .await?
        .try_collect()
        .await?)
}

/// Steps 4–8 of the batch; every one of them may run again after a crash.
async fn finish_batch(run: &mut JobRun, inflight: &DeleteInflight) -> Result<(), JobError> {
    let job = &run.job;
    let db = run.env.store.db();
    let coll = contacts(db, &job.filter);
    let after = job.checkpoint.last_id;
    let org = job.org_id;

    // 4. audit entries for the claimed contacts still present.
    let present = claimed_docs(
        &coll,
        job,
        after,
        inflight.upto,
        doc! {"firstName": 1, "lastName": 1, "email": 1, "phone": 1, "ownerId": 1},
    )
    .await?;
    if !present.is_empty() {
        let now = DateTime::now();
        let entries: Vec<Document> = present
            .iter()
            .filter_map(|c| {
                let id = c.get_object_id("_id").ok()?;
                Some(doc! {
                    "orgId": org,
                    "type": "CONTACT_DELETE",
                    "contactId": id,
                    "jobId": &job.job_id,
                    "actorId": job.requested_by,
                    "createdAt": now,
                    "contact": {
                        "firstName": c.get("firstName").cloned().unwrap_or(Bson::Null),
                        "lastName": c.get("lastName").cloned().unwrap_or(Bson::Null),
                        "email": c.get("email").cloned().unwrap_or(Bson::Null),
                        "phone": c.get("phone").cloned().unwrap_or(Bson::Null),
                    },
                    "ownerId": c.get("ownerId").cloned().unwrap_or(Bson::Null),
                    "pipelineType": job.filter.pipeline_type.as_str(),
                    "bulkKey": format!("{}:{}", job.job_id, id.to_hex()),
                    "announced": false,
                })
            })
            .collect();
        let opts = InsertManyOptions::builder().ordered(false).build();
        match db
            .collection::<Document>(names::EVENT_LOGS)
            .insert_many(entries)
            .with_options(opts)
            .await
        {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }

    // The batch's contacts are exactly its audit entries.
    let mut range = doc! {"$lte": inflight.upto};
    if let Some(after) = after {
        range.insert("$gt", after);
    }
    let audits: Vec<Document> = db
        .collection::<Document>(names::EVENT_LOGS)
        .find(doc! {"jobId": &job.job_id, "contactId": range, "type": "CONTACT_DELETE"})
        .projection(doc! {"contactId": 1, "ownerId": 1, "announced": 1, "createdAt": 1})
        .await?
        .try_collect()
        .await?;
    let ids: Vec<ObjectId> = audits
        .iter()
        .filter_map(|a| a.get_object_id("contactId").ok())
        .collect();

    // 5. children first, so no message or conversation ever outlives its contact.
    if !ids.is_empty() {
        let children = doc! {"orgId": org, "contactId": {"$in": &ids}};
        db.collection::<Document>(names::MESSAGES)
            .delete_many(children.clone())
            .await?;
        db.collection::<Document>(names::CONVERSATIONS)
            .delete_many(children)
            .await?;
        coll.delete_many(doc! {"orgId": org, "_id": {"$in": &ids}, CLAIM_FIELD: &job.job_id})
            .await?;
    }

    // 6. announce what is not yet announced.
    announce(run, &audits).await?;

    // 7. one notification per assignee and job; `batches` makes each batch count once.
    let job = &run.job;
    let mut by_owner: BTreeMap<ObjectId, Vec<ObjectId>> = BTreeMap::new();
    for a in &audits {
        if let (Ok(owner), Ok(id)) = (a.get_object_id("ownerId"), a.get_object_id("contactId")) {
            by_owner.entry(owner).or_default().push(id);
        }
    }
    let notifications = db.collection::<Document>(names::NOTIFICATIONS);
    let batch_key = inflight.upto.to_hex();
    for (owner, contact_ids) in by_owner {
        let key = format!("{}:{}", job.job_id, owner.to_hex());
        let res = notifications
            .update_one(
                doc! {"bulkKey": &key, "batches": {"$ne": &batch_key}},
                doc! {
                    "$setOnInsert": {
                        "orgId": org, "userId": owner, "type": "contacts_removed",
                        "jobId": &job.job_id, "createdAt": DateTime::now(), "read": false,
                    },
                    // A sample of the ids, so a huge job cannot outgrow the
                    // document size limit; `count` is exact.
                    "$push": {
                        "contactIds": {"$each": &contact_ids, "$slice": NOTIFICATION_SAMPLE},
                        "batches": &batch_key,
                    },
                    "$inc": {"count": contact_ids.len() as i64},
                },
            )
            .with_options(UpdateOptions::builder().upsert(true).build())
            .await;
        match res {
            Ok(_) => {}
            // The batch was already applied: the filter missed and the upsert collided.
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }

    // 8. checkpoint.
    run.update(doc! {
        "$set": {"checkpoint.lastId": inflight.upto, "inflight": null},
        "$inc": {
            "processed": inflight.contacts as i64,
            "counts.contacts": inflight.contacts as i64,
            "counts.conversations": inflight.conversations as i64,
            "counts.messages": inflight.messages as i64,
        },
    })
    .await?;
    run.progress_event().await;
    Ok(())
}

/// Publishes `contact_removed` for audit entries not yet announced, then marks them.
async fn announce(run: &JobRun, audits: &[Document]) -> Result<(), JobError> {
    let job = &run.job;
    let pending: Vec<RemovedContact> = audits
        .iter()
        .filter(|a| !a.get_bool("announced").unwrap_or(false))
        .filter_map(|a| {
            Some(RemovedContact {
                org_id: job.org_id,
                contact_id: a.get_object_id("contactId").ok()?,
                job_id: job.job_id.clone(),
                pipeline_type: job.filter.pipeline_type,
                owner_id: a.get_object_id("ownerId").ok(),
                at: a
                    .get_datetime("createdAt")
                    .copied()
                    .unwrap_or_else(|_| DateTime::now()),
            })
        })
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    run.env.sink.contacts_removed(&pending).await?;
    let ids: Vec<ObjectId> = pending.iter().map(|r| r.contact_id).collect();
    run.env
        .store
        .db()
        .collection::<Document>(names::EVENT_LOGS)
        .update_many(
            doc! {"jobId": &job.job_id, "contactId": {"$in": ids}},
            doc! {"$set": {"announced": true}},
        )
        .await?;
    Ok(())
}

/// Removes claim marks left on contacts that were claimed but not deleted (none in
/// the normal course; a crash between claim and `inflight` can leave some).
async fn release_claims(run: &JobRun) -> Result<(), JobError> {
    let job = &run.job;
    contacts(run.env.store.db(), &job.filter)
        .update_many(
            doc! {"orgId": job.org_id, CLAIM_FIELD: &job.job_id},
            doc! {"$unset": {CLAIM_FIELD: ""}},
        )
        .await?;
    Ok(())
}

async fn complete(run: &mut JobRun) -> Result<bool, JobError> {
    // Anything deleted but not yet announced (a crash in the last batch) goes
    // out now, a bounded page at a time; `announce` marks each page done.
    loop {
        let page: Vec<Document> = run
            .env
            .store
            .db()
            .collection::<Document>(names::EVENT_LOGS)
            .find(doc! {"jobId": &run.job.job_id, "announced": false})
            .projection(doc! {"contactId": 1, "ownerId": 1, "announced": 1, "createdAt": 1})
            .limit(500)
            .await?
            .try_collect()
            .await?;
        if page.is_empty() {
            break;
        }
        announce(run, &page).await?;
    }
    release_claims(run).await?;
    run.finish(JobStatus::Completed, doc! {}).await?;
    Ok(false)
}

fn contacts(db: &Database, filter: &Filter) -> Collection<Document> {
    db.collection(filter.pipeline_type.collection())
}

/// Exactly what a delete with this filter would remove now: contacts, and their
/// conversations and messages, counted in batches of ids (never collecting the cursor).
pub async fn dry_run(db: &Database, org: ObjectId, filter: &Filter) -> Result<Counts, JobError> {
    let coll = contacts(db, filter);
    let mut cursor = coll
        .find(filter.query(org))
        .projection(doc! {"_id": 1})
        .batch_size(1000)
        .await?;
    let mut counts = Counts::default();
    let mut ids = Vec::with_capacity(1000);
    loop {
        let next = cursor.try_next().await?;
        let done = next.is_none();
        if let Some(id) = next.and_then(|d| d.get_object_id("_id").ok()) {
            ids.push(id);
        }
        if ids.len() == 1000 || (done && !ids.is_empty()) {
            let children = doc! {"orgId": org, "contactId": {"$in": &ids}};
            counts.contacts += ids.len() as u64;
            counts.conversations += db
                .collection::<Document>(names::CONVERSATIONS)
                .count_documents(children.clone())
                .await?;
            counts.messages += db
                .collection::<Document>(names::MESSAGES)
                .count_documents(children)
                .await?;
            ids.clear();
        }
        if done {
            return Ok(counts);
        }
    }
}
