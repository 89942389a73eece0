//! The safety net under the event consumer: a job's terminal event can be lost
//! (an instance killed between recording the end and publishing it, NATS down
//! past the publisher's retries), so every instance periodically looks for
//! jobs that ended recently in organisations with webhooks and queues the
//! deliveries still missing, from the job record itself. The records are
//! unique per webhook and job: whichever path comes first wins, the other adds
//! nothing.

use std::collections::HashSet;
use std::time::Duration;

use bson::{oid::ObjectId, DateTime};
use contact_bulk_actors::model::JobRecord;

use super::Webhooks;
use crate::app::view::decorate;

/// Jobs ended this recently are looked at.
const WINDOW: Duration = Duration::from_secs(3600);
/// Jobs created longer ago than this are not expected to end now (bounds the
/// index range read per organisation).
const CREATED_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// Ended deliveries (succeeded, given up) are kept this long for the log.
const KEEP_ENDED: Duration = Duration::from_secs(30 * 24 * 3600);

/// Sweeps every `sweep_ms`, for ever.
pub(super) async fn run(hooks: Webhooks) {
    let every = Duration::from_millis(hooks.inner.config.sweep_ms.max(100));
    loop {
        tokio::time::sleep(every).await;
        match hooks.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                jobs = n,
                "terminal job events missed; webhook deliveries recovered from job records"
            ),
            Err(e) => tracing::debug!(error = %e, "webhook sweep failed"),
        }
        if let Err(e) = hooks.prune().await {
            tracing::debug!(error = %e, "old webhook deliveries not pruned");
        }
    }
}

impl Webhooks {
    fn ago(&self, d: Duration) -> DateTime {
        DateTime::from_millis(self.now().timestamp_millis() - d.as_millis() as i64)
    }
}

impl Webhooks {
    /// Removes ended deliveries older than [`KEEP_ENDED`], so the outbox does
    /// not grow for ever.
    async fn prune(&self) -> anyhow::Result<()> {
        let gone = self.inner.repo.prune(self.ago(KEEP_ENDED)).await?;
        if gone > 0 {
            tracing::info!(deliveries = gone, "old webhook deliveries pruned");
        }
        Ok(())
    }

    /// One sweep; returns how many jobs had deliveries missing.
    pub(super) async fn sweep(&self) -> anyhow::Result<usize> {
        let hooks = self.inner.repo.all_hooks().await?;
        if hooks.is_empty() {
            return Ok(0);
        }
        let orgs: Vec<ObjectId> = hooks
            .iter()
            .map(|h| h.org)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let grace = Duration::from_millis(self.inner.config.sweep_grace_ms);
        let jobs: Vec<JobRecord> = self
            .inner
            .jobs
            .ended_within(
                &orgs,
                self.ago(CREATED_WITHIN),
                (self.ago(WINDOW), self.ago(grace)),
            )
            .await?;
        if jobs.is_empty() {
            return Ok(0);
        }
        let hook_ids: Vec<ObjectId> = hooks.iter().map(|h| h.id).collect();
        let job_ids: Vec<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
        let have = self.inner.repo.queued(&hook_ids, &job_ids).await?;
        let mut recovered = 0;
        for job in &jobs {
            let Some(finished) = job.finished_at else {
                continue;
            };
            let event_type = format!("job.{}", job.status.as_str());
            let missing = hooks.iter().any(|h| {
                h.org == job.org_id
                    && h.events.contains(&event_type)
                    && h.created_at <= finished
                    && !have.contains(&(h.id, job.job_id.clone()))
            });
            if missing {
                let snapshot = decorate(&self.inner.keys, job);
                self.enqueue(job.org_id, &job.job_id, &event_type, finished, &snapshot)
                    .await?;
                recovered += 1;
            }
        }
        Ok(recovered)
    }
}
