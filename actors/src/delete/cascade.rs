//! Steps 4–6 of a delete batch, once its audit entries (the decision) and its
//! `inflight` record are written: delete, notify, announce. The checkpoint that
//! ends the batch is written by the actor (`mod.rs`). Every step is idempotent,
//! so a batch is finished after a crash by running them again from its entries.

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};

use bson::{doc, oid::ObjectId, DateTime, Document};
use futures::TryStreamExt;
use mongodb::options::UpdateOptions;
use mongodb::Database;
use tokio::sync::oneshot;

use super::{contacts, NOTIFICATION_SAMPLE};
use crate::error::JobError;
use crate::events::{EventSink, RemovedContact};
use crate::model::JobRecord;
use crate::store::{is_duplicate_key, names};

/// One batch to apply: the contacts of `audits` (this job's CONTACT_DELETE
/// entries for the batch), up to `upto`.
pub(super) struct Batch {
    pub db: Database,
    pub sink: Arc<dyn EventSink>,
    pub job: Arc<JobRecord>,
    pub upto: ObjectId,
    pub audits: Vec<Document>,
    /// Resolves once the previous batch is fully applied: notifications count
    /// batches in order, and a batch is announced after the one before it.
    pub after_previous: Option<oneshot::Receiver<()>>,
    /// Told once this batch is fully applied.
    pub applied: Option<oneshot::Sender<()>>,
    /// Contact ids listed so far per assignee by this actor.
    pub sampled: Sampled,
}

/// Contact ids this actor has put in each assignee's notification. Once an
/// assignee's sample is full, later batches skip the `$push` (which rewrites the
/// list for nothing); after a restart it starts empty and the `$slice` keeps
/// the list right.
pub(crate) type Sampled = Arc<Mutex<HashMap<ObjectId, usize>>>;

/// Deletes, notifies and announces one batch. Returns the children it kept
/// and deleted (a job that keeps; a hard delete counted them beforehand).
pub(super) async fn apply(batch: Batch) -> Result<super::keep::Pass, JobError> {
    let Batch {
        db,
        sink,
        job,
        upto,
        audits,
        after_previous,
        applied,
        sampled,
    } = batch;
    let mut laps = Laps::started();
    let ids: Vec<ObjectId> = audits
        .iter()
        .filter_map(|a| a.get_object_id("contactId").ok())
        .collect();
    let org = job.org_id;
    let mut kept = super::keep::Pass::default();
    if !ids.is_empty() {
        // Children first, so no message or conversation ever outlives its contact.
        // Messages and conversations go together: the contacts, deleted only after
        // both, keep the children's contact alive until they are gone.
        let messages = db.collection::<Document>(names::MESSAGES);
        let conversations = db.collection::<Document>(names::CONVERSATIONS);
        if job.hard_delete {
            let children = doc! {"orgId": org, "contactId": {"$in": &ids}};
            futures::try_join!(
                messages.delete_many(children.clone()).into_future(),
                conversations.delete_many(children).into_future(),
            )?;
        } else {
            // Kept first, each child deleted once kept (`keep.rs`). A child
            // written for one of these contacts after the keep read it is
            // caught by another pass, so none is left behind without its
            // contact.
            loop {
                crate::failpoint::hit("delete.keep");
                let pass = super::keep::keep(&db, &job, &ids).await?;
                kept.conversations += pass.conversations;
                kept.messages += pass.messages;
                kept.contacts.extend(pass.contacts);
                laps.lap("keep");
                if !children_left(&db, org, &ids).await? {
                    break;
                }
            }
            kept.contacts.sort_unstable();
            kept.contacts.dedup();
        }
        crate::failpoint::hit("delete.children");
        laps.lap("children");
        // The audit entry is the decision: the contact goes even if it left the
        // filter since (its children already may have). A job that keeps
        // deletes the contacts it kept.
        let doomed = match job.hard_delete {
            true => &ids,
            false => &kept.contacts,
        };
        if !doomed.is_empty() {
            contacts(&db, &job.filter)
                .delete_many(doc! {"_id": {"$in": doomed}, "orgId": org})
                .await?;
        }
        crate::failpoint::hit("delete.contacts");
    }
    laps.lap("contacts");
    if let Some(previous) = after_previous {
        previous
            .await
            .map_err(|_| JobError::Internal("the previous delete batch was not applied".into()))?;
    }
    laps.lap("previous");

    // Notifications in MongoDB and `contact_removed` in JetStream go to
    // different servers, so they overlap. A crash after either is safe: the
    // notification skips a batch it has, the stream drops a repeated
    // `Nats-Msg-Id`, and only the checkpoint ends the batch.
    futures::try_join!(
        notify(&db, &job, "contacts_removed", upto, &audits, &sampled),
        announce(sink.as_ref(), &job, &audits),
    )?;
    laps.lap("notify+announce");
    tracing::debug!(job_id = %job.job_id, laps = %laps, "delete batch applied");
    if let Some(applied) = applied {
        // The next batch may be gone already (a failed step): nothing to tell.
        let _ = applied.send(());
    }
    Ok(kept)
}

/// Whether a conversation or message of these contacts is still there.
async fn children_left(db: &Database, org: ObjectId, ids: &[ObjectId]) -> Result<bool, JobError> {
    let children = doc! {"orgId": org, "contactId": {"$in": ids}};
    let (messages, conversations) = (
        db.collection::<Document>(names::MESSAGES),
        db.collection::<Document>(names::CONVERSATIONS),
    );
    let (message, conversation) = futures::try_join!(
        messages
            .find_one(children.clone())
            .projection(doc! {"_id": 1})
            .into_future(),
        conversations
            .find_one(children)
            .projection(doc! {"_id": 1})
            .into_future(),
    )?;
    Ok(message.is_some() || conversation.is_some())
}

