//! Which actor runs each kind of job, and what a job that failed for good gives back.
//!
//! The supervisor reaches the job actors only through [`JobKinds`], so its
//! scheduling and restart policy are unit-tested with scripted job steps.

use async_trait::async_trait;
use ractor::{Actor, ActorCell, ActorRef, SpawnErr};

use crate::delete::DeleteActor;
use crate::error::JobError;
use crate::export::ExportActor;
use crate::job::{JobEnv, JobMsg};
use crate::model::{JobKind, JobRecord};
use crate::restore::RestoreActor;

/// How the supervisor starts and abandons jobs.
#[async_trait]
pub trait JobKinds: Send + Sync + 'static {
    /// Spawns the actor of `job` (already leased), linked to `supervisor`.
    async fn spawn(
        &self,
        env: JobEnv,
        job: JobRecord,
        supervisor: ActorCell,
    ) -> Result<ActorRef<JobMsg>, SpawnErr>;

    /// After `job` was marked failed for good: gives back what it had decided
    /// on but not done.
    async fn abandon(&self, env: &JobEnv, job: &JobRecord) -> Result<(), JobError>;
}

/// The service's job actors: export, delete and restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct Actors;

#[async_trait]
impl JobKinds for Actors {
    async fn spawn(
        &self,
        env: JobEnv,
        job: JobRecord,
        supervisor: ActorCell,
    ) -> Result<ActorRef<JobMsg>, SpawnErr> {
        let args = (env, job);
        let (actor, _) = match args.1.kind {
            JobKind::Export => {
                Actor::spawn_linked(None, ExportActor::new(), args, supervisor).await?
            }
            JobKind::Delete => {
                Actor::spawn_linked(None, DeleteActor::new(), args, supervisor).await?
            }
            JobKind::Restore => {
                Actor::spawn_linked(None, RestoreActor::new(), args, supervisor).await?
            }
        };
        Ok(actor)
    }

    async fn abandon(&self, env: &JobEnv, job: &JobRecord) -> Result<(), JobError> {
        match job.kind {
            // The contacts its unfinished batches had not deleted go back
            // to being anyone's: a later job may delete them.
            JobKind::Delete => crate::delete::release_undecided(&env.crm, job).await,
            // No file will ever be read.
            JobKind::Export => env.artifacts.remove_from(&job.job_id, 0).await.map(drop),
            // Likewise the contacts a restore decided on but did not put
            // back: a later restore of the same delete puts them back.
            JobKind::Restore => {
                crate::restore::release_undecided(env.crm.restore.as_ref(), job).await
            }
        }
    }
}
