//! Export jobs end to end against a real nats-server and MongoDB-wire server.

mod common;

use std::collections::HashMap;

use bson::{doc, oid::ObjectId, Bson, Document};
use common::*;
use contact_bulk_actors::failpoint;
use serde_json::{json, Value};

/// Reads CSV bytes into rows of cells (header first).
fn csv_rows(data: &[u8]) -> Vec<Vec<String>> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(data);
    r.records()
        .map(|rec| rec.unwrap().iter().map(String::from).collect())
        .collect()
}

fn expected_row(c: &Document, pipeline: &str, stages: &HashMap<ObjectId, &str>) -> Vec<String> {
    let s = |k: &str| c.get_str(k).unwrap_or_default().to_string();
    vec![
        s("firstName"),
        s("lastName"),
        s("phone"),
        s("email"),
        pipeline.to_string(),
        stages[&c.get_object_id("stageId").unwrap()].to_string(),
        c.get_datetime("createdAt")
            .unwrap()
            .to_chrono()
            .format("%Y-%m-%d")
            .to_string(),
    ]
}

struct Org {
    id: ObjectId,
    pipeline: ObjectId,
    stages: Vec<ObjectId>,
    contacts: Vec<Document>,
}

/// An org with 3 stages, `n` contacts round-robin over stages, every other one owned.
async fn seed(db: &mongodb::Database, n: usize, stages: Option<Vec<ObjectId>>) -> Org {
    let id = ObjectId::new();
    let stages = stages.unwrap_or_else(|| (0..3).map(|_| ObjectId::new()).collect());
    let named: Vec<(ObjectId, &str)> = stages
        .iter()
        .zip(["New Lead", "Qualified", "Won"])
        .map(|(s, n)| (*s, n))
        .collect();
    let pipeline = pipeline(db, id, "Sales", &named).await;
    let owner = ObjectId::new();
    let contacts: Vec<Document> = (0..n)
        .map(|i| {
            let mut c = contact(id, pipeline, stages[i % 3], i);
            if i % 2 == 0 {
                c.insert("ownerId", owner);
            }
            c
        })
        .collect();
    insert(db, "contacts", contacts.clone()).await;
    Org {
        id,
        pipeline,
        stages,
        contacts,
    }
}

fn stage_names(org: &Org) -> HashMap<ObjectId, &'static str> {
    org.stages
        .iter()
        .copied()
        .zip(["New Lead", "Qualified", "Won"])
        .collect()
}

async fn export(client: &async_nats::Client, body: Value) -> String {
    let reply = request(client, "bulk.v1.export", body).await;
    assert_eq!(reply["kind"], "export", "{reply}");
    reply["jobId"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn csv_export_selects_exactly_the_filtered_contacts() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 3000, None).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let job = export(
        &client,
        json!({"orgId": org.id.to_hex(), "filter": {
            "stageIds": [org.stages[0].to_hex(), org.stages[1].to_hex()], "ownerFilter": "owned"}}),
    )
    .await;
    let snap = wait_terminal(&client, org.id, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    let names = stage_names(&org);
    let expected: Vec<Vec<String>> = org
        .contacts
        .iter()
        .filter(|c| {
            let s = c.get_object_id("stageId").unwrap();
            (s == org.stages[0] || s == org.stages[1]) && c.get_object_id("ownerId").is_ok()
        })
        .map(|c| expected_row(c, "Sales", &names))
        .collect();
    assert_eq!(snap["total"], expected.len());
    assert_eq!(snap["processed"], expected.len());
    let data = download(&snap).await;
    let rows = csv_rows(&data);
    assert_eq!(
        rows[0],
        [
            "First Name",
            "Last Name",
            "Phone",
            "Email",
            "Pipeline",
            "Stage",
            "Created Date"
        ]
    );
    assert_eq!(rows[1..], expected[..]);
    let result = &snap["result"];
    assert_eq!(result["rows"], expected.len());
    assert_eq!(result["bytes"], data.len());
    use sha2::Digest;
    assert_eq!(result["sha256"], hex::encode(sha2::Sha256::digest(&data)));
    assert!(data.ends_with(b"\n") && !data.windows(2).any(|w| w == b"\r\n"));
}

#[tokio::test]
async fn gzipped_ndjson_export_with_fields_and_custom_columns() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 2500, None).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let job = export(
        &client,
        json!({"orgId": org.id.to_hex(), "format": "ndjson", "gzip": true, "filename": "my export",
               "fields": ["id", "fullName", "stage", "customFields"],
               "filter": {"orgWide": true, "advancedParams": {"tags": ["lead"]}}}),
    )
    .await;
    let snap = wait_terminal(&client, org.id, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["result"]["fileName"], "my_export.ndjson.gz");
    let data = gunzip(&download(&snap).await);
    let lines: Vec<Value> = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2500);
    let names = stage_names(&org);
    for (line, c) in lines.iter().zip(&org.contacts) {
        assert_eq!(line["id"], c.get_object_id("_id").unwrap().to_hex());
        assert_eq!(
            line["fullName"],
            format!(
                "{} {}",
                c.get_str("firstName").unwrap(),
                c.get_str("lastName").unwrap()
            )
        );
        assert_eq!(line["stage"], names[&c.get_object_id("stageId").unwrap()]);
        assert_eq!(line["customFields"]["source"], "web");
    }
}

