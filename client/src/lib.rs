//! contact-bulk-client: the typed NATS client of contact-bulk, shared by the
//! CLI's operator commands and the benchmarks (as mini-redis shares its client):
//! one method per command, taking the protocol's command and returning the
//! protocol's reply ([`Accepted`], [`DryRunReply`] counts, [`JobSnapshot`]);
//! an error reply becomes a [`ReplyError`] naming the field; following a job to
//! its terminal state reads its events as [`JobEvent`]s; [`download`] fetches
//! an export's file. It depends on the protocol crate only, never on the service.

pub mod download;

use std::fmt;
use std::time::Duration;

use async_nats::{ServerAddr, Subscriber};
use contact_bulk_protocol::commands::{
    CancelCommand, CountCommand, DeleteCommand, ExportCommand, JobId, JobQuery, RestoreCommand,
};
use contact_bulk_protocol::error::{ErrorBody, ErrorCode, ErrorReply};
use contact_bulk_protocol::events::JobEvent;
use contact_bulk_protocol::job::{Counts, JobSnapshot, JobStatus};
use contact_bulk_protocol::parse::decode;
use contact_bulk_protocol::replies::{Accepted, CountReply, DryRunReply};
use contact_bulk_protocol::subjects::{Command, Subjects};
use contact_bulk_protocol::Id;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long a command may take to be answered (dry runs count large organisations).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Without an event for this long, the job is polled.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// An error reply of the service (`{"error": {code, message, field?, retryAfterMs?}}`),
/// shown as `validation_error in field filter.stageIds[0]: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError(pub ErrorBody);

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.0;
        write!(f, "{}", e.code.as_str())?;
        if let Some(field) = &e.field {
            write!(f, " in field {field}")?;
        }
        write!(f, ": {}{}", e.message, retry_hint(e.retry_after_ms))
    }
}

impl std::error::Error for ReplyError {}

impl ReplyError {
    /// A validation error of `field`, found before anything was sent.
    pub fn invalid(field: &str, message: impl Into<String>) -> ReplyError {
        ReplyError(ErrorBody {
            code: ErrorCode::ValidationError,
            message: message.into(),
            field: Some(field.to_string()),
            retry_after_ms: None,
        })
    }

    /// The error's code.
    pub fn code(&self) -> ErrorCode {
        self.0.code
    }
}

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service answered with an error reply.
    #[error(transparent)]
    Reply(#[from] ReplyError),
    /// Nothing answered within the timeout (a job-starting command carrying a
    /// `commandId` can safely be sent again).
    #[error("no reply on {subject} within {timeout:?}")]
    NoReply {
        /// The command's subject.
        subject: String,
        /// How long was waited.
        timeout: Duration,
    },
    /// No service instance listens on the subject.
    #[error("no contact-bulk instance answers on {subject}: is the service running?")]
    NoResponders {
        /// The command's subject.
        subject: String,
    },
    /// The request could not be sent.
    #[error("request on {subject}: {source}")]
    Nats {
        /// The command's subject.
        subject: String,
        /// What NATS said.
        source: async_nats::RequestError,
    },
    /// The reply is not what the contract says this command answers.
    #[error("unexpected reply on {subject}: {reason}")]
    Malformed {
        /// The command's subject.
        subject: String,
        /// What did not decode, with its field.
        reason: String,
    },
}

impl ClientError {
    /// Whether this is the service or its servers being unreachable for now
    /// (no reply, no responders, an `internal` error reply), as opposed to an
    /// answer about the request (`not_found`, `validation_error`, …).
    pub fn is_outage(&self) -> bool {
        match self {
            ClientError::Reply(r) => r.code() == ErrorCode::Internal,
            ClientError::Malformed { .. } => false,
            _ => true,
        }
    }
}

/// `" (retry in 12 s, at 10:41:07 UTC)"` for a limited command, else nothing.
fn retry_hint(retry_after_ms: Option<u64>) -> String {
    let Some(ms) = retry_after_ms else {
        return String::new();
    };
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(ms as i64);
    format!(
        " (retry in {} s, at {} UTC)",
        ms.div_ceil(1000).max(1),
        at.format("%H:%M:%S")
    )
}

