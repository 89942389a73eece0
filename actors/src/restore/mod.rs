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
//! The kept documents do not change, so a batch redone after a crash is the
//! same batch: its entries find the contacts it decided on, and every insert
//! that already happened is a duplicate key.

mod batch;
pub use crate::repo::kept;
mod start;

use bson::{doc, oid::ObjectId, DateTime, Document, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::Database;

pub use start::{dry_run, existing, source, RestoreCounts};

use crate::error::JobError;
use crate::job::{JobActor, JobEnv, JobRun, JobStep};
use crate::model::{Checkpoint, Counts, JobRecord};
use crate::repo::{Ending, JobPatch};
use crate::store::names;

/// The restore actor.
pub type RestoreActor = JobActor<RestoreState>;

/// Its state.
pub struct RestoreState {
    run: JobRun,
    /// Contact ids listed per assignee (notifications).
    sampled: crate::delete::Sampled,
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
        })
    }

    fn run(&mut self) -> &mut JobRun {
        &mut self.run
    }

    fn reset(&mut self) {}

    async fn step(&mut self) -> Result<bool, JobError> {
        step(self).await
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
    let db = run.env.db.clone();
    // A batch a failed step left half done is finished before a cancel lands,
    // so a cancelled job never leaves a contact back without its children.
    if run.cancel && undecided(&db, &run.job).await?.is_empty() {
        run.finish(Ending::Cancelled).await?;
        return Ok(false);
    }
    let src = source_id(&run.job)?.to_string();
    let after = run.job.checkpoint.last_id;
    let contacts: Vec<RawDocumentBuf> = kept::collection(&db)
        .find(kept::range(&src, kept::Kind::Contact, after, None))
        .sort(doc! {"_id": 1})
        .limit(i64::from(run.env.settings.restore_batch.max(1)))
        .await?
        .try_collect()
        .await?;
    if contacts.is_empty() {
        release_undecided(&db, &run.job).await?;
        run.finish(Ending::Completed(None)).await?;
        return Ok(false);
    }
    let started = std::time::Instant::now();
    let done = batch::restore(batch::Batch {
        db: &db,
        notifications: run.env.crm.notifications.as_ref(),
        sink: run.env.sink.as_ref(),
        job: &run.job,
        source: &src,
        after,
        contacts,
        sampled: &s.sampled,
    })
    .await?;
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
    tracing::debug!(job_id = %run.job.job_id, restored = done.restored, skipped = done.skipped, ms = started.elapsed().as_millis() as u64, "restore batch done");
    run.progress_event().await;
    Ok(true)
}

/// Counts the kept contacts (`total`) and moves the job to `processing`.
async fn initialise(run: &mut JobRun) -> Result<(), JobError> {
    let db = run.env.db.clone();
    let src = source_id(&run.job)?.to_string();
    let range = kept::range(&src, kept::Kind::Contact, None, None);
    let count = crate::snapshot::count(&db, names::KEPT, &range, None, None);
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

/// The unique key of a contact's CONTACT_RESTORE entry: one per delete and
/// contact, so whatever restore jobs of that delete run, none puts it back twice.
pub fn restore_key(source: &str, contact: ObjectId) -> String {
    format!("restore:{source}:{}", contact.to_hex())
}

/// Removes this job's CONTACT_RESTORE entries beyond its checkpoint whose
/// contact does not exist: decisions of a batch that never got to put its
/// contacts back (the job failed), so a later restore of the same delete can.
pub async fn release_undecided(db: &Database, job: &JobRecord) -> Result<(), JobError> {
    let Some(src) = job.source_job_id.as_deref() else {
        return Ok(());
    };
    let ids = undecided(db, job).await?;
    if ids.is_empty() {
        return Ok(());
    }
    let entries = db.collection::<Document>(names::EVENT_LOGS);
    let present: Vec<ObjectId> = db
        .collection::<Document>(job.filter.pipeline_type.collection())
        .find(doc! {"_id": {"$in": &ids}})
        .projection(doc! {"_id": 1})
        .await?
        .try_filter_map(|d| async move { Ok(d.get_object_id("_id").ok()) })
        .try_collect()
        .await?;
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !present.contains(id))
        .map(|id| restore_key(src, *id))
        .collect();
    if !missing.is_empty() {
        tracing::info!(job_id = %job.job_id, contacts = missing.len(), "releasing contacts not restored");
        entries
            .delete_many(doc! {"bulkKey": {"$in": missing}, "jobId": &job.job_id})
            .await?;
    }
    Ok(())
}

/// The contacts of this job's CONTACT_RESTORE entries beyond its checkpoint:
/// a batch begun and not checkpointed.
async fn undecided(db: &Database, job: &JobRecord) -> Result<Vec<ObjectId>, JobError> {
    let Some(src) = job.source_job_id.as_deref() else {
        return Ok(Vec::new());
    };
    let lower = match job.checkpoint.last_id {
        Some(after) => format!("{};", restore_key(src, after)),
        None => format!("restore:{src}:"),
    };
    let decided: Vec<Document> = db
        .collection::<Document>(names::EVENT_LOGS)
        .find(doc! {
            "bulkKey": {"$gt": lower, "$lt": format!("restore:{src};")},
            "jobId": &job.job_id,
        })
        .projection(doc! {"contactId": 1})
        .await?
        .try_collect()
        .await?;
    Ok(decided
        .iter()
        .filter_map(|d| d.get_object_id("contactId").ok())
        .collect())
}