#[tokio::test]
async fn tricky_values_survive_csv_and_formulas_are_neutralised() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 0, None).await;
    let tricky = [
        (
            "Ann, \"The\" Boss",
            "O'Neil\nJr",
            "+14165550100",
            "=HYPERLINK(\"x\")",
        ),
        (
            "Zoë 東京",
            "@SUM(A1)",
            "=cmd|' /C calc'!A0",
            "-1+1@example.com",
        ),
        ("\tTab", "\rCR", "", "plain@example.com"),
    ];
    let mut docs = Vec::new();
    for (i, (f, l, p, e)) in tricky.iter().enumerate() {
        let mut c = contact(org.id, org.pipeline, org.stages[0], i);
        c.insert("firstName", *f);
        c.insert("lastName", *l);
        c.insert("phone", *p);
        c.insert("email", *e);
        docs.push(c);
    }
    let mut missing = contact(org.id, org.pipeline, org.stages[0], 9);
    missing.remove("email");
    missing.insert("phone", Bson::Null);
    docs.push(missing);
    insert(&db, "contacts", docs).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let job = export(
        &client,
        json!({"orgId": org.id.to_hex(), "filter": {"stageIds": [org.stages[0].to_hex()]}}),
    )
    .await;
    let snap = wait_terminal(&client, org.id, &job).await;
    let rows = csv_rows(&download(&snap).await);
    assert_eq!(rows.len(), 5);
    assert_eq!(
        rows[1][..4],
        [
            "Ann, \"The\" Boss",
            "O'Neil\nJr",
            "+14165550100",
            "'=HYPERLINK(\"x\")"
        ]
    );
    assert_eq!(
        rows[2][..4],
        [
            "Zoë 東京",
            "'@SUM(A1)",
            // A phone that is not a phone number is neutralised like any cell.
            "'=cmd|' /C calc'!A0",
            "'-1+1@example.com"
        ]
    );
    assert_eq!(rows[3][..2], ["'\tTab", "'\rCR"]);
    assert_eq!(rows[4][2..4], ["", ""]);
}

#[tokio::test]
async fn organisations_sharing_stage_ids_never_mix() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 600, None).await;
    let b = seed(&db, 400, Some(a.stages.clone())).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let filter = json!({"stageIds": a.stages.iter().map(|s| s.to_hex()).collect::<Vec<_>>()});
    for org in [&a, &b] {
        let job = export(
            &client,
            json!({"orgId": org.id.to_hex(), "filter": filter, "fields": ["id"]}),
        )
        .await;
        let snap = wait_terminal(&client, org.id, &job).await;
        let rows = csv_rows(&download(&snap).await);
        let ids: Vec<String> = org
            .contacts
            .iter()
            .map(|c| c.get_object_id("_id").unwrap().to_hex())
            .collect();
        let got: Vec<String> = rows[1..].iter().map(|r| r[0].clone()).collect();
        assert_eq!(got, ids);
        // Another organisation cannot see the job.
        let other = if org.id == a.id { b.id } else { a.id };
        let r = request(
            &client,
            "bulk.v1.job",
            json!({"orgId": other.to_hex(), "jobId": job}),
        )
        .await;
        assert_eq!(r["error"]["code"], "not_found", "{r}");
    }
}

