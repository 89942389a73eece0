//! The operations behind every entry point (NATS commands, durable intake, HTTP):
//! parse and validate a request, write the job record, hand it to the supervisor.

use bson::oid::ObjectId;
use contact_bulk_actors::delete::dry_run;
use contact_bulk_actors::encode::{ColumnSpec, Format};
use contact_bulk_actors::events::JobEventKind;
use contact_bulk_actors::filter::{
    check_list_len, check_string_len, field_path, parse_object_id, Filter, ParseOptions, MAX_STRING,
};
use contact_bulk_actors::model::{Counts, ExportSpec, JobKind, JobRecord, JobSnapshot};
use contact_bulk_actors::restore::{self, RestoreCounts};
use contact_bulk_actors::snapshot;
use contact_bulk_actors::store::JobStore;
use contact_bulk_actors::supervisor::SupervisorMsg;
use contact_bulk_actors::{JobError, ValidationError};
use mongodb::Database;
use ractor::ActorRef;
use serde_json::{Map, Value};

use crate::auth::Keys;

/// Handles every entry point shares.
#[derive(Clone)]
pub struct App {
    /// The CRM database.
    pub db: Database,
    /// Job records.
    pub store: JobStore,
    /// Export files.
    pub artifacts: contact_bulk_actors::artifact::Artifacts,
    /// The supervisor.
    pub supervisor: ActorRef<SupervisorMsg>,
    /// Token and link keys.
    pub keys: Keys,
    /// NATS, for cross-instance cancel broadcasts.
    pub nats: async_nats::Client,
    /// Subject of the cancel broadcast.
    pub cancel_subject: String,
    /// Fan-out of `BULK_EVENTS` to WebSocket clients.
    pub hub: crate::ws::Hub,
    /// Job events (the `pending` status of a new job).
    pub sink: std::sync::Arc<dyn contact_bulk_actors::events::EventSink>,
    /// Webhook registrations and deliveries.
    pub webhooks: crate::webhooks::Webhooks,
}

/// What a restore command produced.
#[derive(Debug)]
pub enum RestoreOutcome {
    /// A restore job was created, or the one already pending, running or
    /// completed for that delete (or for that `commandId`) was found.
    Job(Box<JobRecord>),
    /// `dryRun: true`: what would be put back, no job.
    DryRun(RestoreCounts),
}

/// What a delete command produced.
#[derive(Debug)]
pub enum DeleteOutcome {
    /// A job was created (or found by `commandId`).
    Job(Box<JobRecord>),
    /// `dryRun: true`: what would go, no job.
    DryRun(Counts),
}

impl App {
    /// The snapshot with a fresh signed link for completed exports.
    pub fn snapshot(&self, job: &JobRecord) -> JobSnapshot {
        decorate(&self.keys, job)
    }

