//! The CRM repositories ([`super::crm`]) in memory: the fake the delete step's
//! unit tests run on, with crash points.
//!
//! Same rules as MongoDB's: one audit entry per contact (`bulkKey`), a
//! notification adds each batch once (`lastBatch`), a kept document stays as
//! first kept, deletes are idempotent. The job's filter is evaluated here
//! (organisation, stages, owner, creation dates, tags) as the query would.
//! [`MemCrm::crash_at`] makes the n-th call of an operation fail, before or
//! after it applied, as a process dying at that await would leave things.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bson::{oid::ObjectId, Bson, Document, RawDocumentBuf};
use futures::StreamExt;

use super::crm::{AuditRepo, ContactRepo, Decision, IdStream, KeptRepo, NotificationRepo};
use super::crm_mongo::audit_key;
use crate::error::JobError;
use crate::filter::{Filter, OwnerFilter};
use crate::model::JobRecord;

mod records;

/// One assignee's notification of a job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Note {
    /// Contacts counted.
    pub count: i64,
    /// The sample of their ids.
    pub contact_ids: Vec<ObjectId>,
    /// Highest id of the last batch added.
    pub last_batch: Option<ObjectId>,
}

#[derive(Debug, Default)]
pub(super) struct Data {
    /// By (collection, `_id`).
    pub(super) contacts: BTreeMap<(String, ObjectId), Document>,
    pub(super) conversations: BTreeMap<ObjectId, Document>,
    pub(super) messages: BTreeMap<ObjectId, Document>,
    /// By `bulkKey`.
    pub(super) audits: BTreeMap<String, Document>,
    /// By `<jobId>:<ownerId>`.
    notes: BTreeMap<String, Note>,
    /// By (job id, kind tag, contact, child id).
    pub(super) kept: BTreeMap<(String, char, ObjectId, Option<ObjectId>), Document>,
    /// Armed crash: operation, calls left before it fires, applied first.
    crash: Option<(&'static str, u32, bool)>,
}

/// In-memory CRM data; see the module docs. Clones share the data.
#[derive(Debug, Clone, Default)]
pub struct MemCrm {
    data: Arc<Mutex<Data>>,
}

/// Outcome of passing a crash point.
enum Pass {
    Go,
    /// Fail without applying.
    Crash,
    /// Apply, then fail.
    CrashAfter,
}

fn crash(op: &str) -> JobError {
    JobError::Internal(format!("crash at {op}"))
}

impl MemCrm {
    /// Empty.
    pub fn new() -> MemCrm {
        MemCrm::default()
    }

    pub(super) fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the `nth` (1-based) call of `op` from now fail: before it applies,
    /// or (`applied`) after. Ops are the trait methods' names (`keep`,
    /// `delete`, `decide`, `add`, …).
    pub fn crash_at(&self, op: &'static str, nth: u32, applied: bool) {
        self.data().crash = Some((op, nth.max(1), applied));
    }

    /// Whether an armed crash is still waiting to fire.
    pub fn crash_armed(&self) -> bool {
        self.data().crash.is_some()
    }

    fn pass(&self, op: &'static str) -> Pass {
        let mut d = self.data();
        match d.crash {
            Some((armed, n, applied)) if armed == op => {
                if n > 1 {
                    d.crash = Some((armed, n - 1, applied));
                    return Pass::Go;
                }
                d.crash = None;
                if applied {
                    Pass::CrashAfter
                } else {
                    Pass::Crash
                }
            }
            _ => Pass::Go,
        }
    }

    /// Runs `apply` under the crash point `op`.
    pub(super) fn guarded<T>(
        &self,
        op: &'static str,
        apply: impl FnOnce(&mut Data) -> T,
    ) -> Result<T, JobError> {
        match self.pass(op) {
            Pass::Crash => Err(crash(op)),
            Pass::Go => Ok(apply(&mut self.data())),
            Pass::CrashAfter => {
                apply(&mut self.data());
                Err(crash(op))
            }
        }
    }

    /// Adds a contact document (it needs `_id`, `orgId`) to `collection`.
    pub fn insert_contact(&self, collection: &str, doc: Document) {
        if let Ok(id) = doc.get_object_id("_id") {
            self.data()
                .contacts
                .insert((collection.to_string(), id), doc);
        }
    }

    /// Adds a conversation (`child == "conversation"`) or message with its `_id`,
    /// `orgId` and `contactId`.
    pub fn insert_child(&self, conversation: bool, doc: Document) {
        if let Ok(id) = doc.get_object_id("_id") {
            let mut d = self.data();
            let map = if conversation {
                &mut d.conversations
            } else {
                &mut d.messages
            };
            map.insert(id, doc);
        }
    }

