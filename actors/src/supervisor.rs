//! The supervisor: spawns one actor per job, caps how many run (globally and per
//! organisation), restarts failed job actors with backoff from their last
//! checkpoint, fails a job after bounded attempts, and resumes unheld jobs it
//! finds in the job repository (at start-up and on every scan tick).
//!
//! An attempt is spent only by a job actor that failed on its own work; a
//! drain, a takeover or an outage costs none. The scan looks organisation by
//! organisation (the one waiting longest first, a few jobs each), so one
//! organisation's backlog cannot hide another's jobs. Which actor runs a job
//! of each kind is a [`JobKinds`] seam: the service uses [`Actors`], the unit
//! tests (`supervisor/tests.rs`) scripted steps on the in-memory repository.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bson::oid::ObjectId;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde::Serialize;

use crate::job::{backoff, JobEnv, JobMsg};
pub use crate::kinds::{Actors, JobKinds};
use crate::model::JobRecord;
use crate::repo::{Ending, Lease};

mod cleanup;

/// Limits on running jobs.
#[derive(Debug, Clone)]
pub struct Caps {
    /// Jobs running at once on this instance.
    pub max_running: usize,
    /// Jobs of one organisation running at once on this instance.
    pub max_per_org: usize,
    /// How often the database is scanned for jobs to start or take over.
    pub scan_interval: Duration,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            max_running: 8,
            max_per_org: 2,
            scan_interval: Duration::from_secs(2),
        }
    }
}

/// Messages of the supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// A job was just created: start it if a slot is free.
    Start(String),
    /// Cancel a job if it runs here (the record already says so).
    Cancel(String),
    /// Look for pending or orphaned jobs.
    Scan,
    /// Stop every job at its batch boundary, leaving them resumable; replies when all stopped.
    Drain(RpcReplyPort<()>),
    /// Reply with the counters.
    Counters(RpcReplyPort<SupervisorCounters>),
}

/// What the supervisor has done; tests read it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SupervisorCounters {
    /// Jobs running now.
    pub running: usize,
    /// Actors spawned.
    pub spawned: u64,
    /// Actors restarted after a failure.
    pub restarts: u64,
    /// Jobs marked failed after exhausting attempts.
    pub failed: u64,
    /// Jobs that ended (any terminal state or drained).
    pub ended: u64,
    /// Scans for jobs to start that ran.
    pub scans: u64,
}

/// The supervisor actor.
pub struct Supervisor {
    kinds: Arc<dyn JobKinds>,
}

impl Supervisor {
    /// The supervisor of the service: export, delete and restore actors.
    pub fn new() -> Supervisor {
        Supervisor::with_kinds(Arc::new(Actors))
    }

