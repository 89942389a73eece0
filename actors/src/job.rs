//! What every job actor shares: settings, the handles it works with, events with retry.
//!
//! Faults and what they cost: an error of the job's own work is retried in
//! place `step_retries` times, then the actor fails and the supervisor counts
//! an attempt. An outage (MongoDB or NATS unreachable, see
//! [`JobError::outage`]) is waited out with backoff, however long, and costs
//! nothing; the record and the events say what the job is `waiting` for.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Dependency, JobError};
use crate::events::{EventSink, JobEventKind, ProgressThrottle};
use crate::model::JobRecord;
use crate::repo::{Ending, JobPatch, JobRepo, Lease};

mod actor;
pub use actor::{handle_job_msg, JobActor, JobMsg, JobStep};

/// How often a long single operation renews the lease and looks for a cancel.
pub const BEAT: Duration = Duration::from_millis(500);

/// Tunables of running jobs.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// Contacts read per export step.
    pub export_batch: u32,
    /// `_id` ranges an export's selection is cut into (see [`crate::id_ranges`]).
    pub export_ranges: usize,
    /// Contacts deleted per delete step.
    pub delete_batch: u32,
    /// Contacts put back per restore step.
    pub restore_batch: u32,
    /// How long a delete keeps what it removes (`BULK_RESTORE_RETENTION`).
    pub restore_retention: Duration,
    /// Export buffer size that triggers a flush (chunk + checkpoint).
    pub flush_bytes: usize,
    /// How long an export's start waits for its count, so that `total` is in
    /// the `processing` snapshot whenever it is quick to get (after it, the
    /// count lands beside the first batches instead of holding them up).
    pub total_wait: Duration,
    /// Longest time between export flushes, so progress stays live.
    pub flush_interval: Duration,
    /// Lease length; renewed at every checkpoint.
    pub lease_ttl: Duration,
    /// Minimum gap between progress events of one job.
    pub progress_interval: Duration,
    /// Failed steps retried in place before the actor gives up and the supervisor restarts it.
    pub step_retries: u32,
    /// Longest wait between two tries of a failed step or during an outage.
    pub retry_max: Duration,
    /// Actor starts before a job is marked failed.
    pub max_attempts: i32,
    /// First restart delay; doubles per attempt.
    pub restart_backoff: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            export_batch: 1000,
            export_ranges: crate::id_ranges::RANGES,
            delete_batch: 2000,
            restore_batch: 1000,
            restore_retention: Duration::from_secs(30 * 24 * 3600),
            flush_bytes: 1 << 20,
            total_wait: Duration::from_millis(250),
            flush_interval: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(30),
            progress_interval: Duration::from_millis(100),
            step_retries: 5,
            retry_max: Duration::from_secs(5),
            max_attempts: 5,
            restart_backoff: Duration::from_millis(500),
        }
    }
}

/// Handles shared by the supervisor and its job actors.
#[derive(Clone)]
pub struct JobEnv {
    /// Job records and leases.
    pub jobs: Arc<dyn JobRepo>,
    /// The CRM data a delete works on.
    pub crm: crate::repo::Crm,
    /// What exports read.
    pub export: Arc<dyn crate::repo::ExportSource>,
    /// Export files.
    pub artifacts: Arc<dyn crate::repo::ChunkRepo>,
    /// Event publishing.
    pub sink: Arc<dyn EventSink>,
    /// Tunables.
    pub settings: JobSettings,
    /// This instance's lease owner id.
    pub instance: String,
}

/// State every job actor carries.
pub struct JobRun {
    /// Handles.
    pub env: JobEnv,
    /// The record as last written.
    pub job: JobRecord,
    /// Cancel asked for (locally or in the record).
    pub cancel: bool,
    /// Consecutive failed steps.
    pub failures: u32,
    /// Progress rate limit.
    pub throttle: ProgressThrottle,
    /// The lease this actor holds the job under.
    pub lease: Lease,
    /// Consecutive steps that met an outage.
    pub outages: u32,
}

impl JobRun {
    /// Wraps a leased job.
    pub fn new(env: JobEnv, job: JobRecord) -> JobRun {
        let throttle = ProgressThrottle::new(env.settings.progress_interval);
        let lease = Lease {
            owner: env.instance.clone(),
            epoch: job.lease_epoch,
        };
        JobRun {
            lease,
            outages: 0,
            cancel: job.cancel_requested,
            env,
            job,
            failures: 0,
            throttle,
        }
    }

