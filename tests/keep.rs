//! The delete's keep step under weight, against real servers: a contact with
//! far more children than its bundle holds, a batch whose children outgrow the
//! keep's buffer, a crash while children are kept apart; and a restore that
//! fails with a contact half back, finished by the next restore.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, Document, RawDocumentBuf};
use common::*;
use contact_bulk_actors::failpoint;
use contact_bulk_actors::restore::kept::{self, Kind, EMBED_BYTES};
use futures::TryStreamExt;
use serde_json::{json, Value};

/// The binary of these tests: deletes by 40, and room for the many attempts
/// their crashes cost (every start after a crash counts as one).
const KEEP_ENV: &[(&str, &str)] = &[("BULK_DELETE_BATCH", "40"), ("BULK_MAX_ATTEMPTS", "50")];

/// An organisation: `small` contacts with 2 conversations × 3 messages, plus
/// one contact with `big` messages of ~300 bytes (far beyond a bundle), and
/// `heavy` contacts whose 6 messages of 4 KB nearly fill a bundle each.
async fn seed(db: &mongodb::Database, small: usize, big: usize, heavy: usize) -> ObjectId {
    let org = ObjectId::new();
    let stage = ObjectId::new();
    let pipe = pipeline(db, org, "Sales", &[(stage, "A")]).await;
    let (mut contacts, mut convs, mut msgs) = (vec![], vec![], vec![]);
    let mut add = |i: usize, conversations: usize, messages: usize, body: usize| {
        let c = contact(org, pipe, stage, i);
        let cid = c.get_object_id("_id").unwrap();
        contacts.push(c);
        for j in 0..conversations {
            let conv = ObjectId::new();
            convs.push(doc! {"_id": conv, "orgId": org, "contactId": cid, "n": j as i32});
            for k in 0..messages {
                msgs.push(doc! {
                    "_id": ObjectId::new(), "orgId": org, "conversationId": conv,
                    "contactId": cid, "body": format!("{k:06} {}", "x".repeat(body)),
                });
            }
        }
    };
    for i in 0..small {
        add(i, 2, 3, 20);
    }
    if big > 0 {
        add(small, 1, big, 300);
    }
    for i in 0..heavy {
        add(small + 1 + i, 1, 6, 4000);
    }
    insert(db, "contacts", contacts).await;
    insert(db, "conversations", convs).await;
    insert(db, "messages", msgs).await;
    org
}

/// What a delete kept, checked: every removed document kept exactly once (in
/// a bundle or apart, never both), bundles within their bound, and a bundle
/// with children apart says so. Returns (contacts, conversations, messages).
async fn check_kept_once(
    db: &mongodb::Database,
    job: &str,
    before: &BTreeMap<(String, String), Vec<u8>>,
) -> (usize, usize, usize) {
    let all: Vec<RawDocumentBuf> = db
        .collection::<RawDocumentBuf>("bulk_kept")
        .find(doc! {"jobId": job})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut spilled: BTreeSet<ObjectId> = BTreeSet::new();
    let mut apart: BTreeSet<ObjectId> = BTreeSet::new();
    for k in &all {
        let key = k.get_str("_id").unwrap();
        let contact = kept::contact_of(k).unwrap();
        let id = |d: &bson::RawDocument| d.get_object_id("_id").unwrap().to_hex();
        if key.starts_with(&format!("{job}:c:")) {
            *seen
                .entry(("contacts".into(), id(kept::original(k).unwrap())))
                .or_default() += 1;
            let mut bytes = 0;
            for (kind, coll) in [
                (Kind::Conversation, "conversations"),
                (Kind::Message, "messages"),
            ] {
                let children = kept::embedded(k, kind).unwrap();
                assert_eq!(
                    kept::embedded_count(k, kind),
                    children.len() as u64,
                    "a bundle's counts"
                );
                for c in children {
                    bytes += c.as_bytes().len();
                    *seen.entry((coll.into(), id(c))).or_default() += 1;
                }
            }
            assert!(
                bytes <= EMBED_BYTES,
                "a bundle holds {bytes} bytes of children"
            );
            if kept::spilled(k) {
                spilled.insert(contact);
            }
        } else {
            let coll = if key.starts_with(&format!("{job}:m:")) {
                "messages"
            } else {
                "conversations"
            };
            *seen
                .entry((coll.into(), id(kept::original(k).unwrap())))
                .or_default() += 1;
            apart.insert(contact);
        }
    }
    for (doc, n) in &seen {
        assert_eq!(*n, 1, "{doc:?} kept {n} times");
    }
    let kept: BTreeSet<_> = seen.keys().cloned().collect();
    let removed: BTreeSet<_> = before.keys().cloned().collect();
    assert_eq!(kept, removed, "kept exactly what was removed");
    assert!(
        apart.is_subset(&spilled),
        "a bundle with children apart says spilled"
    );
    let n = |c: &str| seen.keys().filter(|(k, _)| k == c).count();
    (n("contacts"), n("conversations"), n("messages"))
}

