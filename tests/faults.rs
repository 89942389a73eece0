//! What operators and faults do to jobs, against real servers: rolling
//! restarts (the real binary drained by SIGTERM), a clock running ahead, a
//! holder that lost its lease, lost replies, one organisation's backlog, rows
//! too large for one chunk, and what failed or cancelled jobs leave behind.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bson::{doc, oid::ObjectId, Document};
use common::*;
use contact_bulk_actors::artifact::Artifacts;
use contact_bulk_actors::encode::{ColumnSpec, Format};
use contact_bulk_actors::failpoint;
use contact_bulk_actors::filter::Filter;
use contact_bulk_actors::model::{ExportSpec, JobKind, JobRecord};
use contact_bulk_actors::repo::{ChunkRepo, Ending, JobPatch, JobRepo, Lease, MongoJobs};
use contact_bulk_actors::JobError;
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};

async fn seed(db: &mongodb::Database, n: usize, children: bool) -> (ObjectId, Vec<ObjectId>) {
    let org = ObjectId::new();
    let stage = ObjectId::new();
    let pipe = pipeline(db, org, "Sales", &[(stage, "New")]).await;
    let docs: Vec<Document> = (0..n).map(|i| contact(org, pipe, stage, i)).collect();
    let ids: Vec<ObjectId> = docs
        .iter()
        .map(|d| d.get_object_id("_id").unwrap())
        .collect();
    insert(db, "contacts", docs).await;
    if children {
        let convs: Vec<Document> = ids
            .iter()
            .map(|c| doc! {"_id": ObjectId::new(), "orgId": org, "contactId": c})
            .collect();
        insert(db, "conversations", convs).await;
        let msgs: Vec<Document> = ids
            .iter()
            .flat_map(|c| {
                (0..2).map(move |_| doc! {"_id": ObjectId::new(), "orgId": org, "contactId": c})
            })
            .collect();
        insert(db, "messages", msgs).await;
    }
    (org, ids)
}

async fn record(db: &mongodb::Database, job: &str) -> Document {
    db.collection::<Document>("bulk_jobs")
        .find_one(doc! {"_id": job})
        .await
        .unwrap()
        .unwrap()
}

fn job_id(reply: &serde_json::Value) -> String {
    reply["jobId"]
        .as_str()
        .unwrap_or_else(|| panic!("no jobId in {reply}"))
        .to_string()
}

fn ids_export(org: ObjectId) -> serde_json::Value {
    json!({"orgId": org.to_hex(), "fields": ["id"], "filter": {"orgWide": true}})
}

/// The CSV of an `id` export: its rows, in order.
fn rows_of(data: &[u8]) -> Vec<String> {
    String::from_utf8(data.to_vec())
        .unwrap()
        .lines()
        .skip(1)
        .map(String::from)
        .collect()
}

struct Binary {
    child: tokio::process::Child,
}

/// The real binary as `common::start_binary` starts it, with 2 s leases.
async fn start_binary(stack: &Stack, envs: &[(&str, &str)]) -> Binary {
    let mut all = vec![("BULK_LEASE_MS", "2000")];
    all.extend_from_slice(envs);
    Binary {
        child: common::start_binary(stack, &all).await,
    }
}

impl Binary {
    /// SIGTERM, then the exit status within 30 s.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s of SIGTERM")
            .unwrap()
    }
}

