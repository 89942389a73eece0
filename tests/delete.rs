//! Cascade delete jobs against real servers: correctness, isolation, cancel,
//! crash-and-resume of the real binary, durable intake.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bson::{doc, oid::ObjectId, Document};
use common::*;
use futures::TryStreamExt;
use serde_json::{json, Value};

struct Org {
    id: ObjectId,
    stages: Vec<ObjectId>,
    owners: Vec<ObjectId>,
    contacts: Vec<Document>,
}

/// `n` contacts over 3 stages; owners round-robin over two users and nobody;
/// contact i has i % 3 conversations with i % 4 messages each.
async fn seed(db: &mongodb::Database, n: usize, stages: Option<Vec<ObjectId>>) -> Org {
    let id = ObjectId::new();
    let stages = stages.unwrap_or_else(|| (0..3).map(|_| ObjectId::new()).collect());
    let named: Vec<(ObjectId, &str)> = stages
        .iter()
        .zip(["A", "B", "C"])
        .map(|(s, n)| (*s, n))
        .collect();
    let pipe = pipeline(db, id, "Sales", &named).await;
    let owners = vec![ObjectId::new(), ObjectId::new()];
    let mut contacts = Vec::new();
    let mut convs = Vec::new();
    let mut msgs = Vec::new();
    for i in 0..n {
        let mut c = contact(id, pipe, stages[i % 3], i);
        match i % 3 {
            0 => c.insert("ownerId", owners[0]),
            1 => c.insert("ownerId", owners[1]),
            _ => None,
        };
        let cid = c.get_object_id("_id").unwrap();
        for _ in 0..(i % 3) {
            let conv = ObjectId::new();
            convs.push(doc! {"_id": conv, "orgId": id, "contactId": cid});
            for _ in 0..(i % 4) {
                msgs.push(doc! {"_id": ObjectId::new(), "orgId": id, "conversationId": conv, "contactId": cid, "body": "hi"});
            }
        }
        contacts.push(c);
    }
    insert(db, "contacts", contacts.clone()).await;
    insert(db, "conversations", convs).await;
    insert(db, "messages", msgs).await;
    Org {
        id,
        stages,
        owners,
        contacts,
    }
}

async fn ids(
    db: &mongodb::Database,
    coll: &str,
    filter: Document,
    key: &str,
) -> BTreeSet<ObjectId> {
    db.collection::<Document>(coll)
        .find(filter)
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .iter()
        .map(|d| d.get_object_id(key).unwrap())
        .collect()
}

