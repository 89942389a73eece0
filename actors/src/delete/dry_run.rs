//! The `dryRun` of a delete: what it would remove now, counted without deleting anything.

use bson::{doc, oid::ObjectId, Document};
use futures::TryStreamExt;
use mongodb::Database;

use super::contacts;
use crate::error::JobError;
use crate::filter::Filter;
use crate::model::Counts;
use crate::store::names;

/// Exactly what a delete with this filter would remove now: contacts, and their
/// conversations and messages, counted in batches of ids (never collecting the cursor).
pub async fn dry_run(db: &Database, org: ObjectId, filter: &Filter) -> Result<Counts, JobError> {
    let coll = contacts(db, filter);
    let mut cursor = coll
        .find(filter.query(org))
        .projection(doc! {"_id": 1})
        .batch_size(1000)
        .await?;
    let mut counts = Counts::default();
    let mut ids = Vec::with_capacity(1000);
    loop {
        let next = cursor.try_next().await?;
        let done = next.is_none();
        if let Some(id) = next.and_then(|d| d.get_object_id("_id").ok()) {
            ids.push(id);
        }
        if ids.len() == 1000 || (done && !ids.is_empty()) {
            let children = doc! {"orgId": org, "contactId": {"$in": &ids}};
            counts.contacts += ids.len() as u64;
            counts.conversations += db
                .collection::<Document>(names::CONVERSATIONS)
                .count_documents(children.clone())
                .await?;
            counts.messages += db
                .collection::<Document>(names::MESSAGES)
                .count_documents(children)
                .await?;
            ids.clear();
        }
        if done {
            return Ok(counts);
        }
    }
}
