//! The hub: one JetStream ordered consumer on the events stream per process,
//! parsed once into [`Event`]s and fanned out to every session over a
//! `tokio::sync::broadcast` channel, so a slow session can never hold up NATS
//! consumption (it lags instead, and recovers with fresh snapshots).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::Context;
use axum::extract::ws::Utf8Bytes;
use bson::oid::ObjectId;
use contact_bulk_protocol::events::{
    self as wire, ContactEvent, ContactEventType, JobEventType, JobHead,
};
use contact_bulk_protocol::subjects::{EventSubject, Subjects};
use contact_bulk_protocol::ws::ServerFrame;
use futures::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::broadcast;
use tokio::task::JoinSet;

use crate::config::Config;

/// Events the broadcast channel holds for sessions that fall behind.
const CHANNEL_CAPACITY: usize = 4096;

/// Old messages in a row after which the hub recreates its consumer itself:
/// an ordered consumer recreated before its first message restarts at the
/// beginning of the stream, which must not turn into a full replay.
const MAX_STALE_RUN: u32 = 256;

/// One event of the stream, parsed and checked once for every session.
#[derive(Debug)]
pub struct Event {
    /// Stream sequence.
    pub seq: u64,
    /// Organisation, from the subject (and checked against the payload).
    pub org: ObjectId,
    /// What happened.
    pub body: EventBody,
}

/// The two kinds of event.
#[derive(Debug)]
pub enum EventBody {
    /// `job.progress` or `job.status`.
    Job(JobEvent),
    /// One deleted contact.
    ContactRemoved {
        /// 24-hex id of the contact.
        contact_id: String,
    },
    /// One restored contact.
    ContactRestored {
        /// 24-hex id of the contact.
        contact_id: String,
    },
}

/// A job event with its frame already serialised (shared by every session).
#[derive(Debug)]
pub struct JobEvent {
    /// The job.
    pub job_id: String,
    /// `job.status` (never dropped) rather than `job.progress` (latest wins).
    pub status: bool,
    /// `processed` of the snapshot.
    pub processed: i64,
    /// `{"type", "seq", "job"}`.
    pub frame: Utf8Bytes,
}

/// Fan-out of BULK_EVENTS to WebSocket sessions.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    tx: broadcast::Sender<Arc<Event>>,
    stream: Stream,
    /// `<prefix>.v1.events`
    events_prefix: String,
    subjects: Subjects,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("events_prefix", &self.inner.events_prefix)
            .field("sessions", &self.inner.tx.receiver_count())
            .finish()
    }
}

impl Hub {
    /// Starts one JetStream ordered consumer on the events stream, deliver
    /// policy New, filtered on `<prefix>.v1.events.>`, spawning its reader in
    /// `tasks`; each message becomes an Arc'd parsed event with its stream
    /// sequence and org id, and is sent on a tokio broadcast channel.
    pub async fn start(
        js: Context,
        config: &Config,
        tasks: &mut JoinSet<()>,
    ) -> anyhow::Result<Hub> {
        let subjects = config.subjects();
        let events_prefix = subjects.events_root();
        let mut stream = js
            .get_stream(config.events_stream())
            .await
            .context("looking up the events stream")?;
        // Everything up to here is history: sessions get it through snapshots
        // or `since`, never through the live channel.
        let floor = stream
            .info()
            .await
            .context("events stream info")?
            .state
            .last_sequence;
        let filter = subjects.events_all();
        let messages = consumer(&stream, &filter, DeliverPolicy::New).await?;
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        let hub = Hub {
            inner: Arc::new(Inner {
                tx,
                stream,
                events_prefix,
                subjects,
            }),
        };
        let reader = hub.clone();
        tasks.spawn(async move { reader.read(messages, filter, floor).await });
        tracing::info!(stream = config.events_stream(), "ws hub ready");
        Ok(hub)
    }