/// Checks every invariant of a finished delete of `org` by `job`, against the
/// contacts `expected` to be deleted. Returns the snapshot counts.
async fn check_invariants(
    stack: &Stack,
    org: &Org,
    job: &str,
    snap: &Value,
    expected: &BTreeSet<ObjectId>,
) {
    let db = stack.db().await;
    let client = stack.client().await;
    let left = ids(&db, "contacts", doc! {"orgId": org.id}, "_id").await;
    let all: BTreeSet<ObjectId> = org
        .contacts
        .iter()
        .map(|c| c.get_object_id("_id").unwrap())
        .collect();
    let gone: BTreeSet<ObjectId> = all.difference(&left).copied().collect();
    assert_eq!(&gone, expected, "exactly the expected contacts are gone");
    // No orphans.
    for coll in ["conversations", "messages"] {
        let parents = ids(&db, coll, doc! {"orgId": org.id}, "contactId").await;
        assert!(
            parents.is_disjoint(&gone),
            "{coll} left behind for a deleted contact"
        );
    }
    // Survivors keep their children.
    let expected_convs: usize = org
        .contacts
        .iter()
        .enumerate()
        .filter(|(_, c)| left.contains(&c.get_object_id("_id").unwrap()))
        .map(|(i, _)| i % 3)
        .sum();
    let convs = db
        .collection::<Document>("conversations")
        .count_documents(doc! {"orgId": org.id})
        .await
        .unwrap();
    assert_eq!(convs as usize, expected_convs);
    // One audit entry per deleted contact.
    let audits = find_all(&db, "event_logs", doc! {"jobId": job}).await;
    assert_eq!(audits.len(), gone.len());
    let audited: BTreeSet<ObjectId> = audits
        .iter()
        .map(|a| a.get_object_id("contactId").unwrap())
        .collect();
    assert_eq!(audited, gone);
    for a in &audits {
        assert_eq!(a.get_str("type").unwrap(), "CONTACT_DELETE");
        assert_eq!(a.get_object_id("orgId").unwrap(), org.id);
        assert!(a
            .get_document("contact")
            .unwrap()
            .get_str("email")
            .unwrap()
            .contains('@'));
    }
    // One contact_removed per deleted contact, with the dedup id.
    let events = contact_events(&client, org.id, "contact_removed").await;
    let announced: Vec<ObjectId> = events
        .iter()
        .filter(|e| e["jobId"] == job)
        .map(|e| ObjectId::parse_str(e["contactId"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(announced.len(), gone.len(), "one event per deleted contact");
    assert_eq!(announced.iter().copied().collect::<BTreeSet<_>>(), gone);
    for e in &events {
        assert_eq!(
            e["_msgId"],
            format!("{}:{}", job, e["contactId"].as_str().unwrap())
        );
        assert_eq!(e["type"], "contact_removed");
        assert_eq!(e["pipelineType"], "Contact");
    }
    // Notifications: one per assignee, with their deleted contacts.
    let mut by_owner: BTreeMap<ObjectId, BTreeSet<ObjectId>> = BTreeMap::new();
    for c in &org.contacts {
        let id = c.get_object_id("_id").unwrap();
        if let (true, Ok(owner)) = (gone.contains(&id), c.get_object_id("ownerId")) {
            by_owner.entry(owner).or_default().insert(id);
        }
    }
    let notes = find_all(&db, "notifications", doc! {"jobId": job}).await;
    assert_eq!(notes.len(), by_owner.len());
    for n in notes {
        let owner = n.get_object_id("userId").unwrap();
        let listed: BTreeSet<ObjectId> = n
            .get_array("contactIds")
            .unwrap()
            .iter()
            .map(|b| b.as_object_id().unwrap())
            .collect();
        assert_eq!(listed, by_owner[&owner]);
        assert_eq!(n.get_i64("count").unwrap() as usize, by_owner[&owner].len());
        assert_eq!(n.get_str("type").unwrap(), "contacts_removed");
        assert!(!n.get_bool("read").unwrap());
    }
    // The snapshot tells the truth.
    assert_eq!(snap["processed"], gone.len());
    assert_eq!(snap["counts"]["contacts"], gone.len());
    let deleted_convs: usize = org
        .contacts
        .iter()
        .enumerate()
        .filter(|(_, c)| gone.contains(&c.get_object_id("_id").unwrap()))
        .map(|(i, _)| i % 3)
        .sum();
    let deleted_msgs: usize = org
        .contacts
        .iter()
        .enumerate()
        .filter(|(_, c)| gone.contains(&c.get_object_id("_id").unwrap()))
        .map(|(i, _)| (i % 3) * (i % 4))
        .sum();
    assert_eq!(snap["counts"]["conversations"], deleted_convs);
    assert_eq!(snap["counts"]["messages"], deleted_msgs);
}

fn in_stages(org: &Org, stages: &[ObjectId]) -> BTreeSet<ObjectId> {
    org.contacts
        .iter()
        .filter(|c| stages.contains(&c.get_object_id("stageId").unwrap()))
        .map(|c| c.get_object_id("_id").unwrap())
        .collect()
}

#[tokio::test]
async fn cascade_delete_removes_exactly_the_filter_with_all_side_effects() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 900, None).await;
    let b = seed(&db, 300, Some(a.stages.clone())).await;
    let _svc = stack.service_with(|c| c.delete_batch = 100).await;
    let client = stack.client().await;
    let filter = json!({"stageIds": [a.stages[0].to_hex(), a.stages[1].to_hex()]});
    let dry = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": a.id.to_hex(), "filter": filter, "dryRun": true}),
    )
    .await;
    assert_eq!(dry["dryRun"], true, "{dry}");
    assert_eq!(
        db.collection::<Document>("bulk_jobs")
            .count_documents(doc! {})
            .await
            .unwrap(),
        0,
        "a dry run creates no job"
    );
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": a.id.to_hex(), "filter": filter, "requestedBy": a.owners[0].to_hex()}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    let snap = wait_terminal(&client, a.id, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(
        snap["counts"], dry["counts"],
        "dry run counts equal what was deleted"
    );
    let expected = in_stages(&a, &a.stages[..2]);
    check_invariants(&stack, &a, &job, &snap, &expected).await;
    // The other organisation, sharing stage ids, is untouched.
    assert_eq!(
        ids(&db, "contacts", doc! {"orgId": b.id}, "_id")
            .await
            .len(),
        300
    );
    assert!(contact_events(&client, b.id, "contact_removed")
        .await
        .is_empty());
    let audit = db
        .collection::<Document>("event_logs")
        .find_one(doc! {"jobId": &job})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(audit.get_object_id("actorId").unwrap(), a.owners[0]);
}

