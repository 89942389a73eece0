//! The export's reads ([`super::export`]) in memory: the fake the export
//! step's unit tests run on.
//!
//! Same answers as MongoDB's: the job's filter is evaluated as the query would
//! ([`super::crm_mem::matches`]), rows come whole and raw in `_id` order, the
//! bound is the end of the current second unless a matching id sorts above it.
//! [`MemExport::fail_rows_after`] makes a range's stream fail after a number
//! of rows, as a cursor lost mid-read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bson::{oid::ObjectId, Document, RawDocumentBuf};
use futures::StreamExt;

use super::crm_mem::matches;
use super::export::{bad_bson, BatchStream, ExportSource, NameSource, PipelineNames, RawBatch};
use crate::error::JobError;
use crate::id_ranges::IdRange;
use crate::model::JobRecord;

#[derive(Debug, Default)]
struct Data {
    /// By (collection, `_id`).
    contacts: BTreeMap<(String, ObjectId), Document>,
    /// By organisation.
    pipelines: Vec<(ObjectId, PipelineNames)>,
    /// (organisation, user, name).
    users: Vec<(ObjectId, ObjectId, String)>,
    /// Rows still to hand over before a range's stream fails (once).
    fail_after: Option<usize>,
    /// Ranges opened so far.
    opened: Vec<IdRange>,
    /// How long a count takes (a large organisation's).
    count_takes: std::time::Duration,
}

/// In-memory contacts, pipelines and users; clones share them.
#[derive(Debug, Clone, Default)]
pub struct MemExport {
    data: Arc<Mutex<Data>>,
}

impl MemExport {
    /// Empty.
    pub fn new() -> MemExport {
        MemExport::default()
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) a contact document (it needs `_id`, `orgId`).
    pub fn insert(&self, collection: &str, doc: Document) {
        if let Ok(id) = doc.get_object_id("_id") {
            self.data()
                .contacts
                .insert((collection.to_string(), id), doc);
        }
    }

    /// Removes a contact.
    pub fn remove(&self, collection: &str, id: ObjectId) {
        self.data().contacts.remove(&(collection.to_string(), id));
    }

    /// Adds a pipeline of `org`.
    pub fn insert_pipeline(&self, org: ObjectId, pipeline: PipelineNames) {
        self.data().pipelines.push((org, pipeline));
    }

    /// Adds a user of `org`.
    pub fn insert_user(&self, org: ObjectId, id: ObjectId, name: &str) {
        self.data().users.push((org, id, name.to_string()));
    }

    /// The next range read fails after handing over `rows` more rows.
    pub fn fail_rows_after(&self, rows: usize) {
        self.data().fail_after = Some(rows);
    }

    /// Counts take `takes` from now on (a large organisation's count).
    pub fn count_takes(&self, takes: std::time::Duration) {
        self.data().count_takes = takes;
    }

    /// The ranges opened so far, in order.
    pub fn opened(&self) -> Vec<IdRange> {
        self.data().opened.clone()
    }

    /// The selection of `job` with `_id` in `(after, upto]`, in `_id` order.
    fn selection(&self, job: &JobRecord, after: Option<ObjectId>, upto: ObjectId) -> Vec<Document> {
        let coll = job.filter.pipeline_type.collection();
        self.data()
            .contacts
            .iter()
            .filter(|((c, id), doc)| {
                c == coll
                    && after.is_none_or(|a| *id > a)
                    && *id <= upto
                    && matches(&job.filter, job.org_id, doc)
            })
            .map(|(_, doc)| doc.clone())
            .collect()
    }
}

/// The last id of the current second.
fn now_bound() -> ObjectId {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .min(u32::MAX as u64) as u32;
    let mut bytes = [0xffu8; 12];
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    ObjectId::from_bytes(bytes)
}

const TOP: ObjectId = ObjectId::from_bytes([0xff; 12]);

#[async_trait]
impl ExportSource for MemExport {
    async fn bound(&self, job: &JobRecord) -> Result<ObjectId, JobError> {
        let now = now_bound();
        let ahead = self.selection(job, Some(now), TOP);
        Ok(ahead
            .last()
            .and_then(|d| d.get_object_id("_id").ok())
            .unwrap_or(now))
    }

    async fn count(&self, job: &JobRecord, bound: ObjectId) -> Result<i64, JobError> {
        let takes = self.data().count_takes;
        tokio::time::sleep(takes).await;
        let n = self.selection(job, None, bound).len() as i64;
        Ok(job.filter.limit.map_or(n, |l| n.min(l as i64)))
    }

    async fn custom_keys(&self, job: &JobRecord, bound: ObjectId) -> Result<Vec<String>, JobError> {
        let limit = job.filter.limit.map_or(usize::MAX, |l| l as usize);
        let mut keys = BTreeSet::new();
        for doc in self.selection(job, None, bound).iter().take(limit) {
            if let Ok(custom) = doc.get_document("customFields") {
                keys.extend(custom.keys().cloned());
            }
        }
        Ok(keys.into_iter().collect())
    }

    async fn rows(
        &self,
        job: &JobRecord,
        range: IdRange,
        limit: Option<i64>,
        batch: usize,
    ) -> Result<BatchStream, JobError> {
        let limit = limit.map_or(usize::MAX, |l| l.max(0) as usize);
        let docs = self.selection(job, range.after, range.upto);
        let fail_after = {
            let mut d = self.data();
            d.opened.push(range);
            d.fail_after.take()
        };
        let mut out: Vec<Result<RawBatch, JobError>> = Vec::new();
        let mut rows = RawBatch::default();
        for (i, doc) in docs.iter().take(limit).enumerate() {
            if fail_after == Some(i) {
                break;
            }
            let raw = RawDocumentBuf::from_document(doc).map_err(bad_bson)?;
            rows.push(&raw);
            if rows.len() == batch.max(1) {
                out.push(Ok(std::mem::take(&mut rows)));
            }
        }
        if !rows.is_empty() {
            out.push(Ok(rows));
        }
        if fail_after.is_some_and(|n| n < docs.len().min(limit)) {
            out.push(Err(JobError::Internal("cursor lost".into())));
        } else if let Some(n) = fail_after {
            // Not reached in this range: armed for the next one.
            let handed: usize = docs.len().min(limit);
            self.data().fail_after = Some(n - handed);
        }
        Ok(futures::stream::iter(out).boxed())
    }
}

#[async_trait]
impl NameSource for MemExport {
    async fn pipelines(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<PipelineNames>, JobError> {
        Ok(self
            .data()
            .pipelines
            .iter()
            .filter(|(o, p)| {
                *o == org && (ids.contains(&p.id) || p.stages.iter().any(|(s, _)| ids.contains(s)))
            })
            .map(|(_, p)| p.clone())
            .collect())
    }

    async fn owners(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<(ObjectId, String)>, JobError> {
        Ok(self
            .data()
            .users
            .iter()
            .filter(|(o, u, _)| *o == org && ids.contains(u))
            .map(|(_, u, n)| (*u, n.clone()))
            .collect())
    }
}
