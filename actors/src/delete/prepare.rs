//! Steps 1–3 of a delete batch: take the next candidates, decide which go (the
//! audit entries), count their children. Nothing is deleted here, so all of it
//! may run while the previous batch's deletes do, and is undone by
//! `release_undecided` when the batch never gets its `inflight` record.

use std::collections::HashSet;

use bson::{oid::ObjectId, rawdoc, DateTime, Document, RawBson, RawDocumentBuf};
use futures::TryStreamExt;

use crate::error::JobError;
use crate::model::{DeleteInflight, JobRecord};
use crate::repo::crm::IdStream;
use crate::repo::crm_mongo::audit_key;
use crate::repo::{Crm, Decision};

/// A batch decided and counted, not yet recorded as `inflight`.
pub(super) struct Prepared {
    /// What the `inflight` record will say.
    pub inflight: DeleteInflight,
    /// The batch's decisions (its audit entries as the cascade needs them).
    pub audits: Vec<Decision>,
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
/// 3. Beside it, their conversations and messages are counted.
pub(super) async fn prepare(
    crm: &Crm,
    job: &JobRecord,
    cursor: &mut Option<IdStream>,
    after: Option<ObjectId>,
    max_id: ObjectId,
    batch: usize,
) -> Result<Option<Prepared>, JobError> {
    if cursor.is_none() {
        *cursor = Some(crm.contacts.ids(job, after, max_id, batch).await?);
    }
    let mut candidates: HashSet<ObjectId> = HashSet::with_capacity(batch);
    let mut upto = None;
    if let Some(cursor) = cursor.as_mut() {
        while candidates.len() < batch {
            match cursor.try_next().await? {
                Some(id) => {
                    candidates.insert(id);
                    upto = Some(id);
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
    let mut current: Vec<Document> = crm.contacts.read_range(job, after, upto).await?;
    current.retain(|d| {
        d.get_object_id("_id")
            .is_ok_and(|id| candidates.contains(&id))
    });
    let ids: Vec<ObjectId> = current
        .iter()
        .filter_map(|d| d.get_object_id("_id").ok())
        .collect();
    let (entries, decisions) = audit_entries(job, &current)?;
    drop(current);
    // A hard delete counts the children now, so the counts survive a crash
    // mid-batch; a delete that keeps counts them as it keeps them
    // (`repo/keep.rs`), one request less per batch.
    let (all_new, counted) =
        futures::try_join!(crm.audit.decide(entries), count_children(crm, job, &ids))?;
    let (audits, (conversations, messages)) = match all_new {
        true => (decisions, counted),
        false => {
            // Some contacts were decided on already (by another job, or by this
            // one before a failure): the batch is this job's entries.
            let audits = crm.audit.recorded(job, after, Some(upto)).await?;
            let ids: Vec<ObjectId> = audits.iter().map(|a| a.contact).collect();
            let counted = count_children(crm, job, &ids).await?;
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

/// One CONTACT_DELETE entry per contact document (as `ContactRepo::read_range`
/// reads it), raw (one allocation each, with its `_id`, so the driver does
/// not copy it to add one), and what the batch keeps of it.
fn audit_entries(
    job: &JobRecord,
    contacts: &[Document],
) -> Result<(Vec<RawDocumentBuf>, Vec<Decision>), JobError> {
    let now = DateTime::now();
    let field = |c: &Document, k: &str| -> Result<RawBson, JobError> {
        match c.get(k) {
            None => Ok(RawBson::Null),
            Some(v) => RawBson::try_from(v.clone())
                .map_err(|e| JobError::Internal(format!("audit entry {k}: {e}"))),
        }
    };
    let (mut entries, mut decisions) = (
        Vec::with_capacity(contacts.len()),
        Vec::with_capacity(contacts.len()),
    );
    for c in contacts {
        let Ok(id) = c.get_object_id("_id") else {
            continue;
        };
        let requested_by = match job.requested_by {
            Some(u) => RawBson::ObjectId(u),
            None => RawBson::Null,
        };
        entries.push(rawdoc! {
            "_id": ObjectId::new(),
            "orgId": job.org_id,
            "type": "CONTACT_DELETE",
            "contactId": id,
            "jobId": job.job_id.as_str(),
            "actorId": requested_by,
            "createdAt": now,
            "contact": {
                "firstName": field(c, "firstName")?,
                "lastName": field(c, "lastName")?,
                "email": field(c, "email")?,
                "phone": field(c, "phone")?,
            },
            "ownerId": field(c, "ownerId")?,
            "pipelineType": job.filter.pipeline_type.as_str(),
            "bulkKey": audit_key(job.org_id, id),
        });
        decisions.push(Decision {
            contact: id,
            owner: c.get_object_id("ownerId").ok(),
            at: now,
        });
    }
    Ok((entries, decisions))
}

/// Conversations and messages of these contacts, counted now by a hard
/// delete only.
async fn count_children(
    crm: &Crm,
    job: &JobRecord,
    ids: &[ObjectId],
) -> Result<(u64, u64), JobError> {
    match job.hard_delete {
        true => crm.contacts.count_children(job.org_id, ids).await,
        false => Ok((0, 0)),
    }
}
