//! Retention (contract section 13): export files expire `BULK_EXPORT_RETENTION`
//! after their job ended (chunks removed, `result.expired: true`), ended job
//! records go after `BULK_JOB_RETENTION`; old quota windows are dropped too.
//!
//! One sweeper per instance, all safe together: every step is an idempotent
//! delete or `$set` keyed by what the step itself selected, and chunks go
//! before the record says so, so a sweep that dies half way is finished by the next.
//! Downloads do not wait for the sweeper: a file past its time answers 410
//! whether or not its chunks are gone yet.

use std::sync::Arc;
use std::time::Duration;

use bson::DateTime;
use contact_bulk_actors::metrics;
use contact_bulk_actors::model::{JobKind, JobRecord};
use contact_bulk_actors::repo::Sweep;
use contact_bulk_actors::JobError;
use tokio::task::JoinSet;

use crate::commands::App;

/// Records handled per sweep step, so one step never holds many ids.
const BATCH: i64 = 200;

/// How long exports and ended jobs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Export files, counted from the end of their job.
    pub exports: Duration,
    /// Ended job records, counted from their end.
    pub jobs: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            exports: Duration::from_secs(7 * 24 * 3600),
            jobs: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl Retention {
    /// Whether the export file of `job` is gone (or due to go): swept already,
    /// or ended longer ago than the export retention.
    pub fn export_expired(&self, job: &JobRecord) -> bool {
        if job.kind != JobKind::Export {
            return false;
        }
        if job.result.as_ref().is_some_and(|r| r.expired) {
            return true;
        }
        job.finished_at
            .is_some_and(|t| t.timestamp_millis() <= cutoff(self.exports))
    }
}

fn cutoff(keep: Duration) -> i64 {
    let keep = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    DateTime::now().timestamp_millis().saturating_sub(keep)
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Export files removed.
    pub exports: u64,
    /// Job records removed.
    pub jobs: u64,
}

/// Sweeps every `every` (and once at start) until the task is aborted.
pub fn start(app: Arc<App>, every: Duration, tasks: &mut JoinSet<()>) {
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(200)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match sweep(&app).await {
                Ok(s) if s != Swept::default() => {
                    tracing::info!(exports = s.exports, jobs = s.jobs, "retention sweep");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
            }
            if let Err(e) = app.quota.sweep().await {
                tracing::debug!(error = %e, "quota windows not swept");
            }
        }
    });
}

/// One pass: expires due export files, then removes due job records.
pub async fn sweep(app: &App) -> Result<Swept, JobError> {
    let mut swept = Swept::default();
    let exports_by = DateTime::from_millis(cutoff(app.retention.exports));
    loop {
        let due = app.store.due(Sweep::Exports, exports_by, BATCH).await?;
        if due.is_empty() {
            break;
        }
        app.artifacts.remove_jobs(&due).await?;
        let expired = app.store.mark_expired(&due).await?;
        metrics::exports_expired(expired);
        swept.exports += expired;
        tracing::info!(jobs = ?due, "export files expired");
        if (due.len() as i64) < BATCH {
            break;
        }
    }
    let records_by = DateTime::from_millis(cutoff(app.retention.jobs));
    loop {
        let due = app.store.due(Sweep::Records, records_by, BATCH).await?;
        if due.is_empty() {
            break;
        }
        // A record kept shorter than its file: the file goes with it.
        app.artifacts.remove_jobs(&due).await?;
        let removed = app.store.remove_ended(&due).await?;
        metrics::jobs_removed(removed);
        swept.jobs += removed;
        if (due.len() as i64) < BATCH {
            break;
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_like_the_contract_says() {
        for (s, secs) in [
            ("30s", 30),
            ("15m", 900),
            ("168h", 168 * 3600),
            ("7d", 7 * 86_400),
            ("90d", 90 * 86_400),
        ] {
            assert_eq!(humantime::parse_duration(s).unwrap().as_secs(), secs, "{s}");
        }
    }

    #[test]
    fn cutoff_saturates_on_huge_retentions() {
        assert!(cutoff(Duration::MAX) <= 0);
    }
}
