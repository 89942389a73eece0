//! Unit tests of CSV and NDJSON encoding (`encode.rs`).

use super::*;
use bson::DateTime;
use serde_json::json;

fn oid(n: u8) -> ObjectId {
    ObjectId::from_bytes([n; 12])
}

/// 2026-05-20T10:11:12.345Z
fn created() -> DateTime {
    DateTime::from_millis(1_779_271_872_345)
}

fn names() -> Names {
    let mut n = Names::default();
    n.pipelines.insert(oid(1), "Sales".into());
    n.stages.insert(oid(2), "Won, finally".into());
    n.owners.insert(oid(3), "Olga \"O\" Owner".into());
    n
}

fn contact() -> Document {
    doc! {
        "_id": oid(9),
        "firstName": "Ann",
        "lastName": "Lee",
        "phone": "+14165550100",
        "email": "ann@example.com",
        "pipelineId": oid(1),
        "stageId": oid(2),
        "ownerId": oid(3),
        "tags": ["vip", "new"],
        "customFields": {"plan": "gold", "seats": 5, "active": true},
        "createdAt": created(),
    }
}

fn spec(fields: &[&str]) -> ColumnSpec {
    let v = json!(fields);
    match ColumnSpec::from_json(Some(&v), "fields") {
        Ok(s) => s,
        Err(e) => panic!("{fields:?}: {e}"),
    }
}

fn err(v: serde_json::Value) -> ValidationError {
    ColumnSpec::from_json(Some(&v), "fields").unwrap_err()
}

async fn csv_of(columns: ColumnSpec, docs: &[Document], names: &Names) -> String {
    let enc = Encoder::new(Format::Csv, columns);
    let mut out = enc.header().await.unwrap();
    let n = enc.encode_batch(docs, names, &mut out).await.unwrap();
    assert_eq!(n, docs.len());
    String::from_utf8(out).unwrap()
}

async fn ndjson_of(columns: ColumnSpec, docs: &[Document], names: &Names) -> String {
    let enc = Encoder::new(Format::Ndjson, columns);
    let mut out = enc.header().await.unwrap();
    assert!(out.is_empty());
    let n = enc.encode_batch(docs, names, &mut out).await.unwrap();
    assert_eq!(n, docs.len());
    String::from_utf8(out).unwrap()
}

