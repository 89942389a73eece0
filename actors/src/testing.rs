//! Unit-test kit: a job environment on the in-memory repositories, a sink that
//! records events, scripted job steps, and waits on tokio's paused clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bson::oid::ObjectId;
use futures::future::BoxFuture;
use ractor::{Actor, ActorCell, ActorRef, SpawnErr};

use crate::error::JobError;
use crate::events::{EventSink, JobEventKind, RemovedContact, RestoredContact};
use crate::filter::Filter;
use crate::job::{JobActor, JobEnv, JobMsg, JobRun, JobSettings, JobStep};
use crate::kinds::JobKinds;
use crate::model::{JobKind, JobRecord, JobStatus};
use crate::repo::{Crm, Ending, JobPatch, JobRepo, MemChunks, MemCrm, MemJobs};

/// One event the sink got: kind, status and `processed` of the snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub kind: JobEventKind,
    pub job_id: String,
    pub status: JobStatus,
    pub processed: i64,
}

/// An [`EventSink`] that keeps what it is given.
#[derive(Debug, Default)]
pub struct RecordingSink {
    pub events: Mutex<Vec<Seen>>,
    pub removed: Mutex<Vec<RemovedContact>>,
    pub restored: Mutex<Vec<RestoredContact>>,
}

impl RecordingSink {
    /// The status events of one job, in order.
    pub fn statuses(&self, job_id: &str) -> Vec<JobStatus> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e.job_id == job_id && e.kind == JobEventKind::Status)
            .map(|e| e.status)
            .collect()
    }
}

impl EventSink for RecordingSink {
    fn job_event(
        &self,
        kind: JobEventKind,
        job: &JobRecord,
    ) -> BoxFuture<'_, Result<(), JobError>> {
        self.events.lock().unwrap().push(Seen {
            kind,
            job_id: job.job_id.clone(),
            status: job.status,
            processed: job.processed,
        });
        Box::pin(async { Ok(()) })
    }

    fn contacts_removed<'a>(
        &'a self,
        removed: &'a [RemovedContact],
    ) -> BoxFuture<'a, Result<(), JobError>> {
        self.removed.lock().unwrap().extend_from_slice(removed);
        Box::pin(async { Ok(()) })
    }

    fn contacts_restored<'a>(
        &'a self,
        restored: &'a [RestoredContact],
    ) -> BoxFuture<'a, Result<(), JobError>> {
        self.restored.lock().unwrap().extend_from_slice(restored);
        Box::pin(async { Ok(()) })
    }
}

/// Settings of the unit tests: short lease, quick retries.
pub fn settings() -> JobSettings {
    JobSettings {
        lease_ttl: Duration::from_secs(10),
        step_retries: 2,
        retry_max: Duration::from_secs(2),
        max_attempts: 3,
        restart_backoff: Duration::from_millis(500),
        progress_interval: Duration::ZERO,
        ..JobSettings::default()
    }
}

/// The environment of instance `instance` over `jobs` (and empty CRM data).
pub fn env(jobs: &MemJobs, instance: &str, sink: Arc<RecordingSink>) -> JobEnv {
    env_with(jobs, &MemCrm::new(), instance, sink)
}

/// The environment of instance `instance` over `jobs` and `crm`.
pub fn env_with(jobs: &MemJobs, crm: &MemCrm, instance: &str, sink: Arc<RecordingSink>) -> JobEnv {
    env_full(jobs, crm, &MemChunks::new(), instance, sink)
}

/// The environment of instance `instance` over `jobs`, `crm` and `chunks`.
pub fn env_full(
    jobs: &MemJobs,
    crm: &MemCrm,
    chunks: &MemChunks,
    instance: &str,
    sink: Arc<RecordingSink>,
) -> JobEnv {
    JobEnv {
        jobs: Arc::new(jobs.clone()),
        crm: Crm::of(Arc::new(crm.clone())),
        export: Arc::new(crate::repo::MemExport::new()),
        artifacts: Arc::new(chunks.clone()),
        sink,
        settings: settings(),
        instance: instance.to_string(),
    }
}

/// A pending export record of `org`.
pub fn pending(org: ObjectId) -> JobRecord {
    JobRecord::new(JobKind::Export, org, None, None, Filter::default(), None)
}

/// Waits (on tokio's clock, paused or not) until `done` holds, at most `secs`.
pub async fn until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a scripted job does: `batches` steps of `batch_time` each, after a
/// start-up step; the next `fails` steps fail as errors of its own work
/// (`u32::MAX`: every step).
#[derive(Debug)]
pub struct Plan {
    pub batches: i64,
    pub batch_time: Duration,
    pub fails: AtomicU32,
    /// Batches run: (instance, lease epoch, batch index).
    pub ran: Mutex<Vec<(String, i64, i64)>>,
    /// Actor starts: (instance, time since the plan was made).
    pub starts: Mutex<Vec<(String, Duration)>>,
    made: tokio::time::Instant,
}

