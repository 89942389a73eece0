//! The export's reads ([`super::export`]) on MongoDB.
//!
//! Every query of the selection bounds `_id` on both sides, so the planner
//! reads the `{orgId: 1, _id: 1}` index over that range alone, in `_id` order.
//! Rows are asked for whole and kept raw: a server-side projection is applied
//! per document by the server (MongoDB's `PROJECTION_DEFAULT` stage), and on
//! the stand-in server it halved the rate of a sorted read of a large range;
//! the encoder picks the fields it needs itself.

use std::collections::BTreeSet;

use async_trait::async_trait;
use bson::{doc, oid::ObjectId, Document, RawDocumentBuf};
use futures::{StreamExt, TryStreamExt};
use mongodb::options::{FindOptions, Hint};
use mongodb::{Cursor, Database};

use super::export::{bad_bson, BatchStream, ExportSource, NameSource, PipelineNames, RawBatch};
use crate::error::JobError;
use crate::id_ranges::IdRange;
use crate::model::JobRecord;
use crate::store::names;

/// The least ObjectId: the explicit lower bound of a first range.
const LEAST: ObjectId = ObjectId::from_bytes([0; 12]);

/// An export's reads on one database.
#[derive(Clone, Debug)]
pub struct MongoExport {
    db: Database,
}

impl MongoExport {
    /// Wraps the CRM database.
    pub fn new(db: &Database) -> MongoExport {
        MongoExport { db: db.clone() }
    }
}

/// The job's filter with `_id` in `(after, upto]`, bounded on both sides
/// (`$gte` the least ObjectId when unbounded below: `_id`s are ObjectIds, the
/// bound only makes the range explicit to the planner).
fn bounded(job: &JobRecord, after: Option<ObjectId>, upto: ObjectId) -> Document {
    let mut query = job.filter.query(job.org_id);
    let mut range = match after {
        Some(after) => doc! {"$gt": after},
        None => doc! {"$gte": LEAST},
    };
    range.insert("$lte", upto);
    query.insert("_id", range);
    query
}

#[async_trait]
impl ExportSource for MongoExport {
    async fn bound(&self, job: &JobRecord) -> Result<ObjectId, JobError> {
        let collection = job.filter.pipeline_type.collection();
        crate::snapshot::bound(&self.db, collection, &job.filter.query(job.org_id)).await
    }

    /// Bounded on both sides and unhinted: a hinted `count` on the stand-in
    /// server collects every matching document before counting them, an
    /// unhinted one only looks at each.
    async fn count(&self, job: &JobRecord, bound: ObjectId) -> Result<i64, JobError> {
        let collection = job.filter.pipeline_type.collection();
        let query = bounded(job, None, bound);
        crate::snapshot::count(&self.db, collection, &query, None, job.filter.limit).await
    }

    async fn custom_keys(&self, job: &JobRecord, bound: ObjectId) -> Result<Vec<String>, JobError> {
        let coll = self
            .db
            .collection::<RawDocumentBuf>(job.filter.pipeline_type.collection());
        let mut find = coll
            .find(bounded(job, None, bound))
            .sort(doc! {"_id": 1})
            .projection(doc! {"customFields": 1})
            .batch_size(2000);
        if let Some(limit) = job.filter.limit {
            find = find.limit(limit as i64);
        }
        let mut cursor = find.await?;
        let mut keys = BTreeSet::new();
        while cursor.advance().await? {
            if let Ok(custom) = cursor.current().get_document("customFields") {
                for element in custom {
                    let (key, _) = element.map_err(bad_bson)?;
                    if !keys.contains(key) {
                        keys.insert(key.to_string());
                    }
                }
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// Unhinted, bounded ranges: a hinted query on the stand-in server read
    /// the organisation's whole key range whatever its `_id` bounds. A limited
    /// export reads one range (the limit counts from its start) and, org-wide,
    /// hints `{orgId: 1, _id: 1}`: it hands the rows over in `_id` order with
    /// no sort, where a planner that picks the index by the filter's first key
    /// (secantusd-rs) read the bounds through another index and sorted, 2.5
    /// times slower to the first batch.
    async fn rows(
        &self,
        job: &JobRecord,
        range: IdRange,
        limit: Option<i64>,
        batch: usize,
    ) -> Result<BatchStream, JobError> {
        let hint = (limit.is_some() && job.filter.org_wide)
            .then(|| Hint::Keys(doc! {"orgId": 1, "_id": 1}));
        let options = FindOptions::builder()
            .sort(doc! {"_id": 1})
            .batch_size(batch.min(u32::MAX as usize) as u32)
            .limit(limit)
            .hint(hint)
            .build();
        let cursor = self
            .db
            .collection::<RawDocumentBuf>(job.filter.pipeline_type.collection())
            .find(bounded(job, range.after, range.upto))
            .with_options(options)
            .await?;
        Ok(batches(cursor, batch.max(1)))
    }
}

/// A cursor's documents as raw batches of `batch`, each row copied once from
/// the driver's buffer (no document built, no allocation per row).
fn batches(cursor: Cursor<RawDocumentBuf>, batch: usize) -> BatchStream {
    futures::stream::try_unfold(
        (cursor, 0usize),
        move |(mut cursor, row_bytes)| async move {
            let mut rows = RawBatch::with_capacity(batch, row_bytes.max(64));
            while rows.len() < batch && cursor.advance().await? {
                rows.push(cursor.current());
            }
            if rows.is_empty() {
                return Ok(None);
            }
            let per_row = rows.byte_len() / rows.len() + 1;
            Ok(Some((rows, (cursor, per_row))))
        },
    )
    .boxed()
}

#[async_trait]
impl NameSource for MongoExport {
    async fn pipelines(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<PipelineNames>, JobError> {
        self.db.pipelines(org, ids).await
    }

    async fn owners(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<(ObjectId, String)>, JobError> {
        self.db.owners(org, ids).await
    }
}

/// Names straight from a database (also used by the streamed HTTP export).
#[async_trait]
impl NameSource for Database {
    async fn pipelines(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<PipelineNames>, JobError> {
        // A stage id only says which pipeline by lookup, so match either.
        let filter =
            doc! {"orgId": org, "$or": [{"_id": {"$in": ids}}, {"stages._id": {"$in": ids}}]};
        let found: Vec<Document> = self
            .collection::<Document>(names::PIPELINES)
            .find(filter)
            .projection(doc! {"name": 1, "stages": 1})
            .await?
            .try_collect()
            .await?;
        Ok(found
            .iter()
            .filter_map(|p| {
                let id = p.get_object_id("_id").ok()?;
                let stages = p
                    .get_array("stages")
                    .map(|stages| {
                        stages
                            .iter()
                            .filter_map(|s| s.as_document())
                            .filter_map(|s| {
                                let sid = s.get_object_id("_id").ok()?;
                                Some((sid, s.get_str("name").unwrap_or_default().to_string()))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(PipelineNames {
                    id,
                    name: p.get_str("name").unwrap_or_default().to_string(),
                    stages,
                })
            })
            .collect())
    }

    async fn owners(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<(ObjectId, String)>, JobError> {
        let found: Vec<Document> = self
            .collection::<Document>(names::USERS)
            .find(doc! {"orgId": org, "_id": {"$in": ids}})
            .projection(doc! {"name": 1})
            .await?
            .try_collect()
            .await?;
        Ok(found
            .iter()
            .filter_map(|u| {
                let id = u.get_object_id("_id").ok()?;
                Some((id, u.get_str("name").unwrap_or_default().to_string()))
            })
            .collect())
    }
}
