//! The job as callers see it (contract section 5): kinds, statuses, counts and
//! the snapshot every reply, event and HTTP body carries. The job core builds
//! it from its record; transports and clients read it with these types.

use serde::{Deserialize, Serialize};

use crate::filter::Format;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Streams matching contacts into a file.
    Export,
    /// Cascade-deletes matching contacts.
    Delete,
    /// Puts back what a delete removed.
    Restore,
}

impl JobKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Export => "export",
            JobKind::Delete => "delete",
            JobKind::Restore => "restore",
        }
    }
}

/// Where a job is in its life. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted, waiting for a slot.
    Pending,
    /// Running (or resumable after a crash).
    Processing,
    /// Done; terminal.
    Completed,
    /// Gave up after bounded attempts; terminal.
    Failed,
    /// Stopped on request at a batch boundary; terminal.
    Cancelled,
}

impl JobStatus {
    /// True for completed, failed and cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The servers a job depends on; what a waiting job waits for (`waiting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dependency {
    /// The NATS server (events, `contact_removed`).
    Nats,
    /// The MongoDB server (records, contacts, chunks).
    Mongodb,
}

impl Dependency {
    /// The wire name (`waiting` in the snapshot).
    pub fn as_str(self) -> &'static str {
        match self {
            Dependency::Nats => "nats",
            Dependency::Mongodb => "mongodb",
        }
    }
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Documents removed by a delete job, or put back by a restore (zero for exports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Contacts (or applications) deleted.
    pub contacts: u64,
    /// Conversations deleted.
    pub conversations: u64,
    /// Messages deleted.
    pub messages: u64,
}

/// The export file as callers see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultSnapshot {
    /// Download file name.
    pub file_name: String,
    /// CSV or NDJSON.
    pub format: Format,
    /// Gzip-compressed.
    pub gzip: bool,
    /// Data rows.
    pub rows: i64,
    /// File size.
    pub bytes: i64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// The file's retention has passed: its data is gone and it cannot be downloaded.
    #[serde(default)]
    pub expired: bool,
    /// Signed link, valid 15 minutes.
    pub download_url: Option<String>,
    /// When the link expires.
    pub expires_at: Option<String>,
}

/// What a restore did, in its snapshot's `result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreResult {
    /// Contacts put back (with their conversations and messages, in `counts`).
    pub restored: u64,
    /// Contacts left alone because their `_id` exists again.
    pub skipped: u64,
}

/// A job's `result`: the export file, or what a restore did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobResult {
    /// Export result.
    Export(ResultSnapshot),
    /// Restore result.
    Restore(RestoreResult),
}

impl JobResult {
    /// The export result, if this is one.
    pub fn export(&self) -> Option<&ResultSnapshot> {
        match self {
            JobResult::Export(r) => Some(r),
            JobResult::Restore(_) => None,
        }
    }

    /// The export result, if this is one, to fill in its link.
    pub fn export_mut(&mut self) -> Option<&mut ResultSnapshot> {
        match self {
            JobResult::Export(r) => Some(r),
            JobResult::Restore(_) => None,
        }
    }

    /// The restore result, if this is one.
    pub fn restore(&self) -> Option<&RestoreResult> {
        match self {
            JobResult::Restore(r) => Some(r),
            JobResult::Export(_) => None,
        }
    }
}

/// The job snapshot of the contract (reply, event payload, HTTP body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSnapshot {
    /// UUID.
    pub job_id: String,
    /// Export, delete or restore.
    pub kind: JobKind,
    /// 24-hex organisation id.
    pub org_id: String,
    /// Idempotency key.
    pub command_id: Option<String>,
    /// Lifecycle state.
    pub status: JobStatus,
    /// Matching documents at start; null until counted.
    pub total: Option<i64>,
    /// Rows exported or contacts handled.
    pub processed: i64,
    /// Documents deleted.
    pub counts: Counts,
    /// Failure reason.
    pub error: Option<String>,
    /// Attempts at the job's work (failures of its own work add one).
    pub attempts: i32,
    /// What a running job waits for during an outage: `nats` or `mongodb`;
    /// absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Dependency>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub started_at: Option<String>,
    /// RFC 3339.
    pub finished_at: Option<String>,
    /// Export or restore result.
    pub result: Option<JobResult>,
    /// The delete a restore undoes (restores only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_job_id: Option<String>,
    /// Until when a delete can be restored (deletes that keep what they remove).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restorable_until: Option<String>,
    /// Whether a delete was an erasure (deletes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_delete: Option<bool>,
}

impl JobSnapshot {
    /// The export file, if this is a finished export.
    pub fn export_result(&self) -> Option<&ResultSnapshot> {
        self.result.as_ref().and_then(JobResult::export)
    }

    /// What a restore did, once it has ended.
    pub fn restore_result(&self) -> Option<&RestoreResult> {
        self.result.as_ref().and_then(JobResult::restore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn snapshot() -> JobSnapshot {
        JobSnapshot {
            job_id: "j".into(),
            kind: JobKind::Export,
            org_id: "o".into(),
            command_id: None,
            status: JobStatus::Completed,
            total: Some(2),
            processed: 2,
            counts: Counts::default(),
            error: None,
            attempts: 1,
            waiting: None,
            created_at: "t".into(),
            started_at: Some("t".into()),
            finished_at: Some("t".into()),
            result: Some(JobResult::Export(ResultSnapshot {
                file_name: "f.csv".into(),
                format: Format::Csv,
                gzip: false,
                rows: 2,
                bytes: 10,
                sha256: "s".into(),
                expired: false,
                download_url: None,
                expires_at: None,
            })),
            source_job_id: None,
            restorable_until: None,
            hard_delete: None,
        }
    }

    #[test]
    fn the_snapshot_has_the_contract_shape_and_reads_back() {
        let s = snapshot();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["kind"], "export");
        assert_eq!(
            v["counts"],
            json!({"contacts": 0, "conversations": 0, "messages": 0})
        );
        assert_eq!(v["result"]["fileName"], "f.csv");
        assert!(v.get("waiting").is_none() && v.get("hardDelete").is_none());
        let back: JobSnapshot = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.export_result().map(|r| r.rows), Some(2));
        assert!(back.restore_result().is_none());
    }

    #[test]
    fn a_restore_result_reads_back_as_one() {
        let mut s = snapshot();
        s.kind = JobKind::Restore;
        s.result = Some(JobResult::Restore(RestoreResult {
            restored: 3,
            skipped: 1,
        }));
        let back: JobSnapshot = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(
            back.restore_result().map(|r| (r.restored, r.skipped)),
            Some((3, 1))
        );
        assert!(JobStatus::Cancelled.is_terminal() && !JobStatus::Processing.is_terminal());
        assert_eq!(Dependency::Mongodb.to_string(), "mongodb");
    }
}
