//! NATS intake: the request/reply commands (the NATS micro service
//! `contact-bulk`, queue group `contact-bulk`), the
//! durable `submit` work queue, and the cross-instance cancel broadcast.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use async_nats::service::{Service, ServiceExt};
use bytes::Bytes;
use contact_bulk_actors::filter::{Filter, ParseOptions};
use contact_bulk_actors::metrics;
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
    if let Some(ms) = e.retry_after_ms() {
        err["retryAfterMs"] = json!(ms);
    }
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

/// Name of the NATS micro service every instance registers (`$SRV.PING.contact-bulk`).
pub const SERVICE_NAME: &str = "contact-bulk";

/// Serves every command subject as an endpoint of the NATS micro service
/// `contact-bulk` (queue group `contact-bulk`, so instances share the load,
/// while `$SRV.PING/INFO/STATS` are answered by each). Returns once the
/// subscriptions are live; the handlers run in `tasks`. The returned service
/// answers the `$SRV` verbs until it is stopped.
pub async fn start(
    app: Arc<App>,
    config: &Config,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Service> {
    let client = app.nats.clone();
    let service = client
        .service_builder()
        .description("bulk export, delete and restore jobs of contacts")
        .metadata(HashMap::from([(
            "subjectPrefix".to_string(),
            config.subject_prefix.clone(),
        )]))
        .queue_group(QUEUE)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the nats micro service: {e}"))?;
    for (name, cmd) in [
        ("export", Command::Export),
        ("delete", Command::Delete),
        ("cancel", Command::Cancel),
        ("job", Command::Job),
        ("count", Command::Count),
        ("restore", Command::Restore),
    ] {
        let subject = config.subject(&format!("v1.{name}"));
        let mut endpoint = service
            .endpoint_builder()
            .name(name)
            .queue_group(QUEUE)
            .add(subject.clone())
            .await
            .map_err(|e| anyhow::anyhow!("adding endpoint {subject}: {e}"))?;
        metrics::command_subject(&subject);
        let app = app.clone();
        let subject: Arc<str> = subject.into();
        tasks.spawn(async move {
            while let Some(request) = endpoint.next().await {
                if request.message.reply.is_none() {
                    continue;
                }
                let app = app.clone();
                let subject = subject.clone();
                // Each request on its own task: a slow count never holds up a cancel.
                tokio::spawn(async move {
                    let started = Instant::now();
                    let body = handle(&app, cmd, &request.message.payload).await;
                    let payload = serde_json::to_vec(&body).unwrap_or_default();
                    if let Err(e) = request.respond(Ok(payload.into())).await {
                        tracing::warn!(error = %e, "reply not sent");
                    }
                    metrics::command_duration(&subject, started.elapsed());
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

    start_durable(app, config, tasks).await?;
    Ok(service)
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
            if !matches!(
                e,
                JobError::Validation(_) | JobError::NotFound(_) | JobError::RateLimited { .. }
            ) {
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
                    // Database trouble or a used-up quota: the command stays in
                    // the stream and comes back (after the quota's window).
                    let delay = e.retry_after_ms().unwrap_or(2_000);
                    tracing::warn!(error = %e, delay_ms = delay, "durable command will be redelivered");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(std::time::Duration::from_millis(delay))))
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
        Err(
            e @ (JobError::Mongo(_)
            | JobError::Internal(_)
            | JobError::Unavailable { .. }
            | JobError::RateLimited { .. }),
        ) => Err(e),
        Err(e) => Ok(error_reply(&e)),
    }
}
