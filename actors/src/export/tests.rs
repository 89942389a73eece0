//! The export step on the in-memory repositories and tokio's paused clock:
//! every row written once, in `_id` order across the ranges; the checkpoint;
//! a crash after any step (a chunk written but not yet checkpointed
//! included) resumed by another instance once the lease ran out; a lost
//! cursor; a cancel between batches; the epoch fence; the snapshot.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bson::{doc, oid::ObjectId};
use futures::TryStreamExt;
use sha2::{Digest, Sha256};

use super::ExportState;
use crate::encode::{ColumnSpec, Format};
use crate::error::JobError;
use crate::filter::Filter;
use crate::job::JobStep;
use crate::model::{ExportSpec, JobKind, JobRecord, JobStatus};
use crate::repo::{ChunkRepo, JobRepo, MemChunks, MemCrm, MemExport, MemJobs, PipelineNames};
use crate::testing::{env_full, RecordingSink};

const CONTACTS: &str = "contacts";
const ROWS: usize = 60;

struct World {
    jobs: MemJobs,
    source: MemExport,
    chunks: MemChunks,
    org: ObjectId,
    /// Ids of the organisation's contacts, in `_id` order.
    ids: Vec<ObjectId>,
    job: JobRecord,
}

fn now_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

/// An ObjectId minted at second `secs`, `n` its counter.
fn id_at(secs: u32, n: u32) -> ObjectId {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&secs.to_be_bytes());
    b[8..].copy_from_slice(&n.to_be_bytes());
    ObjectId::from_bytes(b)
}

/// `ROWS` contacts of an organisation created a day ago, minted over its
/// lifetime (so the export cuts them into several ranges), half of them in
/// a named stage, a third owned by a named user; contacts of another
/// organisation beside them.
async fn world() -> World {
    let (jobs, source) = (MemJobs::new(), MemExport::new());
    let born = now_secs() - 86_400;
    let org = id_at(born, 0);
    let other = id_at(born, 1);
    let (pipeline, stage, owner) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
    source.insert_pipeline(
        org,
        PipelineNames {
            id: pipeline,
            name: "Sales".into(),
            stages: vec![(stage, "Won".into())],
        },
    );
    source.insert_user(org, owner, "Ada");
    let mut ids = Vec::new();
    for i in 0..ROWS as u32 {
        let id = id_at(born + 10 + i * 1_300, i);
        let mut contact = doc! {"_id": id, "orgId": org, "firstName": format!("c{i:02}")};
        if i % 2 == 0 {
            contact.insert("stageId", stage);
        }
        if i % 3 == 0 {
            contact.insert("ownerId", owner);
        }
        source.insert(CONTACTS, contact);
        source.insert(
            CONTACTS,
            doc! {"_id": id_at(born + 11 + i * 1_300, i), "orgId": other, "firstName": "other"},
        );
        ids.push(id);
    }
    let filter = Filter {
        org_wide: true,
        ..Filter::default()
    };
    let spec = ExportSpec {
        format: Format::Csv,
        gzip: false,
        columns: ColumnSpec::from_json(
            Some(&serde_json::json!(["id", "firstName", "stage", "owner"])),
            "fields",
        )
        .expect("columns"),
        file_name: "contacts.csv".into(),
    };
    let job = JobRecord::new(JobKind::Export, org, None, None, filter, Some(spec));
    let job = jobs.create(job).await.expect("create").0;
    World {
        jobs,
        source,
        chunks: MemChunks::new(),
        org,
        ids,
        job,
    }
}

/// Instance `name` takes the job (its lease must be free) and builds the step.
async fn take(w: &World, name: &str, sink: &Arc<RecordingSink>) -> ExportState {
    let mut env = env_full(&w.jobs, &MemCrm::new(), &w.chunks, name, sink.clone());
    env.export = Arc::new(w.source.clone());
    env.settings.export_batch = 4;
    env.settings.export_ranges = 5;
    env.settings.flush_bytes = 100;
    env.settings.flush_interval = Duration::from_secs(3600);
    let job = w
        .jobs
        .acquire(&w.job.job_id, name, env.settings.lease_ttl)
        .await
        .expect("acquire")
        .expect("lease free");
    ExportState::start(env, job).expect("start")
}

/// Runs steps until the job ends (`Ok`) or a step fails.
async fn drive(s: &mut ExportState) -> Result<(), JobError> {
    for _ in 0..1000 {
        if !s.step().await? {
            return Ok(());
        }
    }
    panic!("the export never ended");
}

/// Lets the lease of a crashed instance run out.
async fn lease_runs_out() {
    tokio::time::advance(Duration::from_secs(11)).await;
}

