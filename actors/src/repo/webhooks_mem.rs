//! [`WebhookRepo`] in memory, with MongoDB's rules: the registration cap,
//! one delivery per webhook and job, claims under a lease and a token, a log
//! of the last [`LOG_LEN`] attempts. Times are the caller's, so tests run it
//! on tokio's paused clock.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bson::{oid::ObjectId, DateTime};

use super::webhooks::{
    Attempt, Claim, Delivery, DeliveryStatus, Hook, NewDelivery, Next, Retry, WebhookRepo, LOG_LEN,
};
use crate::error::JobError;

#[derive(Debug, Clone)]
struct Stored {
    new: NewDelivery,
    status: DeliveryStatus,
    attempts: i32,
    next_attempt_at: DateTime,
    delivered_at: Option<DateTime>,
    last: Option<Attempt>,
    token: Option<String>,
    log: Vec<Attempt>,
}

#[derive(Debug, Default)]
struct Data {
    hooks: BTreeMap<ObjectId, Hook>,
    deliveries: BTreeMap<ObjectId, Stored>,
}

/// In-memory registrations and outbox; clones share them.
#[derive(Debug, Clone, Default)]
pub struct MemWebhooks {
    data: Arc<Mutex<Data>>,
}

impl MemWebhooks {
    /// Empty.
    pub fn new() -> MemWebhooks {
        MemWebhooks::default()
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every delivery as its log shows it, in `_id` order.
    pub fn all_deliveries(&self) -> Vec<Delivery> {
        self.data().deliveries.values().map(view).collect()
    }
}

fn view(s: &Stored) -> Delivery {
    Delivery {
        id: s.new.id,
        kind: Some(s.new.kind.clone()),
        job_id: Some(s.new.job_id.clone()),
        status: Some(s.status),
        attempts: Some(i64::from(s.attempts)),
        created_at: Some(s.new.created_at),
        next_attempt_at: Some(s.next_attempt_at),
        delivered_at: s.delivered_at,
        last_status_code: s.last.as_ref().and_then(|a| a.status_code).map(i64::from),
        last_error: s.last.as_ref().and_then(|a| a.error.clone()),
        log: s.log.clone(),
    }
}

fn shown(h: &Hook) -> Hook {
    Hook {
        secret: String::new(),
        ..h.clone()
    }
}

#[async_trait]
impl WebhookRepo for MemWebhooks {
    async fn ensure_indexes(&self) -> Result<(), JobError> {
        Ok(())
    }

    async fn register(&self, hook: &Hook, max: u64) -> Result<bool, JobError> {
        let mut d = self.data();
        let have = d.hooks.values().filter(|h| h.org == hook.org).count() as u64;
        if have + 1 > max {
            return Ok(false);
        }
        d.hooks.insert(hook.id, hook.clone());
        Ok(true)
    }

    async fn hooks_of(&self, org: ObjectId, limit: i64) -> Result<Vec<Hook>, JobError> {
        let mut list: Vec<Hook> = self
            .data()
            .hooks
            .values()
            .filter(|h| h.org == org)
            .map(shown)
            .collect();
        list.sort_by_key(|h| (h.created_at, h.id));
        list.truncate(limit.max(0) as usize);
        Ok(list)
    }

    async fn hook_of(&self, org: ObjectId, id: ObjectId) -> Result<Option<Hook>, JobError> {
        Ok(self
            .data()
            .hooks
            .get(&id)
            .filter(|h| h.org == org)
            .map(shown))
    }

    async fn hook(&self, id: ObjectId) -> Result<Option<Hook>, JobError> {
        Ok(self.data().hooks.get(&id).cloned())
    }

    async fn remove(&self, org: ObjectId, id: ObjectId) -> Result<bool, JobError> {
        let mut d = self.data();
        if d.hooks.get(&id).is_none_or(|h| h.org != org) {
            return Ok(false);
        }
        d.hooks.remove(&id);
        d.deliveries.retain(|_, s| s.new.webhook_id != id);
        Ok(true)
    }

    async fn subscribers(
        &self,
        org: ObjectId,
        event: &str,
    ) -> Result<Vec<(ObjectId, DateTime)>, JobError> {
        Ok(self
            .data()
            .hooks
            .values()
            .filter(|h| h.org == org && h.events.iter().any(|e| e == event))
            .map(|h| (h.id, h.created_at))
            .collect())
    }

    async fn all_hooks(&self) -> Result<Vec<Hook>, JobError> {
        Ok(self.data().hooks.values().map(shown).collect())
    }

