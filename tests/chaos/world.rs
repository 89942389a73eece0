//! The data of the chaos test and its invariants: what is seeded (a stage to
//! delete, a stage to export, an organisation to delete whole, a bystander
//! organisation sharing the doomed stage's id) and what must hold afterwards.

use std::collections::{BTreeSet, HashSet};

use bson::{doc, oid::ObjectId, Document};
use futures::TryStreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::{contact, download, insert, pipeline};

/// How much of everything.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Contacts exported (org A, stage Kept).
    pub export: usize,
    /// Contacts of the stage delete (org A, stage Doomed), each with one
    /// conversation and two messages.
    pub stage_delete: usize,
    /// Contacts of the org-wide delete (org B), each with one conversation and one message.
    pub org_delete: usize,
    /// Contacts of the bystander org C (in a stage with the Doomed stage's id).
    pub bystander: usize,
}

/// What was seeded.
pub struct World {
    pub sizes: Sizes,
    pub org_a: ObjectId,
    pub org_b: ObjectId,
    pub org_c: ObjectId,
    pub doomed: ObjectId,
    pub kept: ObjectId,
    /// Ids of the contacts each delete must remove, and the export must list.
    pub stage_ids: BTreeSet<ObjectId>,
    pub org_b_ids: BTreeSet<ObjectId>,
    pub export_ids: BTreeSet<ObjectId>,
    /// Conversations and messages of the contacts that must stay.
    pub kept_conversations: u64,
    pub kept_messages: u64,
}

/// Seeds the three organisations.
pub async fn seed(db: &mongodb::Database, sizes: Sizes) -> World {
    let (org_a, org_b, org_c) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
    let (doomed, kept, b_stage) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
    let owners: Vec<ObjectId> = (0..3).map(|_| ObjectId::new()).collect();
    let users: Vec<Document> = owners
        .iter()
        .enumerate()
        .map(|(i, u)| doc! {"_id": u, "orgId": org_a, "name": format!("Owner {i}"), "email": format!("owner{i}@example.com")})
        .collect();
    insert(db, "users", users).await;
    let pipe_a = pipeline(db, org_a, "Sales", &[(doomed, "Doomed"), (kept, "Kept")]).await;
    let pipe_b = pipeline(db, org_b, "Sales", &[(b_stage, "All")]).await;
    // Org C uses the Doomed stage's id: only the orgId keeps it out of the stage delete.
    let pipe_c = pipeline(db, org_c, "Sales", &[(doomed, "Doomed")]).await;

    let mut contacts = Vec::new();
    let mut conversations = Vec::new();
    let mut messages = Vec::new();
    let with_children = |c: &Document,
                         n_messages: usize,
                         convs: &mut Vec<Document>,
                         msgs: &mut Vec<Document>| {
        let (org, id) = (
            c.get_object_id("orgId").unwrap(),
            c.get_object_id("_id").unwrap(),
        );
        let conv = ObjectId::new();
        convs.push(doc! {"_id": conv, "orgId": org, "contactId": id});
        for m in 0..n_messages {
            msgs.push(doc! {"_id": ObjectId::new(), "orgId": org, "conversationId": conv, "contactId": id, "body": format!("message {m}")});
        }
    };
    let mut stage_ids = BTreeSet::new();
    for i in 0..sizes.stage_delete {
        let mut c = contact(org_a, pipe_a, doomed, i);
        if i % 2 == 0 {
            c.insert("ownerId", owners[i % owners.len()]);
        }
        with_children(&c, 2, &mut conversations, &mut messages);
        stage_ids.insert(c.get_object_id("_id").unwrap());
        contacts.push(c);
    }
    let mut export_ids = BTreeSet::new();
    let (mut kept_conversations, mut kept_messages) = (0, 0);
    for i in 0..sizes.export {
        let c = contact(org_a, pipe_a, kept, 100_000 + i);
        if i % 10 == 0 {
            with_children(&c, 1, &mut conversations, &mut messages);
            kept_conversations += 1;
            kept_messages += 1;
        }
        export_ids.insert(c.get_object_id("_id").unwrap());
        contacts.push(c);
    }
    let mut org_b_ids = BTreeSet::new();
    for i in 0..sizes.org_delete {
        let c = contact(org_b, pipe_b, b_stage, i);
        with_children(&c, 1, &mut conversations, &mut messages);
        org_b_ids.insert(c.get_object_id("_id").unwrap());
        contacts.push(c);
    }
    for i in 0..sizes.bystander {
        let c = contact(org_c, pipe_c, doomed, i);
        with_children(&c, 1, &mut conversations, &mut messages);
        kept_conversations += 1;
        kept_messages += 1;
        contacts.push(c);
    }
    insert(db, "contacts", contacts).await;
    insert(db, "conversations", conversations).await;
    insert(db, "messages", messages).await;
    World {
        sizes,
        org_a,
        org_b,
        org_c,
        doomed,
        kept,
        stage_ids,
        org_b_ids,
        export_ids,
        kept_conversations,
        kept_messages,
    }
}

async fn ids(db: &mongodb::Database, coll: &str, filter: Document, field: &str) -> Vec<ObjectId> {
    let mut cursor = db
        .collection::<Document>(coll)
        .find(filter)
        .projection(doc! {field: 1})
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(d) = cursor.try_next().await.unwrap() {
        out.push(d.get_object_id(field).unwrap());
    }
    out
}