/// Parses CSV with the `csv` crate; the first record is the header.
fn parse_csv(s: &str) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(s.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

fn parse_lines(s: &str) -> Vec<serde_json::Value> {
    assert!(s.is_empty() || s.ends_with('\n'));
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn format_basics() {
    assert_eq!(Format::default(), Format::Csv);
    assert_eq!(Format::Csv.extension(), "csv");
    assert_eq!(Format::Ndjson.extension(), "ndjson");
    assert_eq!(Format::Csv.content_type(), "text/csv; charset=utf-8");
    assert_eq!(Format::Ndjson.content_type(), "application/x-ndjson");
    let parse =
        |v: serde_json::Value| contact_bulk_protocol::parse::decode_value::<Format>(v, "format");
    assert_eq!(parse(json!("csv")), Ok(Format::Csv));
    assert_eq!(parse(json!("NDJSON")), Ok(Format::Ndjson));
    let e = parse(json!("xlsx")).unwrap_err();
    assert_eq!(e.field, "format");
    assert_eq!(
        serde_json::to_value(Format::Ndjson).unwrap(),
        json!("ndjson")
    );
    let f: Format = serde_json::from_value(json!("csv")).unwrap();
    assert_eq!(f, Format::Csv);
}

#[test]
fn fields_default_when_absent_or_null() {
    let d = ColumnSpec::default_columns();
    assert_eq!(ColumnSpec::from_json(None, "fields").unwrap(), d);
    assert_eq!(
        ColumnSpec::from_json(Some(&json!(null)), "fields").unwrap(),
        d
    );
    assert!(!d.needs_custom_discovery());
    assert!(d.needs_pipeline() && d.needs_stage() && !d.needs_owner());
}

#[test]
fn fields_parse_every_name() {
    let s = spec(&[
        "id",
        "firstName",
        "lastName",
        "fullName",
        "phone",
        "email",
        "pipeline",
        "stage",
        "owner",
        "tags",
        "createdAt",
        "customFields.plan",
        "customFields",
        "customFields.a.b",
    ]);
    assert_eq!(
        s.0,
        vec![
            Column::Id,
            Column::FirstName,
            Column::LastName,
            Column::FullName,
            Column::Phone,
            Column::Email,
            Column::Pipeline,
            Column::Stage,
            Column::Owner,
            Column::Tags,
            Column::CreatedAt,
            Column::Custom("plan".into()),
            Column::AllCustom,
            Column::Custom("a.b".into()),
        ]
    );
    assert!(s.needs_custom_discovery() && s.needs_owner());
    let s = spec(&["email"]);
    assert!(!s.needs_owner() && !s.needs_pipeline() && !s.needs_stage());
}

#[test]
fn fields_errors() {
    let e = err(json!([]));
    assert_eq!(
        (e.field.as_str(), e.message.as_str()),
        ("fields", "must not be empty")
    );
    let e = err(json!("firstName"));
    assert_eq!(e.field, "fields");
    let e = err(json!({"a": 1}));
    assert_eq!(e.field, "fields");
    let e = err(json!(["firstName", "nickname"]));
    assert_eq!(e.field, "fields[1]");
    assert!(
        e.message.contains("unknown field \"nickname\""),
        "{}",
        e.message
    );
    let e = err(json!(["FirstName"]));
    assert_eq!(e.field, "fields[0]");
    let e = err(json!(["email", 3]));
    assert_eq!(
        (e.field.as_str(), e.message.as_str()),
        ("fields[1]", "must be a string")
    );
    let e = err(json!(["email", "phone", "email"]));
    assert_eq!(e.field, "fields[2]");
    assert!(e.message.contains("duplicate"), "{}", e.message);
    let e = err(json!(["customFields", "customFields"]));
    assert_eq!(e.field, "fields[1]");
    let e = err(json!(["customFields.x", "customFields.x"]));
    assert_eq!(e.field, "fields[1]");
    let e = err(json!(["email", "customFields."]));
    assert_eq!(e.field, "fields[1]");
    assert!(e.message.contains("must not be empty"), "{}", e.message);
    let e = ColumnSpec::from_json(Some(&json!(["x"])), "export.fields").unwrap_err();
    assert_eq!(e.field, "export.fields[0]");
    assert_eq!(e.to_string(), format!("export.fields[0]: {}", e.message));
}

#[test]
fn expand_custom_columns() {
    let s = spec(&["email", "customFields", "customFields.b", "phone"]);
    let discovered: Vec<String> = ["z", "b", "a", "a"].map(String::from).to_vec();
    let e = s.expand(&discovered);
    assert_eq!(
        e.0,
        vec![
            Column::Email,
            Column::Custom("a".into()),
            Column::Custom("z".into()),
            Column::Custom("b".into()),
            Column::Phone,
        ]
    );
    assert!(!e.needs_custom_discovery());
    // Nothing discovered: the token disappears.
    assert_eq!(
        s.expand(&[]).0,
        vec![Column::Email, Column::Custom("b".into()), Column::Phone]
    );
    // Without the token, expansion is the identity.
    let plain = spec(&["email", "customFields.q"]);
    assert_eq!(plain.expand(&discovered), plain);
}

#[test]
fn projections() {
    assert_eq!(
        ColumnSpec::default_columns().projection(),
        doc! {"_id": 1, "firstName": 1, "lastName": 1, "phone": 1, "email": 1,
        "pipelineId": 1, "stageId": 1, "createdAt": 1}
    );
    assert_eq!(
        spec(&[
            "fullName",
            "id",
            "owner",
            "tags",
            "customFields.plan",
            "customFields.x"
        ])
        .projection(),
        doc! {"_id": 1, "firstName": 1, "lastName": 1, "ownerId": 1, "tags": 1,
        "customFields.plan": 1, "customFields.x": 1}
    );
    assert_eq!(
        spec(&["customFields.plan", "customFields"]).projection(),
        doc! {"_id": 1, "customFields": 1}
    );
    // A key that is not a plain path segment projects the whole object.
    assert_eq!(
        spec(&["customFields.plan", "customFields.a.b"]).projection(),
        doc! {"_id": 1, "customFields": 1}
    );
    assert_eq!(
        spec(&["customFields.$x"]).projection(),
        doc! {"_id": 1, "customFields": 1}
    );
}

#[test]
fn column_spec_bson_and_json_round_trip() {
    let s = spec(&[
        "id",
        "fullName",
        "customFields.plan",
        "customFields",
        "createdAt",
    ]);
    let b = bson::to_bson(&s).unwrap();
    assert!(matches!(b, Bson::Array(_)));
    let back: ColumnSpec = bson::from_bson(b).unwrap();
    assert_eq!(back, s);
    // Embedded in a document, serialised to bytes and back, as in a job record.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Rec {
        columns: ColumnSpec,
        format: Format,
    }
    let rec = Rec {
        columns: s.clone(),
        format: Format::Ndjson,
    };
    let d = bson::to_document(&rec).unwrap();
    let mut bytes = Vec::new();
    d.to_writer(&mut bytes).unwrap();
    let d2 = Document::from_reader(&mut bytes.as_slice()).unwrap();
    assert_eq!(d2.get_str("format").unwrap(), "ndjson");
    let rec2: Rec = bson::from_document(d2).unwrap();
    assert_eq!(rec2, rec);
    let j = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<ColumnSpec>(&j).unwrap(), s);
}

