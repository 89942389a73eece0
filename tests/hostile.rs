//! Hostile input at every edge (contract sections 4, 7, 8 and 10), against real
//! servers: every NATS command and HTTP endpoint fed malformed, over-size and
//! forged input answers a clear error naming the field, creates no job, changes
//! no data and leaves the service alive; a WebSocket session ends at its
//! token's expiry unless an `auth` frame renews it. Restore (NATS and HTTP) and
//! webhook registration bodies have their own table.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bson::{doc, oid::ObjectId, Document};
use common::*;
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const ALL: &str = "contacts:export contacts:delete jobs:read";

/// Seeds `n` contacts of one stage for a new organisation: (org, stage).
async fn seed(db: &mongodb::Database, n: usize) -> (ObjectId, ObjectId) {
    let org = ObjectId::new();
    let stage = ObjectId::new();
    let pipe = pipeline(db, org, "Sales", &[(stage, "New")]).await;
    let docs = (0..n).map(|i| contact(org, pipe, stage, i)).collect();
    insert(db, "contacts", docs).await;
    (org, stage)
}

async fn count(db: &mongodb::Database, coll: &str) -> u64 {
    db.collection::<Document>(coll)
        .count_documents(doc! {})
        .await
        .unwrap()
}

/// A request with raw bytes; the reply as JSON.
async fn raw_request(client: &async_nats::Client, subject: &str, payload: Vec<u8>) -> Value {
    let msg = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(subject.to_string(), payload.into()),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply on {subject} within 20 s"))
    .unwrap_or_else(|e| panic!("request on {subject} failed: {e}"));
    serde_json::from_slice(&msg.payload).unwrap()
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|_| ObjectId::new().to_hex()).collect()
}

/// (payload, expected code, expected field) for one command.
type Case = (Vec<u8>, &'static str, Option<&'static str>);