impl Plan {
    /// A plan of `batches` batches of `batch_time`.
    pub fn new(batches: i64, batch_time: Duration) -> Arc<Plan> {
        Arc::new(Plan {
            batches,
            batch_time,
            fails: AtomicU32::new(0),
            ran: Mutex::new(Vec::new()),
            starts: Mutex::new(Vec::new()),
            made: tokio::time::Instant::now(),
        })
    }

    /// The batch indexes run, in order.
    pub fn batches_run(&self) -> Vec<i64> {
        self.ran.lock().unwrap().iter().map(|r| r.2).collect()
    }
}

fn plans() -> &'static Mutex<HashMap<String, Arc<Plan>>> {
    static PLANS: OnceLock<Mutex<HashMap<String, Arc<Plan>>>> = OnceLock::new();
    PLANS.get_or_init(Default::default)
}

/// Runs `job` by `plan` (jobs without a plan complete at once).
pub fn script(job: &JobRecord, plan: Arc<Plan>) {
    plans().lock().unwrap().insert(job.job_id.clone(), plan);
}

/// A job step following its [`Plan`].
pub struct Scripted {
    run: JobRun,
    plan: Arc<Plan>,
}

impl JobStep for Scripted {
    fn start(env: JobEnv, job: JobRecord) -> Result<Self, JobError> {
        let plan = plans()
            .lock()
            .unwrap()
            .get(&job.job_id)
            .cloned()
            .unwrap_or_else(|| Plan::new(0, Duration::ZERO));
        plan.starts
            .lock()
            .unwrap()
            .push((env.instance.clone(), plan.made.elapsed()));
        Ok(Scripted {
            run: JobRun::new(env, job),
            plan,
        })
    }

    fn run(&mut self) -> &mut JobRun {
        &mut self.run
    }

    fn reset(&mut self) {}

    async fn step(&mut self) -> Result<bool, JobError> {
        let run = &mut self.run;
        if run.cancel {
            run.finish(Ending::Cancelled).await?;
            return Ok(false);
        }
        if !run.job.initialised {
            run.update(JobPatch {
                started_at: Some(run.env.jobs.now()),
                total: Some(Some(self.plan.batches)),
                processed: Some(0),
                ..JobPatch::default()
            })
            .await?;
            run.status_event().await;
            return Ok(true);
        }
        let done = run.job.processed;
        if done >= self.plan.batches {
            run.finish(Ending::Completed(None)).await?;
            return Ok(false);
        }
        let fails = &self.plan.fails;
        if fails
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u32::MAX => Some(u32::MAX),
                n => Some(n - 1),
            })
            .is_ok()
        {
            return Err(JobError::Internal("scripted failure".into()));
        }
        tokio::time::sleep(self.plan.batch_time).await;
        self.plan
            .ran
            .lock()
            .unwrap()
            .push((run.env.instance.clone(), run.lease.epoch, done));
        run.update(JobPatch {
            processed: Some(done + 1),
            ..JobPatch::default()
        })
        .await?;
        run.progress_event().await;
        Ok(true)
    }
}

/// Job kinds whose every job runs a [`Scripted`] step.
#[derive(Debug, Default)]
pub struct ScriptedKinds {
    /// Jobs abandoned after failing for good.
    pub abandoned: Mutex<Vec<String>>,
    /// Clean-ups still to fail before they work (as in an outage).
    pub abandon_failures: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl JobKinds for ScriptedKinds {
    async fn spawn(
        &self,
        env: JobEnv,
        job: JobRecord,
        supervisor: ActorCell,
    ) -> Result<ActorRef<JobMsg>, SpawnErr> {
        let (actor, _) =
            Actor::spawn_linked(None, JobActor::<Scripted>::new(), (env, job), supervisor).await?;
        Ok(actor)
    }

    async fn abandon(&self, _env: &JobEnv, job: &JobRecord) -> Result<(), JobError> {
        use std::sync::atomic::Ordering;
        let failing = self
            .abandon_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(JobError::Unavailable {
                service: crate::error::Dependency::Mongodb,
                message: "clean-up met an outage".into(),
            });
        }
        self.abandoned.lock().unwrap().push(job.job_id.clone());
        Ok(())
    }
}

/// Stores `job` in `jobs` and returns it.
pub async fn stored(jobs: &MemJobs, job: JobRecord) -> JobRecord {
    jobs.create(job).await.expect("create").0
}
