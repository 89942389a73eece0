//! Reading an export's rows as several bounded `_id` ranges, a few side by
//! side, handed over strictly in `_id` order.
//!
//! The export's selection (`_id` after the checkpoint, up to the snapshot's
//! bound) is cut into ranges by the creation second that begins every
//! ObjectId (documented MongoDB behaviour), between the organisation's own
//! creation and the snapshot: an organisation's contacts are minted after the
//! organisation itself, whose `_id` is the `orgId`. Whatever was minted before
//! (imported ids, a skewed clock) falls in the first range, so the ranges
//! always cover the whole selection; the cut only decides how even they are.
//!
//! Each range is one query (`$gt` its lower bound, `$lte` its upper one, `_id`
//! sort) read by its own task into a channel of [`RANGE_QUEUE`] batches. The
//! reader opens the next ranges while the current one is handed over, at most
//! [`RANGES_AHEAD`] ahead, and moves to the next range only when the current
//! one is exhausted: rows come out in `_id` order, and memory is bounded by
//! `(RANGES_AHEAD + 1) × (RANGE_QUEUE + 1)` batches whatever the selection.
//! A server that prepares a query's results before its first batch (the
//! stand-in server does) works on the next range while this one streams.

use std::collections::VecDeque;

use bson::oid::ObjectId;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::error::JobError;

/// Ranges an export's selection is cut into (fewer when it spans fewer seconds).
pub const RANGES: usize = 32;
/// Ranges read ahead of the one being handed over.
pub const RANGES_AHEAD: usize = 1;
/// Batches a range's task may hold ready before the reader takes them.
pub const RANGE_QUEUE: usize = 1;
/// Seconds of clock skew allowed between the organisation's creation and its
/// first contacts (ids minted earlier still land in the first range).
const SKEW_SECS: u32 = 60;

/// `_id` in `(after, upto]`; `after: None` is unbounded below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// Exclusive lower bound.
    pub after: Option<ObjectId>,
    /// Inclusive upper bound.
    pub upto: ObjectId,
}

/// The last ObjectId of second `secs` (every id minted in it sorts at or below).
fn end_of_second(secs: u32) -> ObjectId {
    let mut bytes = [0xffu8; 12];
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    ObjectId::from_bytes(bytes)
}

