//! The job model: the record stored in `bulk_jobs`, and how it becomes the
//! snapshot every caller sees (the snapshot's types are the protocol's).

use bson::{oid::ObjectId, DateTime};
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};

pub use contact_bulk_protocol::job::{
    Counts, Dependency, JobKind, JobResult, JobSnapshot, JobStatus, RestoreResult, ResultSnapshot,
};

use crate::encode::{ColumnSpec, Format};
use crate::filter::Filter;

/// How an export writes its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportSpec {
    /// CSV or NDJSON.
    pub format: Format,
    /// Compress with gzip.
    pub gzip: bool,
    /// Requested columns (may still hold "all custom fields").
    pub columns: ColumnSpec,
    /// Sanitised file name, extension included.
    pub file_name: String,
}

/// Where a running job is; written atomically with the job's progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// Highest `_id` fully handled.
    pub last_id: Option<ObjectId>,
    /// Next artifact chunk number (exports).
    pub next_chunk: i64,
    /// Bytes of the artifact written so far (exports).
    pub bytes: i64,
}

/// The finished export file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportFile {
    /// Download file name.
    pub file_name: String,
    /// CSV or NDJSON.
    pub format: Format,
    /// Gzip-compressed.
    pub gzip: bool,
    /// Data rows (header excluded).
    pub rows: i64,
    /// File size in bytes.
    pub bytes: i64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// The file's retention has passed and its data is gone.
    #[serde(default)]
    pub expired: bool,
    /// Chunks of the file (`n` below this); chunks at or above it are
    /// leftovers of a writer that lost its lease and are never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<i64>,
}

/// A delete batch recorded on its job: the contacts decided on (its audit
/// entries) and their children, counted before they were deleted, so a resumed
/// batch neither recounts nor loses counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteInflight {
    /// Highest candidate `_id` of the batch (the next checkpoint).
    pub upto: ObjectId,
    /// Contacts decided on by the batch (its audit entries).
    pub contacts: u64,
    /// Conversations counted for them.
    pub conversations: u64,
    /// Messages counted for them.
    pub messages: u64,
}

/// A job as stored in `bulk_jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    /// UUID string.
    #[serde(rename = "_id")]
    pub job_id: String,
    /// Export or delete.
    pub kind: JobKind,
    /// Owning organisation; every query of the job is scoped to it.
    pub org_id: ObjectId,
    /// Caller's idempotency key.
    pub command_id: Option<String>,
    /// `<orgId>:<commandId>`, unique (sparse) so a replayed command cannot create a second job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_key: Option<String>,
    /// User who asked, if known.
    pub requested_by: Option<ObjectId>,
    /// Lifecycle state.
    pub status: JobStatus,
    /// The validated filter.
    pub filter: Filter,
    /// Export settings (exports only).
    pub export: Option<ExportSpec>,
    /// Upper bound on `_id` frozen when the job started; `None` before start or when nothing matched.
    pub snapshot_max_id: Option<ObjectId>,
    /// Whether the start-up phase (snapshot, total, header) is done.
    #[serde(default)]
    pub initialised: bool,
    /// Matching documents at start.
    pub total: Option<i64>,
    /// Rows exported or contacts handled; only grows.
    pub processed: i64,
    /// Documents deleted.
    pub counts: Counts,
    /// Why the job failed (set when it ends `failed`; the snapshot's `error`).
    pub error: Option<String>,
    /// The last failure of the job's own work that was counted as an attempt
    /// (`attempts` grew) and retried: why a job shows `attempts > 1`. Kept
    /// after a later success; not part of the snapshot (contract section 5:
    /// `error` is the reason of a `failed` job only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Attempts at the job's work: 1 once it started, one more after each
    /// failure of its own work that outlasted the step retries. Restarts,
    /// drains, takeovers and outages cost none.
    pub attempts: i32,
    /// Accepted at.
    pub created_at: DateTime,
    /// First started at.
    pub started_at: Option<DateTime>,
    /// Reached a terminal state at.
    pub finished_at: Option<DateTime>,
    /// Resume point.
    #[serde(default)]
    pub checkpoint: Checkpoint,
    /// Custom-field keys discovered at start (exports asking for all custom fields).
    #[serde(default)]
    pub custom_keys: Option<Vec<String>>,
    /// The finished file (exports).
    pub result: Option<ExportFile>,
    /// A cancel was asked for; honoured at the next batch boundary.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Instance holding the job.
    pub lease_owner: Option<String>,
    /// Lease expiry on the database's clock; another instance may take over after it.
    pub lease_until: Option<DateTime>,
    /// Bumped by every acquisition: the fence of every write the holder
    /// makes, so a holder that lost the lease cannot write any more.
    #[serde(default)]
    pub lease_epoch: i64,
    /// The server a running job is waiting for (an outage), if any.
    #[serde(default)]
    pub waiting: Option<Dependency>,
    /// Delete batch in progress: the oldest one not yet checkpointed.
    #[serde(default)]
    pub inflight: Option<DeleteInflight>,
    /// The delete batch after `inflight`, being deleted while `inflight` is announced.
    #[serde(default)]
    pub inflight_next: Option<DeleteInflight>,
    /// A delete that keeps nothing (an erasure): it cannot be restored.
    #[serde(default)]
    pub hard_delete: bool,
    /// Until when what a delete removed is kept (and can be restored); set
    /// when the delete starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restorable_until: Option<DateTime>,
    /// The delete a restore undoes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_job_id: Option<String>,
    /// `<sourceJobId>#<n>`, unique (sparse): the n-th restore of a delete, so
    /// two racing restore requests cannot both create one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_key: Option<String>,
    /// Contacts a restore left alone because their `_id` exists again.
    #[serde(default)]
    pub skipped: i64,
}

