//! The supervisor's scheduling and restart policy on the in-memory job
//! repository and tokio's paused clock: caps and fairness, pickup of new and
//! abandoned jobs, leases, attempts and backoff, outages, drain, and an
//! instance killed mid-batch.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bson::oid::ObjectId;
use ractor::{Actor, ActorRef};

use super::{Caps, Supervisor, SupervisorCounters, SupervisorMsg};
use crate::model::{JobRecord, JobStatus};
use crate::repo::{JobRepo, MemJobs};
use crate::testing::{env, pending, script, stored, until, Plan, RecordingSink, ScriptedKinds};

fn caps() -> Caps {
    Caps {
        max_running: 3,
        max_per_org: 2,
        scan_interval: Duration::from_secs(1),
    }
}

struct Instance {
    sup: ActorRef<SupervisorMsg>,
    kinds: Arc<ScriptedKinds>,
    sink: Arc<RecordingSink>,
}

async fn instance(jobs: &MemJobs, name: &str, caps: Caps) -> Instance {
    let kinds = Arc::new(ScriptedKinds::default());
    let sink = Arc::new(RecordingSink::default());
    let supervisor = Supervisor::with_kinds(kinds.clone());
    let (sup, _) = Actor::spawn(None, supervisor, (env(jobs, name, sink.clone()), caps))
        .await
        .expect("supervisor");
    Instance { sup, kinds, sink }
}

async fn counters(sup: &ActorRef<SupervisorMsg>) -> SupervisorCounters {
    ractor::call!(sup, SupervisorMsg::Counters).expect("counters")
}

async fn job_with(jobs: &MemJobs, org: ObjectId, plan: &Arc<Plan>) -> JobRecord {
    let job = pending(org);
    script(&job, plan.clone());
    stored(jobs, job).await
}

fn status(jobs: &MemJobs, job: &JobRecord) -> JobStatus {
    jobs.peek(&job.job_id).expect("record").status
}

