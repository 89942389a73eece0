//! Restore jobs against real servers: a delete and its restore compared byte
//! for byte, skips, dry runs, errors, cancel, crash-resume, a restored contact
//! deleted again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use common::*;
use serde_json::{json, Value};

pub struct Org {
    pub id: ObjectId,
    pub stages: Vec<ObjectId>,
    pub owners: Vec<ObjectId>,
    pub contacts: Vec<ObjectId>,
}

/// `n` contacts over 3 stages with fields of many BSON types; owners
/// round-robin over two users and nobody; contact i has i % 3 conversations
/// with i % 4 messages each.
pub async fn seed(db: &mongodb::Database, n: usize) -> Org {
    let id = ObjectId::new();
    let stages: Vec<ObjectId> = (0..3).map(|_| ObjectId::new()).collect();
    let named: Vec<(ObjectId, &str)> = stages.iter().copied().zip(["A", "B", "C"]).collect();
    let pipe = pipeline(db, id, "Sales", &named).await;
    let owners = vec![ObjectId::new(), ObjectId::new()];
    let (mut contacts, mut convs, mut msgs, mut ids) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let mut c = contact(id, pipe, stages[i % 3], i);
        match i % 3 {
            0 => c.insert("ownerId", owners[0]),
            1 => c.insert("ownerId", owners[1]),
            _ => c.remove("ownerId"),
        };
        // Fields the service knows nothing about, of every kind, must come back as they were.
        c.insert("score", i as f64 + 0.25);
        c.insert("visits", i as i64 * 1_000_000_007);
        c.insert("rank", i as i32);
        c.insert("vip", i % 2 == 0);
        c.insert("notes", Bson::Null);
        c.insert(
            "blob",
            Bson::Binary(bson::Binary {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: vec![0, 1, 2, i as u8],
            }),
        );
        c.insert(
            "address",
            doc! {"city": "Toronto", "geo": [43.65, -79.38], "extra": {"floor": i as i32}},
        );
        c.insert(
            "seenAt",
            DateTime::from_millis(1_700_000_000_000 + i as i64),
        );
        let cid = c.get_object_id("_id").unwrap();
        for j in 0..(i % 3) {
            let conv = ObjectId::new();
            convs.push(
                doc! {"_id": conv, "orgId": id, "contactId": cid, "channel": "sms", "n": j as i32},
            );
            for k in 0..(i % 4) {
                msgs.push(doc! {"_id": ObjectId::new(), "orgId": id, "conversationId": conv, "contactId": cid, "body": format!("hi {k} ✓"), "at": DateTime::now()});
            }
        }
        ids.push(cid);
        contacts.push(c);
    }
    insert(db, "contacts", contacts).await;
    insert(db, "conversations", convs).await;
    insert(db, "messages", msgs).await;
    Org {
        id,
        stages,
        owners,
        contacts: ids,
    }
}

async fn count(db: &mongodb::Database, coll: &str, filter: Document) -> u64 {
    db.collection::<Document>(coll)
        .count_documents(filter)
        .await
        .unwrap()
}

