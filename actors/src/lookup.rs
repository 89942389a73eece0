//! Pipeline, stage and owner names for export rows, resolved per batch and cached per job.

use std::collections::HashSet;

use bson::{oid::ObjectId, Document, RawDocument};

use crate::encode::{Fields, Names};
use crate::error::JobError;
use crate::repo::NameSource;

/// A row whose referenced ids can be read: a `Document`, or a raw one.
pub trait Refs {
    /// The ObjectId at top-level `key`, if it is one.
    fn ref_id(&self, key: &str) -> Option<ObjectId>;
}

impl Refs for Document {
    fn ref_id(&self, key: &str) -> Option<ObjectId> {
        self.get_object_id(key).ok()
    }
}

impl Refs for RawDocument {
    fn ref_id(&self, key: &str) -> Option<ObjectId> {
        self.get_object_id(key).ok()
    }
}

impl Refs for Fields<'_> {
    fn ref_id(&self, key: &str) -> Option<ObjectId> {
        match key {
            "pipelineId" => Fields::object_id(self.pipeline_id),
            "stageId" => Fields::object_id(self.stage_id),
            "ownerId" => Fields::object_id(self.owner_id),
            _ => None,
        }
    }
}

/// A job's name cache. Ids missing from the database are remembered, so an
/// unknown id costs one query per job, never one per row.
#[derive(Debug, Default)]
pub struct NameCache {
    /// Names found so far.
    pub names: Names,
    missing: HashSet<ObjectId>,
}

impl NameCache {
    /// Makes sure every pipeline, stage and owner referenced by `rows` is
    /// known, with at most one query per kind for the whole batch.
    pub async fn resolve<'a, R: Refs + ?Sized + 'a>(
        &mut self,
        source: &dyn NameSource,
        org: ObjectId,
        rows: impl Iterator<Item = &'a R> + Clone,
        need_pipelines: bool,
        need_owners: bool,
    ) -> Result<(), JobError> {
        if need_pipelines {
            let unknown = self.unknown(rows.clone(), &["pipelineId", "stageId"], |n, id| {
                n.pipelines.contains_key(id) || n.stages.contains_key(id)
            });
            if !unknown.is_empty() {
                for p in source.pipelines(org, &unknown).await? {
                    self.names.pipelines.insert(p.id, p.name);
                    self.names.stages.extend(p.stages);
                }
                for id in unknown {
                    if !self.names.pipelines.contains_key(&id)
                        && !self.names.stages.contains_key(&id)
                    {
                        self.missing.insert(id);
                    }
                }
            }
        }
        if need_owners {
            let unknown = self.unknown(rows, &["ownerId"], |n, id| n.owners.contains_key(id));
            if !unknown.is_empty() {
                self.names
                    .owners
                    .extend(source.owners(org, &unknown).await?);
                for id in unknown {
                    if !self.names.owners.contains_key(&id) {
                        self.missing.insert(id);
                    }
                }
            }
        }
        Ok(())
    }

    fn unknown<'a, R: Refs + ?Sized + 'a>(
        &self,
        rows: impl Iterator<Item = &'a R>,
        keys: &[&str],
        known: impl Fn(&Names, &ObjectId) -> bool,
    ) -> Vec<ObjectId> {
        let mut out = HashSet::new();
        for d in rows {
            for k in keys {
                if let Some(id) = d.ref_id(k) {
                    if !known(&self.names, &id) && !self.missing.contains(&id) {
                        out.insert(id);
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}