fn js(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

/// Malformed payloads every command refuses the same way.
fn common_cases() -> Vec<Case> {
    vec![
        (b"not json".to_vec(), "validation_error", Some("body")),
        (
            vec![0xff, 0xfe, b'{', 0x80],
            "validation_error",
            Some("body"),
        ),
        (b"[]".to_vec(), "validation_error", Some("body")),
        (b"null".to_vec(), "validation_error", Some("body")),
        (b"\"x\"".to_vec(), "validation_error", Some("body")),
        (nested(5_000).into_bytes(), "validation_error", Some("body")),
        (js(json!({})), "validation_error", Some("orgId")),
        (js(json!({"orgId": 5})), "validation_error", Some("orgId")),
        (
            js(json!({"orgId": {"$gt": ""}})),
            "validation_error",
            Some("orgId"),
        ),
    ]
}

fn filter_cases(org: &str, stage: &str, with_limit: bool) -> Vec<Case> {
    let long = "x".repeat(257);
    let mut cases: Vec<Case> = vec![
        (
            js(json!({"orgId": org, "filter": {"stageIds": {"$ne": null}}})),
            "validation_error",
            Some("filter.stageIds"),
        ),
        (
            js(json!({"orgId": org, "filter": {"stageIds": [stage, {"$gt": ""}]}})),
            "validation_error",
            Some("filter.stageIds[1]"),
        ),
        (
            js(json!({"orgId": org, "filter": {"stageIds": ids(1_001)}})),
            "validation_error",
            Some("filter.stageIds"),
        ),
        (
            js(json!({"orgId": org, "filter": {"stageIds": ids(30_000)}})),
            "validation_error",
            Some("filter.stageIds"),
        ),
        (
            js(json!({"orgId": org, "filter": {"orgWide": true, "$where": "1"}})),
            "validation_error",
            Some("filter.$where"),
        ),
        (
            js(
                json!({"orgId": org, "filter": {"orgWide": true, "advancedParams": {"createdAfter": {"$gt": 1}}}}),
            ),
            "validation_error",
            Some("filter.advancedParams.createdAfter"),
        ),
        (
            js(
                json!({"orgId": org, "filter": {"orgWide": true, "advancedParams": {"tags": vec!["t"; 1_001]}}}),
            ),
            "validation_error",
            Some("filter.advancedParams.tags"),
        ),
        (
            js(
                json!({"orgId": org, "filter": {"orgWide": true, "advancedParams": {"anyTags": ["ok", long]}}}),
            ),
            "validation_error",
            Some("filter.advancedParams.anyTags[1]"),
        ),
        (
            js(
                json!({"orgId": org, "filter": {"orgWide": true, "advancedParams": {"ownerIds": ids(1_001)}}}),
            ),
            "validation_error",
            Some("filter.advancedParams.ownerIds"),
        ),
        (
            js(json!({"orgId": org, "filter": "all"})),
            "validation_error",
            Some("filter"),
        ),
        (
            js(json!({"orgId": org, "filter": {"orgWide": "true"}})),
            "validation_error",
            Some("filter.orgWide"),
        ),
    ];
    if !with_limit {
        cases.push((
            js(json!({"orgId": org, "filter": {"orgWide": true, "limit": 5}})),
            "validation_error",
            Some("filter.limit"),
        ));
    }
    cases
}

fn job_starter_cases(org: &str) -> Vec<Case> {
    let whole = json!({"orgWide": true});
    vec![
        (
            js(json!({"orgId": org, "filter": whole, "commandId": "c".repeat(257)})),
            "validation_error",
            Some("commandId"),
        ),
        (
            js(json!({"orgId": org, "filter": whole, "commandId": {"$ne": null}})),
            "validation_error",
            Some("commandId"),
        ),
        (
            js(json!({"orgId": org, "filter": whole, "requestedBy": "x".repeat(300)})),
            "validation_error",
            Some("requestedBy"),
        ),
        (
            js(json!({"orgId": org, "filter": whole, "surprise": 1})),
            "validation_error",
            Some("surprise"),
        ),
    ]
}

#[tokio::test]
async fn every_command_refuses_hostile_payloads_and_creates_nothing() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, stage) = seed(&db, 30).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let (o, s) = (org.to_hex(), stage.to_hex());
    let whole = json!({"orgWide": true});

    let mut table: Vec<(&str, Case)> = Vec::new();
    for subject in [
        "bulk.v1.export",
        "bulk.v1.delete",
        "bulk.v1.count",
        "bulk.v1.job",
        "bulk.v1.cancel",
    ] {
        for case in common_cases() {
            table.push((subject, case));
        }
    }
    for case in filter_cases(&o, &s, true) {
        table.push(("bulk.v1.export", case.clone()));
        table.push(("bulk.v1.count", case));
    }
    for case in filter_cases(&o, &s, false) {
        table.push(("bulk.v1.delete", case));
    }
    for case in job_starter_cases(&o) {
        table.push(("bulk.v1.export", case.clone()));
        table.push(("bulk.v1.delete", case));
    }
    let export_only: Vec<Case> = vec![
        (
            js(json!({"orgId": o, "filter": whole, "filename": "f".repeat(100_000)})),
            "validation_error",
            Some("filename"),
        ),
        (
            js(json!({"orgId": o, "filter": whole, "fields": vec!["id"; 1_001]})),
            "validation_error",
            Some("fields"),
        ),
        (
            js(
                json!({"orgId": o, "filter": whole, "fields": ["id", "customFields.".to_string() + &"k".repeat(300)]}),
            ),
            "validation_error",
            Some("fields[1]"),
        ),
        (
            js(json!({"orgId": o, "filter": whole, "format": {"$eq": "csv"}})),
            "validation_error",
            Some("format"),
        ),
        (
            js(json!({"orgId": o, "filter": whole, "gzip": "yes"})),
            "validation_error",
            Some("gzip"),
        ),
    ];
    for case in export_only {
        table.push(("bulk.v1.export", case));
    }
    table.push((
        "bulk.v1.delete",
        (
            js(json!({"orgId": o, "filter": whole, "dryRun": "true"})),
            "validation_error",
            Some("dryRun"),
        ),
    ));
    for subject in ["bulk.v1.job", "bulk.v1.cancel"] {
        table.push((
            subject,
            (
                js(json!({"orgId": o, "jobId": {"$gt": ""}})),
                "validation_error",
                Some("jobId"),
            ),
        ));
        table.push((
            subject,
            (
                js(json!({"orgId": o, "jobId": uuid::Uuid::new_v4().to_string()})),
                "not_found",
                None,
            ),
        ));
    }
    // Another organisation's job id is simply not found (none exists yet anyway).
    table.push((
        "bulk.v1.job",
        (
            js(json!({"orgId": o, "commandId": {"$regex": ".*"}})),
            "validation_error",
            Some("commandId"),
        ),
    ));

    for (subject, (payload, code, field)) in &table {
        let shown: String = String::from_utf8_lossy(payload).chars().take(120).collect();
        let reply = raw_request(&client, subject, payload.clone()).await;
        let what = format!("{subject} with {shown}");
        assert_eq!(reply["error"]["code"], *code, "{what}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: no message in {reply}");
        assert!(
            message.len() < 2_000,
            "{what}: the message echoes the input"
        );
        if let Some(field) = field {
            assert_eq!(reply["error"]["field"], *field, "{what}: {reply}");
        }
        if payload.len() > 10_000 && *code == "validation_error" && field != &Some("body") {
            assert!(
                message.contains("1000") || message.contains("256"),
                "{what}: the message names the limit: {message}"
            );
        }
    }

    assert_eq!(count(&db, "bulk_jobs").await, 0, "no job was created");
    assert_eq!(count(&db, "contacts").await, 30, "no contact changed");
    // Still alive: a good command is answered.
    let reply = request(
        &client,
        "bulk.v1.count",
        json!({"orgId": o, "filter": {"stageIds": [s]}}),
    )
    .await;
    assert_eq!(reply, json!({"count": 30}));
    // The caps are inclusive: 1,000 items and 256 characters are fine.
    let reply = request(
        &client,
        "bulk.v1.count",
        json!({"orgId": o, "filter": {"stageIds": ids(999).into_iter().chain([s.clone()]).collect::<Vec<_>>(),
            "advancedParams": {"tags": ["lead"], "anyTags": vec!["l".repeat(256)].into_iter().chain(["lead".to_string()]).collect::<Vec<_>>()}}}),
    )
    .await;
    assert_eq!(reply, json!({"count": 30}));
}

