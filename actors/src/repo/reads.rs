//! The reads of the use cases, behind a typed repository: counts and dry runs
//! of a selection, the streamed export's cursor, the organisation's pipelines.
//! (The names export rows show are read through [`super::NameSource`].)
//!
//! Every read is scoped to the caller's organisation by the repository (the
//! filter's query always carries `orgId`); nothing here writes. The MongoDB
//! implementation keeps the exact queries the service ran before (the `count`
//! command, the delete dry run's batched `$in` reads, the sorted, projected
//! cursor); [`super::reads_mem`] has the in-memory fake. A restore's dry run
//! is the restore's own count over [`super::RestoreRepo`].

use async_trait::async_trait;
use bson::{doc, oid::ObjectId, Document};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use mongodb::Database;

use super::{ContactRepo, MongoCrm, PipelineNames};
use crate::error::JobError;
use crate::filter::Filter;
use crate::model::Counts;
use crate::store::names;

/// Documents read from a cursor, a batch at a time.
pub type DocStream = BoxStream<'static, Result<Document, JobError>>;

/// Pipelines an organisation's pages offer at most.
pub const PIPELINES_LISTED: i64 = 500;

/// Read-only questions about an organisation's contacts.
#[async_trait]
pub trait ContactReads: Send + Sync + 'static {
    /// Whether the database answers (`/healthz`).
    async fn ping(&self) -> Result<(), JobError>;

    /// Documents of `filter` in `org` now, capped by the filter's `limit`.
    async fn count(&self, org: ObjectId, filter: &Filter) -> Result<u64, JobError>;

    /// What a delete with `filter` would remove now: contacts, and their
    /// conversations and messages (the delete's `dryRun`).
    async fn delete_dry_run(&self, org: ObjectId, filter: &Filter) -> Result<Counts, JobError>;

    /// The documents of `filter` in `org`, in `_id` order, with `projection`,
    /// capped by the filter's `limit`, read `batch` at a time from one cursor.
    async fn documents(
        &self,
        org: ObjectId,
        filter: &Filter,
        projection: Document,
        batch: u32,
    ) -> Result<DocStream, JobError>;

    /// The organisation's pipelines (at most [`PIPELINES_LISTED`]).
    async fn list_pipelines(&self, org: ObjectId) -> Result<Vec<PipelineNames>, JobError>;
}

/// [`ContactReads`] on MongoDB.
#[derive(Debug, Clone)]
pub struct MongoReads {
    db: Database,
}

impl MongoReads {
    /// Reads of `db`.
    pub fn new(db: &Database) -> MongoReads {
        MongoReads { db: db.clone() }
    }
}

/// A pipeline record as names (missing fields read as empty).
pub fn pipeline_of(p: &Document) -> Option<PipelineNames> {
    let stages = p
        .get_array("stages")
        .map(|s| {
            s.iter()
                .filter_map(|s| s.as_document())
                .filter_map(|s| {
                    let id = s.get_object_id("_id").ok()?;
                    Some((id, s.get_str("name").unwrap_or_default().to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    Some(PipelineNames {
        id: p.get_object_id("_id").ok()?,
        name: p.get_str("name").unwrap_or_default().to_string(),
        stages,
    })
}

#[async_trait]
impl ContactReads for MongoReads {
    async fn ping(&self) -> Result<(), JobError> {
        self.db.run_command(doc! {"ping": 1}).await?;
        Ok(())
    }

    async fn count(&self, org: ObjectId, filter: &Filter) -> Result<u64, JobError> {
        let collection = filter.pipeline_type.collection();
        let n =
            crate::snapshot::count(&self.db, collection, &filter.query(org), None, filter.limit)
                .await?;
        Ok(n.max(0) as u64)
    }

    async fn delete_dry_run(&self, org: ObjectId, filter: &Filter) -> Result<Counts, JobError> {
        // Exactly what a delete would remove now: the selection's ids in
        // batches (never collecting the cursor), their children counted per batch.
        let coll = self
            .db
            .collection::<Document>(filter.pipeline_type.collection());
        let crm = MongoCrm::new(&self.db);
        let cursor = coll
            .find(filter.query(org))
            .projection(doc! {"_id": 1})
            .batch_size(1000)
            .await?;
        let mut counts = Counts::default();
        let mut chunks = cursor.try_chunks(1000);
        while let Some(chunk) = chunks.try_next().await.map_err(|e| e.1)? {
            let ids: Vec<ObjectId> = chunk
                .iter()
                .filter_map(|d| d.get_object_id("_id").ok())
                .collect();
            let (conversations, messages) = crm.count_children(org, &ids).await?;
            counts.contacts += ids.len() as u64;
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
        batch: u32,
    ) -> Result<DocStream, JobError> {
        let coll = self
            .db
            .collection::<Document>(filter.pipeline_type.collection());
        let mut find = coll
            .find(filter.query(org))
            .sort(doc! {"_id": 1})
            .projection(projection)
            .batch_size(batch);
        if let Some(limit) = filter.limit {
            find = find.limit(limit as i64);
        }
        Ok(find.await?.map_err(JobError::from).boxed())
    }

    async fn list_pipelines(&self, org: ObjectId) -> Result<Vec<PipelineNames>, JobError> {
        let docs: Vec<Document> = self
            .db
            .collection::<Document>(names::PIPELINES)
            .find(doc! {"orgId": org})
            .limit(PIPELINES_LISTED)
            .await?
            .try_collect()
            .await?;
        Ok(docs.iter().filter_map(pipeline_of).collect())
    }
}

#[cfg(test)]
mod tests;
