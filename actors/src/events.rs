//! What jobs announce, and the sink they announce it to (NATS in the service, a fake in unit tests).

use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use futures::future::BoxFuture;

use crate::error::JobError;
use crate::filter::PipelineType;
use crate::model::JobRecord;

/// The two kinds of job event of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEventKind {
    /// `job.progress`: processed moved.
    Progress,
    /// `job.status`: status changed (or the terminal snapshot).
    Status,
}

impl JobEventKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobEventKind::Progress => "job.progress",
            JobEventKind::Status => "job.status",
        }
    }
}

/// One deleted contact, announced as `contact_removed`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemovedContact {
    /// Organisation.
    pub org_id: ObjectId,
    /// The deleted contact.
    pub contact_id: ObjectId,
    /// The delete job.
    pub job_id: String,
    /// Contact or Application.
    pub pipeline_type: PipelineType,
    /// Its assignee.
    pub owner_id: Option<ObjectId>,
    /// When it was deleted.
    pub at: bson::DateTime,
}

/// One restored contact, announced as `contact_restored`.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoredContact {
    /// Organisation.
    pub org_id: ObjectId,
    /// The restored contact.
    pub contact_id: ObjectId,
    /// The restore job.
    pub job_id: String,
    /// The delete it undoes.
    pub source_job_id: String,
    /// Contact or Application.
    pub pipeline_type: PipelineType,
    /// Its assignee.
    pub owner_id: Option<ObjectId>,
    /// When it was restored.
    pub at: bson::DateTime,
}

/// Where jobs publish. Implementations must make `contacts_removed` durable
/// (return only once every event is stored) and deduplicated per job and contact.
pub trait EventSink: Send + Sync + 'static {
    /// Publishes a job event carrying the record's snapshot.
    fn job_event(&self, kind: JobEventKind, job: &JobRecord)
        -> BoxFuture<'_, Result<(), JobError>>;
    /// Publishes one `contact_removed` per contact and waits until all are stored.
    fn contacts_removed<'a>(
        &'a self,
        removed: &'a [RemovedContact],
    ) -> BoxFuture<'a, Result<(), JobError>>;
    /// Publishes one `contact_restored` per contact and waits until all are
    /// stored (durable and deduplicated as `contacts_removed`).
    fn contacts_restored<'a>(
        &'a self,
        restored: &'a [RestoredContact],
    ) -> BoxFuture<'a, Result<(), JobError>>;
}

/// Keeps progress events to about ten a second per job.
#[derive(Debug)]
pub struct ProgressThrottle {
    every: Duration,
    last: Option<Instant>,
}

impl ProgressThrottle {
    /// At most one event per `every`.
    pub fn new(every: Duration) -> ProgressThrottle {
        ProgressThrottle { every, last: None }
    }

    /// True (and resets the clock) when a progress event may go out now.
    pub fn ready(&mut self) -> bool {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_the_first_through_then_holds() {
        let mut t = ProgressThrottle::new(Duration::from_secs(60));
        assert!(t.ready());
        assert!(!t.ready());
        let mut fast = ProgressThrottle::new(Duration::ZERO);
        assert!(fast.ready());
        assert!(fast.ready());
    }
}
