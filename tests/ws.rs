//! The WebSocket bridge against real servers: authentication, snapshots then
//! live events, resume with `since`, organisation isolation, bad frames, a
//! stalled client next to a healthy one, and `contact_removed` coalescing.
//!
//! Jobs that must be watched from their very start are recorded without being
//! started (the supervisor's periodic scan is pushed far away), subscribed to,
//! and only then handed to the supervisor: no race with a fast job.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bson::{oid::ObjectId, Document};
use common::*;
use contact_bulk::Service;
use contact_bulk_actors::encode::{ColumnSpec, Format};
use contact_bulk_actors::filter::{Filter, ParseOptions};
use contact_bulk_actors::model::{ExportSpec, JobKind, JobRecord};
use contact_bulk_actors::supervisor::SupervisorMsg;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Deadline for one expected frame.
const FRAME_WAIT: Duration = Duration::from_secs(20);

async fn connect(addr: SocketAddr, token: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .expect("ws connects");
    assert_eq!(resp.status(), 101);
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON text frame, or a panic at the deadline.
async fn next(ws: &mut Ws) -> Value {
    next_within(ws, FRAME_WAIT)
        .await
        .expect("a frame within the deadline")
}

/// The next JSON text frame, or `None` when none comes within `wait`.
async fn next_within(ws: &mut Ws, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(None) => panic!("connection closed"),
            Ok(Some(m)) => m.expect("ws read"),
        };
        match msg {
            Message::Text(t) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            Message::Close(c) => panic!("closed by the server: {c:?}"),
            _ => continue,
        }
    }
}

/// Sends a ping op and returns every frame before the pong: once it is back,
/// every earlier operation of this connection has taken effect.
async fn barrier(ws: &mut Ws) -> Vec<Value> {
    send(ws, json!({"op": "ping"})).await;
    let mut before = Vec::new();
    loop {
        let f = next(ws).await;
        if f["type"] == "pong" {
            return before;
        }
        before.push(f);
    }
}

/// Frames until one satisfies `stop` (included).
async fn until(ws: &mut Ws, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = next(ws).await;
        let done = stop(&f);
        out.push(f);
        if done {
            return out;
        }
    }
}

