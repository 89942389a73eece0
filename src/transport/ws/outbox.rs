//! A session's bounded queue of outgoing frames.
//!
//! - A progress frame of a job replaces that job's older progress frame that
//!   has not been sent yet, keeping its place in the queue (latest wins).
//! - Status, snapshot and error frames are never dropped or reordered.
//! - `contact_removed` events coalesce into one frame per run of events (up to
//!   [`MAX_CONTACTS_PER_FRAME`] ids), built when the frame is sent.
//! - An unsent pong absorbs newer pings.
//! - Pushing never waits. When a client falls so far behind that the queue
//!   exceeds its bounds anyway, the queue stops taking frames and reports
//!   overflow, and the session is closed even if its socket write is stuck
//!   (the client reconnects and resumes with `since`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

/// Queued frames beyond which a session is closed as too slow.
pub const MAX_SLOTS: usize = 4096;
/// Queued bytes beyond which a session is closed as too slow.
pub const MAX_BYTES: usize = 8 * 1024 * 1024;
/// `{"type": "pong"}`.
pub const PONG: &str = r#"{"type":"pong"}"#;
/// Contact ids per coalesced `contact_removed` frame.
pub const MAX_CONTACTS_PER_FRAME: usize = 1000;

/// What the send task gets next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// A frame to send.
    Frame(Utf8Bytes),
    /// The client fell too far behind: close the session.
    Overflow,
}

#[derive(Debug)]
enum Slot {
    Ready(Utf8Bytes),
    Pong,
    Progress(u64),
    Contacts(u64),
}

#[derive(Debug, Default)]
struct Contacts {
    seq: u64,
    /// `contact_removed` or `contact_restored`: a frame carries one kind.
    kind: &'static str,
    ids: Vec<String>,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Slot>,
    progress: HashMap<u64, Utf8Bytes>,
    /// Job id → its progress slot still open for replacement.
    open_progress: HashMap<String, u64>,
    contacts: HashMap<u64, Contacts>,
    open_contacts: Option<u64>,
    pong_queued: bool,
    next_id: u64,
    bytes: usize,
    overflowed: bool,
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// True when the queue just went over its bounds.
    fn check(&mut self) -> bool {
        if !self.overflowed && (self.queue.len() > MAX_SLOTS || self.bytes > MAX_BYTES) {
            self.overflowed = true;
            return true;
        }
        false
    }
}

/// The queue; shared by the tasks of one session.
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    room: Notify,
    overflow: Notify,
}

