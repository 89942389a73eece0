//! The restore actor: one per restore job; each `Step` puts back one batch of
//! the contacts a delete kept (`kept`), in contact `_id` order.
//!
//! A batch (`batch.rs`) goes through steps that are safe to stop after at any
//! point, and are all redone from the last checkpoint after a crash:
//! 1. read the next kept contacts of the delete after the checkpoint;
//! 2. decide: of those whose `_id` does not exist now, write one
//!    `event_logs` CONTACT_RESTORE entry each, unique per delete and contact
//!    (`restore:<deleteJobId>:<contactId>`), so no contact is ever restored
//!    twice; the batch's restored contacts are this job's entries, the rest
//!    are skipped;
//! 3. free the delete's audit key of each restored contact, so that a later
//!    delete can take it again;
//! 4. insert the contacts (their kept documents, byte for byte; unordered,
//!    so one that exists already is a duplicate key and stays as it is), then
//!    their conversations and messages: no child is ever back before its contact;
//! 5. notify assignees (`contacts_restored`, one per assignee and job) and,
//!    beside it, publish `contact_restored` (deduplicated by `Nats-Msg-Id`);
//! 6. checkpoint: last id and counts, as absolute values (a repeated write
//!    cannot count twice).
//!
//! Steps 4–5 of a batch run in the background while the next batch is read
//! and decided (1–3: other contacts, so the order does not matter), keeping
//! both server cores busy; a batch is checkpointed once it is put back, so
//! after a crash both are redone from the last checkpoint.
//!
//! The kept documents do not change, so a batch redone after a crash is the
//! same batch: its entries find the contacts it decided on, and every insert
//! that already happened is a duplicate key. A restore that fails for good
//! may leave the contacts of its last batch back without all their children;
//! the next restore of the same delete finishes them: it takes over the
//! entries an ended restore left beyond its checkpoint (`adoptedFrom`) and
//! puts back what is missing (duplicates are left as they are).

mod batch;
pub use crate::repo::kept;
mod start;

use std::sync::Arc;

use bson::{oid::ObjectId, DateTime};
use tokio::task::JoinHandle;

pub use start::{dry_run, existing, source, RestoreCounts};

use crate::error::JobError;
use crate::job::{JobActor, JobEnv, JobRun, JobStep};
use crate::model::{Checkpoint, Counts, JobRecord};
pub use crate::repo::kept_restore::{released_key, restore_key};
use crate::repo::{Ending, JobPatch, RestoreRepo};

/// The restore actor.
pub type RestoreActor = JobActor<RestoreState>;

/// Its state.
pub struct RestoreState {
    run: JobRun,
    /// Contact ids listed per assignee (notifications).
    sampled: crate::delete::Sampled,
    /// Failed or cancelled restores of the same delete (read once).
    unfinished: Option<batch::Unfinished>,
    /// The batch being put back in the background.
    applying: Option<Applying>,
    /// A step failed: the next batch is put back within its step.
    redo: bool,
}

impl JobStep for RestoreState {
    fn start(env: JobEnv, job: JobRecord) -> Result<RestoreState, JobError> {
        if job.source_job_id.is_none() {
            return Err(JobError::Internal(format!(
                "restore job {} without sourceJobId",
                job.job_id
            )));
        }
        Ok(RestoreState {
            run: JobRun::new(env, job),
            sampled: Default::default(),
            unfinished: None,
            applying: None,
            redo: false,
        })
    }

    fn run(&mut self) -> &mut JobRun {
        &mut self.run
    }

    fn reset(&mut self) {
        // A failed step: the batch in the background is redone from the
        // checkpoint.
        self.applying = None;
        self.redo = true;
    }

    async fn step(&mut self) -> Result<bool, JobError> {
        step(self).await
    }

    async fn quiesce(&mut self) {
        // The batch being put back finishes (it is redone from the
        // checkpoint anyway, but must not overlap the next holder's).
        if let Some(applying) = self.applying.take() {
            if let Err(e) = applying.done().await {
                tracing::debug!(job_id = %self.run.job.job_id, error = %e, "restore batch in flight ended with an error");
            }
        }
    }
}

/// The delete a restore job undoes.
fn source_id(job: &JobRecord) -> Result<&str, JobError> {
    job.source_job_id
        .as_deref()
        .ok_or_else(|| JobError::Internal("restore job without sourceJobId".into()))
}

