//! [`RestoreRepo`] in memory, on [`MemCrm`]'s data and crash points (each
//! method's name is its crash point).
//!
//! The fake's kept contacts come as the two forms a restore meets: a
//! contact's conversations in its bundle, its messages kept apart (`spilled`),
//! so both paths of the put-back run on it.

use std::collections::btree_map::Entry;

use async_trait::async_trait;
use bson::{oid::ObjectId, Bson, Document, RawDocumentBuf};
use futures::StreamExt;

use super::crm_mem::Data;
use super::crm_mongo::audit_key;
use super::kept_restore::{
    released_key, restore_key, Apart, Child, KeptContact, KeptSummary, RestoreRepo, Target,
};
use super::MemCrm;
use crate::error::JobError;
use crate::model::JobRecord;

fn raw(d: &Document) -> Result<RawDocumentBuf, JobError> {
    RawDocumentBuf::from_document(d).map_err(|e| JobError::Internal(format!("raw: {e}")))
}

fn after_upto(id: ObjectId, after: Option<ObjectId>, upto: Option<ObjectId>) -> bool {
    after.is_none_or(|a| id > a) && upto.is_none_or(|u| id <= u)
}

/// Kept contacts of `source` after `after`, in order, at most `limit`.
fn kept_contacts(
    d: &Data,
    source: &str,
    after: Option<ObjectId>,
    limit: u32,
) -> Vec<(ObjectId, Document)> {
    d.kept
        .iter()
        .filter(|((j, tag, contact, child), _)| {
            j == source && *tag == 'c' && child.is_none() && after_upto(*contact, after, None)
        })
        .take(limit.max(1) as usize)
        .map(|((_, _, contact, _), doc)| (*contact, doc.clone()))
        .collect()
}

/// The children of `contact` kept by `source` under `tag`.
fn kept_children(d: &Data, source: &str, tag: char, contact: ObjectId) -> Vec<Document> {
    d.kept
        .iter()
        .filter(|((j, t, c, child), _)| {
            j == source && *t == tag && *c == contact && child.is_some()
        })
        .map(|(_, doc)| doc.clone())
        .collect()
}

#[async_trait]
impl RestoreRepo for MemCrm {
    async fn kept_total(&self, source: &str) -> Result<i64, JobError> {
        self.guarded("kept_total", |d| {
            kept_contacts(d, source, None, u32::MAX).len() as i64
        })
    }