// ---------- HTTP ----------

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(addr: SocketAddr) -> Api {
        Api {
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            base: format!("http://{addr}"),
        }
    }

    /// Sends raw bytes with `Authorization: auth`; the status and the body as JSON
    /// (panics when an error body is not JSON).
    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: Option<Vec<u8>>,
        content_type: &str,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", content_type).body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = resp.text().await.unwrap();
        if status.is_client_error() || status.is_server_error() {
            assert!(
                ct.starts_with("application/json"),
                "{method} {path}: {status} error is {ct:?}: {text}"
            );
        }
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }
}

#[track_caller]
fn assert_error(what: &str, got: &(StatusCode, Value), status: StatusCode, error: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["error"], error, "{what}: {}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message in {}",
        got.1
    );
}

fn unsigned_token(org: &str, scope: &str) -> String {
    use base64::Engine;
    let b64 = |v: Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap())
    };
    format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(
            json!({"sub": ObjectId::new().to_hex(), "org": org, "exp": chrono::Utc::now().timestamp() + 3600, "scope": scope})
        )
    )
}

fn token_with(org: &str, scope: &str, ttl: i64, secret: &str) -> String {
    contact_bulk::auth::Keys::new(secret, "")
        .mint(&ObjectId::new().to_hex(), org, scope, ttl)
        .unwrap()
}

const BODY_ENDPOINTS: [(Method, &str); 4] = [
    (Method::POST, "/api/contacts/query-count"),
    (Method::DELETE, "/api/contacts/query-bulk-delete"),
    (Method::POST, "/api/contacts/query-delete-preview"),
    (Method::POST, "/api/exports"),
];