fn seconds(id: &ObjectId) -> u32 {
    let b = id.bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Cuts `(after, upto]` into at most `parts` ranges, in order, covering it
/// exactly: one up to [`SKEW_SECS`] before `floor` (normally empty), one for
/// the skew, then equal spans of seconds from `floor` up to `upto`. `floor`
/// is the id the organisation was created with. The skew is kept out of the
/// even spans: in an organisation created moments before its contacts were
/// imported, a minute of it would hold most of the spans and none of the rows.
pub fn split(
    after: Option<ObjectId>,
    upto: ObjectId,
    floor: ObjectId,
    parts: usize,
) -> Vec<IdRange> {
    if after.is_some_and(|a| a >= upto) {
        return Vec::new();
    }
    let first = seconds(&floor).saturating_sub(SKEW_SECS);
    let from = after.map_or(seconds(&floor), |a| seconds(&a).max(seconds(&floor)));
    let to = seconds(&upto);
    let mut bounds = Vec::with_capacity(parts + 1);
    if parts > 2 && from < to {
        bounds.push(end_of_second(first));
        let span = u64::from(to - from);
        let cuts = (parts as u64 - 2).min(span);
        for i in 0..cuts {
            // The end of second `from + span·i/cuts`, ascending and below `upto`.
            let secs = from as u64 + span * i / cuts;
            bounds.push(end_of_second(secs as u32));
        }
    }
    bounds.retain(|b| after.is_none_or(|a| *b > a) && *b < upto);
    bounds.dedup();
    bounds.push(upto);
    let mut ranges = Vec::with_capacity(bounds.len());
    let mut lower = after;
    for b in bounds {
        ranges.push(IdRange {
            after: lower,
            upto: b,
        });
        lower = Some(b);
    }
    ranges
}

/// Opens the rows of one range, a batch at a time, in `_id` order.
pub type OpenRange<T> = Box<
    dyn Fn(IdRange) -> BoxFuture<'static, Result<BoxStream<'static, Result<T, JobError>>, JobError>>
        + Send
        + Sync,
>;

/// A batch of rows: how many it holds (for the range's debug line).
pub trait Rows {
    /// Rows held.
    fn rows(&self) -> usize;
}

impl<T> Rows for Vec<T> {
    fn rows(&self) -> usize {
        self.len()
    }
}

/// One range being read by its task.
struct Running<T> {
    rx: mpsc::Receiver<Result<T, JobError>>,
    task: tokio::task::JoinHandle<()>,
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hands over the batches of a list of ranges in order, reading up to
/// [`RANGES_AHEAD`] ranges ahead. Dropping it stops every task (and closes
/// their cursors).
pub struct RangeReader<T: Rows + Send + 'static> {
    open: std::sync::Arc<OpenRange<T>>,
    waiting: VecDeque<IdRange>,
    running: VecDeque<Running<T>>,
    ahead: usize,
    /// A range failed: nothing more is handed over (the rest of that range
    /// would be skipped), the caller opens a new reader.
    failed: bool,
}

impl<T: Rows + Send + 'static> RangeReader<T> {
    /// Starts reading `ranges` (in order), with `ahead` ranges read ahead of
    /// the current one.
    pub fn new(ranges: Vec<IdRange>, ahead: usize, open: OpenRange<T>) -> Self {
        let mut reader = RangeReader {
            open: std::sync::Arc::new(open),
            waiting: ranges.into(),
            running: VecDeque::new(),
            ahead,
            failed: false,
        };
        reader.top_up();
        reader
    }

    /// Ranges not yet handed over completely.
    pub fn ranges_left(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    fn top_up(&mut self) {
        while self.running.len() <= self.ahead {
            let Some(range) = self.waiting.pop_front() else {
                return;
            };
            let (tx, rx) = mpsc::channel(RANGE_QUEUE);
            let open = self.open.clone();
            let task = tokio::spawn(async move {
                let started = std::time::Instant::now();
                let mut batches = match open(range).await {
                    Ok(batches) => batches,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let opened = started.elapsed();
                let mut first = None;
                let mut count = 0usize;
                while let Some(batch) = batches.next().await {
                    first.get_or_insert_with(|| started.elapsed());
                    let failed = batch.is_err();
                    count += batch.as_ref().map_or(0, Rows::rows);
                    if tx.send(batch).await.is_err() || failed {
                        return;
                    }
                }
                tracing::debug!(
                    after = ?range.after.map(|a| a.to_hex()),
                    upto = %range.upto.to_hex(),
                    rows = count,
                    opened_ms = opened.as_millis() as u64,
                    first_batch_ms = first.map_or(0, |f| f.as_millis() as u64),
                    read_ms = started.elapsed().as_millis() as u64,
                    "export range read"
                );
                // Dropping the sender ends the range.
            });
            self.running.push_back(Running { rx, task });
        }
    }

    /// The next batch in `_id` order; `None` once every range is exhausted.
    /// An error leaves the failed range in place: the caller drops the reader
    /// and opens a new one after the last row it took.
    pub async fn next(&mut self) -> Result<Option<T>, JobError> {
        if self.failed {
            return Err(JobError::Internal(
                "an export range failed; the reader must be opened again".into(),
            ));
        }
        loop {
            self.top_up();
            let Some(current) = self.running.front_mut() else {
                return Ok(None);
            };
            match current.rx.recv().await {
                Some(Ok(batch)) => return Ok(Some(batch)),
                Some(Err(e)) => {
                    self.failed = true;
                    self.running.clear();
                    self.waiting.clear();
                    return Err(e);
                }
                None => {
                    self.running.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
