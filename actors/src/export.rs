//! The export actor: one per export job; each `Step` message reads one batch from
//! the cursor, so cancel and shutdown land between batches.
//!
//! Rows are encoded into a buffer that is flushed as one artifact chunk together
//! with a checkpoint (last `_id`, next chunk, bytes, rows). `processed` only ever
//! reports flushed rows, so it never goes backwards across a restart. A flush
//! happens once the buffer reaches `flush_bytes`, also in the middle of a
//! batch, so a chunk stays near that size however large the rows are (far
//! from MongoDB's 16 MB document limit).

use std::sync::Arc;

use bson::{oid::ObjectId, RawDocument};
use futures::FutureExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::encode::{Encoder, Fields};
use crate::error::JobError;
use crate::id_ranges::{self, IdRange, OpenRange, RangeReader};
use crate::job::{JobActor, JobEnv, JobRun, JobStep};
use crate::lookup::NameCache;
use crate::model::{Checkpoint, ExportFile, ExportSpec, JobRecord};
use crate::pending_chunk::PendingChunk;
use crate::repo::{Ending, JobPatch, NameSource, RawBatch};
use digest::FileDigest;
use total::{announce, settle_count, start_count, Counting};

/// The export actor.
pub type ExportActor = JobActor<ExportState>;

/// Its state, built in `pre_start`.
pub struct ExportState {
    run: JobRun,
    spec: ExportSpec,
    encoder: Option<Encoder>,
    /// The rows to export, read ahead as bounded `_id` ranges (see [`crate::id_ranges`]).
    reader: Option<RangeReader<RawBatch>>,
    names: NameCache,
    /// Encoded rows not yet flushed.
    buf: Vec<u8>,
    buf_rows: i64,
    /// Last `_id` read into `buf` (resume point of the cursor itself).
    read_last: Option<ObjectId>,
    last_flush: std::time::Instant,
    /// Encoded bytes per row lately (sizes the groups encoded between flushes).
    row_bytes: usize,
    exhausted: bool,
    resumed: bool,
    /// The `total` count, running beside the first batches (see [`Counting`]).
    counting: Option<Counting>,
    /// When the `processing` status event is still to come: by this time at
    /// the latest, sooner if the count lands (see [`announce`]).
    announce: Option<tokio::time::Instant>,
    /// The last flushed chunk, stored in the background while the next rows
    /// are read and encoded.
    pending: Option<PendingChunk>,
    /// SHA-256 and size of the chunks checkpointed so far, so the completion
    /// needs no read-back of the file (see [`FileDigest`]).
    digest: Option<FileDigest>,
    /// Where the time went, for the debug log at completion.
    laps: Laps,
}

/// Time spent waiting for batches, encoding them and settling chunks.
#[derive(Debug, Default)]
struct Laps {
    read: std::time::Duration,
    encode: std::time::Duration,
    settle: std::time::Duration,
}

impl JobStep for ExportState {
    fn start(env: JobEnv, job: JobRecord) -> Result<ExportState, JobError> {
        let spec = job
            .export
            .clone()
            .ok_or_else(|| JobError::Internal("export job without export settings".into()))?;
        let read_last = job.checkpoint.last_id;
        Ok(ExportState {
            run: JobRun::new(env, job),
            spec,
            encoder: None,
            reader: None,
            names: NameCache::default(),
            buf: Vec::new(),
            buf_rows: 0,
            read_last,
            last_flush: std::time::Instant::now(),
            row_bytes: 0,
            exhausted: false,
            resumed: false,
            counting: None,
            announce: None,
            pending: None,
            digest: None,
            laps: Laps::default(),
        })
    }

    fn run(&mut self) -> &mut JobRun {
        &mut self.run
    }

    fn reset(&mut self) {
        // The reader restarts after the last row that reached the buffer.
        self.reader = None;
    }

    async fn step(&mut self) -> Result<bool, JobError> {
        step(self).await
    }

    async fn quiesce(&mut self) {
        if let Some(pending) = self.pending.as_mut() {
            pending.quiesce().await;
        }
    }
}

