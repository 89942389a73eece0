//! One restore batch: decide, free the delete's keys, put back contacts then
//! their children, notify and announce (steps 2–5 of `mod.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document, RawDocumentBuf};
use futures::TryStreamExt;

use crate::delete::{notify, Sampled};
use crate::error::JobError;
use crate::events::{EventSink, RestoredContact};
use crate::failpoint;
use crate::model::JobRecord;
use crate::repo::kept_restore::{restore_key, Child, KeptContact, RestoreRepo, Target};

/// A batch: the kept contacts after `after`, in `_id` order.
pub(super) struct Batch<'a> {
    pub repo: &'a dyn RestoreRepo,
    pub job: &'a JobRecord,
    /// The delete undone.
    pub source: &'a str,
    pub after: Option<ObjectId>,
    /// Kept contacts.
    pub contacts: Vec<KeptContact>,
    /// Ended restores of the same delete whose last batch this one may finish.
    pub unfinished: &'a Unfinished,
}

/// A batch decided (steps 2–3): what its put-back (4–5) needs.
pub(super) struct Decided {
    /// Highest contact id of the batch (the next checkpoint).
    pub upto: ObjectId,
    after: Option<ObjectId>,
    skipped: u64,
    /// The restored contacts, in `_id` order.
    bundles: Vec<KeptContact>,
    restored: HashSet<ObjectId>,
    /// Their CONTACT_RESTORE entries (`contactId`, `ownerId`, `createdAt`).
    mine: Vec<Document>,
}

/// What the put-back of a decided batch needs besides it, owned (it runs in
/// the background while the next batch is decided).
pub(super) struct PutBack {
    pub repo: Arc<dyn RestoreRepo>,
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
        repo,
        job,
        source,
        after,
        contacts,
        unfinished,
    } = b;
    let ids: Vec<ObjectId> = contacts.iter().map(|k| k.contact).collect();
    let upto = *ids
        .iter()
        .max()
        .ok_or_else(|| JobError::Internal("empty restore batch".into()))?;

    // 2. Decide: contacts whose `_id` is free get an entry; the batch's
    // restored contacts are this job's entries (some may be from a try of the
    // batch before a crash, whose contacts exist by now).
    let present: HashSet<ObjectId> = repo.taken(job, &ids).await?.into_iter().collect();
    let now = DateTime::now();
    let mut entries = Vec::new();
    for k in &contacts {
        if present.contains(&k.contact) {
            continue;
        }
        let owner = k
            .doc
            .get_object_id("ownerId")
            .ok()
            .map_or(Bson::Null, Bson::ObjectId);
        entries.push(doc! {
            "orgId": job.org_id,
            "type": "CONTACT_RESTORE",
            "contactId": k.contact,
            "jobId": &job.job_id,
            "sourceJobId": source,
            "actorId": job.requested_by,
            "createdAt": now,
            "ownerId": owner,
            "pipelineType": job.filter.pipeline_type.as_str(),
            "bulkKey": restore_key(source, k.contact),
        });
    }
    let all_new = repo.write_restores(&entries).await?;
    failpoint::hit("restore.decided");
    let mine: Vec<Document> = match all_new && present.is_empty() {
        // Every contact of the batch is new to every restore: the entries
        // just written are the batch.
        true => entries,
        false => decided(repo, job, source, &ids, unfinished).await?,
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
    repo.release_deleted(job, source, &restored_ids).await?;

    let bundles: Vec<KeptContact> = contacts
        .into_iter()
        .filter(|k| restored.contains(&k.contact))
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
        repo,
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
    let (repo, job, source, org) = (repo.as_ref(), job.as_ref(), source.as_str(), job.org_id);
    // 4. Contacts first, then their children: those their bundles hold, and
    // those kept apart (only read when some bundle says so). Each document
    // moves out of its bundle once.
    let spilled = bundles.iter().any(|k| k.spilled);
    let mut contacts = Vec::with_capacity(bundles.len());
    let (mut conversations, mut messages) = (Vec::new(), Vec::new());
    for k in bundles {
        contacts.push(k.doc);
        conversations.extend(k.conversations);
        messages.extend(k.messages);
    }
    repo.put_back(job, Target::Contacts, contacts).await?;
    failpoint::hit("restore.contacts");
    if failpoint::fires(failpoint::RESTORE_CHILDREN_FAILS, &org.to_hex()) {
        return Err(JobError::Internal("injected failure".into()));
    }
    let apart = spilled.then_some((source, after, upto, &restored));
    let (conversations, messages) = futures::try_join!(
        put_back_children(repo, job, Child::Conversation, conversations, apart),
        put_back_children(repo, job, Child::Message, messages, apart),
    )?;

    failpoint::hit("restore.children");
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

/// Inserts the kept children of `kind` of the restored contacts (`embedded`:
/// those their bundles hold), and, with `apart`, those kept apart for them.
/// Returns how many the delete kept for them (what this batch puts back,
/// whether now or in a try before a crash; each child is kept once).
async fn put_back_children(
    repo: &dyn RestoreRepo,
    job: &JobRecord,
    kind: Child,
    embedded: Vec<RawDocumentBuf>,
    apart: Option<Apart<'_>>,
) -> Result<u64, JobError> {
    let target = Target::Children(kind);
    let mut n = embedded.len() as u64;
    let mut docs = Vec::with_capacity(embedded.len().min(INSERT_DOCS));
    for child in embedded {
        docs.push(child);
        if docs.len() >= INSERT_DOCS {
            repo.put_back(job, target, std::mem::take(&mut docs))
                .await?;
        }
    }
    if let Some((source, after, upto, restored)) = apart {
        let mut children = repo.kept_apart(source, kind, after, upto).await?;
        while let Some((contact, child)) = children.try_next().await? {
            if !restored.contains(&contact) {
                continue;
            }
            docs.push(child);
            n += 1;
            if docs.len() >= INSERT_DOCS {
                repo.put_back(job, target, std::mem::take(&mut docs))
                    .await?;
            }
        }
    }
    repo.put_back(job, target, docs).await?;
    Ok(n)
}

/// The batch's contacts this job restores: its own entries, and those a
/// failed or cancelled restore of the same delete left beyond its checkpoint
/// (`unfinished`: such a job's id and checkpoint), whose contacts may be back
/// without all their children. Those entries become this job's (`adoptedFrom`
/// names the job), so the rest of the batch puts back what is missing.
async fn decided(
    repo: &dyn RestoreRepo,
    job: &JobRecord,
    source: &str,
    ids: &[ObjectId],
    unfinished: &Unfinished,
) -> Result<Vec<Document>, JobError> {
    let all = repo.restores_of(source, ids).await?;
    let mut mine = Vec::with_capacity(all.len());
    let mut adopt: HashMap<String, Vec<ObjectId>> = HashMap::new();
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
                adopt.entry(owner.to_string()).or_default().push(contact);
                mine.push(e);
            }
        }
    }
    for (from, contacts) in adopt {
        tracing::info!(job_id = %job.job_id, from = %from, contacts = contacts.len(), "finishing contacts an ended restore left half done");
        repo.adopt(job, source, &from, &contacts).await?;
    }
    Ok(mine)
}

/// Failed or cancelled restores of the same delete: job id → checkpoint.
pub(super) type Unfinished = HashMap<String, Option<ObjectId>>;

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
