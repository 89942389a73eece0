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
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ValidationError;

/// The largest accepted `limit`.
pub const MAX_LIMIT: u64 = 100_000_000;

/// Most items any list of a command or body may hold (contract section 10).
pub const MAX_LIST: usize = 1_000;

/// Most characters any string of a command or body may hold (contract section 10).
pub const MAX_STRING: usize = 256;

/// Refuses a list of more than [`MAX_LIST`] items, naming `field` and the limit.
pub fn check_list_len(len: usize, field: &str) -> Result<(), ValidationError> {
    if len > MAX_LIST {
        return Err(ValidationError::new(
            field,
            format!("must hold at most {MAX_LIST} items (got {len})"),
        ));
    }
    Ok(())
}

/// Refuses a string of more than [`MAX_STRING`] characters, naming `field` and the limit.
pub fn check_string_len(value: &str, field: &str) -> Result<(), ValidationError> {
    if value.chars().nth(MAX_STRING).is_some() {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_STRING} characters"),
        ));
    }
    Ok(())
}

/// Keys allowed at the top level of a filter.
const FILTER_KEYS: &[&str] = &[
    "stageIds",
    "orgWide",
    "pipelineType",
    "ownerFilter",
    "advancedParams",
    "limit",
];

/// Keys allowed inside `advancedParams`.
const ADVANCED_KEYS: &[&str] = &[
    "createdAfter",
    "createdBefore",
    "tags",
    "anyTags",
    "ownerIds",
];

const OBJECT_ID_MSG: &str = "must be a 24-hex ObjectId string";
const OBJECT_ID_ARRAY_MSG: &str = "must be an array of 24-hex ObjectId strings";
const STRING_ARRAY_MSG: &str = "must be an array of strings";
const DATE_MSG: &str = "must be an RFC 3339 date-time string";
const LIMIT_MSG: &str = "must be a positive integer no greater than 100000000";

/// Which pipeline (and so which collection) the filter selects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PipelineType {
    /// `contacts`.
    #[default]
    Contact,
    /// `applications`.
    Application,
}

impl PipelineType {
    /// The MongoDB collection holding this pipeline's documents.
    pub fn collection(self) -> &'static str {
        match self {
            PipelineType::Contact => "contacts",
            PipelineType::Application => "applications",
        }
    }

    /// The wire name: `"Contact"` or `"Application"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineType::Contact => "Contact",
            PipelineType::Application => "Application",
        }
    }

    /// Parses the wire name (exact, case-sensitive).
    pub fn parse(s: &str) -> Option<PipelineType> {
        match s {
            "Contact" => Some(PipelineType::Contact),
            "Application" => Some(PipelineType::Application),
            _ => None,
        }
    }
}

/// Restricts the selection by whether a contact has an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerFilter {
    /// `ownerId` is set (neither null nor missing).
    Owned,
    /// `ownerId` is null or missing.
    Unowned,
}

