//! The export's `total`: counted beside the first batches, and the
//! `processing` event that waits for it (see `export.rs`).

use bson::oid::ObjectId;

use super::ExportState;
use crate::error::JobError;
use crate::repo::JobPatch;

/// The count of `total`, run as its own task so the export does not wait for
/// it: on a large organisation counting takes a fair fraction of the time the
/// whole export does. Aborted when the actor goes away.
pub(super) struct Counting(pub(super) tokio::task::JoinHandle<Result<i64, JobError>>);

impl Counting {
    /// The count, once it has landed (cancel-safe: it can be awaited again).
    pub(super) async fn wait(&mut self) -> Result<i64, JobError> {
        match (&mut self.0).await {
            Ok(count) => count,
            Err(e) => Err(JobError::Internal(format!("count task: {e}"))),
        }
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts counting `total` beside the export: the selection under the
/// snapshot's bound, as the reader's ranges read it.
pub(super) fn start_count(s: &ExportState, max_id: ObjectId) -> Counting {
    let source = s.run.env.export.clone();
    let job = s.run.job.clone();
    Counting(tokio::spawn(
        async move { source.count(&job, max_id).await },
    ))
}

/// Records `total` once the count has landed (or, with `wait`, waits for it).
/// A failed count is the step's error: the retry starts a new one.
pub(super) async fn settle_count(s: &mut ExportState, wait: bool) -> Result<(), JobError> {
    let Some(counting) = s.counting.as_mut() else {
        return Ok(());
    };
    if !wait && !counting.0.is_finished() {
        return Ok(());
    }
    let outcome = counting.wait().await;
    s.counting = None;
    let total = outcome?;
    s.run
        .update(JobPatch {
            total: Some(Some(total)),
            ..JobPatch::default()
        })
        .await?;
    tracing::info!(job_id = %s.run.job.job_id, total, "export counted");
    if s.announce.is_some() {
        announce(s, true).await;
    } else {
        s.run.progress_event().await;
    }
    Ok(())
}

/// Sends the `processing` status event once it is due: when the count has
/// landed (the event then carries `total`), when `total_wait` has passed, or
/// (`now`) when the export has got that far without it.
pub(super) async fn announce(s: &mut ExportState, now: bool) {
    let Some(due) = s.announce else {
        return;
    };
    if now || s.run.job.total.is_some() || tokio::time::Instant::now() >= due {
        s.announce = None;
        s.run.status_event().await;
    }
}