#[tokio::test]
async fn every_endpoint_refuses_hostile_input_as_json_and_changes_nothing() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, stage) = seed(&db, 12).await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let good = format!("Bearer {}", token(org, ALL));
    let o = org.to_hex();
    let s = stage.to_hex();

    // Forged and foreign tokens on every endpoint: 401 (or 404 for another org's job).
    let job = uuid::Uuid::new_v4().to_string();
    let paths: Vec<(Method, String)> = BODY_ENDPOINTS
        .iter()
        .map(|(m, p)| (m.clone(), p.to_string()))
        .chain([
            (Method::GET, format!("/api/contacts/bulk-job/{job}")),
            (Method::POST, format!("/api/contacts/bulk-job/{job}/cancel")),
            (Method::GET, format!("/api/exports/{job}")),
            (Method::GET, format!("/api/exports/{job}/download")),
            (
                Method::GET,
                "/api/contacts/query-bulk-export?orgWide=true".into(),
            ),
            (Method::GET, "/api/jobs".into()),
        ])
        .collect();
    let forged = [
        format!("Bearer {}", unsigned_token(&o, ALL)),
        format!("Bearer {}", token_with(&o, ALL, 3600, "wrong-key")),
        format!("Bearer {}", token_with(&o, ALL, -5, SECRET)),
        format!("Bearer {}", token_with("not-an-id", ALL, 3600, SECRET)),
        "Bearer not.a.jwt".into(),
        "Basic dXNlcjpwYXNz".into(),
    ];
    let body = js(json!({"orgWide": true}));
    for (method, path) in &paths {
        for auth in &forged {
            let got = api
                .send(
                    method.clone(),
                    path,
                    Some(auth),
                    Some(body.clone()),
                    "application/json",
                )
                .await;
            let what = format!("{method} {path} with {auth}");
            assert_error(&what, &got, StatusCode::UNAUTHORIZED, "unauthorized");
        }
    }

    // Malformed bodies on every body endpoint: 400 naming the field.
    let nested_body = format!(
        "{{\"orgWide\": true, \"advancedParams\": {}}}",
        nested(5_000)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "body"),
        (vec![0xff, 0xfe, 0x80], "body"),
        // Decoding stops at the first value of the wrong shape, however deep the rest.
        (nested_body.into_bytes(), "advancedParams"),
        (nested(5_000).into_bytes(), "body"),
        (b"[1,2]".to_vec(), "body"),
    ];
    for (method, path) in &BODY_ENDPOINTS {
        for (body, field) in &cases {
            let got = api
                .send(
                    method.clone(),
                    path,
                    Some(&good),
                    Some(body.clone()),
                    "application/json",
                )
                .await;
            let what = format!("{method} {path}");
            assert_error(&what, &got, StatusCode::BAD_REQUEST, "validation_error");
            // The export body holds its filter under `filter`: `orgWide` is unknown there.
            let field = match (*path, *field) {
                ("/api/exports", "advancedParams") => "orgWide",
                _ => field,
            };
            assert_eq!(got.1["field"], field, "{what}: {}", got.1);
        }
    }
    // Over-size lists and strings, body endpoints whose body is the filter.
    let filter_cases: Vec<(Value, &str)> = vec![
        (json!({"stageIds": ids(1_001)}), "stageIds"),
        (json!({"stageIds": ids(30_000)}), "stageIds"),
        (
            json!({"orgWide": true, "advancedParams": {"tags": vec!["t"; 1_001]}}),
            "advancedParams.tags",
        ),
        (
            json!({"orgWide": true, "advancedParams": {"anyTags": ["x".repeat(257)]}}),
            "advancedParams.anyTags[0]",
        ),
        (
            json!({"orgWide": true, "advancedParams": {"ownerIds": ids(1_001)}}),
            "advancedParams.ownerIds",
        ),
        (json!({"stageIds": [s, {"$gt": ""}]}), "stageIds[1]"),
    ];
    for (method, path) in &BODY_ENDPOINTS[..3] {
        for (body, field) in &filter_cases {
            let got = api
                .send(
                    method.clone(),
                    path,
                    Some(&good),
                    Some(js(body.clone())),
                    "application/json",
                )
                .await;
            let what = format!("{method} {path} with {field}");
            assert_error(&what, &got, StatusCode::BAD_REQUEST, "validation_error");
            assert_eq!(got.1["field"], *field, "{what}: {}", got.1);
        }
    }
    let export_cases: Vec<(Value, &str)> = vec![
        (json!({"filename": "f".repeat(100_000)}), "filename"),
        (json!({"tagIds": vec!["t"; 1_001]}), "tagIds"),
        (json!({"tagIds": ["ok", "t".repeat(257)]}), "tagIds[1]"),
        (json!({"fields": vec!["id"; 1_001]}), "fields"),
        (
            json!({"filter": {"stageIds": ids(1_001)}}),
            "filter.stageIds",
        ),
        (json!({"format": {"$ne": "csv"}}), "format"),
    ];
    for (body, field) in &export_cases {
        let got = api
            .send(
                Method::POST,
                "/api/exports",
                Some(&good),
                Some(js(body.clone())),
                "application/json",
            )
            .await;
        let what = format!("POST /api/exports with {field}");
        assert_error(&what, &got, StatusCode::BAD_REQUEST, "validation_error");
        assert_eq!(got.1["field"], *field, "{what}: {}", got.1);
        let message = got.1["message"].as_str().unwrap();
        assert!(
            message.contains("1000") || message.contains("256") || field == &"format",
            "{what}: the message names the limit: {message}"
        );
    }
    // The streamed export's query string is capped too.
    let many = ids(1_001).join(",");
    let got = api
        .send(
            Method::GET,
            &format!("/api/contacts/query-bulk-export?stageIds={many}"),
            Some(&good),
            None,
            "",
        )
        .await;
    assert_error(
        "query-bulk-export with 1001 stageIds",
        &got,
        StatusCode::BAD_REQUEST,
        "validation_error",
    );
    assert_eq!(got.1["field"], "stageIds");

    // A body over 1 MiB: JSON 413 naming the body and the limit.
    let huge = js(json!({"orgWide": true, "pad": "x".repeat(1024 * 1024)}));
    for (method, path) in &BODY_ENDPOINTS {
        let got = api
            .send(
                method.clone(),
                path,
                Some(&good),
                Some(huge.clone()),
                "application/json",
            )
            .await;
        let what = format!("{method} {path} with 1 MiB");
        assert_error(
            &what,
            &got,
            StatusCode::PAYLOAD_TOO_LARGE,
            "validation_error",
        );
        assert_eq!(got.1["field"], "body", "{what}: {}", got.1);
        assert!(
            got.1["message"].as_str().unwrap().contains("1048576"),
            "{}",
            got.1
        );
    }

    // Framework answers are JSON too: unknown path, wrong method, bad path parameter.
    let got = api
        .send(Method::GET, "/api/nope", Some(&good), None, "")
        .await;
    assert_error("unknown path", &got, StatusCode::NOT_FOUND, "not_found");
    let got = api.send(Method::GET, "/no/such/page", None, None, "").await;
    assert_error("unknown page", &got, StatusCode::NOT_FOUND, "not_found");
    let got = api
        .send(
            Method::PUT,
            "/api/contacts/query-count",
            Some(&good),
            None,
            "",
        )
        .await;
    assert_error(
        "wrong method",
        &got,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let got = api
        .send(Method::GET, "/api/jobs?limit=%ff", Some(&good), None, "")
        .await;
    assert!(got.0.is_client_error(), "{}", got.1);
    // A plain GET of /ws (no upgrade) is a JSON error as well.
    let got = api.send(Method::GET, "/ws", Some(&good), None, "").await;
    assert!(got.0.is_client_error(), "{}", got.1);

    assert_eq!(count(&db, "bulk_jobs").await, 0, "no job was created");
    assert_eq!(count(&db, "contacts").await, 12, "no contact changed");
    let alive = api
        .send(
            Method::POST,
            "/api/contacts/query-count",
            Some(&good),
            Some(js(json!({"stageIds": [s]}))),
            "application/json",
        )
        .await;
    assert_eq!(alive, (StatusCode::OK, json!({"count": 12})));
}