#[tokio::test]
async fn default_header_and_zero_rows() {
    let out = csv_of(ColumnSpec::default_columns(), &[], &Names::default()).await;
    assert_eq!(
        out,
        "First Name,Last Name,Phone,Email,Pipeline,Stage,Created Date\n"
    );
    let enc = Encoder::new(Format::Csv, ColumnSpec::default_columns());
    let mut buf = Vec::new();
    assert_eq!(
        enc.encode_batch(&[], &Names::default(), &mut buf)
            .await
            .unwrap(),
        0
    );
    assert!(buf.is_empty());
    assert_eq!(
        ndjson_of(ColumnSpec::default_columns(), &[], &names()).await,
        ""
    );
}

#[tokio::test]
async fn all_headers() {
    let s = spec(&[
        "id",
        "firstName",
        "lastName",
        "fullName",
        "phone",
        "email",
        "pipeline",
        "stage",
        "owner",
        "tags",
        "createdAt",
        "customFields.plan",
        "customFields.a,b",
    ]);
    let out = csv_of(s, &[], &Names::default()).await;
    assert_eq!(
        out,
        "Id,First Name,Last Name,Full Name,Phone,Email,Pipeline,Stage,Owner,Tags,\
         Created Date,customFields.plan,\"customFields.a,b\"\n"
    );
}

#[tokio::test]
async fn default_row() {
    let out = csv_of(ColumnSpec::default_columns(), &[contact()], &names()).await;
    assert_eq!(
        out,
        "First Name,Last Name,Phone,Email,Pipeline,Stage,Created Date\n\
         Ann,Lee,+14165550100,ann@example.com,Sales,\"Won, finally\",2026-05-20\n"
    );
}

#[tokio::test]
async fn every_column_csv() {
    let s = spec(&[
        "id",
        "fullName",
        "owner",
        "tags",
        "createdAt",
        "customFields",
        "stage",
        "pipeline",
    ])
    .expand(&[
        "seats".into(),
        "active".into(),
        "plan".into(),
        "gone".into(),
    ]);
    let out = csv_of(s, &[contact()], &names()).await;
    let rows = parse_csv(&out);
    assert_eq!(
        rows,
        vec![
            vec![
                "Id",
                "Full Name",
                "Owner",
                "Tags",
                "Created Date",
                "customFields.active",
                "customFields.gone",
                "customFields.plan",
                "customFields.seats",
                "Stage",
                "Pipeline",
            ],
            vec![
                "090909090909090909090909",
                "Ann Lee",
                "Olga \"O\" Owner",
                "vip, new",
                "2026-05-20",
                "true",
                "",
                "gold",
                "5",
                "Won, finally",
                "Sales",
            ],
        ]
    );
}

