//! The job actor every kind shares: its messages, the batch-step trait, and the
//! message loop (one batch per `Step`, retries in place, outages waited out).

use std::future::Future;

use super::{JobEnv, JobRun};
use crate::error::JobError;
use crate::model::JobRecord;

/// Messages of every job actor (export and delete alike), so the supervisor drives them the same way.
#[derive(Debug)]
pub enum JobMsg {
    /// Process the next batch.
    Step,
    /// Stop at this boundary, status `cancelled`.
    Cancel,
    /// Stop at this boundary and leave the job resumable (shutdown).
    Drain,
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
    /// Waits for the writes the job has in flight in the background (a drain
    /// lets the lease go only after them).
    fn quiesce(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
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
        JobMsg::Drain => {
            // Writes in flight first: once the lease is free, another
            // instance may start writing the same job.
            let bound = state.run().env.settings.lease_ttl / 2;
            if tokio::time::timeout(bound, state.quiesce()).await.is_err() {
                tracing::warn!(job_id = %state.run().job.job_id, "in-flight writes outlasted the drain; the lease expires instead");
                myself.stop(Some("drained".into()));
                return Ok(());
            }
            let run = state.run();
            if let Err(e) = run.env.jobs.release(&run.job.job_id, &run.lease).await {
                tracing::warn!(job_id = %run.job.job_id, error = %e, "lease not released on drain");
            }
            myself.stop(Some("drained".into()));
        }
        JobMsg::Step => {
            match state.step().await {
                Ok(more) => {
                    let run = state.run();
                    run.failures = 0;
                    run.outages = 0;
                    if more && run.job.waiting.is_some() {
                        run.set_waiting(None).await;
                    }
                    if more {
                        let _ = myself.send_message(JobMsg::Step);
                    } else {
                        myself.stop(None);
                    }
                }
                Err(JobError::Conflict(reason)) => {
                    state.run().announce_lost_finish().await;
                    tracing::warn!(job_id = %state.run().job.job_id, reason, "job stopped: no longer held");
                    myself.stop(Some(reason));
                }
                Err(e) if e.outage().is_some() => {
                    // Not the job's fault: wait it out, however long, at no cost.
                    state.reset();
                    let run = state.run();
                    run.set_waiting(e.outage()).await;
                    let delay = run.outage_backoff();
                    run.outages = run.outages.saturating_add(1);
                    tracing::warn!(job_id = %run.job.job_id, error = %e, waiting = ?run.job.waiting, retry_in_ms = delay.as_millis() as u64, "job waiting for an outage to end");
                    myself.send_after(delay, || JobMsg::Step);
                }
                Err(e) => {
                    state.reset();
                    let run = state.run();
                    run.failures += 1;
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
