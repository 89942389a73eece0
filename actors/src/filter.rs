//! The filter shared by every bulk command: parsing, validation and the MongoDB query.
//!
//! Security: nothing from a request reaches MongoDB as an operator. The raw JSON is
//! validated into typed fields ([`Filter`]) with a closed set of keys, and
//! [`Filter::query`] builds the query from those typed fields only; strings taken
//! from the request (tags) only ever appear as literal values inside arrays.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use bson::{doc, oid::ObjectId, Bson, Document};
use chrono::{DateTime, Utc};
use contact_bulk_protocol::filter::{DeleteFilter, ExportFilter, FilterSpec};
use contact_bulk_protocol::limits::{self, List, Text};
use contact_bulk_protocol::parse::decode_value;
use contact_bulk_protocol::types::{Id, RowLimit, LIMIT_MSG, OBJECT_ID_MSG};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ValidationError;

pub use contact_bulk_protocol::filter::{OwnerFilter, PipelineType};
pub use contact_bulk_protocol::limits::{MAX_LIST, MAX_STRING};
pub use contact_bulk_protocol::types::MAX_LIMIT;

/// Refuses a list of more than [`MAX_LIST`] items, naming `field` and the limit.
pub fn check_list_len(len: usize, field: &str) -> Result<(), ValidationError> {
    if len > MAX_LIST {
        return Err(ValidationError::new(field, limits::list_too_long()));
    }
    Ok(())
}

/// Refuses a string of more than [`MAX_STRING`] characters, naming `field` and the limit.
pub fn check_string_len(value: &str, field: &str) -> Result<(), ValidationError> {
    if value.chars().nth(MAX_STRING).is_some() {
        return Err(ValidationError::new(field, limits::string_too_long()));
    }
    Ok(())
}

/// The `advancedParams` of a filter. Empty lists mean "no constraint".
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AdvancedParams {
    /// `createdAt >= created_after`.
    pub created_after: Option<DateTime<Utc>>,
    /// `createdAt < created_before`.
    pub created_before: Option<DateTime<Utc>>,
    /// The contact has all of these tags.
    pub tags: Vec<String>,
    /// The contact has at least one of these tags.
    pub any_tags: Vec<String>,
    /// The contact's `ownerId` is one of these.
    pub owner_ids: Vec<ObjectId>,
}

/// A validated filter. Serialize/Deserialize so it can be stored in the job record (BSON) and read back.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Filter {
    /// Stages to select from (deduplicated); ignored when `org_wide`.
    pub stage_ids: Vec<ObjectId>,
    /// Select from every stage of the organisation.
    pub org_wide: bool,
    /// Contacts or applications.
    pub pipeline_type: PipelineType,
    /// Owned / unowned restriction; `None` = both.
    pub owner_filter: Option<OwnerFilter>,
    /// Further restrictions.
    pub advanced: AdvancedParams,
    /// At most this many documents (exports only).
    pub limit: Option<u64>,
}

/// How [`Filter::from_json`] reads a filter.
#[derive(Debug, Clone, Copy)]
pub struct ParseOptions<'a> {
    /// Field path of the filter object: `"filter"` for NATS commands, `""` when the body is the filter.
    pub prefix: &'a str,
    /// Whether `limit` is accepted (exports) or refused (deletes).
    pub allow_limit: bool,
}

impl Filter {
    /// Validates `value` (the filter object): decoded as the protocol's
    /// [`FilterSpec`] (closed keys, typed values, capped lists), then checked
    /// by [`Filter::from_spec`]. Errors name the offending field's path under
    /// `opts.prefix`.
    pub fn from_json(value: &Value, opts: ParseOptions<'_>) -> Result<Filter, ValidationError> {
        if opts.allow_limit {
            Filter::from_spec(
                decode_value::<ExportFilter>(value.clone(), opts.prefix)?,
                opts.prefix,
            )
        } else {
            Filter::from_spec(
                decode_value::<DeleteFilter>(value.clone(), opts.prefix)?,
                opts.prefix,
            )
        }
    }