/// Starts an org-wide delete; its job id.
async fn start_delete(client: &async_nats::Client, org: ObjectId) -> String {
    let reply = request(
        client,
        "bulk.v1.delete",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap_or_else(|| panic!("{reply}"));
    job.to_string()
}

async fn delete_all(client: &async_nats::Client, org: ObjectId) -> Value {
    let job = start_delete(client, org).await;
    wait_terminal(client, org, &job).await
}

async fn restore(client: &async_nats::Client, org: ObjectId, source: &str) -> Value {
    let reply = request(
        client,
        "bulk.v1.restore",
        json!({"orgId": org.to_hex(), "jobId": source}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap_or_else(|| panic!("{reply}"));
    wait_terminal(client, org, job).await
}

#[tokio::test]
async fn contacts_with_many_children_are_kept_in_bounded_pieces_and_come_back() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    // One contact with 3,000 messages (~1 MB), and a batch of 250 contacts
    // with ~24 KB of messages each (~6 MB: beyond the keep's buffer).
    let org = seed(&db, 50, 3000, 250).await;
    let before = raw_state(&db, org).await;
    let _svc = stack.service_with(|c| c.delete_batch = 1000).await;
    let client = stack.client().await;
    let del = delete_all(&client, org).await;
    assert_eq!(del["status"], "completed", "{del}");
    let (c, v, m) = check_kept_once(&db, del["jobId"].as_str().unwrap(), &before).await;
    assert_eq!((c, v, m), (301, 351, 50 * 6 + 3000 + 250 * 6));
    assert_eq!(
        del["counts"],
        json!({"contacts": c, "conversations": v, "messages": m}),
        "{del}"
    );
    let done = restore(&client, org, del["jobId"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["counts"], del["counts"], "{done}");
    assert_eq!(raw_state(&db, org).await, before, "every byte back");
}

#[tokio::test]
async fn a_crash_while_children_are_kept_apart_loses_nothing_and_keeps_each_once() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let client = stack.client().await;
    let js = async_nats::jetstream::new(client.clone());
    for point in ["delete.spilled", "delete.kept"] {
        let org = seed(&db, 60, 2500, 0).await;
        let before = raw_state(&db, org).await;
        let mut bin =
            start_binary(&stack, &[KEEP_ENV, &[("BULK_FAILPOINT", point)]].concat()).await;
        let body = json!({"orgId": org.to_hex(), "commandId": point, "filter": {"orgWide": true}});
        js.publish(
            "bulk.v1.submit.delete",
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .expect("stored by JetStream");
        let status = tokio::time::timeout(Duration::from_secs(90), bin.wait())
            .await
            .unwrap_or_else(|_| panic!("the binary never reached {point}"))
            .unwrap();
        assert!(!status.success(), "aborted at {point}: {status}");
        let mut bin = start_binary(&stack, KEEP_ENV).await;
        let found = request(
            &client,
            "bulk.v1.job",
            json!({"orgId": org.to_hex(), "commandId": point}),
        )
        .await;
        let job = found["jobId"].as_str().unwrap_or_else(|| panic!("{found}"));
        let snap = wait_terminal(&client, org, job).await;
        assert_eq!(snap["status"], "completed", "{point}: {snap}");
        let (c, v, m) = check_kept_once(&db, job, &before).await;
        assert_eq!((c, v, m), (61, 121, 60 * 6 + 2500), "{point}");
        assert_eq!(
            snap["counts"],
            json!({"contacts": c, "conversations": v, "messages": m}),
            "{point}: counts after the crash"
        );
        let done = restore(&client, org, job).await;
        assert_eq!(
            done["result"],
            json!({"restored": 61, "skipped": 0}),
            "{point}: {done}"
        );
        assert_eq!(
            raw_state(&db, org).await,
            before,
            "{point}: every byte back"
        );
        bin.kill().await.unwrap();
    }
}

#[tokio::test]
async fn a_restore_that_fails_with_a_contact_half_back_is_finished_by_the_next() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 200, 0, 0).await;
    let before = raw_state(&db, org).await;
    let svc = stack
        .service_with(|c| {
            c.restore_batch = 30;
            c.max_attempts = 2;
            c.step_retries = 1;
            c.retry_max_ms = 100;
        })
        .await;
    let client = stack.client().await;
    let del = delete_all(&client, org).await;
    let source = del["jobId"].as_str().unwrap().to_string();
    // Every restore batch fails after putting its contacts back, before
    // their children: the first batch's contacts are back without them.
    failpoint::arm(failpoint::RESTORE_CHILDREN_FAILS, &org.to_hex(), u32::MAX);
    let first = restore(&client, org, &source).await;
    assert_eq!(first["status"], "failed", "{first}");
    let contacts = db.collection::<Document>("contacts");
    let back: Vec<Document> = contacts
        .find(doc! {"orgId": org})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(!back.is_empty(), "the failed batch put contacts back");
    let back_ids: Vec<Bson> = back.iter().map(|c| c.get("_id").unwrap().clone()).collect();
    assert_eq!(
        db.collection::<Document>("messages")
            .count_documents(doc! {"contactId": {"$in": &back_ids}})
            .await
            .unwrap(),
        0,
        "without their children"
    );
    failpoint::arm(failpoint::RESTORE_CHILDREN_FAILS, &org.to_hex(), 0);
    let second = restore(&client, org, &source).await;
    assert_eq!(second["status"], "completed", "{second}");
    assert_eq!(
        second["result"],
        json!({"restored": 200, "skipped": 0}),
        "the half-back contacts are finished, not skipped: {second}"
    );
    assert_eq!(second["counts"], del["counts"], "{second}");
    assert_eq!(raw_state(&db, org).await, before, "every byte back");
    // One CONTACT_RESTORE entry per contact, all the second job's now.
    let entries = find_all(
        &db,
        "event_logs",
        doc! {"orgId": org, "type": "CONTACT_RESTORE"},
    )
    .await;
    assert_eq!(entries.len(), 200);
    let second_id = second["jobId"].as_str().unwrap();
    assert!(entries
        .iter()
        .all(|e| e.get_str("jobId").unwrap() == second_id));
    let adopted = entries
        .iter()
        .filter(|e| e.get_str("adoptedFrom").is_ok())
        .count();
    assert_eq!(adopted, back.len(), "the first job's half-done contacts");
    drop(svc);
}

#[tokio::test]
async fn another_organisations_children_of_a_deleted_contact_are_neither_kept_nor_deleted() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 30, 0, 0).await;
    let before = raw_state(&db, org).await;
    // Another organisation's documents that name this organisation's contacts
    // (bad data, or a hostile import): the keep reads children by contact
    // and must leave these where they are.
    let other = ObjectId::new();
    let victims = find_all(&db, "contacts", doc! {"orgId": org}).await;
    let (mut convs, mut msgs) = (vec![], vec![]);
    for c in victims.iter().take(5) {
        let cid = c.get_object_id("_id").unwrap();
        let conv = ObjectId::new();
        convs.push(doc! {"_id": conv, "orgId": other, "contactId": cid});
        msgs.push(
            doc! {"_id": ObjectId::new(), "orgId": other, "conversationId": conv, "contactId": cid},
        );
    }
    insert(&db, "conversations", convs).await;
    insert(&db, "messages", msgs).await;
    let foreign = raw_state(&db, other).await;
    assert_eq!(foreign.len(), 10);
    let _svc = stack.service_with(|c| c.delete_batch = 12).await;
    let client = stack.client().await;
    let del = delete_all(&client, org).await;
    assert_eq!(del["status"], "completed", "{del}");
    assert_eq!(
        del["counts"],
        json!({"contacts": 30, "conversations": 60, "messages": 180}),
        "{del}"
    );
    let job = del["jobId"].as_str().unwrap();
    // Kept exactly this organisation's documents; the other's untouched.
    check_kept_once(&db, job, &before).await;
    assert_eq!(raw_state(&db, other).await, foreign);
    let done = restore(&client, org, job).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(raw_state(&db, org).await, before, "every byte back");
    assert_eq!(raw_state(&db, other).await, foreign);
}