    /// [`JobRun::update`] with a failure point after the write: armed, the
    /// write is applied and its reply lost (tests of lost replies).
    pub async fn update_at(&mut self, point: &str, patch: JobPatch) -> Result<(), JobError> {
        let scope = self.job.org_id.to_hex();
        if crate::failpoint::remaining(point, &scope) > 0 {
            let job = self
                .env
                .jobs
                .update_held(
                    &self.job.job_id,
                    &self.lease,
                    self.env.settings.lease_ttl,
                    &patch,
                )
                .await?;
            if crate::failpoint::fires(point, &scope) {
                drop(job);
                return Err(lost_reply(point));
            }
            self.job = job;
            return Ok(());
        }
        self.update(patch).await
    }

    /// Writes `patch` to the held record (renewing the lease) and keeps the result.
    pub async fn update(&mut self, patch: JobPatch) -> Result<(), JobError> {
        let job = self
            .env
            .jobs
            .update_held(
                &self.job.job_id,
                &self.lease,
                self.env.settings.lease_ttl,
                &patch,
            )
            .await?;
        if job.cancel_requested {
            self.cancel = true;
        }
        crate::metrics::checkpointed(&self.job, &job);
        self.job = job;
        Ok(())
    }

    /// Runs one long await of a step (opening a cursor, waiting for a batch's
    /// deletes) while renewing the lease every `BEAT`, so no other instance
    /// takes the job over meanwhile. A cancel seen meanwhile is kept for the
    /// next batch boundary; a lost lease abandons `op`.
    pub async fn alive<T>(
        &mut self,
        op: impl Future<Output = Result<T, JobError>>,
    ) -> Result<T, JobError> {
        let mut op = std::pin::pin!(op);
        let mut beat = tokio::time::interval(BEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.tick().await;
        loop {
            tokio::select! {
                r = &mut op => return r,
                _ = beat.tick() => match self.update(JobPatch::default()).await {
                    Ok(()) => {}
                    Err(e @ JobError::Conflict(_)) => return Err(e),
                    // The operation meets the same trouble and says so.
                    Err(e) => tracing::debug!(job_id = %self.job.job_id, error = %e, "lease not renewed"),
                },
            }
        }
    }

    /// Runs one long operation of a step (a count, a pass over the selection)
    /// while renewing the lease and reading the cancel flag every `BEAT`, so a
    /// cancel lands within the contract's 2 seconds and no other instance takes
    /// the job over meanwhile. `None`: a cancel came first and `op` was dropped.
    pub async fn listening<T>(
        &mut self,
        op: impl Future<Output = Result<T, JobError>>,
    ) -> Result<Option<T>, JobError> {
        let mut op = std::pin::pin!(op);
        let mut beat = tokio::time::interval(BEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.tick().await;
        loop {
            tokio::select! {
                r = &mut op => return r.map(Some),
                _ = beat.tick() => {
                    self.update(JobPatch::default()).await?;
                    if self.cancel {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Moves the job to a terminal state and announces it. A terminal write
    /// whose reply was lost is found done on the retry, and announced then.
    pub async fn finish(&mut self, ending: Ending) -> Result<(), JobError> {
        let status = ending.status();
        let job = self
            .env
            .jobs
            .finish(&self.job.job_id, &self.lease, &ending)
            .await?;
        crate::metrics::checkpointed(&self.job, &job);
        crate::metrics::job_finished(job.kind.as_str(), status.as_str());
        if crate::failpoint::fires(crate::failpoint::FINISH_LOST_REPLY, &job.org_id.to_hex()) {
            return Err(lost_reply(crate::failpoint::FINISH_LOST_REPLY));
        }
        self.job = job;
        tracing::info!(job_id = %self.job.job_id, status = status.as_str(), processed = self.job.processed, "job finished");
        self.terminal_event().await;
        Ok(())
    }

    /// After a lost lease: if this lease itself finished the job (a terminal
    /// write whose reply was lost, met by a later write of the retried step),
    /// announces the terminal snapshot the lost reply kept from being announced.
    pub async fn announce_lost_finish(&mut self) {
        if self.job.status.is_terminal() {
            return;
        }
        match self.env.jobs.get_any(&self.job.job_id).await {
            Ok(Some(job)) if job.status.is_terminal() && job.lease_epoch == self.lease.epoch => {
                self.job = job;
                self.terminal_event().await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(job_id = %self.job.job_id, error = %e, "lost lease not inspected")
            }
        }
    }

    /// Announces a status change. Retried: every status change must be seen.
    pub async fn status_event(&self) {
        let sink = &self.env.sink;
        let job = &self.job;
        let sent = retry("publish status event", 5, || {
            sink.job_event(JobEventKind::Status, job)
        })
        .await;
        if let Err(e) = sent {
            tracing::warn!(job_id = %job.job_id, error = %e, "status event not published");
        }
    }

    /// Announces the terminal snapshot: the last event of the job, so it is
    /// retried through a NATS outage however long (bounded by nothing but the
    /// actor's life; a drain gives up on it).
    pub async fn terminal_event(&self) {
        let mut n = 0;
        loop {
            match self
                .env
                .sink
                .job_event(JobEventKind::Status, &self.job)
                .await
            {
                Ok(()) => return,
                Err(e) if e.outage().is_some() || is_transient(&e) => {
                    let delay = backoff(Duration::from_millis(50), n, self.env.settings.retry_max);
                    tracing::warn!(job_id = %self.job.job_id, error = %e, retry_in_ms = delay.as_millis() as u64, "terminal event not published yet");
                    tokio::time::sleep(delay).await;
                    n = n.saturating_add(1);
                }
                Err(e) => {
                    tracing::warn!(job_id = %self.job.job_id, error = %e, "terminal event not published");
                    return;
                }
            }
        }
    }

    /// Says what the job waits for (`None`: nothing any more): in the record
    /// when MongoDB is there to hold it, and in a progress event when NATS is
    /// there to carry it. Best effort: the outage may hide either.
    pub async fn set_waiting(&mut self, waiting: Option<Dependency>) {
        if self.job.waiting == waiting {
            return;
        }
        self.job.waiting = waiting;
        let patch = JobPatch {
            waiting: Some(waiting),
            ..JobPatch::default()
        };
        if let Err(e) = self.update(patch).await {
            tracing::debug!(job_id = %self.job.job_id, error = %e, "waiting not recorded");
            self.job.waiting = waiting;
        }
        if let Err(e) = self
            .env
            .sink
            .job_event(JobEventKind::Progress, &self.job)
            .await
        {
            tracing::debug!(job_id = %self.job.job_id, error = %e, "waiting not announced");
        }
    }

    /// Announces progress, at most about ten times a second; best effort.
    pub async fn progress_event(&mut self) {
        if !self.throttle.ready() {
            return;
        }
        if let Err(e) = self
            .env
            .sink
            .job_event(JobEventKind::Progress, &self.job)
            .await
        {
            tracing::debug!(job_id = %self.job.job_id, error = %e, "progress event not published");
        }
    }

    /// Delay before retrying a failed step.
    pub fn step_backoff(&self) -> Duration {
        backoff(
            Duration::from_millis(100),
            self.failures,
            self.env.settings.retry_max,
        )
    }

    /// Delay before trying again during an outage.
    pub fn outage_backoff(&self) -> Duration {
        backoff(
            Duration::from_millis(100),
            self.outages,
            self.env.settings.retry_max,
        )
    }
}

/// The error a write whose reply was lost gives its caller.
fn lost_reply(point: &str) -> JobError {
    JobError::Unavailable {
        service: Dependency::Mongodb,
        message: format!("reply lost ({point})"),
    }
}

/// Exponential backoff: `base * 2^n`, capped.
pub fn backoff(base: Duration, n: u32, cap: Duration) -> Duration {
    base.saturating_mul(1u32 << n.min(16)).min(cap)
}

/// Whether an error is worth retrying (database or broker trouble), as opposed
/// to a lost lease or bad input.
pub fn is_transient(e: &JobError) -> bool {
    matches!(
        e,
        JobError::Mongo(_) | JobError::Internal(_) | JobError::Unavailable { .. }
    )
}

/// Runs `op` until it succeeds, a non-transient error occurs, or `tries` run out.
pub async fn retry<T, F, Fut>(what: &str, tries: u32, mut op: F) -> Result<T, JobError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, JobError>>,
{
    let mut n = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if is_transient(&e) && n + 1 < tries => {
                tracing::debug!(what, attempt = n + 1, error = %e, "retrying");
                tokio::time::sleep(backoff(
                    Duration::from_millis(50),
                    n,
                    Duration::from_secs(2),
                ))
                .await;
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(100);
        assert_eq!(
            backoff(b, 0, Duration::from_secs(5)),
            Duration::from_millis(100)
        );
        assert_eq!(
            backoff(b, 3, Duration::from_secs(5)),
            Duration::from_millis(800)
        );
        assert_eq!(
            backoff(b, 30, Duration::from_secs(5)),
            Duration::from_secs(5)
        );
    }

    #[tokio::test]
    async fn retry_stops_on_permanent_errors() {
        let mut calls = 0;
        let r: Result<(), _> = retry("x", 5, || {
            calls += 1;
            async { Err(JobError::Conflict("lease lost".into())) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn retry_retries_transient_errors() {
        let mut calls = 0;
        let r = retry("x", 3, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(JobError::Internal("flaky".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.ok(), Some(3));
    }
}
