//! Event publishing to JetStream: the `BULK_EVENTS` stream, job events, `contact_removed` and `contact_restored`.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use contact_bulk_actors::events::{EventSink, JobEventKind, RemovedContact, RestoredContact};
use contact_bulk_actors::model::{rfc3339, JobRecord};
use contact_bulk_actors::JobError;
use contact_bulk_protocol::events::{ContactEvent, ContactEventType, JobEvent, JobEventType};
use contact_bulk_protocol::subjects::Subjects;
use futures::future::BoxFuture;

use crate::app::view::decorate;
use crate::auth::Keys;
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
    let replicas = cfg.num_replicas;
    let until = tokio::time::Instant::now() + STREAMS_DEADLINE;
    let mut delay = Duration::from_millis(100);
    loop {
        let error = match upsert_once(js, cfg.clone()).await {
            Ok(()) => {
                tracing::info!(stream = name, replicas, "stream ready");
                return Ok(());
            }
            Err(e) => e,
        };
        // A cluster that is still forming (no meta leader, peers not current)
        // times out or has no peers yet; another instance may have created the
        // stream in between. Only a configuration the servers can never take
        // (R3 on a single server, say) is final at once.
        if is_permanent(&error) || tokio::time::Instant::now() + delay >= until {
            return Err(anyhow::Error::new(error)
                .context(format!("creating stream {name} with {replicas} replica(s)")));
        }
        tracing::warn!(stream = name, replicas, error = %error, retry_in_ms = delay.as_millis() as u64, "stream not ready yet");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// How long a start keeps trying to create or update its streams.
const STREAMS_DEADLINE: Duration = Duration::from_secs(30);

async fn upsert_once(
    js: &jetstream::Context,
    cfg: stream::Config,
) -> Result<(), jetstream::context::CreateStreamError> {
    match js.get_stream(&cfg.name).await {
        Ok(_) => js.update_stream(cfg).await.map(|_| ()),
        Err(_) => js.create_stream(cfg).await.map(|_| ()),
    }
}

fn is_permanent(e: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind as K;
    use jetstream::ErrorCode;
    match e.kind() {
        K::EmptyStreamName | K::InvalidStreamName | K::DomainAndExternalSet => true,
        K::JetStream(err) => [
            ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED,
            ErrorCode::STREAM_INVALID_CONFIG,
            ErrorCode::STREAM_REPLICAS_NOT_UPDATABLE,
        ]
        .contains(&err.error_code()),
        _ => false,
    }
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

/// A publish that failed: an outage (no connection, no responders, no ack in
/// time) unless the server refused the message itself.
fn publish_err(e: jetstream::context::PublishError) -> JobError {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::MaxPayloadExceeded | K::WrongLastMessageId | K::WrongLastSequence => nats_err(e),
        _ => JobError::Unavailable {
            service: contact_bulk_actors::Dependency::Nats,
            message: e.to_string(),
        },
    }
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
                .map_err(publish_err)?
                .await
                .map_err(publish_err)?;
            Ok(())
        })
    }

    fn contacts_removed<'a>(
        &'a self,
        removed: &'a [RemovedContact],
    ) -> BoxFuture<'a, Result<(), JobError>> {
        let events = removed
            .iter()
            .map(|r| ContactEvent {
                kind: ContactEventType::Removed,
                org_id: r.org_id.to_hex(),
                contact_id: r.contact_id.to_hex(),
                job_id: r.job_id.clone(),
                source_job_id: None,
                pipeline_type: r.pipeline_type,
                owner_id: r.owner_id.map(|o| o.to_hex()),
                at: rfc3339(r.at),
            })
            .collect();
        Box::pin(self.contact_events(events))
    }

    fn contacts_restored<'a>(
        &'a self,
        restored: &'a [RestoredContact],
    ) -> BoxFuture<'a, Result<(), JobError>> {
        let events = restored
            .iter()
            .map(|r| ContactEvent {
                kind: ContactEventType::Restored,
                org_id: r.org_id.to_hex(),
                contact_id: r.contact_id.to_hex(),
                job_id: r.job_id.clone(),
                source_job_id: Some(r.source_job_id.clone()),
                pipeline_type: r.pipeline_type,
                owner_id: r.owner_id.map(|o| o.to_hex()),
                at: rfc3339(r.at),
            })
            .collect();
        Box::pin(self.contact_events(events))
    }
}

impl NatsSink {
    /// Publishes per-contact events back to back with `Nats-Msg-Id:
    /// <jobId>:<contactId>` (a repeat after a crash is dropped by the stream),
    /// then waits for every ack.
    async fn contact_events(&self, events: Vec<ContactEvent>) -> Result<(), JobError> {
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let subject = self.subjects.contact_event(&event.org_id, event.kind);
            let payload = serde_json::to_vec(&event).map_err(nats_err)?;
            let msg = PublishMessage::build()
                .payload(payload.into())
                .message_id(event.msg_id());
            acks.push(
                self.js
                    .send_publish(subject, msg)
                    .await
                    .map_err(publish_err)?,
            );
        }
        for ack in futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
            ack.map_err(publish_err)?;
        }
        Ok(())
    }
}