#[tokio::test]
async fn tampered_download_links_and_foreign_tokens_get_nothing() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, stage) = seed(&db, 5).await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "filter": {"stageIds": [stage.to_hex()]}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    let snap = wait_terminal(&client, org, &job).await;
    let url = reqwest::Url::parse(snap["result"]["downloadUrl"].as_str().unwrap()).unwrap();
    let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    let (expires, sig) = (q["expires"].clone(), q["signature"].clone());
    let mut flipped = sig.clone().into_bytes();
    flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    let other_job = uuid::Uuid::new_v4();
    let later = expires.parse::<i64>().unwrap() + 3600;
    for (what, query) in [
        (
            "flipped signature",
            format!("expires={expires}&signature={flipped}"),
        ),
        ("later expiry", format!("expires={later}&signature={sig}")),
        ("no signature", format!("expires={expires}")),
        (
            "signature not hex",
            format!("expires={expires}&signature=zz"),
        ),
        (
            "expires not a number",
            format!("expires=soon&signature={sig}"),
        ),
        ("operator", format!("expires[$gt]=0&signature={sig}")),
    ] {
        let got = api
            .send(
                Method::GET,
                &format!("/api/exports/{job}/download?{query}"),
                None,
                None,
                "",
            )
            .await;
        assert!(
            got.0 == StatusCode::UNAUTHORIZED || got.0 == StatusCode::BAD_REQUEST,
            "{what}: {} {}",
            got.0,
            got.1
        );
    }
    let got = api
        .send(
            Method::GET,
            &format!("/api/exports/{other_job}/download?expires={expires}&signature={sig}"),
            None,
            None,
            "",
        )
        .await;
    assert!(got.0.is_client_error(), "another job's path: {}", got.1);
    // Another organisation's token sees neither the job nor its file.
    let foreign = format!("Bearer {}", token(ObjectId::new(), ALL));
    for path in [
        format!("/api/exports/{job}"),
        format!("/api/exports/{job}/download"),
        format!("/api/contacts/bulk-job/{job}"),
    ] {
        let got = api.send(Method::GET, &path, Some(&foreign), None, "").await;
        assert_error(&path, &got, StatusCode::NOT_FOUND, "not_found");
    }
    let got = api
        .send(
            Method::POST,
            &format!("/api/contacts/bulk-job/{job}/cancel"),
            Some(&foreign),
            None,
            "",
        )
        .await;
    assert_error("foreign cancel", &got, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(count(&db, "bulk_jobs").await, 1);
    // The genuine link still works.
    assert_eq!(
        download(&snap).await.len() as i64,
        snap["result"]["bytes"].as_i64().unwrap()
    );
}