    /// The filter a decoded [`FilterSpec`] (found at `prefix`) asks for:
    /// `stageIds` required unless `orgWide` (and then ignored entirely), lists
    /// deduplicated keeping the first occurrence, nulls meaning "not given".
    pub fn from_spec<L: RowLimit>(
        spec: FilterSpec<L>,
        prefix: &str,
    ) -> Result<Filter, ValidationError> {
        let org_wide = spec.org_wide.unwrap_or(false);
        let stage_ids = if org_wide {
            Vec::new()
        } else {
            let field = field_path(prefix, "stageIds");
            let ids = match spec.stage_ids {
                None => Vec::new(),
                Some(raw) => ids(raw.decode(&field)?),
            };
            if ids.is_empty() {
                return Err(ValidationError::new(
                    field,
                    "must be a non-empty array unless orgWide is true",
                ));
            }
            ids
        };
        let advanced = spec.advanced_params.unwrap_or_default();
        Ok(Filter {
            stage_ids,
            org_wide,
            pipeline_type: spec.pipeline_type.unwrap_or_default(),
            owner_filter: spec.owner_filter,
            advanced: AdvancedParams {
                created_after: advanced.created_after.map(|t| t.0),
                created_before: advanced.created_before.map(|t| t.0),
                tags: texts(advanced.tags),
                any_tags: texts(advanced.any_tags),
                owner_ids: advanced.owner_ids.map(ids).unwrap_or_default(),
            },
            limit: spec.limit.and_then(|l| l.rows()),
        })
    }

    /// The MongoDB query selecting this filter's documents of organisation `org`.
    ///
    /// Always starts with `orgId: org`. Stage: `stageId: {$in: [...]}` unless
    /// orgWide (an empty stage list, which validation never produces, matches
    /// nothing). Owner and tag conditions that would share a key go under `$and`.
    /// The query never uses `_id`, so callers may add their own range on it.
    /// Every value placed in the document comes from the validated typed fields.
    pub fn query(&self, org: ObjectId) -> Document {
        let mut query = doc! { "orgId": org };
        if !self.org_wide {
            query.insert("stageId", doc! { "$in": oid_array(&self.stage_ids) });
        }
        let adv = &self.advanced;
        let mut and: Vec<Bson> = Vec::new();

        let mut owner: Vec<Bson> = Vec::new();
        match self.owner_filter {
            Some(OwnerFilter::Owned) => owner.push(doc! { "$ne": Bson::Null }.into()),
            Some(OwnerFilter::Unowned) => owner.push(Bson::Null),
            None => {}
        }
        if !adv.owner_ids.is_empty() {
            owner.push(doc! { "$in": oid_array(&adv.owner_ids) }.into());
        }
        add_conditions(&mut query, &mut and, "ownerId", owner);

        let mut created = Document::new();
        if let Some(after) = adv.created_after {
            created.insert("$gte", ceil_to_millis(after));
        }
        if let Some(before) = adv.created_before {
            created.insert("$lt", ceil_to_millis(before));
        }
        if !created.is_empty() {
            query.insert("createdAt", created);
        }

        let mut tags: Vec<Bson> = Vec::new();
        if !adv.tags.is_empty() {
            tags.push(doc! { "$all": string_array(&adv.tags) }.into());
        }
        if !adv.any_tags.is_empty() {
            tags.push(doc! { "$in": string_array(&adv.any_tags) }.into());
        }
        add_conditions(&mut query, &mut and, "tags", tags);

        if !and.is_empty() {
            query.insert("$and", and);
        }
        query
    }
}

/// Parses a 24-hex ObjectId string from a JSON value, naming `field` on error ("must be a 24-hex ObjectId string").
pub fn parse_object_id(value: &Value, field: &str) -> Result<ObjectId, ValidationError> {
    value
        .as_str()
        .and_then(Id::parse)
        .map(|id| id.0)
        .ok_or_else(|| ValidationError::new(field, OBJECT_ID_MSG))
}