    /// Reads the stream forever, recreating the consumer when it ends.
    async fn read(self, mut messages: Ordered, filter: String, mut last: u64) {
        let mut stale = 0u32;
        let mut backoff = Duration::from_millis(250);
        loop {
            match messages.next().await {
                Some(Ok(msg)) => {
                    backoff = Duration::from_millis(250);
                    let seq = match msg.info() {
                        Ok(info) => info.stream_sequence,
                        Err(e) => {
                            tracing::warn!(error = %e, "ws hub: message without stream info");
                            continue;
                        }
                    };
                    if seq <= last {
                        stale += 1;
                        if stale < MAX_STALE_RUN {
                            continue;
                        }
                        tracing::warn!(
                            seq,
                            last,
                            "ws hub: consumer restarted from the past, recreating"
                        );
                    } else {
                        stale = 0;
                        last = seq;
                        match self.parse(msg.subject.as_str(), seq, &msg.payload) {
                            Ok(event) => {
                                // No receivers is fine: nobody is connected.
                                let _ = self.inner.tx.send(Arc::new(event));
                            }
                            Err(e) => {
                                tracing::warn!(subject = %msg.subject, seq, error = %e, "ws hub: event dropped");
                            }
                        }
                        continue;
                    }
                }
                Some(Err(e)) => {
                    // The ordered consumer recovers by itself; don't spin meanwhile.
                    tracing::warn!(error = %e, "ws hub: consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                None => tracing::warn!("ws hub: consumer ended, recreating"),
            }
            // Recreate from the last sequence seen, with backoff.
            loop {
                // A stream that was recreated restarts its sequences: follow it.
                if let Ok(info) = self.inner.stream.get_info().await {
                    if info.state.last_sequence < last {
                        tracing::warn!(
                            last,
                            now = info.state.last_sequence,
                            "ws hub: events stream was reset"
                        );
                        last = info.state.last_sequence;
                    }
                }
                let policy = DeliverPolicy::ByStartSequence {
                    start_sequence: last + 1,
                };
                match consumer(&self.inner.stream, &filter, policy).await {
                    Ok(m) => {
                        messages = m;
                        stale = 0;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ws hub: consumer not recreated, retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    /// A receiver of every event from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.tx.subscribe()
    }

    /// The subject of one job's events.
    pub(crate) fn job_subject(&self, org: ObjectId, job_id: &str) -> String {
        self.inner.subjects.job_events(&org.to_hex(), job_id)
    }

    /// Sequence of the last event stored on `subject`, 0 when there is none.
    pub(crate) async fn last_seq(&self, subject: &str) -> anyhow::Result<u64> {
        match self
            .inner
            .stream
            .get_last_raw_message_by_subject(subject)
            .await
        {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// First and last sequence the stream holds now.
    pub(crate) async fn bounds(&self) -> anyhow::Result<(u64, u64)> {
        let info = self.inner.stream.get_info().await?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }

    /// A temporary ordered consumer of `subject` from `start`, and how many
    /// messages it had pending when created.
    pub(crate) async fn replay(&self, subject: &str, start: u64) -> anyhow::Result<(Ordered, u64)> {
        let consumer = self
            .inner
            .stream
            .create_consumer(OrderedConfig {
                filter_subject: subject.to_string(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await?;
        let pending = consumer.cached_info().num_pending;
        Ok((consumer.messages().await?, pending))
    }

    /// Parses and checks one message: the subject names the organisation
    /// (and job), the payload must agree, or the event is refused.
    pub(crate) fn parse(&self, subject: &str, seq: u64, payload: &[u8]) -> anyhow::Result<Event> {
        parse_event(&self.inner.subjects, subject, seq, payload)
    }
}

async fn consumer(stream: &Stream, filter: &str, policy: DeliverPolicy) -> anyhow::Result<Ordered> {
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: policy,
            ..Default::default()
        })
        .await
        .context("creating the ws hub consumer")?;
    Ok(consumer.messages().await?)
}

/// Parses `<prefix>.v1.events.<org>.job.<jobId>` and
/// `<prefix>.v1.events.<org>.contact_removed` (or `.contact_restored`) with the
/// protocol's event types; the subject and the payload must name the same
/// organisation (and job).
pub(crate) fn parse_event(
    subjects: &Subjects,
    subject: &str,
    seq: u64,
    payload: &[u8],
) -> anyhow::Result<Event> {
    let (org_hex, body) = match subjects
        .parse_event(subject)
        .context("unknown event subject")?
    {
        EventSubject::Job { org, job: job_id } => {
            let event: wire::JobEvent<Box<RawValue>> =
                serde_json::from_slice(payload).context("job event payload")?;
            let head: JobHead =
                serde_json::from_str(event.job.get()).context("job event snapshot")?;
            anyhow::ensure!(head.org_id == org, "payload orgId differs from the subject");
            anyhow::ensure!(
                head.job_id == job_id,
                "payload jobId differs from the subject"
            );
            let status = event.kind == JobEventType::Status;
            let job = event.job;
            let frame = match event.kind {
                JobEventType::Status => ServerFrame::Status { seq, job },
                JobEventType::Progress => ServerFrame::Progress { seq, job },
            };
            let body = EventBody::Job(JobEvent {
                job_id: job_id.to_string(),
                status,
                processed: head.processed,
                frame: super::protocol::frame(&frame),
            });
            (org, body)
        }
        EventSubject::Contact { org, kind } => {
            let event: ContactEvent =
                serde_json::from_slice(payload).context("contact event payload")?;
            anyhow::ensure!(event.kind == kind, "contact event of another type");
            anyhow::ensure!(
                event.org_id == org,
                "payload orgId differs from the subject"
            );
            let contact_id = event.contact_id;
            let body = match kind {
                ContactEventType::Removed => EventBody::ContactRemoved { contact_id },
                ContactEventType::Restored => EventBody::ContactRestored { contact_id },
            };
            (org, body)
        }
    };
    let org = ObjectId::parse_str(org_hex).context("subject org is not an ObjectId")?;
    Ok(Event { seq, org, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn subjects(prefix: &str) -> Subjects {
        Subjects::new(prefix)
    }

    #[test]
    fn job_events_must_agree_with_their_subject() {
        let org = ObjectId::new().to_hex();
        let subject = format!("bulk.v1.events.{org}.job.j1");
        let good = json!({"type": "job.progress", "job": {"jobId": "j1", "orgId": org, "processed": 7, "status": "processing"}});
        let ev = parse_event(&subjects("bulk"), &subject, 9, good.to_string().as_bytes()).unwrap();
        assert_eq!(ev.seq, 9);
        let EventBody::Job(job) = ev.body else {
            panic!("not a job event")
        };
        assert!(!job.status);
        assert_eq!(job.processed, 7);
        let frame: Value = serde_json::from_str(job.frame.as_str()).unwrap();
        assert_eq!(frame["seq"], 9);
        assert_eq!(frame["job"]["processed"], 7);

        let other = ObjectId::new().to_hex();
        let forged = json!({"type": "job.status", "job": {"jobId": "j1", "orgId": other, "status": "failed"}});
        assert!(parse_event(
            &subjects("bulk"),
            &subject,
            1,
            forged.to_string().as_bytes()
        )
        .is_err());
        let wrong_job =
            json!({"type": "job.status", "job": {"jobId": "j2", "orgId": org, "status": "failed"}});
        assert!(parse_event(
            &subjects("bulk"),
            &subject,
            1,
            wrong_job.to_string().as_bytes()
        )
        .is_err());
        assert!(parse_event(&subjects("bulk"), &subject, 1, b"nope").is_err());
        assert!(parse_event(&subjects("other"), &subject, 1, good.to_string().as_bytes()).is_err());
    }

    #[test]
    fn contact_events_must_agree_with_their_subject() {
        let org = ObjectId::new().to_hex();
        let subject = format!("bulk.v1.events.{org}.contact_removed");
        let event = |org: &str| {
            json!({"type": "contact_removed", "orgId": org, "contactId": "c1", "jobId": "j",
                   "pipelineType": "Contact", "ownerId": null, "at": "2026-01-01T00:00:00.000Z"})
        };
        let good = event(&org);
        let ev = parse_event(&subjects("bulk"), &subject, 3, good.to_string().as_bytes()).unwrap();
        assert!(
            matches!(ev.body, EventBody::ContactRemoved { ref contact_id } if contact_id == "c1")
        );
        let forged = event(&ObjectId::new().to_hex());
        assert!(parse_event(
            &subjects("bulk"),
            &subject,
            3,
            forged.to_string().as_bytes()
        )
        .is_err());
    }
}