fn is_terminal_status(f: &Value) -> bool {
    f["type"] == "job.status"
        && matches!(
            f["job"]["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
}

/// An org with one pipeline of three stages and `n` contacts round-robin over them.
async fn seed(db: &mongodb::Database, n: usize) -> (ObjectId, Vec<ObjectId>, Vec<Document>) {
    let org = ObjectId::new();
    let stages: Vec<ObjectId> = (0..3).map(|_| ObjectId::new()).collect();
    let named: Vec<(ObjectId, &str)> = stages.iter().copied().zip(["A", "B", "C"]).collect();
    let pipe = pipeline(db, org, "Sales", &named).await;
    let contacts: Vec<Document> = (0..n)
        .map(|i| contact(org, pipe, stages[i % 3], i))
        .collect();
    insert(db, "contacts", contacts.clone()).await;
    (org, stages, contacts)
}

/// A service with small export batches whose supervisor only starts what it is told to.
async fn service(stack: &Stack) -> Service {
    let svc = stack
        .service_with(|c| {
            c.export_batch = 50;
            c.delete_batch = 100;
            c.scan_ms = 3_600_000;
        })
        .await;
    // The start-up scan is queued before this call, so it is over when this returns.
    svc.counters().await.unwrap();
    svc
}

/// Records a whole-organisation CSV export without starting it.
async fn pending_export(svc: &Service, org: ObjectId) -> String {
    let filter = Filter::from_json(
        &json!({"orgWide": true}),
        ParseOptions {
            prefix: "filter",
            allow_limit: true,
        },
    )
    .unwrap();
    let spec = ExportSpec {
        format: Format::Csv,
        gzip: false,
        columns: ColumnSpec::from_json(None, "fields").unwrap(),
        file_name: "ws-test.csv".into(),
    };
    let job = JobRecord::new(JobKind::Export, org, None, None, filter, Some(spec));
    let (job, created) = svc.app.store.create(job).await.unwrap();
    assert!(created);
    job.job_id
}

fn start(svc: &Service, job_id: &str) {
    svc.supervisor()
        .send_message(SupervisorMsg::Start(job_id.to_string()))
        .unwrap();
}

/// Stream sequences of every event stored for one job.
async fn stored_seqs(client: &async_nats::Client, org: ObjectId, job_id: &str) -> Vec<u64> {
    let subject = format!("bulk.v1.events.{}.job.{job_id}", org.to_hex());
    stored_events(client, subject)
        .await
        .iter()
        .map(|m| m.info().unwrap().stream_sequence)
        .collect()
}

#[tokio::test]
async fn upgrade_needs_a_valid_token_with_jobs_read() {
    let stack = Stack::start().await;
    let svc = stack.service().await;
    let org = ObjectId::new();
    let url = format!("http://{}/ws", svc.addr);
    let http = reqwest::Client::new();
    let upgrade_get = |token: Option<String>| {
        let mut req = http
            .get(&url)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    for (token, status, error) in [
        (None, 401, "unauthorized"),
        (Some("not-a-jwt".to_string()), 401, "unauthorized"),
        (Some(token(org, "contacts:export")), 403, "forbidden"),
    ] {
        let resp = upgrade_get(token).await.unwrap();
        assert_eq!(resp.status(), status);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], error, "{body}");
        assert!(body["message"].is_string(), "{body}");
    }
    // The same through a WebSocket client, with the token in the query.
    let forged = contact_bulk::auth::Keys::new("another-secret", "")
        .mint("u", &org.to_hex(), "jobs:read", 60)
        .unwrap();
    for (token, status) in [(forged, 401), (token(org, "contacts:delete"), 403)] {
        let err = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", svc.addr))
            .await
            .expect_err("upgrade refused");
        match err {
            tungstenite::Error::Http(resp) => assert_eq!(resp.status(), status),
            other => panic!("expected an HTTP refusal, got {other}"),
        }
    }
    // A good token in the Authorization header upgrades.
    let mut req = format!("ws://{}/ws", svc.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(org, "jobs:read"))
            .parse()
            .unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(barrier(&mut ws).await.is_empty());
}

#[tokio::test]
async fn a_job_subscription_gets_a_snapshot_then_ordered_events_to_completion() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, _, _) = seed(&db, 3000).await;
    let svc = service(&stack).await;
    let job = pending_export(&svc, org).await;
    let mut ws = connect(svc.addr, &token(org, "jobs:read")).await;
    send(&mut ws, json!({"op": "subscribe", "jobId": job})).await;
    let first = next(&mut ws).await;
    assert_eq!(first["type"], "snapshot", "{first}");
    assert_eq!(first["job"]["jobId"], job.as_str());
    assert_eq!(first["job"]["status"], "pending");
    assert!(first.get("gap").is_none(), "{first}");
    start(&svc, &job);
    let frames = until(&mut ws, is_terminal_status).await;
    let last = frames.last().unwrap();
    assert_eq!(last["job"]["status"], "completed", "{last}");
    assert_eq!(last["job"]["processed"], 3000);
    assert!(
        frames.iter().any(|f| f["type"] == "job.progress"),
        "at least one progress frame: {frames:?}"
    );
    let (mut seq, mut processed) = (0, 0);
    for f in &frames {
        assert!(
            f["type"] == "job.progress" || f["type"] == "job.status",
            "{f}"
        );
        assert_eq!(f["job"]["jobId"], job.as_str());
        let s = f["seq"].as_u64().unwrap();
        assert!(s > seq, "seq increases: {s} after {seq}");
        seq = s;
        let p = f["job"]["processed"].as_i64().unwrap();
        assert!(
            p >= processed,
            "processed never goes back: {p} after {processed}"
        );
        processed = p;
    }
}