#[tokio::test]
async fn a_job_drained_by_sigterm_ten_times_in_a_row_completes_with_no_attempt_spent() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, ids) = seed(&db, 8000, true).await;
    let client = stack.client().await;
    let envs = [("BULK_DELETE_BATCH", "10"), ("BULK_MAX_ATTEMPTS", "3")];
    let mut bin = start_binary(&stack, &envs).await;
    let job = job_id(
        &request(
            &client,
            "bulk.v1.delete",
            json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
        )
        .await,
    );
    let mut seen = 0;
    for round in 0..10 {
        // Each instance gets some work done before the operator rolls it.
        let snap = wait_job(&client, org, &job, 60, |s| {
            s["processed"].as_i64().unwrap_or(0) > seen
        })
        .await;
        seen = snap["processed"].as_i64().unwrap();
        assert_eq!(snap["status"], "processing", "round {round}: {snap}");
        let status = bin.terminate().await;
        assert!(status.success(), "round {round}: exit status {status}");
        let rec = record(&db, &job).await;
        assert_eq!(rec.get_str("status").unwrap(), "processing", "{rec}");
        assert!(rec.get("leaseOwner").unwrap().as_null().is_some(), "{rec}");
        assert_eq!(
            rec.get_i32("attempts").unwrap(),
            1,
            "a drain costs no attempt: {rec}"
        );
        seen = seen.max(rec.get_i64("processed").unwrap());
        bin = start_binary(&stack, &envs).await;
    }
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["attempts"], 1, "{snap}");
    assert_eq!(snap["processed"], ids.len() as i64);
    assert_eq!(
        snap["counts"],
        json!({"contacts": 8000, "conversations": 8000, "messages": 16000})
    );
    for coll in ["contacts", "conversations", "messages"] {
        let left = db
            .collection::<Document>(coll)
            .count_documents(doc! {"orgId": org})
            .await
            .unwrap();
        assert_eq!(left, 0, "{coll}");
    }
    let audits = db
        .collection::<Document>("event_logs")
        .count_documents(doc! {"jobId": &job})
        .await
        .unwrap();
    assert_eq!(audits, 8000, "one audit entry per contact");
    drop(bin);
}

#[tokio::test]
async fn an_instance_whose_clock_runs_60_s_ahead_does_not_take_over_a_live_job() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, ids) = seed(&db, 6000, false).await;
    let holder = stack.service_with(|c| c.export_batch = 20).await;
    let client = stack.client().await;
    let job = job_id(&request(&client, "bulk.v1.export", ids_export(org)).await);
    wait_job(&client, org, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) > 0
    })
    .await;
    let epoch = record(&db, &job).await.get_i64("leaseEpoch").unwrap();
    let ahead = stack
        .service_with(|c| {
            c.export_batch = 20;
            c.test_clock_offset_ms = 60_000;
        })
        .await;
    // Its clock says the holder's 2 s lease ran out a minute ago at every scan.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ahead.counters().await.unwrap().scans < 15 {
        assert!(tokio::time::Instant::now() < deadline, "scans did not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rec = record(&db, &job).await;
    if rec.get_str("status").unwrap() == "processing" {
        assert_eq!(
            rec.get_i64("leaseEpoch").unwrap(),
            epoch,
            "taken over: {rec}"
        );
    }
    assert_eq!(ahead.counters().await.unwrap().spawned, 0, "no takeover");
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["attempts"], 1);
    assert_eq!(holder.counters().await.unwrap().spawned, 1);
    let got = rows_of(&download(&snap).await);
    assert_eq!(got.len(), ids.len());
}

/// A bare job record, as an instance that crashed right after accepting it leaves it.
fn export_record(org: ObjectId) -> JobRecord {
    JobRecord::new(
        JobKind::Export,
        org,
        None,
        None,
        Filter {
            org_wide: true,
            ..Filter::default()
        },
        Some(ExportSpec {
            format: Format::Csv,
            gzip: false,
            columns: ColumnSpec::default_columns(),
            file_name: "contacts.csv".into(),
        }),
    )
}

fn processed(n: i64) -> JobPatch {
    JobPatch {
        processed: Some(n),
        ..JobPatch::default()
    }
}

