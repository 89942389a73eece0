//! The chunk repository: export files as ordered chunks `(jobId, n)`, each
//! fenced by its writer's lease epoch (see [`crate::artifact`] for MongoDB).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::error::JobError;

/// A file's bytes, a chunk at a time.
pub type ChunkStream = BoxStream<'static, Result<bytes::Bytes, JobError>>;

/// Export files.
#[async_trait]
pub trait ChunkRepo: Send + Sync + std::fmt::Debug + 'static {
    /// Writes chunk `n` of a job's file under lease `epoch`; writing it again
    /// replaces it (idempotent on retry). `Conflict` when a newer lease has
    /// written this chunk: this writer is fenced off.
    async fn put(&self, job_id: &str, n: i64, epoch: i64, data: Vec<u8>) -> Result<(), JobError>;

    /// Drops chunks `n` and above; how many went.
    async fn remove_from(&self, job_id: &str, n: i64) -> Result<u64, JobError>;

    /// Drops every chunk of these jobs (retention); how many went.
    async fn remove_jobs(&self, job_ids: &[String]) -> Result<u64, JobError>;

    /// The file's bytes in order, a chunk at a time (memory stays at a couple
    /// of chunks): chunks below `chunks` when the file says how many it has.
    async fn stream(&self, job_id: &str, chunks: Option<i64>) -> Result<ChunkStream, JobError>;

    /// Size and hex SHA-256 of the file's first `chunks` chunks, read back chunk by chunk.
    async fn digest(&self, job_id: &str, chunks: i64) -> Result<(i64, String), JobError> {
        let mut stream = self.stream(job_id, Some(chunks)).await?;
        let mut hasher = Sha256::new();
        let mut size = 0i64;
        while let Some(chunk) = stream.try_next().await? {
            size += chunk.len() as i64;
            hasher.update(&chunk);
        }
        Ok((size, hex::encode(hasher.finalize())))
    }
}

/// `(jobId, n)` → (epoch, data).
type Chunks = BTreeMap<(String, i64), (i64, Vec<u8>)>;

/// Export chunks in memory, with the same epoch fence; clones share them.
#[derive(Debug, Clone, Default)]
pub struct MemChunks {
    chunks: Arc<Mutex<Chunks>>,
    /// Writes still to fail as during an outage.
    failing: Arc<std::sync::atomic::AtomicU32>,
}

impl MemChunks {
    /// Empty.
    pub fn new() -> MemChunks {
        MemChunks::default()
    }

    fn lock(&self) -> MutexGuard<'_, Chunks> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next `n` writes fail as during a MongoDB outage.
    pub fn fail_writes(&self, n: u32) {
        self.failing.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The chunk numbers stored for a job (tests).
    pub fn numbers(&self, job_id: &str) -> Vec<i64> {
        self.lock()
            .keys()
            .filter(|(j, _)| j == job_id)
            .map(|(_, n)| *n)
            .collect()
    }
}

#[async_trait]
impl ChunkRepo for MemChunks {
    async fn put(&self, job_id: &str, n: i64, epoch: i64, data: Vec<u8>) -> Result<(), JobError> {
        use std::sync::atomic::Ordering;
        let failing = &self.failing;
        if failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
            .is_ok()
        {
            return Err(JobError::Unavailable {
                service: crate::error::Dependency::Mongodb,
                message: "in-memory chunks set down".into(),
            });
        }
        let mut chunks = self.lock();
        let key = (job_id.to_string(), n);
        if chunks.get(&key).is_some_and(|(e, _)| *e > epoch) {
            return Err(JobError::Conflict(format!(
                "chunk {n} of job {job_id} belongs to a newer lease"
            )));
        }
        chunks.insert(key, (epoch, data));
        Ok(())
    }

    async fn remove_from(&self, job_id: &str, n: i64) -> Result<u64, JobError> {
        let mut chunks = self.lock();
        let before = chunks.len();
        chunks.retain(|(j, m), _| !(j == job_id && *m >= n));
        Ok((before - chunks.len()) as u64)
    }

    async fn remove_jobs(&self, job_ids: &[String]) -> Result<u64, JobError> {
        let mut chunks = self.lock();
        let before = chunks.len();
        chunks.retain(|(j, _), _| !job_ids.contains(j));
        Ok((before - chunks.len()) as u64)
    }

    async fn stream(&self, job_id: &str, chunks: Option<i64>) -> Result<ChunkStream, JobError> {
        let data: Vec<Result<bytes::Bytes, JobError>> = self
            .lock()
            .iter()
            .filter(|((j, n), _)| j == job_id && chunks.is_none_or(|c| *n < c))
            .map(|(_, (_, d))| Ok(bytes::Bytes::from(d.clone())))
            .collect();
        Ok(futures::stream::iter(data).boxed())
    }
}
