//! The events of contract section 6, written once: the service publishes
//! them, the WebSocket hub and the CLI read them back with the same types.

use serde::{Deserialize, Serialize};

use crate::filter::PipelineType;

/// The two kinds of job event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobEventType {
    /// `processed` moved (at most about ten a second per job).
    #[serde(rename = "job.progress")]
    Progress,
    /// The status changed (or the terminal snapshot).
    #[serde(rename = "job.status")]
    Status,
}

impl JobEventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobEventType::Progress => "job.progress",
            JobEventType::Status => "job.status",
        }
    }
}

/// `bulk.v1.events.<orgId>.job.<jobId>`: `{type, job}`, `J` being the job
/// snapshot (or a part of it, for readers that need only that).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent<J> {
    /// Progress or status.
    #[serde(rename = "type")]
    pub kind: JobEventType,
    /// The job's snapshot.
    pub job: J,
}

/// The tag of a [`ContactRemoved`] event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContactRemovedType {
    /// `contact_removed`.
    #[serde(rename = "contact_removed")]
    ContactRemoved,
}

/// `bulk.v1.events.<orgId>.contact_removed`, one per deleted contact, with
/// the header `Nats-Msg-Id: <jobId>:<contactId>` ([`ContactRemoved::msg_id`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContactRemoved {
    /// Always `contact_removed`.
    #[serde(rename = "type")]
    pub kind: ContactRemovedType,
    /// 24-hex organisation id.
    pub org_id: String,
    /// 24-hex id of the deleted contact.
    pub contact_id: String,
    /// The delete job.
    pub job_id: String,
    /// Contact or Application.
    pub pipeline_type: PipelineType,
    /// 24-hex id of its assignee, if any.
    pub owner_id: Option<String>,
    /// RFC 3339 with milliseconds.
    pub at: String,
}

impl ContactRemoved {
    /// The deduplication id: `<jobId>:<contactId>`.
    pub fn msg_id(&self) -> String {
        format!("{}:{}", self.job_id, self.contact_id)
    }
}

/// The fields of a job snapshot that readers of events check or act on; the
/// rest of the snapshot is passed through untouched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobHead {
    /// The job.
    pub job_id: String,
    /// Its organisation.
    pub org_id: String,
    /// Rows or contacts handled.
    #[serde(default)]
    pub processed: i64,
    /// Lifecycle state (`pending`, … `completed`).
    pub status: String,
    /// Matching documents at start.
    #[serde(default)]
    pub total: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_have_the_contract_shape() {
        let e = JobEvent {
            kind: JobEventType::Status,
            job: json!({"jobId": "j"}),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"job.status","job":{"jobId":"j"}}"#
        );
        let c = ContactRemoved {
            kind: ContactRemovedType::ContactRemoved,
            org_id: "o".into(),
            contact_id: "c".into(),
            job_id: "j".into(),
            pipeline_type: PipelineType::Contact,
            owner_id: None,
            at: "t".into(),
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"type": "contact_removed", "orgId": "o", "contactId": "c", "jobId": "j",
                   "pipelineType": "Contact", "ownerId": null, "at": "t"})
        );
        assert_eq!(c.msg_id(), "j:c");
    }
}
