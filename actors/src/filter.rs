//! The filter shared by every command: validated from request JSON, turned into a MongoDB query.
//!
//! Values from a request never reach MongoDB as they came: they are parsed into
//! typed fields (ObjectIds, dates, strings) and the query is built from those.

use std::collections::HashMap;

use bson::{doc, oid::ObjectId, Bson, Document};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ValidationError;

/// Which collection a filter targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PipelineType {
    /// `contacts`.
    #[default]
    Contact,
    /// `applications`.
    Application,
}

impl PipelineType {
    /// The collection name.
    pub fn collection(self) -> &'static str {
        match self {
            PipelineType::Contact => "contacts",
            PipelineType::Application => "applications",
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineType::Contact => "Contact",
            PipelineType::Application => "Application",
        }
    }
}

/// Owner scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerFilter {
    /// `ownerId` set.
    Owned,
    /// `ownerId` null or missing.
    Unowned,
}

/// `advancedParams`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdvancedParams {
    /// `createdAt >= createdAfter`.
    pub created_after: Option<DateTime<Utc>>,
    /// `createdAt < createdBefore`.
    pub created_before: Option<DateTime<Utc>>,
    /// Contact has all of these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Contact has at least one of these tags.
    #[serde(default)]
    pub any_tags: Vec<String>,
    /// Contact's owner is one of these.
    #[serde(default)]
    pub owner_ids: Vec<ObjectId>,
}

/// A validated filter (stored in job records).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    /// Stages (ignored when `org_wide`).
    #[serde(default)]
    pub stage_ids: Vec<ObjectId>,
    /// Whole organisation.
    #[serde(default)]
    pub org_wide: bool,
    /// Contacts or applications.
    #[serde(default)]
    pub pipeline_type: PipelineType,
    /// Owner scope.
    pub owner_filter: Option<OwnerFilter>,
    /// Extra conditions.
    #[serde(default)]
    pub advanced: AdvancedParams,
    /// At most this many rows (exports).
    pub limit: Option<u64>,
}

/// How to parse a filter.
#[derive(Debug, Clone, Copy)]
pub struct ParseOptions<'a> {
    /// Field path prefix: `filter` for commands, `` for HTTP bodies.
    pub prefix: &'a str,
    /// Whether `limit` is accepted (exports only).
    pub allow_limit: bool,
}

const TOP_KEYS: [&str; 6] = [
    "stageIds",
    "orgWide",
    "pipelineType",
    "ownerFilter",
    "advancedParams",
    "limit",
];
const ADVANCED_KEYS: [&str; 5] = ["createdAfter", "createdBefore", "tags", "anyTags", "ownerIds"];
const MAX_LIMIT: u64 = 100_000_000;

/// Joins a prefix and a key into a field path.
pub fn field_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Parses a 24-hex ObjectId string.
pub fn parse_object_id(value: &Value, field: &str) -> Result<ObjectId, ValidationError> {
    value
        .as_str()
        .filter(|s| s.len() == 24)
        .and_then(|s| ObjectId::parse_str(s).ok())
        .ok_or_else(|| ValidationError::new(field, "must be a 24-hex ObjectId string"))
}

fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

fn array<'a>(v: &'a Value, field: &str, what: &str) -> Result<&'a Vec<Value>, ValidationError> {
    v.as_array()
        .ok_or_else(|| ValidationError::new(field, format!("must be an array of {what}")))
}

fn ids(v: &Value, field: &str) -> Result<Vec<ObjectId>, ValidationError> {
    let mut out = Vec::new();
    for (i, x) in array(v, field, "24-hex ObjectId strings")?.iter().enumerate() {
        let id = parse_object_id(x, &format!("{field}[{i}]"))?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, ValidationError> {
    array(v, field, "strings")?
        .iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_str()
                .map(String::from)
                .ok_or_else(|| ValidationError::new(format!("{field}[{i}]"), "must be a string"))
        })
        .collect()
}

fn date(v: &Value, field: &str) -> Result<DateTime<Utc>, ValidationError> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.with_timezone(&Utc))
        .ok_or_else(|| ValidationError::new(field, "must be an RFC 3339 date-time string"))
}

fn unknown_key(obj: &Map<String, Value>, allowed: &[&str], prefix: &str) -> Result<(), ValidationError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ValidationError::new(field_path(prefix, k), "unknown key")),
        None => Ok(()),
    }
}