// ---------- WebSocket ----------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, token: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .expect("ws connects");
    ws
}

/// The next text frame as JSON, or `None` once the server closed.
async fn next_frame(ws: &mut Ws, secs: u64) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a frame before the deadline");
        match msg {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(_)) => continue,
        }
    }
}

async fn next_not_snapshot(ws: &mut Ws) -> Value {
    loop {
        let f = next_frame(ws, 20).await.expect("the connection is open");
        if f["type"] != "snapshot" {
            return f;
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

async fn ping(ws: &mut Ws) -> Value {
    send(ws, json!({"op": "ping"})).await;
    next_frame(ws, 10).await.expect("the connection is open")
}

#[tokio::test]
async fn a_websocket_ends_at_its_tokens_expiry_unless_renewed() {
    let stack = Stack::start().await;
    let org = ObjectId::new();
    let svc = stack.service().await;
    let o = org.to_hex();
    let short = |ttl| token_with(&o, "jobs:read", ttl, SECRET);

    // Not renewed: an error frame `token_expired`, then the close.
    let mut ws = connect(svc.addr, &short(2)).await;
    send(&mut ws, json!({"op": "subscribe", "topic": "jobs"})).await;
    assert_eq!(ping(&mut ws).await["type"], "pong");
    let frame = next_frame(&mut ws, 10)
        .await
        .expect("an error frame before the close");
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["code"], "token_expired", "{frame}");
    assert!(
        next_frame(&mut ws, 10).await.is_none(),
        "closed after token_expired"
    );

    // Renewed by an `auth` frame: alive past the first token's expiry.
    let mut ws = connect(svc.addr, &short(2)).await;
    // Bad and foreign tokens are refused and change nothing.
    send(
        &mut ws,
        json!({"op": "auth", "token": unsigned_token(&o, "jobs:read")}),
    )
    .await;
    let f = next_frame(&mut ws, 10).await.unwrap();
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str()),
        (Some("error"), Some("unauthorized")),
        "{f}"
    );
    send(&mut ws, json!({"op": "auth", "token": token_with(&ObjectId::new().to_hex(), "jobs:read", 3600, SECRET)})).await;
    let f = next_frame(&mut ws, 10).await.unwrap();
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{f}"
    );
    send(
        &mut ws,
        json!({"op": "auth", "token": token_with(&o, "contacts:export", 3600, SECRET)}),
    )
    .await;
    let f = next_frame(&mut ws, 10).await.unwrap();
    assert_eq!(f["code"], "forbidden", "{f}");
    send(&mut ws, json!({"op": "auth", "token": short(3600)})).await;
    assert_eq!(
        ping(&mut ws).await["type"],
        "pong",
        "no frame answers a good auth"
    );
    // Past the first token's expiry the connection still answers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ping(&mut ws).await["type"], "pong");

    // A refused renewal leaves the old expiry in force.
    let mut ws = connect(svc.addr, &short(2)).await;
    send(&mut ws, json!({"op": "auth", "token": token_with(&ObjectId::new().to_hex(), "jobs:read", 3600, SECRET)})).await;
    assert_eq!(next_frame(&mut ws, 10).await.unwrap()["code"], "forbidden");
    let f = next_frame(&mut ws, 10).await.expect("token_expired");
    assert_eq!(f["code"], "token_expired", "{f}");
    assert!(next_frame(&mut ws, 10).await.is_none());
}

