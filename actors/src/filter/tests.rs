//! Unit tests of filter parsing and query building (`filter.rs`).

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
    let f =
        ok(json!({ "stageIds": [S1], "advancedParams": { "tags": ["$where", "{\"$ne\":null}"] } }));
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
    let f =
        filter_from_query_params(&params(&[("orgWide", "true"), ("stageIds", "junk,{")])).unwrap();
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
    let e = filter_from_query_params(&params(&[("stageIds", &format!("{S1},bad"))])).unwrap_err();
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
    let f =
        filter_from_query_params(&params(&[("stageIds", S1), ("advancedParams", "null")])).unwrap();
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
