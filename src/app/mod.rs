//! The use cases behind every transport (NATS commands, durable intake, HTTP,
//! WebSocket):
//! parse and validate a request, write the job record, hand it to the supervisor.

pub mod quota;
pub mod retention;
pub mod sweeper;
pub mod view;
pub mod webhooks;

use bson::oid::ObjectId;
use contact_bulk_actors::encode::{ColumnSpec, Format};
use contact_bulk_actors::events::JobEventKind;
use contact_bulk_actors::filter::Filter;
use contact_bulk_actors::model::{Counts, ExportSpec, JobKind, JobRecord, JobSnapshot};
use contact_bulk_actors::repo::{ContactReads, JobRepo, NameSource, RestoreRepo};
use contact_bulk_actors::restore::{self, RestoreCounts};
use contact_bulk_actors::supervisor::SupervisorMsg;
use contact_bulk_actors::{JobError, ValidationError};
use contact_bulk_protocol::commands::{DeleteCommand, ExportCommand, JobQuery, RestoreCommand};
use contact_bulk_protocol::{Id, Text};
use ractor::ActorRef;

use crate::app::quota::Admission;
use crate::auth::Keys;
pub use view::decorate;

/// Handles every entry point shares.
#[derive(Clone)]
pub struct App {
    /// Counts, dry runs and the streamed export's reads of the CRM data.
    pub reads: std::sync::Arc<dyn ContactReads>,
    /// Kept documents of deletes (the restore's dry run).
    pub restore: std::sync::Arc<dyn RestoreRepo>,
    /// Pipeline, stage and owner names of export rows.
    pub names: std::sync::Arc<dyn NameSource>,
    /// Job records.
    pub store: std::sync::Arc<dyn JobRepo>,
    /// Export files.
    pub artifacts: std::sync::Arc<dyn contact_bulk_actors::repo::ChunkRepo>,
    /// The supervisor.
    pub supervisor: ActorRef<SupervisorMsg>,
    /// Token and link keys.
    pub keys: Keys,
    /// NATS, for cross-instance cancel broadcasts.
    pub nats: async_nats::Client,
    /// Subject of the cancel broadcast.
    pub cancel_subject: String,
    /// Job events (the `pending` status of a new job).
    pub sink: std::sync::Arc<dyn contact_bulk_actors::events::EventSink>,
    /// Per-organisation rate and pending-job limits.
    pub quota: crate::app::quota::Quota,
    /// How long export files and ended job records are kept.
    pub retention: crate::app::retention::Retention,
    /// Webhook registrations and deliveries.
    pub webhooks: crate::app::webhooks::Webhooks,
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
        if self.retention.export_expired(job) && job.result.as_ref().is_some_and(|r| !r.expired) {
            // Past its retention but not swept yet: already expired to callers.
            let mut job = job.clone();
            if let Some(r) = job.result.as_mut() {
                r.expired = true;
            }
            return decorate(&self.keys, &job);
        }
        decorate(&self.keys, job)
    }

    /// `bulk.v1.export` / `POST /api/exports`: validates, records, starts.
    /// `org` is the token's organisation on HTTP (then `orgId` must not be sent
    /// and no filter means the whole organisation, as in seed 002).
    pub async fn export(
        &self,
        cmd: ExportCommand,
        org: Option<ObjectId>,
    ) -> Result<JobRecord, JobError> {
        let from_token = org.is_some();
        let org = org_of(cmd.org_id, org)?;
        let mut filter = match cmd.filter {
            Some(spec) => Filter::from_spec(spec, "filter")?,
            None if from_token => Filter {
                org_wide: true,
                ..Filter::default()
            },
            None => return Err(ValidationError::new("filter", "is required").into()),
        };
        if let Some(tags) = cmd.tag_ids {
            filter
                .advanced
                .any_tags
                .extend(tags.into_vec().into_iter().map(Text::into_string));
        }
        let format = cmd.format.unwrap_or_default();
        let gzip = cmd.gzip.unwrap_or(false);
        let columns = match cmd.fields {
            None => ColumnSpec::default_columns(),
            Some(names) => ColumnSpec::from_names(&names, "fields")?,
        };
        let spec = ExportSpec {
            format,
            gzip,
            columns,
            file_name: file_name_for(cmd.filename.as_deref(), format, gzip),
        };
        let job = JobRecord::new(
            JobKind::Export,
            org,
            cmd.command_id.map(|c| c.0),
            cmd.requested_by.map(|u| u.0),
            filter,
            Some(spec),
        );
        self.submit(job).await
    }

    /// `bulk.v1.delete` / `DELETE /api/contacts/query-bulk-delete`.
    pub async fn delete(
        &self,
        cmd: DeleteCommand,
        org: Option<ObjectId>,
    ) -> Result<DeleteOutcome, JobError> {
        let org = org_of(cmd.org_id, org)?;
        let filter = match cmd.filter {
            Some(spec) => Filter::from_spec(spec, "filter")?,
            None => return Err(ValidationError::new("filter", "is required").into()),
        };
        if cmd.dry_run.unwrap_or(false) {
            self.quota.admit(org, Admission::Check).await?;
            return Ok(DeleteOutcome::DryRun(
                self.reads.delete_dry_run(org, &filter).await?,
            ));
        }
        let mut job = JobRecord::new(
            JobKind::Delete,
            org,
            cmd.command_id.map(|c| c.0),
            cmd.requested_by.map(|u| u.0),
            filter,
            None,
        );
        job.hard_delete = cmd.hard_delete.unwrap_or(false);
        Ok(DeleteOutcome::Job(Box::new(self.submit(job).await?)))
    }

    /// `bulk.v1.restore` / `POST /api/contacts/bulk-job/{jobId}/restore`:
    /// undoes an ended delete (contract section 11).
    pub async fn restore(
        &self,
        cmd: RestoreCommand,
        org: Option<ObjectId>,
    ) -> Result<RestoreOutcome, JobError> {
        let org = org_of(cmd.org_id, org)?;
        let job_id = cmd
            .job_id
            .ok_or_else(|| ValidationError::new("jobId", "is required"))?
            .0;
        let command_id = cmd.command_id.map(|c| c.0);
        let requested_by = cmd.requested_by.map(|u| u.0);
        let dry = cmd.dry_run.unwrap_or(false);
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
        let source = restore::source(self.store.as_ref(), org, &job_id).await?;
        if dry {
            self.quota.admit(org, Admission::Check).await?;
            return Ok(RestoreOutcome::DryRun(
                restore::dry_run(self.restore.as_ref(), &source).await?,
            ));
        }
        let (live, n) = restore::existing(self.store.as_ref(), &source.job_id).await?;
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
        let org = job.org_id;
        // A replay is answered before the quota is consulted: it starts nothing.
        let replay = match &job.command_id {
            Some(c) => match self.store.get_by_command(org, c).await {
                Ok(existing) => Some(existing),
                Err(JobError::NotFound(_)) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let (job, created) = match replay {
            Some(existing) => {
                self.quota.peek(org).await;
                (existing, false)
            }
            None => {
                self.quota.admit(org, Admission::Job).await?;
                self.store.create(job).await?
            }
        };
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
            contact_bulk_actors::metrics::job_started();
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
        self.quota.admit(org, Admission::Check).await?;
        self.reads.count(org, filter).await
    }

    /// `bulk.v1.cancel`: asks, broadcasts to every instance, then waits (up to
    /// 3 s) for the job to stop so the reply shows what was done.
    pub async fn cancel(&self, org: ObjectId, job_id: &str) -> Result<JobRecord, JobError> {
        let (job, cancelled_here) = self.store.request_cancel(org, job_id).await?;
        if cancelled_here {
            // A pending job no actor holds: its terminal status is announced here,
            // so the job's last event is its terminal snapshot.
            tracing::info!(job_id, "pending job cancelled");
            contact_bulk_actors::metrics::job_finished(job.kind.as_str(), job.status.as_str());
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
    pub async fn find(&self, query: JobQuery) -> Result<JobRecord, JobError> {
        let org = org_of(query.org_id, None)?;
        match (query.job_id, query.command_id) {
            (Some(id), _) => self.store.get(org, &id.0).await,
            (None, Some(c)) => self.store.get_by_command(org, &c.0).await,
            (None, None) => {
                Err(ValidationError::new("jobId", "jobId or commandId is required").into())
            }
        }
    }
}

/// The organisation of a command: the token's on HTTP (where `orgId` must
/// not be sent), the command's `orgId` on NATS.
pub fn org_of(sent: Option<Id>, token: Option<ObjectId>) -> Result<ObjectId, ValidationError> {
    match (token, sent) {
        (Some(_), Some(_)) => Err(ValidationError::new(
            "orgId",
            "comes from the token; remove it",
        )),
        (Some(org), None) => Ok(org),
        (None, Some(org)) => Ok(org.0),
        (None, None) => Err(ValidationError::new("orgId", "is required")),
    }
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
}
