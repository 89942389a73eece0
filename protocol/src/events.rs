//! The events of contract section 6, written once: the service publishes
//! them, the WebSocket hub and the CLI read them back with the same types.

use serde::{Deserialize, Serialize};

use crate::filter::PipelineType;
use crate::job::JobStatus;

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

/// The kind of a per-contact event (and the last token of its subject).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContactEventType {
    /// A delete removed the contact.
    #[serde(rename = "contact_removed")]
    Removed,
    /// A restore put it back.
    #[serde(rename = "contact_restored")]
    Restored,
}

impl ContactEventType {
    /// The wire name (`contact_removed`, `contact_restored`).
    pub fn as_str(self) -> &'static str {
        match self {
            ContactEventType::Removed => "contact_removed",
            ContactEventType::Restored => "contact_restored",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<ContactEventType> {
        match s {
            "contact_removed" => Some(ContactEventType::Removed),
            "contact_restored" => Some(ContactEventType::Restored),
            _ => None,
        }
    }
}

/// `bulk.v1.events.<orgId>.contact_removed` (one per deleted contact) and
/// `….contact_restored` (one per restored contact, with `sourceJobId`), with
/// the header `Nats-Msg-Id: <jobId>:<contactId>` ([`ContactEvent::msg_id`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContactEvent {
    /// Removed or restored.
    #[serde(rename = "type")]
    pub kind: ContactEventType,
    /// 24-hex organisation id.
    pub org_id: String,
    /// 24-hex id of the contact.
    pub contact_id: String,
    /// The delete (or restore) job.
    pub job_id: String,
    /// The delete a restore undoes (restored contacts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_job_id: Option<String>,
    /// Contact or Application.
    pub pipeline_type: PipelineType,
    /// 24-hex id of its assignee, if any.
    pub owner_id: Option<String>,
    /// RFC 3339 with milliseconds.
    pub at: String,
}

impl ContactEvent {
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
    /// Lifecycle state.
    pub status: JobStatus,
    /// Matching documents at start.
    #[serde(default)]
    pub total: Option<i64>,
    /// When it reached its terminal state (RFC 3339).
    #[serde(default)]
    pub finished_at: Option<String>,
}

/// The body of a webhook delivery (contract section 12): `{id, type, createdAt, job}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDelivery<J> {
    /// The delivery's id (also `Bulk-Webhook-Id`).
    pub id: String,
    /// `job.completed`, `job.failed` or `job.cancelled`.
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339.
    pub created_at: String,
    /// The job's terminal snapshot.
    pub job: J,
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
        let mut c = ContactEvent {
            kind: ContactEventType::Removed,
            org_id: "o".into(),
            contact_id: "c".into(),
            job_id: "j".into(),
            source_job_id: None,
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
        c.kind = ContactEventType::Restored;
        c.source_job_id = Some("d".into());
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"type":"contact_restored","orgId":"o","contactId":"c","jobId":"j","sourceJobId":"d","pipelineType":"Contact","ownerId":null,"at":"t"}"#
        );
    }
}
