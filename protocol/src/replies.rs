//! Replies of the NATS commands (contract section 4) that are not a job
//! snapshot (that is [`crate::job::JobSnapshot`]).

use serde::{Deserialize, Serialize};

/// `bulk.v1.count`: `{count}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountReply {
    /// Matching contacts.
    pub count: u64,
}

/// A reply that is either the value or the contract's error
/// (`{"error": {...}}`), as clients read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply<T> {
    /// The error reply.
    Error(crate::error::ErrorReply),
    /// The value.
    Ok(T),
}

/// `{jobId, kind, status}`: the reply of a job-starting command
/// (`bulk.v1.export`, `bulk.v1.delete`, `bulk.v1.restore`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    /// The job (UUID), the same one again for a repeated `commandId`.
    pub job_id: String,
    /// What it does.
    pub kind: crate::job::JobKind,
    /// Where it is (`pending` for a new job; a replay tells the job's state).
    pub status: crate::job::JobStatus,
}

/// `{dryRun: true, counts}`: what a delete (or a restore) would remove (or
/// put back); no job was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRunReply {
    /// Always `true`.
    pub dry_run: bool,
    /// Contacts, conversations and messages concerned.
    pub counts: crate::job::Counts,
}

impl DryRunReply {
    /// The reply for `counts`.
    pub fn new(counts: crate::job::Counts) -> DryRunReply {
        DryRunReply {
            dry_run: true,
            counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Counts, JobKind, JobStatus};
    use serde_json::json;

    #[test]
    fn replies_have_the_contract_shape_and_read_back() {
        let accepted = Accepted {
            job_id: "j".into(),
            kind: JobKind::Delete,
            status: JobStatus::Pending,
        };
        let v = serde_json::to_value(&accepted).unwrap();
        assert_eq!(
            v,
            json!({"jobId": "j", "kind": "delete", "status": "pending"})
        );
        assert_eq!(serde_json::from_value::<Accepted>(v).unwrap(), accepted);
        let dry = DryRunReply::new(Counts {
            contacts: 1,
            conversations: 2,
            messages: 3,
        });
        let v = serde_json::to_value(dry).unwrap();
        assert_eq!(
            v,
            json!({"dryRun": true, "counts": {"contacts": 1, "conversations": 2, "messages": 3}})
        );
        assert_eq!(serde_json::from_value::<DryRunReply>(v).unwrap(), dry);
        // A dry run is not an accepted job, nor the other way round.
        assert!(serde_json::from_value::<Accepted>(json!({"dryRun": true})).is_err());
        let err = json!({"error": {"code": "not_found", "message": "no job"}});
        assert!(matches!(
            serde_json::from_value::<Reply<Accepted>>(err).unwrap(),
            Reply::Error(_)
        ));
    }
}
