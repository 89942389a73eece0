//! The delivery machinery on the in-memory repositories and tokio's paused
//! clock: registration cap, one delivery per webhook and job, claims under a
//! lease, the retry schedule (backoff with jitter, give-up at the end of the
//! retry window), a deleted webhook's delivery dropped, and the sweep.

use std::sync::Arc;
use std::time::Duration;

use bson::{oid::ObjectId, DateTime};
use contact_bulk_actors::model::{JobKind, JobRecord, JobStatus};
use contact_bulk_actors::repo::webhooks::{DeliveryStatus, Hook, Retry, WebhookRepo};
use contact_bulk_actors::repo::{JobRepo, MemJobs, MemWebhooks};

use super::Outcome;
use crate::app::webhooks::{Clock, WebhookConfig, Webhooks, MAX_PER_ORG};
use crate::auth::Keys;

/// The wall clock of the test: a fixed start plus tokio's (paused) time.
fn paused_clock() -> Clock {
    let (base, start) = (
        DateTime::now().timestamp_millis(),
        tokio::time::Instant::now(),
    );
    Arc::new(move || DateTime::from_millis(base + start.elapsed().as_millis() as i64))
}

fn config() -> WebhookConfig {
    WebhookConfig {
        allow_private: false,
        backoff_ms: 10_000,
        backoff_max_ms: 3_600_000,
        retry_for_ms: 120_000,
        timeout_ms: 1_000,
        workers: 1,
        poll_ms: 1000,
        sweep_ms: 60_000,
        sweep_grace_ms: 30_000,
    }
}

struct World {
    hooks: Webhooks,
    repo: MemWebhooks,
    jobs: Arc<MemJobs>,
    org: ObjectId,
}

fn world() -> World {
    let repo = MemWebhooks::new();
    let jobs = Arc::new(MemJobs::new());
    let hooks = Webhooks::with_clock(
        Arc::new(repo.clone()),
        jobs.clone(),
        &config(),
        Keys::new("secret", "http://localhost"),
        paused_clock(),
    );
    World {
        hooks,
        repo,
        jobs,
        org: ObjectId::new(),
    }
}

fn hook(org: ObjectId, created_at: DateTime) -> Hook {
    Hook {
        id: ObjectId::new(),
        org,
        url: "https://example.com/hook".into(),
        events: vec!["job.completed".into(), "job.failed".into()],
        secret: "whsec_test".into(),
        created_at,
    }
}

fn ended(org: ObjectId, finished: DateTime) -> JobRecord {
    let mut job = JobRecord::new(JobKind::Export, org, None, None, Default::default(), None);
    job.status = JobStatus::Completed;
    job.finished_at = Some(finished);
    job
}

/// Queues the terminal event of a job of `w.org` that ended now.
async fn queue(w: &World) -> String {
    let job = ended(w.org, w.hooks.now());
    let snap = job.snapshot();
    w.hooks
        .enqueue(w.org, &job.job_id, "job.completed", w.hooks.now(), &snap)
        .await
        .unwrap();
    job.job_id
}

fn failed() -> Outcome {
    Outcome {
        status: Some(503),
        error: Some("answered 503".into()),
    }
}