#[tokio::test]
async fn a_contact_moved_out_of_the_filter_mid_job_survives_with_its_children() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 1500, None).await;
    let _svc = stack.service_with(|c| c.delete_batch = 10).await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": a.id.to_hex(), "filter": {"stageIds": [a.stages[1].to_hex()]}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    wait_job(&client, a.id, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) > 0
    })
    .await;
    // The last contact of the stage (i = 1498: 1 conversation... i%3=1 → 1 conversation, i%4=2 → 2 messages).
    let moved = a.contacts[1498].get_object_id("_id").unwrap();
    db.collection::<Document>("contacts")
        .update_one(doc! {"_id": moved}, doc! {"$set": {"stageId": a.stages[2]}})
        .await
        .unwrap();
    let snap = wait_terminal(&client, a.id, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    let mut expected = in_stages(&a, &a.stages[1..2]);
    assert!(expected.remove(&moved));
    check_invariants(&stack, &a, &job, &snap, &expected).await;
    let kids = db
        .collection::<Document>("messages")
        .count_documents(doc! {"contactId": moved})
        .await
        .unwrap();
    assert_eq!(kids, 2);
}

#[tokio::test]
async fn cancel_stops_at_a_batch_boundary_and_the_snapshot_matches_the_database() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 3000, None).await;
    let _svc = stack.service_with(|c| c.delete_batch = 10).await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": a.id.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    wait_job(&client, a.id, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) >= 30
    })
    .await;
    let asked = std::time::Instant::now();
    let snap = request(
        &client,
        "bulk.v1.cancel",
        json!({"orgId": a.id.to_hex(), "jobId": job}),
    )
    .await;
    assert_eq!(snap["status"], "cancelled", "{snap}");
    assert!(asked.elapsed() < Duration::from_secs(3));
    let processed = snap["processed"].as_i64().unwrap() as usize;
    assert!(processed < 3000);
    let left = ids(&db, "contacts", doc! {"orgId": a.id}, "_id").await;
    let gone: BTreeSet<ObjectId> = a
        .contacts
        .iter()
        .map(|c| c.get_object_id("_id").unwrap())
        .filter(|i| !left.contains(i))
        .collect();
    assert_eq!(gone.len(), processed);
    check_invariants(&stack, &a, &job, &snap, &gone).await;
    // Terminal means terminal.
    let again = request(
        &client,
        "bulk.v1.cancel",
        json!({"orgId": a.id.to_hex(), "jobId": job}),
    )
    .await;
    assert_eq!(again["status"], "cancelled");
    assert_eq!(again["processed"], snap["processed"]);
    // The batch prepared while the last one was deleted had its audit entries
    // written; the cancel gave those contacts back, so a second job takes them.
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": a.id.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let second = reply["jobId"].as_str().unwrap().to_string();
    let snap2 = wait_terminal(&client, a.id, &second).await;
    assert_eq!(snap2["status"], "completed", "{snap2}");
    assert_eq!(
        snap2["counts"]["contacts"].as_u64().unwrap() as usize,
        3000 - processed,
        "{snap2}"
    );
    let left = db
        .collection::<Document>("contacts")
        .count_documents(doc! {"orgId": a.id})
        .await
        .unwrap();
    assert_eq!(
        left, 0,
        "contacts the cancelled job decided on stayed behind"
    );
    let entries = db
        .collection::<Document>("event_logs")
        .count_documents(doc! {"orgId": a.id, "type": "CONTACT_DELETE"})
        .await
        .unwrap();
    assert_eq!(
        entries, 3000,
        "one audit entry per contact across both jobs"
    );
}

