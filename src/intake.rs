//! NATS intake: the request/reply commands (queue group `contact-bulk`), the
//! durable `submit` work queue, and the cross-instance cancel broadcast.

use std::sync::Arc;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use bytes::Bytes;
use contact_bulk_actors::filter::{Filter, ParseOptions};
use contact_bulk_actors::supervisor::SupervisorMsg;
use contact_bulk_actors::{JobError, ValidationError};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::commands::{object, org_id, reject_unknown, App, DeleteOutcome, RestoreOutcome};
use crate::config::Config;

/// Queue group shared by every instance, so each command is answered once.
pub const QUEUE: &str = "contact-bulk";

/// The contract's error reply.
pub fn error_reply(e: &JobError) -> Value {
    let mut err = json!({"code": e.code(), "message": e.to_string()});
    if let Some(field) = e.field() {
        err["field"] = json!(field);
        if let JobError::Validation(v) = e {
            err["message"] = json!(v.message);
        }
    }
    json!({ "error": err })
}

#[derive(Clone, Copy, Debug)]
enum Command {
    Export,
    Delete,
    Cancel,
    Job,
    Count,
    Restore,
}

/// What a durable command asks for.
#[derive(Clone, Copy, Debug)]
enum Durable {
    Export,
    Delete,
    Restore,
}

/// Subscribes to every command subject. Returns once the subscriptions are live;
/// the handlers run in `tasks`.
pub async fn start(app: Arc<App>, config: &Config, tasks: &mut JoinSet<()>) -> anyhow::Result<()> {
    let client = app.nats.clone();
    for (tail, cmd) in [
        ("v1.export", Command::Export),
        ("v1.delete", Command::Delete),
        ("v1.cancel", Command::Cancel),
        ("v1.job", Command::Job),
        ("v1.count", Command::Count),
        ("v1.restore", Command::Restore),
    ] {
        let mut sub = client
            .queue_subscribe(config.subject(tail), QUEUE.into())
            .await?;
        let app = app.clone();
        tasks.spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(reply) = msg.reply.clone() else {
                    continue;
                };
                let app = app.clone();
                // Each request on its own task: a slow count never holds up a cancel.
                tokio::spawn(async move {
                    let body = handle(&app, cmd, &msg.payload).await;
                    let payload = serde_json::to_vec(&body).unwrap_or_default();
                    if let Err(e) = app.nats.publish(reply, payload.into()).await {
                        tracing::warn!(error = %e, "reply not sent");
                    }
                });
            }
        });
    }

    // Cancel broadcast: every instance hears it, the one running the job stops it.
    let mut cancels = client.subscribe(app.cancel_subject.clone()).await?;
    let supervisor = app.supervisor.clone();
    tasks.spawn(async move {
        while let Some(msg) = cancels.next().await {
            let job_id = String::from_utf8_lossy(&msg.payload).to_string();
            let _ = supervisor.send_message(SupervisorMsg::Cancel(job_id));
        }
    });

    start_durable(app, config, tasks).await
}

/// Parses and runs one command; never panics on bad input.
async fn handle(app: &App, cmd: Command, payload: &Bytes) -> Value {
    let req: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            return error_reply(
                &ValidationError::new("body", format!("not valid JSON: {e}")).into(),
            )
        }
    };
    let result = match cmd {
        Command::Export => app
            .export(&req, None)
            .await
            .map(|job| json!({"jobId": job.job_id, "kind": "export", "status": job.status})),
        Command::Delete => app.delete(&req, None).await.map(|out| match out {
            DeleteOutcome::Job(job) => {
                json!({"jobId": job.job_id, "kind": "delete", "status": job.status})
            }
            DeleteOutcome::DryRun(counts) => json!({"dryRun": true, "counts": counts}),
        }),
        Command::Cancel => cancel(app, &req).await,
        Command::Job => app.find(&req).await.map(|job| json!(app.snapshot(&job))),
        Command::Count => count(app, &req).await,
        Command::Restore => app.restore(&req, None).await.map(restore_reply),
    };
    match result {
        Ok(v) => v,
        Err(e) => {
            if !matches!(e, JobError::Validation(_) | JobError::NotFound(_)) {
                tracing::warn!(command = ?cmd, error = %e, "command failed");
            }
            error_reply(&e)
        }
    }
}

