//! From terminal job events to delivery records: a durable JetStream consumer
//! of the job events in `BULK_EVENTS`, shared by every instance, acks an event
//! only once the deliveries it calls for are stored in the outbox. Records are
//! unique per webhook and job, so a redelivered or duplicated event (a crash
//! before the ack, a status published twice) creates nothing twice.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer, DeliverPolicy};
use async_nats::jetstream::AckKind;
use bson::{oid::ObjectId, DateTime};
use contact_bulk_actors::model::rfc3339;
use contact_bulk_actors::repo::webhooks::NewDelivery;
use contact_bulk_protocol::events::{JobEvent, JobEventType, WebhookDelivery};
use contact_bulk_protocol::job::JobSnapshot;
use futures::StreamExt;

use super::Webhooks;
use crate::config::Config;

/// Durable name of the consumer (one per events stream, shared by every instance).
const DURABLE: &str = "webhooks";

/// The durable consumer, created on the first start (from new events on) and
/// found again on every later one, where it resumes at its acknowledged position.
pub(super) async fn consumer(
    js: &async_nats::jetstream::Context,
    config: &Config,
) -> anyhow::Result<Consumer<pull::Config>> {
    let stream = js
        .get_stream(config.events_stream())
        .await
        .context("looking up the events stream")?;
    stream
        .get_or_create_consumer(
            DURABLE,
            pull::Config {
                durable_name: Some(DURABLE.into()),
                description: Some("webhook deliveries of terminal job events".into()),
                filter_subject: config.subjects().job_events("*", "*"),
                deliver_policy: DeliverPolicy::New,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("webhooks consumer: {e}"))
}

/// Consumes for ever: a broken message stream (NATS restarted, consumer
/// recreated) is reopened after a pause.
pub(super) async fn run(hooks: Webhooks, consumer: Consumer<pull::Config>) {
    loop {
        if let Err(e) = consume(&hooks, &consumer).await {
            tracing::warn!(error = %e, "webhooks consumer interrupted; reopening");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn consume(hooks: &Webhooks, consumer: &Consumer<pull::Config>) -> anyhow::Result<()> {
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut errors = 0u32;
    while let Some(next) = messages.next().await {
        let msg = match next {
            Ok(m) => {
                errors = 0;
                m
            }
            Err(e) => {
                // Missed heartbeats during a NATS outage recover by themselves;
                // many in a row (a deleted consumer) reopen the stream.
                errors += 1;
                tracing::debug!(error = %e, "webhooks consumer error");
                if errors >= 10 {
                    return Err(anyhow::anyhow!("{e}"));
                }
                continue;
            }
        };
        match hooks.on_event(&msg.payload).await {
            Ok(()) => {
                if let Err(e) = msg.ack().await {
                    // Redelivered after ack_wait; the records are idempotent.
                    tracing::debug!(error = %e, "webhook event not acknowledged");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook deliveries not recorded; event retried");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                    .await;
            }
        }
    }
    Ok(())
}

impl Webhooks {
    /// Records the deliveries a job event calls for: none unless it is the
    /// terminal `job.status` of a job.
    async fn on_event(&self, payload: &[u8]) -> anyhow::Result<()> {
        let Ok(event) = serde_json::from_slice::<JobEvent<JobSnapshot>>(payload) else {
            tracing::warn!("unreadable job event skipped by webhooks");
            return Ok(());
        };
        if event.kind != JobEventType::Status || !event.job.status.is_terminal() {
            return Ok(());
        }
        let job = &event.job;
        let status = job.status.as_str();
        let Ok(org) = ObjectId::parse_str(&job.org_id) else {
            tracing::warn!("job event with a malformed orgId skipped by webhooks");
            return Ok(());
        };
        let job_id = job.job_id.as_str();
        let finished = job
            .finished_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| DateTime::from_millis(t.timestamp_millis()))
            .unwrap_or_else(|| self.now());
        self.enqueue(org, job_id, &format!("job.{status}"), finished, job)
            .await
    }

    /// One delivery per webhook of `org` subscribed to `event_type` and
    /// registered before the job ended; existing ones are left as they are.
    pub(super) async fn enqueue(
        &self,
        org: ObjectId,
        job_id: &str,
        event_type: &str,
        finished: DateTime,
        job: &JobSnapshot,
    ) -> anyhow::Result<()> {
        let hooks = self.inner.repo.subscribers(org, event_type).await?;
        let mut created = 0;
        for (hook_id, registered) in hooks {
            if registered > finished {
                // The job ended before this webhook existed.
                continue;
            }
            let id = ObjectId::new();
            let now = self.now();
            let body = WebhookDelivery {
                id: id.to_hex(),
                kind: event_type.to_string(),
                created_at: rfc3339(now),
                job,
            };
            let delivery = NewDelivery {
                id,
                org,
                webhook_id: hook_id,
                job_id: job_id.to_string(),
                kind: event_type.to_string(),
                body: serde_json::to_string(&body)?,
                created_at: now,
            };
            if self.inner.repo.enqueue(&delivery).await? {
                created += 1;
            }
        }
        if created > 0 {
            tracing::info!(
                job_id,
                event_type,
                deliveries = created,
                "webhook deliveries queued"
            );
            self.wake_workers();
        }
        Ok(())
    }
}
