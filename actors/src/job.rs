//! What every job actor shares: settings, the handles it works with, events with retry.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bson::Document;
use serde::Serialize;

use crate::artifact::Artifacts;
use crate::error::JobError;
use crate::events::{EventSink, JobEventKind, ProgressThrottle};
use crate::model::{JobRecord, JobStatus};
use crate::store::JobStore;

/// How often a long single operation renews the lease and looks for a cancel.
pub const BEAT: Duration = Duration::from_millis(500);

/// Tunables of running jobs.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// Contacts read per export step.
    pub export_batch: u32,
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
    /// Actor starts before a job is marked failed.
    pub max_attempts: i32,
    /// First restart delay; doubles per attempt.
    pub restart_backoff: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            export_batch: 1000,
            delete_batch: 2000,
            restore_batch: 1000,
            restore_retention: Duration::from_secs(30 * 24 * 3600),
            flush_bytes: 1 << 20,
            total_wait: Duration::from_millis(250),
            flush_interval: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(30),
            progress_interval: Duration::from_millis(100),
            step_retries: 5,
            max_attempts: 5,
            restart_backoff: Duration::from_millis(500),
        }
    }
}

/// Handles shared by the supervisor and its job actors.
#[derive(Clone)]
pub struct JobEnv {
    /// Job records.
    pub store: JobStore,
    /// Export files.
    pub artifacts: Artifacts,
    /// Event publishing.
    pub sink: Arc<dyn EventSink>,
    /// Tunables.
    pub settings: JobSettings,
    /// This instance's lease owner id.
    pub instance: String,
}

/// Counters a job actor exposes; progress and tests read them.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JobCounters {
    /// Steps run.
    pub steps: u64,
    /// Steps that failed and were retried.
    pub step_failures: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
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
    /// Counters.
    pub counters: JobCounters,
}

impl JobRun {
    /// Wraps a leased job.
    pub fn new(env: JobEnv, job: JobRecord) -> JobRun {
        let throttle = ProgressThrottle::new(env.settings.progress_interval);
        JobRun {
            cancel: job.cancel_requested,
            env,
            job,
            failures: 0,
            throttle,
            counters: JobCounters::default(),
        }
    }

    /// Writes `update` to the held record (renewing the lease) and keeps the result.
    pub async fn update(&mut self, update: Document) -> Result<(), JobError> {
        let job = self
            .env
            .store
            .update_held(
                &self.job.job_id,
                &self.env.instance,
                self.env.settings.lease_ttl,
                update,
            )
            .await?;
        if job.cancel_requested {
            self.cancel = true;
        }
        self.job = job;
        self.counters.checkpoints += 1;
        Ok(())
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
                    self.update(bson::doc! {}).await?;
                    if self.cancel {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Moves the job to a terminal state and announces it.
    pub async fn finish(&mut self, status: JobStatus, set: Document) -> Result<(), JobError> {
        let job = self
            .env
            .store
            .finish(&self.job.job_id, &self.env.instance, status, set)
            .await?;
        self.job = job;
        tracing::info!(job_id = %self.job.job_id, status = status.as_str(), processed = self.job.processed, "job finished");
        self.status_event().await;
        Ok(())
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
            Duration::from_secs(5),
        )
    }
}

/// Exponential backoff: `base * 2^n`, capped.
pub fn backoff(base: Duration, n: u32, cap: Duration) -> Duration {
    base.saturating_mul(1u32 << n.min(16)).min(cap)
}

/// Whether an error is worth retrying (database or broker trouble), as opposed
/// to a lost lease or bad input.
pub fn is_transient(e: &JobError) -> bool {
    matches!(e, JobError::Mongo(_) | JobError::Internal(_))
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

/// Messages of every job actor (export and delete alike), so the supervisor drives them the same way.
#[derive(Debug)]
pub enum JobMsg {
    /// Process the next batch.
    Step,
    /// Stop at this boundary, status `cancelled`.
    Cancel,
    /// Stop at this boundary and leave the job resumable (shutdown).
    Drain,
    /// Reply with the actor's counters.
    Counters(ractor::RpcReplyPort<JobCounters>),
}

/// A job actor's batch logic.
pub trait JobStep: Send + Sized + 'static {
    /// The state of a job actor about to run `job` (its `pre_start`).
    fn start(env: JobEnv, job: JobRecord) -> Result<Self, JobError>;
    /// The shared run state.
    fn run(&mut self) -> &mut JobRun;
    /// Drops connections that may be broken (cursors) after a failed step.
    fn reset(&mut self);
    /// Processes one batch. `Ok(true)` = more to do.
    fn step(&mut self) -> impl Future<Output = Result<bool, JobError>> + Send;
}

/// A job actor: `S` holds its state and batch logic; the message loop, the
/// first `Step` and the failure path are the same for every kind of job.
pub struct JobActor<S>(std::marker::PhantomData<fn() -> S>);

impl<S> JobActor<S> {
    /// The actor, to spawn.
    pub fn new() -> Self {
        JobActor(std::marker::PhantomData)
    }
}

impl<S> Default for JobActor<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: JobStep> ractor::Actor for JobActor<S> {
    type Msg = JobMsg;
    type State = S;
    type Arguments = (JobEnv, JobRecord);

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<JobMsg>,
        (env, job): (JobEnv, JobRecord),
    ) -> Result<S, ractor::ActorProcessingErr> {
        Ok(S::start(env, job)?)
    }

    async fn post_start(
        &self,
        myself: ractor::ActorRef<JobMsg>,
        _state: &mut S,
    ) -> Result<(), ractor::ActorProcessingErr> {
        let _ = myself.send_message(JobMsg::Step);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ractor::ActorRef<JobMsg>,
        msg: JobMsg,
        state: &mut S,
    ) -> Result<(), ractor::ActorProcessingErr> {
        handle_job_msg(&myself, msg, state).await
    }
}

/// The message loop both job actors share: one batch per `Step`, retries with
/// backoff in place, then failure to the supervisor.
pub async fn handle_job_msg<S: JobStep>(
    myself: &ractor::ActorRef<JobMsg>,
    msg: JobMsg,
    state: &mut S,
) -> Result<(), ractor::ActorProcessingErr> {
    match msg {
        JobMsg::Cancel => state.run().cancel = true,
        JobMsg::Counters(reply) => {
            let _ = reply.send(state.run().counters.clone());
        }
        JobMsg::Drain => {
            let run = state.run();
            if let Err(e) = run
                .env
                .store
                .release(&run.job.job_id, &run.env.instance)
                .await
            {
                tracing::warn!(job_id = %run.job.job_id, error = %e, "lease not released on drain");
            }
            myself.stop(Some("drained".into()));
        }
        JobMsg::Step => {
            state.run().counters.steps += 1;
            match state.step().await {
                Ok(true) => {
                    state.run().failures = 0;
                    let _ = myself.send_message(JobMsg::Step);
                }
                Ok(false) => myself.stop(None),
                Err(JobError::Conflict(reason)) => {
                    tracing::warn!(job_id = %state.run().job.job_id, reason, "job stopped: no longer held");
                    myself.stop(Some(reason));
                }
                Err(e) => {
                    state.reset();
                    let run = state.run();
                    run.failures += 1;
                    run.counters.step_failures += 1;
                    if run.failures > run.env.settings.step_retries {
                        return Err(Box::new(e));
                    }
                    let delay = run.step_backoff();
                    tracing::warn!(job_id = %run.job.job_id, error = %e, retry_in_ms = delay.as_millis() as u64, "job step failed");
                    myself.send_after(delay, || JobMsg::Step);
                }
            }
        }
    }
    Ok(())
}