/// The real binary, with its log lines readable.
struct Binary {
    child: tokio::process::Child,
}

async fn start_binary(stack: &Stack) -> Binary {
    Binary {
        child: common::start_binary(stack, &[("BULK_DELETE_BATCH", "20")]).await,
    }
}

#[tokio::test]
async fn sigkill_mid_delete_then_restart_keeps_every_invariant() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 2400, None).await;
    let client = stack.client().await;
    let mut bin = start_binary(&stack).await;
    let reply = request(&client, "bulk.v1.delete", json!({"orgId": a.id.to_hex(), "filter": {"stageIds": [a.stages[0].to_hex(), a.stages[2].to_hex()]}})).await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    for threshold in [100, 600] {
        wait_job(&client, a.id, &job, 60, |s| {
            s["processed"].as_i64().unwrap_or(0) >= threshold
        })
        .await;
        bin.child.kill().await.unwrap(); // SIGKILL
                                         // No instance runs now: read the record itself.
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
        bin = start_binary(&stack).await;
    }
    let snap = wait_terminal(&client, a.id, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    let expected = in_stages(&a, &[a.stages[0], a.stages[2]]);
    check_invariants(&stack, &a, &job, &snap, &expected).await;
    drop(bin);
}

#[tokio::test]
async fn a_delete_submitted_while_no_instance_runs_executes_once() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let a = seed(&db, 90, None).await;
    let client = stack.client().await;
    // A first run creates the streams, then the service goes away.
    stack.service().await.stop().await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let body = json!({"orgId": a.id.to_hex(), "commandId": "durable-1", "filter": {"stageIds": [a.stages[0].to_hex()]}});
    // A command on a subject the stream captures but the contract does not
    // name must never run (least of all as a delete).
    let stray =
        json!({"orgId": a.id.to_hex(), "commandId": "durable-stray", "filter": {"orgWide": true}});
    let submit = |subject: &'static str, body: &serde_json::Value| {
        let (js, payload) = (js.clone(), serde_json::to_vec(body).unwrap());
        async move {
            js.publish(subject, payload.into())
                .await
                .unwrap()
                .await
                .expect("stored by JetStream");
        }
    };
    submit("bulk.v1.submit.deleteall", &stray).await;
    for _ in 0..2 {
        submit("bulk.v1.submit.delete", &body).await;
    }
    assert_eq!(
        db.collection::<Document>("bulk_jobs")
            .count_documents(doc! {})
            .await
            .unwrap(),
        0
    );
    let _svc = stack.service().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let job = loop {
        let r = request(
            &client,
            "bulk.v1.job",
            json!({"orgId": a.id.to_hex(), "commandId": "durable-1"}),
        )
        .await;
        if r["jobId"].is_string() {
            break r["jobId"].as_str().unwrap().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "durable command never ran: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let snap = wait_terminal(&client, a.id, &job).await;
    assert_eq!(snap["status"], "completed");
    assert_eq!(snap["counts"]["contacts"], 30);
    assert_eq!(
        db.collection::<Document>("bulk_jobs")
            .count_documents(doc! {})
            .await
            .unwrap(),
        1
    );
    // The stray command made no job and touched nothing outside stage 0.
    let stray_job = request(
        &client,
        "bulk.v1.job",
        json!({"orgId": a.id.to_hex(), "commandId": "durable-stray"}),
    )
    .await;
    assert_eq!(stray_job["error"]["code"], "not_found", "{stray_job}");
    assert_eq!(
        db.collection::<Document>("contacts")
            .count_documents(doc! {"orgId": a.id})
            .await
            .unwrap(),
        60
    );
    // Every message was consumed (work queue emptied), the stray one included.
    // A message published while the first instance stopped may have gone to
    // its last pull request: JetStream hands it out again after the
    // consumer's `ack_wait` (30 s), so the deadline covers one redelivery.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        let mut stream = js.get_stream("BULK_SUBMIT").await.unwrap();
        if stream.info().await.unwrap().state.messages == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "submit stream not drained"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn overlapping_delete_jobs_never_delete_audit_or_count_a_contact_twice() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 3000, None).await;
    let _svc = stack
        .service_with(|c| {
            c.delete_batch = 50;
            c.max_per_org = 2;
        })
        .await;
    let client = stack.client().await;
    // One job over the whole organisation, one over two of its stages, racing.
    let (a, b) = tokio::join!(
        request(
            &client,
            "bulk.v1.delete",
            json!({"orgId": org.id.to_hex(), "filter": {"orgWide": true}}),
        ),
        request(
            &client,
            "bulk.v1.delete",
            json!({"orgId": org.id.to_hex(), "filter": {"stageIds": [org.stages[0].to_hex(), org.stages[1].to_hex()]}}),
        )
    );
    let (a, b) = (
        a["jobId"].as_str().unwrap().to_string(),
        b["jobId"].as_str().unwrap().to_string(),
    );
    let sa = wait_terminal(&client, org.id, &a).await;
    let sb = wait_terminal(&client, org.id, &b).await;
    assert_eq!(sa["status"], "completed", "{sa}");
    assert_eq!(sb["status"], "completed", "{sb}");
    let left = db
        .collection::<Document>("contacts")
        .count_documents(doc! {"orgId": org.id})
        .await
        .unwrap();
    assert_eq!(left, 0);
    // Each contact was deleted by exactly one of the jobs: one audit entry in
    // all, and the jobs' counts add up to the organisation.
    let entries = find_all(
        &db,
        "event_logs",
        doc! {"orgId": org.id, "type": "CONTACT_DELETE"},
    )
    .await;
    let audited: BTreeSet<ObjectId> = entries
        .iter()
        .map(|e| e.get_object_id("contactId").unwrap())
        .collect();
    assert_eq!(
        entries.len(),
        3000,
        "one audit entry per contact across jobs"
    );
    assert_eq!(audited.len(), 3000);
    let counted =
        sa["counts"]["contacts"].as_u64().unwrap() + sb["counts"]["contacts"].as_u64().unwrap();
    assert_eq!(counted, 3000, "{sa} {sb}");
    for (snap, job) in [(&sa, &a), (&sb, &b)] {
        let mine = entries
            .iter()
            .filter(|e| e.get_str("jobId").unwrap() == job)
            .count() as u64;
        assert_eq!(snap["counts"]["contacts"].as_u64().unwrap(), mine, "{snap}");
    }
    for coll in ["conversations", "messages"] {
        let n = db
            .collection::<Document>(coll)
            .count_documents(doc! {"orgId": org.id})
            .await
            .unwrap();
        assert_eq!(n, 0, "{coll} left behind");
    }
}
