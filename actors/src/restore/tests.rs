//! The restore step on the in-memory repositories and tokio's paused clock: a
//! delete (the real delete step) removes and keeps an organisation's stage,
//! then a restore puts it back. Exact counts and side effects, contacts taken
//! meanwhile skipped, a contact a failed restore left half back finished by the
//! next, a crash at every await (before or after it applied) resumed by
//! another instance, and the dry run's counts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, oid::ObjectId};

use super::{release_undecided, released_key, restore_key, RestoreState};
use crate::delete::{audit_key, DeleteState};
use crate::error::JobError;
use crate::filter::Filter;
use crate::job::JobStep;
use crate::model::{Counts, JobKind, JobRecord, JobStatus};
use crate::repo::{Ending, JobRepo, MemCrm, MemJobs};
use crate::testing::{env_with, RecordingSink};

const CONTACTS: &str = "contacts";

struct World {
    jobs: MemJobs,
    crm: MemCrm,
    /// The contacts the delete removed, with their owner.
    deleted: BTreeMap<ObjectId, ObjectId>,
    /// The delete, completed.
    delete: JobRecord,
    sink: Arc<RecordingSink>,
}

/// `n` contacts in a stage (one conversation and two messages each, two
/// assignees) and a few in another stage, the stage deleted (and kept).
async fn world(n: usize) -> World {
    let (jobs, crm) = (MemJobs::new(), MemCrm::new());
    let org = ObjectId::new();
    let (stage, other) = (ObjectId::new(), ObjectId::new());
    let owners = [ObjectId::new(), ObjectId::new()];
    let mut deleted = BTreeMap::new();
    for i in 0..n + 3 {
        let id = ObjectId::new();
        let (stage, owner) = match i < n {
            true => (stage, owners[i % 2]),
            false => (other, owners[0]),
        };
        crm.insert_contact(
            CONTACTS,
            doc! {"_id": id, "orgId": org, "stageId": stage, "ownerId": owner, "firstName": format!("c{i}")},
        );
        crm.insert_child(
            true,
            doc! {"_id": ObjectId::new(), "orgId": org, "contactId": id},
        );
        for _ in 0..2 {
            crm.insert_child(
                false,
                doc! {"_id": ObjectId::new(), "orgId": org, "contactId": id, "text": "hi"},
            );
        }
        if i < n {
            deleted.insert(id, owner);
        }
    }
    let filter = Filter {
        stage_ids: vec![stage],
        ..Filter::default()
    };
    let job = JobRecord::new(JobKind::Delete, org, None, None, filter, None);
    let job = jobs.create(job).await.unwrap().0;
    let sink = Arc::new(RecordingSink::default());
    let mut env = env_with(&jobs, &crm, "d", sink.clone());
    env.settings.delete_batch = 3;
    let held = jobs
        .acquire(&job.job_id, "d", env.settings.lease_ttl)
        .await
        .unwrap()
        .expect("lease free");
    let mut d = DeleteState::start(env, held).unwrap();
    while d.step().await.unwrap() {}
    let delete = jobs.peek(&job.job_id).unwrap();
    assert_eq!(delete.status, JobStatus::Completed);
    for c in deleted.keys() {
        assert!(crm.contact(CONTACTS, *c).is_none());
    }
    World {
        jobs,
        crm,
        deleted,
        delete,
        sink,
    }
}

/// A new restore of the delete.
async fn restore_job(w: &World, n: usize) -> JobRecord {
    let mut job = JobRecord::new(
        JobKind::Restore,
        w.delete.org_id,
        None,
        None,
        w.delete.filter.clone(),
        None,
    );
    job.source_job_id = Some(w.delete.job_id.clone());
    job.restore_key = Some(format!("{}#{n}", w.delete.job_id));
    w.jobs.create(job).await.unwrap().0
}

/// Instance `name` takes the restore `job` and builds the step.
async fn take(w: &World, job: &JobRecord, name: &str) -> RestoreState {
    let mut env = env_with(&w.jobs, &w.crm, name, w.sink.clone());
    env.settings.restore_batch = 4;
    let held = w
        .jobs
        .acquire(&job.job_id, name, env.settings.lease_ttl)
        .await
        .unwrap()
        .expect("lease free");
    RestoreState::start(env, held).unwrap()
}

/// Runs steps until the job ends (`Ok`) or a step fails (`Err`: the crash).
async fn drive(s: &mut RestoreState) -> Result<(), JobError> {
    for _ in 0..1000 {
        if !s.step().await? {
            return Ok(());
        }
    }
    panic!("the restore never ended");
}