impl OwnerFilter {
    /// The wire name: `"owned"` or `"unowned"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerFilter::Owned => "owned",
            OwnerFilter::Unowned => "unowned",
        }
    }

    /// Parses the wire name (exact, case-sensitive).
    pub fn parse(s: &str) -> Option<OwnerFilter> {
        match s {
            "owned" => Some(OwnerFilter::Owned),
            "unowned" => Some(OwnerFilter::Unowned),
            _ => None,
        }
    }
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
    /// Validates `value` (the filter object).
    ///
    /// Unknown keys, wrong types and malformed values are refused with the
    /// offending field's path (under `opts.prefix`).
    pub fn from_json(value: &Value, opts: ParseOptions<'_>) -> Result<Filter, ValidationError> {
        let prefix = opts.prefix;
        let obj = value.as_object().ok_or_else(|| {
            let field = if prefix.is_empty() { "body" } else { prefix };
            ValidationError::new(field, "must be a JSON object")
        })?;
        reject_unknown(obj, FILTER_KEYS, prefix)?;

        let org_wide = match present(obj, "orgWide") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ValidationError::new(
                    field_path(prefix, "orgWide"),
                    "must be a boolean",
                ))
            }
        };

        // With orgWide the stage list is ignored entirely: not validated, not used.
        let stage_ids = if org_wide {
            Vec::new()
        } else {
            let field = field_path(prefix, "stageIds");
            let ids = match present(obj, "stageIds") {
                None => Vec::new(),
                Some(v) => object_id_array(v, &field)?,
            };
            if ids.is_empty() {
                return Err(ValidationError::new(
                    field,
                    "must be a non-empty array unless orgWide is true",
                ));
            }
            ids
        };

        let pipeline_type = match present(obj, "pipelineType") {
            None => PipelineType::default(),
            Some(v) => v.as_str().and_then(PipelineType::parse).ok_or_else(|| {
                ValidationError::new(
                    field_path(prefix, "pipelineType"),
                    "must be \"Contact\" or \"Application\"",
                )
            })?,
        };

        let owner_filter = match present(obj, "ownerFilter") {
            None => None,
            Some(v) => Some(v.as_str().and_then(OwnerFilter::parse).ok_or_else(|| {
                ValidationError::new(
                    field_path(prefix, "ownerFilter"),
                    "must be \"owned\" or \"unowned\"",
                )
            })?),
        };

        let advanced = match present(obj, "advancedParams") {
            None => AdvancedParams::default(),
            Some(v) => parse_advanced(v, &field_path(prefix, "advancedParams"))?,
        };

        let limit = match present(obj, "limit") {
            None => None,
            Some(_) if !opts.allow_limit => {
                return Err(ValidationError::new(
                    field_path(prefix, "limit"),
                    "limit applies only to exports",
                ))
            }
            Some(v) => Some(
                v.as_u64()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| ValidationError::new(field_path(prefix, "limit"), LIMIT_MSG))?,
            ),
        };

        Ok(Filter {
            stage_ids,
            org_wide,
            pipeline_type,
            owner_filter,
            advanced,
            limit,
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
        .filter(|s| s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|s| ObjectId::parse_str(s).ok())
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

/// The value of `key`, treating JSON null as absent.
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// Refuses the first key (in key order) not in `allowed`, naming it under `prefix`.
fn reject_unknown(
    obj: &Map<String, Value>,
    allowed: &[&str],
    prefix: &str,
) -> Result<(), ValidationError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ValidationError::new(field_path(prefix, k), "unknown key")),
        None => Ok(()),
    }
}

fn parse_advanced(value: &Value, field: &str) -> Result<AdvancedParams, ValidationError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ValidationError::new(field, "must be an object or null"))?;
    reject_unknown(obj, ADVANCED_KEYS, field)?;
    let date = |key: &str| -> Result<Option<DateTime<Utc>>, ValidationError> {
        present(obj, key)
            .map(|v| parse_date(v, &field_path(field, key)))
            .transpose()
    };
    let strings = |key: &str| -> Result<Vec<String>, ValidationError> {
        match present(obj, key) {
            None => Ok(Vec::new()),
            Some(v) => string_list(v, &field_path(field, key)),
        }
    };
    let owner_ids = match present(obj, "ownerIds") {
        None => Vec::new(),
        Some(v) => object_id_array(v, &field_path(field, "ownerIds"))?,
    };
    Ok(AdvancedParams {
        created_after: date("createdAfter")?,
        created_before: date("createdBefore")?,
        tags: strings("tags")?,
        any_tags: strings("anyTags")?,
        owner_ids,
    })
}

fn parse_date(value: &Value, field: &str) -> Result<DateTime<Utc>, ValidationError> {
    value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.with_timezone(&Utc))
        .ok_or_else(|| ValidationError::new(field, DATE_MSG))
}

/// An array of ObjectId strings, deduplicated (first occurrence kept).
fn object_id_array(value: &Value, field: &str) -> Result<Vec<ObjectId>, ValidationError> {
    let items = value
        .as_array()
        .ok_or_else(|| ValidationError::new(field, OBJECT_ID_ARRAY_MSG))?;
    check_list_len(items.len(), field)?;
    let ids = items
        .iter()
        .enumerate()
        .map(|(i, v)| parse_object_id(v, &field_path(field, &format!("[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(dedupe(ids))
}

/// An array of strings, deduplicated (first occurrence kept).
fn string_list(value: &Value, field: &str) -> Result<Vec<String>, ValidationError> {
    let items = value
        .as_array()
        .ok_or_else(|| ValidationError::new(field, STRING_ARRAY_MSG))?;
    check_list_len(items.len(), field)?;
    let strings = items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let at = || field_path(field, &format!("[{i}]"));
            let s = v
                .as_str()
                .ok_or_else(|| ValidationError::new(at(), "must be a string"))?;
            check_string_len(s, &at())?;
            Ok(s.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(dedupe(strings))
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
