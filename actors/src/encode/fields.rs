//! The top-level fields of a contact row that an export reads, found in one
//! pass over the row's raw bytes (used by the encoder's cells and the name lookup).

use bson::{oid::ObjectId, RawBsonRef, RawDocument};

/// The fields a row is exported from. Searching the row once per column walks
/// it from its start each time and checks every key on the way (a profile of
/// a 300,000-row export spent 40 % of the service's CPU there); one pass over
/// its elements finds them all, and only their values are read.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fields<'a> {
    /// `_id`.
    pub id: Option<RawBsonRef<'a>>,
    /// `firstName`.
    pub first_name: Option<RawBsonRef<'a>>,
    /// `lastName`.
    pub last_name: Option<RawBsonRef<'a>>,
    /// `phone`.
    pub phone: Option<RawBsonRef<'a>>,
    /// `email`.
    pub email: Option<RawBsonRef<'a>>,
    /// `pipelineId`.
    pub pipeline_id: Option<RawBsonRef<'a>>,
    /// `stageId`.
    pub stage_id: Option<RawBsonRef<'a>>,
    /// `ownerId`.
    pub owner_id: Option<RawBsonRef<'a>>,
    /// `tags`.
    pub tags: Option<RawBsonRef<'a>>,
    /// `createdAt`.
    pub created_at: Option<RawBsonRef<'a>>,
    /// `customFields`, when it is a document.
    pub custom: Option<&'a RawDocument>,
}

impl<'a> Fields<'a> {
    /// Reads the fields of `doc`. Like a lookup by key, the first occurrence of
    /// a key counts, and a malformed element ends the row (the fields after it
    /// are missing).
    pub fn read(doc: &'a RawDocument) -> Fields<'a> {
        let mut f = Fields::default();
        for element in doc.iter_elements() {
            let Ok(element) = element else { break };
            let slot = match element.key() {
                "_id" => &mut f.id,
                "firstName" => &mut f.first_name,
                "lastName" => &mut f.last_name,
                "phone" => &mut f.phone,
                "email" => &mut f.email,
                "pipelineId" => &mut f.pipeline_id,
                "stageId" => &mut f.stage_id,
                "ownerId" => &mut f.owner_id,
                "tags" => &mut f.tags,
                "createdAt" => &mut f.created_at,
                "customFields" => {
                    if f.custom.is_none() {
                        if let Ok(RawBsonRef::Document(d)) = element.value() {
                            f.custom = Some(d);
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            if slot.is_none() {
                *slot = element.value().ok();
            }
        }
        f
    }

    /// The ObjectId of a reference field, if it is one.
    pub fn object_id(value: Option<RawBsonRef<'a>>) -> Option<ObjectId> {
        match value {
            Some(RawBsonRef::ObjectId(id)) => Some(id),
            _ => None,
        }
    }
}
