//! One restore batch: decide, free the delete's keys, put back contacts then
//! their children, notify and announce (steps 2–5 of `mod.rs`).

use std::collections::HashSet;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::options::InsertManyOptions;
use mongodb::Database;

use super::kept::{self, Kind};
use super::restore_key;
use crate::delete::{audit_key, notify, Sampled};
use crate::error::JobError;
use crate::events::{EventSink, RestoredContact};
use crate::model::JobRecord;
use crate::store::{is_duplicate_key, names};

/// A batch: the kept contacts after `after`, in `_id` order.
pub(super) struct Batch<'a> {
    pub db: &'a Database,
    pub notifications: &'a dyn crate::repo::NotificationRepo,
    pub sink: &'a dyn EventSink,
    pub job: &'a JobRecord,
    /// The delete undone.
    pub source: &'a str,
    pub after: Option<ObjectId>,
    /// Kept contact documents (`repo/kept.rs`).
    pub contacts: Vec<RawDocumentBuf>,
    pub sampled: &'a Sampled,
}

/// What a batch did.
pub(super) struct Done {
    /// Highest contact id of the batch (the next checkpoint).
    pub upto: ObjectId,
    pub restored: u64,
    pub skipped: u64,
    pub conversations: u64,
    pub messages: u64,
}

