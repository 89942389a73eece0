//! The delete step on the in-memory repositories and tokio's paused clock:
//! exact counts and side effects, a cancel between batches, and a crash at
//! every await of a batch (before or after the operation applied), resumed by
//! another instance once the lease ran out. Whatever the crash point, no
//! contact is ever gone without its audit entry and its kept copy, no child
//! outlives its contact, and the resumed job ends with exact counts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, oid::ObjectId};

use super::DeleteState;
use crate::error::JobError;
use crate::filter::Filter;
use crate::job::JobStep;
use crate::model::{Counts, JobKind, JobRecord, JobStatus};
use crate::repo::{JobRepo, MemCrm, MemJobs};
use crate::testing::{env_with, RecordingSink};

const CONTACTS: &str = "contacts";

struct World {
    jobs: MemJobs,
    crm: MemCrm,
    org: ObjectId,
    /// Contacts the delete must remove, with their owner.
    doomed: BTreeMap<ObjectId, ObjectId>,
    /// Contacts it must leave (another stage, another organisation).
    spared: BTreeSet<ObjectId>,
    job: JobRecord,
}

/// `n` contacts in the stage (one conversation and two messages each, two
/// assignees), plus contacts of another stage and of another organisation
/// with the same stage.
async fn world(n: usize) -> World {
    let (jobs, crm) = (MemJobs::new(), MemCrm::new());
    let (org, other_org) = (ObjectId::new(), ObjectId::new());
    let (stage, other_stage) = (ObjectId::new(), ObjectId::new());
    let owners = [ObjectId::new(), ObjectId::new()];
    let mut doomed = BTreeMap::new();
    let mut spared = BTreeSet::new();
    let add = |org: ObjectId, stage: ObjectId, owner: ObjectId| {
        let id = ObjectId::new();
        crm.insert_contact(
            CONTACTS,
            doc! {"_id": id, "orgId": org, "stageId": stage, "ownerId": owner, "firstName": "A"},
        );
        crm.insert_child(
            true,
            doc! {"_id": ObjectId::new(), "orgId": org, "contactId": id},
        );
        for _ in 0..2 {
            crm.insert_child(
                false,
                doc! {"_id": ObjectId::new(), "orgId": org, "contactId": id},
            );
        }
        id
    };
    for i in 0..n {
        let owner = owners[i % 2];
        doomed.insert(add(org, stage, owner), owner);
    }
    for _ in 0..3 {
        spared.insert(add(org, other_stage, owners[0]));
        spared.insert(add(other_org, stage, owners[0]));
    }
    let filter = Filter {
        stage_ids: vec![stage],
        ..Filter::default()
    };
    let job = JobRecord::new(JobKind::Delete, org, None, None, filter, None);
    let job = jobs.create(job).await.unwrap().0;
    World {
        jobs,
        crm,
        org,
        doomed,
        spared,
        job,
    }
}

/// Instance `name` takes the job (its lease must be free) and builds the step.
async fn take(w: &World, name: &str, sink: &Arc<RecordingSink>) -> DeleteState {
    let mut env = env_with(&w.jobs, &w.crm, name, sink.clone());
    env.settings.delete_batch = 3;
    let job = w
        .jobs
        .acquire(&w.job.job_id, name, env.settings.lease_ttl)
        .await
        .unwrap()
        .expect("lease free");
    DeleteState::start(env, job).unwrap()
}

/// Runs steps until the job ends (`Ok`) or a step fails (`Err`: the crash).
async fn drive(s: &mut DeleteState) -> Result<(), JobError> {
    for _ in 0..1000 {
        if !s.step().await? {
            return Ok(());
        }
    }
    panic!("the delete never ended");
}