#[tokio::test]
async fn a_child_written_while_its_contact_is_kept_is_kept_by_another_pass_and_comes_back() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 30, 0, 0).await;
    let first = find_all(&db, "contacts", doc! {"orgId": org})
        .await
        .iter()
        .filter_map(|c| c.get_object_id("_id").ok())
        .min()
        .unwrap();
    let mut before = raw_state(&db, org).await;
    let pause = failpoint::pause_at(failpoint::KEEP_AFTER_READ, &org.to_hex());
    let _svc = stack.service_with(|c| c.delete_batch = 12).await;
    let client = stack.client().await;
    let job = start_delete(&client, org).await;
    // The first slice's children are read; before they are deleted, the CRM
    // writes a conversation and a message for its first contact.
    tokio::time::timeout(Duration::from_secs(60), pause.reached())
        .await
        .expect("the keep never reached its read");
    let conv = ObjectId::new();
    insert(
        &db,
        "conversations",
        vec![doc! {"_id": conv, "orgId": org, "contactId": first, "late": true}],
    )
    .await;
    insert(
        &db,
        "messages",
        vec![doc! {"_id": ObjectId::new(), "orgId": org, "conversationId": conv, "contactId": first, "late": true}],
    )
    .await;
    // What is there now, with the late children (other batches may be kept
    // and deleted already, beside the paused one).
    before.extend(raw_state(&db, org).await);
    assert_eq!(before.len(), 30 + 61 + 181);
    pause.release();
    let del = wait_terminal(&client, org, &job).await;
    assert_eq!(del["status"], "completed", "{del}");
    // Nothing outlives its contact, and the late children were kept too.
    assert_eq!(raw_state(&db, org).await.len(), 0, "documents left behind");
    assert_eq!(
        del["counts"],
        json!({"contacts": 30, "conversations": 61, "messages": 181}),
        "{del}"
    );
    check_kept_once(&db, &job, &before).await;
    let done = restore(&client, org, &job).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(raw_state(&db, org).await, before, "every byte back");
}