    /// `bulk.v1.export` / `POST /api/exports`: validates, records, starts.
    pub async fn export(&self, req: &Value, org: Option<ObjectId>) -> Result<JobRecord, JobError> {
        let obj = object(req, "")?;
        reject_unknown(
            obj,
            &[
                "orgId",
                "requestedBy",
                "commandId",
                "filter",
                "format",
                "gzip",
                "fields",
                "filename",
                "tagIds",
            ],
        )?;
        let from_token = org.is_some();
        let (org, requested_by, command_id) = common(obj, org)?;
        let mut filter = match obj.get("filter") {
            // NATS commands carry their filter; on the HTTP API (seed 002) no
            // filter means the whole organisation of the token.
            None | Some(Value::Null) if !from_token => {
                return Err(ValidationError::new("filter", "is required").into())
            }
            None | Some(Value::Null) => Filter {
                org_wide: true,
                ..Filter::default()
            },
            Some(f) => Filter::from_json(
                f,
                ParseOptions {
                    prefix: "filter",
                    allow_limit: true,
                },
            )?,
        };
        if let Some(tags) = obj.get("tagIds").filter(|v| !v.is_null()) {
            let tags = string_list(tags, "tagIds")?;
            filter.advanced.any_tags.extend(tags);
        }
        let format = match obj.get("format") {
            None | Some(Value::Null) => Format::Csv,
            Some(Value::String(s)) => Format::parse(s, "format")?,
            Some(_) => {
                return Err(ValidationError::new("format", "must be \"csv\" or \"ndjson\"").into())
            }
        };
        let gzip = match obj.get("gzip") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ValidationError::new("gzip", "must be a boolean").into()),
        };
        let columns = ColumnSpec::from_json(obj.get("fields").filter(|v| !v.is_null()), "fields")?;
        let file_name = match obj.get("filename") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                check_string_len(s, "filename")?;
                Some(s.as_str())
            }
            Some(_) => return Err(ValidationError::new("filename", "must be a string").into()),
        };
        let spec = ExportSpec {
            format,
            gzip,
            columns,
            file_name: file_name_for(file_name, format, gzip),
        };
        let job = JobRecord::new(
            JobKind::Export,
            org,
            command_id,
            requested_by,
            filter,
            Some(spec),
        );
        self.submit(job).await
    }

    /// `bulk.v1.delete` / `DELETE /api/contacts/query-bulk-delete`.
    pub async fn delete(
        &self,
        req: &Value,
        org: Option<ObjectId>,
    ) -> Result<DeleteOutcome, JobError> {
        let obj = object(req, "")?;
        reject_unknown(
            obj,
            &[
                "orgId",
                "requestedBy",
                "commandId",
                "filter",
                "dryRun",
                "hardDelete",
            ],
        )?;
        let (org, requested_by, command_id) = common(obj, org)?;
        let filter = match obj.get("filter") {
            None | Some(Value::Null) => {
                return Err(ValidationError::new("filter", "is required").into())
            }
            Some(f) => Filter::from_json(
                f,
                ParseOptions {
                    prefix: "filter",
                    allow_limit: false,
                },
            )?,
        };
        let dry = flag(obj, "dryRun")?;
        let hard = flag(obj, "hardDelete")?;
        if dry {
            return Ok(DeleteOutcome::DryRun(
                dry_run(&self.db, org, &filter).await?,
            ));
        }
        let mut job = JobRecord::new(JobKind::Delete, org, command_id, requested_by, filter, None);
        job.hard_delete = hard;
        Ok(DeleteOutcome::Job(Box::new(self.submit(job).await?)))
    }

    /// `bulk.v1.restore` / `POST /api/contacts/bulk-job/{jobId}/restore`:
    /// undoes an ended delete (contract section 11).
    pub async fn restore(
        &self,
        req: &Value,
        org: Option<ObjectId>,
    ) -> Result<RestoreOutcome, JobError> {
        let obj = object(req, "")?;
        reject_unknown(
            obj,
            &["orgId", "jobId", "requestedBy", "commandId", "dryRun"],
        )?;
        let (org, requested_by, command_id) = common(obj, org)?;
        let job_id = match obj.get("jobId") {
            None | Some(Value::Null) => {
                return Err(ValidationError::new("jobId", "is required").into())
            }
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
            Some(_) => {
                return Err(ValidationError::new(
                    "jobId",
                    "must be a non-empty string of at most 256 characters",
                )
                .into())
            }
        };
        let dry = flag(obj, "dryRun")?;
        if let (Some(command), false) = (&command_id, dry) {
            // A replay returns its job whatever became of the delete since.
            match self.store.get_by_command(org, command).await {
                Ok(job) if job.kind == JobKind::Restore => {
                    return Ok(RestoreOutcome::Job(Box::new(job)))
                }
                Ok(job) => {
                    return Err(JobError::Conflict(format!(
                        "commandId is already used by {} job {}",
                        job.kind.as_str(),
                        job.job_id
                    )))
                }
                Err(JobError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let source = restore::source(self.store.jobs(), org, &job_id).await?;
        if dry {
            return Ok(RestoreOutcome::DryRun(
                restore::dry_run(&self.db, &source).await?,
            ));
        }
        let (live, n) = restore::existing(self.store.jobs(), &source.job_id).await?;
        if let Some(job) = live {
            return Ok(RestoreOutcome::Job(Box::new(job)));
        }
        let mut job = JobRecord::new(
            JobKind::Restore,
            org,
            command_id,
            requested_by,
            source.filter.clone(),
            None,
        );
        job.source_job_id = Some(source.job_id.clone());
        job.restore_key = Some(format!("{}#{n}", source.job_id));
        Ok(RestoreOutcome::Job(Box::new(self.submit(job).await?)))
    }

    /// Records the job (idempotent by `commandId`) and, if new, asks the supervisor to start it.
    pub async fn submit(&self, job: JobRecord) -> Result<JobRecord, JobError> {
        let kind = job.kind;
        let (job, created) = self.store.create(job).await?;
        if job.kind != kind {
            // The key names a job of the other kind: answering with it would tell
            // a caller asking for a delete that its delete was accepted.
            return Err(JobError::Conflict(format!(
                "commandId is already used by {} job {}",
                job.kind.as_str(),
                job.job_id
            )));
        }
        if created {
            tracing::info!(job_id = %job.job_id, kind = job.kind.as_str(), org_id = %job.org_id, "job accepted");
            // Announced before the supervisor can start it, so watchers of the
            // organisation see a job waiting behind the caps, in order.
            if let Err(e) = self.sink.job_event(JobEventKind::Status, &job).await {
                tracing::warn!(job_id = %job.job_id, error = %e, "pending status event not published");
            }
            let _ = self
                .supervisor
                .send_message(SupervisorMsg::Start(job.job_id.clone()));
        }
        Ok(job)
    }

    /// `bulk.v1.count` / `POST /api/contacts/query-count`.
    pub async fn count(&self, org: ObjectId, filter: &Filter) -> Result<u64, JobError> {
        let collection = filter.pipeline_type.collection();
        let n =
            snapshot::count(&self.db, collection, &filter.query(org), None, filter.limit).await?;
        Ok(n.max(0) as u64)
    }

    /// `bulk.v1.cancel`: asks, broadcasts to every instance, then waits (up to
    /// 3 s) for the job to stop so the reply shows what was done.
    pub async fn cancel(&self, org: ObjectId, job_id: &str) -> Result<JobRecord, JobError> {
        let (job, cancelled_here) = self.store.request_cancel(org, job_id).await?;
        if cancelled_here {
            // A pending job no actor holds: its terminal status is announced here,
            // so the job's last event is its terminal snapshot.
            tracing::info!(job_id, "pending job cancelled");
            if let Err(e) = self.sink.job_event(JobEventKind::Status, &job).await {
                tracing::warn!(job_id, error = %e, "cancelled status event not published");
            }
        }
        if job.status.is_terminal() {
            return Ok(job);
        }
        let _ = self
            .supervisor
            .send_message(SupervisorMsg::Cancel(job_id.to_string()));
        if let Err(e) = self
            .nats
            .publish(self.cancel_subject.clone(), job_id.to_string().into())
            .await
        {
            tracing::warn!(job_id, error = %e, "cancel broadcast failed");
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let job = self.store.get(org, job_id).await?;
            if job.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok(job);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// `bulk.v1.job` with either `jobId` or `commandId`.
    pub async fn find(&self, req: &Value) -> Result<JobRecord, JobError> {
        let obj = object(req, "")?;
        reject_unknown(obj, &["orgId", "jobId", "commandId"])?;
        let org = org_id(obj)?;
        match (obj.get("jobId"), obj.get("commandId")) {
            (Some(Value::String(id)), _) => self.store.get(org, id).await,
            (Some(_), _) => Err(ValidationError::new("jobId", "must be a string").into()),
            (None, Some(Value::String(c))) => self.store.get_by_command(org, c).await,
            (None, Some(_)) => Err(ValidationError::new("commandId", "must be a string").into()),
            (None, None) => {
                Err(ValidationError::new("jobId", "jobId or commandId is required").into())
            }
        }
    }
}

/// The snapshot with a fresh signed link when the export is complete.
pub fn decorate(keys: &Keys, job: &JobRecord) -> JobSnapshot {
    let mut snap = job.snapshot();
    if let Some(result) = snap.result.as_mut().and_then(|r| r.export_mut()) {
        let (url, expires) = keys.download_link(&job.job_id);
        result.download_url = Some(url);
        result.expires_at = chrono::DateTime::from_timestamp(expires, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
    snap
}

/// An optional boolean key (absent or null: false).
fn flag(obj: &Map<String, Value>, key: &str) -> Result<bool, ValidationError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ValidationError::new(key, "must be a boolean")),
    }
}

/// The request as an object.
pub fn object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, ValidationError> {
    v.as_object().ok_or_else(|| {
        ValidationError::new(
            if field.is_empty() { "body" } else { field },
            "must be a JSON object",
        )
    })
}

/// Unknown keys are refused: a caller who thinks a key does something must hear it doesn't.
pub fn reject_unknown(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), ValidationError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ValidationError::new(k.clone(), "unknown key")),
        None => Ok(()),
    }
}

