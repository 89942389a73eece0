//! Event publishing to JetStream: the `BULK_EVENTS` stream, job events and `contact_removed`.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use contact_bulk_actors::events::{EventSink, JobEventKind, RemovedContact};
use contact_bulk_actors::model::{rfc3339, JobRecord};
use contact_bulk_actors::JobError;
use contact_bulk_protocol::events::{ContactRemoved, ContactRemovedType, JobEvent, JobEventType};
use contact_bulk_protocol::subjects::Subjects;
use futures::future::BoxFuture;

use crate::auth::Keys;
use crate::commands::decorate;
use crate::config::Config;

/// How long JetStream remembers `Nats-Msg-Id`s: replays of a crashed batch
/// within this window are dropped by the server.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(20 * 60);

/// Creates (or updates) the events and intake streams, each with
/// `BULK_STREAM_REPLICAS` replicas (an existing stream's replica count is
/// changed to it: JetStream moves a stream between R1 and R3 in place).
pub async fn ensure_streams(js: &jetstream::Context, config: &Config) -> anyhow::Result<()> {
    let replicas = usize::from(config.stream_replicas.max(1));
    let events = stream::Config {
        name: config.events_stream(),
        subjects: vec![config.subjects().events_all()],
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: DEDUP_WINDOW,
        num_replicas: replicas,
        ..Default::default()
    };
    upsert_stream(js, events).await?;
    let submit = stream::Config {
        name: config.submit_stream(),
        subjects: vec![config.subjects().submit_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(3600),
        num_replicas: replicas,
        ..Default::default()
    };
    upsert_stream(js, submit).await?;
    Ok(())
}

async fn upsert_stream(js: &jetstream::Context, cfg: stream::Config) -> anyhow::Result<()> {
    let name = cfg.name.clone();
    match js.get_stream(&name).await {
        Ok(_) => {
            js.update_stream(cfg).await?;
        }
        Err(_) => {
            js.create_stream(cfg).await?;
        }
    }
    tracing::info!(stream = name, "stream ready");
    Ok(())
}

/// Publishes job events and `contact_removed` to JetStream.
pub struct NatsSink {
    js: jetstream::Context,
    keys: Keys,
    subjects: Subjects,
}

impl NatsSink {
    /// A sink publishing under `prefix` (`bulk`).
    pub fn new(js: jetstream::Context, keys: Keys, prefix: &str) -> NatsSink {
        NatsSink {
            js,
            keys,
            subjects: Subjects::new(prefix),
        }
    }
}

fn nats_err(e: impl std::fmt::Display) -> JobError {
    JobError::Internal(format!("nats: {e}"))
}

impl EventSink for NatsSink {
    fn job_event(
        &self,
        kind: JobEventKind,
        job: &JobRecord,
    ) -> BoxFuture<'_, Result<(), JobError>> {
        let subject = self.subjects.job_events(&job.org_id.to_hex(), &job.job_id);
        let body = JobEvent {
            kind: match kind {
                JobEventKind::Progress => JobEventType::Progress,
                JobEventKind::Status => JobEventType::Status,
            },
            job: decorate(&self.keys, job),
        };
        Box::pin(async move {
            let payload = serde_json::to_vec(&body).map_err(nats_err)?;
            self.js
                .publish(subject, payload.into())
                .await
                .map_err(nats_err)?
                .await
                .map_err(nats_err)?;
            Ok(())
        })
    }

    fn contacts_removed<'a>(
        &'a self,
        removed: &'a [RemovedContact],
    ) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            let mut acks = Vec::with_capacity(removed.len());
            for r in removed {
                let subject = self.subjects.contact_removed(&r.org_id.to_hex());
                let body = ContactRemoved {
                    kind: ContactRemovedType::ContactRemoved,
                    org_id: r.org_id.to_hex(),
                    contact_id: r.contact_id.to_hex(),
                    job_id: r.job_id.clone(),
                    pipeline_type: r.pipeline_type,
                    owner_id: r.owner_id.map(|o| o.to_hex()),
                    at: rfc3339(r.at),
                };
                let payload = serde_json::to_vec(&body).map_err(nats_err)?;
                let msg = PublishMessage::build()
                    .payload(payload.into())
                    .message_id(body.msg_id());
                // Sent back to back; acks are awaited together below.
                acks.push(self.js.send_publish(subject, msg).await.map_err(nats_err)?);
            }
            for ack in futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
                ack.map_err(nats_err)?;
            }
            Ok(())
        })
    }
}
