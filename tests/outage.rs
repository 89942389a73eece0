//! Server crashes mid-job: MongoDB or NATS killed and restarted on the same
//! port and data; the job resumes from its checkpoint and completes correctly.

mod common;

use std::collections::BTreeSet;

use bson::{doc, oid::ObjectId, Document};
use common::*;
use contact_bulk_testkit::servers::{repo_nats_conf, MongoServer, NatsServer};
use futures::TryStreamExt;
use serde_json::json;

async fn seed(db: &mongodb::Database, n: usize) -> (ObjectId, Vec<ObjectId>) {
    let org = ObjectId::new();
    let stage = ObjectId::new();
    let pipe = pipeline(db, org, "Sales", &[(stage, "New")]).await;
    let docs: Vec<Document> = (0..n).map(|i| contact(org, pipe, stage, i)).collect();
    let ids = docs
        .iter()
        .map(|d| d.get_object_id("_id").unwrap())
        .collect();
    insert(db, "contacts", docs.clone()).await;
    let convs: Vec<Document> = docs
        .iter()
        .map(|d| doc! {"_id": ObjectId::new(), "orgId": org, "contactId": d.get_object_id("_id").unwrap()})
        .collect();
    insert(db, "conversations", convs).await;
    (org, ids)
}

#[tokio::test]
async fn mongodb_crash_mid_export_loses_nothing() {
    let mut stack = Stack::start().await;
    let db = stack.db().await;
    let (org, ids) = seed(&db, 8000).await;
    let _svc = stack.service_with(|c| c.export_batch = 100).await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "fields": ["id"], "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    wait_job(&client, org, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) >= 1000
    })
    .await;
    let port = stack.mongo.port();
    stack.mongo.kill().await.unwrap();
    stack.mongo = MongoServer::start(&stack.dir.path().join("mongo"), Some(port))
        .await
        .expect("mongodb restarts on the same port and data");
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    let data = download(&snap).await;
    let text = String::from_utf8(data).unwrap();
    let got: Vec<String> = text.lines().skip(1).map(String::from).collect();
    let want: Vec<String> = ids.iter().map(|i| i.to_hex()).collect();
    assert_eq!(got, want, "every contact exactly once, in order");
}

#[tokio::test]
async fn nats_crash_mid_delete_loses_no_event_and_no_job() {
    let mut stack = Stack::start().await;
    let db = stack.db().await;
    let (org, ids) = seed(&db, 3000).await;
    let _svc = stack.service_with(|c| c.delete_batch = 25).await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    wait_job(&client, org, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) >= 200
    })
    .await;
    let port = stack.nats.port();
    stack.nats.kill().await.unwrap();
    stack.nats = NatsServer::start(
        &repo_nats_conf(),
        &stack.dir.path().join("nats"),
        Some(port),
    )
    .await
    .expect("nats restarts on the same port and store");
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["counts"]["contacts"], 3000);
    assert_eq!(snap["counts"]["conversations"], 3000);
    assert_eq!(
        db.collection::<Document>("contacts")
            .count_documents(doc! {"orgId": org})
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        db.collection::<Document>("conversations")
            .count_documents(doc! {"orgId": org})
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        db.collection::<Document>("event_logs")
            .count_documents(doc! {"jobId": &job})
            .await
            .unwrap(),
        3000
    );
    // Every deletion announced exactly once in the stream, across the outage.
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream("BULK_EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("bulk.v1.events.{}.contact_removed", org.to_hex()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut info = consumer.clone();
    let pending = info.info().await.unwrap().num_pending as usize;
    assert_eq!(pending, 3000, "one contact_removed per deleted contact");
    let mut messages = consumer.messages().await.unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < pending {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), messages.try_next())
            .await
            .expect("stream read deadline")
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert!(
            seen.insert(v["contactId"].as_str().unwrap().to_string()),
            "duplicate event"
        );
    }
    let want: BTreeSet<String> = ids.iter().map(|i| i.to_hex()).collect();
    assert_eq!(seen, want);
}

/// Settings under which every retry together lasts well under a second, and
/// one spent attempt fails the job: an outage must cost none.
fn impatient(c: &mut contact_bulk::config::Config) {
    c.step_retries = 1;
    c.retry_max_ms = 200;
    c.max_attempts = 1;
}

#[tokio::test]
async fn nats_down_longer_than_every_retry_together_costs_no_attempt() {
    let mut stack = Stack::start().await;
    let db = stack.db().await;
    let (org, _) = seed(&db, 3000).await;
    let _svc = stack
        .service_with(|c| {
            impatient(c);
            c.delete_batch = 25;
        })
        .await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    wait_job(&client, org, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) >= 200
    })
    .await;
    let port = stack.nats.port();
    stack.nats.kill().await.unwrap();
    // The job says, in its record, what it waits for.
    let jobs = db.collection::<Document>("bulk_jobs");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let rec = jobs.find_one(doc! {"_id": &job}).await.unwrap().unwrap();
        assert_eq!(rec.get_str("status").unwrap(), "processing", "{rec}");
        if rec.get_str("waiting").ok() == Some("nats") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never waiting: {rec}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The outage lasts far longer than every retry together.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let rec = jobs.find_one(doc! {"_id": &job}).await.unwrap().unwrap();
    assert_eq!(rec.get_str("status").unwrap(), "processing", "{rec}");
    assert_eq!(rec.get_i32("attempts").unwrap(), 1, "{rec}");
    stack.nats = NatsServer::start(
        &repo_nats_conf(),
        &stack.dir.path().join("nats"),
        Some(port),
    )
    .await
    .expect("nats restarts on the same port and store");
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["attempts"], 1, "{snap}");
    assert!(snap.get("waiting").is_none(), "{snap}");
    assert_eq!(snap["counts"]["contacts"], 3000);
    assert_eq!(snap["counts"]["conversations"], 3000);
    assert_eq!(
        db.collection::<Document>("contacts")
            .count_documents(doc! {"orgId": org})
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn mongodb_down_longer_than_every_retry_together_costs_no_attempt() {
    let mut stack = Stack::start().await;
    let db = stack.db().await;
    // Large enough that the export is still running when MongoDB goes away,
    // even on a loaded box (at 8,000 it once finished first).
    let (org, ids) = seed(&db, 40_000).await;
    let _svc = stack
        .service_with(|c| {
            impatient(c);
            c.export_batch = 50;
        })
        .await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "fields": ["id"], "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    let mut events = client
        .subscribe(format!("bulk.v1.events.{}.job.{job}", org.to_hex()))
        .await
        .unwrap();
    wait_job(&client, org, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) >= 1000
    })
    .await;
    let port = stack.mongo.port();
    stack.mongo.kill().await.unwrap();
    // With MongoDB gone, the events say what the job waits for.
    let seen = collect_until(&mut events, 60, |v| v["job"]["waiting"] == "mongodb").await;
    let last = seen.last().unwrap();
    assert_eq!(last["job"]["status"], "processing", "{last}");
    // The outage lasts far longer than every retry together.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    stack.mongo = MongoServer::start(&stack.dir.path().join("mongo"), Some(port))
        .await
        .expect("mongodb restarts on the same port and data");
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["attempts"], 1, "{snap}");
    assert!(snap.get("waiting").is_none(), "{snap}");
    let data = download(&snap).await;
    let text = String::from_utf8(data).unwrap();
    let got: Vec<String> = text.lines().skip(1).map(String::from).collect();
    let want: Vec<String> = ids.iter().map(|i| i.to_hex()).collect();
    assert_eq!(got, want, "every contact exactly once, in order");
}