/// What holds at every moment, crash or not: every contact gone was audited
/// and kept with its children, and none of its children is left.
fn safe(w: &World) {
    let left: BTreeSet<ObjectId> = w.crm.contact_ids(CONTACTS).into_iter().collect();
    let audited: BTreeSet<ObjectId> = w.crm.audited(&w.job.job_id).into_iter().collect();
    let kept = w.crm.kept(&w.job.job_id);
    for s in &w.spared {
        assert!(left.contains(s), "a contact outside the filter was deleted");
        assert_eq!(w.crm.children_of(*s), 3);
    }
    for c in w.doomed.keys() {
        if left.contains(c) {
            continue;
        }
        assert!(audited.contains(c), "{c} deleted without its audit entry");
        let copies = kept.iter().filter(|k| k.0 == *c).count();
        assert_eq!(copies, 4, "{c} deleted without its kept copy and children");
        assert_eq!(w.crm.children_of(*c), 0, "a child outlived its contact {c}");
    }
}

/// The end state of a completed delete: exact.
fn exact(w: &World, sink: &RecordingSink) {
    safe(w);
    let job = w.jobs.peek(&w.job.job_id).unwrap();
    let n = w.doomed.len() as u64;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(
        job.counts,
        Counts {
            contacts: n,
            conversations: n,
            messages: 2 * n
        }
    );
    assert_eq!(job.processed, n as i64);
    assert_eq!(job.total, Some(n as i64));
    assert!(job.inflight.is_none() && job.inflight_next.is_none());
    let left: BTreeSet<ObjectId> = w.crm.contact_ids(CONTACTS).into_iter().collect();
    assert_eq!(left, w.spared, "exactly the selection is gone");
    let audited: BTreeSet<ObjectId> = w.crm.audited(&w.job.job_id).into_iter().collect();
    assert_eq!(
        audited.len() as u64,
        n,
        "one audit entry per deleted contact"
    );
    let removed: BTreeSet<ObjectId> = sink
        .removed
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.contact_id)
        .collect();
    assert_eq!(removed.len() as u64, n, "contact_removed for each");
    let mut per_owner: BTreeMap<ObjectId, i64> = BTreeMap::new();
    for owner in w.doomed.values() {
        *per_owner.entry(*owner).or_default() += 1;
    }
    let notes = w.crm.notes(&w.job.job_id);
    for (owner, count) in per_owner {
        assert_eq!(notes[&owner].count, count, "each batch notified once");
    }
}