async fn delete_all(client: &async_nats::Client, org: ObjectId, extra: Value) -> Value {
    let mut body = json!({"orgId": org.to_hex(), "filter": {"orgWide": true}});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let reply = request(client, "bulk.v1.delete", body).await;
    let job = reply["jobId"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
        .to_string();
    let snap = wait_terminal(client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    snap
}

async fn restore(client: &async_nats::Client, org: ObjectId, job: &str, extra: Value) -> Value {
    let mut body = json!({"orgId": org.to_hex(), "jobId": job});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    request(client, "bulk.v1.restore", body).await
}

/// The checks every complete restore of `org` passes: one CONTACT_RESTORE
/// entry and one `contact_restored` per restored contact, assignees notified once.
async fn check_restore_side_effects(
    stack: &Stack,
    org: &Org,
    job: &str,
    source: &str,
    restored: &BTreeSet<ObjectId>,
) {
    let db = stack.db().await;
    let entries = find_all(&db, "event_logs", doc! {"jobId": job}).await;
    let audited: Vec<ObjectId> = entries
        .iter()
        .map(|e| e.get_object_id("contactId").unwrap())
        .collect();
    assert_eq!(
        audited.len(),
        restored.len(),
        "one CONTACT_RESTORE entry per restored contact"
    );
    assert_eq!(&audited.iter().copied().collect::<BTreeSet<_>>(), restored);
    for e in &entries {
        assert_eq!(e.get_str("type").unwrap(), "CONTACT_RESTORE");
        assert_eq!(e.get_str("sourceJobId").unwrap(), source);
        assert_eq!(e.get_object_id("orgId").unwrap(), org.id);
        assert!(e.get_datetime("createdAt").is_ok());
    }
    let client = stack.client().await;
    let events: Vec<Value> = contact_events(&client, org.id, "contact_restored")
        .await
        .into_iter()
        .filter(|e| e["jobId"] == job)
        .collect();
    assert_eq!(
        events.len(),
        restored.len(),
        "one contact_restored per restored contact"
    );
    let announced: BTreeSet<ObjectId> = events
        .iter()
        .map(|e| ObjectId::parse_str(e["contactId"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(&announced, restored);
    for e in &events {
        assert_eq!(
            e["_msgId"],
            format!("{job}:{}", e["contactId"].as_str().unwrap())
        );
        assert_eq!(e["sourceJobId"], source);
        assert_eq!(e["type"], "contact_restored");
    }
    let notes = find_all(&db, "notifications", doc! {"jobId": job}).await;
    let mut by_owner: BTreeMap<ObjectId, usize> = BTreeMap::new();
    let owned = find_all(
        &db,
        "contacts",
        doc! {"_id": {"$in": restored.iter().collect::<Vec<_>>()}, "ownerId": {"$ne": null}},
    )
    .await;
    for c in owned {
        *by_owner
            .entry(c.get_object_id("ownerId").unwrap())
            .or_default() += 1;
    }
    assert_eq!(notes.len(), by_owner.len(), "one notification per assignee");
    for n in notes {
        assert_eq!(n.get_str("type").unwrap(), "contacts_restored");
        assert_eq!(
            n.get_i64("count").unwrap() as usize,
            by_owner[&n.get_object_id("userId").unwrap()]
        );
    }
}

#[tokio::test]
async fn a_delete_and_its_restore_leave_every_document_as_it_was() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 700).await;
    let b = seed(&db, 50).await;
    let before = raw_state(&db, a.id).await;
    let before_b = raw_state(&db, b.id).await;
    let _svc = stack
        .service_with(|c| {
            c.delete_batch = 120;
            c.restore_batch = 90;
        })
        .await;
    let client = stack.client().await;
    let del = delete_all(&client, a.id, json!({})).await;
    let source = del["jobId"].as_str().unwrap().to_string();
    assert!(del["restorableUntil"].is_string(), "{del}");
    assert_eq!(del["hardDelete"], false);
    assert_eq!(count(&db, "contacts", doc! {"orgId": a.id}).await, 0);
    assert_eq!(count(&db, "messages", doc! {"orgId": a.id}).await, 0);

    // The dry run counts what the delete removed, and starts nothing.
    let dry = restore(&client, a.id, &source, json!({"dryRun": true})).await;
    assert_eq!(dry["dryRun"], true, "{dry}");
    assert_eq!(dry["counts"], del["counts"], "{dry} vs {del}");
    assert_eq!(count(&db, "bulk_jobs", doc! {"kind": "restore"}).await, 0);

    let reply = restore(&client, a.id, &source, json!({})).await;
    assert_eq!(reply["kind"], "restore", "{reply}");
    let job = reply["jobId"].as_str().unwrap().to_string();
    let snap = wait_terminal(&client, a.id, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["kind"], "restore");
    assert_eq!(snap["sourceJobId"], source);
    assert_eq!(snap["result"], json!({"restored": 700, "skipped": 0}));
    assert_eq!(snap["counts"], del["counts"]);
    assert_eq!(snap["total"], 700);
    assert_eq!(snap["processed"], 700);

    // Byte for byte, same _ids, nothing more; the other organisation untouched.
    let after = raw_state(&db, a.id).await;
    assert_eq!(after.len(), before.len());
    for (k, v) in &before {
        assert_eq!(after.get(k), Some(v), "{k:?} differs after the restore");
    }
    assert_eq!(raw_state(&db, b.id).await, before_b);
    let restored: BTreeSet<ObjectId> = a.contacts.iter().copied().collect();
    check_restore_side_effects(&stack, &a, &job, &source, &restored).await;

    // The delete's entries gave up their unique keys to the restored contacts.
    assert_eq!(
        count(
            &db,
            "event_logs",
            doc! {"jobId": &source, "bulkKey": {"$regex": "^released:"}}
        )
        .await,
        700
    );
    assert_eq!(
        count(
            &db,
            "event_logs",
            doc! {"jobId": &source, "restoredBy": &job}
        )
        .await,
        700
    );

    // Asking again returns the same restore job.
    let again = restore(&client, a.id, &source, json!({})).await;
    assert_eq!(again["jobId"], job.as_str(), "{again}");

    // A restored contact is an ordinary contact: a later delete removes it
    // with a new audit entry and a new event.
    let del2 = delete_all(&client, a.id, json!({})).await;
    let second = del2["jobId"].as_str().unwrap().to_string();
    assert_eq!(del2["counts"], del["counts"], "{del2}");
    assert_eq!(count(&db, "contacts", doc! {"orgId": a.id}).await, 0);
    assert_eq!(
        count(
            &db,
            "event_logs",
            doc! {"jobId": &second, "type": "CONTACT_DELETE"}
        )
        .await,
        700
    );
    assert_eq!(
        count(
            &db,
            "event_logs",
            doc! {"jobId": &source, "type": "CONTACT_DELETE"}
        )
        .await,
        700
    );
    let removed = contact_events(&client, a.id, "contact_removed").await;
    assert_eq!(
        removed
            .iter()
            .filter(|e| e["jobId"] == second.as_str())
            .count(),
        700
    );
    // And the second delete can be undone too.
    let r2 = restore(&client, a.id, &second, json!({})).await;
    let r2 = r2["jobId"].as_str().unwrap().to_string();
    let snap2 = wait_terminal(&client, a.id, &r2).await;
    assert_eq!(
        snap2["result"],
        json!({"restored": 700, "skipped": 0}),
        "{snap2}"
    );
    assert_eq!(raw_state(&db, a.id).await, before);
}

#[tokio::test]
async fn a_contact_created_again_is_skipped_and_never_overwritten() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 60).await;
    let before = raw_state(&db, a.id).await;
    let _svc = stack.service().await;
    let client = stack.client().await;
    let del = delete_all(&client, a.id, json!({})).await;
    let source = del["jobId"].as_str().unwrap().to_string();
    // Contact 5 (2 conversations with 1 message each) is created again by other means.
    let again = a.contacts[5];
    db.collection::<Document>("contacts")
        .insert_one(doc! {"_id": again, "orgId": a.id, "firstName": "Recreated"})
        .await
        .unwrap();
    let dry = restore(&client, a.id, &source, json!({"dryRun": true})).await;
    let deleted = &del["counts"];
    assert_eq!(dry["counts"]["contacts"], 59, "{dry}");
    assert_eq!(
        dry["counts"]["conversations"].as_u64().unwrap(),
        deleted["conversations"].as_u64().unwrap() - 2
    );
    assert_eq!(
        dry["counts"]["messages"].as_u64().unwrap(),
        deleted["messages"].as_u64().unwrap() - 2
    );
    let job = restore(&client, a.id, &source, json!({})).await["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    let snap = wait_terminal(&client, a.id, &job).await;
    assert_eq!(
        snap["result"],
        json!({"restored": 59, "skipped": 1}),
        "{snap}"
    );
    assert_eq!(snap["counts"], dry["counts"]);
    let kept = db
        .collection::<Document>("contacts")
        .find_one(doc! {"_id": again})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        kept,
        doc! {"_id": again, "orgId": a.id, "firstName": "Recreated"},
        "not overwritten"
    );
    assert_eq!(
        count(&db, "conversations", doc! {"contactId": again}).await,
        0,
        "skipped with its children"
    );
    let after = raw_state(&db, a.id).await;
    for (k, v) in &before {
        if k.0 == "contacts" && k.1 == again.to_hex() {
            continue;
        }
        if after.get(k) != Some(v) {
            // Only the skipped contact's children may be missing.
            let d = bson::RawDocument::from_bytes(v).unwrap();
            assert_eq!(
                d.get_object_id("contactId").unwrap(),
                again,
                "{k:?} not restored"
            );
        }
    }
    let restored: BTreeSet<ObjectId> = a.contacts.iter().copied().filter(|c| *c != again).collect();
    check_restore_side_effects(&stack, &a, &job, &source, &restored).await;
}

#[tokio::test]
async fn restores_refuse_what_cannot_be_restored() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 30).await;
    let b = seed(&db, 30).await;
    let _svc = stack
        .service_with(|c| c.restore_retention = Duration::from_secs(4))
        .await;
    let client = stack.client().await;
    // A hard delete keeps nothing: gone.
    let hard = delete_all(&client, a.id, json!({"hardDelete": true})).await;
    assert_eq!(hard["hardDelete"], true);
    assert!(hard["restorableUntil"].is_null(), "{hard}");
    assert_eq!(
        count(&db, "bulk_kept", doc! {"orgId": a.id}).await,
        0,
        "a hard delete keeps nothing"
    );
    let r = restore(&client, a.id, hard["jobId"].as_str().unwrap(), json!({})).await;
    assert_eq!(r["error"]["code"], "gone", "{r}");
    // Another organisation's delete: not found, even for a dry run.
    let del = delete_all(&client, b.id, json!({})).await;
    let source = del["jobId"].as_str().unwrap();
    for extra in [json!({}), json!({"dryRun": true})] {
        let r = restore(&client, a.id, source, extra).await;
        assert_eq!(r["error"]["code"], "not_found", "{r}");
    }
    // Bad input names its field.
    let r = request(&client, "bulk.v1.restore", json!({"orgId": b.id.to_hex()})).await;
    assert_eq!(r["error"]["field"], "jobId", "{r}");
    let r = restore(&client, b.id, source, json!({"dryRun": "yes"})).await;
    assert_eq!(r["error"]["field"], "dryRun", "{r}");
    // Past the retention: gone.
    let until =
        chrono::DateTime::parse_from_rfc3339(del["restorableUntil"].as_str().unwrap()).unwrap();
    while chrono::Utc::now() <= until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = restore(&client, b.id, source, json!({})).await;
    assert_eq!(r["error"]["code"], "gone", "{r}");
}