/// One batch. `Ok(true)` = more to do.
async fn step(s: &mut ExportState) -> Result<bool, JobError> {
    if s.run.cancel {
        // Rows read but not flushed were never reported: dropping them keeps
        // the snapshot equal to what the file holds.
        return cancelled(s).await;
    }
    if !s.run.job.initialised {
        initialise(s).await?;
        if s.run.cancel {
            // Cancelled during the custom-key pass: nothing was written yet.
            return cancelled(s).await;
        }
    }
    // Every step looks first: a step that fails before its batch is read
    // (retried until the job fails) must not hold the event back.
    announce(s, false).await;
    // A crash may have left chunks past the checkpoint: they are written
    // again from it (never truncated, see `artifact`).
    s.resumed = true;
    if s.encoder.is_none() {
        let columns = s
            .spec
            .columns
            .expand(s.run.job.custom_keys.as_deref().unwrap_or_default());
        s.encoder = Some(Encoder::new(s.spec.format, columns));
    }
    let Some(max_id) = s.run.job.snapshot_max_id else {
        return complete(s).await;
    };
    if s.run.job.total.is_none() && s.counting.is_none() {
        s.counting = Some(start_count(s, max_id));
    }
    if !s.exhausted {
        read_batch(s, max_id).await?;
    }
    settle_count(s, false).await?;
    let due = s.buf.len() >= s.run.env.settings.flush_bytes
        || s.last_flush.elapsed() >= s.run.env.settings.flush_interval;
    if s.buf_rows > 0 && (due || s.exhausted) {
        flush(s).await?;
        if s.run.cancel {
            return Ok(true);
        }
    }
    if s.exhausted && s.buf_rows == 0 {
        return complete(s).await;
    }
    if s.run.job.processed > 0
        && crate::failpoint::fires(
            crate::failpoint::EXPORT_STEP_FAILS,
            &s.run.job.org_id.to_hex(),
        )
    {
        return Err(JobError::Internal("injected failure".into()));
    }
    Ok(true)
}

/// Freezes the snapshot, discovers custom keys when asked, writes the header;
/// `total` is counted beside the first batches.
async fn initialise(s: &mut ExportState) -> Result<(), JobError> {
    let source = s.run.env.export.clone();
    let limit = s.run.job.filter.limit;
    let max_id = source.bound(&s.run.job).await?;
    let mut counting = start_count(s, max_id);
    let mut custom_keys = None;
    if s.spec.columns.needs_custom_discovery() {
        let job = s.run.job.clone();
        let pass = async move { source.custom_keys(&job, max_id).await };
        // A pass over a large organisation is one step: it must hear a cancel.
        match s.run.listening(pass).await? {
            Some(keys) => custom_keys = Some(keys),
            None => return Ok(()),
        }
    }
    let columns = s
        .spec
        .columns
        .expand(custom_keys.as_deref().unwrap_or_default());
    let encoder = Encoder::new(s.spec.format, columns);
    let header = encoder.header().await.map_err(io_err)?;
    let header = pack(&s.spec, header).await?;
    let header_len = header.len() as i64;
    let hashed = Sha256::new_with_prefix(&header);
    let job_id = s.run.job.job_id.clone();
    let epoch = s.run.lease.epoch;
    s.run.env.artifacts.put(&job_id, 0, epoch, header).await?;
    // The count started with the snapshot and runs beside the first batches:
    // nothing waits for it. The `processing` event waits for it instead, up to
    // `total_wait`, so a small or mid-sized organisation's export is announced
    // with its `total` (see [`announce`]).
    s.read_last = None;
    open_reader(s, max_id, limit.map(|l| l as i64));
    let total = match counting.0.is_finished() {
        true => Some(counting.wait().await?),
        false => None,
    };
    if total.is_none() {
        s.counting = Some(counting);
    }
    s.run
        .update(JobPatch {
            started_at: Some(s.run.env.jobs.now()),
            snapshot_max_id: Some(max_id),
            total: Some(total),
            custom_keys: Some(custom_keys),
            processed: Some(0),
            checkpoint: Some(Checkpoint {
                last_id: None,
                next_chunk: 1,
                bytes: header_len,
            }),
            ..JobPatch::default()
        })
        .await?;
    s.encoder = Some(encoder);
    s.read_last = None;
    s.digest = Some(FileDigest {
        hasher: hashed,
        bytes: header_len,
        next_chunk: 1,
    });
    if total.is_none() {
        s.announce = Some(tokio::time::Instant::now() + s.run.env.settings.total_wait);
    } else {
        s.run.status_event().await;
    }
    tracing::info!(job_id = %s.run.job.job_id, max_id = %max_id, "export started");
    Ok(())
}