/// Joins a prefix and a key into a field path: ("filter","stageIds") -> "filter.stageIds"; ("","stageIds") -> "stageIds".
///
/// An index key (`"[1]"`) is appended without a dot: ("filter.stageIds","[1]") -> "filter.stageIds[1]".
pub fn field_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else if key.is_empty() {
        prefix.to_string()
    } else if key.starts_with('[') {
        format!("{prefix}{key}")
    } else {
        format!("{prefix}.{key}")
    }
}

/// Builds the filter JSON from query-string parameters: stageIds comma-separated (empty parts dropped),
/// orgWide "true"/"false", pipelineType, ownerFilter (empty string = absent), advancedParams a JSON string:
/// malformed JSON is ignored (as the reference API documents), but well-formed JSON is validated like any filter.
///
/// `limit` (a positive integer) is accepted too; other parameters are ignored. The
/// result is validated with prefix `""`, so errors name `stageIds[0]`, `advancedParams.tags`, ...
pub fn filter_from_query_params(
    params: &HashMap<String, String>,
) -> Result<Filter, ValidationError> {
    let mut obj = Map::new();
    let param = |key: &str| params.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
    if let Some(ids) = param("stageIds") {
        let ids: Vec<Value> = ids
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_string()))
            .collect();
        obj.insert("stageIds".into(), Value::Array(ids));
    }
    if let Some(v) = param("orgWide") {
        let b = match v {
            "true" => true,
            "false" => false,
            _ => {
                return Err(ValidationError::new(
                    "orgWide",
                    "must be \"true\" or \"false\"",
                ))
            }
        };
        obj.insert("orgWide".into(), Value::Bool(b));
    }
    for key in ["pipelineType", "ownerFilter"] {
        if let Some(v) = param(key) {
            obj.insert(key.into(), Value::String(v.to_string()));
        }
    }
    if let Some(raw) = param("advancedParams") {
        // Malformed JSON is ignored, as the reference API documents.
        if let Ok(v) = serde_json::from_str::<Value>(raw) {
            obj.insert("advancedParams".into(), v);
        }
    }
    if let Some(v) = param("limit") {
        let n: u64 = v
            .parse()
            .map_err(|_| ValidationError::new("limit", LIMIT_MSG))?;
        obj.insert("limit".into(), Value::from(n));
    }
    Filter::from_json(
        &Value::Object(obj),
        ParseOptions {
            prefix: "",
            allow_limit: true,
        },
    )
}

fn ids(list: List<Id>) -> Vec<ObjectId> {
    dedupe(list.into_vec().into_iter().map(|id| id.0).collect())
}

fn texts(list: Option<List<Text>>) -> Vec<String> {
    dedupe(
        list.map(List::into_vec)
            .unwrap_or_default()
            .into_iter()
            .map(Text::into_string)
            .collect(),
    )
}

fn dedupe<T: Eq + Hash + Clone>(items: Vec<T>) -> Vec<T> {
    let mut seen = HashSet::with_capacity(items.len());
    items
        .into_iter()
        .filter(|x| seen.insert(x.clone()))
        .collect()
}

fn oid_array(ids: &[ObjectId]) -> Vec<Bson> {
    ids.iter().copied().map(Bson::ObjectId).collect()
}

fn string_array(items: &[String]) -> Vec<Bson> {
    items.iter().cloned().map(Bson::String).collect()
}

/// One condition goes straight under `field`; several go under `$and` so keys don't clash.
fn add_conditions(query: &mut Document, and: &mut Vec<Bson>, field: &str, conds: Vec<Bson>) {
    if let [single] = conds.as_slice() {
        query.insert(field, single.clone());
    } else {
        and.extend(conds.into_iter().map(|c| Bson::Document(doc! { field: c })));
    }
}

/// BSON dates have millisecond precision; rounding a bound *up* keeps both
/// `$gte` and `$lt` exact for millisecond timestamps (truncating would not).
fn ceil_to_millis(t: DateTime<Utc>) -> bson::DateTime {
    let ms = t.timestamp_millis();
    if t.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        bson::DateTime::from_millis(ms)
    } else {
        bson::DateTime::from_millis(ms.saturating_add(1))
    }
}

#[cfg(test)]
mod tests;