#[tokio::test]
async fn tricky_values_round_trip_through_csv_parser() {
    let d = doc! {
        "_id": oid(7),
        "firstName": "Smith, \"Jr\"",
        "lastName": "line1\nline2\r\nline3",
        "phone": "+1 (416) 555-0100",
        "email": "-5",
        "tags": ["a,b", "c\"d", "=HYPERLINK(\"x\")", "ü€😀"],
        "customFields": {
            "formula": "=1+2",
            "at": "@SUM(A1:A2)",
            "tab": "\tlead",
            "cr": "\rlead",
            "plus": "+x",
            "neg": -5,
            "negf": -2.5,
            "uni": "Zoë 日本 😀",
            "ok": "a=b",
        },
        "createdAt": created(),
    };
    let s = spec(&[
        "firstName",
        "lastName",
        "phone",
        "email",
        "tags",
        "customFields",
        "fullName",
    ])
    .expand(
        &[
            "formula", "at", "tab", "cr", "plus", "neg", "negf", "uni", "ok",
        ]
        .map(String::from),
    );
    let out = csv_of(s, &[d], &Names::default()).await;
    let rows = parse_csv(&out);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0],
        vec![
            "First Name",
            "Last Name",
            "Phone",
            "Email",
            "Tags",
            "customFields.at",
            "customFields.cr",
            "customFields.formula",
            "customFields.neg",
            "customFields.negf",
            "customFields.ok",
            "customFields.plus",
            "customFields.tab",
            "customFields.uni",
            "Full Name",
        ]
    );
    assert_eq!(
        rows[1],
        vec![
            "Smith, \"Jr\"",
            "line1\nline2\r\nline3",
            "+1 (416) 555-0100",
            "'-5",
            "a,b, c\"d, =HYPERLINK(\"x\"), ü€😀",
            "'@SUM(A1:A2)",
            "'\rlead",
            "'=1+2",
            "'-5",
            "'-2.5",
            "a=b",
            "'+x",
            "'\tlead",
            "Zoë 日本 😀",
            "Smith, \"Jr\" line1\nline2\r\nline3",
        ]
    );
    // Output is UTF-8 and records end with a bare `\n`.
    assert!(out.ends_with("Full Name\n") || out.ends_with("line3\"\n"));
    assert!(!out.contains(",\r\n") && out.starts_with("First Name,"));
}

#[tokio::test]
async fn formulas_in_names_and_tags_neutralised_phone_numbers_exempt() {
    let mut n = Names::default();
    n.pipelines.insert(oid(1), "=cmd|' /C calc'!A0".into());
    n.stages.insert(oid(2), "@stage".into());
    n.owners.insert(oid(3), "-owner".into());
    let d = doc! {
        "firstName": "=1+2", "lastName": "+3", "phone": "=cmd", "email": "@x",
        "pipelineId": oid(1), "stageId": oid(2), "ownerId": oid(3),
        "tags": ["=a", "b"],
    };
    let s = spec(&[
        "firstName",
        "lastName",
        "phone",
        "email",
        "pipeline",
        "stage",
        "owner",
        "tags",
        "fullName",
    ]);
    let rows = parse_csv(&csv_of(s, std::slice::from_ref(&d), &n).await);
    assert_eq!(
        rows[1],
        vec![
            "'=1+2",
            "'+3",
            "'=cmd",
            "'@x",
            "'=cmd|' /C calc'!A0",
            "'@stage",
            "'-owner",
            "'=a, b",
            "'=1+2 +3"
        ]
    );
    let d2 = doc! {"phone": "+14165550100", "firstName": "\t"};
    let rows = parse_csv(&csv_of(spec(&["phone", "firstName"]), &[d2], &n).await);
    assert_eq!(rows[1], vec!["+14165550100", "'\t"]);
    // NDJSON is data: nothing is neutralised.
    let out = ndjson_of(spec(&["firstName", "pipeline", "phone"]), &[d], &n).await;
    assert_eq!(
        out,
        "{\"firstName\":\"=1+2\",\"pipeline\":\"=cmd|' /C calc'!A0\",\"phone\":\"=cmd\"}\n"
    );
}