/// The servers of a NATS URL: one server or a cluster's comma-separated list.
pub fn nats_servers(list: &str) -> anyhow::Result<Vec<ServerAddr>> {
    let servers = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| anyhow::anyhow!("NATS_URL: invalid server {s:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!servers.is_empty(), "NATS_URL: no server given");
    Ok(servers)
}

/// The 24-hex id `value` of `field`, or the validation error the service would give.
pub fn id(field: &str, value: &str) -> Result<Id, ReplyError> {
    Id::parse(value).ok_or_else(|| {
        ReplyError::invalid(field, format!("{value:?} is not a 24-hex ObjectId string"))
    })
}

/// What a follower shows of a job: a progress bar (the CLI), or nothing
/// ([`Quiet`], the benchmarks).
pub trait Progress {
    /// A newer snapshot of the job.
    fn update(&mut self, snap: &JobSnapshot);
    /// The last snapshot, once the job is terminal.
    fn finish(&mut self, _snap: &JobSnapshot) {}
}

/// Shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn update(&mut self, _snap: &JobSnapshot) {}
}

/// A NATS connection plus the subject prefix of the service (`bulk`).
pub struct Nats {
    /// The client.
    pub client: async_nats::Client,
    subjects: Subjects,
}

impl Nats {
    /// Connects to `url` (one server or a cluster's comma-separated list),
    /// giving up after 10 s.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Nats> {
        use anyhow::Context as _;
        let servers = nats_servers(url)?;
        let connect = async_nats::ConnectOptions::new()
            .name("contact-bulk-cli")
            .request_timeout(None)
            // Connection trouble surfaces as request errors; no event log lines.
            .event_callback(|_| async {})
            .connect(servers);
        let client = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| anyhow::anyhow!("nats at {url} did not answer within 10 s"))?
            .with_context(|| format!("connecting to nats at {url}"))?;
        Ok(Nats {
            client,
            subjects: Subjects::new(prefix),
        })
    }

    /// Subscribes to the job events of `org`: one job, or all of them (`None`).
    pub async fn job_events(&self, org: &str, job_id: Option<&str>) -> anyhow::Result<Subscriber> {
        let subject = self.subjects.job_events(org, job_id.unwrap_or(">"));
        let sub = self.client.subscribe(subject).await?;
        // Make sure the server has the subscription before anything is asked.
        self.client.flush().await?;
        Ok(sub)
    }

    /// Sends a command and reads its reply as `T`; an error reply becomes a
    /// [`ReplyError`], a reply of another shape a [`ClientError::Malformed`]
    /// naming the field that did not decode.
    pub async fn request<T: DeserializeOwned>(
        &self,
        cmd: Command,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let subject = self.subjects.command(cmd);
        let malformed = |reason: String| ClientError::Malformed {
            subject: subject.clone(),
            reason,
        };
        let payload = serde_json::to_vec(body).map_err(|e| malformed(e.to_string()))?;
        let sent = self.client.request(subject.clone(), payload.into());
        let msg = match tokio::time::timeout(REQUEST_TIMEOUT, sent).await {
            Err(_) => {
                return Err(ClientError::NoReply {
                    subject,
                    timeout: REQUEST_TIMEOUT,
                })
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(ClientError::NoResponders { subject })
            }
            Ok(Err(source)) => return Err(ClientError::Nats { subject, source }),
            Ok(Ok(msg)) => msg,
        };
        // A snapshot has `"error": null` (or a string); only an error reply
        // has an error object with a code.
        if let Ok(ErrorReply { error }) = serde_json::from_slice(&msg.payload) {
            return Err(ReplyError(error).into());
        }
        decode(&msg.payload).map_err(|e| malformed(e.to_string()))
    }

    /// `bulk.v1.export`: starts an export.
    pub async fn export(&self, cmd: &ExportCommand) -> Result<Accepted, ClientError> {
        self.request(Command::Export, cmd).await
    }

    /// `bulk.v1.delete`: starts a cascade delete.
    pub async fn delete(&self, cmd: &DeleteCommand) -> Result<Accepted, ClientError> {
        let cmd = DeleteCommand {
            dry_run: None,
            ..cmd.clone()
        };
        self.request(Command::Delete, &cmd).await
    }

    /// `bulk.v1.delete` with `dryRun`: what the delete would remove; no job.
    pub async fn delete_dry_run(&self, cmd: &DeleteCommand) -> Result<Counts, ClientError> {
        let cmd = DeleteCommand {
            dry_run: Some(true),
            command_id: None,
            ..cmd.clone()
        };
        let reply: DryRunReply = self.request(Command::Delete, &cmd).await?;
        Ok(reply.counts)
    }

    /// `bulk.v1.restore`: starts the restore of an ended delete.
    pub async fn restore(&self, cmd: &RestoreCommand) -> Result<Accepted, ClientError> {
        let cmd = RestoreCommand {
            dry_run: None,
            ..cmd.clone()
        };
        self.request(Command::Restore, &cmd).await
    }

    /// `bulk.v1.restore` with `dryRun`: what a restore started now would put back.
    pub async fn restore_dry_run(&self, cmd: &RestoreCommand) -> Result<Counts, ClientError> {
        let cmd = RestoreCommand {
            dry_run: Some(true),
            command_id: None,
            ..cmd.clone()
        };
        let reply: DryRunReply = self.request(Command::Restore, &cmd).await?;
        Ok(reply.counts)
    }

    /// `bulk.v1.count`: contacts matching a filter.
    pub async fn count(&self, cmd: &CountCommand) -> Result<u64, ClientError> {
        let reply: CountReply = self.request(Command::Count, cmd).await?;
        Ok(reply.count)
    }

    /// `bulk.v1.cancel`: asks a job to stop; the job's snapshot.
    pub async fn cancel(&self, org: &str, job_id: &str) -> Result<JobSnapshot, ClientError> {
        let cmd = CancelCommand {
            org_id: Some(id("orgId", org)?),
            job_id: Some(JobId(job_id.to_string())),
        };
        self.request(Command::Cancel, &cmd).await
    }

    /// `bulk.v1.job`: the job snapshot.
    pub async fn job(&self, org: &str, job_id: &str) -> Result<JobSnapshot, ClientError> {
        let query = JobQuery {
            // A bad id is an answer about the request, never an outage to wait out.
            org_id: Some(id("orgId", org)?),
            job_id: Some(JobId(job_id.to_string())),
            command_id: None,
        };
        self.request(Command::Job, &query).await
    }

    /// Follows a job until it is terminal and returns its last snapshot.
    ///
    /// `events` must have been subscribed before the job could have produced
    /// its last event (for a new job: before the command was sent); the job is
    /// also polled once at once, and whenever no event came for 2 s, so an
    /// event lost or a job that finished earlier is still seen. A poll that
    /// finds the service or its servers unreachable is retried (the job waits
    /// out the outage, so does its watcher); only an answer about the job ends it.
    pub async fn follow(
        &self,
        org: &str,
        job_id: &str,
        events: &mut Subscriber,
        view: &mut dyn Progress,
    ) -> anyhow::Result<JobSnapshot> {
        let wanted = self.subjects.job_events(org, job_id);
        let mut snap: Option<JobSnapshot> = None;
        let mut poll = true;
        let last = loop {
            if let Some(s) = snap.take_if(|s| s.status.is_terminal()) {
                break s;
            }
            let seen = if poll {
                poll = false;
                match self.job(org, job_id).await {
                    Ok(polled) => polled,
                    Err(e) if e.is_outage() => {
                        tracing::debug!(error = %e, "job poll failed, waiting");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                match tokio::time::timeout(POLL_EVERY, events.next()).await {
                    Ok(Some(msg)) if msg.subject.as_str() == wanted => {
                        match serde_json::from_slice::<JobEvent<JobSnapshot>>(&msg.payload) {
                            Ok(event) => event.job,
                            Err(e) => {
                                tracing::debug!(error = %e, "job event not understood, skipped");
                                continue;
                            }
                        }
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => anyhow::bail!("nats subscription ended"),
                    Err(_) => {
                        poll = true;
                        continue;
                    }
                }
            };
            if newer(snap.as_ref(), &seen) {
                view.update(&seen);
                snap = Some(seen);
            }
        };
        view.finish(&last);
        Ok(last)
    }
}

/// Events and polls may cross: a follower never steps back.
fn newer(old: Option<&JobSnapshot>, seen: &JobSnapshot) -> bool {
    match old {
        None => true,
        Some(old) => seen.status.is_terminal() || seen.processed >= old.processed,
    }
}

/// The status as shown: `processing`, or `processing (waiting for nats)` while
/// the job waits out an outage (the snapshot's `waiting`).
pub fn status_label(snap: &JobSnapshot) -> String {
    let status = snap.status.as_str();
    match snap.waiting {
        Some(what) if !snap.status.is_terminal() => format!("{status} (waiting for {what})"),
        _ => status.to_string(),
    }
}

/// `Ok` for a completed job, else an error naming its status and reason.
pub fn ensure_completed(snap: &JobSnapshot) -> anyhow::Result<()> {
    if snap.status == JobStatus::Completed {
        return Ok(());
    }
    anyhow::bail!(
        "job {} ended {}: {}",
        snap.job_id,
        snap.status.as_str(),
        snap.error.as_deref().unwrap_or("no error recorded")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(code: ErrorCode, field: Option<&str>, retry: Option<u64>) -> ReplyError {
        ReplyError(ErrorBody {
            code,
            message: "x".into(),
            field: field.map(String::from),
            retry_after_ms: retry,
        })
    }

    fn snapshot(v: serde_json::Value) -> JobSnapshot {
        let mut base = json!({
            "jobId": "j", "kind": "delete", "orgId": "o", "commandId": null,
            "status": "processing", "total": 10, "processed": 0,
            "counts": {"contacts": 0, "conversations": 0, "messages": 0},
            "error": null, "attempts": 1, "createdAt": "t", "startedAt": null,
            "finishedAt": null, "result": null,
        });
        for (k, val) in v.as_object().unwrap() {
            base[k] = val.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn reply_errors_name_their_field() {
        let mut e = reply(ErrorCode::ValidationError, Some("filter.stageIds[0]"), None);
        e.0.message = "must be a 24-hex ObjectId string".into();
        assert_eq!(
            e.to_string(),
            "validation_error in field filter.stageIds[0]: must be a 24-hex ObjectId string"
        );
        assert_eq!(
            id("orgId", "nope").unwrap_err().to_string(),
            "validation_error in field orgId: \"nope\" is not a 24-hex ObjectId string"
        );
    }

    #[test]
    fn a_limited_command_says_when_to_retry() {
        let mut e = reply(ErrorCode::RateLimited, None, Some(11_200));
        e.0.message = "at most 30 job-starting requests a minute per organisation".into();
        let text = e.to_string();
        assert!(
            text.starts_with("rate_limited: at most 30 job-starting requests a minute per organisation (retry in 12 s, at "),
            "{text}"
        );
        assert!(text.ends_with(" UTC)"), "{text}");
    }

    #[test]
    fn a_waiting_job_says_what_it_waits_for() {
        let waiting = snapshot(json!({"status": "processing", "waiting": "nats"}));
        assert_eq!(status_label(&waiting), "processing (waiting for nats)");
        let running = snapshot(json!({"status": "processing"}));
        assert_eq!(status_label(&running), "processing");
        let done = snapshot(json!({"status": "completed", "waiting": "mongodb"}));
        assert_eq!(status_label(&done), "completed");
    }

    #[test]
    fn only_outages_are_waited_out() {
        let outage = |code| ClientError::Reply(reply(code, None, None)).is_outage();
        assert!(outage(ErrorCode::Internal));
        assert!(ClientError::NoReply {
            subject: "bulk.v1.job".into(),
            timeout: REQUEST_TIMEOUT
        }
        .is_outage());
        assert!(ClientError::NoResponders {
            subject: "bulk.v1.job".into()
        }
        .is_outage());
        assert!(!outage(ErrorCode::NotFound));
        assert!(!outage(ErrorCode::ValidationError));
        assert!(!ClientError::Malformed {
            subject: "bulk.v1.job".into(),
            reason: "x".into()
        }
        .is_outage());
    }

    #[test]
    fn a_follower_never_steps_back_and_ends_on_a_terminal_state() {
        let at = |n: i64, status: &str| snapshot(json!({"processed": n, "status": status}));
        assert!(newer(None, &at(0, "pending")));
        assert!(newer(Some(&at(5, "processing")), &at(7, "processing")));
        assert!(!newer(Some(&at(7, "processing")), &at(5, "processing")));
        // A terminal snapshot always wins (a cancelled job's count may be lower).
        assert!(newer(Some(&at(7, "processing")), &at(5, "cancelled")));
        let failed = snapshot(json!({"status": "failed", "error": "boom"}));
        assert_eq!(
            ensure_completed(&failed).unwrap_err().to_string(),
            "job j ended failed: boom"
        );
        assert!(ensure_completed(&at(10, "completed")).is_ok());
    }
}