    /// Ids of the contacts in `collection`.
    pub fn contact_ids(&self, collection: &str) -> Vec<ObjectId> {
        let d = self.data();
        d.contacts
            .keys()
            .filter(|(c, _)| c == collection)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Conversations and messages of `contact` still there.
    pub fn children_of(&self, contact: ObjectId) -> usize {
        let d = self.data();
        let of = |m: &BTreeMap<ObjectId, Document>| {
            m.values()
                .filter(|c| c.get_object_id("contactId").ok() == Some(contact))
                .count()
        };
        of(&d.conversations) + of(&d.messages)
    }

    /// Contacts with a CONTACT_DELETE entry of `job_id`.
    pub fn audited(&self, job_id: &str) -> Vec<ObjectId> {
        let d = self.data();
        d.audits
            .values()
            .filter(|a| a.get_str("jobId").ok() == Some(job_id))
            .filter_map(|a| a.get_object_id("contactId").ok())
            .collect()
    }

    /// Contacts (`None` child) and children kept by `job_id`, as (contact, child).
    pub fn kept(&self, job_id: &str) -> Vec<(ObjectId, Option<ObjectId>)> {
        let d = self.data();
        d.kept
            .keys()
            .filter(|k| k.0 == job_id)
            .map(|k| (k.2, k.3))
            .collect()
    }

    /// The notifications of a job, by assignee.
    pub fn notes(&self, job_id: &str) -> BTreeMap<ObjectId, Note> {
        let d = self.data();
        let prefix = format!("{job_id}:");
        d.notes
            .iter()
            .filter_map(|(k, n)| {
                let owner = ObjectId::parse_str(k.strip_prefix(&prefix)?).ok()?;
                Some((owner, n.clone()))
            })
            .collect()
    }
}

/// Whether `doc` is in `filter`'s selection of `org` (as [`Filter::query`]).
pub fn matches(filter: &Filter, org: ObjectId, doc: &Document) -> bool {
    if doc.get_object_id("orgId").ok() != Some(org) {
        return false;
    }
    if !filter.org_wide {
        let stage = doc.get_object_id("stageId").ok();
        if !stage.is_some_and(|s| filter.stage_ids.contains(&s)) {
            return false;
        }
    }
    let owner = doc.get_object_id("ownerId").ok();
    match filter.owner_filter {
        Some(OwnerFilter::Owned) if owner.is_none() => return false,
        Some(OwnerFilter::Unowned) if owner.is_some() => return false,
        _ => {}
    }
    let adv = &filter.advanced;
    if !adv.owner_ids.is_empty() && !owner.is_some_and(|o| adv.owner_ids.contains(&o)) {
        return false;
    }
    let created = doc.get_datetime("createdAt").ok().map(|d| d.to_chrono());
    if adv
        .created_after
        .is_some_and(|a| created.is_none_or(|c| c < a))
        || adv
            .created_before
            .is_some_and(|b| created.is_none_or(|c| c >= b))
    {
        return false;
    }
    let tags: Vec<&str> = doc
        .get_array("tags")
        .map(|t| t.iter().filter_map(Bson::as_str).collect())
        .unwrap_or_default();
    adv.tags.iter().all(|t| tags.contains(&t.as_str()))
        && (adv.any_tags.is_empty() || adv.any_tags.iter().any(|t| tags.contains(&t.as_str())))
}

fn in_range(id: ObjectId, after: Option<ObjectId>, upto: Option<ObjectId>) -> bool {
    after.is_none_or(|a| id > a) && upto.is_none_or(|u| id <= u)
}

fn selection(d: &Data, job: &JobRecord) -> Vec<(ObjectId, Document)> {
    let coll = job.filter.pipeline_type.collection();
    d.contacts
        .iter()
        .filter(|((c, _), doc)| c == coll && matches(&job.filter, job.org_id, doc))
        .map(|((_, id), doc)| (*id, doc.clone()))
        .collect()
}

fn own_entries(
    d: &Data,
    job: &JobRecord,
    after: Option<ObjectId>,
    upto: Option<ObjectId>,
) -> Vec<Document> {
    d.audits
        .values()
        .filter(|a| {
            a.get_str("jobId").ok() == Some(job.job_id.as_str())
                && a.get_object_id("orgId").ok() == Some(job.org_id)
                && a.get_object_id("contactId")
                    .is_ok_and(|c| in_range(c, after, upto))
        })
        .cloned()
        .collect()
}

fn children_of<'a>(
    m: &'a BTreeMap<ObjectId, Document>,
    org: ObjectId,
    ids: &'a [ObjectId],
) -> impl Iterator<Item = (&'a ObjectId, &'a Document)> + 'a {
    m.iter().filter(move |(_, c)| {
        c.get_object_id("orgId").ok() == Some(org)
            && c.get_object_id("contactId").is_ok_and(|p| ids.contains(&p))
    })
}