#[tokio::test]
async fn a_restore_of_a_running_delete_is_a_conflict() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 3000).await;
    let _svc = stack.service_with(|c| c.delete_batch = 50).await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": a.id.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    let r = restore(&client, a.id, &job, json!({})).await;
    assert_eq!(r["error"]["code"], "conflict", "{r}");
    let snap = wait_terminal(&client, a.id, &job).await;
    assert_eq!(snap["status"], "completed");
}

#[tokio::test]
async fn a_cancelled_restore_is_finished_by_a_second_one() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 2000).await;
    let before = raw_state(&db, a.id).await;
    let _svc = stack
        .service_with(|c| {
            c.restore_batch = 40;
        })
        .await;
    let client = stack.client().await;
    let del = delete_all(&client, a.id, json!({})).await;
    let source = del["jobId"].as_str().unwrap().to_string();
    let first = restore(&client, a.id, &source, json!({})).await["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_job(&client, a.id, &first, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) >= 200
    })
    .await;
    let cancelled = request(
        &client,
        "bulk.v1.cancel",
        json!({"orgId": a.id.to_hex(), "jobId": &first}),
    )
    .await;
    let cancelled = wait_terminal(&client, a.id, &first)
        .await
        .as_object()
        .cloned()
        .map(Value::Object)
        .unwrap_or(cancelled);
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let done1 = cancelled["result"]["restored"].as_u64().unwrap();
    assert!(done1 < 2000, "{cancelled}");
    // What the snapshot says is what is in the database.
    assert_eq!(count(&db, "contacts", doc! {"orgId": a.id}).await, done1);
    assert_eq!(
        count(&db, "conversations", doc! {"orgId": a.id}).await,
        cancelled["counts"]["conversations"].as_u64().unwrap()
    );
    assert_eq!(
        count(&db, "messages", doc! {"orgId": a.id}).await,
        cancelled["counts"]["messages"].as_u64().unwrap()
    );
    let second = restore(&client, a.id, &source, json!({})).await["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(second, first);
    let snap = wait_terminal(&client, a.id, &second).await;
    assert_eq!(
        snap["result"],
        json!({"restored": 2000 - done1, "skipped": done1}),
        "{snap}"
    );
    assert_eq!(raw_state(&db, a.id).await, before);
    // Each contact has exactly one CONTACT_RESTORE entry across both jobs.
    assert_eq!(
        count(
            &db,
            "event_logs",
            doc! {"orgId": a.id, "type": "CONTACT_RESTORE"}
        )
        .await,
        2000
    );
}