#[tokio::test]
async fn zero_matches_give_a_header_only_file_and_completed() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 50, None).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let job = export(
        &client,
        json!({"orgId": org.id.to_hex(), "filter": {"stageIds": [ObjectId::new().to_hex()]}}),
    )
    .await;
    let snap = wait_terminal(&client, org.id, &job).await;
    assert_eq!(snap["status"], "completed");
    assert_eq!(snap["total"], 0);
    assert_eq!(snap["processed"], 0);
    let data = download(&snap).await;
    assert_eq!(
        data,
        b"First Name,Last Name,Phone,Email,Pipeline,Stage,Created Date\n"
    );
}

#[tokio::test]
async fn command_id_replay_returns_the_same_job() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 10, None).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let body = json!({"orgId": org.id.to_hex(), "commandId": "cmd-1", "filter": {"orgWide": true}});
    let (r1, r2) = tokio::join!(
        request(&client, "bulk.v1.export", body.clone()),
        request(&client, "bulk.v1.export", body.clone())
    );
    assert_eq!(r1["jobId"], r2["jobId"]);
    let r3 = request(&client, "bulk.v1.export", body).await;
    assert_eq!(r1["jobId"], r3["jobId"]);
    let by_command = request(
        &client,
        "bulk.v1.job",
        json!({"orgId": org.id.to_hex(), "commandId": "cmd-1"}),
    )
    .await;
    assert_eq!(by_command["jobId"], r1["jobId"]);
    assert_eq!(
        db.collection::<Document>("bulk_jobs")
            .count_documents(doc! {})
            .await
            .unwrap(),
        1
    );
    // The same commandId in another organisation is another job.
    let other = request(&client, "bulk.v1.export", json!({"orgId": ObjectId::new().to_hex(), "commandId": "cmd-1", "filter": {"orgWide": true}})).await;
    assert_ne!(other["jobId"], r1["jobId"]);
    // Reused for a delete, the key is a conflict: the caller must not read the
    // export's job as its delete accepted, and nothing is deleted.
    let clash = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.id.to_hex(), "commandId": "cmd-1", "filter": {"orgWide": true}}),
    )
    .await;
    assert_eq!(clash["error"]["code"], "conflict", "{clash}");
    assert!(clash.get("jobId").is_none(), "{clash}");
    assert_eq!(
        db.collection::<Document>("contacts")
            .count_documents(doc! {"orgId": org.id})
            .await
            .unwrap(),
        10
    );
}

#[tokio::test]
async fn malformed_commands_are_named_and_change_nothing() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 10, None).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let o = org.id.to_hex();
    let s = org.stages[0].to_hex();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"orgId": "nope", "filter": {"orgWide": true}}),
            "orgId",
        ),
        (json!({"filter": {"orgWide": true}}), "orgId"),
        (json!({"orgId": o}), "filter"),
        (json!({"orgId": o, "filter": {}}), "filter.stageIds"),
        (
            json!({"orgId": o, "filter": {"stageIds": []}}),
            "filter.stageIds",
        ),
        (
            json!({"orgId": o, "filter": {"stageIds": [s, "zz"]}}),
            "filter.stageIds[1]",
        ),
        (
            json!({"orgId": o, "filter": {"stageIds": [{"$ne": null}]}}),
            "filter.stageIds[0]",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": "yes"}}),
            "filter.orgWide",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true, "pipelineType": "Deal"}}),
            "filter.pipelineType",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true, "ownerFilter": "mine"}}),
            "filter.ownerFilter",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true, "$where": "1"}}),
            "filter.$where",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true, "advancedParams": {"$where": "1"}}}),
            "filter.advancedParams.$where",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true, "advancedParams": {"createdAfter": {"$gt": 1}}}}),
            "filter.advancedParams.createdAfter",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true, "advancedParams": {"createdBefore": "yesterday"}}}),
            "filter.advancedParams.createdBefore",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true, "advancedParams": {"tags": [{"$ne": 1}]}}}),
            "filter.advancedParams.tags[0]",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true, "advancedParams": {"ownerIds": ["x"]}}}),
            "filter.advancedParams.ownerIds[0]",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true, "limit": -1}}),
            "filter.limit",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true}, "format": "xlsx"}),
            "format",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true}, "gzip": "yes"}),
            "gzip",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true}, "fields": ["firstName", "password"]}),
            "fields[1]",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true}, "commandId": 7}),
            "commandId",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true}, "requestedBy": "me"}),
            "requestedBy",
        ),
        (
            json!({"orgId": o, "filter": {"orgWide": true}, "extra": 1}),
            "extra",
        ),
        (json!([1, 2]), "body"),
    ];
    for (body, field) in cases {
        let r = request(&client, "bulk.v1.export", body.clone()).await;
        assert_eq!(r["error"]["code"], "validation_error", "{body} -> {r}");
        assert_eq!(r["error"]["field"], field, "{body} -> {r}");
    }
    // Not even JSON.
    let msg = client
        .request("bulk.v1.export", "{oops".into())
        .await
        .unwrap();
    let r: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(r["error"]["code"], "validation_error");
    assert_eq!(
        db.collection::<Document>("bulk_jobs")
            .count_documents(doc! {})
            .await
            .unwrap(),
        0
    );
    // The service still works.
    let r = request(
        &client,
        "bulk.v1.count",
        json!({"orgId": o, "filter": {"orgWide": true}}),
    )
    .await;
    assert_eq!(r["count"], 10);
}

