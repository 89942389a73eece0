//! Webhooks against real servers and a real HTTP receiver on 127.0.0.1 in the
//! test: registration rules, signed deliveries, retries with one delivery id,
//! redirects not followed, the SSRF guard at registration and at delivery, and
//! a pending delivery surviving a SIGKILL of the binary.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use bson::{doc, oid::ObjectId, DateTime, Document};
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, BufReader};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    answered: u16,
}

#[derive(Default)]
struct ReceiverState {
    hits: Mutex<Vec<Hit>>,
    /// Answers to give next, in order; then `fallback`.
    plan: Mutex<VecDeque<u16>>,
    fallback: Mutex<u16>,
    notify: tokio::sync::Notify,
}

/// A local HTTP receiver: `/redirect` answers 302 to `/landing`, `/slow`
/// answers after 3 s, every other path answers from the plan.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    async fn start() -> Receiver {
        let state = Arc::new(ReceiverState::default());
        *state.fallback.lock().unwrap() = 200;
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = shared.clone();
            async move {
                let path = uri.path().to_string();
                let (answer, location) = if path == "/redirect" {
                    (302, Some("/landing"))
                } else if path == "/slow" {
                    (200, None)
                } else {
                    let planned = state.plan.lock().unwrap().pop_front();
                    (planned.unwrap_or(*state.fallback.lock().unwrap()), None)
                };
                state.hits.lock().unwrap().push(Hit {
                    path,
                    headers,
                    body,
                    answered: answer,
                });
                state.notify.notify_waiters();
                if uri.path() == "/slow" {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                let status = StatusCode::from_u16(answer).unwrap();
                match location {
                    Some(l) => (status, [("location", l)]).into_response(),
                    None => (status, "ok").into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn plan(&self, answers: &[u16]) {
        self.state.plan.lock().unwrap().extend(answers);
    }

    fn set_fallback(&self, status: u16) {
        *self.state.fallback.lock().unwrap() = status;
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        let hits = self.state.hits.lock().unwrap();
        hits.iter().filter(|h| h.path == path).cloned().collect()
    }

    /// Waits until `pred` holds for the hits on `path`.
    async fn wait(&self, path: &str, secs: u64, pred: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let notified = self.state.notify.notified();
            let hits = self.hits(path);
            if pred(&hits) {
                return hits;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "receiver: condition on {path} not met within {secs} s; hits: {}",
                hits.len()
            );
        }
    }
}

/// Checks `Bulk-Signature` the way a receiver would (Stripe's scheme).
fn verify(secret: &str, hit: &Hit) -> bool {
    let header = hit.headers["bulk-signature"].to_str().unwrap();
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_string()),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    let (t, v1) = (t.unwrap(), v1.unwrap());
    let age = contact_bulk::auth::now_secs() - t.parse::<i64>().unwrap();
    assert!(
        (0..300).contains(&age),
        "signature timestamp {t} is {age} s old"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&hit.body);
    mac.verify_slice(&hex::decode(v1).unwrap()).is_ok()
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn call(
    method: reqwest::Method,
    base: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http().request(method, format!("http://{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn register(base: SocketAddr, org: ObjectId, body: Value) -> (u16, Value) {
    let t = token(org, "webhooks:manage");
    call(
        reqwest::Method::POST,
        base,
        "/api/webhooks",
        Some(&t),
        Some(body),
    )
    .await
}

/// Runs a whole-organisation export over HTTP to its end; returns its snapshot.
async fn finished_export(stack: &Stack, base: SocketAddr, org: ObjectId) -> Value {
    let t = token(org, "contacts:export");
    let (status, snap) = call(
        reqwest::Method::POST,
        base,
        "/api/exports",
        Some(&t),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 202, "{snap}");
    let client = stack.client().await;
    let job = snap["jobId"].as_str().unwrap().to_string();
    wait_terminal(&client, org, &job).await
}

/// The delivery log of a webhook, polled until `pred` holds.
async fn wait_log(
    base: SocketAddr,
    org: ObjectId,
    hook: &str,
    secs: u64,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let t = token(org, "webhooks:manage");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, log) = call(
            reqwest::Method::GET,
            base,
            &format!("/api/webhooks/{hook}/deliveries"),
            Some(&t),
            None,
        )
        .await;
        assert_eq!(status, 200, "{log}");
        if pred(&log) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivery log did not reach the expected state within {secs} s: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn registration_is_validated_scoped_isolated_and_hides_the_secret() {
    let stack = Stack::start().await;
    let svc = stack.service().await;
    let base = svc.addr;
    let org = ObjectId::new();
    let other = ObjectId::new();
    let body = json!({"url": "https://93.184.215.14/hooks/bulk"});

    let (s, e) = call(
        reqwest::Method::POST,
        base,
        "/api/webhooks",
        None,
        Some(body.clone()),
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (401, Some("unauthorized")));
    let read = token(org, "jobs:read contacts:export");
    for (method, path) in [
        (reqwest::Method::POST, "/api/webhooks"),
        (reqwest::Method::GET, "/api/webhooks"),
    ] {
        let (s, e) = call(method, base, path, Some(&read), Some(body.clone())).await;
        assert_eq!((s, e["error"].as_str()), (403, Some("forbidden")), "{e}");
    }

    for (bad, field) in [
        (json!({"url": "http://127.0.0.1:9/x"}), "url"),
        (json!({"url": "http://localhost:8080/x"}), "url"),
        (
            json!({"url": "http://169.254.169.254/latest/meta-data"}),
            "url",
        ),
        (json!({"url": "http://10.1.2.3/"}), "url"),
        (json!({"url": "http://192.168.0.10/"}), "url"),
        (json!({"url": "http://[::1]/"}), "url"),
        (json!({"url": "http://[fd00::1]/"}), "url"),
        (json!({"url": "http://[::ffff:127.0.0.1]/"}), "url"),
        (json!({"url": "ftp://93.184.215.14/"}), "url"),
        (json!({"url": "not a url"}), "url"),
        (
            json!({"url": format!("https://93.184.215.14/{}", "a".repeat(2048))}),
            "url",
        ),
        (json!({}), "url"),
        (json!({"url": 5}), "url"),
        (
            json!({"url": "https://93.184.215.14/", "secret": "mine"}),
            "secret",
        ),
        (
            json!({"url": "https://93.184.215.14/", "events": ["job.progress"]}),
            "events[0]",
        ),
        (
            json!({"url": "https://93.184.215.14/", "events": []}),
            "events",
        ),
        (
            json!({"url": "https://93.184.215.14/", "events": "job.failed"}),
            "events",
        ),
    ] {
        let (s, e) = register(base, org, bad.clone()).await;
        assert_eq!(s, 400, "{bad} -> {e}");
        assert_eq!(e["error"], "validation_error", "{bad} -> {e}");
        assert_eq!(e["field"], field, "{bad} -> {e}");
    }
    let stored = stack
        .db()
        .await
        .collection::<Document>("webhooks")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 0, "refused registrations store nothing");

    let (s, created) = register(base, org, body.clone()).await;
    assert_eq!(s, 201, "{created}");
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(
        secret.starts_with("whsec_") && secret.len() > 40,
        "{secret}"
    );
    assert_eq!(created["url"], "https://93.184.215.14/hooks/bulk");
    assert_eq!(
        created["events"],
        json!(["job.completed", "job.failed", "job.cancelled"])
    );
    assert!(created["createdAt"].as_str().unwrap().ends_with('Z'));
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 24);

    let manage = token(org, "webhooks:manage");
    let resp = http()
        .get(format!("http://{base}/api/webhooks"))
        .bearer_auth(&manage)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains(&secret) && !text.contains("secret"),
        "{text}"
    );
    let listed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(listed["webhooks"].as_array().unwrap().len(), 1);
    assert_eq!(listed["webhooks"][0]["id"], id.as_str());
    let (s, one) = call(
        reqwest::Method::GET,
        base,
        &format!("/api/webhooks/{id}"),
        Some(&manage),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(one.get("secret").is_none(), "{one}");

    // Another organisation sees nothing and cannot touch it.
    let theirs = token(other, "webhooks:manage");
    let (s, l) = call(
        reqwest::Method::GET,
        base,
        "/api/webhooks",
        Some(&theirs),
        None,
    )
    .await;
    assert_eq!((s, l["webhooks"].as_array().unwrap().len()), (200, 0));
    for (method, path) in [
        (reqwest::Method::DELETE, format!("/api/webhooks/{id}")),
        (reqwest::Method::GET, format!("/api/webhooks/{id}")),
        (
            reqwest::Method::GET,
            format!("/api/webhooks/{id}/deliveries"),
        ),
    ] {
        let (s, e) = call(method, base, &path, Some(&theirs), None).await;
        assert_eq!((s, e["error"].as_str()), (404, Some("not_found")), "{path}");
    }
    let (s, _) = call(
        reqwest::Method::DELETE,
        base,
        "/api/webhooks/nothex",
        Some(&manage),
        None,
    )
    .await;
    assert_eq!(s, 404);

    // At most ten per organisation; the other organisation is unaffected.
    for i in 1..10 {
        let (s, e) = register(
            base,
            org,
            json!({"url": format!("https://93.184.215.14/h{i}"), "events": ["job.failed"]}),
        )
        .await;
        assert_eq!(s, 201, "{e}");
    }
    let (s, e) = register(base, org, json!({"url": "https://93.184.215.14/eleventh"})).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("conflict")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("10"), "{e}");
    let (s, _) = register(base, other, body.clone()).await;
    assert_eq!(s, 201);

    let (s, _) = call(
        reqwest::Method::DELETE,
        base,
        &format!("/api/webhooks/{id}"),
        Some(&manage),
        None,
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = call(
        reqwest::Method::DELETE,
        base,
        &format!("/api/webhooks/{id}"),
        Some(&manage),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (_, l) = call(
        reqwest::Method::GET,
        base,
        "/api/webhooks",
        Some(&manage),
        None,
    )
    .await;
    assert_eq!(l["webhooks"].as_array().unwrap().len(), 9);
    let (s, _) = register(
        base,
        org,
        json!({"url": "https://93.184.215.14/tenth-again"}),
    )
    .await;
    assert_eq!(s, 201, "a freed slot can be used again");
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn a_500_then_a_200_gives_two_signed_deliveries_with_one_id() {
    let stack = Stack::start().await;
    let svc = stack
        .service_with(|c| {
            c.webhooks.allow_private = true;
            c.webhooks.backoff_ms = 200;
            c.webhooks.poll_ms = 100;
        })
        .await;
    let base = svc.addr;
    let receiver = Receiver::start().await;
    let org = ObjectId::new();
    let other = ObjectId::new();
    let (s, hook) = register(base, org, json!({"url": receiver.url("/hook")})).await;
    assert_eq!(s, 201, "{hook}");
    let secret = hook["secret"].as_str().unwrap();
    let (s, failed_only) = register(
        base,
        org,
        json!({"url": receiver.url("/failed-only"), "events": ["job.failed"]}),
    )
    .await;
    assert_eq!(s, 201, "{failed_only}");
    let (s, theirs) = register(base, other, json!({"url": receiver.url("/other-org")})).await;
    assert_eq!(s, 201, "{theirs}");

    receiver.plan(&[500]);
    let snap = finished_export(&stack, base, org).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    let hits = receiver
        .wait("/hook", 60, |h| h.iter().any(|h| h.answered == 200))
        .await;
    assert_eq!(hits.len(), 2, "one failed attempt and one delivery");
    assert_eq!(hits[0].answered, 500);
    let id = hits[0].headers["bulk-webhook-id"]
        .to_str()
        .unwrap()
        .to_string();
    for h in &hits {
        assert_eq!(
            h.headers["bulk-webhook-id"],
            id.as_str(),
            "one id across retries"
        );
        assert_eq!(h.headers["content-type"], "application/json");
        assert!(verify(secret, h), "signature verifies");
        assert!(!verify("whsec_wrong", h), "a wrong secret does not verify");
        assert_eq!(h.body, hits[0].body, "the same event on every attempt");
    }
    let event: Value = serde_json::from_slice(&hits[1].body).unwrap();
    assert_eq!(event["id"], id.as_str());
    assert_eq!(event["type"], "job.completed");
    assert!(event["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(event["job"]["jobId"], snap["jobId"]);
    assert_eq!(event["job"]["status"], "completed");
    assert_eq!(event["job"]["orgId"], org.to_hex());

    let hook_id = hook["id"].as_str().unwrap();
    let log = wait_log(base, org, hook_id, 30, |l| {
        l["deliveries"][0]["status"] == "succeeded"
    })
    .await;
    let d = &log["deliveries"][0];
    assert_eq!(d["id"], id.as_str());
    assert_eq!(d["jobId"], snap["jobId"]);
    assert_eq!(d["attempts"], 2);
    assert_eq!(d["log"][0]["statusCode"], 200, "{d}");
    assert_eq!(d["log"][1]["statusCode"], 500, "{d}");
    assert!(d["log"][1]["durationMs"].as_i64().is_some(), "{d}");
    assert!(d["deliveredAt"].is_string());
    let manage = token(org, "webhooks:manage");
    let retry = format!("/api/webhooks/{hook_id}/deliveries/{id}/retry");
    let (s, e) = call(reqwest::Method::POST, base, &retry, Some(&manage), None).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("conflict")), "{e}");
    let other_token = token(other, "webhooks:manage");
    let (s, _) = call(
        reqwest::Method::POST,
        base,
        &retry,
        Some(&other_token),
        None,
    )
    .await;
    assert_eq!(s, 404, "another organisation's delivery");

    // A second job is the fence: once its delivery is in, the first one's is
    // long settled, and a succeeded delivery was not sent again.
    let second = finished_export(&stack, base, org).await;
    let hits = receiver.wait("/hook", 60, |h| h.len() >= 3).await;
    let event: Value = serde_json::from_slice(&hits[2].body).unwrap();
    assert_eq!(event["job"]["jobId"], second["jobId"]);
    assert_ne!(hits[2].headers["bulk-webhook-id"], id.as_str());
    wait_log(base, org, hook_id, 30, |l| {
        l["deliveries"].as_array().unwrap().len() == 2
            && l["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["status"] == "succeeded")
    })
    .await;
    assert_eq!(
        receiver.hits("/hook").len(),
        3,
        "no delivery sent twice after success"
    );
    assert!(receiver.hits("/failed-only").is_empty(), "event filter");
    assert!(
        receiver.hits("/other-org").is_empty(),
        "another organisation's webhook"
    );
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn redirects_are_not_followed_and_loopback_names_are_refused_at_delivery() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let org = ObjectId::new();
    // A service allowing private targets, to reach the receiver's redirect.
    let open = stack
        .service_with(|c| {
            c.webhooks.allow_private = true;
            c.webhooks.backoff_ms = 100;
            c.webhooks.poll_ms = 100;
        })
        .await;
    let (s, hook) = register(open.addr, org, json!({"url": receiver.url("/redirect")})).await;
    assert_eq!(s, 201, "{hook}");
    let hook_id = hook["id"].as_str().unwrap().to_string();
    finished_export(&stack, open.addr, org).await;
    let log = wait_log(open.addr, org, &hook_id, 60, |l| {
        l["deliveries"][0]["attempts"].as_i64().unwrap_or(0) >= 2
    })
    .await;
    let d = &log["deliveries"][0];
    assert_eq!(
        d["status"], "pending",
        "a redirect is a failed attempt: {d}"
    );
    assert_eq!(d["lastStatusCode"], 302, "{d}");
    assert!(d["lastError"].as_str().unwrap().contains("redirect"), "{d}");
    assert!(receiver.hits("/redirect").len() >= 2);
    assert!(receiver.hits("/landing").is_empty(), "redirect followed");
    open.stop().await.unwrap();

    // The default service: a name resolving to loopback is refused when the
    // delivery resolves it, even though the registration is already stored
    // (the name was public then, say).
    let guarded = stack
        .service_with(|c| {
            c.webhooks.backoff_ms = 100;
            c.webhooks.poll_ms = 100;
        })
        .await;
    let org = ObjectId::new();
    let (s, e) = register(guarded.addr, org, json!({"url": receiver.url("/private")})).await;
    assert_eq!((s, e["field"].as_str()), (400, Some("url")), "{e}");
    let named = format!("http://localhost:{}/rebound", receiver.addr.port());
    let (s, e) = register(guarded.addr, org, json!({"url": named})).await;
    assert_eq!((s, e["field"].as_str()), (400, Some("url")), "{e}");
    let hook_id = ObjectId::new();
    stack
        .db()
        .await
        .collection::<Document>("webhooks")
        .insert_one(doc! {
            "_id": hook_id, "orgId": org, "url": &named,
            "events": ["job.completed", "job.failed", "job.cancelled"],
            "secret": "whsec_test", "createdAt": DateTime::now(),
        })
        .await
        .unwrap();
    finished_export(&stack, guarded.addr, org).await;
    let log = wait_log(guarded.addr, org, &hook_id.to_hex(), 60, |l| {
        l["deliveries"][0]["attempts"].as_i64().unwrap_or(0) >= 2
    })
    .await;
    let d = &log["deliveries"][0];
    let error = d["log"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("address refused") && error.contains("loopback"),
        "{d}"
    );
    assert!(d["log"][0]["statusCode"].is_null(), "{d}");
    assert!(
        receiver.hits("/rebound").is_empty(),
        "refused address reached"
    );
    guarded.stop().await.unwrap();
}

#[tokio::test]
async fn a_lost_terminal_event_is_made_up_for_from_the_job_record() {
    let stack = Stack::start().await;
    let svc = stack
        .service_with(|c| {
            c.webhooks.allow_private = true;
            c.webhooks.poll_ms = 100;
            c.webhooks.sweep_ms = 200;
            c.webhooks.sweep_grace_ms = 0;
        })
        .await;
    let receiver = Receiver::start().await;
    let org = ObjectId::new();
    let (s, hook) = register(svc.addr, org, json!({"url": receiver.url("/hook")})).await;
    assert_eq!(s, 201, "{hook}");
    let snap = finished_export(&stack, svc.addr, org).await;
    let first = receiver.wait("/hook", 60, |h| !h.is_empty()).await;
    // As if the event had never been consumed: its delivery record is gone.
    let db = stack.db().await;
    let deliveries = db.collection::<Document>("webhook_deliveries");
    wait_log(svc.addr, org, hook["id"].as_str().unwrap(), 30, |l| {
        l["deliveries"][0]["status"] == "succeeded"
    })
    .await;
    deliveries.delete_many(doc! {"orgId": org}).await.unwrap();
    let hits = receiver.wait("/hook", 60, |h| h.len() >= 2).await;
    assert_ne!(
        hits[1].headers["bulk-webhook-id"],
        first[0].headers["bulk-webhook-id"]
    );
    assert!(verify(hook["secret"].as_str().unwrap(), &hits[1]));
    let event: Value = serde_json::from_slice(&hits[1].body).unwrap();
    assert_eq!(event["type"], "job.completed");
    assert_eq!(event["job"]["jobId"], snap["jobId"]);
    assert_eq!(event["job"]["status"], "completed");
    assert_eq!(
        deliveries
            .count_documents(doc! {"orgId": org})
            .await
            .unwrap(),
        1,
        "one delivery per webhook and job"
    );
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_retried_until_the_window_ends() {
    let stack = Stack::start().await;
    let svc = stack
        .service_with(|c| {
            c.webhooks.allow_private = true;
            c.webhooks.backoff_ms = 100;
            c.webhooks.backoff_max_ms = 200;
            c.webhooks.timeout_ms = 500;
            c.webhooks.retry_for_ms = 2_500;
            c.webhooks.poll_ms = 50;
        })
        .await;
    let receiver = Receiver::start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let org = ObjectId::new();
    let (s, slow) = register(svc.addr, org, json!({"url": receiver.url("/slow")})).await;
    assert_eq!(s, 201, "{slow}");
    let (s, refused) = register(
        svc.addr,
        org,
        json!({"url": format!("http://127.0.0.1:{closed}/hook")}),
    )
    .await;
    assert_eq!(s, 201, "{refused}");
    finished_export(&stack, svc.addr, org).await;
    for (hook, words) in [(&slow, "timed out"), (&refused, "connection failed")] {
        let log = wait_log(svc.addr, org, hook["id"].as_str().unwrap(), 60, |l| {
            l["deliveries"][0]["status"] == "failed"
        })
        .await;
        let d = &log["deliveries"][0];
        let attempts = d["attempts"].as_i64().unwrap();
        assert!(attempts >= 2, "retried before giving up: {d}");
        assert_eq!(d["log"].as_array().unwrap().len() as i64, attempts.min(20));
        for entry in d["log"].as_array().unwrap() {
            assert!(entry["statusCode"].is_null(), "{entry}");
            assert!(
                entry["error"].as_str().unwrap().contains(words),
                "{words}: {entry}"
            );
        }
        assert!(
            d["nextAttemptAt"].is_null(),
            "no attempt after the window: {d}"
        );
        assert!(d["deliveredAt"].is_null());
        // Tried once more by hand, then given up again.
        let path = format!(
            "/api/webhooks/{}/deliveries/{}/retry",
            hook["id"].as_str().unwrap(),
            d["id"].as_str().unwrap()
        );
        let manage = token(org, "webhooks:manage");
        let (s, r) = call(reqwest::Method::POST, svc.addr, &path, Some(&manage), None).await;
        assert_eq!((s, r["status"].as_str()), (202, Some("pending")), "{r}");
        let log = wait_log(svc.addr, org, hook["id"].as_str().unwrap(), 60, |l| {
            l["deliveries"][0]["attempts"].as_i64() == Some(attempts + 1)
                && l["deliveries"][0]["status"] == "failed"
        })
        .await;
        assert!(log["deliveries"][0]["log"][0]["error"]
            .as_str()
            .unwrap()
            .contains(words));
    }
    let bogus = format!(
        "/api/webhooks/{}/deliveries/{}/retry",
        slow["id"].as_str().unwrap(),
        ObjectId::new()
    );
    let (s, _) = call(
        reqwest::Method::POST,
        svc.addr,
        &bogus,
        Some(&token(org, "webhooks:manage")),
        None,
    )
    .await;
    assert_eq!(s, 404);
    // Each timed-out attempt reached the receiver: the timeout cut it short.
    assert!(!receiver.hits("/slow").is_empty());
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn two_instances_send_each_delivery_once() {
    let stack = Stack::start().await;
    let fast = |c: &mut contact_bulk::config::Config| {
        c.webhooks.allow_private = true;
        c.webhooks.poll_ms = 20;
        c.webhooks.sweep_ms = 200;
        c.webhooks.sweep_grace_ms = 0;
    };
    let (a, b) = tokio::join!(stack.service_with(fast), stack.service_with(fast));
    let receiver = Receiver::start().await;
    let org = ObjectId::new();
    let (s, hook) = register(a.addr, org, json!({"url": receiver.url("/hook")})).await;
    assert_eq!(s, 201, "{hook}");
    let mut jobs = Vec::new();
    for i in 0..6 {
        let base = if i % 2 == 0 { a.addr } else { b.addr };
        jobs.push(finished_export(&stack, base, org).await["jobId"].clone());
    }
    let log = wait_log(a.addr, org, hook["id"].as_str().unwrap(), 60, |l| {
        let d = l["deliveries"].as_array().unwrap();
        d.len() == 6 && d.iter().all(|d| d["status"] == "succeeded")
    })
    .await;
    for d in log["deliveries"].as_array().unwrap() {
        assert_eq!(d["attempts"], 1, "{d}");
    }
    let hits = receiver.hits("/hook");
    assert_eq!(
        hits.len(),
        6,
        "one request per job, whichever instance sent it"
    );
    let mut ids: Vec<_> = hits
        .iter()
        .map(|h| h.headers["bulk-webhook-id"].to_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6);
    let mut got: Vec<Value> = hits
        .iter()
        .map(|h| serde_json::from_slice::<Value>(&h.body).unwrap()["job"]["jobId"].clone())
        .collect();
    got.sort_by_key(|v| v.to_string());
    jobs.sort_by_key(|v| v.to_string());
    assert_eq!(got, jobs);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn deliveries_go_on_across_nats_and_mongodb_restarts() {
    use contact_bulk_testkit::servers::{repo_nats_conf, MongoServer, NatsServer};
    let mut stack = Stack::start().await;
    let svc = stack
        .service_with(|c| {
            c.webhooks.allow_private = true;
            c.webhooks.backoff_ms = 200;
            c.webhooks.backoff_max_ms = 500;
            c.webhooks.poll_ms = 100;
        })
        .await;
    let receiver = Receiver::start().await;
    let org = ObjectId::new();
    let (s, hook) = register(svc.addr, org, json!({"url": receiver.url("/hook")})).await;
    assert_eq!(s, 201, "{hook}");

    // NATS restarted: the durable consumer carries on.
    let port = stack.nats.port();
    stack.nats.kill().await.unwrap();
    stack.nats = NatsServer::start(
        &repo_nats_conf(),
        &stack.dir.path().join("nats"),
        Some(port),
    )
    .await
    .expect("nats restarts on the same port and store");
    let first = finished_export(&stack, svc.addr, org).await;
    let hits = receiver.wait("/hook", 90, |h| !h.is_empty()).await;
    let event: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(event["job"]["jobId"], first["jobId"]);

    // MongoDB restarted while a delivery waits for its retry.
    receiver.set_fallback(503);
    let second = finished_export(&stack, svc.addr, org).await;
    receiver.wait("/hook", 60, |h| h.len() >= 2).await;
    let port = stack.mongo.port();
    stack.mongo.kill().await.unwrap();
    receiver.set_fallback(200);
    stack.mongo = MongoServer::start(&stack.dir.path().join("mongo"), Some(port))
        .await
        .expect("mongodb restarts on the same port and data");
    let hits = receiver
        .wait("/hook", 90, |h| {
            h.len() >= 3 && h.last().unwrap().answered == 200
        })
        .await;
    let event: Value = serde_json::from_slice(&hits.last().unwrap().body).unwrap();
    assert_eq!(event["job"]["jobId"], second["jobId"]);
    assert_eq!(
        hits.last().unwrap().headers["bulk-webhook-id"],
        hits[1].headers["bulk-webhook-id"],
        "the retry of the same delivery"
    );
    svc.stop().await.unwrap();
}

/// The real binary; its address from its `listening on` line.
struct Binary {
    child: tokio::process::Child,
    addr: SocketAddr,
}

async fn start_binary(stack: &Stack) -> Binary {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_contact-bulk"))
        .arg("serve")
        .env("NATS_URL", stack.nats.url())
        .env("MONGODB_URI", stack.mongo.uri())
        .env("MONGODB_DB", &stack.db_name)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("JWT_SECRET", SECRET)
        .env("BULK_LEASE_MS", "1000")
        .env("BULK_SCAN_MS", "200")
        .env("BULK_WEBHOOK_ALLOW_PRIVATE", "true")
        .env("BULK_WEBHOOK_BACKOFF_MS", "300")
        .env("BULK_WEBHOOK_BACKOFF_MAX_MS", "600")
        .env("BULK_WEBHOOK_POLL_MS", "100")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                return Some(rest.trim().parse::<SocketAddr>().unwrap());
            }
        }
        None
    })
    .await
    .expect("binary ready within 60 s")
    .expect("binary exited before listening");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Binary { child, addr }
}

#[tokio::test]
async fn a_delivery_pending_while_the_binary_is_killed_is_delivered_after_restart() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    receiver.set_fallback(503);
    let org = ObjectId::new();
    let mut bin = start_binary(&stack).await;
    let (s, hook) = register(bin.addr, org, json!({"url": receiver.url("/hook")})).await;
    assert_eq!(s, 201, "{hook}");
    let secret = hook["secret"].as_str().unwrap().to_string();
    let snap = finished_export(&stack, bin.addr, org).await;
    receiver.wait("/hook", 60, |h| h.len() >= 2).await;
    bin.child.kill().await.unwrap(); // SIGKILL
    let db = stack.db().await;
    let pending = db
        .collection::<Document>("webhook_deliveries")
        .find_one(doc! {"orgId": org})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pending.get_str("status").unwrap(), "pending", "{pending}");
    let failed_attempts = receiver.hits("/hook").len();

    receiver.set_fallback(200);
    let bin = start_binary(&stack).await;
    let hits = receiver
        .wait("/hook", 60, |h| h.iter().any(|h| h.answered == 200))
        .await;
    assert!(hits.len() > failed_attempts, "delivered after the restart");
    let id = pending.get_object_id("_id").unwrap().to_hex();
    for h in &hits {
        assert_eq!(h.headers["bulk-webhook-id"], id.as_str());
        assert!(verify(&secret, h));
    }
    let event: Value = serde_json::from_slice(&hits.last().unwrap().body).unwrap();
    assert_eq!(event["job"]["jobId"], snap["jobId"]);
    let log = wait_log(bin.addr, org, hook["id"].as_str().unwrap(), 30, |l| {
        l["deliveries"][0]["status"] == "succeeded"
    })
    .await;
    assert_eq!(log["deliveries"].as_array().unwrap().len(), 1, "{log}");
    drop(bin);
}