    /// A supervisor running jobs with `kinds` (tests script their own).
    pub fn with_kinds(kinds: Arc<dyn JobKinds>) -> Supervisor {
        Supervisor { kinds }
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

struct Running {
    job_id: String,
    org: ObjectId,
    actor: ActorRef<JobMsg>,
    lease: Lease,
}

/// Supervisor state.
pub struct SupervisorState {
    env: JobEnv,
    kinds: Arc<dyn JobKinds>,
    caps: Caps,
    running: HashMap<ActorId, Running>,
    draining: Option<Vec<RpcReplyPort<()>>>,
    counters: SupervisorCounters,
    /// Jobs restarting after a failure, and when their backoff ends: until
    /// then the scan leaves them alone here.
    backoff: HashMap<String, tokio::time::Instant>,
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = (JobEnv, Caps);

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        (env, caps): (JobEnv, Caps),
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let _ = myself.send_message(SupervisorMsg::Scan);
        myself.send_interval(caps.scan_interval, || SupervisorMsg::Scan);
        Ok(SupervisorState {
            env,
            kinds: self.kinds.clone(),
            caps,
            running: HashMap::new(),
            draining: None,
            counters: SupervisorCounters::default(),
            backoff: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Start(job_id) => {
                if let Err(e) = try_start(&myself, state, &job_id).await {
                    tracing::warn!(job_id, error = %e, "job not started");
                }
            }
            SupervisorMsg::Cancel(job_id) => {
                if let Some(r) = state.running.values().find(|r| r.job_id == job_id) {
                    let _ = r.actor.send_message(JobMsg::Cancel);
                }
            }
            SupervisorMsg::Scan => scan(&myself, state).await,
            SupervisorMsg::Drain(reply) => {
                let mut waiting = state.draining.take().unwrap_or_default();
                waiting.push(reply);
                for r in state.running.values() {
                    let _ = r.actor.send_message(JobMsg::Drain);
                }
                if state.running.is_empty() {
                    for w in waiting {
                        let _ = w.send(());
                    }
                    state.draining = Some(Vec::new());
                } else {
                    state.draining = Some(waiting);
                }
            }
            SupervisorMsg::Counters(reply) => {
                let mut c = state.counters.clone();
                c.running = state.running.len();
                let _ = reply.send(c);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(r) = state.running.remove(&cell.get_id()) {
                    crate::metrics::job_running_stopped();
                    state.counters.ended += 1;
                    tracing::debug!(job_id = r.job_id, reason = ?reason, "job actor ended");
                }
                after_exit(&myself, state);
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(r) = state.running.remove(&cell.get_id()) {
                    crate::metrics::job_running_stopped();
                    on_failure(&myself, state, &r.job_id, &r.lease, err.to_string()).await;
                }
                after_exit(&myself, state);
            }
            _ => {}
        }
        Ok(())
    }
}

fn after_exit(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState) {
    if let Some(waiting) = state.draining.as_mut() {
        if state.running.is_empty() {
            for w in waiting.drain(..) {
                let _ = w.send(());
            }
        }
        return;
    }
    // A slot is free: fill it without waiting for the next tick.
    let _ = myself.send_message(SupervisorMsg::Scan);
}

/// A job actor gave up on its own work: count the attempt and restart it
/// after a backoff, or fail the job for good once its attempts are spent.
async fn on_failure(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    job_id: &str,
    lease: &Lease,
    error: String,
) {
    let env = &state.env;
    let record = match env.jobs.get_any(job_id).await {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(e) => {
            // The lease will expire and a scan will pick the job up again.
            tracing::warn!(job_id, error = %e, "failed job not inspected");
            return;
        }
    };
    if record.attempts >= env.settings.max_attempts {
        tracing::error!(job_id, attempts = record.attempts, error, "job failed");
        let message = format!("gave up after {} attempts: {error}", record.attempts);
        match env
            .jobs
            .finish(job_id, lease, &Ending::Failed(message))
            .await
        {
            Ok(job) => {
                // What the job had decided on but not done goes back (a
                // delete's undeleted contacts, an export's partial file)
                // before the failure is announced. The record owes it until
                // then: if this instance dies or meets an outage here, a
                // later scan does it (`cleanup.rs`).
                if let Err(e) = cleanup::clean_up(env, state.kinds.as_ref(), Some(job_id)).await {
                    tracing::warn!(job_id, error = %e, "failed job not cleaned up yet");
                }
                crate::metrics::job_finished(job.kind.as_str(), job.status.as_str());
                state.counters.failed += 1;
                let _ = env
                    .sink
                    .job_event(crate::events::JobEventKind::Status, &job)
                    .await;
            }
            Err(e) => tracing::warn!(job_id, error = %e, "failed job not recorded"),
        }
        return;
    }
    let counted = match env.jobs.count_failure(job_id, lease, &error).await {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(job_id, error = %e, "failure not counted");
            return;
        }
    };
    let delay = backoff(
        env.settings.restart_backoff,
        counted.attempts.max(2) as u32 - 2,
        Duration::from_secs(30),
    );
    tracing::warn!(
        job_id,
        attempts = counted.attempts,
        error,
        restart_in_ms = delay.as_millis() as u64,
        "job actor failed, restarting"
    );
    state.counters.restarts += 1;
    let job_id = job_id.to_string();
    state
        .backoff
        .insert(job_id.clone(), tokio::time::Instant::now() + delay);
    myself.send_after(delay, move || SupervisorMsg::Start(job_id));
}

/// Organisations looked at per scan.
const SCAN_ORGS: i64 = 256;

async fn scan(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState) {
    if state.draining.is_some() {
        return;
    }
    cleanup::sweep(&state.env, state.kinds.as_ref()).await;
    if state.running.len() >= state.caps.max_running {
        return;
    }
    state.counters.scans += 1;
    let now = tokio::time::Instant::now();
    state.backoff.retain(|_, until| *until > now);
    if let Err(e) = state.env.jobs.sync_clock().await {
        tracing::debug!(error = %e, "database clock not read");
    }
    let orgs = match state.env.jobs.resumable_orgs(SCAN_ORGS).await {
        Ok(orgs) => orgs,
        Err(e) => {
            tracing::warn!(error = %e, "scan for jobs failed");
            return;
        }
    };
    for org in orgs {
        if state.running.len() >= state.caps.max_running {
            break;
        }
        let free = state
            .caps
            .max_per_org
            .saturating_sub(state.running.values().filter(|r| r.org == org).count());
        if free == 0 {
            continue;
        }
        let found = match state.env.jobs.resumable_of(org, free as i64).await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, "scan for jobs failed");
                return;
            }
        };
        for job in found {
            if let Err(e) = start_record(myself, state, job).await {
                tracing::warn!(error = %e, "job not started");
            }
        }
    }
}