#[tokio::test]
async fn progress_events_are_monotonic_and_end_completed() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 4000, None).await;
    let _svc = stack
        .service_with(|c| {
            c.export_batch = 100;
            // Long enough for any count of 4,000 rows: `total` from the start.
            c.export_total_wait_ms = 60_000;
        })
        .await;
    let client = stack.client().await;
    let mut sub = client
        .subscribe(format!("bulk.v1.events.{}.job.>", org.id.to_hex()))
        .await
        .unwrap();
    let job = export(
        &client,
        json!({"orgId": org.id.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let events = collect_until(&mut sub, 120, |e| e["job"]["status"] == "completed").await;
    let mut last = -1i64;
    let mut counted = false;
    for e in &events {
        assert_eq!(e["job"]["jobId"], job.as_str());
        let p = e["job"]["processed"].as_i64().unwrap();
        assert!(p >= last, "processed went back: {last} -> {p}");
        last = p;
        // `total` may be null while the count runs beside the export, but once
        // known it is exact and never disappears again.
        match e["job"]["total"].as_i64() {
            Some(t) => {
                assert_eq!(t, 4000, "{e}");
                counted = true;
            }
            None => assert!(!counted && e["job"]["total"].is_null(), "total lost: {e}"),
        }
    }
    assert!(counted);
    // The first event announces the new job as pending, before it runs.
    assert_eq!(events[0]["type"], "job.status", "{}", events[0]);
    assert_eq!(events[0]["job"]["status"], "pending", "{}", events[0]);
    let processing = events
        .iter()
        .find(|e| e["type"] == "job.status" && e["job"]["status"] == "processing")
        .expect("a processing status event");
    // Counted at start: the job starts with its `total`.
    assert_eq!(processing["job"]["total"], 4000, "{processing}");
    let final_event = events.last().unwrap();
    assert_eq!(final_event["type"], "job.status");
    assert_eq!(final_event["job"]["processed"], 4000);
    assert!(final_event["job"]["result"]["downloadUrl"].is_string());
    // The same events are kept in the BULK_EVENTS stream.
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("BULK_EVENTS").await.unwrap();
    assert!(stream.info().await.unwrap().state.messages >= events.len() as u64);
}

#[tokio::test]
async fn export_resumes_after_restart_and_produces_the_same_file() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 12_000, None).await;
    let client = stack.client().await;
    let svc = stack.service_with(|c| c.export_batch = 20).await;
    let body = json!({"orgId": org.id.to_hex(), "gzip": true, "filter": {"orgWide": true}});
    let job = export(&client, body.clone()).await;
    wait_job(&client, org.id, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) > 500
    })
    .await;
    svc.stop().await.unwrap();
    // No instance runs now: read the record itself.
    let mid = db
        .collection::<Document>("bulk_jobs")
        .find_one(doc! {"_id": &job})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        mid.get_str("status").unwrap(),
        "processing",
        "drained job stays resumable: {mid}"
    );
    assert!(
        mid.get("leaseOwner").unwrap().as_null().is_some(),
        "lease given back on drain"
    );
    let stopped_at = mid.get_i64("processed").unwrap();
    assert!(stopped_at < 12_000, "stopped mid-way");

    let _svc = stack.service().await;
    let resumed = wait_terminal(&client, org.id, &job).await;
    assert_eq!(resumed["status"], "completed", "{resumed}");
    assert_eq!(resumed["attempts"], 1, "a drain costs no attempt");
    let fresh = export(&client, body).await;
    let fresh = wait_terminal(&client, org.id, &fresh).await;
    let a = gunzip(&download(&resumed).await);
    let b = gunzip(&download(&fresh).await);
    assert_eq!(csv_rows(&a).len(), 12_001);
    assert_eq!(a, b, "resumed file equals a fresh export");
}