#[tokio::test]
async fn restores_over_http() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 40).await;
    let svc = stack.service().await;
    let base = format!("http://{}", svc.addr);
    let http = reqwest::Client::new();
    let deleter = token(a.id, "contacts:delete jobs:read");
    // A hard delete needs contacts:purge.
    let r = http
        .delete(format!(
            "{base}/api/contacts/query-bulk-delete?hardDelete=true"
        ))
        .bearer_auth(&deleter)
        .json(&json!({"orgWide": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .delete(format!("{base}/api/contacts/query-bulk-delete"))
        .bearer_auth(&deleter)
        .json(&json!({"orgWide": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job = r.json::<Value>().await.unwrap()["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("{base}/api/contacts/bulk-job/{job}/restore");
    // 409 while it runs (or it is already done); poll to the end.
    let client = stack.client().await;
    wait_terminal(&client, a.id, &job).await;
    let r = http
        .post(&url)
        .bearer_auth(&deleter)
        .json(&json!({"dryRun": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let dry: Value = r.json().await.unwrap();
    assert_eq!(dry["counts"]["contacts"], 40, "{dry}");
    let r = http
        .post(&url)
        .bearer_auth(token(a.id, "jobs:read"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(&url)
        .bearer_auth(token(ObjectId::new(), "contacts:delete"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http.post(&url).bearer_auth(&deleter).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let snap: Value = r.json().await.unwrap();
    assert_eq!(snap["kind"], "restore");
    assert_eq!(snap["sourceJobId"], job.as_str());
    let done = wait_terminal(&client, a.id, snap["jobId"].as_str().unwrap()).await;
    assert_eq!(done["result"]["restored"], 40);
    // A hard delete with the purge scope, then its restore: 410.
    let purger = token(a.id, "contacts:delete contacts:purge");
    let r = http
        .delete(format!(
            "{base}/api/contacts/query-bulk-delete?hardDelete=true"
        ))
        .bearer_auth(&purger)
        .json(&json!({"orgWide": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let hard = r.json::<Value>().await.unwrap()["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_terminal(&client, a.id, &hard).await;
    let r = http
        .post(format!("{base}/api/contacts/bulk-job/{hard}/restore"))
        .bearer_auth(&deleter)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "gone");
}

/// The real binary with this file's batches (40 deletes, 30 restores) and
/// room for the many attempts its crashes cost, then `env`.
async fn start_binary(stack: &Stack, env: &[(&str, &str)]) -> tokio::process::Child {
    let base: &[(&str, &str)] = &[
        ("BULK_DELETE_BATCH", "40"),
        ("BULK_RESTORE_BATCH", "30"),
        // Every start after a crash counts as an attempt; these tests crash often.
        ("BULK_MAX_ATTEMPTS", "50"),
    ];
    common::start_binary(stack, &[base, env].concat()).await
}

/// Waits for the binary to end by itself (a failpoint), with a deadline.
async fn wait_exit(child: &mut tokio::process::Child, point: &str) {
    let status = tokio::time::timeout(Duration::from_secs(90), child.wait())
        .await
        .unwrap_or_else(|_| panic!("the binary never reached failpoint {point}"))
        .unwrap();
    assert!(!status.success(), "aborted at {point}: {status}");
}

#[tokio::test]
async fn a_crash_at_each_point_of_the_delete_loses_nothing() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let client = stack.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut orgs = Vec::new();
    for point in [
        "delete.keep",
        "delete.kept",
        "delete.children",
        "delete.contacts",
    ] {
        let org = seed(&db, 300).await;
        let before = raw_state(&db, org.id).await;
        let mut bin = start_binary(&stack, &[("BULK_FAILPOINT", point)]).await;
        // Durable intake: the command is stored whatever becomes of the binary.
        let body =
            json!({"orgId": org.id.to_hex(), "commandId": point, "filter": {"orgWide": true}});
        js.publish(
            "bulk.v1.submit.delete",
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .expect("stored by JetStream");
        wait_exit(&mut bin, point).await;
        // The crashed delete resumes and completes.
        let mut bin = start_binary(&stack, &[]).await;
        let found = request(
            &client,
            "bulk.v1.job",
            json!({"orgId": org.id.to_hex(), "commandId": point}),
        )
        .await;
        let job = found["jobId"]
            .as_str()
            .unwrap_or_else(|| panic!("{point}: {found}"))
            .to_string();
        let snap = wait_terminal(&client, org.id, &job).await;
        assert_eq!(snap["status"], "completed", "{point}: {snap}");
        // `wait_exit` saw the abort at the point; the takeover after it
        // costs no attempt.
        assert_eq!(snap["attempts"], 1, "{point}: {snap}");
        bin.kill().await.unwrap();
        orgs.push((point, org, before, job));
    }
    let _bin = start_binary(&stack, &[]).await;
    for (point, org, before, job) in &orgs {
        let snap = wait_terminal(&client, org.id, job).await;
        assert_eq!(snap["status"], "completed", "{point}: {snap}");
        assert_eq!(snap["counts"]["contacts"], 300, "{point}: {snap}");
        assert_eq!(
            count(&db, "contacts", doc! {"orgId": org.id}).await,
            0,
            "{point}"
        );
        for coll in ["conversations", "messages"] {
            assert_eq!(
                count(&db, coll, doc! {"orgId": org.id}).await,
                0,
                "{point}: {coll} left"
            );
        }
        // Everything it removed was kept: the restore gives back every byte.
        let r = restore(&client, org.id, job, json!({})).await;
        let rjob = r["jobId"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}"))
            .to_string();
        let done = wait_terminal(&client, org.id, &rjob).await;
        assert_eq!(
            done["result"],
            json!({"restored": 300, "skipped": 0}),
            "{point}: {done}"
        );
        assert_eq!(
            &raw_state(&db, org.id).await,
            before,
            "{point}: not everything came back"
        );
    }
}

/// Restore batches of ten: many batches to crash in.
const SMALL: &[(&str, &str)] = &[("BULK_RESTORE_BATCH", "10")];

#[tokio::test]
async fn sigkill_mid_restore_then_completion_is_exact() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 1500).await;
    let before = raw_state(&db, a.id).await;
    let client = stack.client().await;
    let mut bin = start_binary(&stack, SMALL).await;
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": a.id.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let source = reply["jobId"].as_str().unwrap().to_string();
    let del = wait_terminal(&client, a.id, &source).await;
    assert_eq!(del["status"], "completed");
    let job = restore(&client, a.id, &source, json!({})).await["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    for threshold in [60, 300] {
        wait_job(&client, a.id, &job, 90, |s| {
            s["processed"].as_i64().unwrap_or(0) >= threshold
        })
        .await;
        bin.kill().await.unwrap(); // SIGKILL
        let mid = db
            .collection::<Document>("bulk_jobs")
            .find_one(doc! {"_id": &job})
            .await
            .unwrap()
            .unwrap();
        assert_ne!(
            mid.get_str("status").unwrap(),
            "completed",
            "killed mid-way: {mid}"
        );
        bin = start_binary(&stack, SMALL).await;
    }
    // And a crash at each point of a restore batch.
    for point in ["restore.decided", "restore.contacts", "restore.children"] {
        bin.kill().await.unwrap();
        bin = start_binary(
            &stack,
            &[("BULK_RESTORE_BATCH", "10"), ("BULK_FAILPOINT", point)],
        )
        .await;
        wait_exit(&mut bin, point).await;
    }
    bin = start_binary(&stack, SMALL).await;
    let snap = wait_terminal(&client, a.id, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(
        snap["result"],
        json!({"restored": 1500, "skipped": 0}),
        "{snap}"
    );
    assert_eq!(snap["counts"], del["counts"]);
    assert_eq!(snap["processed"], 1500);
    assert_eq!(raw_state(&db, a.id).await, before);
    let restored: BTreeSet<ObjectId> = a.contacts.iter().copied().collect();
    check_restore_side_effects(&stack, &a, &job, &source, &restored).await;
    drop(bin);
}

#[tokio::test]
async fn kept_documents_expire_after_the_retention() {
    // A MongoDB-wire server whose TTL monitor sweeps every second (MongoDB's
    // and secantusd-rs's default is 60 s): the TTL index itself does the work.
    let dir = tempfile::tempdir().unwrap();
    let mongo_dir = dir.path().join("mongo");
    std::fs::create_dir_all(&mongo_dir).unwrap();
    std::fs::write(
        mongo_dir.join("secantusd.toml"),
        "[storage]\nttl_sweep_seconds = 1\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("nats")).unwrap();
    let conf = contact_bulk_testkit::servers::repo_nats_conf();
    let nats_dir = dir.path().join("nats");
    let (nats, mongo) = tokio::join!(
        contact_bulk_testkit::servers::NatsServer::start(&conf, &nats_dir, None),
        contact_bulk_testkit::servers::MongoServer::start(&mongo_dir, None)
    );
    let stack = Stack {
        nats: nats.expect("nats-server starts"),
        mongo: mongo.expect("secantusd-rs starts"),
        dir,
        db_name: "crm".into(),
    };
    let db = stack.db().await;
    let a = seed(&db, 40).await;
    let _svc = stack
        .service_with(|c| c.restore_retention = Duration::from_secs(3))
        .await;
    let client = stack.client().await;
    let del = delete_all(&client, a.id, json!({})).await;
    let kept = count(&db, "bulk_kept", doc! {"orgId": a.id}).await;
    let removed = del["counts"]["contacts"].as_u64().unwrap();
    assert_eq!(
        kept, removed,
        "one kept document per removed contact (a bundle holding its few children)"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count(&db, "bulk_kept", doc! {"orgId": a.id}).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "kept documents outlived their retention by a minute"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = restore(&client, a.id, del["jobId"].as_str().unwrap(), json!({})).await;
    assert_eq!(r["error"]["code"], "gone", "{r}");
}