impl JobRecord {
    /// A new pending job.
    pub fn new(
        kind: JobKind,
        org_id: ObjectId,
        command_id: Option<String>,
        requested_by: Option<ObjectId>,
        filter: Filter,
        export: Option<ExportSpec>,
    ) -> JobRecord {
        let command_key = command_id
            .as_ref()
            .map(|c| format!("{}:{c}", org_id.to_hex()));
        JobRecord {
            job_id: uuid::Uuid::new_v4().to_string(),
            kind,
            org_id,
            command_id,
            command_key,
            requested_by,
            status: JobStatus::Pending,
            filter,
            export,
            snapshot_max_id: None,
            initialised: false,
            total: None,
            processed: 0,
            counts: Counts::default(),
            error: None,
            last_error: None,
            attempts: 0,
            created_at: DateTime::now(),
            started_at: None,
            finished_at: None,
            checkpoint: Checkpoint::default(),
            custom_keys: None,
            result: None,
            cancel_requested: false,
            lease_owner: None,
            lease_until: None,
            lease_epoch: 0,
            waiting: None,
            inflight: None,
            inflight_next: None,
            hard_delete: false,
            restorable_until: None,
            source_job_id: None,
            restore_key: None,
            skipped: 0,
        }
    }

    /// The snapshot callers see. `downloadUrl` is filled in by the service, which holds the signing key.
    pub fn snapshot(&self) -> JobSnapshot {
        JobSnapshot {
            job_id: self.job_id.clone(),
            kind: self.kind,
            org_id: self.org_id.to_hex(),
            command_id: self.command_id.clone(),
            status: self.status,
            total: self.total,
            processed: self.processed,
            counts: self.counts,
            error: self.error.clone(),
            attempts: self.attempts,
            waiting: self.waiting.filter(|_| !self.status.is_terminal()),
            created_at: rfc3339(self.created_at),
            started_at: self.started_at.map(rfc3339),
            finished_at: self.finished_at.map(rfc3339),
            result: self.result_snapshot(),
            source_job_id: self.source_job_id.clone(),
            restorable_until: match self.kind {
                JobKind::Delete if !self.hard_delete => self.restorable_until.map(rfc3339),
                _ => None,
            },
            hard_delete: (self.kind == JobKind::Delete).then_some(self.hard_delete),
        }
    }

    fn result_snapshot(&self) -> Option<JobResult> {
        if self.kind == JobKind::Restore {
            // Known once the restore has ended: what it put back and what it left.
            return self.status.is_terminal().then(|| {
                JobResult::Restore(RestoreResult {
                    restored: self.counts.contacts,
                    skipped: self.skipped.max(0) as u64,
                })
            });
        }
        self.result.as_ref().map(|r| {
            JobResult::Export(ResultSnapshot {
                file_name: r.file_name.clone(),
                format: r.format,
                gzip: r.gzip,
                rows: r.rows,
                bytes: r.bytes,
                sha256: r.sha256.clone(),
                expired: r.expired,
                download_url: None,
                expires_at: None,
            })
        })
    }
}

/// RFC 3339 UTC with milliseconds, as every time on the wire.
pub fn rfc3339(t: DateTime) -> String {
    t.to_chrono().to_rfc3339_opts(SecondsFormat::Millis, true)
}