async fn read_batch(s: &mut ExportState, max_id: ObjectId) -> Result<(), JobError> {
    let job = &s.run.job;
    let in_flight = s.pending.as_ref().map_or(0, PendingChunk::rows);
    let remaining = job
        .filter
        .limit
        .map(|l| l as i64 - job.processed - in_flight - s.buf_rows);
    if remaining.is_some_and(|r| r <= 0) {
        s.exhausted = true;
        return Ok(());
    }
    if s.reader.is_none() {
        open_reader(s, max_id, remaining);
    }
    let want = remaining
        .unwrap_or(i64::MAX)
        .min(s.run.env.settings.export_batch as i64) as usize;
    let waited = std::time::Instant::now();
    // The first batch may take the server a while: the lease is renewed meanwhile.
    let mut rows = match s.reader.as_mut() {
        Some(reader) => s.run.alive(reader.next()).await?.unwrap_or_default(),
        None => RawBatch::default(),
    };
    s.laps.read += waited.elapsed();
    if rows.is_empty() {
        s.exhausted = true;
    }
    rows.truncate(want);
    if remaining.is_some_and(|r| r <= rows.len() as i64) {
        s.exhausted = true;
    }
    if rows.is_empty() {
        return Ok(());
    }
    let docs = rows.iter().collect::<Result<Vec<&RawDocument>, _>>()?;
    // Each row's fields are found once, for the names and the encoding.
    let docs = docs.iter().map(|d| Fields::read(d)).collect::<Vec<_>>();
    let cols = &s.spec.columns;
    let names: &dyn NameSource = &*s.run.env.export;
    s.names
        .resolve(
            names,
            s.run.job.org_id,
            docs.iter(),
            cols.needs_pipeline() || cols.needs_stage(),
            cols.needs_owner(),
        )
        .await?;
    // Encoded a group at a time, sized to what still fits in the buffer, and
    // flushed whenever it is full: a batch of large rows becomes several chunks.
    let flush_bytes = s.run.env.settings.flush_bytes;
    let mut rest = &docs[..];
    while !rest.is_empty() {
        let room = flush_bytes.saturating_sub(s.buf.len());
        let take = match s.row_bytes {
            0 => 16,
            per_row => room / per_row,
        }
        .clamp(1, rest.len());
        let (part, tail) = rest.split_at(take);
        let encoder = s
            .encoder
            .as_ref()
            .ok_or_else(|| JobError::Internal("encoder missing".into()))?;
        let before = s.buf.len();
        let encoding = std::time::Instant::now();
        let rows = encoder
            .encode_fields(part.iter().copied(), &s.names.names, &mut s.buf)
            .map_err(io_err)?;
        s.laps.encode += encoding.elapsed();
        if let Some(per_row) = (s.buf.len() - before).checked_div(rows) {
            s.row_bytes = per_row.max(1);
        }
        s.buf_rows += rows as i64;
        s.read_last = part.last().and_then(|row| Fields::object_id(row.id));
        rest = tail;
        if !rest.is_empty() && s.buf.len() >= flush_bytes {
            flush(s).await?;
        }
    }
    Ok(())
}

/// Starts reading the rows after `read_last` up to the snapshot's `max_id`.
///
/// Without a `limit` the selection is read as several `_id` ranges, the next
/// one prepared by the server while this one streams (see [`crate::id_ranges`]).
/// A limited export reads one range (the limit counts from its start).
fn open_reader(s: &mut ExportState, max_id: ObjectId, remaining: Option<i64>) {
    let job = Arc::new(s.run.job.clone());
    let source = s.run.env.export.clone();
    let batch = s.run.env.settings.export_batch as usize;
    let ranges = match job.filter.limit {
        Some(_) => vec![IdRange {
            after: s.read_last,
            upto: max_id,
        }],
        None => id_ranges::split(
            s.read_last,
            max_id,
            job.org_id,
            s.run.env.settings.export_ranges,
        ),
    };
    let open: OpenRange<RawBatch> = Box::new(move |range: IdRange| {
        let (source, job) = (source.clone(), job.clone());
        async move { source.rows(&job, range, remaining, batch).await }.boxed()
    });
    s.reader = Some(RangeReader::new(ranges, id_ranges::RANGES_AHEAD, open));
}

