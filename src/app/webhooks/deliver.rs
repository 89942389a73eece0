//! The outbox workers: every instance claims due deliveries from
//! `webhook_deliveries` with a lease (so that two instances do not send the
//! same one at once), POSTs them signed, and records the attempt: delivered,
//! retried later with exponential backoff, or given up after the retry window.
//! A worker that dies mid-attempt leaves its delivery due again when the lease
//! ends: at least once. A delivery recorded as succeeded is never claimed again.

use std::time::{Duration, Instant};

use bson::{doc, oid::ObjectId, Bson, DateTime};
use mongodb::options::ReturnDocument;
use rand::Rng;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::redirect::Policy;
use std::sync::Arc;

use super::ssrf::{self, GuardedResolver, Refused};
use super::{record_attempt_metric, sign, AttemptResult, WebhookConfig, Webhooks, LOG_LEN};
use crate::auth::now_secs;

/// The delivery client: no redirects, no proxies, the attempt timeout, and a
/// resolver that refuses special addresses (pinned: the address checked is
/// the address connected to).
pub(super) fn client(config: &WebhookConfig) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(Policy::none())
        .no_proxy()
        .timeout(config.timeout())
        .connect_timeout(config.timeout())
        .dns_resolver(Arc::new(GuardedResolver {
            allow_private: config.allow_private,
        }))
        .user_agent(concat!("contact-bulk-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// One worker: claims and sends due deliveries; idle, it waits for new ones
/// (woken by the consumer on this instance, or by its poll for others').
pub(super) async fn work(hooks: Webhooks, client: reqwest::Client) {
    let poll = hooks.inner.config.poll();
    loop {
        let woken = hooks.inner.wake.notified();
        match hooks.claim().await {
            Ok(Some(delivery)) => {
                hooks.attempt(&client, delivery).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "webhook outbox not readable"),
        }
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// A claimed delivery.
struct Claimed {
    id: ObjectId,
    webhook_id: ObjectId,
    token: String,
    body: String,
    attempts: i32,
    created: DateTime,
}

/// What an attempt came to.
struct Outcome {
    status: Option<u16>,
    error: Option<String>,
}

impl Outcome {
    fn delivered(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

impl Webhooks {
    /// Claims the most overdue pending delivery: its `nextAttemptAt` moves a
    /// lease ahead, so no other worker takes it while this one sends it.
    async fn claim(&self) -> Result<Option<Claimed>, mongodb::error::Error> {
        let now = DateTime::now();
        let token = uuid::Uuid::new_v4().to_string();
        let lease_end = DateTime::from_millis(
            now.timestamp_millis() + self.inner.config.lease().as_millis() as i64,
        );
        let doc = self
            .inner
            .deliveries
            .find_one_and_update(
                doc! {"status": "pending", "nextAttemptAt": {"$lte": now}},
                doc! {"$set": {"nextAttemptAt": lease_end, "leaseToken": &token}},
            )
            .sort(doc! {"nextAttemptAt": 1})
            .return_document(ReturnDocument::After)
            .await?;
        let Some(d) = doc else {
            return Ok(None);
        };
        let claimed = (|| {
            Some(Claimed {
                id: d.get_object_id("_id").ok()?,
                webhook_id: d.get_object_id("webhookId").ok()?,
                token,
                body: d.get_str("body").ok()?.to_string(),
                attempts: d.get_i32("attempts").unwrap_or(0),
                created: *d.get_datetime("createdAt").ok()?,
            })
        })();
        if claimed.is_none() {
            tracing::warn!(delivery = %d.get("_id").cloned().unwrap_or(Bson::Null), "malformed webhook delivery set aside");
            let _ = self
                .inner
                .deliveries
                .update_one(
                    doc! {"_id": d.get("_id").cloned().unwrap_or(Bson::Null)},
                    doc! {"$set": {"status": "failed", "lastError": "malformed delivery record"}},
                )
                .await;
        }
        Ok(claimed)
    }

    /// Sends one claimed delivery and records the attempt.
    async fn attempt(&self, client: &reqwest::Client, d: Claimed) {
        let hook = match self.inner.hooks.find_one(doc! {"_id": d.webhook_id}).await {
            Ok(Some(h)) => h,
            Ok(None) => {
                // The webhook was deleted meanwhile: nothing to send any more.
                let _ = self
                    .inner
                    .deliveries
                    .delete_one(doc! {"_id": d.id, "leaseToken": &d.token})
                    .await;
                return;
            }
            Err(e) => {
                // The lease ends and the delivery is due again: no attempt made.
                tracing::warn!(error = %e, "webhook not readable; delivery postponed");
                return;
            }
        };
        let url = hook.get_str("url").unwrap_or_default();
        let secret = hook.get_str("secret").unwrap_or_default();
        let at = DateTime::now();
        let started = Instant::now();
        let outcome = self.send(client, url, secret, &d).await;
        let duration_ms = started.elapsed().as_millis() as i64;
        self.record(&d, at, duration_ms, outcome).await;
    }

    async fn send(
        &self,
        client: &reqwest::Client,
        url: &str,
        secret: &str,
        d: &Claimed,
    ) -> Outcome {
        let config = &self.inner.config;
        // Literal addresses never reach the resolver: checked here, every time.
        let url = match ssrf::parse(url).and_then(|u| {
            ssrf::check_literal(&u, config.allow_private)?;
            Ok(u)
        }) {
            Ok(u) => u,
            Err(e) => {
                return Outcome {
                    status: None,
                    error: Some(format!("address refused: {e}")),
                }
            }
        };
        let t = now_secs();
        let signature = format!("t={t},v1={}", sign(secret, t, d.body.as_bytes()));
        let sent = client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("Bulk-Webhook-Id", d.id.to_hex())
            .header("Bulk-Signature", signature)
            .body(d.body.clone())
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status();
                let error = if status.is_success() {
                    None
                } else if status.is_redirection() {
                    let to = resp
                        .headers()
                        .get(LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .unwrap_or("");
                    Some(format!("redirect to {to:?} not followed"))
                } else {
                    Some(format!("answered {status}"))
                };
                Outcome {
                    status: Some(status.as_u16()),
                    error,
                }
            }
            Err(e) => Outcome {
                status: None,
                error: Some(describe(&e, config.timeout())),
            },
        }
    }

    /// Writes the attempt's result, guarded by the claim's token; retried
    /// while the lease lasts, so that a delivered webhook is not sent again
    /// because MongoDB blinked.
    async fn record(&self, d: &Claimed, at: DateTime, duration_ms: i64, outcome: Outcome) {
        let config = &self.inner.config;
        let attempts = d.attempts + 1;
        let now = DateTime::now();
        let entry = doc! {
            "at": at,
            "statusCode": outcome.status.map(i32::from),
            "error": outcome.error.clone(),
            "durationMs": duration_ms,
        };
        let mut set = doc! {
            "attempts": attempts,
            "lastAttemptAt": at,
            "lastStatusCode": outcome.status.map(i32::from),
            "lastError": outcome.error.clone(),
            "leaseToken": Bson::Null,
        };
        let result = if outcome.delivered() {
            set.insert("status", "succeeded");
            set.insert("deliveredAt", now);
            AttemptResult::Succeeded
        } else {
            let delay = config
                .backoff(attempts)
                .mul_f64(rand::rng().random_range(0.9..1.1));
            let next = now.timestamp_millis() + delay.as_millis() as i64;
            let window_end = d.created.timestamp_millis() + config.retry_for_ms as i64;
            if next > window_end {
                set.insert("status", "failed");
                AttemptResult::GaveUp
            } else {
                set.insert("nextAttemptAt", DateTime::from_millis(next));
                AttemptResult::Failed
            }
        };
        let update = doc! {
            "$set": set,
            "$push": {"log": {"$each": [entry], "$slice": -LOG_LEN}},
        };
        let deadline = Instant::now() + config.lease().saturating_sub(config.timeout());
        loop {
            match self
                .inner
                .deliveries
                .update_one(doc! {"_id": d.id, "leaseToken": &d.token}, update.clone())
                .await
            {
                Ok(r) => {
                    if r.matched_count == 0 {
                        tracing::warn!(delivery = %d.id, "webhook delivery lease lost before its attempt was recorded");
                    }
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "webhook attempt not recorded yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::warn!(delivery = %d.id, error = %e, "webhook attempt not recorded; it will be retried");
                    break;
                }
            }
        }
        record_attempt_metric(result);
        match result {
            AttemptResult::Succeeded => {
                tracing::debug!(delivery = %d.id, attempts, "webhook delivered")
            }
            AttemptResult::Failed => {
                tracing::info!(delivery = %d.id, attempts, error = outcome.error.as_deref().unwrap_or(""), "webhook attempt failed; will retry")
            }
            AttemptResult::GaveUp => {
                tracing::warn!(delivery = %d.id, attempts, error = outcome.error.as_deref().unwrap_or(""), "webhook delivery given up")
            }
        }
    }
}

/// A delivery error in the words of the log: refused address, timeout,
/// connection failure, with the root cause.
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut root = e.to_string();
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<Refused>() {
            return refused.to_string();
        }
        root = s.to_string();
        source = s.source();
    }
    if e.is_timeout() {
        format!("timed out after {} ms", timeout.as_millis())
    } else if e.is_connect() {
        format!("connection failed: {root}")
    } else {
        format!("request failed: {root}")
    }
}