impl Filter {
    /// Validates `value`, the filter object.
    pub fn from_json(value: &Value, opts: ParseOptions<'_>) -> Result<Filter, ValidationError> {
        let p = opts.prefix;
        let whole = if p.is_empty() { "body" } else { p };
        let obj = value
            .as_object()
            .ok_or_else(|| ValidationError::new(whole, "must be a JSON object"))?;
        unknown_key(obj, &TOP_KEYS, p)?;
        let f = |k: &str| field_path(p, k);
        let org_wide = match present(obj.get("orgWide")) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ValidationError::new(f("orgWide"), "must be a boolean")),
        };
        let stage_ids = if org_wide {
            Vec::new()
        } else {
            let ids = match present(obj.get("stageIds")) {
                None => Vec::new(),
                Some(v) => ids(v, &f("stageIds"))?,
            };
            if ids.is_empty() {
                return Err(ValidationError::new(
                    f("stageIds"),
                    "must be a non-empty array unless orgWide is true",
                ));
            }
            ids
        };
        let pipeline_type = match present(obj.get("pipelineType")) {
            None => PipelineType::Contact,
            Some(Value::String(s)) if s == "Contact" => PipelineType::Contact,
            Some(Value::String(s)) if s == "Application" => PipelineType::Application,
            Some(_) => {
                return Err(ValidationError::new(
                    f("pipelineType"),
                    "must be \"Contact\" or \"Application\"",
                ))
            }
        };
        let owner_filter = match present(obj.get("ownerFilter")) {
            None => None,
            Some(Value::String(s)) if s == "owned" => Some(OwnerFilter::Owned),
            Some(Value::String(s)) if s == "unowned" => Some(OwnerFilter::Unowned),
            Some(_) => {
                return Err(ValidationError::new(
                    f("ownerFilter"),
                    "must be \"owned\" or \"unowned\"",
                ))
            }
        };
        let advanced = match present(obj.get("advancedParams")) {
            None => AdvancedParams::default(),
            Some(v) => parse_advanced(v, &f("advancedParams"))?,
        };
        let limit = match present(obj.get("limit")) {
            None => None,
            Some(_) if !opts.allow_limit => {
                return Err(ValidationError::new(f("limit"), "limit applies only to exports"))
            }
            Some(v) => Some(
                v.as_u64()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ValidationError::new(f("limit"), "must be an integer from 1 to 100000000")
                    })?,
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
    pub fn query(&self, org: ObjectId) -> Document {
        let mut q = doc! {"orgId": org};
        let mut and: Vec<Document> = Vec::new();
        if !self.org_wide {
            q.insert("stageId", doc! {"$in": &self.stage_ids});
        }
        match self.owner_filter {
            Some(OwnerFilter::Owned) => and.push(doc! {"ownerId": {"$ne": Bson::Null}}),
            Some(OwnerFilter::Unowned) => and.push(doc! {"ownerId": Bson::Null}),
            None => {}
        }
        let a = &self.advanced;
        if !a.owner_ids.is_empty() {
            and.push(doc! {"ownerId": {"$in": &a.owner_ids}});
        }
        let mut created = Document::new();
        if let Some(after) = a.created_after {
            created.insert("$gte", bson::DateTime::from_chrono(after));
        }
        if let Some(before) = a.created_before {
            created.insert("$lt", bson::DateTime::from_chrono(before));
        }
        if !created.is_empty() {
            q.insert("createdAt", created);
        }
        if !a.tags.is_empty() {
            and.push(doc! {"tags": {"$all": &a.tags}});
        }
        if !a.any_tags.is_empty() {
            and.push(doc! {"tags": {"$in": &a.any_tags}});
        }
        match and.len() {
            0 => {}
            1 => {
                for (k, v) in and.remove(0) {
                    q.insert(k, v);
                }
            }
            _ => {
                q.insert("$and", and);
            }
        }
        q
    }
}