#[tokio::test(start_paused = true)]
async fn the_scan_keeps_the_caps_and_does_not_let_one_organisations_backlog_hide_another() {
    let jobs = MemJobs::new();
    let (a, b) = (ObjectId::new(), ObjectId::new());
    let plan = Plan::new(3, Duration::from_secs(1));
    let mut a_jobs = Vec::new();
    for _ in 0..5 {
        a_jobs.push(job_with(&jobs, a, &plan).await);
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    let b_job = job_with(&jobs, b, &plan).await;
    let me = instance(&jobs, "me", caps()).await;
    let held = |org: ObjectId| {
        jobs.all()
            .iter()
            .filter(|j| j.org_id == org && j.lease_owner.is_some())
            .count()
    };
    until(5, "three jobs running", || held(a) + held(b) == 3).await;
    assert_eq!(
        (held(a), held(b)),
        (2, 1),
        "B's job runs beside A's backlog"
    );
    // Every moment until the end: never more than the caps.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while jobs.all().iter().any(|j| !j.status.is_terminal()) {
        assert!(held(a) <= 2 && held(a) + held(b) <= 3, "caps exceeded");
        assert!(tokio::time::Instant::now() < deadline, "jobs never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for job in a_jobs.iter().chain([&b_job]) {
        let done = jobs.peek(&job.job_id).unwrap();
        assert_eq!(
            (done.status, done.processed, done.attempts),
            (JobStatus::Completed, 3, 1)
        );
        assert_eq!(
            me.sink.statuses(&job.job_id).last(),
            Some(&JobStatus::Completed),
            "the terminal snapshot is announced"
        );
    }
    let c = counters(&me.sup).await;
    assert_eq!((c.spawned, c.restarts, c.failed, c.running), (6, 0, 0, 0));
    // Each of the 6 jobs ran its 3 batches exactly once.
    assert_eq!(plan.batches_run().len(), 18);
}

#[tokio::test(start_paused = true)]
async fn a_job_written_while_the_instance_runs_is_picked_up_by_the_next_scan() {
    let jobs = MemJobs::new();
    let me = instance(&jobs, "me", caps()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Created without a `Start` message (another instance accepted it).
    let plan = Plan::new(2, Duration::from_millis(100));
    let job = job_with(&jobs, ObjectId::new(), &plan).await;
    let created = tokio::time::Instant::now();
    until(10, "job completed", || {
        status(&jobs, &job) == JobStatus::Completed
    })
    .await;
    let started = plan.starts.lock().unwrap()[0].1;
    assert!(
        created.elapsed()
            <= Duration::from_secs(2) + 2 * plan.batch_time + Duration::from_millis(200),
        "picked up within a scan interval (started after {started:?})"
    );
    assert!(counters(&me.sup).await.scans >= 3);
}

#[tokio::test(start_paused = true)]
async fn a_live_lease_is_never_stolen_and_an_expired_one_is_taken_over_at_no_cost() {
    let jobs = MemJobs::new();
    let plan = Plan::new(2, Duration::from_millis(100));
    let job = job_with(&jobs, ObjectId::new(), &plan).await;
    let ttl = Duration::from_secs(10);
    // Another instance holds it, then goes silent (paused, dead).
    let theirs = jobs
        .acquire(&job.job_id, "other", ttl)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((theirs.lease_epoch, theirs.attempts), (1, 1));
    let me = instance(&jobs, "me", caps()).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    let now = jobs.peek(&job.job_id).unwrap();
    assert_eq!(
        now.lease_owner.as_deref(),
        Some("other"),
        "a live lease stays"
    );
    assert!(plan.starts.lock().unwrap().is_empty());
    until(10, "taken over and completed", || {
        status(&jobs, &job) == JobStatus::Completed
    })
    .await;
    let done = jobs.peek(&job.job_id).unwrap();
    assert_eq!(done.lease_epoch, 2, "the takeover bumped the epoch");
    assert_eq!(done.attempts, 1, "a takeover costs no attempt");
    assert_eq!(plan.starts.lock().unwrap()[0].0, "me");
    assert!(plan.starts.lock().unwrap()[0].1 >= ttl);
    assert_eq!(counters(&me.sup).await.restarts, 0);
}

#[tokio::test(start_paused = true)]
async fn failures_of_the_jobs_own_work_cost_attempts_with_backoff_then_fail_it() {
    let jobs = MemJobs::new();
    let plan = Plan::new(3, Duration::from_millis(10));
    plan.fails.store(u32::MAX, Ordering::SeqCst);
    let job = job_with(&jobs, ObjectId::new(), &plan).await;
    let me = instance(&jobs, "me", caps()).await;
    until(60, "job failed", || {
        status(&jobs, &job) == JobStatus::Failed
    })
    .await;
    let failed = jobs.peek(&job.job_id).unwrap();
    assert_eq!(failed.attempts, 3, "max_attempts actor starts");
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or_default()
            .starts_with("gave up after 3 attempts"),
        "{:?}",
        failed.error
    );
    assert!(failed.lease_owner.is_none());
    let starts: Vec<Duration> = plan.starts.lock().unwrap().iter().map(|s| s.1).collect();
    assert_eq!(starts.len(), 3, "{starts:?}");
    // Restart backoff doubles: 500 ms after the 2nd attempt is counted, 1 s after the 3rd
    // (on top of the in-place step retries).
    assert!(
        starts[1] - starts[0] >= Duration::from_millis(500),
        "{starts:?}"
    );
    assert!(
        starts[2] - starts[1] >= Duration::from_millis(1000),
        "{starts:?}"
    );
    let c = counters(&me.sup).await;
    assert_eq!((c.restarts, c.failed), (2, 1));
    assert_eq!(
        *me.kinds.abandoned.lock().unwrap(),
        vec![job.job_id.clone()]
    );
    assert_eq!(
        me.sink.statuses(&job.job_id).last(),
        Some(&JobStatus::Failed)
    );
    assert!(plan.batches_run().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failure_that_passes_costs_one_attempt_and_resumes_from_the_checkpoint() {
    let jobs = MemJobs::new();
    let plan = Plan::new(4, Duration::from_millis(50));
    // step_retries = 2: the third failure in a row fails the actor once.
    plan.fails.store(3, Ordering::SeqCst);
    let job = job_with(&jobs, ObjectId::new(), &plan).await;
    let me = instance(&jobs, "me", caps()).await;
    until(30, "job completed", || {
        status(&jobs, &job) == JobStatus::Completed
    })
    .await;
    let done = jobs.peek(&job.job_id).unwrap();
    assert_eq!((done.attempts, done.processed), (2, 4));
    assert_eq!(
        plan.batches_run(),
        vec![0, 1, 2, 3],
        "nothing redone, nothing skipped"
    );
    assert_eq!(counters(&me.sup).await.restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn an_outage_of_any_length_is_waited_out_at_no_cost() {
    let jobs = MemJobs::new();
    let plan = Plan::new(5, Duration::from_millis(500));
    let job = job_with(&jobs, ObjectId::new(), &plan).await;
    let me = instance(&jobs, "me", caps()).await;
    until(10, "two batches", || plan.batches_run().len() >= 2).await;
    jobs.set_down(true);
    // Far longer than every retry and the lease together.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let during = jobs.peek(&job.job_id).unwrap();
    assert_eq!(during.status, JobStatus::Processing);
    jobs.set_down(false);
    until(60, "job completed", || {
        status(&jobs, &job) == JobStatus::Completed
    })
    .await;
    let done = jobs.peek(&job.job_id).unwrap();
    assert_eq!(
        (done.attempts, done.processed),
        (1, 5),
        "an outage costs nothing"
    );
    assert!(done.waiting.is_none());
    let c = counters(&me.sup).await;
    assert_eq!((c.restarts, c.failed), (0, 0));
    // The batch cut by the outage is tried again until it is recorded, and
    // counted once.
    let mut ran = plan.batches_run();
    ran.dedup();
    assert_eq!(ran, vec![0, 1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn a_drain_gives_the_lease_back_and_another_instance_resumes_without_redoing_a_batch() {
    let jobs = MemJobs::new();
    let plan = Plan::new(8, Duration::from_secs(1));
    let job = job_with(&jobs, ObjectId::new(), &plan).await;
    let a = instance(&jobs, "a", caps()).await;
    until(10, "three batches", || plan.batches_run().len() >= 3).await;
    ractor::call!(a.sup, SupervisorMsg::Drain).expect("drained");
    let drained = jobs.peek(&job.job_id).unwrap();
    assert_eq!(drained.status, JobStatus::Processing, "left resumable");
    assert!(drained.lease_owner.is_none(), "lease given back");
    assert_eq!(drained.attempts, 1);
    a.sup.stop(None);
    let b = instance(&jobs, "b", caps()).await;
    until(30, "completed by b", || {
        status(&jobs, &job) == JobStatus::Completed
    })
    .await;
    let done = jobs.peek(&job.job_id).unwrap();
    assert_eq!((done.attempts, done.processed, done.lease_epoch), (1, 8, 2));
    assert_eq!(plan.batches_run(), (0..8).collect::<Vec<_>>());
    let ran = plan.ran.lock().unwrap().clone();
    assert!(ran.iter().any(|r| r.0 == "a") && ran.iter().any(|r| r.0 == "b"));
    assert!(b.sink.statuses(&job.job_id).contains(&JobStatus::Completed));
}

#[tokio::test(start_paused = true)]
async fn an_instance_killed_mid_batch_is_taken_over_from_the_checkpoint_once_its_lease_runs_out() {
    let jobs = MemJobs::new();
    let plan = Plan::new(6, Duration::from_secs(1));
    let job = job_with(&jobs, ObjectId::new(), &plan).await;
    let a = instance(&jobs, "a", caps()).await;
    until(10, "three batches", || {
        jobs.peek(&job.job_id).unwrap().processed >= 3
    })
    .await;
    // Half way through the fourth batch: no drain, no release.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = tokio::time::Instant::now();
    for child in a.sup.get_children() {
        child.kill();
    }
    a.sup.kill();
    let left = jobs.peek(&job.job_id).unwrap();
    assert_eq!(left.lease_owner.as_deref(), Some("a"));
    let checkpoint = left.processed;
    let b = instance(&jobs, "b", caps()).await;
    until(60, "completed by b", || {
        status(&jobs, &job) == JobStatus::Completed
    })
    .await;
    let b_start = plan.starts.lock().unwrap().last().cloned().unwrap();
    assert_eq!(b_start.0, "b");
    let done = jobs.peek(&job.job_id).unwrap();
    assert_eq!((done.processed, done.attempts, done.lease_epoch), (6, 1, 2));
    let by_b: Vec<i64> = plan
        .ran
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.0 == "b")
        .map(|r| r.2)
        .collect();
    assert_eq!(
        by_b,
        (checkpoint..6).collect::<Vec<_>>(),
        "b resumes at the checkpoint"
    );
    assert!(
        killed_at.elapsed() >= Duration::from_secs(9),
        "not before a's lease ran out"
    );
    assert_eq!(counters(&b.sup).await.restarts, 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancel_lands_at_the_next_batch_boundary() {
    let jobs = MemJobs::new();
    let plan = Plan::new(50, Duration::from_millis(200));
    let job = job_with(&jobs, ObjectId::new(), &plan).await;
    let me = instance(&jobs, "me", caps()).await;
    until(10, "two batches", || plan.batches_run().len() >= 2).await;
    let (_, here) = jobs.request_cancel(job.org_id, &job.job_id).await.unwrap();
    assert!(!here, "a running job is cancelled by its actor");
    me.sup
        .send_message(SupervisorMsg::Cancel(job.job_id.clone()))
        .unwrap();
    until(2, "cancelled", || {
        status(&jobs, &job) == JobStatus::Cancelled
    })
    .await;
    let done = jobs.peek(&job.job_id).unwrap();
    assert!(done.processed < 50);
    assert_eq!(done.processed as usize, plan.batches_run().len());
    assert_eq!(
        me.sink.statuses(&job.job_id).last(),
        Some(&JobStatus::Cancelled)
    );
}

#[tokio::test(start_paused = true)]
async fn a_clean_up_that_meets_an_outage_is_owed_and_redone_by_a_later_scan() {
    let jobs = MemJobs::new();
    let plan = Plan::new(3, Duration::from_millis(10));
    plan.fails.store(u32::MAX, Ordering::SeqCst);
    let job = job_with(&jobs, ObjectId::new(), &plan).await;
    let kinds = Arc::new(ScriptedKinds::default());
    kinds.abandon_failures.store(1, Ordering::SeqCst);
    let sink = Arc::new(RecordingSink::default());
    let (sup, _) = Actor::spawn(
        None,
        Supervisor::with_kinds(kinds.clone()),
        (env(&jobs, "me", sink), caps()),
    )
    .await
    .expect("supervisor");
    until(60, "job failed", || {
        status(&jobs, &job) == JobStatus::Failed
    })
    .await;
    assert!(
        jobs.cleanup_owed(&job.job_id),
        "the failed clean-up is owed"
    );
    assert!(kinds.abandoned.lock().unwrap().is_empty());
    // The claim of the failed try runs out (the lease's length), then a scan
    // does it, once.
    until(60, "clean-up redone", || !jobs.cleanup_owed(&job.job_id)).await;
    assert_eq!(*kinds.abandoned.lock().unwrap(), vec![job.job_id.clone()]);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(kinds.abandoned.lock().unwrap().len(), 1, "done once");
    sup.stop(None);
}

/// A job that instance "dead" failed for good, dying before its clean-up.
async fn failed_by_a_dead_instance(jobs: &MemJobs) -> JobRecord {
    let job = stored(jobs, pending(ObjectId::new())).await;
    let held = jobs
        .acquire(&job.job_id, "dead", Duration::from_secs(10))
        .await
        .unwrap()
        .expect("lease");
    let lease = crate::repo::Lease {
        owner: "dead".into(),
        epoch: held.lease_epoch,
    };
    let ending = crate::repo::Ending::Failed("gave up".into());
    jobs.finish(&job.job_id, &lease, &ending).await.unwrap();
    assert!(jobs.cleanup_owed(&job.job_id));
    job
}

#[tokio::test(start_paused = true)]
async fn a_clean_up_owed_by_an_instance_that_died_is_done_by_another() {
    let jobs = MemJobs::new();
    let job = failed_by_a_dead_instance(&jobs).await;
    // Another's clean-up, claimed by a live instance for 20 s.
    let other = failed_by_a_dead_instance(&jobs).await;
    let claimed = jobs
        .claim_cleanup(Some(&other.job_id), "third", Duration::from_secs(20))
        .await
        .unwrap();
    assert!(claimed.is_some());
    let me = instance(&jobs, "me", caps()).await;
    until(5, "owed clean-up done", || !jobs.cleanup_owed(&job.job_id)).await;
    assert_eq!(
        *me.kinds.abandoned.lock().unwrap(),
        vec![job.job_id.clone()]
    );
    assert_eq!(status(&jobs, &job), JobStatus::Failed, "still failed");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        jobs.cleanup_owed(&other.job_id),
        "a live claim is respected"
    );
    assert_eq!(me.kinds.abandoned.lock().unwrap().len(), 1);
    until(30, "claim ran out and was taken over", || {
        !jobs.cleanup_owed(&other.job_id)
    })
    .await;
    assert_eq!(me.kinds.abandoned.lock().unwrap().len(), 2);
    me.sup.stop(None);
}
