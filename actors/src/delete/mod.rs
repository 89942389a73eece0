//! The delete actor: one per delete job; each `Step` message cascade-deletes one batch.
//!
//! A batch goes through steps that are safe to stop after at any point:
//! 1. take the next candidate ids after the last batch (within the frozen
//!    snapshot) from the job's one cursor;
//! 2. decide: re-read them over the batch's `_id` range and write one
//!    `event_logs` CONTACT_DELETE entry for each that still matches the filter.
//!    The entry is the decision (a contact moved out of the filter before it is
//!    left alone; one after it goes as decided), unique per contact (a contact
//!    another delete job decided on is that job's), and the outbox of what the
//!    batch has to announce; beside it,
//! 3. a hard delete counts their conversations and messages (a delete that
//!    keeps counts them as it keeps them, in 5);
//! 4. record the batch as `inflight` on the job (with the previous batch's
//!    checkpoint, in the same write);
//! 5. keep each contact with its children (unless a hard delete), deleting
//!    the children by `_id` as they are known kept (`repo/keep.rs`), then
//!    delete the contacts (`$in`, idempotent);
//! 6. notify assignees (one document per assignee and job, each batch applied
//!    once) and, beside it, publish `contact_removed` for the batch's entries
//!    (deduplicated by `Nats-Msg-Id`);
//! 7. checkpoint: last id, counts from `inflight`, `inflight` cleared.
//!
//! Steps 5–6 (`cascade`) run in the background while the next `Step` prepares
//! the next batch (1–3, `prepare`, which deletes nothing), so the server's
//! second core is busy; the next batch's `inflight` waits for them. Nothing
//! happens to a contact before its batch is `inflight`, so the entries of a
//! batch that never got there (a crash, a failure, a cancel) are removed again
//! (`release_undecided`), and a resumed job with an `inflight` batch redoes 5–7
//! for it from its entries (its counts are then what was kept for it, each
//! child kept exactly once whatever the crashes).

mod cascade;
mod prepare;

use std::collections::VecDeque;
use std::sync::Arc;

use bson::{oid::ObjectId, DateTime};
use futures::TryStreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) use cascade::{notify, Sampled};

pub use crate::repo::crm_mongo::audit_key;

use crate::error::JobError;
use crate::job::{JobActor, JobEnv, JobRun, JobStep};
use crate::model::{Checkpoint, Counts, DeleteInflight, JobRecord};
use crate::repo::crm::IdStream;
use crate::repo::{Crm, Ending, JobPatch, Pass};

/// The delete actor.
pub type DeleteActor = JobActor<DeleteState>;

/// Its state, built in `pre_start`.
pub struct DeleteState {
    run: JobRun,
    /// Candidate ids in `_id` order, read a batch at a time.
    candidates: Option<IdStream>,
    /// The recorded batches being applied in the background, oldest first: at
    /// most two (`inflight` and `inflightNext` on the record).
    applying: VecDeque<Applying>,
    /// Whether entries of batches that never got recorded have been looked
    /// for since the actor started or a step failed.
    released: bool,
    /// Contact ids listed per assignee (notifications).
    sampled: cascade::Sampled,
}

/// A batch being applied in the background.
struct Applying {
    inflight: DeleteInflight,
    task: JoinHandle<Result<Pass, JobError>>,
    /// Resolves when this batch is fully applied; the next batch's task takes it.
    applied: Option<oneshot::Receiver<()>>,
    /// A hard delete counts children before; a delete that keeps, as it keeps.
    hard_delete: bool,
}

/// The batch's counts: a delete that keeps counts the children as its keep
/// reads them (its `inflight` record has none), a hard delete before.
fn with_kept(mut inflight: DeleteInflight, hard_delete: bool, pass: &Pass) -> DeleteInflight {
    if !hard_delete {
        inflight.conversations = pass.conversations;
        inflight.messages = pass.messages;
    }
    inflight
}

