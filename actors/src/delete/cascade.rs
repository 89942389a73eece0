//! Steps 4–6 of a delete batch, once its audit entries (the decision) and its
//! `inflight` record are written: delete, notify, announce. The checkpoint that
//! ends the batch is written by the actor (`mod.rs`). Every step is idempotent,
//! so a batch is finished after a crash by running them again from its entries.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bson::oid::ObjectId;
use tokio::sync::oneshot;

use super::NOTIFICATION_SAMPLE;
use crate::error::JobError;
use crate::events::{EventSink, RemovedContact};
use crate::model::JobRecord;
use crate::repo::{Crm, Decision, NotificationRepo, Pass};

/// One batch to apply: the contacts of `audits` (this job's CONTACT_DELETE
/// entries for the batch), up to `upto`.
pub(super) struct Batch {
    pub crm: Crm,
    pub sink: Arc<dyn EventSink>,
    pub job: Arc<JobRecord>,
    pub upto: ObjectId,
    pub audits: Vec<Decision>,
    /// Resolves once the previous batch is fully applied: notifications count
    /// batches in order, and a batch is announced after the one before it.
    pub after_previous: Option<oneshot::Receiver<()>>,
    /// Told once this batch is fully applied.
    pub applied: Option<oneshot::Sender<()>>,
    /// Contact ids listed so far per assignee by this actor.
    pub sampled: Sampled,
}

/// Contact ids this actor has put in each assignee's notification. Once an
/// assignee's sample is full, later batches skip the `$push` (which rewrites the
/// list for nothing); after a restart it starts empty and the `$slice` keeps
/// the list right.
pub(crate) type Sampled = Arc<Mutex<HashMap<ObjectId, usize>>>;

/// Deletes, notifies and announces one batch. Returns what it kept and
/// deleted (a delete that keeps; a hard delete counted the children before).
pub(super) async fn apply(batch: Batch) -> Result<Pass, JobError> {
    let Batch {
        crm,
        sink,
        job,
        upto,
        audits,
        after_previous,
        applied,
        sampled,
    } = batch;
    let mut laps = Laps::started();
    let ids: Vec<ObjectId> = audits.iter().map(|a| a.contact).collect();
    let org = job.org_id;
    let mut kept = Pass::default();
    if !ids.is_empty() {
        // Children first, so no message or conversation ever outlives its contact.
        // Messages and conversations go together: the contacts, deleted only after
        // both, keep the children's contact alive until they are gone.
        if job.hard_delete {
            crm.contacts.delete_children_of(org, &ids).await?;
        } else {
            // Kept first, each child deleted once it is known kept (see
            // `repo/keep.rs`): a crash anywhere leaves what was deleted kept,
            // and a batch redone keeps what is left. A child written for one
            // of these contacts after the keep read it is caught by the next
            // pass, so none is left behind without its contact.
            loop {
                crate::failpoint::hit("delete.keep");
                let pass = crm.kept.keep(&job, &ids).await?;
                laps.lap("keep");
                kept.conversations += pass.conversations;
                kept.messages += pass.messages;
                kept.contacts.extend(pass.contacts);
                let left = match pass.left {
                    Some(left) => left,
                    None => crm.contacts.children_left(org, &ids).await?,
                };
                if !left {
                    break;
                }
            }
            kept.contacts.sort_unstable();
            kept.contacts.dedup();
        }
        crate::failpoint::hit("delete.children");
        if crate::failpoint::fires(crate::failpoint::DELETE_AFTER_KEEP_FAILS, &org.to_hex()) {
            return Err(JobError::Internal("injected failure".into()));
        }
        laps.lap("children");
        // The audit entry is the decision: the contact goes even if it left the
        // filter since (its children already may have). A delete that keeps
        // deletes the contacts it kept.
        let doomed = match job.hard_delete {
            true => &ids,
            false => &kept.contacts,
        };
        if !doomed.is_empty() {
            crm.contacts.delete(&job, doomed).await?;
        }
        crate::failpoint::hit("delete.contacts");
    }
    laps.lap("contacts");
    if let Some(previous) = after_previous {
        previous
            .await
            .map_err(|_| JobError::Internal("the previous delete batch was not applied".into()))?;
    }
    laps.lap("previous");

    // Notifications in MongoDB and `contact_removed` in JetStream go to
    // different servers, so they overlap. A crash after either is safe: the
    // notification skips a batch it has, the stream drops a repeated
    // `Nats-Msg-Id`, and only the checkpoint ends the batch.
    futures::try_join!(
        notify(
            crm.notifications.as_ref(),
            &job,
            "contacts_removed",
            upto,
            &audits,
            &sampled
        ),
        announce(sink.as_ref(), &job, &audits),
    )?;
    laps.lap("notify+announce");
    tracing::debug!(job_id = %job.job_id, laps = %laps, "delete batch applied");
    if let Some(applied) = applied {
        // The next batch may be gone already (a failed step): nothing to tell.
        let _ = applied.send(());
    }
    Ok(kept)
}

