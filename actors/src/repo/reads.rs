//! The reads of the use cases, behind typed repositories: counts and dry runs
//! of a selection, the streamed export's cursor, the organisation's pipelines,
//! and the names export rows show ([`NameRepo`], used by [`crate::lookup`]).
//!
//! Every read is scoped to the caller's organisation by the repository (the
//! filter's query always carries `orgId`); nothing here writes. The MongoDB
//! implementations keep the exact queries the service ran before (the `count`
//! command, the dry runs' batched `$in` reads, the sorted, projected cursor);
//! [`super::reads_mem`] has the in-memory fakes.

use async_trait::async_trait;
use bson::{doc, oid::ObjectId, Document};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use mongodb::Database;

use crate::error::JobError;
use crate::filter::Filter;
use crate::model::{Counts, JobRecord};
use crate::restore::RestoreCounts;
use crate::store::names;

/// Documents read from a cursor, a batch at a time.
pub type DocStream = BoxStream<'static, Result<Document, JobError>>;

/// Pipelines an organisation's pages offer at most.
pub const PIPELINES_LISTED: i64 = 500;

/// A pipeline with its stages, as names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pipeline {
    /// `_id`.
    pub id: ObjectId,
    /// Its name (empty when the record has none).
    pub name: String,
    /// `(stage _id, stage name)`, in the pipeline's order.
    pub stages: Vec<(ObjectId, String)>,
}

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

    /// What a restore of the delete `source` started now would put back (the
    /// restore's `dryRun`, contract section 11).
    async fn restore_dry_run(&self, source: &JobRecord) -> Result<RestoreCounts, JobError>;

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
    async fn pipelines(&self, org: ObjectId) -> Result<Vec<Pipeline>, JobError>;
}

/// The names export rows show, looked up by id within one organisation.
#[async_trait]
pub trait NameRepo: Send + Sync + 'static {
    /// The pipelines of `org` whose `_id`, or the `_id` of one of whose
    /// stages, is among `ids`.
    async fn pipelines_of(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<Pipeline>, JobError>;

    /// `(user _id, name)` of the users of `org` among `ids`.
    async fn owners_of(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<(ObjectId, String)>, JobError>;
}

/// [`ContactReads`] and [`NameRepo`] on MongoDB.
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
pub fn pipeline_of(p: &Document) -> Option<Pipeline> {
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
    Some(Pipeline {
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
        crate::delete::dry_run(&self.db, org, filter).await
    }

    async fn restore_dry_run(&self, source: &JobRecord) -> Result<RestoreCounts, JobError> {
        crate::restore::dry_run(&self.db, source).await
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

    async fn pipelines(&self, org: ObjectId) -> Result<Vec<Pipeline>, JobError> {
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

#[async_trait]
impl NameRepo for MongoReads {
    async fn pipelines_of(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<Pipeline>, JobError> {
        self.db.pipelines_of(org, ids).await
    }

    async fn owners_of(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<(ObjectId, String)>, JobError> {
        self.db.owners_of(org, ids).await
    }
}

/// The MongoDB name lookups, on the database handle itself so that a job step
/// holding one (the export step, until its reads move behind its own
/// repository) passes it where a [`NameRepo`] is asked for.
#[async_trait]
impl NameRepo for Database {
    async fn pipelines_of(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<Pipeline>, JobError> {
        // A stage id only says which pipeline by lookup, so match either.
        let filter =
            doc! {"orgId": org, "$or": [{"_id": {"$in": ids}}, {"stages._id": {"$in": ids}}]};
        let docs: Vec<Document> = self
            .collection::<Document>(names::PIPELINES)
            .find(filter)
            .projection(doc! {"name": 1, "stages": 1})
            .await?
            .try_collect()
            .await?;
        Ok(docs.iter().filter_map(pipeline_of).collect())
    }

    async fn owners_of(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<(ObjectId, String)>, JobError> {
        let docs: Vec<Document> = self
            .collection::<Document>(names::USERS)
            .find(doc! {"orgId": org, "_id": {"$in": ids}})
            .projection(doc! {"name": 1})
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|u| {
                let id = u.get_object_id("_id").ok()?;
                Some((id, u.get_str("name").unwrap_or_default().to_string()))
            })
            .collect())
    }
}