#[tokio::test]
async fn a_holder_that_lost_its_lease_cannot_write_the_record_or_the_file() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let store = MongoJobs::new(&db);
    contact_bulk_actors::store::ensure_indexes(&db)
        .await
        .unwrap();
    let artifacts = Artifacts::new(&db);
    let job = export_record(ObjectId::new());
    let (job, _) = store.create(job).await.unwrap();
    let id = job.job_id.clone();
    let ttl = Duration::from_millis(300);
    let a = store.acquire(&id, "a", ttl).await.unwrap().expect("free");
    assert_eq!((a.lease_epoch, a.attempts), (1, 1));
    // Live by the database's clock: nobody else gets it.
    assert!(store.acquire(&id, "b", ttl).await.unwrap().is_none());
    let a_lease = Lease {
        owner: "a".into(),
        epoch: a.lease_epoch,
    };
    artifacts
        .put(&id, 1, a_lease.epoch, b"old".to_vec())
        .await
        .unwrap();
    // "a" is paused past its lease; "b" takes over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let b = loop {
        if let Some(b) = store.acquire(&id, "b", ttl).await.unwrap() {
            break b;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (b.lease_epoch, b.attempts),
        (2, 1),
        "a takeover costs no attempt"
    );
    let b_lease = Lease {
        owner: "b".into(),
        epoch: b.lease_epoch,
    };
    artifacts
        .put(&id, 1, b_lease.epoch, b"new".to_vec())
        .await
        .unwrap();
    // "a" wakes up: every write it tries is refused and changes nothing.
    let stale = store.update_held(&id, &a_lease, ttl, &processed(99)).await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    let stale = artifacts
        .put(&id, 1, a_lease.epoch, b"stale".to_vec())
        .await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    let stale = store.finish(&id, &a_lease, &Ending::Completed(None)).await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    store.release(&id, &a_lease).await.unwrap();
    let now = store.get_any(&id).await.unwrap().unwrap();
    assert_eq!(now.processed, 0);
    assert_eq!(
        now.lease_owner.as_deref(),
        Some("b"),
        "a stale release leaves the lease"
    );
    // The holder's writes go through and renew its lease.
    store
        .update_held(&id, &b_lease, ttl, &processed(5))
        .await
        .unwrap();
    let mut file = Vec::new();
    let mut chunks = Box::pin(artifacts.stream(&id, Some(2)).await.unwrap());
    while let Some(c) = chunks.next().await {
        file.extend_from_slice(&c.unwrap());
    }
    assert_eq!(file, b"new");
    // A stale chunk past the end of the file is never part of it.
    artifacts
        .put(&id, 7, a_lease.epoch, b"orphan".to_vec())
        .await
        .unwrap();
    let (bytes, _) = artifacts.digest(&id, 2).await.unwrap();
    assert_eq!(bytes, 3);
}

#[tokio::test]
async fn a_chunk_written_before_chunks_were_keyed_by_id_is_replaced_under_the_same_fence() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    contact_bulk_actors::store::ensure_indexes(&db)
        .await
        .unwrap();
    let artifacts = Artifacts::new(&db);
    let chunks = db.collection::<Document>("export_chunks");
    let id = ObjectId::new().to_hex();
    // The layout of earlier versions: an ObjectId `_id`, unique on (jobId, n).
    chunks
        .insert_one(doc! {"jobId": &id, "n": 1i64, "epoch": 2i64,
            "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: b"old".to_vec() }})
        .await
        .unwrap();
    artifacts.put(&id, 0, 2, b"head,".to_vec()).await.unwrap();
    let stale = artifacts.put(&id, 1, 1, b"stale".to_vec()).await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    artifacts.put(&id, 1, 3, b"new".to_vec()).await.unwrap();
    artifacts.put(&id, 1, 3, b"newer".to_vec()).await.unwrap();
    let stale = artifacts.put(&id, 0, 1, b"stale".to_vec()).await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    assert_eq!(
        chunks.count_documents(doc! {"jobId": &id}).await.unwrap(),
        2,
        "one chunk per number"
    );
    let mut file = Vec::new();
    let mut stream = Box::pin(artifacts.stream(&id, Some(2)).await.unwrap());
    while let Some(c) = stream.next().await {
        file.extend_from_slice(&c.unwrap());
    }
    assert_eq!(file, b"head,newer");
}

#[tokio::test]
async fn a_lost_reply_to_a_delete_batch_record_counts_the_batch_once() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, ids) = seed(&db, 1500, true).await;
    failpoint::arm(failpoint::DELETE_RECORD_LOST_REPLY, &org.to_hex(), 4);
    failpoint::arm(failpoint::FINISH_LOST_REPLY, &org.to_hex(), 1);
    let _svc = stack
        .service_with(|c| {
            c.delete_batch = 100;
            c.max_attempts = 1;
        })
        .await;
    let client = stack.client().await;
    let mut events = client
        .subscribe(format!("bulk.v1.events.{}.job.>", org.to_hex()))
        .await
        .unwrap();
    let job = job_id(
        &request(
            &client,
            "bulk.v1.delete",
            json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
        )
        .await,
    );
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(
        failpoint::remaining(failpoint::DELETE_RECORD_LOST_REPLY, &org.to_hex()),
        0,
        "every lost reply happened"
    );
    assert_eq!(
        failpoint::remaining(failpoint::FINISH_LOST_REPLY, &org.to_hex()),
        0
    );
    assert_eq!(snap["processed"], 1500);
    assert_eq!(
        snap["counts"],
        json!({"contacts": 1500, "conversations": 1500, "messages": 3000})
    );
    assert_eq!(snap["attempts"], 1, "a lost reply costs no attempt");
    for coll in ["contacts", "conversations", "messages"] {
        let left = db
            .collection::<Document>(coll)
            .count_documents(doc! {"orgId": org})
            .await
            .unwrap();
        assert_eq!(left, 0, "{coll}");
    }
    let audits = db
        .collection::<Document>("event_logs")
        .count_documents(doc! {"jobId": &job})
        .await
        .unwrap();
    assert_eq!(audits, ids.len() as u64);
    // The completion whose reply was lost was still announced.
    let got = collect_until(&mut events, 30, |v| {
        v["type"] == "job.status" && v["job"]["status"] == "completed"
    })
    .await;
    assert!(!got.is_empty());
}

