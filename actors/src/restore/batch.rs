//! One restore batch: decide, free the delete's keys, put back contacts then
//! their children, notify and announce (steps 2–5 of `mod.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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
    pub job: &'a JobRecord,
    /// The delete undone.
    pub source: &'a str,
    pub after: Option<ObjectId>,
    /// Kept contact documents (`repo/kept.rs`).
    pub contacts: Vec<RawDocumentBuf>,
    /// Ended restores of the same delete whose last batch this one may finish.
    pub unfinished: &'a Unfinished,
}

/// A batch decided (steps 2–3): what its put-back (4–5) needs.
pub(super) struct Decided {
    /// Highest contact id of the batch (the next checkpoint).
    pub upto: ObjectId,
    after: Option<ObjectId>,
    skipped: u64,
    /// The restored contacts' bundles, in `_id` order.
    bundles: Vec<RawDocumentBuf>,
    restored: HashSet<ObjectId>,
    /// Their CONTACT_RESTORE entries (`contactId`, `ownerId`, `createdAt`).
    mine: Vec<Document>,
}

/// What the put-back of a decided batch needs besides it, owned (it runs in
/// the background while the next batch is decided).
pub(super) struct PutBack {
    pub db: Database,
    pub notifications: Arc<dyn crate::repo::NotificationRepo>,
    pub sink: Arc<dyn EventSink>,
    pub job: Arc<JobRecord>,
    pub source: String,
    pub sampled: Sampled,
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

/// Steps 2–3: decides which of the batch's contacts this job restores and
/// frees their delete keys.
pub(super) async fn decide(b: Batch<'_>) -> Result<Decided, JobError> {
    let Batch {
        db,
        job,
        source,
        after,
        contacts,
        unfinished,
    } = b;
    let org = job.org_id;
    let mut ids = Vec::with_capacity(contacts.len());
    for k in &contacts {
        ids.push(kept::contact_of(k)?);
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
        let original = kept::original(k)?;
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
    let all_new = write_entries(db, &entries).await?;
    crate::failpoint::hit("restore.decided");
    let mine: Vec<Document> = match all_new && present.is_empty() {
        // Every contact of the batch is new to every restore: the entries
        // just written are the batch.
        true => entries,
        false => decided(db, job, source, &ids, unfinished).await?,
    };
    let restored: HashSet<ObjectId> = mine
        .iter()
        .filter_map(|e| e.get_object_id("contactId").ok())
        .collect();
    let skipped = ids.len() as u64 - restored.len() as u64;
    if restored.is_empty() {
        return Ok(Decided {
            upto,
            after,
            skipped,
            bundles: Vec::new(),
            restored,
            mine,
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

    let bundles: Vec<RawDocumentBuf> = contacts
        .into_iter()
        .zip(&ids)
        .filter(|(_, id)| restored.contains(id))
        .map(|(k, _)| k)
        .collect();
    Ok(Decided {
        upto,
        after,
        skipped,
        bundles,
        restored,
        mine,
    })
}

/// Steps 4–5: puts back the decided contacts, then their children, then
/// notifies and announces.
pub(super) async fn put_back(p: PutBack, d: Decided) -> Result<Done, JobError> {
    let PutBack {
        db,
        notifications,
        sink,
        job,
        source,
        sampled,
    } = p;
    let Decided {
        upto,
        after,
        skipped,
        bundles,
        restored,
        mine,
    } = d;
    if restored.is_empty() {
        return Ok(Done {
            upto,
            restored: 0,
            skipped,
            conversations: 0,
            messages: 0,
        });
    }
    let (db, job, source, org) = (&db, job.as_ref(), source.as_str(), job.org_id);
    let target = job.filter.pipeline_type.collection();
    // 4. Contacts first, then their children: those their bundles hold, and
    // those kept apart (only read when some bundle says so).
    let bundles: Vec<&RawDocumentBuf> = bundles.iter().collect();
    let originals = bundles
        .iter()
        .map(|k| Ok(kept::original(k)?.to_raw_document_buf()))
        .collect::<Result<Vec<_>, JobError>>()?;
    kept::insert_raw(&db.collection(target), originals).await?;
    crate::failpoint::hit("restore.contacts");
    if crate::failpoint::fires(crate::failpoint::RESTORE_CHILDREN_FAILS, &org.to_hex()) {
        return Err(JobError::Internal("injected failure".into()));
    }
    let spilled = bundles.iter().any(|k| kept::spilled(k));
    let (conversations, messages) = futures::try_join!(
        put_back_children(
            db,
            Kind::Conversation,
            names::CONVERSATIONS,
            &bundles,
            spilled.then_some((source, after, upto, &restored)),
        ),
        put_back_children(
            db,
            Kind::Message,
            names::MESSAGES,
            &bundles,
            spilled.then_some((source, after, upto, &restored)),
        ),
    )?;

    crate::failpoint::hit("restore.children");
    // 5. Notifications and events, to different servers, together.
    futures::try_join!(
        notify(
            notifications.as_ref(),
            job,
            "contacts_restored",
            upto,
            &mine,
            &sampled
        ),
        announce(sink.as_ref(), job, source, &mine),
    )?;
    Ok(Done {
        upto,
        restored: restored.len() as u64,
        skipped,
        conversations,
        messages,
    })
}

/// Where a batch's children kept apart are: the delete, the batch's contact
/// range, and which of its contacts are restored.
type Apart<'a> = (&'a str, Option<ObjectId>, ObjectId, &'a HashSet<ObjectId>);

/// Inserts the kept children of `kind` of the restored contacts' `bundles`,
/// and, with `apart`, those kept apart for them. Returns how many the delete
/// kept for them (what this batch puts back, whether now or in a try before a
/// crash; each child is kept once).
async fn put_back_children(
    db: &Database,
    kind: Kind,
    collection: &str,
    bundles: &[&RawDocumentBuf],
    apart: Option<Apart<'_>>,
) -> Result<u64, JobError> {
    let target = db.collection::<RawDocumentBuf>(collection);
    let mut docs = Vec::new();
    let mut n = 0u64;
    for k in bundles {
        for child in kept::embedded(k, kind)? {
            docs.push(child.to_raw_document_buf());
            n += 1;
            if docs.len() >= INSERT_DOCS {
                kept::insert_raw(&target, std::mem::take(&mut docs)).await?;
            }
        }
    }
    if let Some((source, after, upto, restored)) = apart {
        let mut cursor = kept::collection(db)
            .find(kept::range(source, kind, after, Some(upto)))
            .batch_size(1000)
            .await?;
        while let Some(k) = cursor.try_next().await? {
            if !restored.contains(&kept::contact_of(&k)?) {
                continue;
            }
            docs.push(kept::original(&k)?.to_raw_document_buf());
            n += 1;
            if docs.len() >= INSERT_DOCS {
                kept::insert_raw(&target, std::mem::take(&mut docs)).await?;
            }
        }
    }
    kept::insert_raw(&target, docs).await?;
    Ok(n)
}

/// The batch's contacts this job restores: its own entries, and those a
/// failed or cancelled restore of the same delete left beyond its checkpoint
/// (`unfinished`: such a job's id and checkpoint), whose contacts may be back
/// without all their children. Those entries become this job's (`adoptedFrom`
/// names the job), so the rest of the batch puts back what is missing.
async fn decided(
    db: &Database,
    job: &JobRecord,
    source: &str,
    ids: &[ObjectId],
    unfinished: &Unfinished,
) -> Result<Vec<Document>, JobError> {
    let event_logs = db.collection::<Document>(names::EVENT_LOGS);
    let keys: Vec<String> = ids.iter().map(|id| restore_key(source, *id)).collect();
    let all: Vec<Document> = event_logs
        .find(doc! {"bulkKey": {"$in": &keys}})
        .projection(doc! {"contactId": 1, "ownerId": 1, "createdAt": 1, "jobId": 1})
        .await?
        .try_collect()
        .await?;
    let mut mine = Vec::with_capacity(all.len());
    let mut adopt: HashMap<String, Vec<String>> = HashMap::new();
    for e in all {
        let Ok(owner) = e.get_str("jobId") else {
            continue;
        };
        if owner == job.job_id {
            mine.push(e);
            continue;
        }
        let Ok(contact) = e.get_object_id("contactId") else {
            continue;
        };
        if let Some(checkpoint) = unfinished.get(owner) {
            if checkpoint.is_none_or(|c| contact > c) {
                adopt
                    .entry(owner.to_string())
                    .or_default()
                    .push(restore_key(source, contact));
                mine.push(e);
            }
        }
    }
    for (from, keys) in adopt {
        tracing::info!(job_id = %job.job_id, from = %from, contacts = keys.len(), "finishing contacts an ended restore left half done");
        event_logs
            .update_many(
                doc! {"bulkKey": {"$in": keys}, "jobId": &from},
                doc! {"$set": {"jobId": &job.job_id, "adoptedFrom": &from}},
            )
            .await?;
    }
    Ok(mine)
}

/// Failed or cancelled restores of the same delete: job id → checkpoint.
pub(super) type Unfinished = HashMap<String, Option<ObjectId>>;

/// Writes the batch's CONTACT_RESTORE entries; whether every one was new.
async fn write_entries(db: &Database, entries: &[Document]) -> Result<bool, JobError> {
    if entries.is_empty() {
        return Ok(true);
    }
    let opts = InsertManyOptions::builder().ordered(false).build();
    match db
        .collection::<Document>(names::EVENT_LOGS)
        .insert_many(entries)
        .with_options(opts)
        .await
    {
        Ok(r) => Ok(r.inserted_ids.len() == entries.len()),
        Err(e) if is_duplicate_key(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
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

/// Most children per `insertMany` of a restore.
const INSERT_DOCS: usize = 2000;

/// The key a restored contact's CONTACT_DELETE entry keeps: unique (one entry
/// per delete and contact) and outside every delete's key range of the
/// organisation (`<orgId>:` … `<orgId>;`).
pub fn released_key(org: ObjectId, contact: ObjectId, source: &str) -> String {
    format!("released:{}:{}:{source}", org.to_hex(), contact.to_hex())
}
