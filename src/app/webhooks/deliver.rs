//! The outbox workers: every instance claims due deliveries from
//! `webhook_deliveries` with a lease (so that two instances do not send the
//! same one at once), POSTs them signed, and records the attempt: delivered,
//! retried later with exponential backoff, or given up after the retry window.
//! A worker that dies mid-attempt leaves its delivery due again when the lease
//! ends: at least once. A delivery recorded as succeeded is never claimed again.

use std::time::{Duration, Instant};

use bson::DateTime;
use contact_bulk_actors::repo::webhooks::{Attempt, Claim, Next};
use contact_bulk_actors::JobError;
use rand::Rng;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::redirect::Policy;
use std::sync::Arc;

use super::ssrf::{self, GuardedResolver, Refused};
use super::{record_attempt_metric, sign, AttemptResult, WebhookConfig, Webhooks};
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
    async fn claim(&self) -> Result<Option<Claim>, JobError> {
        self.inner
            .repo
            .claim(self.now(), self.inner.config.lease())
            .await
    }

    /// Sends one claimed delivery and records the attempt.
    async fn attempt(&self, client: &reqwest::Client, d: Claim) {
        let hook = match self.inner.repo.hook(d.webhook_id).await {
            Ok(Some(h)) => h,
            Ok(None) => {
                // The webhook was deleted meanwhile: nothing to send any more.
                let _ = self.inner.repo.drop_claimed(&d).await;
                return;
            }
            Err(e) => {
                // The lease ends and the delivery is due again: no attempt made.
                tracing::warn!(error = %e, "webhook not readable; delivery postponed");
                return;
            }
        };
        let at = self.now();
        let started = Instant::now();
        let outcome = self.send(client, &hook.url, &hook.secret, &d).await;
        let duration_ms = started.elapsed().as_millis() as i64;
        self.record(&d, at, duration_ms, outcome).await;
    }

    async fn send(&self, client: &reqwest::Client, url: &str, secret: &str, d: &Claim) -> Outcome {
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

    /// What follows a failed or successful attempt number `attempts` of `d`:
    /// delivered, due again after the backoff (±10 % jitter), or given up
    /// when that would be past the retry window.
    fn next(&self, d: &Claim, attempts: i32, delivered: bool) -> (Next, AttemptResult) {
        let config = &self.inner.config;
        let now = self.now();
        if delivered {
            return (Next::Delivered(now), AttemptResult::Succeeded);
        }
        let delay = config
            .backoff(attempts)
            .mul_f64(rand::rng().random_range(0.9..1.1));
        let next = now.timestamp_millis() + delay.as_millis() as i64;
        let window_end = d.created_at.timestamp_millis() + config.retry_for_ms as i64;
        if next > window_end {
            (Next::GaveUp, AttemptResult::GaveUp)
        } else {
            (
                Next::RetryAt(DateTime::from_millis(next)),
                AttemptResult::Failed,
            )
        }
    }

    /// Writes the attempt's result, guarded by the claim's token; retried
    /// while the lease lasts, so that a delivered webhook is not sent again
    /// because MongoDB blinked.
    async fn record(&self, d: &Claim, at: DateTime, duration_ms: i64, outcome: Outcome) {
        let config = &self.inner.config;
        let attempts = d.attempts + 1;
        let attempt = Attempt {
            at,
            status_code: outcome.status.map(i32::from),
            error: outcome.error.clone(),
            duration_ms,
        };
        let (next, result) = self.next(d, attempts, outcome.delivered());
        let deadline = Instant::now() + config.lease().saturating_sub(config.timeout());
        loop {
            match self.inner.repo.record(d, attempts, &attempt, next).await {
                Ok(matched) => {
                    if !matched {
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

#[cfg(test)]
mod tests;
