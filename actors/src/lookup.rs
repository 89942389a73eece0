//! Pipeline, stage and owner names for export rows, resolved per batch and
//! cached per job; the reads go through a [`NameRepo`] (MongoDB, or the fake).

use std::collections::HashSet;

use bson::{oid::ObjectId, Document};

use crate::encode::Names;
use crate::error::JobError;
use crate::repo::NameRepo;

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
        repo: &dyn NameRepo,
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
                self.load_pipelines(repo, org, &unknown).await?;
            }
        }
        if need_owners {
            let unknown = self.unknown(docs, &["ownerId"], |n, id| n.owners.contains_key(id));
            if !unknown.is_empty() {
                self.load_owners(repo, org, &unknown).await?;
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
        repo: &dyn NameRepo,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<(), JobError> {
        for p in repo.pipelines_of(org, ids).await? {
            self.names.pipelines.insert(p.id, p.name);
            self.names.stages.extend(p.stages);
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
        repo: &dyn NameRepo,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<(), JobError> {
        self.names.owners.extend(repo.owners_of(org, ids).await?);
        for id in ids {
            if !self.names.owners.contains_key(id) {
                self.missing.insert(*id);
            }
        }
        Ok(())
    }
}