impl Drop for Applying {
    fn drop(&mut self) {
        // Dropped unfinished (a failed step, a drain): every part of it is
        // idempotent and is redone from the record.
        self.task.abort();
    }
}

impl Applying {
    /// Waits for the batch's deletes and announcements.
    async fn done(mut self) -> Result<DeleteInflight, JobError> {
        match (&mut self.task).await {
            Ok(Ok(pass)) => Ok(with_kept(self.inflight.clone(), self.hard_delete, &pass)),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(JobError::Internal(format!("delete batch task: {e}"))),
        }
    }
}

/// Batches recorded and applied at once: one announced while the next is deleted.
const DEPTH: usize = 2;

pub use crate::repo::crm::NOTIFICATION_SAMPLE;

impl JobStep for DeleteState {
    fn start(env: JobEnv, job: JobRecord) -> Result<DeleteState, JobError> {
        Ok(DeleteState {
            run: JobRun::new(env, job),
            candidates: None,
            applying: VecDeque::with_capacity(DEPTH),
            released: false,
            sampled: cascade::Sampled::default(),
        })
    }

    fn run(&mut self) -> &mut JobRun {
        &mut self.run
    }

    fn reset(&mut self) {
        // A failed step may have read ids it never decided on, or decided on
        // some it never recorded: start again from the record.
        self.candidates = None;
        self.applying.clear();
        self.released = false;
    }

    async fn step(&mut self) -> Result<bool, JobError> {
        step(self).await
    }

    async fn quiesce(&mut self) {
        // Deletes and announcements being applied finish (they are redone from
        // the record anyway, but must not overlap the next holder's).
        while let Some(applying) = self.applying.pop_front() {
            if let Err(e) = applying.done().await {
                tracing::debug!(job_id = %self.run.job.job_id, error = %e, "batch in flight ended with an error");
            }
        }
    }
}