#[tokio::test]
async fn one_organisations_backlog_does_not_hold_back_another_organisations_job() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (a, _) = seed(&db, 3000, false).await;
    let (b, b_ids) = seed(&db, 50, false).await;
    let store = MongoJobs::new(&db);
    // 100 jobs of A, all older than B's: accepted while no instance ran.
    for _ in 0..100 {
        store.create(export_record(a)).await.unwrap();
    }
    let (b_job, _) = store.create(export_record(b)).await.unwrap();
    let _svc = stack
        .service_with(|c| {
            c.max_running = 4;
            c.max_per_org = 2;
            c.export_batch = 20;
        })
        .await;
    let client = stack.client().await;
    let snap = wait_job(&client, b, &b_job.job_id, 30, |s| {
        s["status"] == "completed"
    })
    .await;
    assert_eq!(snap["processed"], b_ids.len() as i64);
    let a_left = db
        .collection::<Document>("bulk_jobs")
        .count_documents(doc! {"orgId": a, "status": "pending"})
        .await
        .unwrap();
    assert!(
        a_left > 90,
        "B's job ran before A's backlog drained ({a_left} left)"
    );
}

#[tokio::test]
async fn an_export_of_very_large_rows_is_written_in_chunks_far_below_the_document_limit() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = ObjectId::new();
    let stage = ObjectId::new();
    let pipe = pipeline(&db, org, "Sales", &[(stage, "New")]).await;
    let big = "x".repeat(100 * 1024);
    let docs: Vec<Document> = (0..400)
        .map(|i| {
            let mut d = contact(org, pipe, stage, i);
            d.insert("customFields", doc! {"notes": format!("{i}{big}")});
            d
        })
        .collect();
    let ids: Vec<ObjectId> = docs
        .iter()
        .map(|d| d.get_object_id("_id").unwrap())
        .collect();
    for chunk in docs.chunks(50) {
        db.collection::<Document>("contacts")
            .insert_many(chunk.to_vec())
            .await
            .unwrap();
    }
    // 400 rows of 100 KB in one batch: 40 MB, were it one chunk.
    let _svc = stack.service_with(|c| c.export_batch = 400).await;
    let client = stack.client().await;
    let job = job_id(
        &request(
            &client,
            "bulk.v1.export",
            json!({"orgId": org.to_hex(), "fields": ["id", "customFields.notes"], "filter": {"orgWide": true}}),
        )
        .await,
    );
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["attempts"], 1);
    let data = download(&snap).await;
    assert_eq!(snap["result"]["sha256"], hex::encode(Sha256::digest(&data)));
    let mut reader = csv::Reader::from_reader(&data[..]);
    let got: Vec<String> = reader
        .records()
        .map(|r| r.unwrap()[0].to_string())
        .collect();
    let want: Vec<String> = ids.iter().map(|i| i.to_hex()).collect();
    assert_eq!(got, want);
    let mut chunks = db
        .collection::<Document>("export_chunks")
        .find(doc! {"jobId": &job})
        .await
        .unwrap();
    let mut n = 0;
    while let Some(c) = chunks.next().await {
        let c = c.unwrap();
        let len = c.get_binary_generic("data").unwrap().len();
        assert!(
            len < 2 << 20,
            "chunk {} is {len} bytes",
            c.get_i64("n").unwrap()
        );
        n += 1;
    }
    assert!(n > 20, "{n} chunks");
}

