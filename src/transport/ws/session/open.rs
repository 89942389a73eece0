//! Opening a job subscription: the snapshot (with the sequence it covers) or
//! the replay of missed events, then the switch to live events.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use contact_bulk_actors::JobError;
use futures::StreamExt;

use super::{deliver, JobSub, Session};
use crate::transport::ws::hub::EventBody;
use crate::transport::ws::protocol;

/// Queue length a replay waits under before pushing its next frame.
const REPLAY_HIGH_WATER: usize = 256;
/// Longest wait for one replayed message before giving up with a gap snapshot.
const REPLAY_READ_TIMEOUT: Duration = Duration::from_secs(5);

impl Session {
    /// (Re)starts a job subscription: buffer live events, then snapshot or replay.
    pub(super) fn open(
        self: &Arc<Self>,
        sub: &mut JobSub,
        job_id: String,
        since: Option<u64>,
        gap: bool,
    ) {
        if let Some(t) = sub.task.take() {
            t.abort();
        }
        let generation = self.next_generation();
        sub.generation = generation;
        sub.opening = Some(Vec::new());
        sub.overflow = false;
        let me = self.clone();
        let task = tokio::spawn(async move { me.opening(job_id, generation, since, gap).await });
        sub.task = Some(task.abort_handle());
    }

    async fn opening(
        self: Arc<Self>,
        job_id: String,
        generation: u64,
        since: Option<u64>,
        gap: bool,
    ) {
        if let Some(since) = since.filter(|_| !gap) {
            match self.replay(&job_id, generation, since).await {
                Ok(Replayed::Done { last, processed }) => {
                    self.opened(&job_id, generation, last, processed, None);
                    return;
                }
                Ok(Replayed::NotFound) => return self.not_found(&job_id, generation),
                Ok(Replayed::Gap) => {}
                Err(e) => {
                    tracing::warn!(org_id = %self.org, job_id, error = %e, "ws replay failed, sending a snapshot");
                }
            }
            return self.snapshot(&job_id, generation, true).await;
        }
        self.snapshot(&job_id, generation, gap).await
    }

    /// Sends the job's snapshot from the database, then goes live above the
    /// sequence of its last stored event (read first, so nothing falls between).
    async fn snapshot(self: &Arc<Self>, job_id: &str, generation: u64, gap: bool) {
        let subject = self.hub.job_subject(self.org, job_id);
        let floor = match self.hub.last_seq(&subject).await {
            Ok(seq) => seq,
            Err(e) => {
                tracing::warn!(org_id = %self.org, job_id, error = %e, "ws: last event unknown");
                0
            }
        };
        let job = match self.app.store.get(self.org, job_id).await {
            Ok(job) => job,
            Err(JobError::NotFound(_)) => return self.not_found(job_id, generation),
            Err(e) => {
                tracing::warn!(org_id = %self.org, job_id, error = %e, "ws: job not read");
                self.drop_sub(job_id, generation);
                self.outbox
                    .push(protocol::error("internal", "the job could not be read"));
                return;
            }
        };
        let snap = self.app.snapshot(&job);
        match serde_json::to_value(&snap) {
            Ok(v) => {
                let frame = protocol::snapshot(v, gap);
                self.opened(job_id, generation, floor, snap.processed, Some(frame));
            }
            Err(e) => {
                tracing::warn!(job_id, error = %e, "ws: snapshot not serialised");
                self.drop_sub(job_id, generation);
                self.outbox
                    .push(protocol::error("internal", "the job could not be read"));
            }
        }
    }

    /// Replays the job's events after `since` from the stream.
    async fn replay(&self, job_id: &str, generation: u64, since: u64) -> anyhow::Result<Replayed> {
        match self.app.store.get(self.org, job_id).await {
            Err(JobError::NotFound(_)) => return Ok(Replayed::NotFound),
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let hub = &self.hub;
        let (first, last) = hub.bounds().await?;
        if since.saturating_add(1) < first || since > last {
            tracing::debug!(org_id = %self.org, job_id, since, first, last, "ws replay impossible");
            return Ok(Replayed::Gap);
        }
        let subject = hub.job_subject(self.org, job_id);
        let (mut messages, mut left) = hub.replay(&subject, since + 1).await?;
        let (mut seen, mut processed) = (since, 0);
        while left > 0 {
            let msg = tokio::time::timeout(REPLAY_READ_TIMEOUT, messages.next())
                .await
                .context("replay stalled")?
                .context("replay ended")??;
            let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            let seq = info.stream_sequence;
            left = info.pending;
            if seq <= seen {
                continue;
            }
            seen = seq;
            let event = match hub.parse(msg.subject.as_str(), seq, &msg.payload) {
                Ok(e) if e.org == self.org => e,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(seq, error = %e, "ws replay: event skipped");
                    continue;
                }
            };
            let EventBody::Job(job) = event.body else {
                continue;
            };
            self.outbox.wait_room(REPLAY_HIGH_WATER).await;
            if self.subs().jobs.get(job_id).map(|s| s.generation) != Some(generation) {
                return Ok(Replayed::Done {
                    last: seen,
                    processed,
                });
            }
            processed = processed.max(job.processed);
            self.outbox.push(job.frame.clone());
        }
        tracing::debug!(org_id = %self.org, job_id, since, last = seen, "ws replayed");
        Ok(Replayed::Done {
            last: seen,
            processed,
        })
    }

    /// The subscription is open: send `first`, then the buffered live events above `floor`.
    fn opened(
        self: &Arc<Self>,
        job_id: &str,
        generation: u64,
        floor: u64,
        processed: i64,
        first: Option<axum::extract::ws::Utf8Bytes>,
    ) {
        let mut subs = self.subs();
        let Some(sub) = subs.jobs.get_mut(job_id) else {
            return;
        };
        if sub.generation != generation {
            return;
        }
        if let Some(frame) = first {
            self.outbox.push(frame);
        }
        sub.floor = floor;
        sub.last_processed = processed;
        let buffered = sub.opening.take().unwrap_or_default();
        if sub.overflow {
            self.open(sub, job_id.to_string(), None, true);
            return;
        }
        for event in buffered {
            if let EventBody::Job(job) = &event.body {
                deliver(sub, &event, job, &self.outbox);
            }
        }
    }

    fn not_found(&self, job_id: &str, generation: u64) {
        if self.drop_sub(job_id, generation) {
            tracing::debug!(org_id = %self.org, job_id, "ws subscribe: job not found");
            self.outbox.push(protocol::not_found(job_id));
        }
    }

    /// Removes the subscription if it is still this generation.
    fn drop_sub(&self, job_id: &str, generation: u64) -> bool {
        let mut subs = self.subs();
        if subs.jobs.get(job_id).map(|s| s.generation) == Some(generation) {
            subs.jobs.remove(job_id);
            return true;
        }
        false
    }
}

enum Replayed {
    Done { last: u64, processed: i64 },
    NotFound,
    Gap,
}