pub(super) async fn restore(b: Batch<'_>) -> Result<Done, JobError> {
    let Batch {
        db,
        notifications,
        sink,
        job,
        source,
        after,
        contacts,
        sampled,
    } = b;
    let org = job.org_id;
    let mut ids = Vec::with_capacity(contacts.len());
    for k in &contacts {
        ids.push(k.get_object_id("contactId").map_err(raw_err)?);
    }
    let upto = *ids
        .iter()
        .max()
        .ok_or_else(|| JobError::Internal("empty restore batch".into()))?;
    let target = job.filter.pipeline_type.collection();

    // 2. Decide: contacts whose `_id` is free get an entry; the batch's
    // restored contacts are this job's entries (some may be from a try of the
    // batch before a crash, whose contacts exist by now).
    let present: HashSet<ObjectId> = db
        .collection::<Document>(target)
        .find(doc! {"_id": {"$in": &ids}})
        .projection(doc! {"_id": 1})
        .await?
        .try_filter_map(|d| async move { Ok(d.get_object_id("_id").ok()) })
        .try_collect()
        .await?;
    let now = DateTime::now();
    let mut entries = Vec::new();
    for (k, id) in contacts.iter().zip(&ids) {
        if present.contains(id) {
            continue;
        }
        let original = k.get_document("doc").map_err(raw_err)?;
        let owner = original
            .get_object_id("ownerId")
            .ok()
            .map_or(Bson::Null, Bson::ObjectId);
        entries.push(doc! {
            "orgId": org,
            "type": "CONTACT_RESTORE",
            "contactId": id,
            "jobId": &job.job_id,
            "sourceJobId": source,
            "actorId": job.requested_by,
            "createdAt": now,
            "ownerId": owner,
            "pipelineType": job.filter.pipeline_type.as_str(),
            "bulkKey": restore_key(source, *id),
        });
    }
    let event_logs = db.collection::<Document>(names::EVENT_LOGS);
    if !entries.is_empty() {
        let opts = InsertManyOptions::builder().ordered(false).build();
        match event_logs.insert_many(&entries).with_options(opts).await {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    crate::failpoint::hit("restore.decided");
    let keys: Vec<String> = ids.iter().map(|id| restore_key(source, *id)).collect();
    let mine: Vec<Document> = event_logs
        .find(doc! {"bulkKey": {"$in": &keys}, "jobId": &job.job_id})
        .projection(doc! {"contactId": 1, "ownerId": 1, "createdAt": 1})
        .await?
        .try_collect()
        .await?;
    let restored: HashSet<ObjectId> = mine
        .iter()
        .filter_map(|e| e.get_object_id("contactId").ok())
        .collect();
    let skipped = ids.len() as u64 - restored.len() as u64;
    if restored.is_empty() {
        return Ok(Done {
            upto,
            restored: 0,
            skipped,
            conversations: 0,
            messages: 0,
        });
    }
    let restored_ids: Vec<ObjectId> = ids
        .iter()
        .copied()
        .filter(|id| restored.contains(id))
        .collect();

    // 3. The delete's audit entries of these contacts give up their unique key
    // (`<orgId>:<contactId>`, held while the contact is deleted), so a later
    // delete of the restored contact writes its own entry: each is moved to a
    // key of its own (`released_key`), a copy first, then the original
    // removed; a crash in between leaves the copy, and the redo finds it.
    // (Moved, not updated in place: some servers keep a unique key claimed
    // after an update changes it.)
    let delete_keys: Vec<String> = restored_ids.iter().map(|c| audit_key(org, *c)).collect();
    let held = doc! {"bulkKey": {"$in": &delete_keys}, "jobId": source, "type": "CONTACT_DELETE"};
    let originals: Vec<Document> = event_logs.find(held.clone()).await?.try_collect().await?;
    if !originals.is_empty() {
        let copies: Vec<Document> = originals
            .into_iter()
            .filter_map(|mut e| {
                let contact = e.get_object_id("contactId").ok()?;
                e.remove("_id");
                e.insert("bulkKey", released_key(org, contact, source));
                e.insert("restoredBy", &job.job_id);
                Some(e)
            })
            .collect();
        let opts = InsertManyOptions::builder().ordered(false).build();
        match event_logs.insert_many(&copies).with_options(opts).await {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(e.into()),
        }
        event_logs.delete_many(held).await?;
    }

    // 4. Contacts first, then their children.
    let originals = contacts
        .iter()
        .zip(&ids)
        .filter(|(_, id)| restored.contains(id))
        .map(|(k, _)| original(k))
        .collect::<Result<Vec<_>, _>>()?;
    kept::insert_raw(&db.collection(target), originals).await?;
    crate::failpoint::hit("restore.contacts");
    let (conversations, messages) = futures::try_join!(
        put_back(
            db,
            source,
            Kind::Conversation,
            names::CONVERSATIONS,
            after,
            upto,
            &restored
        ),
        put_back(
            db,
            source,
            Kind::Message,
            names::MESSAGES,
            after,
            upto,
            &restored
        ),
    )?;

    crate::failpoint::hit("restore.children");
    // 5. Notifications and events, to different servers, together.
    futures::try_join!(
        notify(
            notifications,
            job,
            "contacts_restored",
            upto,
            &mine,
            sampled
        ),
        announce(sink, job, source, &mine),
    )?;
    Ok(Done {
        upto,
        restored: restored.len() as u64,
        skipped,
        conversations,
        messages,
    })
}

/// Inserts the kept children of `kind` whose contact is in `restored`.
/// Returns how many the delete kept for them (what this batch puts back,
/// whether now or in a try before a crash).
async fn put_back(
    db: &Database,
    source: &str,
    kind: Kind,
    collection: &str,
    after: Option<ObjectId>,
    upto: ObjectId,
    restored: &HashSet<ObjectId>,
) -> Result<u64, JobError> {
    let mut cursor = kept::collection(db)
        .find(kept::range(source, kind, after, Some(upto)))
        .batch_size(10_000)
        .await?;
    let target = db.collection::<RawDocumentBuf>(collection);
    let mut docs = Vec::new();
    let mut n = 0u64;
    while let Some(k) = cursor.try_next().await? {
        let contact = k.get_object_id("contactId").map_err(raw_err)?;
        if !restored.contains(&contact) {
            continue;
        }
        docs.push(original(&k)?);
        n += 1;
        if docs.len() >= 1000 {
            kept::insert_raw(&target, std::mem::take(&mut docs)).await?;
        }
    }
    kept::insert_raw(&target, docs).await?;
    Ok(n)
}

/// The original document inside a kept one, as it was.
fn original(k: &RawDocumentBuf) -> Result<RawDocumentBuf, JobError> {
    Ok(k.get_document("doc")
        .map_err(raw_err)?
        .to_raw_document_buf())
}

/// Publishes `contact_restored` for the batch's entries.
async fn announce(
    sink: &dyn EventSink,
    job: &JobRecord,
    source: &str,
    entries: &[Document],
) -> Result<(), JobError> {
    let restored: Vec<RestoredContact> = entries
        .iter()
        .filter_map(|e| {
            Some(RestoredContact {
                org_id: job.org_id,
                contact_id: e.get_object_id("contactId").ok()?,
                job_id: job.job_id.clone(),
                source_job_id: source.to_string(),
                pipeline_type: job.filter.pipeline_type,
                owner_id: e.get_object_id("ownerId").ok(),
                at: e
                    .get_datetime("createdAt")
                    .copied()
                    .unwrap_or_else(|_| DateTime::now()),
            })
        })
        .collect();
    if restored.is_empty() {
        return Ok(());
    }
    sink.contacts_restored(&restored).await
}

fn raw_err(e: impl std::fmt::Display) -> JobError {
    JobError::Internal(format!("kept document: {e}"))
}

/// The key a restored contact's CONTACT_DELETE entry keeps: unique (one entry
/// per delete and contact) and outside every delete's key range of the
/// organisation (`<orgId>:` … `<orgId>;`).
pub fn released_key(org: ObjectId, contact: ObjectId, source: &str) -> String {
    format!("released:{}:{}:{source}", org.to_hex(), contact.to_hex())
}
