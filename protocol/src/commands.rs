//! The NATS commands of contract section 4 (and the HTTP bodies that share
//! their shape), as they arrive. Unknown keys are refused; nulls mean "not
//! given". What a command *means* (defaults, the organisation of a token,
//! the filter's own rules) is decided by the service's use cases.

use std::fmt;

use serde::de;
use serde::{Deserialize, Deserializer, Serialize};

use crate::filter::{DeleteFilter, ExportFilter, Format};
use crate::limits::{List, Text};
use crate::types::Id;

/// A caller's idempotency key: a non-empty string of at most 256 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct CommandId(pub String);

impl<'de> Deserialize<'de> for CommandId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Text::deserialize(d)? {
            t if t.is_empty() => Err(de::Error::custom("must be a non-empty string")),
            t => Ok(CommandId(t.into_string())),
        }
    }
}

/// A job id as sent: any non-empty string of at most 256 characters (unknown
/// ids are simply not found).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Text::deserialize(d)? {
            t if t.is_empty() => Err(de::Error::custom("must be a non-empty string")),
            t => Ok(JobId(t.into_string())),
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `bulk.v1.export`, `bulk.v1.submit.export` and `POST /api/exports`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportCommand {
    /// The organisation (NATS; on HTTP it comes from the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Id>,
    /// The user asking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<Id>,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<CommandId>,
    /// What to export (required on NATS; absent on HTTP = the whole organisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<ExportFilter>,
    /// `csv` (default) or `ndjson`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// Gzip the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gzip: Option<bool>,
    /// Columns (contract section 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<List<Text>>,
    /// Download file name (sanitised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<Text>,
    /// Contacts carrying any of these tags (seed 002).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_ids: Option<List<Text>>,
}

/// `bulk.v1.delete` and `bulk.v1.submit.delete`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteCommand {
    /// The organisation (NATS; on HTTP it comes from the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Id>,
    /// The user asking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<Id>,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<CommandId>,
    /// What to delete (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<DeleteFilter>,
    /// Only count what would go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    /// An erasure: nothing is kept, nothing can be restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_delete: Option<bool>,
}

/// `bulk.v1.restore`, `bulk.v1.submit.restore` and
/// `POST /api/contacts/bulk-job/{jobId}/restore`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreCommand {
    /// The organisation (NATS; on HTTP it comes from the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Id>,
    /// The delete job to undo (required; on HTTP it comes from the path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// The user asking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<Id>,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<CommandId>,
    /// Only count what would come back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// The body of `POST /api/contacts/bulk-job/{jobId}/restore` (the job comes
/// from the path, the organisation and the user from the token).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreBody {
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<CommandId>,
    /// Only count what would come back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// An event a webhook can ask for (contract section 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookEvent {
    /// A job completed.
    Completed,
    /// A job failed.
    Failed,
    /// A job was cancelled.
    Cancelled,
}

impl WebhookEvent {
    /// Every event, in the contract's order.
    pub const ALL: [WebhookEvent; 3] = [
        WebhookEvent::Completed,
        WebhookEvent::Failed,
        WebhookEvent::Cancelled,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Completed => "job.completed",
            WebhookEvent::Failed => "job.failed",
            WebhookEvent::Cancelled => "job.cancelled",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<WebhookEvent> {
        WebhookEvent::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl Serialize for WebhookEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for WebhookEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(crate::types::Expect::new(
            "must be one of job.completed, job.failed, job.cancelled",
            WebhookEvent::parse,
        ))
    }
}

impl crate::limits::Item for WebhookEvent {
    const ARRAY: &'static str = "a list of event names";
}

/// Longest accepted webhook URL.
pub const MAX_URL: usize = 2048;

/// `POST /api/webhooks`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookRequest {
    /// Where deliveries go (`https://` or `http://`, checked by the service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Which events (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<List<WebhookEvent>>,
}

/// `bulk.v1.count`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct CountCommand {
    /// The organisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Id>,
    /// What to count (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<ExportFilter>,
}

/// `bulk.v1.cancel`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct CancelCommand {
    /// The organisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Id>,
    /// The job (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
}

/// `bulk.v1.job`: by `jobId`, or by `commandId`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct JobQuery {
    /// The organisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Id>,
    /// The job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// Or the command that created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<CommandId>,
}

crate::object_only!(ExportCommand);
crate::remote_serialize!(ExportCommand);
crate::object_only!(DeleteCommand);
crate::remote_serialize!(DeleteCommand);
crate::object_only!(WebhookRequest);
crate::remote_serialize!(WebhookRequest);
crate::object_only!(RestoreCommand);
crate::object_only!(RestoreBody);
crate::remote_serialize!(RestoreBody);
crate::remote_serialize!(RestoreCommand);
crate::object_only!(CountCommand);
crate::remote_serialize!(CountCommand);
crate::object_only!(CancelCommand);
crate::remote_serialize!(CancelCommand);
crate::object_only!(JobQuery);
crate::remote_serialize!(JobQuery);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::decode;
    use crate::ValidationError;

    #[test]
    fn commands_decode_and_refuse_with_paths() {
        let ok: ExportCommand = decode(
            br#"{"orgId": "64b2c3d4e5f60012345678aa", "filter": {"orgWide": true, "limit": 5},
                 "format": "NDJSON", "gzip": null, "fields": ["id"], "commandId": "c1"}"#,
        )
        .unwrap();
        assert_eq!(ok.format, Some(Format::Ndjson));
        assert_eq!(ok.command_id, Some(CommandId("c1".into())));
        let e = |b: &str| decode::<DeleteCommand>(b.as_bytes()).unwrap_err();
        assert_eq!(
            e(r#"{"filter": {"orgWide": true, "limit": 5}}"#),
            ValidationError::new("filter.limit", "limit applies only to exports")
        );
        assert_eq!(
            e(r#"{"filter": {"stageIds": [], "advancedParams": {"ownerIds": ["x"]}}}"#).field,
            "filter.advancedParams.ownerIds[0]"
        );
        assert_eq!(e(r#"{"commandId": ""}"#).field, "commandId");
        assert_eq!(e(r#"{"dryRun": "yes"}"#).field, "dryRun");
        assert_eq!(
            e(r#"{"hard": true}"#),
            ValidationError::new("hard", "unknown key")
        );
        let long = format!(r#"{{"commandId": "{}"}}"#, "c".repeat(257));
        assert!(e(&long).message.contains("256"));
    }
}