#[tokio::test]
async fn missing_null_and_non_string_values() {
    let docs = [
        doc! {"_id": oid(1)},
        doc! {
            "_id": oid(2), "firstName": null, "lastName": "Solo", "phone": 4165550100_i64,
            "email": 12.5, "pipelineId": null, "stageId": oid(99), "ownerId": null,
            "tags": null, "createdAt": null, "customFields": null,
        },
        doc! {"_id": "legacy-id", "firstName": 42, "lastName": true, "tags": "single", "createdAt": "yesterday", "customFields": {"k": null}},
    ];
    let s = spec(&[
        "id",
        "firstName",
        "lastName",
        "fullName",
        "phone",
        "email",
        "pipeline",
        "stage",
        "owner",
        "tags",
        "createdAt",
        "customFields.k",
    ]);
    let rows = parse_csv(&csv_of(s.clone(), &docs, &names()).await);
    assert_eq!(rows.len(), 4);
    assert_eq!(
        rows[1],
        vec![
            "010101010101010101010101",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            ""
        ]
    );
    assert_eq!(
        rows[2],
        vec![
            "020202020202020202020202",
            "",
            "Solo",
            "Solo",
            "4165550100",
            "12.5",
            "",
            "",
            "",
            "",
            "",
            ""
        ]
    );
    assert_eq!(
        rows[3],
        vec![
            "legacy-id",
            "42",
            "true",
            "42 true",
            "",
            "",
            "",
            "",
            "",
            "single",
            "yesterday",
            ""
        ]
    );

    let lines = parse_lines(&ndjson_of(s, &docs, &names()).await);
    assert_eq!(
        lines[0],
        json!({"id": "010101010101010101010101", "firstName": null, "lastName": null,
               "fullName": null, "phone": null, "email": null, "pipeline": null,
               "stage": null, "owner": null, "tags": null, "createdAt": null,
               "customFields": {"k": null}})
    );
    assert_eq!(
        lines[1],
        json!({"id": "020202020202020202020202", "firstName": null, "lastName": "Solo",
               "fullName": "Solo", "phone": "4165550100", "email": "12.5", "pipeline": null,
               "stage": null, "owner": null, "tags": null, "createdAt": null,
               "customFields": {"k": null}})
    );
    assert_eq!(
        lines[2],
        json!({"id": "legacy-id", "firstName": "42", "lastName": "true", "fullName": "42 true",
               "phone": null, "email": null, "pipeline": null, "stage": null, "owner": null,
               "tags": ["single"], "createdAt": "yesterday", "customFields": {"k": null}})
    );
}

#[tokio::test]
async fn exact_csv_quoting_and_terminator() {
    let docs = [
        doc! {"firstName": "a,b", "lastName": "q\"x", "phone": "l1\nl2", "email": " sp "},
        doc! {"firstName": "", "email": "#c"},
    ];
    let out = csv_of(
        spec(&["firstName", "lastName", "phone", "email"]),
        &docs,
        &names(),
    )
    .await;
    assert_eq!(
        out,
        "First Name,Last Name,Phone,Email\n\"a,b\",\"q\"\"x\",\"l1\nl2\", sp \n,,,#c\n"
    );
    // No columns at all (`customFields` with no keys found): one empty
    // quoted cell per line keeps the file well-formed.
    let out = csv_of(spec(&["customFields"]).expand(&[]), &[doc! {}], &names()).await;
    assert_eq!(out, "\"\"\n\"\"\n");
}

#[tokio::test]
async fn single_empty_column_rows_stay_distinct() {
    let docs = [doc! {}, doc! {"email": "a@b.c"}, doc! {}];
    let out = csv_of(spec(&["email"]), &docs, &Names::default()).await;
    let rows = parse_csv(&out);
    assert_eq!(rows, vec![vec!["Email"], vec![""], vec!["a@b.c"], vec![""]]);
}