/// Settles the chunk in flight, if any: stored, then checkpointed.
async fn settle_pending(s: &mut ExportState) -> Result<(), JobError> {
    if let Some(pending) = s.pending.as_mut() {
        pending.settle(&mut s.run).await?;
        FileDigest::add(&mut s.digest, pending.n(), pending.data());
        s.pending = None;
        // Before the `processing` event, progress is in the record only.
        if s.announce.is_none() {
            s.run.progress_event().await;
        }
    }
    Ok(())
}

/// Settles the previous chunk, then starts writing the buffer as the next one.
async fn flush(s: &mut ExportState) -> Result<(), JobError> {
    let settling = std::time::Instant::now();
    settle_pending(s).await?;
    s.laps.settle += settling.elapsed();
    let n = s.run.job.checkpoint.next_chunk;
    // A copy: if packing fails the buffer must still be there for the retry.
    let data = pack(&s.spec, s.buf.clone()).await?;
    s.pending = Some(PendingChunk::spawn(
        &s.run,
        n,
        data,
        s.buf_rows,
        s.read_last,
    ));
    s.buf.clear();
    s.buf_rows = 0;
    s.last_flush = std::time::Instant::now();
    Ok(())
}

async fn complete(s: &mut ExportState) -> Result<bool, JobError> {
    if s.run.job.total.is_none() {
        if s.counting.is_none() {
            if let Some(max_id) = s.run.job.snapshot_max_id {
                s.counting = Some(start_count(s, max_id));
            }
        }
        settle_count(s, true).await?;
    }
    announce(s, true).await;
    settle_pending(s).await?;
    let job_id = s.run.job.job_id.clone();
    let chunks = s.run.job.checkpoint.next_chunk;
    let checkpoint = &s.run.job.checkpoint;
    let (bytes, sha256) = match s.digest.take() {
        Some(d) if d.next_chunk == checkpoint.next_chunk && d.bytes == checkpoint.bytes => {
            (d.bytes, hex::encode(d.hasher.finalize()))
        }
        _ => {
            // Reading the whole file back takes a while on a large export.
            let artifacts = s.run.env.artifacts.clone();
            let digest = artifacts.digest(&job_id, chunks);
            s.run.alive(digest).await?
        }
    };
    let result = ExportFile {
        file_name: s.spec.file_name.clone(),
        format: s.spec.format,
        gzip: s.spec.gzip,
        rows: s.run.job.processed,
        bytes,
        sha256,
        expired: false,
        chunks: Some(chunks),
    };
    tracing::debug!(
        job_id = %job_id,
        read_wait_ms = s.laps.read.as_millis() as u64,
        encode_ms = s.laps.encode.as_millis() as u64,
        settle_ms = s.laps.settle.as_millis() as u64,
        "export laps"
    );
    s.run.finish(Ending::Completed(Some(result))).await?;
    // Chunks past the end (a writer that lost its lease, a crash before a
    // checkpoint) are never read; clearing them is housekeeping.
    match s.run.env.artifacts.remove_from(&job_id, chunks).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(job_id, chunks = n, "leftover chunks removed"),
        Err(e) => tracing::warn!(job_id, error = %e, "leftover chunks not removed"),
    }
    Ok(false)
}

/// Ends a cancelled export: no file will ever be read, so its chunks go.
async fn cancelled(s: &mut ExportState) -> Result<bool, JobError> {
    // Processing, then cancelled: each status change is an event.
    announce(s, true).await;
    s.pending = None;
    s.run.finish(Ending::Cancelled).await?;
    let job_id = s.run.job.job_id.clone();
    if let Err(e) = s.run.env.artifacts.remove_from(&job_id, 0).await {
        tracing::warn!(job_id, error = %e, "chunks of a cancelled export not removed");
    }
    Ok(false)
}

/// Compresses a chunk as its own gzip member when asked: concatenated members
/// are one valid gzip file, and each chunk stands alone so a resume needs no
/// compressor state.
async fn pack(spec: &ExportSpec, data: Vec<u8>) -> Result<Vec<u8>, JobError> {
    if !spec.gzip {
        return Ok(data);
    }
    let mut enc =
        async_compression::tokio::write::GzipEncoder::new(Vec::with_capacity(data.len() / 4));
    enc.write_all(&data).await.map_err(io_err)?;
    enc.shutdown().await.map_err(io_err)?;
    Ok(enc.into_inner())
}

fn io_err(e: std::io::Error) -> JobError {
    JobError::Internal(format!("encoding: {e}"))
}

mod digest;
mod total;

#[cfg(test)]
mod tests;
