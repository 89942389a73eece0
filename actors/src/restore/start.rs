//! Before a restore job exists: whether the delete can be restored, the
//! restore already under way for it, and the `dryRun` counts.

use std::collections::HashSet;

use bson::{oid::ObjectId, DateTime};
use futures::TryStreamExt;
use serde::Serialize;

use crate::error::JobError;
use crate::model::{JobKind, JobRecord, JobStatus};
use crate::repo::kept_restore::Child;
use crate::repo::{JobRepo, RestoreRepo};

/// What a restore started now would put back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreCounts {
    /// Contacts whose `_id` is free.
    pub contacts: u64,
    /// Their kept conversations.
    pub conversations: u64,
    /// Their kept messages.
    pub messages: u64,
}

/// The delete `job_id` of `org`, if it can be restored now: `not_found` for
/// a job not of this organisation, `validation_error` for a job that is not a
/// delete, `conflict` while it runs, `gone` for a hard delete or one past its
/// retention.
pub async fn source(
    jobs: &dyn JobRepo,
    org: ObjectId,
    job_id: &str,
) -> Result<JobRecord, JobError> {
    let job = jobs.get(org, job_id).await?;
    if job.kind != JobKind::Delete {
        return Err(crate::ValidationError::new(
            "jobId",
            format!("job {job_id} is an {} job, not a delete", job.kind.as_str()),
        )
        .into());
    }
    if !job.status.is_terminal() {
        return Err(JobError::Conflict(format!(
            "delete {job_id} is still {}: restore it once it has ended",
            job.status.as_str()
        )));
    }
    if job.hard_delete {
        return Err(JobError::Gone(format!(
            "delete {job_id} was a hard delete: it kept nothing to restore"
        )));
    }
    match job.restorable_until {
        Some(until) if until > DateTime::now() => Ok(job),
        Some(until) => Err(JobError::Gone(format!(
            "what delete {job_id} removed was kept until {} and is gone",
            crate::model::rfc3339(until)
        ))),
        None => Err(JobError::Gone(format!(
            "delete {job_id} kept nothing to restore"
        ))),
    }
}

/// The restore of `source` that is pending, running or completed, if any: a
/// second request gets it instead of a new job. Also returns how many restores
/// of it exist, so a new one takes the next `restoreKey`.
pub async fn existing(
    jobs: &dyn JobRepo,
    source: &str,
) -> Result<(Option<JobRecord>, usize), JobError> {
    let all = jobs.restores_of(source).await?;
    let n = all.len();
    let live = all.into_iter().find(|j| {
        matches!(
            j.status,
            JobStatus::Pending | JobStatus::Processing | JobStatus::Completed
        )
    });
    Ok((live, n))
}

/// What a restore of `source` started now would put back: its kept contacts
/// whose `_id` is free (and not restored already), with their kept children,
/// counted a thousand contacts at a time.
pub async fn dry_run(
    repo: &dyn RestoreRepo,
    source: &JobRecord,
) -> Result<RestoreCounts, JobError> {
    let src = source.job_id.as_str();
    let mut counts = RestoreCounts::default();
    let mut after: Option<ObjectId> = None;
    loop {
        let kept = repo.kept_summaries(src, after, 1000).await?;
        let ids: Vec<ObjectId> = kept.iter().map(|k| k.contact).collect();
        let Some(upto) = ids.iter().max().copied() else {
            return Ok(counts);
        };
        let present: HashSet<ObjectId> = repo.taken(source, &ids).await?.into_iter().collect();
        // A contact put back by an earlier restore and deleted since is not put back again.
        let done: HashSet<ObjectId> = repo
            .restores_of(src, &ids)
            .await?
            .iter()
            .filter_map(|e| e.get_object_id("contactId").ok())
            .collect();
        let free: HashSet<ObjectId> = ids
            .iter()
            .copied()
            .filter(|c| !present.contains(c) && !done.contains(c))
            .collect();
        counts.contacts += free.len() as u64;
        let mut spilled = false;
        for k in kept.iter().filter(|k| free.contains(&k.contact)) {
            counts.conversations += k.conversations;
            counts.messages += k.messages;
            spilled |= k.spilled;
        }
        // Children kept apart: only where some bundle says so.
        for (kind, slot) in [
            (Child::Conversation, &mut counts.conversations),
            (Child::Message, &mut counts.messages),
        ] {
            if !spilled {
                continue;
            }
            let mut children = repo.kept_apart(src, kind, after, upto).await?;
            while let Some((contact, _)) = children.try_next().await? {
                if free.contains(&contact) {
                    *slot += 1;
                }
            }
        }
        after = Some(upto);
    }
}

/// The failed or cancelled restores of `source` other than `me`, with their
/// checkpoints: a contact of such a job beyond its checkpoint may be back
/// without all its children, and the next restore finishes it.
pub(super) async fn unfinished(
    jobs: &dyn JobRepo,
    source: &str,
    me: &str,
) -> Result<super::batch::Unfinished, JobError> {
    Ok(jobs
        .restores_of(source)
        .await?
        .into_iter()
        .filter(|j| j.job_id != me)
        .filter(|j| matches!(j.status, JobStatus::Failed | JobStatus::Cancelled))
        .map(|j| (j.job_id, j.checkpoint.last_id))
        .collect())
}