impl Outbox {
    /// An empty queue.
    pub fn new() -> Outbox {
        Outbox::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    /// Runs a push unless the queue overflowed already, then wakes the sender
    /// (and whoever waits for an overflow).
    fn push_with(&self, f: impl FnOnce(&mut State)) {
        let overflowed = self.with(|s| {
            if s.overflowed {
                return false;
            }
            f(s);
            s.check()
        });
        if overflowed {
            self.overflow.notify_waiters();
        }
        self.ready.notify_one();
    }

    /// Queues a pong unless one is already waiting.
    pub fn push_pong(&self) {
        self.push_with(|s| {
            if !s.pong_queued {
                s.pong_queued = true;
                s.bytes += PONG.len();
                s.queue.push_back(Slot::Pong);
            }
        });
    }

    /// Resolves once the queue has overflowed.
    pub async fn overflowed(&self) {
        loop {
            let notified = self.overflow.notified();
            if self.with(|s| s.overflowed) {
                return;
            }
            notified.await;
        }
    }

    /// Queues a frame that is never dropped (snapshot, error, replay).
    pub fn push(&self, frame: Utf8Bytes) {
        self.push_with(|s| {
            s.bytes += frame.as_str().len();
            s.queue.push_back(Slot::Ready(frame));
        });
    }

    /// Queues a job's status frame; the job's queued progress frame (if any)
    /// can no longer be replaced, so frames never go back in time.
    pub fn push_status(&self, job_id: &str, frame: Utf8Bytes) {
        self.push_with(|s| {
            s.open_progress.remove(job_id);
            s.bytes += frame.as_str().len();
            s.queue.push_back(Slot::Ready(frame));
        });
    }

    /// Queues a job's progress frame, replacing its older unsent one.
    pub fn push_progress(&self, job_id: &str, frame: Utf8Bytes) {
        self.push_with(|s| {
            let len = frame.as_str().len();
            s.bytes += len;
            if let Some(id) = s.open_progress.get(job_id).copied() {
                if let Some(old) = s.progress.insert(id, frame) {
                    s.bytes = s.bytes.saturating_sub(old.as_str().len());
                }
                return;
            }
            let id = s.id();
            s.progress.insert(id, frame);
            s.open_progress.insert(job_id.to_string(), id);
            s.queue.push_back(Slot::Progress(id));
        });
    }

    /// Adds a removed contact to the open `contact_removed` frame, or opens one.
    pub fn push_contact(&self, seq: u64, contact_id: String) {
        self.push_contact_event(seq, "contact_removed", contact_id)
    }

    /// Adds a contact to the open frame of its `kind` (`contact_removed` or
    /// `contact_restored`), or opens one: runs of one kind coalesce, and the
    /// order of removals and restores is kept.
    pub fn push_contact_event(&self, seq: u64, kind: &'static str, contact_id: String) {
        self.push_with(|s| {
            s.bytes += contact_id.len() + 3;
            if let Some(c) = s
                .open_contacts
                .and_then(|id| s.contacts.get_mut(&id))
                .filter(|c| c.kind == kind)
            {
                c.seq = c.seq.max(seq);
                c.ids.push(contact_id);
                if c.ids.len() >= MAX_CONTACTS_PER_FRAME {
                    s.open_contacts = None;
                }
                return;
            }
            let id = s.id();
            s.contacts.insert(
                id,
                Contacts {
                    seq,
                    kind,
                    ids: vec![contact_id],
                },
            );
            s.open_contacts = Some(id);
            s.queue.push_back(Slot::Contacts(id));
        });
    }

    /// The next frame, if one is queued.
    pub fn pop(&self) -> Option<Next> {
        let next = self.with(|s| {
            if s.overflowed {
                return Some(Next::Overflow);
            }
            loop {
                let frame = match s.queue.pop_front()? {
                    Slot::Ready(f) => Some(f),
                    Slot::Pong => {
                        s.pong_queued = false;
                        Some(Utf8Bytes::from_static(PONG))
                    }
                    Slot::Progress(id) => {
                        s.open_progress.retain(|_, v| *v != id);
                        s.progress.remove(&id)
                    }
                    Slot::Contacts(id) => {
                        if s.open_contacts == Some(id) {
                            s.open_contacts = None;
                        }
                        s.contacts.remove(&id).map(|c| {
                            let counted: usize = c.ids.iter().map(|i| i.len() + 3).sum();
                            let frame = super::protocol::contacts(c.kind, c.seq, c.ids);
                            // Uncounted below by its own length.
                            s.bytes = (s.bytes + frame.as_str().len()).saturating_sub(counted);
                            frame
                        })
                    }
                };
                if let Some(f) = frame {
                    s.bytes = s.bytes.saturating_sub(f.as_str().len());
                    return Some(Next::Frame(f));
                }
            }
        });
        if matches!(next, Some(Next::Frame(_))) {
            self.room.notify_waiters();
        }
        next
    }

    /// Waits for the next frame.
    pub async fn next(&self) -> Next {
        loop {
            let notified = self.ready.notified();
            if let Some(n) = self.pop() {
                return n;
            }
            notified.await;
        }
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.with(|s| s.queue.len())
    }

    /// Waits until fewer than `max` frames are queued (replays pace themselves
    /// on the client this way instead of filling the queue).
    pub async fn wait_room(&self, max: usize) {
        loop {
            let notified = self.room.notified();
            if self.len() < max {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(n: Option<Next>) -> String {
        match n {
            Some(Next::Frame(f)) => f.as_str().to_string(),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn latest_progress_wins_in_place_and_status_is_kept() {
        let o = Outbox::new();
        o.push_progress("a", "a1".to_string().into());
        o.push_progress("b", "b1".to_string().into());
        o.push_progress("a", "a2".to_string().into());
        o.push_status("a", "a-done".to_string().into());
        o.push_progress("a", "a3".to_string().into());
        assert_eq!(o.len(), 4);
        assert_eq!(text(o.pop()), "a2");
        assert_eq!(text(o.pop()), "b1");
        assert_eq!(text(o.pop()), "a-done");
        assert_eq!(text(o.pop()), "a3");
        assert!(o.pop().is_none());
        // Once sent, a new progress opens a new slot.
        o.push_progress("a", "a4".to_string().into());
        assert_eq!(text(o.pop()), "a4");
    }

    #[test]
    fn removals_and_restores_coalesce_apart_in_order() {
        let o = Outbox::new();
        o.push_contact(1, "c1".into());
        o.push_contact_event(2, "contact_restored", "c1".into());
        o.push_contact_event(3, "contact_restored", "c2".into());
        let frames: Vec<serde_json::Value> = (0..2)
            .map(|_| serde_json::from_str(&text(o.pop())).unwrap())
            .collect();
        assert_eq!(
            frames,
            vec![
                json!({"type": "contact_removed", "seq": 1, "contactIds": ["c1"]}),
                json!({"type": "contact_restored", "seq": 3, "contactIds": ["c1", "c2"]}),
            ]
        );
        assert!(o.pop().is_none());
    }

    #[test]
    fn contacts_coalesce_between_other_frames() {
        let o = Outbox::new();
        o.push_contact(5, "c1".into());
        o.push_contact(6, "c2".into());
        o.push("x".to_string().into());
        o.push_contact(7, "c3".into());
        // Contacts are their own stream: c3 joins the batch still waiting.
        let first: serde_json::Value = serde_json::from_str(&text(o.pop())).unwrap();
        assert_eq!(
            first,
            json!({"type": "contact_removed", "seq": 7, "contactIds": ["c1", "c2", "c3"]})
        );
        assert_eq!(text(o.pop()), "x");
        o.push_contact(8, "c4".into());
        let next: serde_json::Value = serde_json::from_str(&text(o.pop())).unwrap();
        assert_eq!(next["contactIds"], json!(["c4"]));
        assert!(o.pop().is_none());
    }

    #[test]
    fn a_client_too_far_behind_overflows() {
        let o = Outbox::new();
        for i in 0..=MAX_SLOTS {
            o.push(format!("{i}").into());
        }
        assert_eq!(o.pop(), Some(Next::Overflow));
        // Nothing more is taken once overflowed.
        let before = o.len();
        o.push("late".to_string().into());
        o.push_contact(1, "c".into());
        assert_eq!(o.len(), before);
    }

    #[test]
    fn unsent_pongs_coalesce() {
        let o = Outbox::new();
        o.push_pong();
        o.push_pong();
        o.push("x".to_string().into());
        o.push_pong();
        assert_eq!(text(o.pop()), PONG);
        assert_eq!(text(o.pop()), "x");
        assert!(o.pop().is_none());
        o.push_pong();
        assert_eq!(text(o.pop()), PONG);
    }

    #[test]
    fn contact_frames_split_at_the_limit() {
        let o = Outbox::new();
        for i in 0..MAX_CONTACTS_PER_FRAME + 1 {
            o.push_contact(i as u64, format!("c{i}"));
        }
        assert_eq!(o.len(), 2);
        let first: serde_json::Value = serde_json::from_str(&text(o.pop())).unwrap();
        assert_eq!(
            first["contactIds"].as_array().unwrap().len(),
            MAX_CONTACTS_PER_FRAME
        );
    }
}