#[tokio::test]
async fn custom_value_text() {
    let d = doc! {"customFields": {
        "b": false, "i": 7, "l": 9_007_199_254_740_993_i64, "f": 1.5, "whole": 5.0,
        "big": 1e21, "tiny": 1.5e-8, "zero": -0.0, "date": created(), "s": "x",
        "dec": Bson::Decimal128("1.10".parse().unwrap()),
    }};
    let keys = [
        "b", "i", "l", "f", "whole", "big", "tiny", "zero", "date", "s", "dec", "none",
    ];
    let s = spec(&["customFields"]).expand(&keys.map(String::from));
    let rows = parse_csv(&csv_of(s.clone(), std::slice::from_ref(&d), &Names::default()).await);
    let row: HashMap<&str, &str> = rows[0]
        .iter()
        .map(|h| h.strip_prefix("customFields.").unwrap())
        .zip(rows[1].iter().map(String::as_str))
        .collect();
    assert_eq!(row["b"], "false");
    assert_eq!(row["i"], "7");
    assert_eq!(row["l"], "9007199254740993");
    assert_eq!(row["f"], "1.5");
    assert_eq!(row["whole"], "5");
    assert_eq!(row["big"], "1e21");
    assert_eq!(row["tiny"], "1.5e-8");
    assert_eq!(row["zero"], "0");
    assert_eq!(row["date"], "2026-05-20T10:11:12.345Z");
    assert_eq!(row["s"], "x");
    assert_eq!(row["dec"], "1.10");
    assert_eq!(row["none"], "");

    let lines = parse_lines(&ndjson_of(s, &[d], &Names::default()).await);
    assert_eq!(
        lines[0],
        json!({"customFields": {
            "b": false, "big": 1e21, "date": "2026-05-20T10:11:12.345Z", "dec": "1.10",
            "f": 1.5, "i": 7, "l": 9_007_199_254_740_993_i64, "none": null, "s": "x",
            "tiny": 1.5e-8, "whole": 5.0, "zero": -0.0,
        }})
    );
}

#[test]
fn number_text_cases() {
    let t = |f: f64| {
        let mut s = String::new();
        number_text(f, &mut s).unwrap();
        s
    };
    assert_eq!(t(0.1 + 0.2), "0.30000000000000004");
    assert_eq!(t(-3.0), "-3");
    assert_eq!(t(123456789012.0), "123456789012");
    assert_eq!(t(1e-7), "0.0000001");
    assert_eq!(t(f64::NAN), "NaN");
    assert_eq!(t(f64::NEG_INFINITY), "-Infinity");
    assert_eq!(t(-2.5e30), "-2.5e30");
}

#[tokio::test]
async fn ndjson_exact_output() {
    let s = spec(&[
        "id",
        "firstName",
        "lastName",
        "fullName",
        "phone",
        "email",
        "pipeline",
        "stage",
        "owner",
        "tags",
        "customFields.seats",
        "createdAt",
        "customFields.plan",
    ]);
    let mut second = contact();
    second.insert("firstName", "Zoë \"Z\"\n");
    second.insert("tags", Bson::Array(vec![]));
    second.remove("customFields");
    second.insert("ownerId", oid(77));
    let out = ndjson_of(s, &[contact(), second], &names()).await;
    assert_eq!(
        out,
        concat!(
            r#"{"id":"090909090909090909090909","firstName":"Ann","lastName":"Lee","fullName":"Ann Lee","phone":"+14165550100","email":"ann@example.com","pipeline":"Sales","stage":"Won, finally","owner":"Olga \"O\" Owner","tags":["vip","new"],"customFields":{"seats":5,"plan":"gold"},"createdAt":"2026-05-20T10:11:12.345Z"}"#,
            "\n",
            r#"{"id":"090909090909090909090909","firstName":"Zoë \"Z\"\n","lastName":"Lee","fullName":"Zoë \"Z\"\n Lee","phone":"+14165550100","email":"ann@example.com","pipeline":"Sales","stage":"Won, finally","owner":null,"tags":[],"customFields":{"seats":null,"plan":null},"createdAt":"2026-05-20T10:11:12.345Z"}"#,
            "\n",
        )
    );
    let lines = parse_lines(&out);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["firstName"], "Zoë \"Z\"\n");
    // Key order follows the column order.
    let keys: Vec<&str> = out
        .lines()
        .next()
        .unwrap()
        .split("\":")
        .map(|k| k.rsplit('"').next().unwrap())
        .collect();
    assert_eq!(&keys[..3], ["id", "firstName", "lastName"]);
}