#[async_trait]
impl ContactRepo for MemCrm {
    async fn bound(&self, job: &JobRecord) -> Result<ObjectId, JobError> {
        let secs = bson::DateTime::now().timestamp_millis() / 1000;
        let mut bytes = [0xffu8; 12];
        bytes[..4].copy_from_slice(&(secs as u32).to_be_bytes());
        let now = ObjectId::from_bytes(bytes);
        self.guarded("bound", |d| {
            selection(d, job)
                .into_iter()
                .map(|(id, _)| id)
                .fold(now, ObjectId::max)
        })
    }

    async fn count(&self, job: &JobRecord, bound: ObjectId) -> Result<i64, JobError> {
        self.guarded("count", |d| {
            selection(d, job)
                .iter()
                .filter(|(id, _)| *id <= bound)
                .count() as i64
        })
    }

    async fn ids(
        &self,
        job: &JobRecord,
        after: Option<ObjectId>,
        upto: ObjectId,
        _batch: usize,
    ) -> Result<IdStream, JobError> {
        let ids: Vec<ObjectId> = self.guarded("ids", |d| {
            selection(d, job)
                .into_iter()
                .map(|(id, _)| id)
                .filter(|id| in_range(*id, after, Some(upto)))
                .collect()
        })?;
        Ok(futures::stream::iter(ids.into_iter().map(Ok)).boxed())
    }

    async fn read_range(
        &self,
        job: &JobRecord,
        after: Option<ObjectId>,
        upto: ObjectId,
    ) -> Result<Vec<Document>, JobError> {
        self.guarded("read_range", |d| {
            selection(d, job)
                .into_iter()
                .filter(|(id, _)| in_range(*id, after, Some(upto)))
                .map(|(_, doc)| doc)
                .collect()
        })
    }

    async fn present(&self, job: &JobRecord, ids: &[ObjectId]) -> Result<Vec<ObjectId>, JobError> {
        let coll = job.filter.pipeline_type.collection().to_string();
        self.guarded("present", |d| {
            ids.iter()
                .filter(|id| {
                    d.contacts
                        .get(&(coll.clone(), **id))
                        .is_some_and(|c| c.get_object_id("orgId").ok() == Some(job.org_id))
                })
                .copied()
                .collect()
        })
    }

    async fn delete(&self, job: &JobRecord, ids: &[ObjectId]) -> Result<u64, JobError> {
        let coll = job.filter.pipeline_type.collection().to_string();
        self.guarded("delete", |d| {
            let before = d.contacts.len();
            d.contacts.retain(|(c, id), doc| {
                !(c == &coll
                    && ids.contains(id)
                    && doc.get_object_id("orgId").ok() == Some(job.org_id))
            });
            (before - d.contacts.len()) as u64
        })
    }

    async fn count_children(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<(u64, u64), JobError> {
        self.guarded("count_children", |d| {
            (
                children_of(&d.conversations, org, ids).count() as u64,
                children_of(&d.messages, org, ids).count() as u64,
            )
        })
    }

    async fn delete_children_of(&self, org: ObjectId, ids: &[ObjectId]) -> Result<(), JobError> {
        self.guarded("delete_children_of", |d| {
            for m in [&mut d.conversations, &mut d.messages] {
                let gone: Vec<ObjectId> = children_of(m, org, ids).map(|(id, _)| *id).collect();
                for id in gone {
                    m.remove(&id);
                }
            }
        })
    }

    async fn delete_children(
        &self,
        org: ObjectId,
        conversations: &[Bson],
        messages: &[Bson],
    ) -> Result<(), JobError> {
        self.guarded("delete_children", |d| {
            for (m, ids) in [
                (&mut d.conversations, conversations),
                (&mut d.messages, messages),
            ] {
                m.retain(|id, c| {
                    !(ids.contains(&Bson::ObjectId(*id))
                        && c.get_object_id("orgId").ok() == Some(org))
                });
            }
        })
    }

    async fn children_left(&self, org: ObjectId, ids: &[ObjectId]) -> Result<bool, JobError> {
        self.guarded("children_left", |d| {
            children_of(&d.conversations, org, ids).next().is_some()
                || children_of(&d.messages, org, ids).next().is_some()
        })
    }
}