#[tokio::test]
async fn resubscribing_with_since_replays_what_was_missed_or_reports_a_gap() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, _, _) = seed(&db, 3000).await;
    let svc = service(&stack).await;
    let client = stack.client().await;
    let job = pending_export(&svc, org).await;
    let read = token(org, "jobs:read");
    let mut ws = connect(svc.addr, &read).await;
    send(&mut ws, json!({"op": "subscribe", "jobId": job})).await;
    assert_eq!(next(&mut ws).await["type"], "snapshot");
    start(&svc, &job);
    let seen = next(&mut ws).await;
    assert!(!is_terminal_status(&seen), "the job ended too fast: {seen}");
    let since = seen["seq"].as_u64().unwrap();
    drop(ws);
    let done = wait_terminal(&client, org, &job).await;
    assert_eq!(done["status"], "completed");

    let mut ws = connect(svc.addr, &read).await;
    send(
        &mut ws,
        json!({"op": "subscribe", "jobId": job, "since": since}),
    )
    .await;
    let replayed = until(&mut ws, is_terminal_status).await;
    assert!(
        replayed.iter().all(|f| f["type"] != "snapshot"),
        "{replayed:?}"
    );
    let got: Vec<u64> = replayed
        .iter()
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = stored_seqs(&client, org, &job)
        .await
        .into_iter()
        .filter(|s| *s > since)
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(got, expected, "every missed event, in order, nothing else");
    assert_eq!(replayed.last().unwrap()["job"]["processed"], 3000);
    // Nothing further, not even duplicates from the live side.
    assert!(barrier(&mut ws).await.is_empty());

    // Once the stream no longer holds what was missed: a fresh snapshot with `gap`.
    let js = async_nats::jetstream::new(client.clone());
    js.get_stream("BULK_EVENTS")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    send(
        &mut ws,
        json!({"op": "subscribe", "jobId": job, "since": since}),
    )
    .await;
    let gap = next(&mut ws).await;
    assert_eq!(gap["type"], "snapshot", "{gap}");
    assert_eq!(gap["gap"], true, "{gap}");
    assert_eq!(gap["job"]["status"], "completed");
}