    async fn enqueue(&self, new: &NewDelivery) -> Result<bool, JobError> {
        let mut d = self.data();
        let exists = d
            .deliveries
            .values()
            .any(|s| s.new.webhook_id == new.webhook_id && s.new.job_id == new.job_id);
        if exists || d.deliveries.contains_key(&new.id) {
            return Ok(false);
        }
        d.deliveries.insert(
            new.id,
            Stored {
                new: new.clone(),
                status: DeliveryStatus::Pending,
                attempts: 0,
                next_attempt_at: new.created_at,
                delivered_at: None,
                last: None,
                token: None,
                log: Vec::new(),
            },
        );
        Ok(true)
    }

    async fn queued(
        &self,
        hooks: &[ObjectId],
        jobs: &[&str],
    ) -> Result<HashSet<(ObjectId, String)>, JobError> {
        Ok(self
            .data()
            .deliveries
            .values()
            .filter(|s| hooks.contains(&s.new.webhook_id) && jobs.contains(&s.new.job_id.as_str()))
            .map(|s| (s.new.webhook_id, s.new.job_id.clone()))
            .collect())
    }

    async fn claim(&self, now: DateTime, lease: Duration) -> Result<Option<Claim>, JobError> {
        let mut d = self.data();
        let due = d
            .deliveries
            .values_mut()
            .filter(|s| s.status == DeliveryStatus::Pending && s.next_attempt_at <= now)
            .min_by_key(|s| s.next_attempt_at);
        let Some(s) = due else {
            return Ok(None);
        };
        let token = uuid::Uuid::new_v4().to_string();
        s.next_attempt_at =
            DateTime::from_millis(now.timestamp_millis() + lease.as_millis() as i64);
        s.token = Some(token.clone());
        Ok(Some(Claim {
            id: s.new.id,
            webhook_id: s.new.webhook_id,
            token,
            body: s.new.body.clone(),
            attempts: s.attempts,
            created_at: s.new.created_at,
        }))
    }

    async fn record(
        &self,
        claim: &Claim,
        attempts: i32,
        attempt: &Attempt,
        next: Next,
    ) -> Result<bool, JobError> {
        let mut d = self.data();
        let Some(s) = d
            .deliveries
            .get_mut(&claim.id)
            .filter(|s| s.token.as_deref() == Some(claim.token.as_str()))
        else {
            return Ok(false);
        };
        s.attempts = attempts;
        s.last = Some(attempt.clone());
        s.token = None;
        match next {
            Next::Delivered(at) => {
                s.status = DeliveryStatus::Succeeded;
                s.delivered_at = Some(at);
            }
            Next::RetryAt(at) => s.next_attempt_at = at,
            Next::GaveUp => s.status = DeliveryStatus::Failed,
        }
        s.log.push(attempt.clone());
        let over = s.log.len().saturating_sub(LOG_LEN as usize);
        s.log.drain(..over);
        Ok(true)
    }

    async fn drop_claimed(&self, claim: &Claim) -> Result<(), JobError> {
        let mut d = self.data();
        if d.deliveries
            .get(&claim.id)
            .is_some_and(|s| s.token.as_deref() == Some(claim.token.as_str()))
        {
            d.deliveries.remove(&claim.id);
        }
        Ok(())
    }

    async fn prune(&self, before: DateTime) -> Result<u64, JobError> {
        let mut d = self.data();
        let n = d.deliveries.len();
        d.deliveries
            .retain(|_, s| s.status == DeliveryStatus::Pending || s.new.created_at >= before);
        Ok((n - d.deliveries.len()) as u64)
    }

    async fn deliveries(
        &self,
        org: ObjectId,
        hook: ObjectId,
        limit: i64,
    ) -> Result<Vec<Delivery>, JobError> {
        let d = self.data();
        let mut list: Vec<&Stored> = d
            .deliveries
            .values()
            .filter(|s| s.new.webhook_id == hook && s.new.org == org)
            .collect();
        list.sort_by_key(|s| std::cmp::Reverse((s.new.created_at, s.new.id)));
        Ok(list
            .into_iter()
            .take(limit.max(0) as usize)
            .map(view)
            .collect())
    }

    async fn retry(
        &self,
        org: ObjectId,
        hook: ObjectId,
        delivery: ObjectId,
        now: DateTime,
    ) -> Result<Retry, JobError> {
        let mut d = self.data();
        let Some(s) = d
            .deliveries
            .get_mut(&delivery)
            .filter(|s| s.new.webhook_id == hook && s.new.org == org)
        else {
            return Ok(Retry::NotFound);
        };
        if s.status == DeliveryStatus::Succeeded {
            return Ok(Retry::Succeeded);
        }
        if s.token.is_some() {
            return Ok(Retry::Busy);
        }
        s.status = DeliveryStatus::Pending;
        s.next_attempt_at = now;
        Ok(Retry::Due(Box::new(view(s))))
    }
}