/// What holds at every moment: no child is back without its contact, and no
/// contact is back without its CONTACT_RESTORE entry (but those `taken` by
/// someone else meanwhile).
fn safe(w: &World, taken: &BTreeSet<ObjectId>) {
    let src = &w.delete.job_id;
    for c in w.deleted.keys().filter(|c| !taken.contains(c)) {
        match w.crm.contact(CONTACTS, *c) {
            None => assert_eq!(w.crm.children_of(*c), 0, "a child of {c} is back before it"),
            Some(_) => assert!(
                w.crm.entry(&restore_key(src, *c)).is_some(),
                "{c} is back without its entry"
            ),
        }
    }
}

/// The end state of a completed restore `job` of every deleted contact but
/// `skipped`: exact.
fn exact(w: &World, job: &JobRecord, skipped: &BTreeSet<ObjectId>) {
    safe(w, skipped);
    let job = w.jobs.peek(&job.job_id).unwrap();
    let src = &w.delete.job_id;
    let n = (w.deleted.len() - skipped.len()) as u64;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(
        job.counts,
        Counts {
            contacts: n,
            conversations: n,
            messages: 2 * n
        }
    );
    assert_eq!(job.skipped, skipped.len() as i64);
    assert_eq!(job.processed, w.deleted.len() as i64);
    assert_eq!(job.total, Some(w.deleted.len() as i64));
    let org = w.delete.org_id;
    for c in w.deleted.keys().filter(|c| !skipped.contains(c)) {
        assert!(w.crm.contact(CONTACTS, *c).is_some(), "{c} is back");
        assert_eq!(w.crm.children_of(*c), 3, "{c} with its children");
        let entry = w.crm.entry(&restore_key(src, *c)).expect("its entry");
        assert_eq!(entry.get_str("jobId").unwrap(), job.job_id);
        assert!(
            w.crm.entry(&audit_key(org, *c)).is_none(),
            "the delete's key of {c} is free"
        );
        let moved = w.crm.entry(&released_key(org, *c, src)).expect("moved");
        assert_eq!(moved.get_str("jobId").unwrap(), src.as_str());
        assert!(moved.get_str("restoredBy").is_ok());
    }
    let restored: Vec<ObjectId> = w
        .sink
        .restored
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.job_id == job.job_id)
        .map(|r| r.contact_id)
        .collect();
    let unique: BTreeSet<ObjectId> = restored.iter().copied().collect();
    assert_eq!(unique.len() as u64, n, "contact_restored for each");
    assert!(unique.is_disjoint(skipped));
    let mut per_owner: BTreeMap<ObjectId, i64> = BTreeMap::new();
    for (c, owner) in &w.deleted {
        if !skipped.contains(c) {
            *per_owner.entry(*owner).or_default() += 1;
        }
    }
    let notes = w.crm.notes(&job.job_id);
    for (owner, count) in per_owner {
        assert_eq!(notes[&owner].count, count, "each batch notified once");
    }
}

