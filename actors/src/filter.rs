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
    let strings = items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                ValidationError::new(field_path(field, &format!("[{i}]")), "must be a string")
            })
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
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    const S1: &str = "64b2c3d4e5f60012345678aa";
    const S2: &str = "64b2c3d4e5f60012345678bb";
    const O1: &str = "64b2c3d4e5f60012345678cc";
    const O2: &str = "64b2c3d4e5f60012345678dd";
    const ORG: &str = "64b2c3d4e5f600123456780f";

    fn oid(s: &str) -> ObjectId {
        ObjectId::parse_str(s).unwrap()
    }

    fn org() -> ObjectId {
        oid(ORG)
    }

    fn parse(v: &Value, prefix: &str, allow_limit: bool) -> Result<Filter, ValidationError> {
        Filter::from_json(
            v,
            ParseOptions {
                prefix,
                allow_limit,
            },
        )
    }

    /// Parses as a NATS delete (prefix "filter", no limit).
    fn ok(v: Value) -> Filter {
        parse(&v, "filter", false).unwrap()
    }

    /// Parses as an export (limit allowed).
    fn ok_export(v: Value) -> Filter {
        parse(&v, "filter", true).unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn bdt(s: &str) -> bson::DateTime {
        bson::DateTime::from_chrono(utc(s))
    }

    /// Exact document comparison, key order included.
    fn assert_doc(actual: &Document, expected: &Document) {
        assert_eq!(actual, expected);
        assert_eq!(actual.to_string(), expected.to_string());
    }

    /// Asserts `v` fails with `field` under both prefixes (and "field" under the
    /// NATS prefix) and that the message contains `msg`.
    fn assert_err(v: Value, allow_limit: bool, field: &str, msg: &str) {
        for (prefix, expected) in [
            ("filter", format!("filter.{field}")),
            ("", field.to_string()),
        ] {
            let e = parse(&v, prefix, allow_limit)
                .expect_err(&format!("expected an error for {v} with prefix {prefix:?}"));
            assert_eq!(e.field, expected, "field for {v} with prefix {prefix:?}");
            assert!(
                e.message.contains(msg),
                "message {:?} for {v} should contain {msg:?}",
                e.message
            );
            assert!(
                e.message.starts_with(|c: char| c.is_ascii_lowercase()),
                "message starts lowercase: {:?}",
                e.message
            );
        }
    }

    // ---------- helpers ----------

    #[test]
    fn field_path_joins() {
        assert_eq!(field_path("filter", "stageIds"), "filter.stageIds");
        assert_eq!(field_path("", "stageIds"), "stageIds");
        assert_eq!(field_path("filter.stageIds", "[1]"), "filter.stageIds[1]");
        assert_eq!(field_path("stageIds", "[0]"), "stageIds[0]");
        assert_eq!(field_path("", "[0]"), "[0]");
        assert_eq!(field_path("filter", ""), "filter");
        assert_eq!(
            field_path(&field_path("filter", "advancedParams"), "tags"),
            "filter.advancedParams.tags"
        );
    }

    #[test]
    fn parse_object_id_accepts_24_hex() {
        assert_eq!(parse_object_id(&json!(S1), "x").unwrap(), oid(S1));
        assert_eq!(
            parse_object_id(&json!(S1.to_uppercase()), "x").unwrap(),
            oid(S1)
        );
    }

    #[test]
    fn parse_object_id_rejects_everything_else() {
        let bad = [
            json!("64b2c3d4e5f60012345678a"),   // 23 chars
            json!("64b2c3d4e5f60012345678aaa"), // 25 chars
            json!("64b2c3d4e5f60012345678ag"),  // non-hex
            json!(" 64b2c3d4e5f60012345678a"),  // space
            json!("64b2c3d4e5f6001234567８"),   // non-ascii
            json!(""),
            json!(null),
            json!(12),
            json!(true),
            json!([S1]),
            json!({ "$oid": S1 }),
            json!({ "$ne": null }),
        ];
        for v in bad {
            let e = parse_object_id(&v, "orgId").expect_err(&v.to_string());
            assert_eq!(
                e,
                ValidationError::new("orgId", "must be a 24-hex ObjectId string")
            );
        }
    }

    #[test]
    fn pipeline_type_names() {
        assert_eq!(PipelineType::default(), PipelineType::Contact);
        assert_eq!(PipelineType::Contact.collection(), "contacts");
        assert_eq!(PipelineType::Application.collection(), "applications");
        assert_eq!(PipelineType::Contact.as_str(), "Contact");
        assert_eq!(PipelineType::Application.as_str(), "Application");
        assert_eq!(
            PipelineType::parse("Application"),
            Some(PipelineType::Application)
        );
        assert_eq!(PipelineType::parse("application"), None);
        assert_eq!(OwnerFilter::Owned.as_str(), "owned");
        assert_eq!(OwnerFilter::parse("unowned"), Some(OwnerFilter::Unowned));
        assert_eq!(OwnerFilter::parse("Owned"), None);
    }

    // ---------- parsing: accepted filters ----------

    #[test]
    fn parses_the_contract_example() {
        let f = ok_export(json!({
            "stageIds": [S1], "orgWide": false, "pipelineType": "Contact",
            "ownerFilter": "owned", "advancedParams": { "createdAfter": "2026-01-01T00:00:00.000Z" },
            "limit": 50000
        }));
        assert_eq!(
            f,
            Filter {
                stage_ids: vec![oid(S1)],
                org_wide: false,
                pipeline_type: PipelineType::Contact,
                owner_filter: Some(OwnerFilter::Owned),
                advanced: AdvancedParams {
                    created_after: Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()),
                    ..AdvancedParams::default()
                },
                limit: Some(50000),
            }
        );
    }

    #[test]
    fn minimal_filter_gets_defaults() {
        let f = ok(json!({ "stageIds": [S1] }));
        assert_eq!(
            f,
            Filter {
                stage_ids: vec![oid(S1)],
                ..Filter::default()
            }
        );
    }

    #[test]
    fn nulls_mean_not_given() {
        let f = ok(json!({
            "stageIds": [S1], "orgWide": null, "pipelineType": null, "ownerFilter": null,
            "advancedParams": null, "limit": null
        }));
        assert_eq!(f.limit, None);
        assert!(!f.org_wide);
        assert_eq!(f.pipeline_type, PipelineType::Contact);
        assert_eq!(f.owner_filter, None);
        assert_eq!(f.advanced, AdvancedParams::default());
        let f = ok(json!({ "stageIds": [S1], "advancedParams": {
            "createdAfter": null, "createdBefore": null, "tags": null, "anyTags": null, "ownerIds": null
        }}));
        assert_eq!(f.advanced, AdvancedParams::default());
    }

    #[test]
    fn all_fields_parse() {
        let f = ok_export(json!({
            "stageIds": [S1, S2], "pipelineType": "Application", "ownerFilter": "unowned",
            "advancedParams": {
                "createdAfter": "2026-01-01T02:00:00+02:00",
                "createdBefore": "2026-02-01T00:00:00.123456789Z",
                "tags": ["vip", "new"], "anyTags": ["a"], "ownerIds": [O1, O2]
            },
            "limit": 100000000
        }));
        assert_eq!(f.stage_ids, vec![oid(S1), oid(S2)]);
        assert_eq!(f.pipeline_type, PipelineType::Application);
        assert_eq!(f.owner_filter, Some(OwnerFilter::Unowned));
        assert_eq!(
            f.advanced.created_after,
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap())
        );
        assert_eq!(
            f.advanced.created_before,
            Some(utc("2026-02-01T00:00:00.123456789Z"))
        );
        assert_eq!(f.advanced.tags, vec!["vip", "new"]);
        assert_eq!(f.advanced.any_tags, vec!["a"]);
        assert_eq!(f.advanced.owner_ids, vec![oid(O1), oid(O2)]);
        assert_eq!(f.limit, Some(MAX_LIMIT));
        assert_eq!(
            ok_export(json!({ "stageIds": [S1], "limit": 1 })).limit,
            Some(1)
        );
    }

    #[test]
    fn duplicates_are_removed_keeping_order() {
        let f = ok(json!({
            "stageIds": [S2, S1, S2, S1.to_uppercase()],
            "advancedParams": { "tags": ["b", "a", "b"], "anyTags": ["x", "x"], "ownerIds": [O1, O1] }
        }));
        assert_eq!(f.stage_ids, vec![oid(S2), oid(S1)]);
        assert_eq!(f.advanced.tags, vec!["b", "a"]);
        assert_eq!(f.advanced.any_tags, vec!["x"]);
        assert_eq!(f.advanced.owner_ids, vec![oid(O1)]);
    }

    #[test]
    fn org_wide_ignores_stage_ids_entirely() {
        for stage_ids in [
            json!([S1]),
            json!([]),
            json!(null),
            json!("not an array"),
            json!([{ "$ne": null }]),
            json!({ "$exists": true }),
        ] {
            let f = ok(json!({ "orgWide": true, "stageIds": stage_ids }));
            assert!(f.org_wide);
            assert!(
                f.stage_ids.is_empty(),
                "stageIds {stage_ids} must be ignored"
            );
            assert_doc(&f.query(org()), &doc! { "orgId": org() });
        }
        let f = ok(json!({ "orgWide": true }));
        assert!(f.org_wide && f.stage_ids.is_empty());
    }

    #[test]
    fn empty_advanced_arrays_mean_no_constraint() {
        let f = ok(json!({ "stageIds": [S1], "advancedParams": {
            "tags": [], "anyTags": [], "ownerIds": []
        }}));
        assert_eq!(f.advanced, AdvancedParams::default());
        assert_doc(
            &f.query(org()),
            &doc! { "orgId": org(), "stageId": { "$in": [oid(S1)] } },
        );
        let f = ok(json!({ "stageIds": [S1], "advancedParams": {} }));
        assert_eq!(f.advanced, AdvancedParams::default());
    }

    #[test]
    fn operator_like_tag_strings_stay_literal_values() {
        let f = ok(
            json!({ "stageIds": [S1], "advancedParams": { "tags": ["$where", "{\"$ne\":null}"] } }),
        );
        assert_eq!(f.advanced.tags, vec!["$where", "{\"$ne\":null}"]);
        assert_doc(
            &f.query(org()),
            &doc! {
                "orgId": org(), "stageId": { "$in": [oid(S1)] },
                "tags": { "$all": ["$where", "{\"$ne\":null}"] }
            },
        );
    }

    // ---------- parsing: validation errors ----------

    #[test]
    fn filter_must_be_an_object() {
        for v in [json!(null), json!([]), json!("x"), json!(1), json!(true)] {
            let e = parse(&v, "filter", true).unwrap_err();
            assert_eq!(e, ValidationError::new("filter", "must be a JSON object"));
            let e = parse(&v, "", true).unwrap_err();
            assert_eq!(e, ValidationError::new("body", "must be a JSON object"));
        }
    }

    #[test]
    fn unknown_top_level_keys_are_refused() {
        assert_err(
            json!({ "stageIds": [S1], "stageId": S1 }),
            true,
            "stageId",
            "unknown key",
        );
        assert_err(
            json!({ "stageIds": [S1], "tags": ["a"] }),
            true,
            "tags",
            "unknown key",
        );
        assert_err(
            json!({ "stageIds": [S1], "dryRun": true }),
            true,
            "dryRun",
            "unknown key",
        );
        // Unknown keys are refused even when orgWide would make the filter broad.
        assert_err(
            json!({ "orgWide": true, "orgId": ORG }),
            true,
            "orgId",
            "unknown key",
        );
    }

    #[test]
    fn operator_injection_at_top_level_is_refused() {
        assert_err(
            json!({ "stageIds": [S1], "$where": "this.a == 1" }),
            true,
            "$where",
            "unknown key",
        );
        assert_err(
            json!({ "orgWide": true, "$or": [{}] }),
            false,
            "$or",
            "unknown key",
        );
        assert_err(
            json!({ "stageIds": { "$ne": null } }),
            false,
            "stageIds",
            "must be an array of 24-hex ObjectId strings",
        );
        assert_err(
            json!({ "stageIds": [{ "$ne": null }] }),
            false,
            "stageIds[0]",
            "must be a 24-hex ObjectId string",
        );
        assert_err(
            json!({ "stageIds": [S1, { "$gt": "" }] }),
            false,
            "stageIds[1]",
            "must be a 24-hex ObjectId string",
        );
        assert_err(
            json!({ "stageIds": [S1], "orgWide": { "$ne": false } }),
            false,
            "orgWide",
            "must be a boolean",
        );
        assert_err(
            json!({ "stageIds": [S1], "pipelineType": { "$ne": "x" } }),
            false,
            "pipelineType",
            "must be \"Contact\" or \"Application\"",
        );
    }

    #[test]
    fn stage_ids_errors() {
        let required = "must be a non-empty array unless orgWide is true";
        assert_err(json!({}), false, "stageIds", required);
        assert_err(json!({ "stageIds": null }), false, "stageIds", required);
        assert_err(json!({ "stageIds": [] }), false, "stageIds", required);
        assert_err(
            json!({ "stageIds": [], "orgWide": false }),
            false,
            "stageIds",
            required,
        );
        assert_err(
            json!({ "stageIds": [], "orgWide": null }),
            false,
            "stageIds",
            required,
        );
        assert_err(
            json!({ "stageIds": S1 }),
            false,
            "stageIds",
            "must be an array of 24-hex ObjectId strings",
        );
        for bad in [
            json!("64b2c3d4e5f60012345678a"),
            json!("64b2c3d4e5f60012345678zz"),
            json!(5),
            json!(null),
            json!([S1]),
        ] {
            assert_err(
                json!({ "stageIds": [S1, bad] }),
                false,
                "stageIds[1]",
                "must be a 24-hex ObjectId string",
            );
        }
    }

    #[test]
    fn org_wide_errors() {
        for bad in [json!("true"), json!(1), json!([]), json!({})] {
            assert_err(
                json!({ "stageIds": [S1], "orgWide": bad }),
                false,
                "orgWide",
                "must be a boolean",
            );
        }
    }

    #[test]
    fn pipeline_type_errors() {
        for bad in [
            json!("contact"),
            json!("Contacts"),
            json!(""),
            json!(1),
            json!(["Contact"]),
        ] {
            let v = json!({ "stageIds": [S1], "pipelineType": bad });
            let e = parse(&v, "filter", false).unwrap_err();
            assert_eq!(
                e,
                ValidationError::new(
                    "filter.pipelineType",
                    "must be \"Contact\" or \"Application\""
                )
            );
            assert_eq!(parse(&v, "", false).unwrap_err().field, "pipelineType");
        }
    }

    #[test]
    fn owner_filter_errors() {
        for bad in [
            json!("all"),
            json!("Owned"),
            json!(""),
            json!(true),
            json!({ "$ne": null }),
        ] {
            assert_err(
                json!({ "stageIds": [S1], "ownerFilter": bad }),
                false,
                "ownerFilter",
                "must be \"owned\" or \"unowned\"",
            );
        }
    }

    #[test]
    fn advanced_params_must_be_an_object() {
        for bad in [json!("x"), json!([]), json!(5), json!(true)] {
            assert_err(
                json!({ "stageIds": [S1], "advancedParams": bad }),
                false,
                "advancedParams",
                "must be an object",
            );
        }
    }

    #[test]
    fn advanced_params_unknown_keys_and_operators_are_refused() {
        for key in ["$where", "$or", "stageIds", "createdAt", "tag", "ownerId"] {
            let mut adv = Map::new();
            adv.insert(key.to_string(), json!("this.x == 1"));
            assert_err(
                json!({ "stageIds": [S1], "advancedParams": adv }),
                false,
                &format!("advancedParams.{key}"),
                "unknown key",
            );
        }
    }

    #[test]
    fn advanced_date_errors() {
        for key in ["createdAfter", "createdBefore"] {
            for bad in [
                json!({ "$gt": 1 }),
                json!({ "$date": "2026-01-01T00:00:00Z" }),
                json!(1_700_000_000_000_i64),
                json!(true),
                json!(["2026-01-01T00:00:00Z"]),
                json!("2026-01-01"),
                json!("2026-01-01 00:00:00"),
                json!("2026-13-01T00:00:00Z"),
                json!("2026-02-30T00:00:00Z"),
                json!("2026-01-01T00:00:00"),
                json!("yesterday"),
                json!(""),
            ] {
                assert_err(
                    json!({ "stageIds": [S1], "advancedParams": { key: bad } }),
                    false,
                    &format!("advancedParams.{key}"),
                    "must be an RFC 3339 date-time string",
                );
            }
        }
    }

    #[test]
    fn advanced_tag_errors() {
        for key in ["tags", "anyTags"] {
            for bad in [json!("vip"), json!({ "$in": ["a"] }), json!(1)] {
                assert_err(
                    json!({ "stageIds": [S1], "advancedParams": { key: bad } }),
                    false,
                    &format!("advancedParams.{key}"),
                    "must be an array of strings",
                );
            }
            for (list, idx) in [
                (json!([{ "$ne": null }]), 0),
                (json!(["a", 1]), 1),
                (json!(["a", "b", null]), 2),
                (json!(["a", ["b"]]), 1),
            ] {
                assert_err(
                    json!({ "stageIds": [S1], "advancedParams": { key: list } }),
                    false,
                    &format!("advancedParams.{key}[{idx}]"),
                    "must be a string",
                );
            }
        }
    }

    #[test]
    fn advanced_owner_ids_errors() {
        assert_err(
            json!({ "stageIds": [S1], "advancedParams": { "ownerIds": O1 } }),
            false,
            "advancedParams.ownerIds",
            "must be an array of 24-hex ObjectId strings",
        );
        assert_err(
            json!({ "stageIds": [S1], "advancedParams": { "ownerIds": { "$exists": true } } }),
            false,
            "advancedParams.ownerIds",
            "must be an array of 24-hex ObjectId strings",
        );
        assert_err(
            json!({ "stageIds": [S1], "advancedParams": { "ownerIds": [O1, "nope"] } }),
            false,
            "advancedParams.ownerIds[1]",
            "must be a 24-hex ObjectId string",
        );
        assert_err(
            json!({ "stageIds": [S1], "advancedParams": { "ownerIds": [{ "$ne": null }] } }),
            false,
            "advancedParams.ownerIds[0]",
            "must be a 24-hex ObjectId string",
        );
    }

    #[test]
    fn advanced_params_validated_even_with_org_wide() {
        assert_err(
            json!({ "orgWide": true, "advancedParams": { "$where": "1" } }),
            false,
            "advancedParams.$where",
            "unknown key",
        );
    }

    #[test]
    fn limit_errors() {
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!(10.0),
            json!("10"),
            json!(100_000_001),
            json!(u64::MAX),
            json!({ "$gt": 0 }),
            json!(true),
        ] {
            assert_err(
                json!({ "stageIds": [S1], "limit": bad }),
                true,
                "limit",
                "must be a positive integer no greater than 100000000",
            );
        }
    }

    #[test]
    fn limit_is_refused_on_deletes() {
        for v in [json!(10), json!(0), json!("x")] {
            assert_err(
                json!({ "stageIds": [S1], "limit": v }),
                false,
                "limit",
                "limit applies only to exports",
            );
        }
        // A null limit is no limit.
        assert_eq!(ok(json!({ "stageIds": [S1], "limit": null })).limit, None);
    }

    // ---------- query ----------

    #[test]
    fn query_stage_ids() {
        let f = ok(json!({ "stageIds": [S1, S2] }));
        assert_doc(
            &f.query(org()),
            &doc! { "orgId": org(), "stageId": { "$in": [oid(S1), oid(S2)] } },
        );
    }

    #[test]
    fn query_org_wide() {
        let f = ok(json!({ "orgWide": true, "pipelineType": "Application" }));
        assert_doc(&f.query(org()), &doc! { "orgId": org() });
        assert_eq!(f.pipeline_type.collection(), "applications");
    }

    #[test]
    fn query_unvalidated_default_matches_nothing() {
        // Not org-wide and no stages: never produced by validation, and must not select everything.
        assert_doc(
            &Filter::default().query(org()),
            &doc! { "orgId": org(), "stageId": { "$in": [] } },
        );
    }

    #[test]
    fn query_owner_filters() {
        let owned = ok(json!({ "stageIds": [S1], "ownerFilter": "owned" }));
        assert_doc(
            &owned.query(org()),
            &doc! { "orgId": org(), "stageId": { "$in": [oid(S1)] }, "ownerId": { "$ne": null } },
        );
        let unowned = ok(json!({ "orgWide": true, "ownerFilter": "unowned" }));
        assert_doc(
            &unowned.query(org()),
            &doc! { "orgId": org(), "ownerId": null },
        );
        let ids = ok(json!({ "orgWide": true, "advancedParams": { "ownerIds": [O1, O2] } }));
        assert_doc(
            &ids.query(org()),
            &doc! { "orgId": org(), "ownerId": { "$in": [oid(O1), oid(O2)] } },
        );
    }

    #[test]
    fn query_owner_filter_and_owner_ids_use_and() {
        let f = ok(json!({
            "orgWide": true, "ownerFilter": "owned", "advancedParams": { "ownerIds": [O1] }
        }));
        assert_doc(
            &f.query(org()),
            &doc! { "orgId": org(), "$and": [
                { "ownerId": { "$ne": null } },
                { "ownerId": { "$in": [oid(O1)] } },
            ]},
        );
        let f = ok(json!({
            "orgWide": true, "ownerFilter": "unowned", "advancedParams": { "ownerIds": [O1] }
        }));
        assert_doc(
            &f.query(org()),
            &doc! { "orgId": org(), "$and": [
                { "ownerId": null },
                { "ownerId": { "$in": [oid(O1)] } },
            ]},
        );
    }

    #[test]
    fn query_created_range() {
        let f = ok(json!({ "stageIds": [S1], "advancedParams": {
            "createdAfter": "2026-01-01T00:00:00.000Z", "createdBefore": "2026-02-01T01:00:00+01:00"
        }}));
        assert_doc(
            &f.query(org()),
            &doc! {
                "orgId": org(), "stageId": { "$in": [oid(S1)] },
                "createdAt": {
                    "$gte": bdt("2026-01-01T00:00:00Z"),
                    "$lt": bdt("2026-02-01T00:00:00Z"),
                }
            },
        );
        let f = ok(
            json!({ "orgWide": true, "advancedParams": { "createdBefore": "2026-02-01T00:00:00.5Z" } }),
        );
        assert_doc(
            &f.query(org()),
            &doc! { "orgId": org(), "createdAt": { "$lt": bdt("2026-02-01T00:00:00.500Z") } },
        );
        let f = ok(
            json!({ "orgWide": true, "advancedParams": { "createdAfter": "2026-02-01T00:00:00Z" } }),
        );
        assert_doc(
            &f.query(org()),
            &doc! { "orgId": org(), "createdAt": { "$gte": bdt("2026-02-01T00:00:00Z") } },
        );
    }

    #[test]
    fn query_dates_round_up_below_a_millisecond() {
        let f = ok(json!({ "orgWide": true, "advancedParams": {
            "createdAfter": "2026-01-01T00:00:00.0005Z", "createdBefore": "1969-12-31T23:59:59.9995Z"
        }}));
        assert_doc(
            &f.query(org()),
            &doc! { "orgId": org(), "createdAt": {
                "$gte": bdt("2026-01-01T00:00:00.001Z"),
                "$lt": bson::DateTime::from_millis(0),
            }},
        );
    }

    #[test]
    fn query_tags() {
        let all = ok(json!({ "orgWide": true, "advancedParams": { "tags": ["vip", "new"] } }));
        assert_doc(
            &all.query(org()),
            &doc! { "orgId": org(), "tags": { "$all": ["vip", "new"] } },
        );
        let any = ok(json!({ "orgWide": true, "advancedParams": { "anyTags": ["a", "b"] } }));
        assert_doc(
            &any.query(org()),
            &doc! { "orgId": org(), "tags": { "$in": ["a", "b"] } },
        );
        let both = ok(
            json!({ "orgWide": true, "advancedParams": { "tags": ["vip"], "anyTags": ["a", "b"] } }),
        );
        assert_doc(
            &both.query(org()),
            &doc! { "orgId": org(), "$and": [
                { "tags": { "$all": ["vip"] } },
                { "tags": { "$in": ["a", "b"] } },
            ]},
        );
    }

    #[test]
    fn query_everything_shares_one_and() {
        let f = ok_export(json!({
            "stageIds": [S1], "ownerFilter": "owned", "limit": 5,
            "advancedParams": {
                "createdAfter": "2026-01-01T00:00:00Z", "createdBefore": "2026-02-01T00:00:00Z",
                "tags": ["vip"], "anyTags": ["a"], "ownerIds": [O1]
            }
        }));
        assert_doc(
            &f.query(org()),
            &doc! {
                "orgId": org(),
                "stageId": { "$in": [oid(S1)] },
                "createdAt": { "$gte": bdt("2026-01-01T00:00:00Z"), "$lt": bdt("2026-02-01T00:00:00Z") },
                "$and": [
                    { "ownerId": { "$ne": null } },
                    { "ownerId": { "$in": [oid(O1)] } },
                    { "tags": { "$all": ["vip"] } },
                    { "tags": { "$in": ["a"] } },
                ],
            },
        );
        let f = ok(json!({
            "stageIds": [S1], "ownerFilter": "unowned",
            "advancedParams": { "tags": ["vip"], "anyTags": ["a"] }
        }));
        assert_doc(
            &f.query(org()),
            &doc! {
                "orgId": org(), "stageId": { "$in": [oid(S1)] }, "ownerId": null,
                "$and": [ { "tags": { "$all": ["vip"] } }, { "tags": { "$in": ["a"] } } ],
            },
        );
    }

    #[test]
    fn query_has_no_operator_keys_from_input() {
        // Whatever the request held, the only keys are ours.
        let f = ok(json!({
            "stageIds": [S1], "ownerFilter": "owned",
            "advancedParams": { "tags": ["$where"], "anyTags": ["$expr"], "ownerIds": [O1] }
        }));
        fn keys(d: &Document, out: &mut Vec<String>) {
            for (k, v) in d {
                out.push(k.clone());
                match v {
                    Bson::Document(d) => keys(d, out),
                    Bson::Array(a) => a.iter().for_each(|x| {
                        if let Bson::Document(d) = x {
                            keys(d, out)
                        }
                    }),
                    _ => {}
                }
            }
        }
        let mut all = Vec::new();
        keys(&f.query(org()), &mut all);
        let allowed = [
            "orgId",
            "stageId",
            "ownerId",
            "tags",
            "createdAt",
            "$in",
            "$ne",
            "$all",
            "$and",
            "$gte",
            "$lt",
        ];
        assert!(all.iter().all(|k| allowed.contains(&k.as_str())), "{all:?}");
    }

    // ---------- storage round trip ----------

    fn full_filter() -> Filter {
        ok_export(json!({
            "stageIds": [S1, S2], "pipelineType": "Application", "ownerFilter": "owned",
            "advancedParams": {
                "createdAfter": "2026-01-01T00:00:00.123456789Z", "createdBefore": "2026-02-01T00:00:00+02:00",
                "tags": ["vip"], "anyTags": ["a", "b"], "ownerIds": [O1]
            },
            "limit": 50000
        }))
    }

    #[test]
    fn round_trips_through_bson() {
        for f in [
            full_filter(),
            Filter::default(),
            ok(json!({ "orgWide": true, "ownerFilter": "unowned" })),
            Filter {
                limit: Some(MAX_LIMIT),
                ..full_filter()
            },
        ] {
            let d = bson::to_document(&f).unwrap();
            let back: Filter = bson::from_document(d.clone()).unwrap();
            assert_eq!(back, f);
            // And through the raw bytes MongoDB stores.
            let bytes = bson::to_vec(&d).unwrap();
            let back: Filter = bson::from_slice(&bytes).unwrap();
            assert_eq!(back, f);
            assert_eq!(back.query(org()), f.query(org()));
        }
    }

    #[test]
    fn stored_shape() {
        let d = bson::to_document(&full_filter()).unwrap();
        assert_eq!(
            d.get_array("stageIds").unwrap(),
            &vec![Bson::ObjectId(oid(S1)), Bson::ObjectId(oid(S2))]
        );
        assert!(!d.get_bool("orgWide").unwrap());
        assert_eq!(d.get_str("pipelineType").unwrap(), "Application");
        assert_eq!(d.get_str("ownerFilter").unwrap(), "owned");
        assert_eq!(d.get_i64("limit").unwrap(), 50000);
        let adv = d.get_document("advanced").unwrap();
        assert_eq!(
            adv.get_str("createdAfter").unwrap(),
            "2026-01-01T00:00:00.123456789Z"
        );
        assert_eq!(
            adv.get_array("ownerIds").unwrap(),
            &vec![Bson::ObjectId(oid(O1))]
        );
    }

    #[test]
    fn reads_sparse_stored_documents() {
        let f: Filter = bson::from_document(doc! { "stageIds": [oid(S1)] }).unwrap();
        assert_eq!(
            f,
            Filter {
                stage_ids: vec![oid(S1)],
                ..Filter::default()
            }
        );
        let f: Filter = bson::from_document(doc! {
            "orgWide": true, "ownerFilter": null, "limit": null, "advanced": { "tags": ["a"] }
        })
        .unwrap();
        assert!(f.org_wide);
        assert_eq!(f.advanced.tags, vec!["a"]);
    }

    #[test]
    fn round_trips_through_serde_json() {
        let f = full_filter();
        let v = serde_json::to_value(&f).unwrap();
        let back: Filter = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
    }

    // ---------- query-string parameters ----------

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn query_params_full() {
        let f = filter_from_query_params(&params(&[
            ("stageIds", &format!(",{S1},,{S2} ,{S1},")),
            ("pipelineType", "Application"),
            ("orgWide", "false"),
            ("ownerFilter", "owned"),
            (
                "advancedParams",
                r#"{"tags":["vip"],"createdAfter":"2026-01-01T00:00:00Z"}"#,
            ),
            ("limit", "25"),
            ("unknown", "ignored"),
            ("$where", "ignored too"),
        ]))
        .unwrap();
        assert_eq!(f.stage_ids, vec![oid(S1), oid(S2)]);
        assert!(!f.org_wide);
        assert_eq!(f.pipeline_type, PipelineType::Application);
        assert_eq!(f.owner_filter, Some(OwnerFilter::Owned));
        assert_eq!(f.advanced.tags, vec!["vip"]);
        assert_eq!(
            f.advanced.created_after,
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap())
        );
        assert_eq!(f.limit, Some(25));
    }

    #[test]
    fn query_params_empty_strings_are_absent() {
        let f = filter_from_query_params(&params(&[
            ("stageIds", S1),
            ("pipelineType", ""),
            ("orgWide", ""),
            ("ownerFilter", ""),
            ("advancedParams", ""),
            ("limit", ""),
        ]))
        .unwrap();
        assert_eq!(
            f,
            Filter {
                stage_ids: vec![oid(S1)],
                ..Filter::default()
            }
        );
    }

    #[test]
    fn query_params_org_wide() {
        let f = filter_from_query_params(&params(&[("orgWide", "true"), ("stageIds", "junk,{")]))
            .unwrap();
        assert!(f.org_wide);
        assert!(f.stage_ids.is_empty());
        assert_doc(&f.query(org()), &doc! { "orgId": org() });
        let e = filter_from_query_params(&params(&[("orgWide", "yes")])).unwrap_err();
        assert_eq!(
            e,
            ValidationError::new("orgWide", "must be \"true\" or \"false\"")
        );
    }

    #[test]
    fn query_params_stage_ids_required_and_validated() {
        let required = ValidationError::new(
            "stageIds",
            "must be a non-empty array unless orgWide is true",
        );
        assert_eq!(
            filter_from_query_params(&HashMap::new()).unwrap_err(),
            required
        );
        assert_eq!(
            filter_from_query_params(&params(&[("stageIds", ",,")])).unwrap_err(),
            required
        );
        let e =
            filter_from_query_params(&params(&[("stageIds", &format!("{S1},bad"))])).unwrap_err();
        assert_eq!(
            e,
            ValidationError::new("stageIds[1]", "must be a 24-hex ObjectId string")
        );
    }

    #[test]
    fn query_params_malformed_advanced_params_are_ignored() {
        for raw in ["{not json", "{\"tags\": [", "tags=vip", "{'tags':['a']}"] {
            let f = filter_from_query_params(&params(&[("stageIds", S1), ("advancedParams", raw)]))
                .unwrap();
            assert_eq!(f.advanced, AdvancedParams::default(), "{raw}");
        }
        let f = filter_from_query_params(&params(&[("stageIds", S1), ("advancedParams", "null")]))
            .unwrap();
        assert_eq!(f.advanced, AdvancedParams::default());
    }

    #[test]
    fn query_params_well_formed_advanced_params_are_validated() {
        let cases = [
            (
                r#"{"$where":"sleep(1000)"}"#,
                "advancedParams.$where",
                "unknown key",
            ),
            (
                r#"{"createdAfter":{"$gt":1}}"#,
                "advancedParams.createdAfter",
                "must be an RFC 3339 date-time string",
            ),
            (
                r#"{"tags":[{"$ne":null}]}"#,
                "advancedParams.tags[0]",
                "must be a string",
            ),
            (
                r#"{"ownerIds":["x"]}"#,
                "advancedParams.ownerIds[0]",
                "must be a 24-hex ObjectId string",
            ),
            ("5", "advancedParams", "must be an object or null"),
            (r#""text""#, "advancedParams", "must be an object or null"),
        ];
        for (raw, field, msg) in cases {
            let e = filter_from_query_params(&params(&[("stageIds", S1), ("advancedParams", raw)]))
                .unwrap_err();
            assert_eq!(e, ValidationError::new(field, msg), "{raw}");
        }
    }

    #[test]
    fn query_params_other_errors() {
        let base = [("stageIds", S1)];
        let with = |k: &'static str, v: &'static str| {
            let mut p = params(&base);
            p.insert(k.into(), v.into());
            filter_from_query_params(&p).unwrap_err()
        };
        let limit = "must be a positive integer no greater than 100000000";
        assert_eq!(with("limit", "abc"), ValidationError::new("limit", limit));
        assert_eq!(with("limit", "-5"), ValidationError::new("limit", limit));
        assert_eq!(with("limit", "1.5"), ValidationError::new("limit", limit));
        assert_eq!(with("limit", "0"), ValidationError::new("limit", limit));
        assert_eq!(
            with("limit", "100000001"),
            ValidationError::new("limit", limit)
        );
        assert_eq!(
            with("pipelineType", "contact"),
            ValidationError::new("pipelineType", "must be \"Contact\" or \"Application\"")
        );
        assert_eq!(
            with("ownerFilter", "mine"),
            ValidationError::new("ownerFilter", "must be \"owned\" or \"unowned\"")
        );
    }
}
