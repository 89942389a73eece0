//! Latency benchmark of the bridge: many WebSocket clients on topic `jobs`,
//! synthetic `job.progress` events published straight to JetStream, and the
//! time from publish to arrival at each client.
//!
//! The clients are `tokio-tungstenite` WebSockets; events are written with
//! the protocol's types, on the protocol's subjects.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bson::oid::ObjectId;
use contact_bulk_protocol::events::{JobEvent, JobEventType};
use contact_bulk_protocol::job::{Counts, JobKind, JobSnapshot, JobStatus};
use contact_bulk_protocol::subjects::Subjects;
use contact_bulk_protocol::ws::ServerFrame;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Time between two published events (about 50 a second, five times the
/// contract's per-job progress rate).
const PUBLISH_EVERY: Duration = Duration::from_millis(20);
/// Clients connecting at once.
const CONNECT_PARALLELISM: usize = 64;

/// Connects `clients` WebSocket clients subscribed to topic `jobs`, publishes
/// `events` synthetic `job.progress` events (then one terminal `job.status`)
/// for a fake job of `org` on `bulk.v1.events.<org>.job.<id>`, and returns the
/// p50 and p99 of publish → arrival over every frame every client received.
/// Progress frames may coalesce for a client that falls behind (latest wins),
/// so a client can receive fewer frames than were published.
pub async fn bench_latency(
    nats_url: &str,
    addr: SocketAddr,
    org: ObjectId,
    token: &str,
    clients: usize,
    events: usize,
) -> anyhow::Result<(Duration, Duration)> {
    bench_latency_with_prefix(nats_url, "bulk", addr, org, token, clients, events).await
}

/// [`bench_latency`] for a service running under another subject prefix.
pub async fn bench_latency_with_prefix(
    nats_url: &str,
    prefix: &str,
    addr: SocketAddr,
    org: ObjectId,
    token: &str,
    clients: usize,
    events: usize,
) -> anyhow::Result<(Duration, Duration)> {
    anyhow::ensure!(
        clients > 0 && events > 0,
        "clients and events must be positive"
    );
    let base = Instant::now();
    // sent[i]: nanoseconds after `base` at which event i was published.
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..=events).map(|_| AtomicU64::new(0)).collect());
    let connected: Vec<anyhow::Result<Client>> = futures::stream::iter(0..clients)
        .map(|_| Client::connect(addr, token))
        .buffer_unordered(CONNECT_PARALLELISM)
        .collect()
        .await;
    let connected = connected.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    tracing::info!(clients, "bench clients subscribed");
    let readers: Vec<_> = connected
        .into_iter()
        .map(|c| tokio::spawn(c.measure(base, sent.clone())))
        .collect();

    let nats = async_nats::connect(contact_bulk_client::nats_servers(nats_url)?)
        .await
        .context("connecting to nats")?;
    let js = async_nats::jetstream::new(nats);
    let job_id = uuid::Uuid::new_v4().to_string();
    let subject = Subjects::new(prefix).job_events(&org.to_hex(), &job_id);
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    for i in 0..=events {
        tick.tick().await;
        let last = i == events;
        let body = JobEvent {
            kind: if last {
                JobEventType::Status
            } else {
                JobEventType::Progress
            },
            job: fake_job(&job_id, org, i, events, last),
        };
        let payload = serde_json::to_vec(&body)?;
        let at = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        sent[i].store(at, Ordering::Release);
        js.publish(subject.clone(), payload.into()).await?.await?;
    }

    let mut all = Vec::with_capacity(clients * events);
    for r in readers {
        let lat = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .context("a client did not receive the final event within 30 s")??
            .context("bench client failed")?;
        all.extend(lat);
    }
    anyhow::ensure!(!all.is_empty(), "no frame arrived");
    all.sort_unstable();
    let pick = |q: usize| all[((all.len() - 1) * q) / 100];
    Ok((pick(50), pick(99)))
}

fn fake_job(job_id: &str, org: ObjectId, i: usize, total: usize, last: bool) -> JobSnapshot {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    JobSnapshot {
        job_id: job_id.to_string(),
        kind: JobKind::Export,
        org_id: org.to_hex(),
        command_id: None,
        status: if last {
            JobStatus::Completed
        } else {
            JobStatus::Processing
        },
        total: i64::try_from(total).ok(),
        processed: i64::try_from(i).unwrap_or(i64::MAX),
        counts: Counts::default(),
        // The bridge forwards the job untouched: the publish time rides along.
        error: Some(format!("bench:{micros}")),
        attempts: 1,
        waiting: None,
        created_at: now.clone(),
        started_at: Some(now.clone()),
        finished_at: last.then_some(now),
        result: None,
        source_job_id: None,
        restorable_until: None,
        hard_delete: None,
    }
}

/// The `processed` number of a job frame.
fn processed(frame: &str) -> Option<usize> {
    const KEY: &str = r#""processed":"#;
    let rest = &frame[frame.find(KEY)? + KEY.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// One benchmark client: a `tokio-tungstenite` WebSocket on topic `jobs`.
struct Client {
    socket: Socket,
}

impl Client {
    /// Connects, subscribes to topic `jobs` and waits for the pong that
    /// proves the subscription is in place.
    async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Client> {
        let url = format!("ws://{addr}/ws?token={token}");
        let (socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .context("websocket upgrade")?;
        let mut client = Client { socket };
        for op in [
            json!({"op": "subscribe", "topic": "jobs"}),
            json!({"op": "ping"}),
        ] {
            client.socket.send(Message::text(op.to_string())).await?;
        }
        loop {
            let text = client
                .next_text()
                .await?
                .context("closed before the pong")?;
            if matches!(
                serde_json::from_str::<ServerFrame<JobSnapshot>>(&text),
                Ok(ServerFrame::Pong)
            ) {
                return Ok(client);
            }
        }
    }

    /// Reads until the terminal status; the latency of each event frame.
    async fn measure(
        mut self,
        base: Instant,
        sent: Arc<Vec<AtomicU64>>,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut out = Vec::new();
        while let Some(text) = self.next_text().await? {
            let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            // A scan, not a JSON parse: the clients share the CPU being measured.
            let Some(at) = processed(&text).and_then(|i| sent.get(i)) else {
                continue;
            };
            out.push(Duration::from_nanos(
                now.saturating_sub(at.load(Ordering::Acquire)),
            ));
            if text.contains(r#""type":"job.status""#) {
                return Ok(out);
            }
        }
        anyhow::bail!("connection closed before the final event")
    }

    /// The next text frame; `None` once the server closed.
    async fn next_text(&mut self) -> anyhow::Result<Option<String>> {
        while let Some(msg) = self.socket.next().await {
            match msg? {
                Message::Text(t) => return Ok(Some(t.as_str().to_string())),
                Message::Close(_) => return Ok(None),
                // tungstenite answers pings itself.
                _ => continue,
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processed_is_found_without_parsing() {
        let frame = json!({"type": "job.progress", "seq": 3, "job": {"total": 9, "processed": 42}});
        assert_eq!(processed(&frame.to_string()), Some(42));
        assert_eq!(processed(r#"{"type":"pong"}"#), None);
    }
}
