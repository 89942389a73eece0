//! An export chunk on its way to storage: written in the background while the
//! export reads and encodes the next rows, then covered by a checkpoint.
//!
//! At most one is in flight per export, and it is settled (stored and
//! checkpointed) before the next one starts, so chunks and checkpoints still
//! land in order. A crash before the settle leaves a chunk past the checkpoint,
//! which a resumed export writes again (or which lies past the file's end and
//! is never read). Both the chunk and the checkpoint are fenced by the lease.

use bson::oid::ObjectId;

use crate::model::Checkpoint;
use crate::repo::JobPatch;

use crate::error::JobError;
use crate::job::JobRun;

/// Chunk `n` being stored.
pub(crate) struct PendingChunk {
    n: i64,
    /// Kept until the chunk is stored, so a failed background write is redone.
    data: Vec<u8>,
    rows: i64,
    last_id: Option<ObjectId>,
    put: Option<tokio::task::JoinHandle<Result<(), JobError>>>,
    stored: bool,
}

impl PendingChunk {
    /// Starts writing chunk `n` (holding `rows` rows, up to `last_id`).
    pub(crate) fn spawn(
        run: &JobRun,
        n: i64,
        data: Vec<u8>,
        rows: i64,
        last_id: Option<ObjectId>,
    ) -> PendingChunk {
        let artifacts = run.env.artifacts.clone();
        let job_id = run.job.job_id.clone();
        let epoch = run.lease.epoch;
        let copy = data.clone();
        let put = tokio::spawn(async move { artifacts.put(&job_id, n, epoch, copy).await });
        PendingChunk {
            n,
            data,
            rows,
            last_id,
            put: Some(put),
            stored: false,
        }
    }

    /// Its number in the file.
    pub(crate) fn n(&self) -> i64 {
        self.n
    }

    /// Its bytes, as stored.
    pub(crate) fn data(&self) -> &[u8] {
        &self.data
    }

    /// Rows in the chunk, not yet in the job's `processed`.
    pub(crate) fn rows(&self) -> i64 {
        self.rows
    }

    /// Waits until the chunk is stored (writing it again if the background
    /// write failed), then writes the checkpoint that covers it. An error leaves
    /// it pending; calling again resumes where this call stopped.
    pub(crate) async fn settle(&mut self, run: &mut JobRun) -> Result<(), JobError> {
        if let Some(put) = self.put.take() {
            match put.await {
                Ok(Ok(())) => self.stored = true,
                Ok(Err(e @ JobError::Conflict(_))) => return Err(e),
                Ok(Err(e)) => {
                    tracing::warn!(job_id = %run.job.job_id, n = self.n, error = %e, "chunk write failed, writing it again");
                }
                Err(e) => {
                    tracing::warn!(job_id = %run.job.job_id, n = self.n, error = %e, "chunk write task failed, writing it again");
                }
            }
        }
        if !self.stored {
            run.env
                .artifacts
                .put(&run.job.job_id, self.n, run.lease.epoch, self.data.clone())
                .await?;
            self.stored = true;
        }
        // Absolute values, not `$inc`: a checkpoint write that took effect but
        // whose reply was lost can be sent again without counting twice.
        let job = &run.job;
        let bytes = job.checkpoint.bytes + self.data.len() as i64;
        let processed = job.processed + self.rows;
        run.update(JobPatch {
            checkpoint: Some(Checkpoint {
                last_id: self.last_id,
                next_chunk: self.n + 1,
                bytes,
            }),
            processed: Some(processed),
            ..JobPatch::default()
        })
        .await
    }
}

impl PendingChunk {
    /// Waits for the background write, if one runs (a drain lets the lease
    /// go only after it).
    pub(crate) async fn quiesce(&mut self) {
        if let Some(put) = self.put.take() {
            if let Ok(Ok(())) = put.await {
                self.stored = true;
            }
        }
    }
}

impl Drop for PendingChunk {
    fn drop(&mut self) {
        // A cancelled or drained export: the chunk is past the checkpoint and
        // would be dropped on resume anyway.
        if let Some(put) = &self.put {
            put.abort();
        }
    }
}

#[cfg(test)]
mod tests;
