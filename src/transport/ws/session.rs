//! One WebSocket connection: a receive task (client operations), an event task
//! (hub events → outbox, filtered by organisation and subscription), a send
//! task (outbox → socket, plus keepalive pings) and one short-lived task per
//! job subscription that sends its snapshot or replays what was missed.
//!
//! A job subscription is *opening* while its snapshot or replay is in flight:
//! live events of that job are buffered meanwhile, then delivered if their
//! sequence is above what the snapshot or replay covered (the floor), so
//! nothing is missed and nothing is sent twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bson::oid::ObjectId;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::hub::{Event, EventBody, Hub, JobEvent};
use super::outbox::{Next, Outbox};
use super::protocol::{self, Op, Target};
use super::Bridge;
use super::MAX_CLIENT_FRAME;
use crate::app::App;
use crate::auth::SCOPE_READ;

mod open;

/// Subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS: usize = 100;
/// How often the server pings.
pub const PING_EVERY: Duration = Duration::from_secs(20);
/// Silence after which a connection is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Live events buffered per opening job subscription before it re-snapshots.
const MAX_OPENING_BUFFER: usize = 1024;

struct JobSub {
    /// Which (re)subscription this is; stale snapshot/replay tasks check it.
    generation: u64,
    /// Events at or below this sequence were covered already.
    floor: u64,
    /// Highest `processed` sent: an older progress is never sent after a newer one.
    last_processed: i64,
    /// `Some` while opening: live events wait here.
    opening: Option<Vec<Arc<Event>>>,
    /// The opening buffer overflowed: re-snapshot with `gap` when opened.
    overflow: bool,
    task: Option<AbortHandle>,
}

#[derive(Default)]
struct Subs {
    jobs: HashMap<String, JobSub>,
    all_jobs: bool,
    contacts: bool,
}

impl Subs {
    fn count(&self) -> usize {
        self.jobs.len() + usize::from(self.all_jobs) + usize::from(self.contacts)
    }
}

/// One connection's shared state.
struct Session {
    app: Arc<App>,
    hub: Hub,
    org: ObjectId,
    outbox: Outbox,
    subs: Mutex<Subs>,
    started: Instant,
    last_seen_ms: AtomicU64,
    generation: AtomicU64,
    closing: Notify,
    /// The token's expiry (seconds since the epoch); an `auth` frame moves it.
    exp: AtomicI64,
    /// Wakes the expiry timer when `exp` moved.
    renewed: Notify,
    /// A last frame sent before the close frame, and the close code.
    goodbye: Mutex<Option<(axum::extract::ws::Utf8Bytes, u16, &'static str)>>,
}

/// Runs a connection until the client leaves, falls silent or too far behind.
pub(super) async fn run(socket: WebSocket, bridge: Bridge, org: ObjectId, exp: i64) {
    let Bridge { app, hub } = bridge;
    let _counted = contact_bulk_actors::metrics::ws_connection();
    let rx = hub.subscribe();
    let session = Arc::new(Session {
        app,
        hub,
        org,
        outbox: Outbox::new(),
        subs: Mutex::new(Subs::default()),
        started: Instant::now(),
        last_seen_ms: AtomicU64::new(0),
        generation: AtomicU64::new(0),
        closing: Notify::new(),
        exp: AtomicI64::new(exp),
        renewed: Notify::new(),
        goodbye: Mutex::new(None),
    });
    tracing::debug!(org_id = %org, "ws connected");
    let (sink, stream) = socket.split();
    let mut send = tokio::spawn(session.clone().send_loop(sink));
    let mut recv = tokio::spawn(session.clone().recv_loop(stream));
    let mut events = tokio::spawn(session.clone().event_loop(rx));
    let reason = tokio::select! {
        _ = &mut send => "send ended",
        _ = &mut recv => "client closed",
        _ = &mut events => "hub stopped",
        _ = session.clone().watchdog() => "keepalive timeout",
        _ = session.clone().expiry() => "token expired",
        _ = session.outbox.overflowed() => "client too slow",
    };
    if reason == "token expired" {
        let frame = protocol::error(
            "token_expired",
            "the token has expired; reconnect with a fresh one",
        );
        *session.goodbye() = Some((frame, 1008, "token expired"));
    }
    if !send.is_finished() && reason != "client too slow" {
        // Let the send task say goodbye, briefly.
        session.closing.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut send).await;
    }
    send.abort();
    recv.abort();
    events.abort();
    session.shutdown();
    tracing::debug!(org_id = %org, reason, "ws closed");
}

