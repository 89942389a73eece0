//! The supervisor's policies against real servers: caps per organisation,
//! bounded attempts, and SIGTERM draining of the real binary.

mod common;

use std::process::Stdio;
use std::time::Duration;

use bson::{doc, oid::ObjectId, Document};
use common::*;
use contact_bulk_actors::filter::Filter;
use contact_bulk_actors::model::{JobKind, JobRecord};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

async fn seed(db: &mongodb::Database, n: usize) -> ObjectId {
    let org = ObjectId::new();
    let stage = ObjectId::new();
    let pipe = pipeline(db, org, "Sales", &[(stage, "New")]).await;
    insert(
        db,
        "contacts",
        (0..n).map(|i| contact(org, pipe, stage, i)).collect(),
    )
    .await;
    org
}

#[tokio::test]
async fn per_organisation_cap_keeps_extra_jobs_pending_until_a_slot_frees() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 3000).await;
    let b = seed(&db, 300).await;
    let _svc = stack
        .service_with(|c| {
            c.max_per_org = 1;
            c.export_batch = 20;
        })
        .await;
    let client = stack.client().await;
    let export = |org: ObjectId| json!({"orgId": org.to_hex(), "filter": {"orgWide": true}});
    let a1 = request(&client, "bulk.v1.export", export(a)).await["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_job(&client, a, &a1, 30, |s| s["status"] == "processing").await;
    let a2 = request(&client, "bulk.v1.export", export(a)).await["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    let b1 = request(&client, "bulk.v1.export", export(b)).await["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    // Another organisation is not held back by A's running job.
    let b_done = wait_terminal(&client, b, &b1).await;
    assert_eq!(b_done["status"], "completed");
    let first = request(
        &client,
        "bulk.v1.job",
        json!({"orgId": a.to_hex(), "jobId": a1}),
    )
    .await;
    let second = request(
        &client,
        "bulk.v1.job",
        json!({"orgId": a.to_hex(), "jobId": a2}),
    )
    .await;
    if first["status"] == "processing" {
        assert_eq!(
            second["status"], "pending",
            "second job of the org waits: {second}"
        );
    }
    let s1 = wait_terminal(&client, a, &a1).await;
    let s2 = wait_terminal(&client, a, &a2).await;
    assert_eq!(
        (s1["status"].as_str(), s2["status"].as_str()),
        (Some("completed"), Some("completed"))
    );
    let started_second =
        chrono::DateTime::parse_from_rfc3339(s2["startedAt"].as_str().unwrap()).unwrap();
    let finished_first =
        chrono::DateTime::parse_from_rfc3339(s1["finishedAt"].as_str().unwrap()).unwrap();
    assert!(
        started_second >= finished_first,
        "the second job started only after the first finished"
    );
}

#[tokio::test]
async fn a_job_that_keeps_failing_is_failed_after_bounded_attempts() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 10).await;
    // An export record without export settings cannot start: every attempt fails.
    let job = JobRecord::new(
        JobKind::Export,
        org,
        None,
        None,
        Filter {
            org_wide: true,
            ..Filter::default()
        },
        None,
    );
    let id = job.job_id.clone();
    db.collection::<JobRecord>("bulk_jobs")
        .insert_one(&job)
        .await
        .unwrap();
    let _svc = stack
        .service_with(|c| {
            c.max_attempts = 3;
            c.lease_ms = 500;
        })
        .await;
    let client = stack.client().await;
    let snap = wait_terminal(&client, org, &id).await;
    assert_eq!(snap["status"], "failed", "{snap}");
    assert_eq!(snap["attempts"], 3);
    assert!(
        snap["error"].as_str().unwrap().contains("attempts"),
        "{snap}"
    );
}

#[tokio::test]
async fn sigterm_drains_running_jobs_and_exits_zero() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 20_000).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_contact-bulk"))
        .arg("serve")
        .env("NATS_URL", stack.nats.url())
        .env("MONGODB_URI", stack.mongo.uri())
        .env("MONGODB_DB", &stack.db_name)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("JWT_SECRET", SECRET)
        .env("BULK_EXPORT_BATCH", "20")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("listening on http://127.0.0.1:") {
                return;
            }
        }
        panic!("binary exited before listening");
    })
    .await
    .expect("listening within 60 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    wait_job(&client, org, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) > 0
    })
    .await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let rec = db
        .collection::<Document>("bulk_jobs")
        .find_one(doc! {"_id": &job})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rec.get_str("status").unwrap(),
        "processing",
        "left resumable"
    );
    assert!(
        rec.get("leaseOwner").unwrap().as_null().is_some(),
        "lease released"
    );
    assert!(rec.get_i64("processed").unwrap() < 20_000);
    // The next instance picks it up and finishes it.
    let _svc = stack.service().await;
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed");
    assert_eq!(snap["processed"], 20_000);
}
