//! The `dryRun` of a delete: what it would remove now, counted without deleting anything.

use bson::{doc, oid::ObjectId, Document};
use futures::TryStreamExt;
use mongodb::Database;

use crate::error::JobError;
use crate::filter::Filter;
use crate::model::Counts;
use crate::repo::{ContactRepo, MongoCrm};

/// Exactly what a delete with this filter would remove now: contacts, and their
/// conversations and messages, counted in batches of ids (never collecting the cursor).
pub async fn dry_run(db: &Database, org: ObjectId, filter: &Filter) -> Result<Counts, JobError> {
    let coll = db.collection::<Document>(filter.pipeline_type.collection());
    let crm = MongoCrm::new(db);
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