#[tokio::test]
async fn a_cancelled_export_leaves_no_chunk_behind() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, _) = seed(&db, 20_000, false).await;
    let _svc = stack.service_with(|c| c.export_batch = 20).await;
    let client = stack.client().await;
    let job = job_id(&request(&client, "bulk.v1.export", ids_export(org)).await);
    wait_job(&client, org, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) > 100
    })
    .await;
    let reply = request(
        &client,
        "bulk.v1.cancel",
        json!({"orgId": org.to_hex(), "jobId": job}),
    )
    .await;
    assert!(!reply["error"].is_object(), "{reply}");
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "cancelled", "{snap}");
    let left = db
        .collection::<Document>("export_chunks")
        .count_documents(doc! {"jobId": &job})
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_failed_export_leaves_no_chunk_and_a_completed_one_no_leftover() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, ids) = seed(&db, 3000, false).await;
    let (bad, _) = seed(&db, 20_000, false).await;
    let _svc = stack
        .service_with(|c| {
            c.export_batch = 20;
            c.max_attempts = 2;
            c.step_retries = 1;
            c.retry_max_ms = 100;
        })
        .await;
    let client = stack.client().await;
    // A job whose own work keeps failing after it wrote part of its file.
    failpoint::arm(failpoint::EXPORT_STEP_FAILS, &bad.to_hex(), u32::MAX);
    let failing = job_id(&request(&client, "bulk.v1.export", ids_export(bad)).await);
    let snap = wait_terminal(&client, bad, &failing).await;
    assert_eq!(snap["status"], "failed", "{snap}");
    assert_eq!(snap["attempts"], 2, "{snap}");
    // The counted failure is a typed field of the record, read back as such.
    let record = db
        .collection::<JobRecord>("bulk_jobs")
        .find_one(doc! {"_id": &failing})
        .await
        .unwrap()
        .unwrap();
    let last = record.last_error.unwrap_or_default();
    assert!(last.contains("injected failure"), "lastError {last:?}");
    // The clean-up runs beside the terminal event: wait for it, with a deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = db
            .collection::<Document>("export_chunks")
            .count_documents(doc! {"jobId": &failing})
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a failed export's chunks are removed ({left} left)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A chunk a stale writer left past the end of a file is cleared at completion.
    let job = job_id(&request(&client, "bulk.v1.export", ids_export(org)).await);
    wait_job(&client, org, &job, 60, |s| s["status"] == "processing").await;
    Artifacts::new(&db)
        .put(&job, 1_000_000, 0, b"stale".to_vec())
        .await
        .unwrap();
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    let got = rows_of(&download(&snap).await);
    let want: BTreeSet<String> = ids.iter().map(|i| i.to_hex()).collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want);
    let past = db
        .collection::<Document>("export_chunks")
        .count_documents(doc! {"jobId": &job, "n": 1_000_000i64})
        .await
        .unwrap();
    assert_eq!(past, 0, "leftover removed");
}

/// A service whose deletes fail for good at the in-process `point` (armed
/// for `org`; two attempts, quick retries, batches of 50), an org-wide delete
/// of `org`, and its terminal snapshot (asserted `failed`).
async fn failing_delete(
    stack: &Stack,
    org: ObjectId,
    point: &str,
) -> (contact_bulk::Service, String, serde_json::Value) {
    failing_delete_with(stack, org, point, |_| {}).await
}

async fn failing_delete_with(
    stack: &Stack,
    org: ObjectId,
    point: &str,
    more: impl Fn(&mut contact_bulk::config::Config),
) -> (contact_bulk::Service, String, serde_json::Value) {
    let svc = stack
        .service_with(|c| {
            c.delete_batch = 50;
            c.max_attempts = 2;
            c.step_retries = 1;
            c.retry_max_ms = 100;
            more(c);
        })
        .await;
    failpoint::arm(point, &org.to_hex(), u32::MAX);
    let client = stack.client().await;
    let job = job_id(
        &request(
            &client,
            "bulk.v1.delete",
            json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
        )
        .await,
    );
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "failed", "{snap}");
    (svc, job, snap)
}

