//! NATS intake: the request/reply commands (the NATS micro service
//! `contact-bulk`, queue group `contact-bulk`), the
//! durable `submit` work queue, and the cross-instance cancel broadcast.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use async_nats::service::{Service, ServiceExt};
use bytes::Bytes;
use contact_bulk_actors::filter::Filter;
use contact_bulk_actors::metrics;
use contact_bulk_actors::model::JobRecord;
use contact_bulk_actors::supervisor::SupervisorMsg;
use contact_bulk_actors::{JobError, ValidationError};
use contact_bulk_protocol::commands::{
    CancelCommand, CountCommand, DeleteCommand, ExportCommand, RestoreCommand,
};
use contact_bulk_protocol::error::{ErrorBody, ErrorReply};
use contact_bulk_protocol::job::Counts;
use contact_bulk_protocol::parse::decode;
use contact_bulk_protocol::replies::{Accepted, CountReply, DryRunReply};
use contact_bulk_protocol::subjects::Command;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::app::{org_of, App, DeleteOutcome, RestoreOutcome};
use crate::config::Config;

/// Queue group shared by every instance, so each command is answered once.
pub const QUEUE: &str = "contact-bulk";

/// The contract's error reply.
pub fn error_reply(e: &JobError) -> ErrorReply {
    match e {
        JobError::Validation(v) => v.clone().into(),
        e => ErrorReply {
            error: ErrorBody {
                code: e.error_code(),
                message: e.to_string(),
                field: None,
                retry_after_ms: e.retry_after_ms(),
            },
        },
    }
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
    let subjects = config.subjects();
    for cmd in Command::ALL {
        let subject = subjects.command(cmd);
        let mut endpoint = service
            .endpoint_builder()
            .name(cmd.name())
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
    match run(app, cmd, payload).await {
        Ok(v) => v,
        Err(e) => {
            if !matches!(
                e,
                JobError::Validation(_) | JobError::NotFound(_) | JobError::RateLimited { .. }
            ) {
                tracing::warn!(command = %cmd, error = %e, "command failed");
            }
            json!(error_reply(&e))
        }
    }
}

/// One command: the payload decoded as its type, then the use case.
async fn run(app: &App, cmd: Command, payload: &[u8]) -> Result<Value, JobError> {
    Ok(match cmd {
        Command::Export => accepted(&app.export(decode(payload)?, None).await?),
        Command::Delete => delete_reply(app.delete(decode(payload)?, None).await?),
        Command::Restore => restore_reply(app.restore(decode(payload)?, None).await?),
        Command::Cancel => {
            let c: CancelCommand = decode(payload)?;
            let org = org_of(c.org_id, None)?;
            let job_id = c
                .job_id
                .ok_or_else(|| ValidationError::new("jobId", "is required (a string)"))?;
            json!(app.snapshot(&app.cancel(org, &job_id.0).await?))
        }
        Command::Job => json!(app.snapshot(&app.find(decode(payload)?).await?)),
        Command::Count => {
            let c: CountCommand = decode(payload)?;
            let org = org_of(c.org_id, None)?;
            let spec = c
                .filter
                .ok_or_else(|| ValidationError::new("filter", "is required"))?;
            let filter = Filter::from_spec(spec, "filter")?;
            json!(CountReply {
                count: app.count(org, &filter).await?
            })
        }
    })
}

/// `{jobId, kind, status}`.
fn accepted(job: &JobRecord) -> Value {
    json!(Accepted {
        job_id: job.job_id.clone(),
        kind: job.kind,
        status: job.status,
    })
}

fn delete_reply(out: DeleteOutcome) -> Value {
    match out {
        DeleteOutcome::Job(job) => accepted(&job),
        DeleteOutcome::DryRun(counts) => json!(DryRunReply::new(counts)),
    }
}

fn restore_reply(out: RestoreOutcome) -> Value {
    match out {
        RestoreOutcome::Job(job) => accepted(&job),
        RestoreOutcome::DryRun(c) => json!(DryRunReply::new(Counts {
            contacts: c.contacts,
            conversations: c.conversations,
            messages: c.messages,
        })),
    }
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
    let subjects = config.subjects();
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
    let export_subject = subjects.submit(Command::Export);
    let delete_subject = subjects.submit(Command::Delete);
    let restore_subject = subjects.submit(Command::Restore);
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
    let result = match kind {
        Durable::Export => match durable::<ExportCommand>(payload, |c| c.command_id.is_some()) {
            Ok(cmd) => app
                .export(cmd, None)
                .await
                .map(|j| json!({"jobId": j.job_id, "kind": "export"})),
            Err(e) => Err(e),
        },
        Durable::Delete => match durable::<DeleteCommand>(payload, |c| c.command_id.is_some()) {
            Ok(cmd) => app.delete(cmd, None).await.map(|out| match out {
                DeleteOutcome::Job(j) => json!({"jobId": j.job_id, "kind": "delete"}),
                DeleteOutcome::DryRun(c) => json!(DryRunReply::new(c)),
            }),
            Err(e) => Err(e),
        },
        Durable::Restore => match durable::<RestoreCommand>(payload, |c| c.command_id.is_some()) {
            Ok(cmd) => app.restore(cmd, None).await.map(restore_reply),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(v) => Ok(v),
        Err(
            e @ (JobError::Mongo(_)
            | JobError::Internal(_)
            | JobError::Unavailable { .. }
            | JobError::RateLimited { .. }),
        ) => Err(e),
        Err(e) => Ok(json!(error_reply(&e))),
    }
}

/// A durable command: decoded, and refused without a `commandId`.
fn durable<C: serde::de::DeserializeOwned>(
    payload: &[u8],
    has_command_id: impl Fn(&C) -> bool,
) -> Result<C, JobError> {
    let cmd: C = decode(payload)?;
    if !has_command_id(&cmd) {
        return Err(ValidationError::new("commandId", "is required for durable submission").into());
    }
    Ok(cmd)
}