#[tokio::test]
async fn resubscribing_never_exceeds_the_subscription_cap() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, stage) = seed(&db, 1).await;
    let svc = stack.service().await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "filter": {"stageIds": [stage.to_hex()]}}),
    )
    .await;
    let first = reply["jobId"].as_str().unwrap().to_string();
    wait_terminal(&client, org, &first).await;
    // 98 more finished jobs of the organisation, copies of the first.
    let jobs = db.collection::<Document>("bulk_jobs");
    let record = jobs.find_one(doc! {"_id": &first}).await.unwrap().unwrap();
    let mut ids = vec![first];
    for _ in 0..98 {
        let mut copy = record.clone();
        let id = uuid::Uuid::new_v4().to_string();
        copy.insert("_id", &id);
        copy.remove("commandKey");
        jobs.insert_one(copy).await.unwrap();
        ids.push(id);
    }

    let mut ws = connect(svc.addr, &token(org, "jobs:read")).await;
    send(&mut ws, json!({"op": "subscribe", "topic": "jobs"})).await;
    for j in &ids {
        send(&mut ws, json!({"op": "subscribe", "jobId": j})).await;
    }
    // 1 topic + 99 jobs: the cap of 100 is reached, each job answered by a snapshot.
    for _ in 0..ids.len() {
        let f = next_frame(&mut ws, 20).await.unwrap();
        assert_eq!(f["type"], "snapshot", "{f}");
    }
    // Re-subscribing to what is held is fine, many times over.
    for _ in 0..5 {
        send(&mut ws, json!({"op": "subscribe", "topic": "jobs"})).await;
        send(&mut ws, json!({"op": "subscribe", "jobId": ids[0]})).await;
    }
    // (A re-subscription replaces the one before, so not every snapshot is sent.)
    send(&mut ws, json!({"op": "ping"})).await;
    let mut snapshots = 0;
    loop {
        let f = next_frame(&mut ws, 20).await.unwrap();
        match f["type"].as_str() {
            Some("pong") => break,
            Some("snapshot") => snapshots += 1,
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert!(snapshots <= 5);
    // Something new is over the cap, whether a job or a topic. (A late
    // snapshot of a re-subscription may still come first.)
    send(&mut ws, json!({"op": "subscribe", "topic": "contacts"})).await;
    let f = next_not_snapshot(&mut ws).await;
    assert_eq!(f["code"], "too_many_subscriptions", "{f}");
    send(
        &mut ws,
        json!({"op": "subscribe", "jobId": uuid::Uuid::new_v4().to_string()}),
    )
    .await;
    let f = next_not_snapshot(&mut ws).await;
    assert_eq!(f["code"], "too_many_subscriptions", "{f}");
    // Unsubscribing frees a place.
    send(&mut ws, json!({"op": "unsubscribe", "jobId": ids[1]})).await;
    send(&mut ws, json!({"op": "subscribe", "topic": "contacts"})).await;
    send(&mut ws, json!({"op": "ping"})).await;
    loop {
        let f = next_frame(&mut ws, 20).await.unwrap();
        match f["type"].as_str() {
            Some("pong") => break,
            Some("snapshot") => {}
            _ => panic!("unexpected frame {f}"),
        }
    }
}

// ---------- restore and webhook bodies ----------

#[tokio::test]
async fn restore_and_webhook_bodies_are_refused_naming_the_field() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, _stage) = seed(&db, 10).await;
    let svc = stack.service().await;
    let client = stack.client().await;
    let api = Api::new(svc.addr);
    let o = org.to_hex();
    let job = uuid::Uuid::new_v4().to_string();

    // bulk.v1.restore over NATS.
    let mut table = common_cases();
    table.extend([
        (js(json!({"orgId": o})), "validation_error", Some("jobId")),
        (
            js(json!({"orgId": o, "jobId": {"$gt": ""}})),
            "validation_error",
            Some("jobId"),
        ),
        (
            js(json!({"orgId": o, "jobId": job, "dryRun": "true"})),
            "validation_error",
            Some("dryRun"),
        ),
        (
            js(json!({"orgId": o, "jobId": job, "commandId": {"$ne": null}})),
            "validation_error",
            Some("commandId"),
        ),
        (
            js(json!({"orgId": o, "jobId": job, "commandId": "c".repeat(257)})),
            "validation_error",
            Some("commandId"),
        ),
        (
            js(json!({"orgId": o, "jobId": job, "requestedBy": "x".repeat(300)})),
            "validation_error",
            Some("requestedBy"),
        ),
        (
            js(json!({"orgId": o, "jobId": job, "filter": {"orgWide": true}})),
            "validation_error",
            Some("filter"),
        ),
        (js(json!({"orgId": o, "jobId": job})), "not_found", None),
    ]);
    for (payload, code, field) in &table {
        let shown: String = String::from_utf8_lossy(payload).chars().take(120).collect();
        let reply = raw_request(&client, "bulk.v1.restore", payload.clone()).await;
        let what = format!("bulk.v1.restore with {shown}");
        assert_eq!(reply["error"]["code"], *code, "{what}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty() && message.len() < 2_000,
            "{what}: {reply}"
        );
        if let Some(field) = field {
            assert_eq!(reply["error"]["field"], *field, "{what}: {reply}");
        }
    }

    // POST /api/contacts/bulk-job/{jobId}/restore: the body is decoded first.
    let good = format!("Bearer {}", token(org, ALL));
    let path = format!("/api/contacts/bulk-job/{job}/restore");
    let bodies: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "body"),
        (vec![0xff, 0xfe, 0x80], "body"),
        (b"[1,2]".to_vec(), "body"),
        (nested(5_000).into_bytes(), "body"),
        (js(json!({"dryRun": "yes"})), "dryRun"),
        (js(json!({"commandId": {"$ne": null}})), "commandId"),
        (js(json!({"commandId": "c".repeat(257)})), "commandId"),
        (js(json!({"jobId": job})), "jobId"),
        (js(json!({"orgId": o})), "orgId"),
    ];
    for (body, field) in &bodies {
        let got = api
            .send(
                Method::POST,
                &path,
                Some(&good),
                Some(body.clone()),
                "application/json",
            )
            .await;
        let what = format!("POST {path} with {field}");
        assert_error(&what, &got, StatusCode::BAD_REQUEST, "validation_error");
        assert_eq!(got.1["field"], *field, "{what}: {}", got.1);
    }

    // POST /api/webhooks: registration bodies.
    let manage = format!("Bearer {}", token(org, "webhooks:manage"));
    let url = "https://example.com/hook";
    let bodies: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "body"),
        (vec![0xff, 0xfe, 0x80], "body"),
        (b"[1,2]".to_vec(), "body"),
        (nested(5_000).into_bytes(), "body"),
        (js(json!({})), "url"),
        (js(json!({"url": 5})), "url"),
        (js(json!({"url": {"$ne": null}})), "url"),
        (
            js(json!({"url": format!("https://example.com/{}", "a".repeat(3_000))})),
            "url",
        ),
        (js(json!({"url": "javascript:alert(1)"})), "url"),
        (js(json!({"url": url, "events": ["job.nope"]})), "events[0]"),
        (
            js(json!({"url": url, "events": {"$in": ["job.failed"]}})),
            "events",
        ),
        (
            js(json!({"url": url, "events": vec!["job.failed"; 1_001]})),
            "events",
        ),
        (js(json!({"url": url, "secret": "mine"})), "secret"),
    ];
    for (body, field) in &bodies {
        let got = api
            .send(
                Method::POST,
                "/api/webhooks",
                Some(&manage),
                Some(body.clone()),
                "application/json",
            )
            .await;
        let shown: String = String::from_utf8_lossy(body).chars().take(80).collect();
        let what = format!("POST /api/webhooks with {shown}");
        assert_error(&what, &got, StatusCode::BAD_REQUEST, "validation_error");
        assert_eq!(got.1["field"], *field, "{what}: {}", got.1);
    }

    assert_eq!(count(&db, "bulk_jobs").await, 0, "no job was created");
    assert_eq!(count(&db, "webhooks").await, 0, "no webhook was registered");
    assert_eq!(count(&db, "contacts").await, 10, "no contact changed");
    // Still alive: a good command is answered.
    let reply = request(
        &client,
        "bulk.v1.count",
        json!({"orgId": o, "filter": {"orgWide": true}}),
    )
    .await;
    assert_eq!(reply, json!({"count": 10}));
}