async fn step(s: &mut RestoreState) -> Result<bool, JobError> {
    let run = &mut s.run;
    if !run.job.initialised {
        initialise(run).await?;
    }
    let repo = run.env.crm.restore.clone();
    if run.cancel {
        // The batch being put back is finished first, so a cancelled job never
        // leaves a contact back without its children; likewise a batch a
        // failed step left half done.
        settle(s).await?;
        let run = &mut s.run;
        if repo.restored_after(&run.job).await?.is_empty() {
            run.finish(Ending::Cancelled).await?;
            return Ok(false);
        }
    }
    let run = &mut s.run;
    let src = source_id(&run.job)?.to_string();
    if s.unfinished.is_none() {
        s.unfinished = Some(start::unfinished(run.env.jobs.as_ref(), &src, &run.job.job_id).await?);
    }
    let after = s
        .applying
        .as_ref()
        .map(|a| a.upto)
        .or(run.job.checkpoint.last_id);
    let contacts = repo
        .kept_contacts(&src, after, run.env.settings.restore_batch)
        .await?;
    if contacts.is_empty() {
        settle(s).await?;
        let run = &mut s.run;
        release_undecided(repo.as_ref(), &run.job).await?;
        run.finish(Ending::Completed(None)).await?;
        return Ok(false);
    }
    // This batch is decided while the previous one is put back (other
    // contacts: their order does not matter), so both server cores work.
    let no_unfinished = batch::Unfinished::new();
    let job = run.job.clone();
    let decided = batch::decide(batch::Batch {
        repo: repo.as_ref(),
        job: &job,
        source: &src,
        after,
        contacts,
        unfinished: s.unfinished.as_ref().unwrap_or(&no_unfinished),
    });
    let previous = s.applying.take();
    let previous = async move {
        match previous {
            Some(p) => p.done().await.map(Some),
            None => Ok(None),
        }
    };
    let (decided, done) = run
        .alive(async { futures::try_join!(decided, previous) })
        .await?;
    if let Some(done) = done {
        checkpoint(run, &done).await?;
    }
    let upto = decided.upto;
    let put_back = batch::put_back(
        batch::PutBack {
            repo,
            notifications: run.env.crm.notifications.clone(),
            sink: run.env.sink.clone(),
            job: Arc::new(run.job.clone()),
            source: src,
            sampled: s.sampled.clone(),
        },
        decided,
    );
    if s.redo {
        // After a failed step the batch is put back within the step, so a
        // failure that persists fails steps in a row (and counts).
        let done = run.alive(put_back).await?;
        checkpoint(run, &done).await?;
        s.redo = false;
        return Ok(true);
    }
    let task = tokio::spawn(put_back);
    s.applying = Some(Applying { upto, task });
    Ok(true)
}

/// A batch being put back in the background.
struct Applying {
    /// Its highest contact id.
    upto: ObjectId,
    task: JoinHandle<Result<batch::Done, JobError>>,
}

impl Drop for Applying {
    fn drop(&mut self) {
        // Dropped unfinished (a failed step, a drain): every part of it is
        // idempotent and is redone from the checkpoint.
        self.task.abort();
    }
}

impl Applying {
    async fn done(mut self) -> Result<batch::Done, JobError> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(JobError::Internal(format!("restore batch task: {e}"))),
        }
    }
}

/// Waits for the batch being put back, and checkpoints it.
async fn settle(s: &mut RestoreState) -> Result<(), JobError> {
    if let Some(applying) = s.applying.take() {
        let done = s.run.alive(applying.done()).await?;
        checkpoint(&mut s.run, &done).await?;
    }
    Ok(())
}

/// The checkpoint after a batch: last id and counts, as absolute values from
/// the record as last written (a repeated write cannot count twice).
async fn checkpoint(run: &mut JobRun, done: &batch::Done) -> Result<(), JobError> {
    let job = &run.job;
    let counts = Counts {
        contacts: job.counts.contacts + done.restored,
        conversations: job.counts.conversations + done.conversations,
        messages: job.counts.messages + done.messages,
    };
    let skipped = job.skipped + done.skipped as i64;
    let processed = job.processed + (done.restored + done.skipped) as i64;
    run.update(JobPatch {
        checkpoint: Some(Checkpoint {
            last_id: Some(done.upto),
            ..run.job.checkpoint.clone()
        }),
        counts: Some(counts),
        skipped: Some(skipped),
        processed: Some(processed),
        ..JobPatch::default()
    })
    .await?;
    tracing::debug!(job_id = %run.job.job_id, restored = done.restored, skipped = done.skipped, "restore batch done");
    run.progress_event().await;
    Ok(())
}

/// Counts the kept contacts (`total`) and moves the job to `processing`.
async fn initialise(run: &mut JobRun) -> Result<(), JobError> {
    let repo = run.env.crm.restore.clone();
    let src = source_id(&run.job)?.to_string();
    let count = async { repo.kept_total(&src).await };
    let Some(total) = run.listening(count).await? else {
        return Ok(());
    };
    run.update(JobPatch {
        started_at: Some(DateTime::now()),
        total: Some(Some(total)),
        processed: Some(0),
        skipped: Some(0),
        ..JobPatch::default()
    })
    .await?;
    run.status_event().await;
    tracing::info!(job_id = %run.job.job_id, source_job_id = %src, total, "restore started");
    Ok(())
}

/// Removes this job's CONTACT_RESTORE entries beyond its checkpoint whose
/// contact does not exist: decisions of a batch that never got to put its
/// contacts back (the job failed), so a later restore of the same delete can.
pub async fn release_undecided(repo: &dyn RestoreRepo, job: &JobRecord) -> Result<(), JobError> {
    let ids = repo.restored_after(job).await?;
    if ids.is_empty() {
        return Ok(());
    }
    let present = repo.taken(job, &ids).await?;
    let missing: Vec<ObjectId> = ids.into_iter().filter(|id| !present.contains(id)).collect();
    if !missing.is_empty() {
        tracing::info!(job_id = %job.job_id, contacts = missing.len(), "releasing contacts not restored");
        repo.withdraw_restores(job, &missing).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