/// This job's CONTACT_DELETE entries for contacts in `(after, upto]`: the
/// contacts a batch decided to delete, with what its announcements need.
pub(super) async fn recorded(
    db: &Database,
    job: &JobRecord,
    after: Option<ObjectId>,
    upto: Option<ObjectId>,
) -> Result<Vec<Document>, JobError> {
    Ok(db
        .collection::<Document>(names::EVENT_LOGS)
        .find(own_entries(job, after, upto))
        .projection(doc! {"contactId": 1, "ownerId": 1, "createdAt": 1})
        .await?
        .try_collect()
        .await?)
}

/// The filter of this job's CONTACT_DELETE entries for contacts in `(after, upto]`,
/// by their unique `bulkKey` (`<orgId>:<contactId>`: hex of fixed length, so
/// the keys of an organisation sort as its contact ids do).
pub(super) fn own_entries(
    job: &JobRecord,
    after: Option<ObjectId>,
    upto: Option<ObjectId>,
) -> Document {
    let org = job.org_id;
    let mut range = doc! {"$gt": match after {
        Some(after) => audit_key(org, after),
        None => format!("{}:", org.to_hex()),
    }};
    match upto {
        Some(upto) => range.insert("$lte", audit_key(org, upto)),
        // ';' follows ':', so this bounds every key of the organisation.
        None => range.insert("$lt", format!("{};", org.to_hex())),
    };
    doc! {"bulkKey": range, "jobId": &job.job_id, "type": "CONTACT_DELETE"}
}

/// The unique key of a contact's bulk-delete audit entry: one per contact, so
/// two delete jobs never both take it.
pub fn audit_key(org: ObjectId, contact: ObjectId) -> String {
    format!("{}:{}", org.to_hex(), contact.to_hex())
}

/// One notification per assignee and job (`kind`: `contacts_removed`, or
/// `contacts_restored` for a restore). Batches are applied in `_id` order, so
/// `lastBatch` (the batch's highest id) makes each one count once.
pub(crate) async fn notify(
    db: &Database,
    job: &JobRecord,
    kind: &'static str,
    upto: ObjectId,
    audits: &[Document],
    sampled: &Sampled,
) -> Result<(), JobError> {
    let mut by_owner: BTreeMap<ObjectId, Vec<ObjectId>> = BTreeMap::new();
    for a in audits {
        if let (Ok(owner), Ok(id)) = (a.get_object_id("ownerId"), a.get_object_id("contactId")) {
            by_owner.entry(owner).or_default().push(id);
        }
    }
    let notifications = db.collection::<Document>(names::NOTIFICATIONS);
    let updates = by_owner.into_iter().map(|(owner, contact_ids)| {
        let key = format!("{}:{}", job.job_id, owner.to_hex());
        let notifications = &notifications;
        let listed = sampled
            .lock()
            .map(|m| m.get(&owner).copied().unwrap_or(0))
            .unwrap_or(0);
        async move {
            let mut update = doc! {
                "$setOnInsert": {
                    "orgId": job.org_id, "userId": owner, "type": kind,
                    "jobId": &job.job_id, "createdAt": DateTime::now(), "read": false,
                },
                "$set": {"lastBatch": upto},
                "$inc": {"count": contact_ids.len() as i64},
            };
            if listed < NOTIFICATION_SAMPLE as usize {
                // A sample of the ids, so a huge job cannot outgrow the
                // document size limit; `count` is exact.
                update.insert(
                    "$push",
                    doc! {"contactIds": {"$each": &contact_ids, "$slice": NOTIFICATION_SAMPLE}},
                );
            }
            let res = notifications
                .update_one(
                    doc! {"bulkKey": &key, "lastBatch": {"$not": {"$gte": upto}}},
                    update,
                )
                .with_options(UpdateOptions::builder().upsert(true).build())
                .await;
            if res.is_ok() {
                if let Ok(mut m) = sampled.lock() {
                    *m.entry(owner).or_default() += contact_ids.len();
                }
            }
            match res {
                Ok(_) => Ok(()),
                // The batch was already applied: the filter missed and the upsert collided.
                Err(e) if is_duplicate_key(&e) => Ok(()),
                Err(e) => Err(JobError::from(e)),
            }
        }
    });
    futures::future::try_join_all(updates).await?;
    Ok(())
}

/// Publishes `contact_removed` for the batch's audit entries. A repeat after a
/// crash is deduplicated by the stream (`Nats-Msg-Id: <jobId>:<contactId>`).
async fn announce(
    sink: &dyn EventSink,
    job: &JobRecord,
    audits: &[Document],
) -> Result<(), JobError> {
    let removed: Vec<RemovedContact> = audits
        .iter()
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
    if removed.is_empty() {
        return Ok(());
    }
    sink.contacts_removed(&removed).await
}

/// Milliseconds spent in each phase of a batch, for the debug log.
#[derive(Default)]
pub(super) struct Laps {
    start: Option<std::time::Instant>,
    laps: Vec<(&'static str, u128)>,
}

impl Laps {
    pub(super) fn started() -> Laps {
        Laps {
            start: Some(std::time::Instant::now()),
            laps: Vec::new(),
        }
    }

    pub(super) fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        let since = self.start.replace(now).unwrap_or(now);
        self.laps.push((name, (now - since).as_millis()));
    }
}

impl std::fmt::Display for Laps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, ms)) in self.laps.iter().enumerate() {
            write!(f, "{}{name}={ms}ms", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}
