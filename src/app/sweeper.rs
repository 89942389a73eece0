//! The retention sweeper (contract section 13): one per instance, expiring
//! export files and removing ended job records as `Retention` says, and
//! dropping old quota windows. See `retention.rs` for why sweepers can run
//! side by side and die half way.

use std::sync::Arc;
use std::time::Duration;

use bson::DateTime;
use contact_bulk_actors::metrics;
use contact_bulk_actors::repo::Sweep;
use contact_bulk_actors::JobError;
use tokio::task::JoinSet;

use super::retention::cutoff;
use super::App;

/// Records handled per sweep step, so one step never holds many ids.
const BATCH: i64 = 200;

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