/// One notification per assignee and job (`kind`: `contacts_removed`, or
/// `contacts_restored` for a restore). Batches are applied in `_id` order, so
/// `lastBatch` (the batch's highest id) makes each one count once.
pub(crate) async fn notify(
    notifications: &dyn NotificationRepo,
    job: &JobRecord,
    kind: &'static str,
    upto: ObjectId,
    audits: &[Decision],
    sampled: &Sampled,
) -> Result<(), JobError> {
    let mut by_owner: BTreeMap<ObjectId, Vec<ObjectId>> = BTreeMap::new();
    for a in audits {
        if let Some(owner) = a.owner {
            by_owner.entry(owner).or_default().push(a.contact);
        }
    }
    let updates = by_owner.into_iter().map(|(owner, contact_ids)| {
        let listed = sampled
            .lock()
            .map(|m| m.get(&owner).copied().unwrap_or(0))
            .unwrap_or(0);
        async move {
            // A sample of the ids, so a huge job cannot outgrow the document
            // size limit; `count` is exact.
            let list = listed < NOTIFICATION_SAMPLE as usize;
            notifications
                .add(job, kind, owner, upto, &contact_ids, list)
                .await?;
            if let Ok(mut m) = sampled.lock() {
                *m.entry(owner).or_default() += contact_ids.len();
            }
            Ok::<_, JobError>(())
        }
    });
    futures::future::try_join_all(updates).await?;
    Ok(())
}

/// Publishes `contact_removed` for the batch's audit entries. A repeat after a
/// crash is deduplicated by the stream (`Nats-Msg-Id: <jobId>:<contactId>`).
async fn announce(
    sink: &dyn EventSink,
    job: &JobRecord,
    audits: &[Decision],
) -> Result<(), JobError> {
    let removed: Vec<RemovedContact> = audits
        .iter()
        .map(|a| RemovedContact {
            org_id: job.org_id,
            contact_id: a.contact,
            job_id: job.job_id.clone(),
            pipeline_type: job.filter.pipeline_type,
            owner_id: a.owner,
            at: a.at,
        })
        .collect();
    if removed.is_empty() {
        return Ok(());
    }
    sink.contacts_removed(&removed).await
}

/// Milliseconds spent in each phase of a batch, for the debug log.
#[derive(Default)]
pub(super) struct Laps {
    start: Option<std::time::Instant>,
    laps: Vec<(&'static str, u128)>,
}

impl Laps {
    pub(super) fn started() -> Laps {
        Laps {
            start: Some(std::time::Instant::now()),
            laps: Vec::new(),
        }
    }

    pub(super) fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        let since = self.start.replace(now).unwrap_or(now);
        self.laps.push((name, (now - since).as_millis()));
    }
}

impl std::fmt::Display for Laps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, ms)) in self.laps.iter().enumerate() {
            write!(f, "{}{name}={ms}ms", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}