async fn step(s: &mut DeleteState) -> Result<bool, JobError> {
    let run = &mut s.run;
    if !run.job.initialised {
        initialise(run).await?;
    } else if !run.job.hard_delete && run.job.restorable_until.is_none() {
        // A job recorded before deletes kept anything: it keeps from now on.
        let until = restorable_until(DateTime::now(), run.env.settings.restore_retention);
        run.update(JobPatch {
            restorable_until: Some(until),
            ..JobPatch::default()
        })
        .await?;
    }
    if s.applying.is_empty() {
        if let Some(inflight) = run.job.inflight.clone() {
            // A batch left by a crash or a failed step: redo it from its entries.
            let crm = run.env.crm.clone();
            let after = run.job.checkpoint.last_id;
            let audits = crm
                .audit
                .recorded(&run.job, after, Some(inflight.upto))
                .await?;
            let redo = cascade::apply(cascade::Batch {
                crm,
                sink: run.env.sink.clone(),
                job: Arc::new(run.job.clone()),
                upto: inflight.upto,
                audits,
                after_previous: None,
                applied: None,
                sampled: s.sampled.clone(),
            });
            run.alive(redo).await?;
            let mut inflight = inflight;
            if !run.job.hard_delete {
                // Part of the batch may have gone before the crash: its counts
                // are what was kept for it (each child kept exactly once).
                let (conversations, messages) = run
                    .env
                    .crm
                    .kept
                    .kept_children(&run.job.job_id, after, inflight.upto)
                    .await?;
                inflight.conversations = conversations;
                inflight.messages = messages;
            }
            let next = run.job.inflight_next.clone();
            record(run, Some(&inflight), next.iter()).await?;
            return Ok(true);
        }
    }
    if !s.released {
        release_held(run).await?;
        s.released = true;
    }
    if run.cancel {
        settle(s).await?;
        let run = &mut s.run;
        release_held(run).await?;
        run.finish(Ending::Cancelled).await?;
        return Ok(false);
    }
    let Some(max_id) = run.job.snapshot_max_id else {
        settle(s).await?;
        return complete(s).await;
    };
    let crm = run.env.crm.clone();
    let after = s
        .applying
        .back()
        .map(|a| a.inflight.upto)
        .or(run.job.checkpoint.last_id);
    let batch = run.env.settings.delete_batch as usize;
    let started = std::time::Instant::now();
    // The next batch is decided and counted while the recorded ones are
    // applied; with the pipeline full, the oldest must finish first.
    let job = run.job.clone();
    let next = prepare::prepare(&crm, &job, &mut s.candidates, after, max_id, batch);
    let oldest = match s.applying.len() >= DEPTH {
        true => s.applying.pop_front(),
        false => None,
    };
    let previous = async move {
        match oldest {
            Some(applying) => applying.done().await.map(Some),
            None => Ok(None),
        }
    };
    // One long await (the oldest batch's cascade can take a while): the lease
    // is renewed meanwhile.
    let (next, done) = run
        .alive(async { futures::try_join!(next, previous) })
        .await?;
    if next.is_some()
        && run.job.processed > 0
        && crate::failpoint::fires(
            crate::failpoint::DELETE_STEP_FAILS,
            &run.job.org_id.to_hex(),
        )
    {
        return Err(JobError::Internal("injected failure".into()));
    }
    let Some(next) = next else {
        if let Some(done) = done {
            record(run, Some(&done), in_flight(&s.applying)).await?;
        }
        settle(s).await?;
        return complete(s).await;
    };
    let recorded = in_flight(&s.applying).chain(std::iter::once(&next.inflight));
    record(run, done.as_ref(), recorded).await?;
    tracing::debug!(job_id = %run.job.job_id, contacts = next.inflight.contacts, prepare_ms = started.elapsed().as_millis() as u64, "delete batch recorded");
    let (tell, applied) = oneshot::channel();
    let task = tokio::spawn(cascade::apply(cascade::Batch {
        crm,
        sink: run.env.sink.clone(),
        job: Arc::new(run.job.clone()),
        upto: next.inflight.upto,
        audits: next.audits,
        after_previous: s.applying.back_mut().and_then(|a| a.applied.take()),
        applied: Some(tell),
        sampled: s.sampled.clone(),
    }));
    s.applying.push_back(Applying {
        inflight: next.inflight,
        task,
        applied: Some(applied),
        hard_delete: run.job.hard_delete,
    });
    Ok(true)
}

/// The batches being applied, oldest first, as the record lists them.
fn in_flight(applying: &VecDeque<Applying>) -> impl Iterator<Item = &DeleteInflight> {
    applying.iter().map(|a| &a.inflight)
}

/// Waits for every batch being applied, oldest first, checkpointing each.
async fn settle(s: &mut DeleteState) -> Result<(), JobError> {
    while let Some(oldest) = s.applying.pop_front() {
        let done = s.run.alive(oldest.done()).await?;
        record(&mut s.run, Some(&done), in_flight(&s.applying)).await?;
    }
    Ok(())
}

/// One write to the job: `done` (a batch applied) checkpointed, and the
/// batches recorded as in flight (`inflight`, then `inflightNext`).
async fn record<'a>(
    run: &mut JobRun,
    done: Option<&DeleteInflight>,
    in_flight: impl Iterator<Item = &'a DeleteInflight>,
) -> Result<(), JobError> {
    let mut slots = in_flight.cloned();
    let mut patch = JobPatch {
        inflight: Some((slots.next(), slots.next())),
        ..JobPatch::default()
    };
    if let Some(done) = done {
        // Absolute values from the record as last written (the write is fenced
        // by the lease, so nobody else moved them): a write that was applied
        // but whose reply was lost is sent again with the same values, and
        // the batch counts once.
        let job = &run.job;
        let counts = job.counts;
        patch.checkpoint = Some(Checkpoint {
            last_id: Some(done.upto),
            ..job.checkpoint.clone()
        });
        patch.processed = Some(job.processed + done.contacts as i64);
        patch.counts = Some(Counts {
            contacts: counts.contacts + done.contacts,
            conversations: counts.conversations + done.conversations,
            messages: counts.messages + done.messages,
        });
    }
    run.update_at(crate::failpoint::DELETE_RECORD_LOST_REPLY, patch)
        .await?;
    if done.is_some() {
        run.progress_event().await;
    }
    Ok(())
}