impl Session {
    fn subs(&self) -> MutexGuard<'_, Subs> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn goodbye(&self) -> MutexGuard<'_, Option<(axum::extract::ws::Utf8Bytes, u16, &'static str)>> {
        self.goodbye.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let seen = Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(seen)
    }

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn shutdown(&self) {
        let mut subs = self.subs();
        for sub in subs.jobs.values() {
            if let Some(t) = &sub.task {
                t.abort();
            }
        }
        subs.jobs.clear();
    }

    /// Outbox → socket, and a ping every 20 s.
    async fn send_loop(self: Arc<Self>, mut sink: SplitSink<WebSocket, Message>) {
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            let sent = tokio::select! {
                next = self.outbox.next() => match next {
                    Next::Frame(frame) => self.send_frames(&mut sink, frame).await,
                    Next::Overflow => {
                        tracing::info!(org_id = %self.org, "ws client too slow, closing");
                        let _ = sink.send(close(1013, "client too slow")).await;
                        return;
                    }
                },
                _ = ping.tick() => sink.send(Message::Ping(Default::default())).await,
                _ = self.closing.notified() => {
                    let goodbye = self.goodbye().take();
                    let (code, reason) = match goodbye {
                        Some((frame, code, reason)) => {
                            let _ = sink.send(Message::Text(frame)).await;
                            (code, reason)
                        }
                        None => (1000, "bye"),
                    };
                    let _ = sink.send(close(code, reason)).await;
                    return;
                }
            };
            if let Err(e) = sent {
                tracing::debug!(org_id = %self.org, error = %e, "ws send failed");
                return;
            }
        }
    }

    /// Sends `first` and whatever else is queued, then flushes once.
    async fn send_frames(
        &self,
        sink: &mut SplitSink<WebSocket, Message>,
        first: axum::extract::ws::Utf8Bytes,
    ) -> Result<(), axum::Error> {
        sink.feed(Message::Text(first)).await?;
        while let Some(Next::Frame(frame)) = self.outbox.pop() {
            sink.feed(Message::Text(frame)).await?;
        }
        sink.flush().await
    }

    /// Socket → operations.
    async fn recv_loop(self: Arc<Self>, mut stream: SplitStream<WebSocket>) {
        while let Some(msg) = stream.next().await {
            let Ok(msg) = msg else { return };
            self.touch();
            match msg {
                Message::Text(text) => self.handle(text.as_str()),
                Message::Binary(_) => self.outbox.push(protocol::binary()),
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Close(_) => return,
            }
        }
    }

    /// Closes the session when nothing came from the client for 60 s.
    async fn watchdog(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            if self.idle() > IDLE_TIMEOUT {
                return;
            }
        }
    }

    /// Resolves when the token expires: a connection lives no longer than its
    /// token, unless an `auth` frame moved the expiry on.
    async fn expiry(self: Arc<Self>) {
        loop {
            let exp_ms = self.exp.load(Ordering::Relaxed).saturating_mul(1000);
            let left = exp_ms.saturating_sub(chrono::Utc::now().timestamp_millis());
            if left <= 0 {
                return;
            }
            let left = Duration::from_millis(u64::try_from(left).unwrap_or(u64::MAX));
            tokio::select! {
                _ = tokio::time::sleep(left) => {}
                _ = self.renewed.notified() => {}
            }
        }
    }

    /// `{"op": "auth", "token"}`: a valid token of the same organisation with
    /// `jobs:read` replaces the connection's; anything else is refused with an
    /// error frame and changes nothing.
    fn reauth(&self, token: &str) {
        let refused = match self.app.keys.verify(token) {
            Err(e) => Some(protocol::error("unauthorized", e.to_string())),
            Ok(c) if c.org != self.org => Some(protocol::error(
                "forbidden",
                "the token belongs to another organisation",
            )),
            Ok(c) if !c.has(SCOPE_READ) => Some(protocol::error(
                "forbidden",
                format!("token lacks the {SCOPE_READ} scope"),
            )),
            Ok(c) => {
                self.exp.store(c.exp, Ordering::Relaxed);
                self.renewed.notify_one();
                tracing::debug!(org_id = %self.org, exp = c.exp, "ws token renewed");
                None
            }
        };
        if let Some(frame) = refused {
            self.outbox.push(frame);
        }
    }

    /// Hub → outbox.
    async fn event_loop(self: Arc<Self>, mut rx: broadcast::Receiver<Arc<Event>>) {
        loop {
            match rx.recv().await {
                Ok(event) => self.on_event(&event),
                Err(RecvError::Lagged(n)) => self.on_lagged(n),
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// One client frame. Never fails: bad frames get error frames.
    fn handle(self: &Arc<Self>, text: &str) {
        if text.len() > MAX_CLIENT_FRAME {
            self.outbox.push(protocol::too_large(MAX_CLIENT_FRAME));
            return;
        }
        let op = match protocol::parse_op(text) {
            Ok(op) => op,
            Err(e) => {
                tracing::debug!(org_id = %self.org, code = e.code, "ws bad frame");
                self.outbox.push(protocol::refused(e));
                return;
            }
        };
        match op {
            Op::Ping => self.outbox.push_pong(),
            Op::Subscribe(target, since) => self.subscribe(target, since),
            Op::Unsubscribe(target) => self.unsubscribe(target),
            Op::Auth(token) => self.reauth(&token),
        }
    }

    fn subscribe(self: &Arc<Self>, target: Target, since: Option<u64>) {
        let mut subs = self.subs();
        let new = match &target {
            Target::Job(id) => !subs.jobs.contains_key(id),
            Target::Jobs => !subs.all_jobs,
            Target::Contacts => !subs.contacts,
        };
        if new && subs.count() >= MAX_SUBSCRIPTIONS {
            self.outbox.push(protocol::error(
                "too_many_subscriptions",
                format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
            ));
            return;
        }
        tracing::debug!(org_id = %self.org, target = ?target, since, "ws subscribed");
        match target {
            Target::Jobs => subs.all_jobs = true,
            Target::Contacts => subs.contacts = true,
            Target::Job(job_id) => {
                let sub = subs.jobs.entry(job_id.clone()).or_insert(JobSub {
                    generation: 0,
                    floor: 0,
                    last_processed: 0,
                    opening: None,
                    overflow: false,
                    task: None,
                });
                self.open(sub, job_id, since, false);
            }
        }
    }

    fn unsubscribe(&self, target: Target) {
        let mut subs = self.subs();
        tracing::debug!(org_id = %self.org, target = ?target, "ws unsubscribed");
        match target {
            Target::Jobs => subs.all_jobs = false,
            Target::Contacts => subs.contacts = false,
            Target::Job(job_id) => {
                if let Some(t) = subs.jobs.remove(&job_id).and_then(|s| s.task) {
                    t.abort();
                }
            }
        }
    }

    fn on_event(&self, event: &Arc<Event>) {
        // Org isolation: the hub checked that subject and payload agree.
        if event.org != self.org {
            return;
        }
        match &event.body {
            EventBody::Job(job) => {
                let mut subs = self.subs();
                if let Some(sub) = subs.jobs.get_mut(&job.job_id) {
                    match sub.opening.as_mut() {
                        Some(buf) if buf.len() >= MAX_OPENING_BUFFER => sub.overflow = true,
                        Some(buf) => buf.push(event.clone()),
                        None => deliver(sub, event, job, &self.outbox),
                    }
                } else if subs.all_jobs {
                    push_job(job, &self.outbox);
                }
            }
            EventBody::ContactRemoved { contact_id } => {
                if self.subs().contacts {
                    self.outbox.push_contact(event.seq, contact_id.clone());
                }
            }
            EventBody::ContactRestored { contact_id } => {
                if self.subs().contacts {
                    self.outbox.push_contact_event(
                        event.seq,
                        "contact_restored",
                        contact_id.clone(),
                    );
                }
            }
        }
    }

    /// The session fell behind the hub: fresh snapshots (`gap: true`) for its
    /// jobs, an error frame for its topics.
    fn on_lagged(self: &Arc<Self>, missed: u64) {
        tracing::info!(org_id = %self.org, missed, "ws session lagged");
        let mut subs = self.subs();
        let ids: Vec<String> = subs.jobs.keys().cloned().collect();
        for id in ids {
            if let Some(sub) = subs.jobs.get_mut(&id) {
                if sub.opening.is_some() {
                    sub.overflow = true;
                } else {
                    self.open(sub, id, None, true);
                }
            }
        }
        if subs.all_jobs || subs.contacts {
            self.outbox.push(protocol::error(
                "lagged",
                format!("{missed} events were missed; reload the topic's state"),
            ));
        }
    }
}

/// Delivers a live event to an open job subscription unless it is covered
/// already or older than what was sent.
fn deliver(sub: &mut JobSub, event: &Event, job: &JobEvent, outbox: &Outbox) {
    if event.seq <= sub.floor || (!job.status && job.processed < sub.last_processed) {
        return;
    }
    sub.floor = event.seq;
    sub.last_processed = sub.last_processed.max(job.processed);
    push_job(job, outbox);
}

fn push_job(job: &JobEvent, outbox: &Outbox) {
    if job.status {
        outbox.push_status(&job.job_id, job.frame.clone());
    } else {
        outbox.push_progress(&job.job_id, job.frame.clone());
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: axum::extract::ws::Utf8Bytes::from_static(reason),
    }))
}