    async fn kept_contacts(
        &self,
        source: &str,
        after: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<KeptContact>, JobError> {
        let found = self.guarded("kept_contacts", |d| {
            kept_contacts(d, source, after, limit)
                .into_iter()
                .map(|(contact, doc)| (contact, doc, kept_children(d, source, 'v', contact)))
                .collect::<Vec<_>>()
        })?;
        found
            .into_iter()
            .map(|(contact, doc, conversations)| {
                Ok(KeptContact {
                    contact,
                    doc: raw(&doc)?,
                    conversations: conversations.iter().map(raw).collect::<Result<_, _>>()?,
                    messages: Vec::new(),
                    spilled: true,
                })
            })
            .collect()
    }

    async fn kept_summaries(
        &self,
        source: &str,
        after: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<KeptSummary>, JobError> {
        self.guarded("kept_summaries", |d| {
            kept_contacts(d, source, after, limit)
                .into_iter()
                .map(|(contact, _)| KeptSummary {
                    contact,
                    conversations: kept_children(d, source, 'v', contact).len() as u64,
                    messages: 0,
                    spilled: true,
                })
                .collect()
        })
    }

    async fn kept_apart(
        &self,
        source: &str,
        kind: Child,
        after: Option<ObjectId>,
        upto: ObjectId,
    ) -> Result<Apart, JobError> {
        let found: Vec<(ObjectId, Document)> = self.guarded("kept_apart", |d| {
            if kind == Child::Conversation {
                // In the bundles.
                return Vec::new();
            }
            d.kept
                .iter()
                .filter(|((j, t, c, child), _)| {
                    j == source && *t == 'm' && child.is_some() && after_upto(*c, after, Some(upto))
                })
                .map(|((_, _, c, _), doc)| (*c, doc.clone()))
                .collect()
        })?;
        let docs: Vec<Result<(ObjectId, RawDocumentBuf), JobError>> =
            found.iter().map(|(c, doc)| Ok((*c, raw(doc)?))).collect();
        Ok(futures::stream::iter(docs).boxed())
    }

    async fn taken(&self, job: &JobRecord, ids: &[ObjectId]) -> Result<Vec<ObjectId>, JobError> {
        let coll = job.filter.pipeline_type.collection().to_string();
        self.guarded("taken", |d| {
            ids.iter()
                .filter(|id| d.contacts.contains_key(&(coll.clone(), **id)))
                .copied()
                .collect()
        })
    }

    async fn put_back(
        &self,
        job: &JobRecord,
        target: Target,
        docs: Vec<RawDocumentBuf>,
    ) -> Result<u64, JobError> {
        let docs: Vec<Document> = docs
            .iter()
            .map(|r| r.to_document())
            .collect::<Result<_, _>>()
            .map_err(|e| JobError::Internal(format!("raw: {e}")))?;
        let coll = job.filter.pipeline_type.collection().to_string();
        self.guarded("put_back", |d| {
            let mut new = 0;
            for doc in docs {
                let Ok(id) = doc.get_object_id("_id") else {
                    continue;
                };
                let vacant = match target {
                    Target::Contacts => match d.contacts.entry((coll.clone(), id)) {
                        Entry::Vacant(v) => Some(v.insert(doc)).is_some(),
                        Entry::Occupied(_) => false,
                    },
                    Target::Children(kind) => {
                        let map = match kind {
                            Child::Conversation => &mut d.conversations,
                            Child::Message => &mut d.messages,
                        };
                        match map.entry(id) {
                            Entry::Vacant(v) => Some(v.insert(doc)).is_some(),
                            Entry::Occupied(_) => false,
                        }
                    }
                };
                new += u64::from(vacant);
            }
            new
        })
    }

    async fn write_restores(&self, entries: &[Document]) -> Result<bool, JobError> {
        self.guarded("write_restores", |d| {
            let mut all_new = true;
            for e in entries {
                let key = e.get_str("bulkKey").unwrap_or_default().to_string();
                match d.audits.entry(key) {
                    Entry::Occupied(_) => all_new = false,
                    Entry::Vacant(v) => {
                        v.insert(e.clone());
                    }
                }
            }
            all_new
        })
    }

    async fn restores_of(
        &self,
        source: &str,
        contacts: &[ObjectId],
    ) -> Result<Vec<Document>, JobError> {
        self.guarded("restores_of", |d| {
            contacts
                .iter()
                .filter_map(|c| d.audits.get(&restore_key(source, *c)).cloned())
                .collect()
        })
    }

    async fn adopt(
        &self,
        job: &JobRecord,
        source: &str,
        from: &str,
        contacts: &[ObjectId],
    ) -> Result<(), JobError> {
        self.guarded("adopt", |d| {
            for c in contacts {
                if let Some(e) = d.audits.get_mut(&restore_key(source, *c)) {
                    if e.get_str("jobId").ok() == Some(from) {
                        e.insert("jobId", &job.job_id);
                        e.insert("adoptedFrom", from);
                    }
                }
            }
        })
    }

    async fn release_deleted(
        &self,
        job: &JobRecord,
        source: &str,
        contacts: &[ObjectId],
    ) -> Result<(), JobError> {
        self.guarded("release_deleted", |d| {
            for c in contacts {
                let key = audit_key(job.org_id, *c);
                let held = d.audits.get(&key).is_some_and(|e| {
                    e.get_str("jobId").ok() == Some(source)
                        && e.get_str("type").ok() == Some("CONTACT_DELETE")
                });
                if !held {
                    continue;
                }
                if let Some(mut e) = d.audits.remove(&key) {
                    let moved = released_key(job.org_id, *c, source);
                    e.insert("bulkKey", &moved);
                    e.insert("restoredBy", Bson::String(job.job_id.clone()));
                    d.audits.entry(moved).or_insert(e);
                }
            }
        })
    }

    async fn restored_after(&self, job: &JobRecord) -> Result<Vec<ObjectId>, JobError> {
        let Some(src) = job.source_job_id.clone() else {
            return Ok(Vec::new());
        };
        let after = job.checkpoint.last_id;
        self.guarded("restored_after", |d| {
            d.audits
                .iter()
                .filter(|(k, e)| {
                    k.starts_with(&format!("restore:{src}:"))
                        && e.get_str("jobId").ok() == Some(job.job_id.as_str())
                })
                .filter_map(|(_, e)| e.get_object_id("contactId").ok())
                .filter(|c| after_upto(*c, after, None))
                .collect()
        })
    }

    async fn withdraw_restores(
        &self,
        job: &JobRecord,
        contacts: &[ObjectId],
    ) -> Result<(), JobError> {
        let Some(src) = job.source_job_id.clone() else {
            return Ok(());
        };
        self.guarded("withdraw_restores", |d| {
            for c in contacts {
                let key = restore_key(&src, *c);
                if d.audits
                    .get(&key)
                    .is_some_and(|e| e.get_str("jobId").ok() == Some(job.job_id.as_str()))
                {
                    d.audits.remove(&key);
                }
            }
        })
    }
}

impl MemCrm {
    /// The audit entry under `key` (`bulkKey`), if any.
    pub fn entry(&self, key: &str) -> Option<Document> {
        self.data().audits.get(key).cloned()
    }

    /// The contact `id` of `collection`, if it exists.
    pub fn contact(&self, collection: &str, id: ObjectId) -> Option<Document> {
        self.data()
            .contacts
            .get(&(collection.to_string(), id))
            .cloned()
    }
}
