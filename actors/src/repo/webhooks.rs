//! The webhook repository (contract section 12): registrations (`webhooks`)
//! and the delivery outbox with its log (`webhook_deliveries`).
//!
//! It owns the invariants callers used to spell out in BSON:
//! - an organisation never keeps more than its cap of registrations, even
//!   when registrations race (each counts after its insert and takes itself
//!   back when over);
//! - one delivery per webhook and job (a unique index; a racing duplicate
//!   insert is "already there", not an error);
//! - a delivery is sent by one worker at a time: a claim moves its
//!   `nextAttemptAt` a lease ahead under a fresh token, and only the holder of
//!   that token records its attempt or drops it; a lease that runs out makes
//!   it due again (at least once);
//! - a delivery that succeeded is never claimed nor retried again.
//!
//! Times are passed in by the caller (its clock), so the fake runs on tokio's
//! paused clock in unit tests.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use bson::{oid::ObjectId, DateTime};

use crate::error::JobError;

/// Collection of registrations.
pub const WEBHOOKS: &str = "webhooks";
/// Collection of deliveries (the outbox and its log).
pub const DELIVERIES: &str = "webhook_deliveries";
/// Attempts kept in a delivery's log.
pub const LOG_LEN: i32 = 20;

/// A registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `_id`.
    pub id: ObjectId,
    /// Owning organisation.
    pub org: ObjectId,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Event types subscribed to (`job.completed`, …).
    pub events: Vec<String>,
    /// The signing secret; empty where a registration is read to be shown.
    pub secret: String,
    /// Registered at.
    pub created_at: DateTime,
}

/// A delivery to queue: one per webhook and job.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    /// `_id`, also the `Bulk-Webhook-Id` header.
    pub id: ObjectId,
    /// Organisation of the webhook and the job.
    pub org: ObjectId,
    /// The webhook.
    pub webhook_id: ObjectId,
    /// The job whose event it carries.
    pub job_id: String,
    /// Event type.
    pub kind: String,
    /// The JSON body, signed as is.
    pub body: String,
    /// Queued at: due at once.
    pub created_at: DateTime,
}

/// A delivery claimed by a worker, under a lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// The delivery.
    pub id: ObjectId,
    /// Its webhook.
    pub webhook_id: ObjectId,
    /// The claim's token: only its holder records or drops the delivery.
    pub token: String,
    /// The JSON body.
    pub body: String,
    /// Attempts made before this one.
    pub attempts: i32,
    /// Queued at (the retry window runs from here).
    pub created_at: DateTime,
}

/// One attempt, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Started at.
    pub at: DateTime,
    /// The receiver's HTTP status, if it answered.
    pub status_code: Option<i32>,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: i64,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Delivered at this time: never sent again.
    Delivered(DateTime),
    /// Failed: due again at this time.
    RetryAt(DateTime),
    /// Failed, and the retry window is over.
    GaveUp,
}

/// The status of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Due now or later (or being sent, under a lease).
    Pending,
    /// Delivered.
    Succeeded,
    /// Given up (or set aside as malformed).
    Failed,
}

impl DeliveryStatus {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// From its stored name.
    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "succeeded" => Some(DeliveryStatus::Succeeded),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// A delivery as its webhook's log shows it (never its body nor lease token).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// `_id`.
    pub id: ObjectId,
    /// Event type.
    pub kind: Option<String>,
    /// The job.
    pub job_id: Option<String>,
    /// Where it stands.
    pub status: Option<DeliveryStatus>,
    /// Attempts made.
    pub attempts: Option<i64>,
    /// Queued at.
    pub created_at: Option<DateTime>,
    /// Due at (a pending one).
    pub next_attempt_at: Option<DateTime>,
    /// Delivered at.
    pub delivered_at: Option<DateTime>,
    /// The last attempt's status code.
    pub last_status_code: Option<i64>,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// The last [`LOG_LEN`] attempts, oldest first.
    pub log: Vec<Attempt>,
}

/// What asking to retry a delivery came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Retry {
    /// Due now (pending again).
    Due(Box<Delivery>),
    /// It succeeded: not sent again.
    Succeeded,
    /// A worker holds it right now.
    Busy,
    /// No such delivery of this webhook and organisation.
    NotFound,
}

/// Webhook registrations and their delivery outbox.
#[async_trait]
pub trait WebhookRepo: Send + Sync + 'static {
    /// Creates the indexes the queries need (one delivery per webhook and job).
    async fn ensure_indexes(&self) -> Result<(), JobError>;

    /// Stores `hook` unless its organisation would then have more than `max`
    /// registrations (`false`: nothing stays stored).
    async fn register(&self, hook: &Hook, max: u64) -> Result<bool, JobError>;

    /// The organisation's registrations (secrets left out), oldest first.
    async fn hooks_of(&self, org: ObjectId, limit: i64) -> Result<Vec<Hook>, JobError>;

    /// One registration of `org` (secret left out).
    async fn hook_of(&self, org: ObjectId, id: ObjectId) -> Result<Option<Hook>, JobError>;

    /// One registration with its secret, to sign a delivery.
    async fn hook(&self, id: ObjectId) -> Result<Option<Hook>, JobError>;

    /// Removes a registration of `org` and every delivery of it; `false`
    /// when there was none.
    async fn remove(&self, org: ObjectId, id: ObjectId) -> Result<bool, JobError>;

    /// `(id, createdAt)` of the webhooks of `org` subscribed to `event`.
    async fn subscribers(
        &self,
        org: ObjectId,
        event: &str,
    ) -> Result<Vec<(ObjectId, DateTime)>, JobError>;

    /// Every registration (secrets left out), for the sweep.
    async fn all_hooks(&self) -> Result<Vec<Hook>, JobError>;

    /// Queues a delivery unless that webhook has one for that job; whether it
    /// was created.
    async fn enqueue(&self, delivery: &NewDelivery) -> Result<bool, JobError>;

    /// Which `(webhook, job)` pairs among these have a delivery.
    async fn queued(
        &self,
        hooks: &[ObjectId],
        jobs: &[&str],
    ) -> Result<HashSet<(ObjectId, String)>, JobError>;

    /// Claims the most overdue pending delivery due at `now`, for `lease`.
    /// A malformed one is set aside as failed (and `None` returned).
    async fn claim(&self, now: DateTime, lease: Duration) -> Result<Option<Claim>, JobError>;

    /// Records an attempt (the delivery's `attempts`-th) under the claim's
    /// token; `false` when the lease was lost meanwhile (nothing written).
    async fn record(
        &self,
        claim: &Claim,
        attempts: i32,
        attempt: &Attempt,
        next: Next,
    ) -> Result<bool, JobError>;

    /// Drops a claimed delivery whose webhook is gone (under the claim's token).
    async fn drop_claimed(&self, claim: &Claim) -> Result<(), JobError>;

    /// Removes ended deliveries (succeeded, failed) queued before `before`.
    async fn prune(&self, before: DateTime) -> Result<u64, JobError>;

    /// A webhook's deliveries, newest first.
    async fn deliveries(
        &self,
        org: ObjectId,
        hook: ObjectId,
        limit: i64,
    ) -> Result<Vec<Delivery>, JobError>;

    /// Makes a pending or given-up delivery that no worker holds due at `now`.
    async fn retry(
        &self,
        org: ObjectId,
        hook: ObjectId,
        delivery: ObjectId,
        now: DateTime,
    ) -> Result<Retry, JobError>;
}