/// The file as a reader downloads it: chunks below the result's count.
async fn file(w: &World) -> String {
    let job = w.jobs.peek(&w.job.job_id).expect("job");
    let chunks = job.result.as_ref().and_then(|f| f.chunks);
    let parts: Vec<bytes::Bytes> = w
        .chunks
        .stream(&w.job.job_id, chunks)
        .await
        .expect("stream")
        .try_collect()
        .await
        .expect("chunks");
    let bytes = parts.concat();
    String::from_utf8(bytes).expect("utf-8")
}

/// The file a correct export writes.
fn expected(w: &World) -> String {
    let mut out = String::from("Id,First Name,Stage,Owner\n");
    for (i, id) in w.ids.iter().enumerate() {
        let stage = if i % 2 == 0 { "Won" } else { "" };
        let owner = if i % 3 == 0 { "Ada" } else { "" };
        out.push_str(&format!("{id},c{i:02},{stage},{owner}\n"));
    }
    out
}

/// A completed export: the exact file, its size and hash in the result, the
/// counts and the checkpoint at its last row.
async fn exact(w: &World) {
    let job = w.jobs.peek(&w.job.job_id).expect("job");
    assert_eq!(job.status, JobStatus::Completed);
    let text = file(w).await;
    assert_eq!(text, expected(w), "every row once, in `_id` order");
    let result = job.result.clone().expect("a file");
    assert_eq!(result.rows, ROWS as i64);
    assert_eq!(result.bytes, text.len() as i64);
    assert_eq!(result.sha256, hex::encode(Sha256::digest(text.as_bytes())));
    assert_eq!(job.total, Some(ROWS as i64));
    assert_eq!(job.processed, ROWS as i64);
    assert_eq!(job.checkpoint.last_id, w.ids.last().copied());
    assert_eq!(Some(job.checkpoint.next_chunk), result.chunks);
    let numbers = w.chunks.numbers(&w.job.job_id);
    assert_eq!(numbers, (0..job.checkpoint.next_chunk).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn an_export_writes_every_row_once_in_id_order_across_its_ranges() {
    let w = world().await;
    let sink = Arc::new(RecordingSink::default());
    let mut s = take(&w, "a", &sink).await;
    drive(&mut s).await.expect("completes");
    exact(&w).await;
    let opened = w.source.opened();
    assert!(opened.len() >= 3, "read as several ranges: {opened:?}");
    assert!(opened.windows(2).all(|r| r[0].upto < r[1].upto));
    let chunks = w.chunks.numbers(&w.job.job_id).len();
    assert!(chunks > 10, "small flushes make many chunks: {chunks}");
    assert_eq!(
        sink.statuses(&w.job.job_id),
        [JobStatus::Processing, JobStatus::Completed]
    );
}

#[tokio::test(start_paused = true)]
async fn a_crash_after_any_step_resumes_without_losing_or_repeating_a_row() {
    // The steps of a run without crashes.
    let steps = {
        let w = world().await;
        let mut s = take(&w, "a", &Arc::new(RecordingSink::default())).await;
        let mut n = 0;
        while s.step().await.expect("step") {
            n += 1;
        }
        n
    };
    let mut unsettled = 0;
    for crash_after in 1..=steps {
        let w = world().await;
        let sink = Arc::new(RecordingSink::default());
        let mut a = take(&w, "a", &sink).await;
        for _ in 0..crash_after {
            assert!(a.step().await.expect("step"));
        }
        // Let the chunk in flight reach storage: then it is written but its
        // checkpoint is not (the crash this test is about).
        a.quiesce().await;
        let job = w.jobs.peek(&w.job.job_id).expect("job");
        if w.chunks.numbers(&w.job.job_id).last() >= Some(&job.checkpoint.next_chunk) {
            unsettled += 1;
        }
        drop(a);
        lease_runs_out().await;
        let mut b = take(&w, "b", &sink).await;
        drive(&mut b).await.expect("the resumed export completes");
        exact(&w).await;
    }
    assert!(
        unsettled > 3,
        "crashes between a chunk and its checkpoint: {unsettled}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_cursor_is_read_again_after_the_last_row_taken() {
    for after in [0, 1, 3, 13, 37] {
        let w = world().await;
        let mut s = take(&w, "a", &Arc::new(RecordingSink::default())).await;
        w.source.fail_rows_after(after);
        let mut failures = 0;
        loop {
            match s.step().await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    assert!(e.to_string().contains("cursor lost"), "{e}");
                    failures += 1;
                    // What the job actor does before it retries the step.
                    s.reset();
                }
            }
        }
        assert_eq!(failures, 1, "after {after}");
        exact(&w).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancel_between_batches_ends_the_export_with_what_it_reported() {
    for cancel_after in [1, 2, 5, 9] {
        let w = world().await;
        let sink = Arc::new(RecordingSink::default());
        let mut s = take(&w, "a", &sink).await;
        for _ in 0..cancel_after {
            assert!(s.step().await.expect("step"));
        }
        let before = w.jobs.peek(&w.job.job_id).expect("job").processed;
        w.jobs
            .request_cancel(w.org, &w.job.job_id)
            .await
            .expect("cancel");
        // What the job actor does on a `Cancel` message.
        s.run.cancel = true;
        assert!(!s.step().await.expect("the next step ends it"));
        let job = w.jobs.peek(&w.job.job_id).expect("job");
        assert_eq!(job.status, JobStatus::Cancelled);
        assert!(job.processed < ROWS as i64);
        assert_eq!(job.processed, before, "nothing reported after the cancel");
        assert!(w.chunks.numbers(&w.job.job_id).is_empty(), "chunks removed");
        assert_eq!(
            sink.statuses(&w.job.job_id).last(),
            Some(&JobStatus::Cancelled)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_lost_its_lease_cannot_write_the_file() {
    let w = world().await;
    let sink = Arc::new(RecordingSink::default());
    let mut a = take(&w, "a", &sink).await;
    for _ in 0..4 {
        assert!(a.step().await.expect("step"));
    }
    // Paused past its lease (a long GC, a stalled VM): another instance takes over.
    lease_runs_out().await;
    let mut b = take(&w, "b", &sink).await;
    for _ in 0..6 {
        assert!(b.step().await.expect("step"));
    }
    let fenced = drive(&mut a)
        .await
        .expect_err("the old lease is fenced off");
    assert!(matches!(fenced, JobError::Conflict(_)), "{fenced}");
    drive(&mut b).await.expect("the new holder completes");
    exact(&w).await;
}

#[tokio::test(start_paused = true)]
async fn contacts_minted_after_the_start_are_not_exported_and_total_is_counted_at_start() {
    let w = world().await;
    let sink = Arc::new(RecordingSink::default());
    let mut s = take(&w, "a", &sink).await;
    assert!(s.step().await.expect("start"));
    let job = w.jobs.peek(&w.job.job_id).expect("job");
    assert_eq!(
        job.total,
        Some(ROWS as i64),
        "total in the start's snapshot"
    );
    let bound = job.snapshot_max_id.expect("bound");
    // Created after the start: sorts above the bound.
    let late = id_at(now_secs() + 5, 1);
    assert!(late > bound);
    w.source.insert(
        CONTACTS,
        doc! {"_id": late, "orgId": w.org, "firstName": "late"},
    );
    drive(&mut s).await.expect("completes");
    exact(&w).await;
}

#[tokio::test(start_paused = true)]
async fn rows_never_wait_for_a_slow_count_and_the_processing_event_does_until_the_wait_ends() {
    use crate::events::JobEventKind;
    let w = world().await;
    // A count slower than the whole export.
    w.source.count_takes(Duration::from_secs(30));
    let sink = Arc::new(RecordingSink::default());
    let mut s = take(&w, "a", &sink).await;
    for _ in 0..4 {
        assert!(s.step().await.expect("step"));
    }
    assert!(
        sink.events.lock().expect("events").is_empty(),
        "an event before the processing one"
    );
    // Once the wait (250 ms) is over, the next step announces the job, with
    // `total` still unknown, before any progress event.
    tokio::time::advance(Duration::from_millis(300)).await;
    assert!(s.step().await.expect("step"));
    let first = sink.events.lock().expect("events").first().cloned();
    let first = first.expect("the processing event");
    assert_eq!(
        (first.kind, first.status),
        (JobEventKind::Status, JobStatus::Processing)
    );
    assert_eq!(w.jobs.peek(&w.job.job_id).expect("job").total, None);
    // Every batch is read and written at once; only the completion waits
    // for the count.
    loop {
        let before = tokio::time::Instant::now();
        let more = s.step().await.expect("step");
        let took = before.elapsed();
        if !more {
            assert!(
                took >= Duration::from_secs(29),
                "completion without the count"
            );
            break;
        }
        assert!(
            took < Duration::from_secs(1),
            "a batch waited for the count"
        );
    }
    exact(&w).await;
    assert_eq!(
        sink.statuses(&w.job.job_id),
        vec![JobStatus::Processing, JobStatus::Completed]
    );
}

#[tokio::test(start_paused = true)]
async fn an_export_cancelled_before_it_was_announced_still_says_processing_then_cancelled() {
    let w = world().await;
    w.source.count_takes(Duration::from_secs(30));
    let sink = Arc::new(RecordingSink::default());
    let mut s = take(&w, "a", &sink).await;
    assert!(s.step().await.expect("first step"));
    assert!(sink.statuses(&w.job.job_id).is_empty(), "announced early");
    s.run.cancel = true;
    assert!(!s.step().await.expect("cancelled"));
    assert_eq!(
        sink.statuses(&w.job.job_id),
        vec![JobStatus::Processing, JobStatus::Cancelled]
    );
}
