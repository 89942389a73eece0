//! Pipeline, stage and owner names for export rows, resolved per batch and cached per job.

use std::collections::HashSet;

use bson::{doc, oid::ObjectId, Document};
use futures::TryStreamExt;
use mongodb::Database;

use crate::encode::Names;
use crate::error::JobError;
use crate::store::names;

/// A job's name cache. Ids missing from the database are remembered, so an
/// unknown id costs one query per job, never one per row.
#[derive(Debug, Default)]
pub struct NameCache {
    /// Names found so far.
    pub names: Names,
    missing: HashSet<ObjectId>,
}

impl NameCache {
    /// Makes sure every pipeline, stage and owner referenced by `docs` is known,
    /// with at most one query per kind for the whole batch.
    pub async fn resolve(
        &mut self,
        db: &Database,
        org: ObjectId,
        docs: &[Document],
        need_pipelines: bool,
        need_owners: bool,
    ) -> Result<(), JobError> {
        if need_pipelines {
            let unknown = self.unknown(docs, &["pipelineId", "stageId"], |n, id| {
                n.pipelines.contains_key(id) || n.stages.contains_key(id)
            });
            if !unknown.is_empty() {
                self.load_pipelines(db, org, &unknown).await?;
            }
        }
        if need_owners {
            let unknown = self.unknown(docs, &["ownerId"], |n, id| n.owners.contains_key(id));
            if !unknown.is_empty() {
                self.load_owners(db, org, &unknown).await?;
            }
        }
        Ok(())
    }

    fn unknown(
        &self,
        docs: &[Document],
        keys: &[&str],
        known: impl Fn(&Names, &ObjectId) -> bool,
    ) -> Vec<ObjectId> {
        let mut out = HashSet::new();
        for d in docs {
            for k in keys {
                if let Ok(id) = d.get_object_id(k) {
                    if !known(&self.names, &id) && !self.missing.contains(&id) {
                        out.insert(id);
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    async fn load_pipelines(
        &mut self,
        db: &Database,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<(), JobError> {
        // A stage id only says which pipeline by lookup, so match either.
        let filter =
            doc! {"orgId": org, "$or": [{"_id": {"$in": ids}}, {"stages._id": {"$in": ids}}]};
        let mut cursor = db
            .collection::<Document>(names::PIPELINES)
            .find(filter)
            .projection(doc! {"name": 1, "stages": 1})
            .await?;
        while let Some(p) = cursor.try_next().await? {
            if let Ok(id) = p.get_object_id("_id") {
                let name = p.get_str("name").unwrap_or_default().to_string();
                self.names.pipelines.insert(id, name);
            }
            if let Ok(stages) = p.get_array("stages") {
                for s in stages.iter().filter_map(|s| s.as_document()) {
                    if let Ok(sid) = s.get_object_id("_id") {
                        let name = s.get_str("name").unwrap_or_default().to_string();
                        self.names.stages.insert(sid, name);
                    }
                }
            }
        }
        for id in ids {
            if !self.names.pipelines.contains_key(id) && !self.names.stages.contains_key(id) {
                self.missing.insert(*id);
            }
        }
        Ok(())
    }

    async fn load_owners(
        &mut self,
        db: &Database,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<(), JobError> {
        let mut cursor = db
            .collection::<Document>(names::USERS)
            .find(doc! {"orgId": org, "_id": {"$in": ids}})
            .projection(doc! {"name": 1})
            .await?;
        while let Some(u) = cursor.try_next().await? {
            if let Ok(id) = u.get_object_id("_id") {
                let name = u.get_str("name").unwrap_or_default().to_string();
                self.names.owners.insert(id, name);
            }
        }
        for id in ids {
            if !self.names.owners.contains_key(id) {
                self.missing.insert(*id);
            }
        }
        Ok(())
    }
}
