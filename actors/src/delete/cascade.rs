//! Steps 4–8 of a delete batch, after its contacts are claimed and recorded as
//! `inflight`: audit, cascade, notify and announce, checkpoint. Each may run
//! again after a crash; each is idempotent.

use std::collections::BTreeMap;
use std::future::IntoFuture;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::options::{Hint, InsertManyOptions, UpdateOptions};
use mongodb::Database;

use super::{claimed_docs, contacts, CLAIM_FIELD, NOTIFICATION_SAMPLE};
use crate::error::JobError;
use crate::events::RemovedContact;
use crate::job::JobRun;
use crate::model::{DeleteInflight, JobRecord};
use crate::store::{is_duplicate_key, names};

/// What the audit snapshot and the notification need of a contact.
pub(super) fn snapshot_projection() -> Document {
    doc! {"firstName": 1, "lastName": 1, "email": 1, "phone": 1, "ownerId": 1}
}

/// One CONTACT_DELETE entry per contact document (read with `snapshot_projection`).
pub(super) fn audit_entries(job: &JobRecord, contacts: &[Document]) -> Vec<Document> {
    let now = DateTime::now();
    let field = |c: &Document, k: &str| c.get(k).cloned().unwrap_or(Bson::Null);
    contacts
        .iter()
        .filter_map(|c| {
            let id = c.get_object_id("_id").ok()?;
            Some(doc! {
                "orgId": job.org_id,
                "type": "CONTACT_DELETE",
                "contactId": id,
                "jobId": &job.job_id,
                "actorId": job.requested_by,
                "createdAt": now,
                "contact": {
                    "firstName": field(c, "firstName"),
                    "lastName": field(c, "lastName"),
                    "email": field(c, "email"),
                    "phone": field(c, "phone"),
                },
                "ownerId": field(c, "ownerId"),
                "pipelineType": job.filter.pipeline_type.as_str(),
                "bulkKey": format!("{}:{}", job.job_id, id.to_hex()),
            })
        })
        .collect()
}

/// Inserts the entries. `Some(entries)` when every one was new, so they are the
/// batch's record as they stand; `None` when some existed already (a redone
/// batch), so the collection must be read back.
pub(super) async fn write_audits(
    db: &Database,
    entries: Vec<Document>,
) -> Result<Option<Vec<Document>>, JobError> {
    if entries.is_empty() {
        return Ok(Some(entries));
    }
    let opts = InsertManyOptions::builder().ordered(false).build();
    match db
        .collection::<Document>(names::EVENT_LOGS)
        .insert_many(&entries)
        .with_options(opts)
        .await
    {
        Ok(r) if r.inserted_ids.len() == entries.len() => Ok(Some(entries)),
        Ok(_) => Ok(None),
        Err(e) if is_duplicate_key(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Steps 4–8 of the batch. `written` holds the audit entries when the caller has
/// just written all of them; otherwise (a resumed batch) they are written here.
pub(super) async fn finish_batch(
    run: &mut JobRun,
    inflight: &DeleteInflight,
    written: Option<Vec<Document>>,
) -> Result<(), JobError> {
    let mut laps = Laps::started();
    let db = run.env.store.db().clone();
    let job = &run.job;
    let after = job.checkpoint.last_id;
    let org = job.org_id;

    // 4. audit entries for the claimed contacts still present.
    let written = match written {
        Some(entries) => Some(entries),
        None => {
            let present = claimed_docs(
                &contacts(&db, &job.filter),
                job,
                after,
                inflight.upto,
                snapshot_projection(),
            )
            .await?;
            write_audits(&db, audit_entries(job, &present)).await?
        }
    };
    // The batch's contacts are exactly its audit entries.
    let audits: Vec<Document> = match written {
        Some(entries) if entries.len() as u64 == inflight.contacts => entries,
        _ => {
            let mut range = doc! {"$lte": inflight.upto};
            if let Some(after) = after {
                range.insert("$gt", after);
            }
            db.collection::<Document>(names::EVENT_LOGS)
                .find(doc! {"jobId": &job.job_id, "contactId": range, "type": "CONTACT_DELETE"})
                .hint(audit_by_contact())
                .projection(doc! {"contactId": 1, "ownerId": 1, "createdAt": 1})
                .await?
                .try_collect()
                .await?
        }
    };
    let ids: Vec<ObjectId> = audits
        .iter()
        .filter_map(|a| a.get_object_id("contactId").ok())
        .collect();
    laps.lap("audit");

    // 5. children first, so no message or conversation ever outlives its contact.
    if !ids.is_empty() {
        let children = doc! {"orgId": org, "contactId": {"$in": &ids}};
        let messages = db.collection::<Document>(names::MESSAGES);
        let conversations = db.collection::<Document>(names::CONVERSATIONS);
        // Messages and conversations go together: the contacts, deleted only
        // after both, keep the children's contact alive until they are gone.
        futures::try_join!(
            messages.delete_many(children.clone()).into_future(),
            conversations.delete_many(children).into_future(),
        )?;
        laps.lap("children");
        contacts(&db, &job.filter)
            .delete_many(doc! {"_id": {"$in": &ids}, "orgId": org, CLAIM_FIELD: &job.job_id})
            .await?;
    }
    laps.lap("delete");

    // 6–7. notifications in MongoDB and `contact_removed` in JetStream go to
    // different servers, so they overlap. A crash after either is safe: the
    // notification skips a batch it has, the stream drops a repeated
    // `Nats-Msg-Id`, and only the checkpoint below ends the batch.
    let batch_key = inflight.upto.to_hex();
    futures::try_join!(
        notify(&db, job, &batch_key, &audits),
        announce(run, &audits),
    )?;
    laps.lap("notify+announce");

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
    laps.lap("checkpoint");
    tracing::debug!(job_id = %run.job.job_id, laps = %laps, "delete batch");
    run.progress_event().await;
    Ok(())
}

/// One notification per assignee and job; `batches` makes each batch count once.
async fn notify(
    db: &Database,
    job: &JobRecord,
    batch_key: &str,
    audits: &[Document],
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
        async move {
            let res = notifications
                .update_one(
                    doc! {"bulkKey": &key, "batches": {"$ne": batch_key}},
                    doc! {
                        "$setOnInsert": {
                            "orgId": job.org_id, "userId": owner, "type": "contacts_removed",
                            "jobId": &job.job_id, "createdAt": DateTime::now(), "read": false,
                        },
                        // A sample of the ids, so a huge job cannot outgrow the
                        // document size limit; `count` is exact.
                        "$push": {
                            "contactIds": {"$each": &contact_ids, "$slice": NOTIFICATION_SAMPLE},
                            "batches": batch_key,
                        },
                        "$inc": {"count": contact_ids.len() as i64},
                    },
                )
                .with_options(UpdateOptions::builder().upsert(true).build())
                .await;
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
async fn announce(run: &JobRun, audits: &[Document]) -> Result<(), JobError> {
    let job = &run.job;
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
    run.env.sink.contacts_removed(&removed).await
}

/// `{jobId: 1, contactId: 1}` on event_logs: the audit queries name one batch's
/// key range, and some planners (secantusd-rs) otherwise pick a worse index.
fn audit_by_contact() -> Hint {
    Hint::Keys(doc! {"jobId": 1, "contactId": 1})
}

/// Milliseconds spent in each phase of a batch, for the debug log.
#[derive(Default)]
struct Laps {
    start: Option<std::time::Instant>,
    laps: Vec<(&'static str, u128)>,
}

impl Laps {
    fn started() -> Laps {
        Laps {
            start: Some(std::time::Instant::now()),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, name: &'static str) {
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