#[tokio::test]
async fn a_failed_delete_gives_back_the_contacts_of_batches_it_never_recorded() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, ids) = seed(&db, 2000, true).await;
    let (_svc, job, snap) = failing_delete(&stack, org, failpoint::DELETE_STEP_FAILS).await;
    assert_eq!(snap["attempts"], 2, "{snap}");
    let present: BTreeSet<ObjectId> = {
        let mut c = db
            .collection::<Document>("contacts")
            .find(doc! {"orgId": org})
            .await
            .unwrap();
        let mut out = BTreeSet::new();
        while let Some(d) = c.next().await {
            out.insert(d.unwrap().get_object_id("_id").unwrap());
        }
        out
    };
    assert!(
        !present.is_empty() && present.len() < ids.len(),
        "{}",
        present.len()
    );
    // Every contact gone has its entry; none still there keeps one (each is
    // anyone's again, for a later delete). The give-back is the failed job's
    // clean-up (the record says `failed` from the write that owes it): wait for it.
    let gone: BTreeSet<ObjectId> = ids
        .iter()
        .filter(|i| !present.contains(i))
        .copied()
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let decided = loop {
        let mut entries = db
            .collection::<Document>("event_logs")
            .find(doc! {"jobId": &job})
            .await
            .unwrap();
        let mut decided = BTreeSet::new();
        while let Some(e) = entries.next().await {
            decided.insert(e.unwrap().get_object_id("contactId").unwrap());
        }
        if decided == gone || std::time::Instant::now() > deadline {
            break decided;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        decided, gone,
        "audit entries are exactly the deleted contacts"
    );
    assert!(snap["counts"]["contacts"].as_u64().unwrap() <= gone.len() as u64);
    // No child outlives its contact.
    for coll in ["conversations", "messages"] {
        let mut c = db
            .collection::<Document>(coll)
            .find(doc! {"orgId": org})
            .await
            .unwrap();
        while let Some(d) = c.next().await {
            let owner = d.unwrap().get_object_id("contactId").unwrap();
            assert!(present.contains(&owner), "{coll} of a deleted contact left");
        }
    }
}

/// A delete failing for good after a batch's keep deleted the children and
/// before its contacts went: the give-back puts the children back from what
/// was kept, so no contact lives on without its conversations and messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_failing_after_its_keep_gives_back_contacts_with_their_children() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, ids) = seed(&db, 300, true).await;
    let (_svc, job, _) = failing_delete(&stack, org, failpoint::DELETE_AFTER_KEEP_FAILS).await;
    assert!(
        failpoint::remaining(failpoint::DELETE_AFTER_KEEP_FAILS, &org.to_hex()) < u32::MAX,
        "the keep ran and the batch failed after it"
    );
    children_given_back(&db, org, &job, ids.len() as u64).await;
}

/// The same, when the failed job's clean-up itself meets an outage: the job
/// record owes it, and a later scan does it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deletes_clean_up_that_meets_an_outage_is_redone_by_a_later_scan() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let (org, ids) = seed(&db, 300, true).await;
    failpoint::arm(failpoint::CLEANUP_FAILS, &org.to_hex(), 1);
    let (_svc, job, _) =
        failing_delete_with(&stack, org, failpoint::DELETE_AFTER_KEEP_FAILS, |c| {
            c.lease_ms = 1000;
            c.scan_ms = 200;
        })
        .await;
    assert_eq!(
        failpoint::remaining(failpoint::CLEANUP_FAILS, &org.to_hex()),
        0,
        "the first clean-up failed"
    );
    children_given_back(&db, org, &job, ids.len() as u64).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let record = db
            .collection::<Document>("bulk_jobs")
            .find_one(doc! {"_id": &job})
            .await
            .unwrap()
            .unwrap();
        if !record.contains_key("cleanupPending") {
            assert_eq!(record.get_str("status").unwrap(), "failed");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "clean-up still owed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (with a deadline) until `job`'s give-back is done: no entry of it
/// left, every contact still there with its conversation and two messages.
async fn children_given_back(db: &mongodb::Database, org: ObjectId, job: &str, contacts: u64) {
    let count = db
        .collection::<Document>("contacts")
        .count_documents(doc! {"orgId": org})
        .await
        .unwrap();
    assert_eq!(count, contacts, "no contact was deleted");
    // The give-back is the failed job's clean-up: the record says `failed`
    // from the write that owes it, so wait for it (its entries gone).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let entries = db
            .collection::<Document>("event_logs")
            .count_documents(doc! {"jobId": job})
            .await
            .unwrap();
        if entries == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{entries} entries never given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (coll, per_contact) in [("conversations", 1u64), ("messages", 2)] {
        let n = db
            .collection::<Document>(coll)
            .count_documents(doc! {"orgId": org})
            .await
            .unwrap();
        assert_eq!(n, per_contact * contacts, "every {coll} is back");
    }
}