#[tokio::test]
async fn ndjson_nested_and_exotic_custom_values() {
    let d = doc! {"customFields": {
        "arr": [1, "two", null], "obj": {"a": oid(1), "when": created()},
        "nan": f64::NAN, "bin": Bson::Binary(bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2] }),
    }};
    let s =
        spec(&["customFields"]).expand(&["arr".into(), "obj".into(), "nan".into(), "bin".into()]);
    let lines =
        parse_lines(&ndjson_of(s.clone(), std::slice::from_ref(&d), &Names::default()).await);
    assert_eq!(lines[0]["customFields"]["arr"], json!([1, "two", null]));
    assert_eq!(
        lines[0]["customFields"]["obj"],
        json!({"a": "010101010101010101010101", "when": "2026-05-20T10:11:12.345Z"})
    );
    assert_eq!(lines[0]["customFields"]["nan"], json!(null));
    assert_eq!(
        lines[0]["customFields"]["bin"],
        json!({"$binary": {"base64": "AQI=", "subType": "00"}})
    );
    // CSV renders compound values as JSON text.
    let rows = parse_csv(&csv_of(s, &[d], &Names::default()).await);
    assert_eq!(rows[1][0], "[1,\"two\",null]");
    assert_eq!(rows[1][2], "NaN");
}

#[tokio::test]
async fn batches_concatenate_into_one_file() {
    let enc = Encoder::new(Format::Csv, spec(&["id", "firstName", "customFields.plan"]));
    let mut file = enc.header().await.unwrap();
    let docs: Vec<Document> = (0..2500u32)
        .map(|i| {
            doc! {"_id": ObjectId::from_bytes([(i % 251) as u8; 12]), "firstName": format!("n{i}, \"q\""),
                  "customFields": {"plan": format!("p\n{i}")}}
        })
        .collect();
    let mut total = 0;
    for batch in docs.chunks(1000) {
        total += enc
            .encode_batch(batch, &Names::default(), &mut file)
            .await
            .unwrap();
    }
    assert_eq!(total, 2500);
    let rows = parse_csv(std::str::from_utf8(&file).unwrap());
    assert_eq!(rows.len(), 2501);
    assert_eq!(rows[0], vec!["Id", "First Name", "customFields.plan"]);
    for (i, r) in rows[1..].iter().enumerate() {
        assert_eq!(r[1], format!("n{i}, \"q\""));
        assert_eq!(r[2], format!("p\n{i}"));
    }

    let enc = Encoder::new(Format::Ndjson, spec(&["firstName"]));
    let mut file = Vec::new();
    for batch in docs.chunks(1000) {
        enc.encode_batch(batch, &Names::default(), &mut file)
            .await
            .unwrap();
    }
    let lines = parse_lines(std::str::from_utf8(&file).unwrap());
    assert_eq!(lines.len(), 2500);
    assert_eq!(lines[2499], json!({"firstName": "n2499, \"q\""}));
}

#[tokio::test]
async fn unexpanded_all_custom_is_ignored_and_empty_columns_work() {
    let enc = Encoder::new(Format::Csv, spec(&["email", "customFields"]));
    assert_eq!(enc.header().await.unwrap(), b"Email\n");
    let out = ndjson_of(spec(&["customFields"]).expand(&[]), &[contact()], &names()).await;
    assert_eq!(out, "{}\n");
}

