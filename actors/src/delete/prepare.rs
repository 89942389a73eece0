//! Steps 1–3 of a delete batch: take the next candidates, decide which go (the
//! audit entries), count their children (a hard delete). Nothing is deleted here, so all of it
//! may run while the previous batch's deletes do, and is undone by
//! `release_undecided` when the batch never gets its `inflight` record.

use std::collections::HashSet;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::options::InsertManyOptions;
use mongodb::{Cursor, Database};

use super::{cascade, contacts};
use crate::error::JobError;
use crate::model::{DeleteInflight, JobRecord};
use crate::snapshot;
use crate::store::{is_duplicate_key, names};

/// A batch decided and counted, not yet recorded as `inflight`.
pub(super) struct Prepared {
    /// What the `inflight` record will say.
    pub inflight: DeleteInflight,
    /// The batch's audit entries (at least `contactId`, `ownerId`, `createdAt`).
    pub audits: Vec<Document>,
}

/// What the audit snapshot and the notification need of a contact.
fn snapshot_projection() -> Document {
    doc! {"firstName": 1, "lastName": 1, "email": 1, "phone": 1, "ownerId": 1}
}

/// Prepares the batch after `after`: `None` when no candidate is left.
///
/// 1. The next ids from the job's one candidate cursor (`_id` order, within the
///    frozen snapshot); one cursor for the whole job, since asking afresh for
///    "the next batch after the checkpoint" costs some servers a scan of
///    everything left.
/// 2. The decision: of those, the ones that match the filter now (re-read over
///    the batch's `_id` range, with the fields the audit keeps), each written
///    as a CONTACT_DELETE entry. An entry is unique per contact, so a contact
///    that another delete job has decided on is left to that job.
/// 3. Beside it, a hard delete counts their conversations and messages.
pub(super) async fn prepare(
    db: &Database,
    job: &JobRecord,
    cursor: &mut Option<Cursor<Document>>,
    after: Option<ObjectId>,
    max_id: ObjectId,
    batch: usize,
) -> Result<Option<Prepared>, JobError> {
    let coll = contacts(db, &job.filter);
    if cursor.is_none() {
        let opened = coll
            .find(in_range(job, after, max_id))
            .sort(doc! {"_id": 1})
            .projection(doc! {"_id": 1})
            .batch_size(batch as u32)
            .await?;
        *cursor = Some(opened);
    }
    let mut candidates: HashSet<ObjectId> = HashSet::with_capacity(batch);
    let mut upto = None;
    if let Some(cursor) = cursor.as_mut() {
        while candidates.len() < batch {
            match cursor.try_next().await? {
                Some(d) => {
                    if let Ok(id) = d.get_object_id("_id") {
                        candidates.insert(id);
                        upto = Some(id);
                    }
                }
                None => break,
            }
        }
    }
    let Some(upto) = upto else {
        return Ok(None);
    };

    // A range read costs far less than a lookup per id, and sees each contact as
    // it is now: one that left the filter since the cursor read it stays.
    let current: Vec<Document> = coll
        .find(in_range(job, after, upto))
        .projection(snapshot_projection())
        .await?
        .try_filter(|d| {
            let keep = d
                .get_object_id("_id")
                .is_ok_and(|id| candidates.contains(&id));
            async move { keep }
        })
        .try_collect()
        .await?;
    let ids: Vec<ObjectId> = current
        .iter()
        .filter_map(|d| d.get_object_id("_id").ok())
        .collect();
    let entries = audit_entries(job, &current);
    // A hard delete counts the children now, so the counts survive a crash
    // mid-batch; a delete that keeps counts them as it keeps them (`keep.rs`).
    let counting = job.hard_delete;
    let (written, counted) = futures::try_join!(
        write_audits(db, entries),
        children_counts(db, job.org_id, &ids, counting)
    )?;
    let (audits, (conversations, messages)) = match written {
        Some(entries) => (entries, counted),
        None => {
            // Some contacts were decided on already (by another job, or by this
            // one before a failure): the batch is this job's entries.
            let audits = cascade::recorded(db, job, after, Some(upto)).await?;
            let ids: Vec<ObjectId> = audits
                .iter()
                .filter_map(|a| a.get_object_id("contactId").ok())
                .collect();
            let counted = children_counts(db, job.org_id, &ids, counting).await?;
            (audits, counted)
        }
    };
    Ok(Some(Prepared {
        inflight: DeleteInflight {
            upto,
            contacts: audits.len() as u64,
            conversations,
            messages,
        },
        audits,
    }))
}

/// The job's filter over contacts in `(after, upto]`, `_id` first: some
/// planners (secantusd-rs) pick the index of the first key.
fn in_range(job: &JobRecord, after: Option<ObjectId>, upto: ObjectId) -> Document {
    let mut range = doc! {"$lte": upto};
    if let Some(after) = after {
        range.insert("$gt", after);
    }
    let mut query = doc! {"_id": range};
    query.extend(job.filter.query(job.org_id));
    query
}

/// One CONTACT_DELETE entry per contact document (read with `snapshot_projection`).
fn audit_entries(job: &JobRecord, contacts: &[Document]) -> Vec<Document> {
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
                "bulkKey": cascade::audit_key(job.org_id, id),
            })
        })
        .collect()
}

/// Inserts the entries. `Some(entries)` when every one was new, so they are the
/// batch's record as they stand; `None` when some existed already, so the
/// collection must be read back.
async fn write_audits(
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

/// Conversations and messages of these contacts (when `counting`).
pub(super) async fn children_counts(
    db: &Database,
    org: ObjectId,
    ids: &[ObjectId],
    counting: bool,
) -> Result<(u64, u64), JobError> {
    if ids.is_empty() || !counting {
        return Ok((0, 0));
    }
    // The `count` command: about half the server's work of `countDocuments`
    // (an aggregation) on secantusd-rs.
    let children = doc! {"orgId": org, "contactId": {"$in": ids}};
    let (conversations, messages) = futures::try_join!(
        snapshot::count(db, names::CONVERSATIONS, &children, None, None),
        snapshot::count(db, names::MESSAGES, &children, None, None),
    )?;
    let non_negative = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok((non_negative(conversations), non_negative(messages)))
}
