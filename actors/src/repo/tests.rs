//! The in-memory job repository keeps the invariants of the MongoDB one
//! (`tests/faults.rs` checks those on a real server): leases on the store's
//! clock, the epoch fence, idempotent creation, the terminal write's retry.

use std::time::Duration;

use bson::oid::ObjectId;

use super::{Ending, JobPatch, JobRepo, Lease, MemJobs};
use crate::error::JobError;
use crate::model::JobStatus;
use crate::testing::{pending, stored};

const TTL: Duration = Duration::from_secs(10);

fn lease(owner: &str, epoch: i64) -> Lease {
    Lease {
        owner: owner.into(),
        epoch,
    }
}

fn processed(n: i64) -> JobPatch {
    JobPatch {
        processed: Some(n),
        ..JobPatch::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_lost_its_lease_writes_nothing() {
    let jobs = MemJobs::new();
    let job = stored(&jobs, pending(ObjectId::new())).await;
    let id = &job.job_id;
    let a = jobs.acquire(id, "a", TTL).await.unwrap().unwrap();
    assert_eq!((a.lease_epoch, a.attempts), (1, 1));
    assert!(jobs.acquire(id, "b", TTL).await.unwrap().is_none(), "live");
    // Renewals keep it alive past the first ttl.
    tokio::time::advance(Duration::from_secs(8)).await;
    jobs.update_held(id, &lease("a", 1), TTL, &processed(1))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(8)).await;
    assert!(
        jobs.acquire(id, "b", TTL).await.unwrap().is_none(),
        "renewed"
    );
    // "a" pauses past its lease: "b" takes over.
    tokio::time::advance(Duration::from_secs(3)).await;
    let b = jobs.acquire(id, "b", TTL).await.unwrap().unwrap();
    assert_eq!((b.lease_epoch, b.attempts), (2, 1), "no attempt spent");
    let stale = jobs
        .update_held(id, &lease("a", 1), TTL, &processed(99))
        .await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    let stale = jobs.finish(id, &lease("a", 1), &Ending::Cancelled).await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    assert!(jobs
        .count_failure(id, &lease("a", 1), "x")
        .await
        .unwrap()
        .is_none());
    jobs.release(id, &lease("a", 1)).await.unwrap();
    let now = jobs.peek(id).unwrap();
    assert_eq!((now.processed, now.lease_owner.as_deref()), (1, Some("b")));
    // The same epoch of another owner is no lease either.
    let forged = jobs
        .update_held(id, &lease("c", 2), TTL, &processed(5))
        .await;
    assert!(matches!(forged, Err(JobError::Conflict(_))));
}

#[tokio::test(start_paused = true)]
async fn a_terminal_write_sent_again_returns_the_finished_job_to_its_own_lease_only() {
    let jobs = MemJobs::new();
    let job = stored(&jobs, pending(ObjectId::new())).await;
    let id = &job.job_id;
    jobs.acquire(id, "a", TTL).await.unwrap().unwrap();
    let done = jobs
        .finish(id, &lease("a", 1), &Ending::Completed(None))
        .await
        .unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    assert!(done.lease_owner.is_none() && done.finished_at.is_some());
    // The reply was lost; the retry finds it done under the same epoch.
    let again = jobs
        .finish(id, &lease("a", 1), &Ending::Completed(None))
        .await;
    assert_eq!(again.unwrap().status, JobStatus::Completed);
    let other = jobs.finish(id, &lease("a", 0), &Ending::Cancelled).await;
    assert!(matches!(other, Err(JobError::Conflict(_))));
    assert!(jobs.acquire(id, "b", TTL).await.unwrap().is_none(), "ended");
    assert_eq!(jobs.peek(id).unwrap().status, JobStatus::Completed);
}

#[tokio::test(start_paused = true)]
async fn failures_count_attempts_and_free_the_job_for_a_restart() {
    let jobs = MemJobs::new();
    let job = stored(&jobs, pending(ObjectId::new())).await;
    let id = &job.job_id;
    jobs.acquire(id, "a", TTL).await.unwrap().unwrap();
    let counted = jobs
        .count_failure(id, &lease("a", 1), "boom")
        .await
        .unwrap();
    let counted = counted.unwrap();
    assert_eq!(counted.attempts, 2);
    assert_eq!(counted.last_error.as_deref(), Some("boom"));
    assert_eq!(counted.error, None, "not failed: retried");
    let again = jobs.acquire(id, "a", TTL).await.unwrap().unwrap();
    assert_eq!((again.attempts, again.lease_epoch), (2, 2));
    assert_eq!(again.last_error.as_deref(), Some("boom"), "read back");
    let failed = jobs
        .finish(id, &lease("a", 2), &Ending::Failed("gave up".into()))
        .await
        .unwrap();
    assert_eq!(
        (failed.status, failed.error.as_deref()),
        (JobStatus::Failed, Some("gave up"))
    );
}

#[tokio::test(start_paused = true)]
async fn creation_is_idempotent_by_command_and_cancel_of_a_free_pending_job_is_immediate() {
    let jobs = MemJobs::new();
    let org = ObjectId::new();
    let mut first = pending(org);
    first.command_key = Some(format!("{}:cmd-1", org.to_hex()));
    first.command_id = Some("cmd-1".into());
    let (created, new) = jobs.create(first.clone()).await.unwrap();
    assert!(new);
    let mut replay = pending(org);
    replay.command_key = first.command_key.clone();
    let (existing, new) = jobs.create(replay).await.unwrap();
    assert!(!new);
    assert_eq!(existing.job_id, created.job_id);
    assert_eq!(
        jobs.get_by_command(org, "cmd-1").await.unwrap().job_id,
        created.job_id
    );
    assert!(matches!(
        jobs.get(ObjectId::new(), &created.job_id).await,
        Err(JobError::NotFound(_))
    ));
    let (cancelled, here) = jobs.request_cancel(org, &created.job_id).await.unwrap();
    assert!(here);
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    // A held one only gets the flag: its actor stops it.
    let held = stored(&jobs, pending(org)).await;
    jobs.acquire(&held.job_id, "a", TTL).await.unwrap();
    let (flagged, here) = jobs.request_cancel(org, &held.job_id).await.unwrap();
    assert!(!here && flagged.cancel_requested);
    assert_eq!(flagged.status, JobStatus::Pending);
}

#[tokio::test(start_paused = true)]
async fn the_scan_sees_organisations_oldest_first_and_only_jobs_nobody_holds() {
    let jobs = MemJobs::new();
    let (a, b) = (ObjectId::new(), ObjectId::new());
    let a1 = stored(&jobs, pending(a)).await;
    tokio::time::advance(Duration::from_millis(5)).await;
    let mut b1 = pending(b);
    b1.created_at = jobs.store_now();
    let b1 = stored(&jobs, b1).await;
    let mut a2 = pending(a);
    a2.created_at = jobs.store_now();
    stored(&jobs, a2).await;
    assert_eq!(jobs.resumable_orgs(10).await.unwrap(), vec![a, b]);
    jobs.acquire(&a1.job_id, "x", TTL).await.unwrap().unwrap();
    let free: Vec<String> = jobs
        .resumable_of(a, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(free.len(), 1);
    assert!(!free.contains(&a1.job_id));
    jobs.acquire(&b1.job_id, "x", TTL).await.unwrap().unwrap();
    assert_eq!(jobs.resumable_orgs(10).await.unwrap(), vec![a]);
    tokio::time::advance(TTL + Duration::from_millis(1)).await;
    assert_eq!(
        jobs.resumable_orgs(10).await.unwrap(),
        vec![a, b],
        "expired"
    );
    jobs.set_down(true);
    assert!(jobs
        .resumable_orgs(10)
        .await
        .unwrap_err()
        .outage()
        .is_some());
}

#[tokio::test]
async fn chunks_of_an_older_lease_cannot_replace_a_newer_ones_and_the_file_ends_at_its_count() {
    use super::{ChunkRepo, MemChunks};
    use futures::TryStreamExt;
    let chunks = MemChunks::new();
    chunks.put("j", 0, 1, b"head".to_vec()).await.unwrap();
    chunks.put("j", 1, 1, b"old".to_vec()).await.unwrap();
    chunks.put("j", 1, 2, b"new".to_vec()).await.unwrap();
    let stale = chunks.put("j", 1, 1, b"stale".to_vec()).await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    chunks.put("j", 7, 1, b"orphan".to_vec()).await.unwrap();
    let file: Vec<bytes::Bytes> = chunks
        .stream("j", Some(2))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(file.concat(), b"headnew");
    let (size, sha) = chunks.digest("j", 2).await.unwrap();
    assert_eq!(size, 7);
    assert_eq!(sha.len(), 64);
    assert_eq!(chunks.remove_from("j", 2).await.unwrap(), 1);
    assert_eq!(chunks.numbers("j"), vec![0, 1]);
    assert_eq!(chunks.remove_jobs(&["j".into()]).await.unwrap(), 2);
}