#[tokio::test(start_paused = true)]
async fn a_restore_puts_back_every_contact_then_its_children_exactly_once() {
    let w = world(10).await;
    let counts = super::dry_run(&w.crm, &w.delete).await.unwrap();
    assert_eq!(
        (counts.contacts, counts.conversations, counts.messages),
        (10, 10, 20)
    );
    let job = restore_job(&w, 0).await;
    let mut s = take(&w, &job, "a").await;
    drive(&mut s).await.unwrap();
    exact(&w, &job, &BTreeSet::new());
    assert_eq!(
        w.sink.statuses(&job.job_id),
        vec![JobStatus::Processing, JobStatus::Completed]
    );
    // Nothing is left to put back: a dry run now counts nothing.
    let after = super::dry_run(&w.crm, &w.delete).await.unwrap();
    assert_eq!(
        (after.contacts, after.conversations, after.messages),
        (0, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn contacts_whose_id_is_taken_again_are_skipped_and_left_as_they_are() {
    let w = world(10).await;
    let taken: Vec<ObjectId> = w.deleted.keys().copied().step_by(4).collect();
    for c in &taken {
        w.crm.insert_contact(
            CONTACTS,
            doc! {"_id": c, "orgId": w.delete.org_id, "firstName": "new"},
        );
    }
    let counts = super::dry_run(&w.crm, &w.delete).await.unwrap();
    let n = 10 - taken.len() as u64;
    assert_eq!(
        (counts.contacts, counts.conversations, counts.messages),
        (n, n, 2 * n)
    );
    let job = restore_job(&w, 0).await;
    let mut s = take(&w, &job, "a").await;
    drive(&mut s).await.unwrap();
    let skipped: BTreeSet<ObjectId> = taken.iter().copied().collect();
    exact(&w, &job, &skipped);
    for c in &taken {
        let now = w.crm.contact(CONTACTS, *c).unwrap();
        assert_eq!(now.get_str("firstName").unwrap(), "new", "not overwritten");
        assert_eq!(w.crm.children_of(*c), 0, "its kept children stay kept");
        assert!(w.crm.entry(&restore_key(&w.delete.job_id, *c)).is_none());
    }
}

#[tokio::test(start_paused = true)]
async fn a_contact_a_failed_restore_left_half_back_is_finished_by_the_next() {
    let w = world(10).await;
    let first = restore_job(&w, 0).await;
    let mut a = take(&w, &first, "a").await;
    // The first batch's contacts go back, then its children's insert fails.
    w.crm.crash_at("put_back", 2, false);
    drive(&mut a).await.expect_err("the crash point fired");
    drop(a);
    safe(&w, &BTreeSet::new());
    let half: Vec<ObjectId> = w
        .deleted
        .keys()
        .filter(|c| w.crm.contact(CONTACTS, **c).is_some())
        .copied()
        .collect();
    assert!(!half.is_empty(), "some contacts are back");
    assert!(half.iter().all(|c| w.crm.children_of(*c) < 3));
    // It fails for good: its undecided entries are given back, the half-back
    // contacts' stay (they exist).
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut b = take(&w, &first, "b").await;
    b.run
        .finish(Ending::Failed("gave up".into()))
        .await
        .unwrap();
    let failed = w.jobs.peek(&first.job_id).unwrap();
    release_undecided(&w.crm, &failed).await.unwrap();
    let second = restore_job(&w, 1).await;
    let mut c = take(&w, &second, "c").await;
    drive(&mut c).await.unwrap();
    exact(&w, &second, &BTreeSet::new());
    for h in &half {
        let e = w.crm.entry(&restore_key(&w.delete.job_id, *h)).unwrap();
        assert_eq!(e.get_str("adoptedFrom").unwrap(), first.job_id);
    }
}

/// Every operation a restore awaits, in the order a batch meets them.
const OPS: [&str; 11] = [
    "kept_total",
    "restored_after",
    "kept_contacts",
    "taken",
    "write_restores",
    "restores_of",
    "release_deleted",
    "put_back",
    "kept_apart",
    "add",
    "withdraw_restores",
];

/// Crashes at the `nth` call of `op`, resumes on another instance; whether
/// the crash point was met.
async fn crash_and_resume(op: &'static str, nth: u32, applied: bool) -> bool {
    let w = world(10).await;
    let job = restore_job(&w, 0).await;
    let mut a = take(&w, &job, "a").await;
    w.crm.crash_at(op, nth, applied);
    let first = drive(&mut a).await;
    if w.crm.crash_armed() {
        first.unwrap();
        exact(&w, &job, &BTreeSet::new());
        return false;
    }
    let e = first.expect_err("the crash point fired");
    assert!(e.to_string().contains("crash at"), "{op}: {e}");
    // The process dies here: its in-memory state and background tasks go.
    drop(a);
    safe(&w, &BTreeSet::new());
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut b = take(&w, &job, "b").await;
    drive(&mut b).await.unwrap();
    exact(&w, &job, &BTreeSet::new());
    true
}

#[tokio::test(start_paused = true)]
async fn a_crash_at_any_await_of_a_restore_leaves_nothing_duplicated_or_lost() {
    let mut met = BTreeSet::new();
    for op in OPS {
        for nth in [1, 2, 3] {
            for applied in [false, true] {
                if crash_and_resume(op, nth, applied).await {
                    met.insert(op);
                }
            }
        }
    }
    // Only a resumed restore, or one taken over from another, meets these.
    let unmet: Vec<&str> = OPS
        .iter()
        .filter(|op| !met.contains(*op))
        .copied()
        .collect();
    assert!(
        unmet
            .iter()
            .all(|op| ["restores_of", "withdraw_restores"].contains(op)),
        "crash points never met: {unmet:?}"
    );
}
