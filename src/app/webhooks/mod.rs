//! Webhooks (contract section 12): registrations per organisation, and signed
//! deliveries of terminal job events, at least once.
//!
//! Flow: a durable JetStream consumer of the job events in `BULK_EVENTS`
//! ([`fanout`]) turns each terminal `job.status` into one delivery record per
//! matching webhook in the `webhook_deliveries` outbox (unique per webhook and
//! job, so a redelivered event creates nothing twice); every instance works
//! the outbox ([`deliver`]), claiming a due delivery with a lease so that two
//! instances do not send it at once, and records each attempt. Both the
//! consumer's position and the outbox survive restarts of any instance, of
//! NATS and of MongoDB.

mod deliver;
mod fanout;
pub mod ssrf;
mod sweep;

use std::sync::Arc;

use anyhow::Context as _;
use bson::DateTime;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use contact_bulk_actors::repo::{JobRepo, WebhookRepo};

use crate::auth::Keys;
use crate::config::Config;

/// Scope needed to manage webhooks.
pub const SCOPE_WEBHOOKS: &str = "webhooks:manage";

/// Webhooks an organisation may have at once.
pub const MAX_PER_ORG: u64 = 10;

/// The events a webhook can subscribe to.
pub const EVENTS: [&str; 3] = ["job.completed", "job.failed", "job.cancelled"];

pub use contact_bulk_actors::repo::webhooks::{DELIVERIES, LOG_LEN, WEBHOOKS};

pub use crate::config::WebhookConfig;

/// The webhooks of every organisation, and their delivery machinery.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    /// Job records (the sweep reads recently ended jobs).
    jobs: Arc<dyn JobRepo>,
    /// Registrations and the outbox.
    repo: Arc<dyn WebhookRepo>,
    config: WebhookConfig,
    keys: Keys,
    /// The time deliveries are scheduled by (the wall clock; tokio's paused
    /// clock in unit tests).
    clock: Clock,
    /// Wakes idle workers when deliveries were just created.
    wake: Notify,
}

/// A source of the current time.
pub type Clock = Arc<dyn Fn() -> DateTime + Send + Sync>;

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// The handle; nothing runs until [`Webhooks::start`].
    pub fn new(
        repo: Arc<dyn WebhookRepo>,
        jobs: Arc<dyn JobRepo>,
        config: &WebhookConfig,
        keys: Keys,
    ) -> Webhooks {
        Webhooks::with_clock(repo, jobs, config, keys, Arc::new(DateTime::now))
    }

    /// [`Webhooks::new`] on another clock.
    pub fn with_clock(
        repo: Arc<dyn WebhookRepo>,
        jobs: Arc<dyn JobRepo>,
        config: &WebhookConfig,
        keys: Keys,
        clock: Clock,
    ) -> Webhooks {
        Webhooks {
            inner: Arc::new(Inner {
                jobs,
                repo,
                config: config.clone(),
                keys,
                clock,
                wake: Notify::new(),
            }),
        }
    }

    /// Registrations and the outbox.
    pub fn repo(&self) -> &dyn WebhookRepo {
        self.inner.repo.as_ref()
    }

    /// Now, on the webhooks' clock.
    pub fn now(&self) -> DateTime {
        (self.inner.clock)()
    }

    /// Wakes the idle delivery workers of this instance (a delivery is due).
    pub fn wake_workers(&self) {
        self.inner.wake.notify_waiters();
    }

    /// The tunables.
    pub fn config(&self) -> &WebhookConfig {
        &self.inner.config
    }

    /// Creates the indexes: registrations by organisation, one delivery per
    /// webhook and job, due deliveries, and a webhook's recent deliveries.
    pub async fn ensure_indexes(&self) -> anyhow::Result<()> {
        self.inner
            .repo
            .ensure_indexes()
            .await
            .context("webhook indexes")
    }

    /// Creates (or finds) the durable consumer of job events and starts it and
    /// the delivery workers in `tasks`.
    pub async fn start(
        &self,
        js: &async_nats::jetstream::Context,
        config: &Config,
        tasks: &mut JoinSet<()>,
    ) -> anyhow::Result<()> {
        let consumer = fanout::consumer(js, config).await?;
        tasks.spawn(fanout::run(self.clone(), consumer));
        tasks.spawn(sweep::run(self.clone()));
        let client = deliver::client(&self.inner.config)?;
        for _ in 0..self.inner.config.workers.max(1) {
            tasks.spawn(deliver::work(self.clone(), client.clone()));
        }
        Ok(())
    }
}