#[tokio::test]
async fn another_organisation_sees_nothing_of_this_one() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, stages, _) = seed(&db, 1500).await;
    let svc = service(&stack).await;
    let client = stack.client().await;
    let job = pending_export(&svc, org).await;

    let intruder = ObjectId::new();
    let mut other = connect(svc.addr, &token(intruder, "jobs:read")).await;
    send(&mut other, json!({"op": "subscribe", "topic": "jobs"})).await;
    send(&mut other, json!({"op": "subscribe", "topic": "contacts"})).await;
    for since in [None, Some(0)] {
        let mut op = json!({"op": "subscribe", "jobId": job});
        if let Some(s) = since {
            op["since"] = json!(s);
        }
        send(&mut other, op).await;
        let f = next(&mut other).await;
        assert_eq!(f["type"], "error", "{f}");
        assert_eq!(f["code"], "not_found", "{f}");
    }
    assert!(barrier(&mut other).await.is_empty());

    let mut own = connect(svc.addr, &token(org, "jobs:read")).await;
    send(&mut own, json!({"op": "subscribe", "topic": "jobs"})).await;
    barrier(&mut own).await;
    start(&svc, &job);
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.to_hex(), "filter": {"stageIds": [stages[0].to_hex()]}}),
    )
    .await;
    let delete = reply["jobId"].as_str().unwrap().to_string();
    let mut finished = BTreeSet::new();
    while finished.len() < 2 {
        let f = next(&mut own).await;
        assert_eq!(f["job"]["orgId"], org.to_hex());
        if is_terminal_status(&f) {
            assert_eq!(f["job"]["status"], "completed", "{f}");
            finished.insert(f["job"]["jobId"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(finished, BTreeSet::from([job.clone(), delete]));

    // The intruder's connection got nothing meanwhile: its next frame is its own pong.
    let leaked = barrier(&mut other).await;
    assert!(
        leaked.is_empty(),
        "{} frames leaked to another org, first: {:?}",
        leaked.len(),
        leaked.first()
    );
    assert!(
        next_within(&mut other, Duration::from_millis(500))
            .await
            .is_none(),
        "nothing arrives afterwards either"
    );
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_lives_on() {
    let stack = Stack::start().await;
    let svc = service(&stack).await;
    let org = ObjectId::new();
    let mut ws = connect(svc.addr, &token(org, "jobs:read")).await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::text("this is not json"), "bad_frame"),
        (Message::text("[1,2]"), "bad_frame"),
        (Message::binary(vec![1u8, 2, 3]), "bad_frame"),
        (Message::text(r#"{"op":"dance"}"#), "unknown_op"),
        (Message::text(r#"{"op":"subscribe"}"#), "validation_error"),
        (
            Message::text(r#"{"op":"subscribe","jobId":"a.>"}"#),
            "validation_error",
        ),
        (
            Message::text(r#"{"op":"subscribe","topic":"everything"}"#),
            "validation_error",
        ),
        (
            Message::text(r#"{"op":"subscribe","jobId":"x","since":"yesterday"}"#),
            "validation_error",
        ),
        (
            Message::text(format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(20_000))),
            "too_large",
        ),
        (
            Message::text(format!(r#"{{"op":"subscribe","jobId":"{}"}}"#, uuid_like())),
            "not_found",
        ),
    ];
    for (msg, code) in cases {
        ws.send(msg).await.unwrap();
        let f = next(&mut ws).await;
        assert_eq!(f["type"], "error", "{f}");
        assert_eq!(f["code"], code, "{f}");
        assert!(f["message"].is_string());
    }
    assert!(barrier(&mut ws).await.is_empty());

    // At most 100 subscriptions per connection.
    send(&mut ws, json!({"op": "subscribe", "topic": "jobs"})).await;
    send(&mut ws, json!({"op": "subscribe", "topic": "contacts"})).await;
    for _ in 0..98 {
        let job = pending_export(&svc, org).await;
        send(&mut ws, json!({"op": "subscribe", "jobId": job})).await;
        assert_eq!(next(&mut ws).await["type"], "snapshot");
    }
    let extra = pending_export(&svc, org).await;
    send(&mut ws, json!({"op": "subscribe", "jobId": extra})).await;
    let f = next(&mut ws).await;
    assert_eq!(f["code"], "too_many_subscriptions", "{f}");
    // Making room allows it again.
    send(&mut ws, json!({"op": "unsubscribe", "topic": "contacts"})).await;
    send(&mut ws, json!({"op": "subscribe", "jobId": extra})).await;
    assert_eq!(next(&mut ws).await["type"], "snapshot");
    assert!(barrier(&mut ws).await.is_empty());
}

fn uuid_like() -> String {
    // Random and well-formed, so it can only be unknown.
    let h = ObjectId::new().to_hex();
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..15],
        &h[15..18],
        &h[..12]
    )
}

/// Ping ops a stalled client sends.
const PINGS: usize = 60_000;

/// A client with a tiny receive window (it is then simply not read from).
async fn stalled_client(addr: SocketAddr, token: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/ws?token={token}"),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    ws
}

#[tokio::test]
async fn a_stalled_client_does_not_delay_another() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, _, contacts) = seed(&db, 3000).await;
    let svc = service(&stack).await;
    let client = stack.client().await;
    let read = token(org, "jobs:read");

    // A client that subscribes to everything and then does not read.
    let mut stalled = stalled_client(svc.addr, &read).await;
    for op in [
        json!({"op": "subscribe", "topic": "jobs"}),
        json!({"op": "subscribe", "topic": "contacts"}),
    ] {
        stalled.send(Message::text(op.to_string())).await.unwrap();
    }
    // Far more pongs than socket buffers hold: the server's writes to this
    // client block for good (unsent pongs coalesce, so its queue stays small).
    for _ in 0..PINGS {
        stalled
            .feed(Message::text(r#"{"op":"ping"}"#))
            .await
            .unwrap();
    }
    stalled.flush().await.unwrap();

    let mut good = connect(svc.addr, &read).await;
    send(&mut good, json!({"op": "subscribe", "topic": "jobs"})).await;
    barrier(&mut good).await;
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    let frames = until(&mut good, is_terminal_status).await;
    let last = frames.last().unwrap();
    assert_eq!(last["job"]["jobId"], job.as_str());
    assert_eq!(last["job"]["status"], "completed", "{last}");
    assert_eq!(last["job"]["processed"], 3000);

    // The stalled client then catches up: the terminal status was kept for it,
    // and every removed contact is there exactly once.
    let expected: BTreeSet<String> = contacts
        .iter()
        .map(|c| c.get_object_id("_id").unwrap().to_hex())
        .collect();
    let mut removed = BTreeSet::new();
    let (mut terminal, mut pongs) = (false, 0);
    while !(terminal && removed.len() == expected.len()) {
        let f = next(&mut stalled).await;
        match f["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("contact_removed") => {
                for id in f["contactIds"].as_array().unwrap() {
                    assert!(
                        removed.insert(id.as_str().unwrap().to_string()),
                        "duplicate {id}"
                    );
                }
            }
            _ if is_terminal_status(&f) => terminal = true,
            _ => {}
        }
    }
    assert_eq!(removed, expected);
    assert!(
        pongs < PINGS,
        "the server's writes were really blocked ({pongs} of {PINGS} pongs sent)"
    );
}

#[tokio::test]
async fn a_client_too_far_behind_is_disconnected() {
    let stack = Stack::start().await;
    let svc = stack.service().await;
    let mut stalled = stalled_client(svc.addr, &token(ObjectId::new(), "jobs:read")).await;
    // Error frames are never dropped: this many cannot all wait for a reader.
    const BAD: usize = 30_000;
    for _ in 0..BAD {
        stalled.feed(Message::text("?")).await.unwrap();
    }
    stalled.flush().await.unwrap();
    // Still never reading: the server must close the connection on its own
    // (its writes to us are stuck), which our next writes then run into.
    let deadline = tokio::time::Instant::now() + FRAME_WAIT;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if stalled
            .send(Message::text(r#"{"op":"ping"}"#))
            .await
            .is_err()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a client too far behind was never disconnected"
        );
    }
    // The service itself is fine.
    let mut ws = connect(svc.addr, &token(ObjectId::new(), "jobs:read")).await;
    assert!(barrier(&mut ws).await.is_empty());
}

#[tokio::test]
async fn the_contacts_topic_delivers_exactly_the_deleted_contacts() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, stages, contacts) = seed(&db, 900).await;
    let svc = service(&stack).await;
    let client = stack.client().await;
    let mut ws = connect(svc.addr, &token(org, "jobs:read")).await;
    send(&mut ws, json!({"op": "subscribe", "topic": "contacts"})).await;
    assert!(barrier(&mut ws).await.is_empty());
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.to_hex(), "filter": {"stageIds": [stages[1].to_hex()]}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    let expected: BTreeSet<String> = contacts
        .iter()
        .filter(|c| c.get_object_id("stageId").unwrap() == stages[1])
        .map(|c| c.get_object_id("_id").unwrap().to_hex())
        .collect();
    assert_eq!(expected.len(), 300);
    let (mut removed, mut frames, mut seq) = (BTreeSet::new(), 0, 0);
    while removed.len() < expected.len() {
        let f = next(&mut ws).await;
        assert_eq!(f["type"], "contact_removed", "{f}");
        let s = f["seq"].as_u64().unwrap();
        assert!(s > seq, "seq increases");
        seq = s;
        frames += 1;
        for id in f["contactIds"].as_array().unwrap() {
            assert!(
                removed.insert(id.as_str().unwrap().to_string()),
                "duplicate {id}"
            );
        }
    }
    assert_eq!(removed, expected);
    assert!(frames <= expected.len());
    // Nothing more (no other org, no job events: not subscribed to them).
    assert!(barrier(&mut ws).await.is_empty());
}

#[tokio::test]
async fn the_latency_benchmark_measures_every_client() {
    let stack = Stack::start().await;
    let svc = stack.service().await;
    let org = ObjectId::new();
    let (p50, p99) = contact_bulk_testkit::bench::ws_latency::bench_latency(
        &stack.nats.url(),
        svc.addr,
        org,
        &token(org, "jobs:read"),
        50,
        40,
    )
    .await
    .unwrap();
    assert!(p50 <= p99, "{p50:?} {p99:?}");
    assert!(p99 < Duration::from_secs(2), "p99 {p99:?}");
}

#[tokio::test]
async fn cancelling_a_pending_job_is_announced_as_its_last_event() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, _, _) = seed(&db, 30).await;
    let svc = service(&stack).await;
    let client = stack.client().await;
    // Recorded but never started: no actor holds it, so the cancel itself ends it.
    let job = pending_export(&svc, org).await;
    let mut ws = connect(svc.addr, &token(org, "jobs:read")).await;
    send(&mut ws, json!({"op": "subscribe", "jobId": job})).await;
    let first = next(&mut ws).await;
    assert_eq!(first["type"], "snapshot");
    assert_eq!(first["job"]["status"], "pending");
    let reply = request(
        &client,
        "bulk.v1.cancel",
        json!({"orgId": org.to_hex(), "jobId": job}),
    )
    .await;
    assert_eq!(reply["status"], "cancelled", "{reply}");
    let frames = until(&mut ws, is_terminal_status).await;
    let last = frames.last().unwrap();
    assert_eq!(last["job"]["status"], "cancelled", "{frames:?}");
    assert_eq!(last["job"]["processed"], 0);
    // The stream holds it too, for durable consumers: the job's last event.
    let seqs = stored_seqs(&client, org, &job).await;
    assert_eq!(last["seq"].as_u64(), seqs.last().copied());
}