#[tokio::test(start_paused = true)]
async fn a_delete_removes_exactly_its_selection_with_every_side_effect() {
    let w = world(10).await;
    let sink = Arc::new(RecordingSink::default());
    let mut s = take(&w, "a", &sink).await;
    drive(&mut s).await.unwrap();
    exact(&w, &sink);
    let kept = w.crm.kept(&w.job.job_id);
    assert_eq!(kept.len(), 40, "10 contacts with 3 children each");
    assert_eq!(
        sink.statuses(&w.job.job_id),
        vec![JobStatus::Processing, JobStatus::Completed]
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancel_between_batches_gives_back_every_undeleted_decision() {
    let w = world(12).await;
    let sink = Arc::new(RecordingSink::default());
    let mut s = take(&w, "a", &sink).await;
    for _ in 0..3 {
        assert!(s.step().await.unwrap());
    }
    s.run.cancel = true;
    drive(&mut s).await.unwrap();
    let job = w.jobs.peek(&w.job.job_id).unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    safe(&w);
    let left: BTreeSet<ObjectId> = w.crm.contact_ids(CONTACTS).into_iter().collect();
    let gone = w.doomed.keys().filter(|c| !left.contains(c)).count() as u64;
    assert!(gone > 0 && gone < 12, "stopped part way ({gone})");
    assert_eq!(job.counts.contacts, gone, "counts say what was deleted");
    assert_eq!(job.processed, gone as i64);
    let audited = w.crm.audited(&w.job.job_id);
    assert_eq!(
        audited.len() as u64,
        gone,
        "contacts still there are anyone's"
    );
}

/// Every operation a batch awaits, in the order a batch meets them.
/// (A delete that keeps counts children as it keeps them: no `count_children`.)
const OPS: [&str; 13] = [
    "bound",
    "count",
    "ids",
    "read_range",
    "decide",
    "keep",
    "delete_children",
    "children_left",
    "delete",
    "add",
    "present",
    "withdraw",
    "kept_children",
];

/// Crashes at the `nth` call of `op`, resumes on another instance; whether
/// the crash point was met.
async fn crash_and_resume(op: &'static str, nth: u32, applied: bool) -> bool {
    let w = world(10).await;
    let sink = Arc::new(RecordingSink::default());
    let mut a = take(&w, "a", &sink).await;
    w.crm.crash_at(op, nth, applied);
    let first = drive(&mut a).await;
    if w.crm.crash_armed() {
        // The job never met this call (`nth` too high): nothing to resume.
        first.unwrap();
        exact(&w, &sink);
        return false;
    }
    let e = first.expect_err("the crash point fired");
    assert!(e.to_string().contains("crash at"), "{op}: {e}");
    // The process dies here: its in-memory state and background tasks go.
    drop(a);
    safe(&w);
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut b = take(&w, "b", &sink).await;
    drive(&mut b).await.unwrap();
    exact(&w, &sink);
    let job = w.jobs.peek(&w.job.job_id).unwrap();
    assert_eq!(job.lease_epoch, 2, "{op}: resumed by the second instance");
    true
}

#[tokio::test(start_paused = true)]
async fn a_crash_at_any_await_of_a_batch_loses_nothing_and_counts_exactly() {
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
    // A clean run gives nothing back and redoes no batch, so only a resumed
    // one meets these three.
    let unmet: Vec<&str> = OPS
        .iter()
        .filter(|op| !met.contains(*op))
        .copied()
        .collect();
    assert!(
        unmet
            .iter()
            .all(|op| ["present", "withdraw", "kept_children"].contains(op)),
        "crash points never met: {unmet:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_to_the_batch_record_counts_the_batch_once() {
    let w = world(10).await;
    let sink = Arc::new(RecordingSink::default());
    let mut a = take(&w, "a", &sink).await;
    let scope = w.org.to_hex();
    crate::failpoint::arm(crate::failpoint::DELETE_RECORD_LOST_REPLY, &scope, 2);
    let e = drive(&mut a).await.expect_err("reply lost");
    assert!(e.outage().is_some(), "{e}");
    drop(a);
    safe(&w);
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut b = take(&w, "b", &sink).await;
    // The second firing lands on b: a write applied whose reply is lost again.
    let resumed = drive(&mut b).await;
    if resumed.is_err() {
        drop(b);
        tokio::time::advance(Duration::from_secs(11)).await;
        let mut c = take(&w, "c", &sink).await;
        drive(&mut c).await.unwrap();
    }
    exact(&w, &sink);
}

/// A delete that fails for good after a batch's keep deleted the children
/// but before the contacts went: giving the batch back puts the children back
/// first, so no contact lives on without them.
#[tokio::test(start_paused = true)]
async fn a_failed_delete_gives_back_its_batch_with_the_children_it_had_deleted() {
    let w = world(10).await;
    let sink = Arc::new(RecordingSink::default());
    let mut a = take(&w, "a", &sink).await;
    w.crm.crash_at("delete", 1, false);
    drive(&mut a).await.expect_err("the crash point fired");
    drop(a);
    let present: BTreeSet<ObjectId> = w.crm.contact_ids(CONTACTS).into_iter().collect();
    let stripped: Vec<ObjectId> = w
        .doomed
        .keys()
        .filter(|c| present.contains(c) && w.crm.children_of(**c) == 0)
        .copied()
        .collect();
    assert!(!stripped.is_empty(), "the keep had deleted some children");
    // The job failed for good: its unfinished batch is given back.
    let job = w.jobs.peek(&w.job.job_id).unwrap();
    let crm = crate::repo::Crm::of(Arc::new(w.crm.clone()));
    super::release_undecided(&crm, &job).await.unwrap();
    for c in &stripped {
        assert_eq!(w.crm.children_of(*c), 3, "{c} got its children back");
    }
    let audited: BTreeSet<ObjectId> = w.crm.audited(&w.job.job_id).into_iter().collect();
    for c in w.doomed.keys().filter(|c| present.contains(c)) {
        assert!(!audited.contains(c), "{c} is anyone's again");
    }
    // Done again (a give-back that crashed half way): nothing doubles.
    super::release_undecided(&crm, &job).await.unwrap();
    for c in &stripped {
        assert_eq!(w.crm.children_of(*c), 3);
    }
}