/// No conversation or message anywhere whose contact (or conversation) is gone,
/// and exactly what must stay is still there.
pub async fn check_data(db: &mongodb::Database, w: &World) {
    let contacts: HashSet<ObjectId> = ids(db, "contacts", doc! {}, "_id")
        .await
        .into_iter()
        .collect();
    let conversations: HashSet<ObjectId> = ids(db, "conversations", doc! {}, "_id")
        .await
        .into_iter()
        .collect();
    let orphan_convs = ids(db, "conversations", doc! {}, "contactId")
        .await
        .into_iter()
        .filter(|c| !contacts.contains(c))
        .count();
    assert_eq!(orphan_convs, 0, "conversations whose contact is gone");
    let orphan_msgs = ids(db, "messages", doc! {}, "contactId")
        .await
        .into_iter()
        .filter(|c| !contacts.contains(c))
        .count();
    assert_eq!(orphan_msgs, 0, "messages whose contact is gone");
    let orphan_msg_convs = ids(db, "messages", doc! {}, "conversationId")
        .await
        .into_iter()
        .filter(|c| !conversations.contains(c))
        .count();
    assert_eq!(orphan_msg_convs, 0, "messages whose conversation is gone");

    let left = |set: &BTreeSet<ObjectId>| set.iter().filter(|id| contacts.contains(id)).count();
    assert_eq!(left(&w.stage_ids), 0, "contacts of the deleted stage left");
    assert_eq!(
        left(&w.org_b_ids),
        0,
        "contacts of the deleted organisation left"
    );
    assert_eq!(
        left(&w.export_ids),
        w.export_ids.len(),
        "contacts outside the delete filter touched"
    );
    let count = |coll: &'static str, filter: Document| async move {
        db.collection::<Document>(coll)
            .count_documents(filter)
            .await
            .unwrap()
    };
    assert_eq!(
        count("contacts", doc! {"orgId": w.org_a}).await as usize,
        w.sizes.export
    );
    assert_eq!(
        count("contacts", doc! {"orgId": w.org_c}).await as usize,
        w.sizes.bystander,
        "another organisation's contacts in the deleted stage touched"
    );
    assert_eq!(count("contacts", doc! {"orgId": w.org_b}).await, 0);
    let kept_orgs = doc! {"orgId": {"$in": [w.org_a, w.org_c, w.org_b]}};
    assert_eq!(
        count("conversations", kept_orgs.clone()).await,
        w.kept_conversations
    );
    assert_eq!(count("messages", kept_orgs).await, w.kept_messages);
}

/// A delete job: its snapshot, its audit entries and its `contact_removed` events.
pub async fn check_delete(
    db: &mongodb::Database,
    js: &async_nats::jetstream::Context,
    snap: &Value,
    org: ObjectId,
    removed: &BTreeSet<ObjectId>,
    messages_each: u64,
) {
    let job_id = snap["jobId"].as_str().unwrap();
    let n = removed.len() as u64;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(
        snap["counts"]["contacts"], n,
        "counts equal what is gone: {snap}"
    );
    assert_eq!(snap["counts"]["conversations"], n, "{snap}");
    assert_eq!(snap["counts"]["messages"], n * messages_each, "{snap}");
    assert_eq!(snap["total"], n, "{snap}");
    assert_eq!(snap["processed"], n, "{snap}");

    let mut cursor = db
        .collection::<Document>("event_logs")
        .find(doc! {"jobId": job_id})
        .await
        .unwrap();
    let mut audited = BTreeSet::new();
    while let Some(e) = cursor.try_next().await.unwrap() {
        assert_eq!(
            e.get_object_id("orgId").unwrap(),
            org,
            "audit entry of another org: {e}"
        );
        assert_eq!(e.get_str("type").unwrap(), "CONTACT_DELETE");
        let id = e.get_object_id("contactId").unwrap();
        assert!(
            audited.insert(id),
            "two audit entries for contact {id} in job {job_id}"
        );
    }
    assert_eq!(
        &audited, removed,
        "exactly one audit entry per deleted contact (job {job_id})"
    );

    let events = removed_events(js, org, job_id).await;
    assert_eq!(
        &events, removed,
        "exactly one contact_removed per deleted contact (job {job_id})"
    );
}

/// The contact ids of `job_id`'s `contact_removed` events in `BULK_EVENTS`; a duplicate fails.
async fn removed_events(
    js: &async_nats::jetstream::Context,
    org: ObjectId,
    job_id: &str,
) -> BTreeSet<ObjectId> {
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
    let mut messages = consumer.messages().await.unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..pending {
        let m = tokio::time::timeout(std::time::Duration::from_secs(20), messages.try_next())
            .await
            .expect("stream read within 20 s")
            .unwrap()
            .expect("stream ended early");
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if v["jobId"] != job_id {
            continue;
        }
        let id = ObjectId::parse_str(v["contactId"].as_str().unwrap()).unwrap();
        assert!(
            seen.insert(id),
            "two contact_removed events for {id} in job {job_id}"
        );
    }
    seen
}

/// The export: every matching contact exactly once, and the sha256 it reports.
pub async fn check_export(snap: &Value, want: &BTreeSet<ObjectId>) {
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["processed"], want.len(), "{snap}");
    let data = download(snap).await;
    let sha = hex::encode(Sha256::digest(&data));
    assert_eq!(
        snap["result"]["sha256"], sha,
        "sha256 of the file as downloaded"
    );
    assert_eq!(snap["result"]["rows"], want.len(), "{snap}");
    let text = String::from_utf8(data).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("Id"), "header");
    let mut got = BTreeSet::new();
    for line in lines {
        let id = ObjectId::parse_str(line).unwrap_or_else(|_| panic!("not an id: {line:?}"));
        assert!(got.insert(id), "contact {id} exported twice");
    }
    assert_eq!(&got, want, "every matching contact exactly once");
}