#[test]
fn collects_custom_keys() {
    let mut keys = BTreeSet::new();
    collect_custom_keys(&contact(), &mut keys);
    collect_custom_keys(&doc! {"customFields": {"zeta": 1, "plan": "x"}}, &mut keys);
    collect_custom_keys(&doc! {"customFields": null}, &mut keys);
    collect_custom_keys(&doc! {"customFields": "oops"}, &mut keys);
    collect_custom_keys(&doc! {}, &mut keys);
    let keys: Vec<String> = keys.into_iter().collect();
    assert_eq!(keys, ["active", "plan", "seats", "zeta"]);
}

#[test]
fn formula_detection_sees_through_spaces_and_full_width_signs() {
    for v in [
        "=1+2",
        "+x",
        "-x",
        "@x",
        "\tx",
        "\rx",
        "  =1+2",
        " @SUM(A1)",
        "\u{3000}=x",
        "＝1+2",
        "＋x",
        "－x",
        "＠x",
        "  ＝x",
    ] {
        assert!(cells::is_formula(v), "{v:?} is a formula");
    }
    for v in ["", "a=b", "x+", "  x", "Zoë", "1-2", "(416) 555"] {
        assert!(!cells::is_formula(v), "{v:?} is not a formula");
    }
}

#[test]
fn phone_numbers_are_digits_spaces_and_plus_minus_parens_dots() {
    for v in [
        "+14165550100",
        "+1 (416) 555-0100",
        "-416.555.0100",
        "416 555 0100",
    ] {
        assert!(cells::is_phone_number(v), "{v:?} is a phone number");
    }
    for v in [
        "=cmd",
        "+1 HYPERLINK",
        "-",
        "+",
        "+1,2",
        "",
        "+1\t2",
        "=1+2",
    ] {
        assert!(!cells::is_phone_number(v), "{v:?} is not a phone number");
    }
}

#[tokio::test]
async fn phone_cells_are_neutralised_unless_they_are_phone_numbers() {
    let docs = [
        doc! {"phone": "=HYPERLINK(\"http://x\",\"call\")", "firstName": " =1+2"},
        doc! {"phone": "+1 (416) 555-0100", "firstName": "＝1+2"},
        doc! {"phone": " +1 416", "firstName": "－5"},
        doc! {"phone": "-1+1@x", "firstName": "＠x"},
    ];
    let rows = parse_csv(&csv_of(spec(&["phone", "firstName"]), &docs, &Names::default()).await);
    assert_eq!(
        rows[1..],
        [
            vec!["'=HYPERLINK(\"http://x\",\"call\")", "' =1+2"],
            vec!["+1 (416) 555-0100", "'＝1+2"],
            vec![" +1 416", "'－5"],
            vec!["'-1+1@x", "'＠x"],
        ]
    );
}

#[test]
fn a_rows_fields_are_found_in_one_pass_first_occurrence_first() {
    let mut raw = RawDocumentBuf::new();
    raw.append("_id", oid(1));
    raw.append("firstName", "Ada");
    raw.append("customFields", bson::rawdoc! {"tier": "gold"});
    raw.append("firstName", "Second");
    raw.append("stageId", oid(9));
    let row = Fields::read(&raw);
    assert_eq!(Fields::object_id(row.id), Some(oid(1)));
    assert_eq!(row.first_name.and_then(|v| v.as_str()), Some("Ada"));
    assert_eq!(Fields::object_id(row.stage_id), Some(oid(9)));
    assert_eq!(
        row.custom.and_then(|c| c.get_str("tier").ok()),
        Some("gold")
    );
    assert!(row.last_name.is_none() && row.owner_id.is_none());
    // As a lookup by key would: the first `firstName` is the cell.
    let enc = Encoder::new(Format::Csv, spec(&["id", "firstName", "customFields.tier"]));
    let mut out = Vec::new();
    enc.encode_rows([raw.as_ref()], &Names::default(), &mut out)
        .expect("encodes");
    assert_eq!(
        String::from_utf8(out).expect("utf-8"),
        format!("{},Ada,gold\n", oid(1))
    );
}