/// `orgId` of a NATS command.
pub fn org_id(obj: &Map<String, Value>) -> Result<ObjectId, ValidationError> {
    match obj.get("orgId") {
        None | Some(Value::Null) => Err(ValidationError::new("orgId", "is required")),
        Some(v) => parse_object_id(v, "orgId"),
    }
}

type Common = (ObjectId, Option<ObjectId>, Option<String>);

/// orgId (from the token when given, else the body), requestedBy, commandId.
fn common(obj: &Map<String, Value>, org: Option<ObjectId>) -> Result<Common, ValidationError> {
    let org = match org {
        Some(_) if obj.contains_key("orgId") => {
            return Err(ValidationError::new(
                "orgId",
                "comes from the token; remove it",
            ))
        }
        Some(o) => o,
        None => org_id(obj)?,
    };
    let requested_by = match obj.get("requestedBy") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_object_id(v, "requestedBy")?),
    };
    let command_id = match obj.get("commandId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => {
            check_string_len(s, "commandId")?;
            Some(s.clone())
        }
        Some(_) => {
            return Err(ValidationError::new(
                "commandId",
                format!("must be a non-empty string of at most {MAX_STRING} characters"),
            ))
        }
    };
    Ok((org, requested_by, command_id))
}

fn string_list(v: &Value, field: &str) -> Result<Vec<String>, ValidationError> {
    let arr = v
        .as_array()
        .ok_or_else(|| ValidationError::new(field, "must be an array of strings"))?;
    check_list_len(arr.len(), field)?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            let at = field_path(field, &format!("[{i}]"));
            let s = x
                .as_str()
                .ok_or_else(|| ValidationError::new(at.clone(), "must be a string"))?;
            check_string_len(s, &at)?;
            Ok(s.to_string())
        })
        .collect()
}