fn parse_advanced(v: &Value, prefix: &str) -> Result<AdvancedParams, ValidationError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ValidationError::new(prefix, "must be a JSON object"))?;
    unknown_key(obj, &ADVANCED_KEYS, prefix)?;
    let f = |k: &str| field_path(prefix, k);
    let mut a = AdvancedParams::default();
    if let Some(v) = present(obj.get("createdAfter")) {
        a.created_after = Some(date(v, &f("createdAfter"))?);
    }
    if let Some(v) = present(obj.get("createdBefore")) {
        a.created_before = Some(date(v, &f("createdBefore"))?);
    }
    if let Some(v) = present(obj.get("tags")) {
        a.tags = strings(v, &f("tags"))?;
    }
    if let Some(v) = present(obj.get("anyTags")) {
        a.any_tags = strings(v, &f("anyTags"))?;
    }
    if let Some(v) = present(obj.get("ownerIds")) {
        a.owner_ids = ids(v, &f("ownerIds"))?;
    }
    Ok(a)
}

/// The filter of the query-string endpoint (seed 000): `stageIds` comma-separated,
/// `advancedParams` a JSON string (malformed JSON is ignored, as documented there;
/// well-formed JSON is validated like any filter).
pub fn filter_from_query_params(params: &HashMap<String, String>) -> Result<Filter, ValidationError> {
    let mut obj = Map::new();
    if let Some(s) = params.get("stageIds") {
        let ids: Vec<Value> = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| Value::String(p.to_string()))
            .collect();
        if !ids.is_empty() {
            obj.insert("stageIds".into(), Value::Array(ids));
        }
    }
    if let Some(s) = params.get("orgWide").filter(|s| !s.is_empty()) {
        let b = match s.as_str() {
            "true" => true,
            "false" => false,
            _ => return Err(ValidationError::new("orgWide", "must be \"true\" or \"false\"")),
        };
        obj.insert("orgWide".into(), Value::Bool(b));
    }
    for key in ["pipelineType", "ownerFilter"] {
        if let Some(s) = params.get(key).filter(|s| !s.is_empty()) {
            obj.insert(key.into(), Value::String(s.clone()));
        }
    }
    if let Some(s) = params.get("advancedParams") {
        if let Ok(v) = serde_json::from_str::<Value>(s) {
            obj.insert("advancedParams".into(), v);
        }
    }
    if let Some(s) = params.get("limit").filter(|s| !s.is_empty()) {
        let n: u64 = s
            .parse()
            .map_err(|_| ValidationError::new("limit", "must be an integer from 1 to 100000000"))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const S1: &str = "64b2c3d4e5f60012345678aa";
    const S2: &str = "64b2c3d4e5f60012345678ab";

    fn cmd(v: Value) -> Result<Filter, ValidationError> {
        Filter::from_json(&v, ParseOptions { prefix: "filter", allow_limit: true })
    }

    fn field(v: Value) -> String {
        cmd(v).unwrap_err().field
    }

    #[test]
    fn errors_name_their_field() {
        assert_eq!(field(json!({})), "filter.stageIds");
        assert_eq!(field(json!({"stageIds": []})), "filter.stageIds");
        assert_eq!(field(json!({"stageIds": [S1, "x"]})), "filter.stageIds[1]");
        assert_eq!(field(json!({"stageIds": [{"$ne": null}]})), "filter.stageIds[0]");
        assert_eq!(field(json!({"stageIds": S1})), "filter.stageIds");
        assert_eq!(field(json!({"orgWide": 1})), "filter.orgWide");
        assert_eq!(field(json!({"orgWide": true, "$where": "1"})), "filter.$where");
        assert_eq!(field(json!({"orgWide": true, "pipelineType": "Deal"})), "filter.pipelineType");
        assert_eq!(field(json!({"orgWide": true, "ownerFilter": "all"})), "filter.ownerFilter");
        assert_eq!(field(json!({"orgWide": true, "advancedParams": []})), "filter.advancedParams");
        assert_eq!(
            field(json!({"orgWide": true, "advancedParams": {"$where": "sleep(1)"}})),
            "filter.advancedParams.$where"
        );
        assert_eq!(
            field(json!({"orgWide": true, "advancedParams": {"createdAfter": {"$gt": 1}}})),
            "filter.advancedParams.createdAfter"
        );
        assert_eq!(
            field(json!({"orgWide": true, "advancedParams": {"createdBefore": "2026-13-01"}})),
            "filter.advancedParams.createdBefore"
        );
        assert_eq!(
            field(json!({"orgWide": true, "advancedParams": {"tags": ["a", {"$ne": 1}]}})),
            "filter.advancedParams.tags[1]"
        );
        assert_eq!(
            field(json!({"orgWide": true, "advancedParams": {"anyTags": "a"}})),
            "filter.advancedParams.anyTags"
        );
        assert_eq!(
            field(json!({"orgWide": true, "advancedParams": {"ownerIds": ["nope"]}})),
            "filter.advancedParams.ownerIds[0]"
        );
        assert_eq!(field(json!({"orgWide": true, "limit": 0})), "filter.limit");
        assert_eq!(field(json!({"orgWide": true, "limit": 1.5})), "filter.limit");
        assert_eq!(field(json!("x")), "filter");
        let http = Filter::from_json(&json!({"stageIds": ["bad"]}), ParseOptions { prefix: "", allow_limit: false });
        assert_eq!(http.unwrap_err().field, "stageIds[0]");
        let del = Filter::from_json(&json!({"orgWide": true, "limit": 5}), ParseOptions { prefix: "", allow_limit: false });
        assert_eq!(del.unwrap_err().field, "limit");
    }

    #[test]
    fn org_wide_ignores_stage_ids() {
        let f = cmd(json!({"orgWide": true, "stageIds": ["garbage"]})).unwrap();
        assert!(f.stage_ids.is_empty());
        let org = ObjectId::new();
        assert_eq!(f.query(org), doc! {"orgId": org});
    }

    #[test]
    fn queries_are_built_from_typed_values() {
        let org = ObjectId::new();
        let owner = ObjectId::new();
        let f = cmd(json!({
            "stageIds": [S1, S2, S1], "ownerFilter": "owned",
            "advancedParams": {"createdAfter": "2026-01-01T00:00:00.000Z", "createdBefore": "2026-02-01T00:00:00Z",
                               "tags": ["vip"], "anyTags": ["a", "b"], "ownerIds": [owner.to_hex()]}
        }))
        .unwrap();
        let s1 = ObjectId::parse_str(S1).unwrap();
        let s2 = ObjectId::parse_str(S2).unwrap();
        let after = bson::DateTime::from_millis(1_767_225_600_000);
        let before = bson::DateTime::from_millis(1_769_904_000_000);
        assert_eq!(
            f.query(org),
            doc! {
                "orgId": org, "stageId": {"$in": [s1, s2]},
                "createdAt": {"$gte": after, "$lt": before},
                "$and": [
                    {"ownerId": {"$ne": null}}, {"ownerId": {"$in": [owner]}},
                    {"tags": {"$all": ["vip"]}}, {"tags": {"$in": ["a", "b"]}},
                ],
            }
        );
        let unowned = cmd(json!({"stageIds": [S1], "ownerFilter": "unowned"})).unwrap();
        assert_eq!(unowned.query(org), doc! {"orgId": org, "stageId": {"$in": [s1]}, "ownerId": null});
    }

    #[test]
    fn a_dollar_string_is_only_ever_a_value() {
        let org = ObjectId::new();
        let f = cmd(json!({"orgWide": true, "advancedParams": {"tags": ["$where"]}})).unwrap();
        assert_eq!(f.query(org), doc! {"orgId": org, "tags": {"$all": ["$where"]}});
    }

    #[test]
    fn round_trips_through_bson() {
        let f = cmd(json!({"stageIds": [S1], "pipelineType": "Application", "ownerFilter": "unowned", "limit": 10,
                           "advancedParams": {"createdAfter": "2026-01-01T00:00:00.000Z", "tags": ["x"]}}))
        .unwrap();
        let d = bson::to_document(&f).unwrap();
        let back: Filter = bson::from_document(d).unwrap();
        assert_eq!(back, f);
        assert_eq!(back.pipeline_type.collection(), "applications");
    }

    #[test]
    fn query_params_follow_seed_000() {
        let p = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let f = filter_from_query_params(&p(&[("stageIds", &format!("{S1},,{S2}")), ("advancedParams", "{not json")])).unwrap();
        assert_eq!(f.stage_ids.len(), 2);
        assert_eq!(f.advanced, AdvancedParams::default());
        assert_eq!(filter_from_query_params(&p(&[])).unwrap_err().field, "stageIds");
        let f = filter_from_query_params(&p(&[("orgWide", "true"), ("ownerFilter", "")])).unwrap();
        assert!(f.org_wide && f.owner_filter.is_none());
        let e = filter_from_query_params(&p(&[("orgWide", "true"), ("advancedParams", r#"{"$where":"1"}"#)])).unwrap_err();
        assert_eq!(e.field, "advancedParams.$where");
    }
}
