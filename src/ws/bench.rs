//! Latency benchmark of the bridge: many WebSocket clients on topic `jobs`,
//! synthetic `job.progress` events published straight to JetStream, and the
//! time from publish to arrival at each client.
//!
//! It carries a deliberately small WebSocket client (text frames, ping/pong,
//! close) so the library does not need a client crate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use bson::oid::ObjectId;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

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

    let nats = async_nats::connect(crate::config::nats_servers(nats_url)?)
        .await
        .context("connecting to nats")?;
    let js = async_nats::jetstream::new(nats);
    let job_id = uuid::Uuid::new_v4().to_string();
    let subject = format!("{prefix}.v1.events.{}.job.{job_id}", org.to_hex());
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    for i in 0..=events {
        tick.tick().await;
        let last = i == events;
        let body = json!({
            "type": if last { "job.status" } else { "job.progress" },
            "job": fake_job(&job_id, org, i, events, last),
        });
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

fn fake_job(job_id: &str, org: ObjectId, i: usize, total: usize, last: bool) -> Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    json!({
        "jobId": job_id, "kind": "export", "orgId": org.to_hex(), "commandId": null,
        "status": if last { "completed" } else { "processing" },
        "total": total, "processed": i,
        "counts": {"contacts": 0, "conversations": 0, "messages": 0},
        // The bridge forwards the job untouched: the publish time rides along.
        "error": format!("bench:{micros}"),
        "attempts": 1, "createdAt": now, "startedAt": now,
        "finishedAt": if last { Value::from(now.clone()) } else { Value::Null },
        "result": null,
    })
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

/// A minimal WebSocket client.
struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    /// Connects, subscribes to topic `jobs` and waits for the pong that
    /// proves the subscription is in place.
    async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Client> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (read, mut writer) = tcp.into_split();
        let mut reader = BufReader::new(read);
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let request = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        writer.write_all(request.as_bytes()).await?;
        let mut status = String::new();
        reader.read_line(&mut status).await?;
        anyhow::ensure!(
            status.contains(" 101 "),
            "upgrade refused: {}",
            status.trim()
        );
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await? == 0 {
                anyhow::bail!("connection closed during the handshake");
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut client = Client { reader, writer };
        client
            .send(br#"{"op":"subscribe","topic":"jobs"}"#, 0x1)
            .await?;
        client.send(br#"{"op":"ping"}"#, 0x1).await?;
        loop {
            let text = client
                .next_text()
                .await?
                .context("closed before the pong")?;
            if text.contains(r#""type":"pong""#) {
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

    /// Sends one masked frame.
    async fn send(&mut self, payload: &[u8], opcode: u8) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask: [u8; 4] = rand::random();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.writer.write_all(&frame).await?;
        Ok(())
    }

    /// The next text message (answering pings on the way); `None` on close.
    async fn next_text(&mut self) -> anyhow::Result<Option<String>> {
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            if self.reader.read_exact(&mut head).await.is_err() {
                return Ok(None);
            }
            let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
            let len = match head[1] & 0x7f {
                126 => u64::from(self.reader.read_u16().await?),
                127 => self.reader.read_u64().await?,
                n => u64::from(n),
            };
            anyhow::ensure!(head[1] & 0x80 == 0, "server frames are never masked");
            anyhow::ensure!(len <= 16 << 20, "frame of {len} bytes");
            let mut payload = vec![0u8; usize::try_from(len)?];
            self.reader.read_exact(&mut payload).await?;
            match opcode {
                0x8 => return Ok(None),
                0x9 => self.send(&payload, 0xA).await?,
                0xA => {}
                0x0..=0x2 => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return Ok(Some(String::from_utf8(message)?));
                    }
                }
                other => anyhow::bail!("unexpected opcode {other}"),
            }
        }
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