#[tokio::test]
async fn cancel_lands_during_the_custom_field_pass() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 60_000, None).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.id.to_hex(), "filter": {"orgWide": true}, "fields": ["firstName", "customFields"]}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    // Leased but not started: the pass that discovers the custom keys is running.
    let jobs = db.collection::<Document>("bulk_jobs");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rec = jobs.find_one(doc! {"_id": &job}).await.unwrap().unwrap();
        if rec.get_str("leaseOwner").is_ok() {
            assert_eq!(
                rec.get_str("status").unwrap(),
                "pending",
                "the custom-key pass ended before the cancel could be sent"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never leased");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let asked = std::time::Instant::now();
    let snap = request(
        &client,
        "bulk.v1.cancel",
        json!({"orgId": org.id.to_hex(), "jobId": job}),
    )
    .await;
    let took = asked.elapsed();
    assert_eq!(snap["status"], "cancelled", "{snap}");
    // The contract's bound (2 s), with the reply's own round trips on top.
    assert!(
        took < std::time::Duration::from_secs(3),
        "cancel took {took:?}"
    );
    assert!(snap["startedAt"].is_null(), "{snap}");
    assert_eq!(snap["processed"], 0);
    assert!(snap["result"].is_null());
}

/// An ObjectId minted `secs` seconds ago (`n` tells ids of one second apart).
fn id_at(secs_ago: u32, n: u32) -> ObjectId {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32;
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&(now - secs_ago).to_be_bytes());
    b[4..8].copy_from_slice(&0x5eed_0000u32.to_be_bytes());
    b[8..].copy_from_slice(&n.to_be_bytes());
    ObjectId::from_bytes(b)
}

#[tokio::test]
async fn an_export_over_many_id_ranges_keeps_id_order_and_resumes_inside_a_range() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    // An organisation created two hours ago; its contacts minted over those two
    // hours (a few imported with older ids), so the export reads many ranges.
    // A bystander's contacts are minted over the same seconds.
    let org = id_at(7_200, 0);
    let other = id_at(7_200, 1);
    let stage = ObjectId::new();
    let pipe = pipeline(&db, org, "Sales", &[(stage, "New Lead")]).await;
    let n = 6_000u32;
    let mut ids: Vec<ObjectId> = (0..n)
        .map(|i| match i % 200 {
            0 => id_at(9_000 + i, i),
            _ => id_at(1 + (i * 7_199 / n), i),
        })
        .collect();
    let mut docs: Vec<Document> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut c = contact(org, pipe, stage, i);
            c.insert("_id", *id);
            // Wide rows: the file is written in several chunks (1 MB each),
            // so the failures below land after some were checkpointed.
            c.insert("firstName", format!("First{i}-{}", "x".repeat(1_000)));
            c
        })
        .collect();
    docs.extend((0..n).map(|i| {
        let mut c = contact(other, pipe, stage, i as usize);
        c.insert("_id", id_at(1 + (i * 7_199 / n), n + i));
        c
    }));
    // Inserted out of order: only the `_id`s decide the file's order.
    docs.reverse();
    insert(&db, "contacts", docs).await;
    ids.sort();

    // Steps fail after rows were written: twice retried in place (the reader
    // opened again after the last row it handed over), then the actor fails
    // and is restarted from the checkpoint; both land inside a range.
    failpoint::arm(failpoint::EXPORT_STEP_FAILS, &org.to_hex(), 3);
    let client = stack.client().await;
    let _svc = stack
        .service_with(|c| {
            c.export_batch = 25;
            c.export_ranges = 16;
            c.step_retries = 2;
            c.retry_max_ms = 200;
        })
        .await;
    let body =
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}, "fields": ["id", "firstName"]});
    let job = export(&client, body).await;
    let done = wait_terminal(&client, org, &job).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        failpoint::remaining(failpoint::EXPORT_STEP_FAILS, &org.to_hex()),
        0,
        "every failure happened"
    );
    assert_eq!(
        done["attempts"], 2,
        "restarted once from the checkpoint: {done}"
    );
    assert_eq!(done["total"], n, "{done}");
    let rows = csv_rows(&download(&done).await);
    assert_eq!(rows[0], vec!["Id", "First Name"]);
    let got: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    let want: Vec<String> = ids.iter().map(|i| i.to_hex()).collect();
    assert_eq!(got.len(), want.len(), "every row once");
    assert!(got == want, "rows in _id order, none missing or repeated");
}