async fn try_start(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    job_id: &str,
) -> Result<(), ActorProcessingErr> {
    if state.draining.is_some() {
        return Ok(());
    }
    match state.env.jobs.get_any(job_id).await? {
        Some(job) if !job.status.is_terminal() => start_record(myself, state, job).await,
        _ => Ok(()),
    }
}

async fn start_record(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    job: JobRecord,
) -> Result<(), ActorProcessingErr> {
    if state.running.values().any(|r| r.job_id == job.job_id) {
        return Ok(());
    }
    if let Some(until) = state.backoff.get(&job.job_id) {
        if tokio::time::Instant::now() < *until {
            // Restarting after a failure: its `Start` comes when the backoff ends.
            return Ok(());
        }
        state.backoff.remove(&job.job_id);
    }
    let org_running = state
        .running
        .values()
        .filter(|r| r.org == job.org_id)
        .count();
    if state.running.len() >= state.caps.max_running || org_running >= state.caps.max_per_org {
        // Stays pending; a later scan starts it when a slot frees up.
        return Ok(());
    }
    let env = &state.env;
    let Some(job) = env
        .jobs
        .acquire(&job.job_id, &env.instance, env.settings.lease_ttl)
        .await?
    else {
        return Ok(());
    };
    let org = job.org_id;
    let job_id = job.job_id.clone();
    tracing::info!(
        job_id,
        kind = job.kind.as_str(),
        attempt = job.attempts,
        "starting job actor"
    );
    let lease = Lease {
        owner: env.instance.clone(),
        epoch: job.lease_epoch,
    };
    let spawned = state.kinds.spawn(env.clone(), job, myself.get_cell()).await;
    let actor = match spawned {
        Ok(actor) => actor,
        Err(e) => {
            // The job could not even start: a failure of its own, like any other.
            on_failure(myself, state, &job_id, &lease, e.to_string()).await;
            return Ok(());
        }
    };
    state.counters.spawned += 1;
    crate::metrics::job_running_started();
    state.running.insert(
        actor.get_id(),
        Running {
            job_id,
            org,
            actor,
            lease,
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests;
