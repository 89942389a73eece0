//! The HTTP API of contract section 7 against real nats-server and MongoDB-wire
//! servers: every endpoint, every status code, the streamed CSV compared row by
//! row with the seeded contacts, signed download links, health and the page.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, Document};
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ALL: &str = "contacts:export contacts:delete jobs:read";
const HEADER: &str = "First Name,Last Name,Phone,Email,Pipeline,Stage,Created Date\n";
const STAGE_NAMES: [&str; 3] = ["New Lead", "Qualified", "Won"];

// ---------- HTTP helpers ----------

/// A client of one service instance.
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

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request; `auth` is the whole `Authorization` value, `body` raw bytes.
    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> reqwest::Response {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A JSON request with a bearer token; the status and the JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let body = body.map(|b| serde_json::to_vec(b).unwrap());
        let resp = self.send(method, path, auth.as_deref(), body).await;
        split(resp).await
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    /// Polls `GET path` until `pred` holds on the JSON body, or panics after `secs`.
    async fn wait(
        &self,
        path: &str,
        token: &str,
        secs: u64,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let (status, body) = self.get(path, token).await;
            assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
            if pred(&body) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "GET {path} did not reach the expected state within {secs} s; last: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a job is terminal and returns its snapshot.
    async fn terminal(&self, path: &str, token: &str) -> Value {
        self.wait(path, token, 120, |s| {
            matches!(
                s["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
        .await
    }
}

/// Status and body (JSON, or the text as a JSON string when it is not JSON).
async fn split(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// Asserts an error response: the status and a JSON `{error, message}` body.
#[track_caller]
fn assert_error(what: &str, got: (StatusCode, &Value), status: StatusCode, error: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["error"], error, "{what}: {}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message in {}",
        got.1
    );
}

/// A token signed by the test secret with its own expiry and org claim.
fn token_with(org: &str, scope: &str, ttl_secs: i64, secret: &str) -> String {
    contact_bulk::auth::Keys::new(secret, "")
        .mint(&ObjectId::new().to_hex(), org, scope, ttl_secs)
        .unwrap()
}

/// The signature the service puts on a download link (HMAC-SHA256 of the secret).
fn link_signature(job_id: &str, expires: i64) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("download:{job_id}:{expires}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn is_uuid(v: &Value) -> bool {
    v.as_str()
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .is_some()
}

/// Path and query of an absolute URL.
fn path_of(url: &str) -> String {
    let u = reqwest::Url::parse(url).unwrap();
    match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    }
}

// ---------- data ----------

struct Org {
    id: ObjectId,
    stages: Vec<ObjectId>,
    owners: Vec<ObjectId>,
    contacts: Vec<Document>,
    applications: Vec<Document>,
}

/// `n` contacts round-robin over 3 stages ("New Lead", "Qualified", "Won" of
/// pipeline "Sales"). Owner by `i % 4`: owners[0], owners[1], null, field missing.
/// Tags by `i % 5`: [vip, lead], [trial], [], [lead], [lead]. Created one minute
/// apart from 2026-01-01. With `children`, contact i has i % 3 conversations of
/// i % 4 messages each. Plus 7 documents in `applications`.
async fn seed(
    db: &mongodb::Database,
    n: usize,
    stages: Option<Vec<ObjectId>>,
    children: bool,
) -> Org {
    let id = ObjectId::new();
    let stages = stages.unwrap_or_else(|| (0..3).map(|_| ObjectId::new()).collect());
    let named: Vec<(ObjectId, &str)> = stages.iter().copied().zip(STAGE_NAMES).collect();
    let pipe = pipeline(db, id, "Sales", &named).await;
    let owners = vec![ObjectId::new(), ObjectId::new()];
    let mut contacts = Vec::with_capacity(n);
    let (mut convs, mut msgs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let mut c = contact(id, pipe, stages[i % 3], i);
        match i % 4 {
            0 => c.insert("ownerId", owners[0]),
            1 => c.insert("ownerId", owners[1]),
            2 => c.insert("ownerId", Bson::Null),
            _ => c.remove("ownerId"),
        };
        let tags: Vec<&str> = match i % 5 {
            0 => vec!["vip", "lead"],
            1 => vec!["trial"],
            2 => vec![],
            _ => vec!["lead"],
        };
        c.insert("tags", tags);
        if children {
            let cid = c.get_object_id("_id").unwrap();
            for _ in 0..(i % 3) {
                let conv = ObjectId::new();
                convs.push(doc! {"_id": conv, "orgId": id, "contactId": cid});
                for _ in 0..(i % 4) {
                    msgs.push(doc! {"_id": ObjectId::new(), "orgId": id, "conversationId": conv, "contactId": cid});
                }
            }
        }
        contacts.push(c);
    }
    insert(db, "contacts", contacts.clone()).await;
    insert(db, "conversations", convs).await;
    insert(db, "messages", msgs).await;
    let applications: Vec<Document> = (0..7)
        .map(|i| {
            let mut a = contact(id, pipe, stages[1], 10_000 + i);
            a.insert("firstName", format!("Applicant{i}"));
            a
        })
        .collect();
    insert(db, "applications", applications.clone()).await;
    Org {
        id,
        stages,
        owners,
        contacts,
        applications,
    }
}

fn oid(c: &Document) -> ObjectId {
    c.get_object_id("_id").unwrap()
}
fn stage(c: &Document) -> ObjectId {
    c.get_object_id("stageId").unwrap()
}
fn owner(c: &Document) -> Option<ObjectId> {
    c.get_object_id("ownerId").ok()
}
fn has_tag(c: &Document, t: &str) -> bool {
    c.get_array("tags")
        .map(|a| a.iter().any(|x| x.as_str() == Some(t)))
        .unwrap_or(false)
}
fn created_ms(c: &Document) -> i64 {
    c.get_datetime("createdAt").unwrap().timestamp_millis()
}
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The CSV row the seven default columns give for a seeded contact.
fn expected_row(org: &Org, c: &Document) -> Vec<String> {
    let s = |k: &str| c.get_str(k).unwrap_or_default().to_string();
    let stage_name = STAGE_NAMES[org.stages.iter().position(|s| *s == stage(c)).unwrap()];
    vec![
        s("firstName"),
        s("lastName"),
        s("phone"),
        s("email"),
        "Sales".to_string(),
        stage_name.to_string(),
        c.get_datetime("createdAt")
            .unwrap()
            .to_chrono()
            .format("%Y-%m-%d")
            .to_string(),
    ]
}

fn csv_rows(data: &[u8]) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(data)
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect()
}

fn header_row() -> Vec<String> {
    HEADER.trim_end().split(',').map(String::from).collect()
}

/// The ids of an export made with `fields: ["id"]`.
fn id_column(data: &[u8]) -> Vec<String> {
    let rows = csv_rows(data);
    assert_eq!(rows[0], ["Id"], "header of an id-only export");
    rows[1..].iter().map(|r| r[0].clone()).collect()
}

fn hex_ids<'a>(docs: impl IntoIterator<Item = &'a Document>) -> Vec<String> {
    docs.into_iter().map(|c| oid(c).to_hex()).collect()
}

async fn count_docs(db: &mongodb::Database, coll: &str, filter: Document) -> u64 {
    db.collection::<Document>(coll)
        .count_documents(filter)
        .await
        .unwrap()
}

// ---------- auth ----------

#[tokio::test]
async fn every_endpoint_answers_401_403_and_404_for_other_organisations() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 30, None, false).await;
    let b = seed(&db, 10, Some(a.stages.clone()), false).await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let ta = token(a.id, ALL);
    let tb = token(b.id, ALL);

    // One finished export and one finished delete of organisation A.
    let (st, exp) = api
        .call(Method::POST, "/api/exports", Some(&ta), Some(&json!({})))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{exp}");
    let exp = exp["jobId"].as_str().unwrap().to_string();
    let (st, del) = api
        .call(
            Method::DELETE,
            "/api/contacts/query-bulk-delete",
            Some(&ta),
            Some(&json!({"stageIds": [ObjectId::new().to_hex()]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{del}");
    let del = del["jobId"].as_str().unwrap().to_string();
    let exp_snap = api.terminal(&format!("/api/exports/{exp}"), &ta).await;
    assert_eq!(exp_snap["status"], "completed", "{exp_snap}");
    api.terminal(&format!("/api/contacts/bulk-job/{del}"), &ta)
        .await;

    let nobody = ObjectId::new().to_hex();
    // (method, path, body, scopes that are NOT enough)
    let endpoints: Vec<(Method, String, Option<Value>, &str)> = vec![
        (
            Method::GET,
            "/api/contacts/query-bulk-export?orgWide=true".into(),
            None,
            "contacts:delete jobs:read",
        ),
        (
            Method::POST,
            "/api/contacts/query-count".into(),
            Some(json!({"orgWide": true})),
            "profile:read",
        ),
        (
            Method::DELETE,
            "/api/contacts/query-bulk-delete".into(),
            Some(json!({"stageIds": [nobody]})),
            "contacts:export jobs:read",
        ),
        (
            Method::POST,
            "/api/contacts/query-delete-preview".into(),
            Some(json!({"orgWide": true})),
            "contacts:export jobs:read",
        ),
        (
            Method::GET,
            format!("/api/contacts/bulk-job/{del}"),
            None,
            "contacts:export contacts:delete",
        ),
        (
            Method::POST,
            format!("/api/contacts/bulk-job/{exp}/cancel"),
            None,
            "contacts:delete jobs:read",
        ),
        (
            Method::POST,
            format!("/api/contacts/bulk-job/{del}/cancel"),
            None,
            "contacts:export jobs:read",
        ),
        (
            Method::POST,
            "/api/exports".into(),
            Some(json!({})),
            "contacts:delete jobs:read",
        ),
        (
            Method::GET,
            format!("/api/exports/{exp}"),
            None,
            "contacts:delete",
        ),
        (
            Method::GET,
            format!("/api/exports/{exp}/download"),
            None,
            "contacts:delete",
        ),
        (
            Method::GET,
            "/api/jobs".into(),
            None,
            "contacts:export contacts:delete",
        ),
        (Method::GET, "/api/pipelines".into(), None, ""),
    ];

    let org_a = a.id.to_hex();
    let bad_auth: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("garbage bearer", Some("Bearer not.a.jwt".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("Basic scheme", Some("Basic dXNlcjpwYXNz".into())),
        (
            "wrong secret",
            Some(format!(
                "Bearer {}",
                token_with(&org_a, ALL, 3600, "another-secret")
            )),
        ),
        (
            "expired",
            Some(format!("Bearer {}", token_with(&org_a, ALL, -3600, SECRET))),
        ),
        (
            "org claim not an ObjectId",
            Some(format!("Bearer {}", token_with("acme", ALL, 3600, SECRET))),
        ),
        (
            "alg none",
            Some(format!(
                "Bearer {}",
                unsigned_token(&org_a, ALL, now_secs() + 3600)
            )),
        ),
    ];

    for (method, path, body, weak_scopes) in &endpoints {
        let raw = body.as_ref().map(|b| serde_json::to_vec(b).unwrap());
        for (what, auth) in &bad_auth {
            let resp = api
                .send(method.clone(), path, auth.as_deref(), raw.clone())
                .await;
            let (st, v) = split(resp).await;
            assert_error(
                &format!("{method} {path} with {what}"),
                (st, &v),
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            );
        }
        let weak = token(a.id, weak_scopes);
        let (st, v) = api
            .call(method.clone(), path, Some(&weak), body.as_ref())
            .await;
        assert_error(
            &format!("{method} {path} with scopes '{weak_scopes}'"),
            (st, &v),
            StatusCode::FORBIDDEN,
            "forbidden",
        );
        // With every scope the same request succeeds.
        let resp = api
            .send(
                method.clone(),
                path,
                Some(&format!("Bearer {ta}")),
                raw.clone(),
            )
            .await;
        assert!(
            resp.status().is_success(),
            "{method} {path} with all scopes: {}",
            resp.status()
        );
        resp.bytes().await.unwrap();
    }

    // Another organisation's jobs, and unknown ids, are 404 on every job endpoint.
    let unknown = uuid::Uuid::new_v4().to_string();
    for id in [&exp, &del] {
        for (method, path) in [
            (Method::GET, format!("/api/contacts/bulk-job/{id}")),
            (Method::POST, format!("/api/contacts/bulk-job/{id}/cancel")),
        ] {
            let (st, v) = api.call(method.clone(), &path, Some(&tb), None).await;
            assert_error(
                &format!("{method} {path} by another org"),
                (st, &v),
                StatusCode::NOT_FOUND,
                "not_found",
            );
        }
    }
    for path in [
        format!("/api/exports/{exp}"),
        format!("/api/exports/{exp}/download"),
        format!("/api/exports/{unknown}"),
        format!("/api/exports/{unknown}/download"),
        format!("/api/contacts/bulk-job/{unknown}"),
        "/api/contacts/bulk-job/not-a-uuid".to_string(),
    ] {
        let (st, v) = api.get(&path, &tb).await;
        assert_error(
            &format!("GET {path} by another org"),
            (st, &v),
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }
    let (st, v) = api
        .call(
            Method::POST,
            &format!("/api/contacts/bulk-job/{unknown}/cancel"),
            Some(&ta),
            None,
        )
        .await;
    assert_error(
        "cancel of an unknown job",
        (st, &v),
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // A delete job is not an export.
    let (st, v) = api.get(&format!("/api/exports/{del}"), &ta).await;
    assert_error(
        "a delete job as an export",
        (st, &v),
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // The other organisation's job list and pipelines show nothing of A.
    let (_, jobs) = api.get("/api/jobs", &tb).await;
    assert_eq!(jobs["jobs"], json!([]), "{jobs}");
    let (_, jobs) = api.get("/api/jobs", &ta).await;
    let listed: BTreeSet<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["jobId"].as_str().unwrap())
        .collect();
    assert!(listed.contains(exp.as_str()) && listed.contains(del.as_str()));
    let (_, pipes) = api.get("/api/pipelines", &ta).await;
    let pipes = pipes["pipelines"].as_array().unwrap();
    assert_eq!(pipes.len(), 1);
    assert_eq!(pipes[0]["name"], "Sales");
    let stage_ids: Vec<String> = a.stages.iter().map(|s| s.to_hex()).collect();
    let got: Vec<&str> = pipes[0]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, stage_ids);

    // Refused requests started nothing: A has its two jobs plus the two of the
    // all-scopes round (an export and a delete).
    assert_eq!(count_docs(&db, "bulk_jobs", doc! {"orgId": a.id}).await, 4);
    assert_eq!(count_docs(&db, "bulk_jobs", doc! {"orgId": b.id}).await, 0);
    assert_eq!(count_docs(&db, "contacts", doc! {}).await, 40);
}

/// A JWT with `alg: none` and no signature.
fn unsigned_token(org: &str, scope: &str, exp: i64) -> String {
    use base64::Engine;
    let b64 = |v: Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap())
    };
    format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": ObjectId::new().to_hex(), "org": org, "exp": exp, "scope": scope}))
    )
}

// ---------- validation ----------

#[tokio::test]
async fn bad_filter_bodies_are_400_naming_the_field_and_start_nothing() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 20, None, false).await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let t = token(org.id, ALL);
    let s = org.stages[0].to_hex();

    // Bodies that are the filter: fields are the body's own keys.
    let cases: Vec<(&str, &str)> = vec![
        ("{}", "stageIds"),
        (r#"{"stageIds": []}"#, "stageIds"),
        (r#"{"orgWide": false}"#, "stageIds"),
        (r#"{"stageIds": "abc"}"#, "stageIds"),
        (r#"{"stageIds": ["zz"]}"#, "stageIds[0]"),
        (r#"{"stageIds": ["S", {"$ne": null}]}"#, "stageIds[1]"),
        (r#"{"orgWide": "yes"}"#, "orgWide"),
        (
            r#"{"orgWide": true, "pipelineType": "Deal"}"#,
            "pipelineType",
        ),
        (r#"{"orgWide": true, "ownerFilter": "mine"}"#, "ownerFilter"),
        (r#"{"orgWide": true, "$where": "1"}"#, "$where"),
        (r#"{"orgWide": true, "stage": "x"}"#, "stage"),
        (
            r#"{"orgWide": true, "advancedParams": "x"}"#,
            "advancedParams",
        ),
        (
            r#"{"orgWide": true, "advancedParams": {"$where": "1"}}"#,
            "advancedParams.$where",
        ),
        (
            r#"{"orgWide": true, "advancedParams": {"createdAfter": {"$gt": 1}}}"#,
            "advancedParams.createdAfter",
        ),
        (
            r#"{"orgWide": true, "advancedParams": {"createdAfter": "yesterday"}}"#,
            "advancedParams.createdAfter",
        ),
        (
            r#"{"orgWide": true, "advancedParams": {"createdBefore": 5}}"#,
            "advancedParams.createdBefore",
        ),
        (
            r#"{"orgWide": true, "advancedParams": {"tags": [{"$ne": 1}]}}"#,
            "advancedParams.tags[0]",
        ),
        (
            r#"{"orgWide": true, "advancedParams": {"anyTags": "vip"}}"#,
            "advancedParams.anyTags",
        ),
        (
            r#"{"orgWide": true, "advancedParams": {"ownerIds": ["x"]}}"#,
            "advancedParams.ownerIds[0]",
        ),
        ("not json", "body"),
        ("[]", "body"),
        ("null", "body"),
        (r#""orgWide""#, "body"),
    ];
    let endpoints = [
        (Method::POST, "/api/contacts/query-count"),
        (Method::DELETE, "/api/contacts/query-bulk-delete"),
        (Method::POST, "/api/contacts/query-delete-preview"),
    ];
    let auth = format!("Bearer {t}");
    for (body, field) in &cases {
        let body = body.replace("\"S\"", &format!("\"{s}\""));
        for (method, path) in &endpoints {
            let resp = api
                .send(
                    method.clone(),
                    path,
                    Some(&auth),
                    Some(body.clone().into_bytes()),
                )
                .await;
            let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
            let (st, v) = split(resp).await;
            let what = format!("{method} {path} with {body}");
            assert_error(&what, (st, &v), StatusCode::BAD_REQUEST, "validation_error");
            assert!(ct.starts_with("application/json"), "{what}: {ct}");
            assert_eq!(v["field"], *field, "{what}: {v}");
            assert!(
                v["message"].as_str().unwrap().contains(field),
                "{what}: the message names the field: {v}"
            );
        }
    }
    // `limit` is for exports: refused on deletes, checked on counts.
    for (method, path, body) in [
        (
            Method::DELETE,
            "/api/contacts/query-bulk-delete",
            json!({"orgWide": true, "limit": 5}),
        ),
        (
            Method::POST,
            "/api/contacts/query-delete-preview",
            json!({"orgWide": true, "limit": 5}),
        ),
        (
            Method::POST,
            "/api/contacts/query-count",
            json!({"orgWide": true, "limit": 0}),
        ),
    ] {
        let (st, v) = api.call(method.clone(), path, Some(&t), Some(&body)).await;
        assert_error(
            &format!("{method} {path}"),
            (st, &v),
            StatusCode::BAD_REQUEST,
            "validation_error",
        );
        assert_eq!(v["field"], "limit", "{v}");
    }

    // POST /api/exports holds the filter under its own `filter` key.
    let export_cases: Vec<(Value, &str)> = vec![
        (
            json!({"filter": {"stageIds": ["zz"]}}),
            "filter.stageIds[0]",
        ),
        (json!({"filter": {}}), "filter.stageIds"),
        (json!({"filter": "all"}), "filter"),
        (
            json!({"filter": {"orgWide": true, "advancedParams": {"createdAfter": "x"}}}),
            "filter.advancedParams.createdAfter",
        ),
        (
            json!({"filter": {"orgWide": true, "limit": -1}}),
            "filter.limit",
        ),
        (json!({"format": "xml"}), "format"),
        (json!({"gzip": "yes"}), "gzip"),
        (json!({"fields": "id"}), "fields"),
        (json!({"fields": ["id", "password"]}), "fields[1]"),
        (json!({"tagIds": "vip"}), "tagIds"),
        (json!({"tagIds": ["vip", 1]}), "tagIds[1]"),
        (json!({"filename": 5}), "filename"),
        (json!({"orgId": org.id.to_hex()}), "orgId"),
        (json!({"filtr": {}}), "filtr"),
        (json!([]), "body"),
    ];
    for (body, field) in &export_cases {
        let (st, v) = api
            .call(Method::POST, "/api/exports", Some(&t), Some(body))
            .await;
        let what = format!("POST /api/exports with {body}");
        assert_error(&what, (st, &v), StatusCode::BAD_REQUEST, "validation_error");
        assert_eq!(v["field"], *field, "{what}: {v}");
    }

    // The streamed export reads its filter from the query string.
    let query_cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![], "stageIds"),
        (vec![("orgWide", "false".into())], "stageIds"),
        (vec![("stageIds", "".into())], "stageIds"),
        (vec![("stageIds", " , ".into())], "stageIds"),
        (vec![("stageIds", "zz".into())], "stageIds[0]"),
        (vec![("stageIds", format!("{s},zz"))], "stageIds[1]"),
        (vec![("orgWide", "maybe".into())], "orgWide"),
        (
            vec![("orgWide", "true".into()), ("pipelineType", "Deal".into())],
            "pipelineType",
        ),
        (
            vec![("orgWide", "true".into()), ("ownerFilter", "mine".into())],
            "ownerFilter",
        ),
        (
            vec![
                ("orgWide", "true".into()),
                ("advancedParams", r#"{"$where": "1"}"#.into()),
            ],
            "advancedParams.$where",
        ),
        (
            vec![
                ("orgWide", "true".into()),
                ("advancedParams", r#"{"createdAfter": {"$gt": 1}}"#.into()),
            ],
            "advancedParams.createdAfter",
        ),
        (
            vec![("orgWide", "true".into()), ("advancedParams", "[1]".into())],
            "advancedParams",
        ),
        (
            vec![("orgWide", "true".into()), ("limit", "0".into())],
            "limit",
        ),
    ];
    for (params, field) in &query_cases {
        let url = reqwest::Url::parse_with_params(
            &api.url("/api/contacts/query-bulk-export"),
            params.iter().map(|(k, v)| (*k, v.as_str())),
        )
        .unwrap();
        let resp = api
            .http
            .get(url.clone())
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        let (st, v) = split(resp).await;
        let what = format!("GET {url}");
        assert_error(&what, (st, &v), StatusCode::BAD_REQUEST, "validation_error");
        assert!(ct.starts_with("application/json"), "{what}: {ct}");
        assert_eq!(v["field"], *field, "{what}: {v}");
    }

    assert_eq!(
        count_docs(&db, "bulk_jobs", doc! {}).await,
        0,
        "no job was started"
    );
    assert_eq!(count_docs(&db, "contacts", doc! {}).await, 20);
}

// ---------- the streamed export and counts ----------

type Pred = Box<dyn Fn(&Document) -> bool>;
/// Query-string parameters.
type Params = Vec<(&'static str, String)>;

#[tokio::test]
async fn query_bulk_export_streams_exactly_the_filtered_contacts_and_counts_agree() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 1200, None, false).await;
    // Another organisation using the very same stage ids.
    let other = seed(&db, 300, Some(org.stages.clone()), false).await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let t = token(org.id, "contacts:export");
    let [s0, s1, s2] = [0, 1, 2].map(|i| org.stages[i]);
    let [h0, h1, h2] = [s0, s1, s2].map(|s| s.to_hex());
    let o1 = org.owners[1];
    let (after, before) = (
        created_ms(&org.contacts[100]),
        created_ms(&org.contacts[250]),
    );

    // (query string, the same filter as a JSON body, which contacts match)
    let cases: Vec<(Params, Value, Pred)> = vec![
        (
            vec![("stageIds", format!("{h0},{h1}"))],
            json!({"stageIds": [h0, h1]}),
            Box::new(move |c| stage(c) == s0 || stage(c) == s1),
        ),
        (
            vec![
                ("stageIds", format!(" {h0} , {h1} ,")),
                ("ownerFilter", "owned".into()),
            ],
            json!({"stageIds": [h0, h1], "ownerFilter": "owned"}),
            Box::new(move |c| (stage(c) == s0 || stage(c) == s1) && owner(c).is_some()),
        ),
        (
            vec![("stageIds", h2.clone()), ("ownerFilter", "unowned".into())],
            json!({"stageIds": [h2], "ownerFilter": "unowned"}),
            Box::new(move |c| stage(c) == s2 && owner(c).is_none()),
        ),
        (
            vec![("orgWide", "true".into())],
            json!({"orgWide": true}),
            Box::new(|_| true),
        ),
        (
            // With orgWide the stage list is ignored, even a malformed one.
            vec![("orgWide", "true".into()), ("stageIds", "zz".into())],
            json!({"orgWide": true, "stageIds": ["zz"]}),
            Box::new(|_| true),
        ),
        (
            vec![
                ("orgWide", "true".into()),
                (
                    "advancedParams",
                    json!({"createdAfter": rfc3339(after), "createdBefore": rfc3339(before)})
                        .to_string(),
                ),
            ],
            json!({"orgWide": true, "advancedParams": {"createdAfter": rfc3339(after), "createdBefore": rfc3339(before)}}),
            Box::new(move |c| created_ms(c) >= after && created_ms(c) < before),
        ),
        (
            vec![
                ("orgWide", "true".into()),
                ("advancedParams", r#"{"tags": ["vip", "lead"]}"#.into()),
            ],
            json!({"orgWide": true, "advancedParams": {"tags": ["vip", "lead"]}}),
            Box::new(|c| has_tag(c, "vip") && has_tag(c, "lead")),
        ),
        (
            vec![
                ("stageIds", h0.clone()),
                ("advancedParams", r#"{"anyTags": ["vip", "trial"]}"#.into()),
            ],
            json!({"stageIds": [h0], "advancedParams": {"anyTags": ["vip", "trial"]}}),
            Box::new(move |c| stage(c) == s0 && (has_tag(c, "vip") || has_tag(c, "trial"))),
        ),
        (
            vec![
                ("orgWide", "true".into()),
                ("ownerFilter", "owned".into()),
                (
                    "advancedParams",
                    json!({"ownerIds": [o1.to_hex()]}).to_string(),
                ),
            ],
            json!({"orgWide": true, "ownerFilter": "owned", "advancedParams": {"ownerIds": [o1.to_hex()]}}),
            Box::new(move |c| owner(c) == Some(o1)),
        ),
        (
            // Malformed advancedParams JSON is ignored (seed 000).
            vec![
                ("orgWide", "true".into()),
                ("advancedParams", "{not json".into()),
            ],
            json!({"orgWide": true}),
            Box::new(|_| true),
        ),
        (
            vec![("stageIds", h1.clone()), ("advancedParams", "%%%".into())],
            json!({"stageIds": [h1]}),
            Box::new(move |c| stage(c) == s1),
        ),
        (
            vec![("stageIds", ObjectId::new().to_hex())],
            json!({"stageIds": [ObjectId::new().to_hex()]}),
            Box::new(|_| false),
        ),
    ];

    for (params, filter, pred) in &cases {
        let expected: Vec<Vec<String>> = org
            .contacts
            .iter()
            .filter(|c| pred(c))
            .map(|c| expected_row(&org, c))
            .collect();
        let (data, disposition, ct) = stream_export(&api, &t, params).await;
        let what = format!("{params:?}");
        assert!(ct.starts_with("text/csv"), "{what}: {ct}");
        check_disposition(&disposition);
        assert!(data.starts_with(HEADER.as_bytes()), "{what}");
        assert!(
            data.ends_with(b"\n") && !data.windows(2).any(|w| w == b"\r\n"),
            "{what}: \\n line ends"
        );
        let rows = csv_rows(&data);
        assert_eq!(rows[0], header_row(), "{what}");
        assert_eq!(rows.len() - 1, expected.len(), "{what}: row count");
        assert_eq!(rows[1..], expected[..], "{what}: rows");

        // The same filter as a body counts the same contacts.
        let (st, v) = api
            .call(
                Method::POST,
                "/api/contacts/query-count",
                Some(&token(org.id, "jobs:read")),
                Some(filter),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "count {filter}: {v}");
        assert_eq!(v, json!({"count": expected.len()}), "count {filter}");
    }

    // `limit` gives the first rows in _id order; counts are capped the same way.
    let (data, _, _) = stream_export(
        &api,
        &t,
        &[("orgWide", "true".into()), ("limit", "7".into())],
    )
    .await;
    let expected: Vec<Vec<String>> = org.contacts[..7]
        .iter()
        .map(|c| expected_row(&org, c))
        .collect();
    assert_eq!(csv_rows(&data)[1..], expected[..]);
    let (_, v) = api
        .call(
            Method::POST,
            "/api/contacts/query-count",
            Some(&t),
            Some(&json!({"orgWide": true, "limit": 7})),
        )
        .await;
    assert_eq!(v["count"], 7);

    // pipelineType=Application reads the applications collection.
    let (data, _, _) = stream_export(
        &api,
        &t,
        &[
            ("orgWide", "true".into()),
            ("pipelineType", "Application".into()),
        ],
    )
    .await;
    let expected: Vec<Vec<String>> = org
        .applications
        .iter()
        .map(|c| expected_row(&org, c))
        .collect();
    assert_eq!(csv_rows(&data)[1..], expected[..]);
    let (_, v) = api
        .call(
            Method::POST,
            "/api/contacts/query-count",
            Some(&t),
            Some(&json!({"orgWide": true, "pipelineType": "Application"})),
        )
        .await;
    assert_eq!(v["count"], org.applications.len());

    // The other organisation sees only its own contacts through the same stages.
    let (data, _, _) = stream_export(
        &api,
        &token(other.id, ALL),
        &[("stageIds", format!("{h0},{h1},{h2}"))],
    )
    .await;
    let expected: Vec<Vec<String>> = other
        .contacts
        .iter()
        .map(|c| expected_row(&other, c))
        .collect();
    assert_eq!(csv_rows(&data)[1..], expected[..]);
}

/// Asserts `attachment; filename="contacts-YYYY-MM-DD.csv"` with today's (UTC) date.
fn check_disposition(disposition: &str) {
    let today = chrono::Utc::now().date_naive();
    let ok = [today.pred_opt().unwrap(), today].iter().any(|d| {
        disposition
            == format!(
                "attachment; filename=\"contacts-{}.csv\"",
                d.format("%Y-%m-%d")
            )
    });
    assert!(ok, "Content-Disposition: {disposition}");
}

/// `GET /api/contacts/query-bulk-export` with `params`: body, Content-Disposition, Content-Type.
async fn stream_export(
    api: &Api,
    token: &str,
    params: &[(&str, String)],
) -> (Vec<u8>, String, String) {
    let url = reqwest::Url::parse_with_params(
        &api.url("/api/contacts/query-bulk-export"),
        params.iter().map(|(k, v)| (*k, v.as_str())),
    )
    .unwrap();
    let resp = api
        .http
        .get(url.clone())
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "GET {url}");
    let header = |k: &str| {
        resp.headers()
            .get(k)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (disposition, ct) = (header("content-disposition"), header("content-type"));
    let data = resp.bytes().await.unwrap().to_vec();
    (data, disposition, ct)
}

#[tokio::test]
async fn a_large_export_is_streamed_before_it_is_complete() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 30_000, None, false).await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let mut resp = api
        .http
        .get(api.url("/api/contacts/query-bulk-export?orgWide=true"))
        .bearer_auth(token(org.id, "contacts:export"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.content_length().is_none(),
        "a streamed body has no Content-Length"
    );
    // The first chunk is here while the rest of the body is still to come.
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    assert!(
        first.starts_with(HEADER.as_bytes()),
        "the first chunk starts with the header line: {:?}",
        String::from_utf8_lossy(&first[..first.len().min(200)])
    );
    let mut data = first.to_vec();
    let mut chunks = 1;
    while let Some(c) = resp.chunk().await.unwrap() {
        data.extend_from_slice(&c);
        chunks += 1;
    }
    assert!(chunks > 2, "the body came in {chunks} chunk(s)");
    assert!(
        first.len() < data.len() / 10,
        "the first chunk is a small part"
    );
    let rows = csv_rows(&data);
    assert_eq!(rows.len(), 30_001);
    let expected: Vec<Vec<String>> = org.contacts.iter().map(|c| expected_row(&org, c)).collect();
    assert_eq!(rows[1..], expected[..]);
}

// ---------- deletes ----------

#[tokio::test]
async fn bulk_delete_is_found_by_the_very_next_poll_and_completes() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 600, None, true).await;
    let other = seed(&db, 200, Some(org.stages.clone()), true).await;
    let svc = stack.service_with(|c| c.delete_batch = 50).await;
    let api = Api::new(svc.addr);
    let t = token(org.id, ALL);
    let client = stack.client().await;
    let filter = json!({"stageIds": [org.stages[0].to_hex(), org.stages[1].to_hex()]});

    // The preview equals the dry run of the NATS command.
    let (st, preview) = api
        .call(
            Method::POST,
            "/api/contacts/query-delete-preview",
            Some(&t),
            Some(&filter),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{preview}");
    let dry = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.id.to_hex(), "filter": filter, "dryRun": true}),
    )
    .await;
    assert_eq!(preview["counts"], dry["counts"], "{preview} vs {dry}");
    assert_eq!(
        count_docs(&db, "bulk_jobs", doc! {}).await,
        0,
        "a preview starts no job"
    );

    let doomed: BTreeSet<ObjectId> = org
        .contacts
        .iter()
        .filter(|c| stage(c) != org.stages[2])
        .map(oid)
        .collect();
    let (st, reply) = api
        .call(
            Method::DELETE,
            "/api/contacts/query-bulk-delete",
            Some(&t),
            Some(&filter),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["message"], "Bulk delete started");
    assert!(is_uuid(&reply["jobId"]), "{reply}");
    let job = reply["jobId"].as_str().unwrap().to_string();
    let path = format!("/api/contacts/bulk-job/{job}");
    let (st, first) = api.get(&path, &t).await;
    assert_eq!(st, StatusCode::OK, "the first poll finds the job: {first}");
    assert_eq!(first["jobId"], job);
    assert_eq!(first["kind"], "delete");
    assert_eq!(first["orgId"], org.id.to_hex());

    let snap = api.terminal(&path, &t).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["total"], doomed.len());
    assert_eq!(snap["processed"], doomed.len());
    assert_eq!(snap["counts"], preview["counts"]);
    assert!(
        snap["finishedAt"].is_string() && snap["error"].is_null(),
        "{snap}"
    );

    // The database agrees: those contacts and their children are gone, nothing else.
    let ids: Vec<ObjectId> = doomed.iter().copied().collect();
    assert_eq!(
        count_docs(&db, "contacts", doc! {"_id": {"$in": &ids}}).await,
        0
    );
    assert_eq!(
        count_docs(&db, "conversations", doc! {"contactId": {"$in": &ids}}).await,
        0
    );
    assert_eq!(
        count_docs(&db, "messages", doc! {"contactId": {"$in": &ids}}).await,
        0
    );
    assert_eq!(
        count_docs(&db, "contacts", doc! {"orgId": org.id}).await as usize,
        org.contacts.len() - doomed.len()
    );
    assert_eq!(
        count_docs(&db, "contacts", doc! {"orgId": other.id}).await,
        200
    );
    assert_eq!(
        count_docs(
            &db,
            "event_logs",
            doc! {"jobId": &job, "type": "CONTACT_DELETE"}
        )
        .await as usize,
        doomed.len()
    );

    // Back-to-back deletes: every reply is followed by a poll that finds its job.
    for _ in 0..5 {
        let (st, reply) = api
            .call(
                Method::DELETE,
                "/api/contacts/query-bulk-delete",
                Some(&t),
                Some(&json!({"stageIds": [ObjectId::new().to_hex()]})),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{reply}");
        let path = format!(
            "/api/contacts/bulk-job/{}",
            reply["jobId"].as_str().unwrap()
        );
        let (st, v) = api.get(&path, &t).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let done = api.terminal(&path, &t).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["total"], 0);
    }
}

// ---------- exports and downloads ----------

#[tokio::test]
async fn exports_over_http_with_signed_downloads() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 1500, None, false).await;
    let other = seed(&db, 300, Some(org.stages.clone()), false).await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let t = token(org.id, "contacts:export jobs:read");
    let s0 = org.stages[0];
    let s1 = org.stages[1];

    // (body, which contacts; None body = no body at all)
    let cases: Vec<(Option<Value>, Pred)> = vec![
        (None, Box::new(|_| true)),
        (Some(json!({"fields": ["id"]})), Box::new(|_| true)),
        (
            Some(
                json!({"fields": ["id"], "filter": {"stageIds": [s1.to_hex()], "ownerFilter": "owned"}}),
            ),
            Box::new(move |c| stage(c) == s1 && owner(c).is_some()),
        ),
        (
            Some(json!({"fields": ["id"], "tagIds": ["vip", "trial"]})),
            Box::new(|c| has_tag(c, "vip") || has_tag(c, "trial")),
        ),
        (
            Some(
                json!({"fields": ["id"], "tagIds": ["trial"], "filter": {"stageIds": [s0.to_hex()]}}),
            ),
            Box::new(move |c| stage(c) == s0 && has_tag(c, "trial")),
        ),
        (
            Some(
                json!({"fields": ["id"], "tagIds": [], "filter": null, "filename": "../vip \"list\""}),
            ),
            Box::new(|_| true),
        ),
    ];
    for (body, pred) in &cases {
        let what = format!("POST /api/exports with {body:?}");
        let expected: Vec<&Document> = org.contacts.iter().filter(|c| pred(c)).collect();
        let resp = api
            .send(
                Method::POST,
                "/api/exports",
                Some(&format!("Bearer {t}")),
                body.as_ref().map(|b| serde_json::to_vec(b).unwrap()),
            )
            .await;
        let (st, snap) = split(resp).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{what}: {snap}");
        assert!(is_uuid(&snap["jobId"]), "{what}: {snap}");
        assert_eq!(snap["kind"], "export");
        assert_eq!(snap["orgId"], org.id.to_hex());
        assert!(
            matches!(
                snap["status"].as_str(),
                Some("pending" | "processing" | "completed")
            ),
            "{what}: {snap}"
        );
        let job = snap["jobId"].as_str().unwrap().to_string();
        let path = format!("/api/exports/{job}");
        api.terminal(&path, &t).await;

        // Every GET signs a fresh link, valid 15 minutes from that GET.
        let issued = now_secs();
        let (st, snap) = api.get(&path, &t).await;
        let received = now_secs();
        assert_eq!(st, StatusCode::OK);
        assert_eq!(snap["status"], "completed", "{what}: {snap}");
        assert_eq!(snap["total"], expected.len(), "{what}");
        assert_eq!(snap["processed"], expected.len(), "{what}");
        let result = &snap["result"];
        assert_eq!(result["rows"], expected.len(), "{what}");
        let url = result["downloadUrl"]
            .as_str()
            .expect("downloadUrl")
            .to_string();
        assert!(url.starts_with(&api.base), "{url}");
        let expires_at =
            chrono::DateTime::parse_from_rfc3339(result["expiresAt"].as_str().unwrap())
                .unwrap()
                .timestamp();
        assert!(
            (issued + 900..=received + 900).contains(&expires_at),
            "{what}: expiresAt {expires_at} is 15 minutes after the GET ({issued}..{received})"
        );
        let file_name = result["fileName"].as_str().unwrap().to_string();

        // With a bearer token, and with the signed link alone: the same file.
        let by_bearer = api
            .send(
                Method::GET,
                &format!("{path}/download"),
                Some(&format!("Bearer {t}")),
                None,
            )
            .await;
        let linked = api.http.get(&url).send().await.unwrap();
        let mut bodies = Vec::new();
        for resp in [by_bearer, linked] {
            assert_eq!(resp.status(), StatusCode::OK, "{what}");
            assert_eq!(
                resp.headers()["content-disposition"],
                format!("attachment; filename=\"{file_name}\"").as_str()
            );
            assert!(resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/csv"));
            bodies.push(resp.bytes().await.unwrap().to_vec());
        }
        assert_eq!(bodies[0], bodies[1]);
        assert_eq!(result["bytes"], bodies[0].len());
        if body.as_ref().is_some_and(|b| b.get("fields").is_some()) {
            assert_eq!(id_column(&bodies[0]), hex_ids(expected), "{what}");
        } else {
            let rows = csv_rows(&bodies[0]);
            assert_eq!(rows[0], header_row());
            let want: Vec<Vec<String>> = expected.iter().map(|c| expected_row(&org, c)).collect();
            assert_eq!(rows[1..], want[..], "{what}");
        }
    }

    // The requested file name is sanitised.
    let (_, jobs) = api.get("/api/jobs", &t).await;
    let names: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["result"]["fileName"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"_vip__list_.csv"), "{names:?}");

    // Signed links: only exactly what was signed, only before it expires.
    let (_, jobs) = api.get("/api/jobs?limit=2", &t).await;
    let (j1, j2) = (
        jobs["jobs"][0]["jobId"].as_str().unwrap().to_string(),
        jobs["jobs"][1]["jobId"].as_str().unwrap().to_string(),
    );
    let (_, snap) = api.get(&format!("/api/exports/{j1}"), &t).await;
    let url = snap["result"]["downloadUrl"].as_str().unwrap().to_string();
    let good = path_of(&url);
    let sig = url.rsplit("signature=").next().unwrap().to_string();
    let exp: i64 = url
        .split("expires=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let flipped = {
        let mut s = sig.clone().into_bytes();
        let last = s.last_mut().unwrap();
        *last = if *last == b'0' { b'1' } else { b'0' };
        String::from_utf8(s).unwrap()
    };
    let later = now_secs() + 600;
    let past = now_secs() - 10;
    let dl = |job: &str, q: String| format!("/api/exports/{job}/download{q}");
    // A signature made like the service's (a control that the others fail for their reason).
    let control = dl(
        &j1,
        format!("?expires={later}&signature={}", link_signature(&j1, later)),
    );
    let (st, _) = split(api.send(Method::GET, &control, None, None).await).await;
    assert_eq!(st, StatusCode::OK, "a correctly signed link works");
    let (st, _) = split(api.send(Method::GET, &good, None, None).await).await;
    assert_eq!(st, StatusCode::OK);
    for (what, path) in [
        (
            "tampered signature",
            dl(&j1, format!("?expires={exp}&signature={flipped}")),
        ),
        (
            "later expiry",
            dl(&j1, format!("?expires={}&signature={sig}", exp + 60)),
        ),
        (
            "another job's link",
            dl(&j2, format!("?expires={exp}&signature={sig}")),
        ),
        (
            "expired link",
            dl(
                &j1,
                format!("?expires={past}&signature={}", link_signature(&j1, past)),
            ),
        ),
        ("no signature", dl(&j1, format!("?expires={exp}"))),
        ("no expiry", dl(&j1, format!("?signature={sig}"))),
        (
            "bad expiry",
            dl(&j1, format!("?expires=soon&signature={sig}")),
        ),
        (
            "signature not hex",
            dl(&j1, format!("?expires={exp}&signature=zz")),
        ),
        ("nothing", dl(&j1, String::new())),
    ] {
        let (st, v) = split(api.send(Method::GET, &path, None, None).await).await;
        assert_error(what, (st, &v), StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // A bearer of another organisation does not open the file, even with a link.
    let (st, v) = split(
        api.send(
            Method::GET,
            &good,
            Some(&format!("Bearer {}", token(other.id, ALL))),
            None,
        )
        .await,
    )
    .await;
    assert_error(
        "other org's bearer",
        (st, &v),
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn an_unfinished_export_is_409_and_cancel_returns_the_snapshot() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 20_000, None, false).await;
    let svc = stack
        .service_with(|c| {
            c.export_batch = 20;
            c.delete_batch = 20;
        })
        .await;
    let api = Api::new(svc.addr);
    let t = token(org.id, ALL);

    let (st, snap) = api
        .call(
            Method::POST,
            "/api/exports",
            Some(&t),
            Some(&json!({"filter": {"orgWide": true}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{snap}");
    let job = snap["jobId"].as_str().unwrap().to_string();
    let download = format!("/api/exports/{job}/download");
    let (st, v) = api.get(&download, &t).await;
    assert_error(
        "download before completion",
        (st, &v),
        StatusCode::CONFLICT,
        "conflict",
    );

    let cancel = format!("/api/contacts/bulk-job/{job}/cancel");
    let (st, snap) = api.call(Method::POST, &cancel, Some(&t), None).await;
    assert_eq!(st, StatusCode::OK, "{snap}");
    assert_eq!(snap["jobId"], job);
    assert_eq!(snap["kind"], "export");
    assert_eq!(snap["status"], "cancelled", "{snap}");
    assert!(snap["result"].is_null(), "{snap}");
    let processed = snap["processed"].as_i64().unwrap();
    assert!(processed < 20_000, "{snap}");
    // The snapshot is final: GETs and a second cancel show the same.
    let (_, again) = api.get(&format!("/api/exports/{job}"), &t).await;
    assert_eq!(again["status"], "cancelled");
    assert_eq!(again["processed"], processed);
    let (st, again) = api.call(Method::POST, &cancel, Some(&t), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(again["status"], "cancelled");
    assert_eq!(again["processed"], processed);
    let (st, v) = api.get(&download, &t).await;
    assert_error(
        "download of a cancelled export",
        (st, &v),
        StatusCode::CONFLICT,
        "conflict",
    );

    // A cancelled delete: the snapshot says exactly what the database shows.
    let (st, reply) = api
        .call(
            Method::DELETE,
            "/api/contacts/query-bulk-delete",
            Some(&t),
            Some(&json!({"orgWide": true})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{reply}");
    let del = reply["jobId"].as_str().unwrap();
    let (st, snap) = api
        .call(
            Method::POST,
            &format!("/api/contacts/bulk-job/{del}/cancel"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{snap}");
    assert_eq!(snap["kind"], "delete");
    assert_eq!(snap["status"], "cancelled", "{snap}");
    let gone = 20_000 - count_docs(&db, "contacts", doc! {"orgId": org.id}).await;
    assert_eq!(snap["counts"]["contacts"], gone, "{snap}");
    assert_eq!(snap["processed"], gone, "{snap}");
    assert!(gone < 20_000);
}

// ---------- health and the page ----------

#[tokio::test]
async fn healthz_is_200_then_503_once_mongodb_is_gone() {
    let mut stack = Stack::start().await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let (st, v) = split(api.send(Method::GET, "/healthz", None, None).await).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    stack.mongo.kill().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = split(api.send(Method::GET, "/healthz", None, None).await).await;
        if st == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(v["mongodb"], false, "{v}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "healthz still {st} 30 s after MongoDB died: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn healthz_is_503_once_nats_is_gone() {
    let mut stack = Stack::start().await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let (st, _) = split(api.send(Method::GET, "/healthz", None, None).await).await;
    assert_eq!(st, StatusCode::OK);
    stack.nats.kill().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = split(api.send(Method::GET, "/healthz", None, None).await).await;
        if st == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(v["nats"], false, "{v}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "healthz still {st} 30 s after NATS died: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_without_a_token() {
    let stack = Stack::start().await;
    let svc = stack.service().await;
    let api = Api::new(svc.addr);
    let mut seen = HashMap::new();
    for (path, ct) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/app.css", "text/css"),
    ] {
        let resp = api.send(Method::GET, path, None, None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let got = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(got.starts_with(ct), "{path}: {got}");
        seen.insert(path, resp.text().await.unwrap());
    }
    let page = &seen["/"];
    for hook in [
        "id=\"token-input\"",
        "id=\"token-save\"",
        "id=\"org-label\"",
        "id=\"jobs\"",
        "id=\"export-count-btn\"",
        "id=\"delete-start\"",
        "src=\"/app.js\"",
        "href=\"/app.css\"",
    ] {
        assert!(page.contains(hook), "the page has {hook}");
    }
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no CDN"
    );
    assert!(seen["/app.js"].contains("/api/contacts/query-count"));
}