fn restore_reply(out: RestoreOutcome) -> Value {
    match out {
        RestoreOutcome::Job(job) => {
            json!({"jobId": job.job_id, "kind": "restore", "status": job.status})
        }
        RestoreOutcome::DryRun(counts) => json!({"dryRun": true, "counts": counts}),
    }
}

async fn cancel(app: &App, req: &Value) -> Result<Value, JobError> {
    let obj = object(req, "")?;
    reject_unknown(obj, &["orgId", "jobId"])?;
    let org = org_id(obj)?;
    let job_id = match obj.get("jobId") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ValidationError::new("jobId", "is required (a string)").into()),
    };
    let job = app.cancel(org, &job_id).await?;
    Ok(json!(app.snapshot(&job)))
}

async fn count(app: &App, req: &Value) -> Result<Value, JobError> {
    let obj = object(req, "")?;
    reject_unknown(obj, &["orgId", "filter"])?;
    let org = org_id(obj)?;
    let filter = match obj.get("filter") {
        None | Some(Value::Null) => {
            return Err(ValidationError::new("filter", "is required").into())
        }
        Some(f) => Filter::from_json(
            f,
            ParseOptions {
                prefix: "filter",
                allow_limit: true,
            },
        )?,
    };
    Ok(json!({"count": app.count(org, &filter).await?}))
}

/// Durable intake: commands published to `bulk.v1.submit.{export,delete,restore}` are kept
/// in a work-queue stream until an instance has recorded their job; the message
/// is acknowledged only then, so a command published while no instance runs
/// executes once one starts (and only once: `commandId` is required and idempotent).
async fn start_durable(
    app: Arc<App>,
    config: &Config,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    let js = jetstream::new(app.nats.clone());
    let stream = js.get_stream(config.submit_stream()).await?;
    let consumer = stream
        .get_or_create_consumer(
            "contact-bulk-intake",
            pull::Config {
                durable_name: Some("contact-bulk-intake".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: std::time::Duration::from_secs(30),
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let export_subject = config.subject("v1.submit.export");
    let delete_subject = config.subject("v1.submit.delete");
    let restore_subject = config.subject("v1.submit.restore");
    tasks.spawn(async move {
        while let Some(msg) = messages.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "durable intake read failed");
                    continue;
                }
            };
            // Only the named subjects run anything: a command on any other
            // subject the stream captures (a typo, a future version) must never
            // fall through to a delete. It is dropped for good, loudly.
            let kind = match msg.subject.as_str() {
                s if s == export_subject => Durable::Export,
                s if s == delete_subject => Durable::Delete,
                s if s == restore_subject => Durable::Restore,
                other => {
                    tracing::error!(subject = other, "durable command on an unknown subject dropped");
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            match submit(&app, kind, &msg.payload).await {
                Ok(reply) => {
                    tracing::info!(subject = %msg.subject, reply = %reply, "durable command handled");
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "durable command not acknowledged");
                    }
                }
                Err(e) => {
                    // Database trouble: the command stays in the stream and comes back.
                    tracing::warn!(error = %e, "durable command will be redelivered");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(std::time::Duration::from_secs(2))))
                        .await;
                }
            }
        }
    });
    Ok(())
}

/// Runs one durable command. `Ok` carries the reply (or error reply) of a
/// command that is done with, `Err` a transient failure worth redelivering.
async fn submit(app: &App, kind: Durable, payload: &Bytes) -> Result<Value, JobError> {
    let req: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            let e = ValidationError::new("body", format!("not valid JSON: {e}"));
            return Ok(error_reply(&e.into()));
        }
    };
    if req.get("commandId").and_then(Value::as_str).is_none() {
        let e = ValidationError::new("commandId", "is required for durable submission");
        return Ok(error_reply(&e.into()));
    }
    let result = match kind {
        Durable::Export => app
            .export(&req, None)
            .await
            .map(|j| json!({"jobId": j.job_id, "kind": "export"})),
        Durable::Delete => app.delete(&req, None).await.map(|out| match out {
            DeleteOutcome::Job(j) => json!({"jobId": j.job_id, "kind": "delete"}),
            DeleteOutcome::DryRun(c) => json!({"dryRun": true, "counts": c}),
        }),
        Durable::Restore => app.restore(&req, None).await.map(restore_reply),
    };
    match result {
        Ok(v) => Ok(v),
        Err(e @ (JobError::Mongo(_) | JobError::Internal(_) | JobError::Unavailable { .. })) => {
            Err(e)
        }
        Err(e) => Ok(error_reply(&e)),
    }
}
