//! contact-bulk-client: the typed NATS client of contact-bulk, shared by the
//! CLI's operator commands and the benchmarks (as mini-redis shares its client):
//! requests whose error replies become errors naming the field, following a job
//! to its terminal state from its events, and downloading an export's file
//! ([`download`]). It depends on the protocol crate only, never on the service.

pub mod download;

use std::time::Duration;

use anyhow::{anyhow, Context};
use async_nats::{ServerAddr, Subscriber};
use contact_bulk_protocol::commands::{JobId, JobQuery};
use contact_bulk_protocol::error::ErrorReply;
use contact_bulk_protocol::events::JobEvent;
use contact_bulk_protocol::subjects::{Command, Subjects};
use contact_bulk_protocol::Id;
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

/// How long a command may take to be answered (dry runs count large organisations).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Without an event for this long, the job is polled.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// An error reply of the service: `{"error": {code, message, field?, retryAfterMs?}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}{}: {message}{}", field.as_deref().map(|f| format!(" in field {f}")).unwrap_or_default(), retry_hint(*retry_after_ms))]
pub struct ReplyError {
    /// `validation_error`, `not_found`, `conflict`, `gone`, `rate_limited` or `internal`.
    pub code: String,
    /// The offending field, for validation errors.
    pub field: Option<String>,
    /// What went wrong.
    pub message: String,
    /// For `rate_limited`: how long to wait before the same command is accepted.
    pub retry_after_ms: Option<u64>,
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
        let servers = nats_servers(url)?;
        let connect = async_nats::ConnectOptions::new()
            .name("contact-bulk-cli")
            .request_timeout(None)
            // Connection trouble surfaces as request errors; no event log lines.
            .event_callback(|_| async {})
            .connect(servers);
        let client = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| anyhow!("nats at {url} did not answer within 10 s"))?
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

    /// Sends a command and returns its reply; an error reply becomes a [`ReplyError`].
    pub async fn request(&self, cmd: Command, body: &impl Serialize) -> anyhow::Result<Value> {
        let subject = self.subjects.command(cmd);
        let payload = serde_json::to_vec(body)?;
        let sent = self.client.request(subject.clone(), payload.into());
        let msg = match tokio::time::timeout(REQUEST_TIMEOUT, sent).await {
            Err(_) => anyhow::bail!("no reply on {subject} within {REQUEST_TIMEOUT:?}"),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                anyhow::bail!(
                    "no contact-bulk instance answers on {subject}: is the service running?"
                )
            }
            Ok(r) => r.with_context(|| format!("request on {subject}"))?,
        };
        let reply: Value = serde_json::from_slice(&msg.payload)
            .with_context(|| format!("reply on {subject} is not JSON"))?;
        // A snapshot has `"error": null` (or a string); an error reply has an object.
        if reply.get("error").is_some_and(Value::is_object) {
            let ErrorReply { error } = serde_json::from_value(reply)
                .with_context(|| format!("error reply on {subject} is malformed"))?;
            return Err(ReplyError {
                code: error.code.as_str().to_string(),
                field: error.field,
                message: error.message,
                retry_after_ms: error.retry_after_ms,
            }
            .into());
        }
        Ok(reply)
    }

    /// The job snapshot (`bulk.v1.job`).
    pub async fn job(&self, org: &str, job_id: &str) -> anyhow::Result<Value> {
        let query = JobQuery {
            // A bad id is an answer about the request, never an outage to wait out.
            org_id: Some(Id::parse(org).ok_or_else(|| ReplyError {
                code: "validation_error".into(),
                field: Some("orgId".into()),
                message: format!("{org:?} is not a 24-hex ObjectId string"),
                retry_after_ms: None,
            })?),
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
    ) -> anyhow::Result<Value> {
        let wanted = self.subjects.job_events(org, job_id);
        let mut snap: Option<Value> = None;
        let mut poll = true;
        loop {
            if snap.as_ref().is_some_and(is_terminal) {
                break;
            }
            let seen = if poll {
                poll = false;
                match self.job(org, job_id).await {
                    Ok(polled) => polled,
                    // The job waits out an outage, and so does the watcher:
                    // only an answer about the job itself ends it.
                    Err(e) if is_outage(&e) => {
                        tracing::debug!(error = %e, "job poll failed, waiting");
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                match tokio::time::timeout(POLL_EVERY, events.next()).await {
                    Ok(Some(msg)) if msg.subject.as_str() == wanted => {
                        match serde_json::from_slice::<JobEvent<Value>>(&msg.payload) {
                            Ok(event) if event.job.is_object() => event.job,
                            _ => continue,
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
            // Events and polls may cross: never step back.
            let newer = match &snap {
                None => true,
                Some(old) => is_terminal(&seen) || processed(&seen) >= processed(old),
            };
            if newer {
                view.update(&seen);
                snap = Some(seen);
            }
        }
        let snap = snap.unwrap_or_default();
        view.finish(&snap);
        Ok(snap)
    }
}

/// Whether a failed request is the service or its servers being unreachable
/// for now (no reply, no responders, an `internal` error reply), as opposed to
/// an answer about the request (`not_found`, `validation_error`, …).
fn is_outage(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<ReplyError>() {
        Some(reply) => reply.code == "internal",
        None => true,
    }
}

/// True for completed, failed and cancelled snapshots.
pub fn is_terminal(snap: &Value) -> bool {
    matches!(status(snap), "completed" | "failed" | "cancelled")
}

/// The snapshot's status.
pub fn status(snap: &Value) -> &str {
    snap["status"].as_str().unwrap_or("unknown")
}

/// The status as shown: `processing`, or `processing (waiting for nats)` while
/// the job waits out an outage (the snapshot's `waiting`).
pub fn status_label(snap: &Value) -> String {
    let status = status(snap);
    match snap["waiting"].as_str().filter(|w| !w.is_empty()) {
        Some(what) if !is_terminal(snap) => format!("{status} (waiting for {what})"),
        _ => status.to_string(),
    }
}

/// Rows exported or contacts handled so far.
pub fn processed(snap: &Value) -> u64 {
    snap["processed"].as_u64().unwrap_or(0)
}

/// `counts` of a delete snapshot as `(contacts, conversations, messages)`.
pub fn counts(v: &Value) -> (u64, u64, u64) {
    let c = &v["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    (n("contacts"), n("conversations"), n("messages"))
}

/// What a follower shows of a job: a progress bar (the CLI), or nothing
/// ([`Quiet`], the benchmarks).
pub trait Progress {
    /// A newer snapshot of the job.
    fn update(&mut self, snap: &Value);
    /// The last snapshot, once the job is terminal.
    fn finish(&mut self, _snap: &Value) {}
}

/// Shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn update(&mut self, _snap: &Value) {}
}

/// The servers of a NATS URL: one server or a cluster's comma-separated list.
pub fn nats_servers(list: &str) -> anyhow::Result<Vec<ServerAddr>> {
    let servers = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| anyhow!("NATS_URL: invalid server {s:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!servers.is_empty(), "NATS_URL: no server given");
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reply_errors_name_their_field() {
        let e = ReplyError {
            code: "validation_error".into(),
            field: Some("filter.stageIds[0]".into()),
            message: "must be a 24-hex ObjectId string".into(),
            retry_after_ms: None,
        };
        assert_eq!(
            e.to_string(),
            "validation_error in field filter.stageIds[0]: must be a 24-hex ObjectId string"
        );
    }

    #[test]
    fn a_limited_command_says_when_to_retry() {
        let e = ReplyError {
            code: "rate_limited".into(),
            field: None,
            message: "at most 30 job-starting requests a minute per organisation".into(),
            retry_after_ms: Some(11_200),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("rate_limited: at most 30 job-starting requests a minute per organisation (retry in 12 s, at "),
            "{text}"
        );
        assert!(text.ends_with(" UTC)"), "{text}");
    }

    #[test]
    fn a_waiting_job_says_what_it_waits_for() {
        let waiting = json!({"status": "processing", "waiting": "nats"});
        assert_eq!(status_label(&waiting), "processing (waiting for nats)");
        let running = json!({"status": "processing", "waiting": null});
        assert_eq!(status_label(&running), "processing");
        let done = json!({"status": "completed", "waiting": "mongodb"});
        assert_eq!(status_label(&done), "completed");
    }

    #[test]
    fn only_outages_are_waited_out() {
        let reply = |code: &str| {
            anyhow::Error::new(ReplyError {
                code: code.into(),
                field: None,
                message: "x".into(),
                retry_after_ms: None,
            })
        };
        assert!(is_outage(&reply("internal")));
        assert!(is_outage(&anyhow::anyhow!(
            "no reply on bulk.v1.job within 120s"
        )));
        assert!(!is_outage(&reply("not_found")));
        assert!(!is_outage(&reply("validation_error")));
    }

    #[test]
    fn terminal_states() {
        assert!(is_terminal(&json!({"status": "cancelled"})));
        assert!(!is_terminal(&json!({"status": "processing"})));
        assert_eq!(
            counts(&json!({"counts": {"contacts": 1, "conversations": 2, "messages": 3}})),
            (1, 2, 3)
        );
    }
}
