//! The export's write path on the in-memory repositories: a chunk and the
//! checkpoint that covers it, a failed background write written again, a
//! crash between the chunk and its checkpoint, and a writer fenced off.

use std::sync::Arc;
use std::time::Duration;

use bson::oid::ObjectId;
use futures::TryStreamExt;

use super::PendingChunk;
use crate::error::JobError;
use crate::job::JobRun;
use crate::repo::{ChunkRepo, JobRepo, MemChunks, MemCrm, MemJobs};
use crate::testing::{env_full, pending, stored, RecordingSink};

async fn holder(jobs: &MemJobs, chunks: &MemChunks, job_id: &str, name: &str) -> JobRun {
    let env = env_full(
        jobs,
        &MemCrm::new(),
        chunks,
        name,
        Arc::new(RecordingSink::default()),
    );
    let job = jobs
        .acquire(job_id, name, env.settings.lease_ttl)
        .await
        .unwrap()
        .expect("lease free");
    JobRun::new(env, job)
}

async fn file(chunks: &MemChunks, job_id: &str, count: i64) -> Vec<u8> {
    let parts: Vec<bytes::Bytes> = chunks
        .stream(job_id, Some(count))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    parts.concat()
}

#[tokio::test(start_paused = true)]
async fn a_chunk_is_stored_then_checkpointed_and_a_failed_write_is_written_again() {
    let (jobs, chunks) = (MemJobs::new(), MemChunks::new());
    let job = stored(&jobs, pending(ObjectId::new())).await;
    let mut run = holder(&jobs, &chunks, &job.job_id, "a").await;
    let last = ObjectId::new();
    let mut first = PendingChunk::spawn(&run, 0, b"rows-0;".to_vec(), 2, Some(last));
    first.settle(&mut run).await.unwrap();
    chunks.fail_writes(1);
    let mut second = PendingChunk::spawn(&run, 1, b"rows-1;".to_vec(), 3, None);
    second.settle(&mut run).await.unwrap();
    let rec = jobs.peek(&job.job_id).unwrap();
    assert_eq!(rec.processed, 5);
    assert_eq!(rec.checkpoint.next_chunk, 2);
    assert_eq!(rec.checkpoint.bytes, 14);
    assert_eq!(file(&chunks, &job.job_id, 2).await, b"rows-0;rows-1;");
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_a_chunk_and_its_checkpoint_is_written_again_by_the_next_holder() {
    let (jobs, chunks) = (MemJobs::new(), MemChunks::new());
    let job = stored(&jobs, pending(ObjectId::new())).await;
    let mut a = holder(&jobs, &chunks, &job.job_id, "a").await;
    PendingChunk::spawn(&a, 0, b"head;".to_vec(), 1, None)
        .settle(&mut a)
        .await
        .unwrap();
    // Chunk 1 is stored, then the process dies before its checkpoint.
    let mut lost = PendingChunk::spawn(&a, 1, b"lost;".to_vec(), 4, None);
    lost.quiesce().await;
    drop(lost);
    drop(a);
    assert_eq!(chunks.numbers(&job.job_id), vec![0, 1]);
    let rec = jobs.peek(&job.job_id).unwrap();
    assert_eq!((rec.processed, rec.checkpoint.next_chunk), (1, 1));
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut b = holder(&jobs, &chunks, &job.job_id, "b").await;
    let n = b.job.checkpoint.next_chunk;
    PendingChunk::spawn(&b, n, b"again;".to_vec(), 4, None)
        .settle(&mut b)
        .await
        .unwrap();
    let rec = jobs.peek(&job.job_id).unwrap();
    assert_eq!((rec.processed, rec.checkpoint.next_chunk), (5, 2));
    assert_eq!(file(&chunks, &job.job_id, 2).await, b"head;again;");
}

#[tokio::test(start_paused = true)]
async fn a_writer_that_lost_its_lease_neither_replaces_a_chunk_nor_checkpoints() {
    let (jobs, chunks) = (MemJobs::new(), MemChunks::new());
    let job = stored(&jobs, pending(ObjectId::new())).await;
    let mut a = holder(&jobs, &chunks, &job.job_id, "a").await;
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut b = holder(&jobs, &chunks, &job.job_id, "b").await;
    PendingChunk::spawn(&b, 0, b"new;".to_vec(), 1, None)
        .settle(&mut b)
        .await
        .unwrap();
    // "a" wakes up and writes the same chunk: the fence refuses it.
    let stale = PendingChunk::spawn(&a, 0, b"stale;".to_vec(), 9, None)
        .settle(&mut a)
        .await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    // And a chunk of its own past the end does not move the checkpoint.
    let stale = PendingChunk::spawn(&a, 5, b"x".to_vec(), 9, None)
        .settle(&mut a)
        .await;
    assert!(matches!(stale, Err(JobError::Conflict(_))), "{stale:?}");
    let rec = jobs.peek(&job.job_id).unwrap();
    assert_eq!((rec.processed, rec.checkpoint.next_chunk), (1, 1));
    assert_eq!(file(&chunks, &job.job_id, 1).await, b"new;");
}