/// `v1=` of `Bulk-Signature`: hex HMAC-SHA256 of `"<t>.<body>"` keyed by the
/// webhook's secret (its UTF-8 bytes, `whsec_` prefix included).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("hmac accepts any key length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// What one delivery attempt came to, as counted by
/// `bulk_webhook_deliveries_total{result}` (one count per attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// A 2xx answer: delivered.
    Succeeded,
    /// Non-2xx, timeout or connection error: retried later.
    Failed,
    /// Failed, and the retry window is over: the delivery's last attempt.
    GaveUp,
}

impl AttemptResult {
    /// The `result` label.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Succeeded => "success",
            AttemptResult::Failed => "failure",
            AttemptResult::GaveUp => "gave_up",
        }
    }
}

/// Hook for the metrics of section 13: counts one attempt under
/// `bulk_webhook_deliveries_total{result}` (`success`, `failure`, `gave_up`).
/// Called once per recorded attempt; the metrics module (helper `ops`, not yet
/// on main when this was written) adds its counter call here.
pub fn record_attempt_metric(result: AttemptResult) {
    tracing::trace!(result = result.as_str(), "webhook attempt");
    contact_bulk_actors::metrics::webhook_delivery(result.as_str());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn signatures_match_a_plain_hmac_of_t_dot_body() {
        // Stripe's documented construction, computed independently.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"whsec_abc").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        let want = hex::encode(mac.finalize().into_bytes());
        assert_eq!(sign("whsec_abc", 1_700_000_000, b"{\"a\":1}"), want);
        assert_ne!(sign("whsec_abd", 1_700_000_000, b"{\"a\":1}"), want);
    }

    /// The README's receiver-side check, word for word, against [`sign`].
    #[test]
    fn the_readme_verification_accepts_our_signature() {
        fn verify(secret: &str, header: &str, body: &[u8], now: i64) -> bool {
            let field = |k| header.split(',').find_map(|p| p.strip_prefix(k));
            let (Some(t), Some(v1)) = (field("t="), field("v1=")) else {
                return false;
            };
            let Ok(ts) = t.parse::<i64>() else {
                return false;
            };
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(format!("{t}.").as_bytes());
            mac.update(body);
            (now - ts).abs() <= 300
                && hex::decode(v1).is_ok_and(|sig| mac.verify_slice(&sig).is_ok())
        }
        let body = br#"{"id":"x","type":"job.completed"}"#;
        let header = format!("t=1700000000,v1={}", sign("whsec_k", 1_700_000_000, body));
        assert!(verify("whsec_k", &header, body, 1_700_000_010));
        assert!(!verify("whsec_other", &header, body, 1_700_000_010));
        assert!(!verify("whsec_k", &header, b"{}", 1_700_000_010));
        assert!(!verify("whsec_k", &header, body, 1_700_001_000), "too old");
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let c = WebhookConfig {
            allow_private: false,
            backoff_ms: 10_000,
            backoff_max_ms: 3_600_000,
            retry_for_ms: 86_400_000,
            timeout_ms: 10_000,
            workers: 1,
            poll_ms: 1000,
            sweep_ms: 60_000,
            sweep_grace_ms: 30_000,
        };
        assert_eq!(c.backoff(1), Duration::from_secs(10));
        assert_eq!(c.backoff(2), Duration::from_secs(20));
        assert_eq!(c.backoff(5), Duration::from_secs(160));
        assert_eq!(c.backoff(30), Duration::from_secs(3600));
        assert_eq!(c.backoff(1000), Duration::from_secs(3600));
    }
}