/// Freezes the snapshot and counts `total`.
async fn initialise(run: &mut JobRun) -> Result<(), JobError> {
    let crm = run.env.crm.clone();
    let job = run.job.clone();
    let max_id = crm.contacts.bound(&job).await?;
    let count = async move { crm.contacts.count(&job, max_id).await };
    // Counting a large organisation takes a while: a cancel meanwhile wins.
    let Some(total) = run.listening(count).await? else {
        return Ok(());
    };
    let now = DateTime::now();
    let mut patch = JobPatch {
        started_at: Some(run.env.jobs.now()),
        snapshot_max_id: Some(max_id),
        total: Some(Some(total)),
        processed: Some(0),
        ..JobPatch::default()
    };
    if !run.job.hard_delete {
        // Everything the job removes is kept until then (one date for the
        // whole job, so its restore is all or nothing in time).
        patch.restorable_until = Some(restorable_until(now, run.env.settings.restore_retention));
    }
    run.update(patch).await?;
    run.status_event().await;
    tracing::info!(job_id = %run.job.job_id, total, "delete started");
    Ok(())
}

/// `now` plus the retention.
fn restorable_until(now: DateTime, retention: std::time::Duration) -> DateTime {
    let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(now.timestamp_millis().saturating_add(ms))
}

/// [`release_undecided`] by the holder of the job: the lease is confirmed (a
/// fenced write) right before, so a holder that lost it while paused cannot
/// give back contacts the new holder has recorded as in flight.
async fn release_held(run: &mut JobRun) -> Result<(), JobError> {
    run.update(JobPatch::default()).await?;
    release_undecided(&run.env.crm, &run.job).await
}

/// Removes this job's CONTACT_DELETE entries beyond its checkpoint whose
/// contact still exists: decisions of batches that never got to delete (a crash
/// or failure before `inflight`, a cancel), so the contacts are anyone's again.
/// Their children are intact: nothing is deleted before a batch is `inflight`.
/// Called for a failed job too, where it also gives back what its unfinished
/// batch had not deleted yet, its kept children put back first.
pub async fn release_undecided(crm: &Crm, job: &JobRecord) -> Result<(), JobError> {
    let after = job.checkpoint.last_id;
    let decided = crm.audit.decided_after(job, after).await?;
    let mut chunks = decided.try_chunks(1000);
    while let Some(ids) = chunks.try_next().await.map_err(|e| e.1)? {
        let present: Vec<ObjectId> = crm.contacts.present(job, &ids).await?;
        if !present.is_empty() {
            tracing::info!(job_id = %job.job_id, contacts = present.len(), "releasing undeleted contacts");
            // A batch given back after its keep deleted some children (a job
            // failing for good mid-keep): those children come back before the
            // contact is anyone's again, or it would live on without them.
            if !job.hard_delete {
                let (v, m) = crm.kept.put_back_children(job, &present).await?;
                if v + m > 0 {
                    tracing::info!(job_id = %job.job_id, conversations = v, messages = m, "children put back");
                }
            }
            crm.audit.withdraw(job, &present).await?;
        }
    }
    Ok(())
}

async fn complete(s: &mut DeleteState) -> Result<bool, JobError> {
    let run = &mut s.run;
    release_held(run).await?;
    run.finish(Ending::Completed(None)).await?;
    Ok(false)
}

#[cfg(test)]
mod tests;
