//! Retention (contract section 13): export files expire `BULK_EXPORT_RETENTION`
//! after their job ended (chunks removed, `result.expired: true`), ended job
//! records go after `BULK_JOB_RETENTION`; old quota windows are dropped too.
//!
//! One sweeper per instance, all safe together: every step is an idempotent
//! delete or `$set` keyed by what the step itself selected, and chunks go
//! before the record says so, so a sweep that dies half way is finished by the next.
//! Downloads do not wait for the sweeper: a file past its time answers 410
//! whether or not its chunks are gone yet.

use std::time::Duration;

use bson::DateTime;
use contact_bulk_actors::model::{JobKind, JobRecord};

use crate::config::Config;

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
    /// The retention the configuration asks for.
    pub fn from_config(config: &Config) -> Retention {
        Retention {
            exports: config.export_retention,
            jobs: config.job_retention,
        }
    }

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

pub(crate) fn cutoff(keep: Duration) -> i64 {
    let keep = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    DateTime::now().timestamp_millis().saturating_sub(keep)
}
