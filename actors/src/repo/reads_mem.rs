//! The reads of [`super::reads`] in memory, over the CRM fake ([`MemCrm`]):
//! the selection is evaluated as the query would (organisation, collection,
//! stages, owners, dates, tags), so the use cases' counts and dry runs are
//! unit-tested without servers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bson::{oid::ObjectId, Document};
use futures::StreamExt;

use super::crm::ContactRepo;
use super::crm_mem::MemCrm;
use super::export::{NameSource, PipelineNames};
use super::reads::{ContactReads, DocStream, PIPELINES_LISTED};
use crate::error::{Dependency, JobError};
use crate::filter::Filter;
use crate::model::{Counts, JobKind, JobRecord};

/// The highest `_id` there is: "no bound".
const TOP: ObjectId = ObjectId::from_bytes([0xff; 12]);

/// In-memory reads over a [`MemCrm`], with pipelines and users; clones share
/// everything.
#[derive(Debug, Clone, Default)]
pub struct MemReads {
    /// The contacts and what deletes kept.
    pub crm: MemCrm,
    pipelines: Arc<Mutex<Vec<(ObjectId, PipelineNames)>>>,
    users: Arc<Mutex<Vec<(ObjectId, ObjectId, String)>>>,
    down: Arc<AtomicBool>,
    /// Name queries answered, per kind: `(pipelines, owners)`.
    queries: Arc<Mutex<(u32, u32)>>,
}

impl MemReads {
    /// Reads over `crm`, with no pipelines or users.
    pub fn new(crm: MemCrm) -> MemReads {
        MemReads {
            crm,
            ..MemReads::default()
        }
    }

    /// Adds a pipeline of `org`.
    pub fn add_pipeline(&self, org: ObjectId, pipeline: PipelineNames) {
        lock(&self.pipelines).push((org, pipeline));
    }

    /// Adds a user of `org`.
    pub fn add_user(&self, org: ObjectId, id: ObjectId, name: &str) {
        lock(&self.users).push((org, id, name.to_string()));
    }

    /// Makes every read fail as an unreachable database would (`true`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Name queries answered so far: `(pipelines, owners)`.
    pub fn name_queries(&self) -> (u32, u32) {
        *lock(&self.queries)
    }

    fn up(&self) -> Result<(), JobError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(JobError::Unavailable {
                service: Dependency::Mongodb,
                message: "database down (fake)".into(),
            });
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A job record carrying just what the CRM fake scopes by: organisation and filter.
fn probe(org: ObjectId, filter: &Filter) -> JobRecord {
    JobRecord::new(JobKind::Delete, org, None, None, filter.clone(), None)
}

/// `doc` with only the fields an inclusion projection names (and `_id`).
fn project(doc: Document, projection: &Document) -> Document {
    if projection.is_empty() {
        return doc;
    }
    doc.into_iter()
        .filter(|(k, _)| {
            k == "_id"
                || projection.keys().any(|p| {
                    p == k
                        || p.strip_prefix(k.as_str())
                            .is_some_and(|r| r.starts_with('.'))
                })
        })
        .collect()
}

#[async_trait]
impl ContactReads for MemReads {
    async fn ping(&self) -> Result<(), JobError> {
        self.up()
    }

    async fn count(&self, org: ObjectId, filter: &Filter) -> Result<u64, JobError> {
        self.up()?;
        let n = self.crm.count(&probe(org, filter), TOP).await?.max(0) as u64;
        Ok(filter.limit.map_or(n, |l| n.min(l)))
    }

    async fn delete_dry_run(&self, org: ObjectId, filter: &Filter) -> Result<Counts, JobError> {
        self.up()?;
        let job = probe(org, filter);
        let mut ids = self.crm.ids(&job, None, TOP, 1000).await?.chunks(1000);
        let mut counts = Counts::default();
        while let Some(chunk) = ids.next().await {
            let chunk: Vec<ObjectId> = chunk.into_iter().collect::<Result<_, _>>()?;
            let (conversations, messages) = self.crm.count_children(org, &chunk).await?;
            counts.contacts += chunk.len() as u64;
            counts.conversations += conversations;
            counts.messages += messages;
        }
        Ok(counts)
    }

    async fn documents(
        &self,
        org: ObjectId,
        filter: &Filter,
        projection: Document,
        _batch: u32,
    ) -> Result<DocStream, JobError> {
        self.up()?;
        let docs = self.crm.read_range(&probe(org, filter), None, TOP).await?;
        let limit = filter.limit.map_or(usize::MAX, |l| l as usize);
        let docs: Vec<Document> = docs
            .into_iter()
            .take(limit)
            .map(|d| project(d, &projection))
            .collect();
        Ok(futures::stream::iter(docs.into_iter().map(Ok)).boxed())
    }

    async fn list_pipelines(&self, org: ObjectId) -> Result<Vec<PipelineNames>, JobError> {
        self.up()?;
        Ok(lock(&self.pipelines)
            .iter()
            .filter(|(o, _)| *o == org)
            .map(|(_, p)| p.clone())
            .take(PIPELINES_LISTED as usize)
            .collect())
    }
}

#[async_trait]
impl NameSource for MemReads {
    async fn pipelines(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<PipelineNames>, JobError> {
        self.up()?;
        lock(&self.queries).0 += 1;
        Ok(lock(&self.pipelines)
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
        self.up()?;
        lock(&self.queries).1 += 1;
        Ok(lock(&self.users)
            .iter()
            .filter(|(o, id, _)| *o == org && ids.contains(id))
            .map(|(_, id, name)| (*id, name.clone()))
            .collect())
    }
}