async fn advance(ms: u64) {
    tokio::time::advance(Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn an_organisation_keeps_at_most_its_cap_of_webhooks_even_when_registering_at_once() {
    let w = world();
    let now = w.hooks.now();
    let all = futures::future::join_all((0..MAX_PER_ORG + 5).map(|_| {
        let h = hook(w.org, now);
        let repo = w.repo.clone();
        async move { repo.register(&h, MAX_PER_ORG).await.unwrap() }
    }))
    .await;
    assert_eq!(all.iter().filter(|r| **r).count() as u64, MAX_PER_ORG);
    assert_eq!(
        w.repo.hooks_of(w.org, 100).await.unwrap().len() as u64,
        MAX_PER_ORG
    );
    assert!(w
        .repo
        .register(&hook(ObjectId::new(), now), MAX_PER_ORG)
        .await
        .unwrap());
    let listed = w.repo.hooks_of(w.org, 100).await.unwrap();
    assert!(
        listed.iter().all(|h| h.secret.is_empty()),
        "never listed with its secret"
    );
}

#[tokio::test(start_paused = true)]
async fn an_event_queues_one_delivery_per_webhook_registered_before_the_job_ended() {
    let w = world();
    let early = hook(w.org, w.hooks.now());
    w.repo.register(&early, MAX_PER_ORG).await.unwrap();
    advance(1000).await;
    let job = queue(&w).await;
    // Redelivered event: nothing twice.
    let again = ended(w.org, w.hooks.now());
    w.hooks
        .enqueue(
            w.org,
            &job,
            "job.completed",
            w.hooks.now(),
            &again.snapshot(),
        )
        .await
        .unwrap();
    // A webhook registered after the job ended gets nothing for it.
    advance(1000).await;
    let late = hook(w.org, w.hooks.now());
    w.repo.register(&late, MAX_PER_ORG).await.unwrap();
    let finished = DateTime::from_millis(w.hooks.now().timestamp_millis() - 2000);
    w.hooks
        .enqueue(w.org, &job, "job.completed", finished, &again.snapshot())
        .await
        .unwrap();
    let all = w.repo.all_deliveries();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].job_id.as_deref(), Some(job.as_str()));
    // Another organisation's event reaches none of them.
    let other = ended(ObjectId::new(), w.hooks.now());
    w.hooks
        .enqueue(
            other.org_id,
            &other.job_id,
            "job.completed",
            w.hooks.now(),
            &other.snapshot(),
        )
        .await
        .unwrap();
    assert_eq!(w.repo.all_deliveries().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_claim_holds_its_delivery_for_a_lease_and_a_lost_lease_records_nothing() {
    let w = world();
    w.repo
        .register(&hook(w.org, w.hooks.now()), MAX_PER_ORG)
        .await
        .unwrap();
    queue(&w).await;
    let first = w.hooks.claim().await.unwrap().expect("due at once");
    assert!(w.hooks.claim().await.unwrap().is_none(), "leased");
    let lease = config().lease().as_millis() as u64;
    advance(lease - 100).await;
    assert!(w.hooks.claim().await.unwrap().is_none(), "still leased");
    // The worker died: the lease runs out and another worker takes it.
    advance(200).await;
    let second = w.hooks.claim().await.unwrap().expect("due again");
    assert_eq!(second.id, first.id);
    assert_ne!(second.token, first.token);
    // The first worker comes back: its result is not recorded.
    w.hooks.record(&first, w.hooks.now(), 5, failed()).await;
    let d = &w.repo.all_deliveries()[0];
    assert_eq!((d.attempts, d.log.len()), (Some(0), 0), "{d:?}");
    // A delivery being sent is not retried by hand either.
    let retry = w
        .repo
        .retry(w.org, second.webhook_id, second.id, w.hooks.now())
        .await;
    assert_eq!(retry.unwrap(), Retry::Busy);
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_with_jitter_until_the_retry_window_ends() {
    let w = world();
    w.repo
        .register(&hook(w.org, w.hooks.now()), MAX_PER_ORG)
        .await
        .unwrap();
    queue(&w).await;
    let mut attempts = 0;
    let mut delays = Vec::new();
    loop {
        let c = w.hooks.claim().await.unwrap().expect("due");
        w.hooks.record(&c, w.hooks.now(), 5, failed()).await;
        attempts += 1;
        let d = w.repo.all_deliveries().remove(0);
        assert_eq!(d.attempts, Some(attempts));
        assert_eq!(d.last_error.as_deref(), Some("answered 503"));
        if d.status == Some(DeliveryStatus::Failed) {
            break;
        }
        let wait = (d.next_attempt_at.unwrap().timestamp_millis()
            - w.hooks.now().timestamp_millis()) as u64;
        delays.push(wait);
        // Not due a moment before its time, due at it.
        advance(wait - 1).await;
        assert!(w.hooks.claim().await.unwrap().is_none(), "early");
        advance(1).await;
    }
    // 10 s, 20 s, 40 s (±10 %), then the next (80 s) would end past 120 s.
    assert_eq!(delays.len(), 3, "{delays:?}");
    for (d, base) in delays.iter().zip([10_000u64, 20_000, 40_000]) {
        assert!(
            (base * 9 / 10..=base * 11 / 10).contains(d),
            "{d} vs {base}"
        );
    }
    advance(3_600_000).await;
    assert!(
        w.hooks.claim().await.unwrap().is_none(),
        "given up for good"
    );
    // A given-up delivery is tried once more when asked.
    let d = w.repo.all_deliveries().remove(0);
    let hook_id = w.repo.hooks_of(w.org, 10).await.unwrap()[0].id;
    let retry = w
        .repo
        .retry(w.org, hook_id, d.id, w.hooks.now())
        .await
        .unwrap();
    assert!(matches!(retry, Retry::Due(_)), "{retry:?}");
    assert!(w.hooks.claim().await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_delivered_webhook_is_never_claimed_nor_retried_again() {
    let w = world();
    w.repo
        .register(&hook(w.org, w.hooks.now()), MAX_PER_ORG)
        .await
        .unwrap();
    queue(&w).await;
    let c = w.hooks.claim().await.unwrap().unwrap();
    let ok = Outcome {
        status: Some(204),
        error: None,
    };
    w.hooks.record(&c, w.hooks.now(), 5, ok).await;
    let d = w.repo.all_deliveries().remove(0);
    assert_eq!(d.status, Some(DeliveryStatus::Succeeded));
    assert_eq!(d.delivered_at, Some(w.hooks.now()));
    advance(3_600_000).await;
    assert!(w.hooks.claim().await.unwrap().is_none());
    let retry = w.repo.retry(w.org, c.webhook_id, c.id, w.hooks.now()).await;
    assert_eq!(retry.unwrap(), Retry::Succeeded);
    // Another organisation cannot even see it.
    let foreign = w
        .repo
        .retry(ObjectId::new(), c.webhook_id, c.id, w.hooks.now())
        .await;
    assert_eq!(foreign.unwrap(), Retry::NotFound);
}

#[tokio::test(start_paused = true)]
async fn a_delivery_of_a_deleted_webhook_is_dropped_unsent() {
    let w = world();
    let h = hook(w.org, w.hooks.now());
    w.repo.register(&h, MAX_PER_ORG).await.unwrap();
    queue(&w).await;
    let c = w.hooks.claim().await.unwrap().unwrap();
    // Deleted by its organisation while claimed: the delivery goes with it.
    assert!(
        !w.repo.remove(ObjectId::new(), h.id).await.unwrap(),
        "not another org's"
    );
    assert!(w.repo.remove(w.org, h.id).await.unwrap());
    assert!(w.repo.all_deliveries().is_empty());
    let client = super::client(&config()).unwrap();
    w.hooks.attempt(&client, c).await;
    assert!(w.repo.all_deliveries().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_sweep_queues_what_a_lost_event_left_out_once() {
    let w = world();
    w.repo
        .register(&hook(w.org, w.hooks.now()), MAX_PER_ORG)
        .await
        .unwrap();
    advance(1000).await;
    // A job ended, its terminal event lost; another of an organisation without webhooks.
    let job = ended(w.org, w.hooks.now());
    w.jobs.create(job.clone()).await.unwrap();
    w.jobs
        .create(ended(ObjectId::new(), w.hooks.now()))
        .await
        .unwrap();
    // Within the grace period the event may still come: nothing yet.
    assert_eq!(w.hooks.sweep().await.unwrap(), 0);
    advance(config().sweep_grace_ms + 1000).await;
    assert_eq!(w.hooks.sweep().await.unwrap(), 1);
    let all = w.repo.all_deliveries();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].job_id.as_deref(), Some(job.job_id.as_str()));
    assert_eq!(w.hooks.sweep().await.unwrap(), 0, "queued once");
}