/// A safe download name: letters, digits, `.`, `-`, `_` only, no leading dot,
/// at most 100 characters, with the right extension.
pub fn file_name_for(requested: Option<&str>, format: Format, gzip: bool) -> String {
    let ext = format.extension();
    let base = requested
        .map(|s| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        })
        .map(|s| s.trim_start_matches('.').to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("contacts-{}", chrono::Utc::now().format("%Y-%m-%d")));
    let mut base: String = base.chars().take(100).collect();
    for suffix in [".gz", &format!(".{ext}")] {
        if let Some(stripped) = base.strip_suffix(suffix) {
            base = stripped.to_string();
        }
    }
    if gzip {
        format!("{base}.{ext}.gz")
    } else {
        format!("{base}.{ext}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_sanitised_and_get_their_extension() {
        assert_eq!(file_name_for(Some("vip"), Format::Csv, false), "vip.csv");
        assert_eq!(
            file_name_for(Some("vip.csv"), Format::Csv, false),
            "vip.csv"
        );
        assert_eq!(
            file_name_for(Some("../../etc/passwd"), Format::Csv, false),
            "_.._etc_passwd.csv"
        );
        assert_eq!(
            file_name_for(Some("a\"b;c"), Format::Ndjson, true),
            "a_b_c.ndjson.gz"
        );
        assert!(file_name_for(None, Format::Csv, false).starts_with("contacts-"));
        assert!(file_name_for(Some("..."), Format::Csv, false).starts_with("contacts-"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let v = serde_json::json!({"orgId": "x", "filtr": {}});
        let e = reject_unknown(object(&v, "").unwrap(), &["orgId", "filter"]).unwrap_err();
        assert_eq!(e.field, "filtr");
    }
}
