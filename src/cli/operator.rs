//! Operator commands over NATS (never MongoDB): `export`, `delete`, `watch`, `cancel`.
//!
//! The service validates everything; these commands only shape the request and
//! report its error replies (code, field, message) with a non-zero exit.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Map, Value};

use contact_bulk_client::download::{download, target_path};
use contact_bulk_client::{ensure_completed, ClientError, Nats, ReplyError};
use contact_bulk_protocol::commands::{DeleteCommand, ExportCommand, RestoreCommand};
use contact_bulk_protocol::parse::decode_value;
use contact_bulk_protocol::replies::Accepted;
use serde::de::DeserializeOwned;

use super::view::{download_bar, JobView};

/// Where the service is.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// NATS server of the service.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Subject prefix of the service.
    #[arg(long, env = "BULK_SUBJECT_PREFIX", default_value = "bulk")]
    pub subject_prefix: String,
    /// Organisation id (24-hex).
    #[arg(long)]
    pub org: String,
}

/// The filter flags shared by `export` and `delete` (contract §3).
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Stage ids, comma separated (required unless --org-wide).
    #[arg(long, value_delimiter = ',')]
    pub stage_ids: Vec<String>,
    /// Every contact of the organisation (stage ids are ignored).
    #[arg(long)]
    pub org_wide: bool,
    /// `Contact` (default) or `Application`.
    #[arg(long)]
    pub pipeline_type: Option<String>,
    /// `owned` or `unowned`.
    #[arg(long)]
    pub owner_filter: Option<String>,
    /// advancedParams as JSON, e.g. '{"tags":["vip"],"createdAfter":"2026-01-01T00:00:00Z"}'.
    #[arg(long)]
    pub advanced: Option<String>,
}

impl FilterArgs {
    /// The contract's filter object (validated by the service, not here).
    pub fn to_json(&self, limit: Option<u64>) -> anyhow::Result<Value> {
        let mut f = Map::new();
        if self.org_wide {
            f.insert("orgWide".into(), json!(true));
        } else if !self.stage_ids.is_empty() {
            f.insert("stageIds".into(), json!(self.stage_ids));
        }
        if let Some(p) = &self.pipeline_type {
            f.insert("pipelineType".into(), json!(p));
        }
        if let Some(o) = &self.owner_filter {
            f.insert("ownerFilter".into(), json!(o));
        }
        if let Some(a) = &self.advanced {
            let v: Value = serde_json::from_str(a)
                .with_context(|| "field filter.advancedParams: not valid JSON")?;
            f.insert("advancedParams".into(), v);
        }
        if let Some(l) = limit {
            f.insert("limit".into(), json!(l));
        }
        Ok(Value::Object(f))
    }
}

/// Options of `export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Connection and organisation.
    #[command(flatten)]
    pub conn: Conn,
    /// Which contacts.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// At most this many rows, in `_id` order.
    #[arg(long)]
    pub limit: Option<u64>,
    /// File format.
    #[arg(long, value_parser = ["csv", "ndjson"], default_value = "csv")]
    pub format: String,
    /// Gzip the file.
    #[arg(long)]
    pub gzip: bool,
    /// Columns, comma separated (id, firstName, lastName, fullName, phone, email,
    /// pipeline, stage, owner, tags, createdAt, customFields, customFields.<key>).
    #[arg(long, value_delimiter = ',')]
    pub fields: Vec<String>,
    /// Download file name the service records.
    #[arg(long)]
    pub filename: Option<String>,
    /// Idempotency key (default: a fresh one, reused when the command is retried).
    #[arg(long)]
    pub command_id: Option<String>,
    /// User id recorded as the requester.
    #[arg(long)]
    pub requested_by: Option<String>,
    /// Where to write the file (default: its file name in the current directory).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Options of `delete`.
#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    /// Connection and organisation.
    #[command(flatten)]
    pub conn: Conn,
    /// Which contacts.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Idempotency key (default: a fresh one, reused when the command is retried).
    #[arg(long)]
    pub command_id: Option<String>,
    /// User id recorded as the requester (the audit entries' actorId).
    #[arg(long)]
    pub requested_by: Option<String>,
    /// Erase: keep nothing, so the delete cannot be restored.
    #[arg(long)]
    pub hard_delete: bool,
}

/// Options of `restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The delete job to undo (UUID).
    pub job_id: String,
    /// Connection and organisation.
    #[command(flatten)]
    pub conn: Conn,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Idempotency key (default: a fresh one, reused when the command is retried).
    #[arg(long)]
    pub command_id: Option<String>,
    /// User id recorded as the requester (the audit entries' actorId).
    #[arg(long)]
    pub requested_by: Option<String>,
}

/// Options of `watch` and `cancel`.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// The job id (UUID).
    pub job_id: String,
    /// Connection and organisation.
    #[command(flatten)]
    pub conn: Conn,
}

async fn connect(conn: &Conn) -> anyhow::Result<Nats> {
    Nats::connect(&conn.nats_url, &conn.subject_prefix).await
}

/// The protocol's command for a request shaped from the flags: a flag the
/// contract refuses is reported naming its field, as the service would, and
/// nothing is sent.
fn command<T: DeserializeOwned>(body: Value) -> Result<T, ReplyError> {
    decode_value(body, "").map_err(|e| ReplyError::invalid(&e.field, e.message))
}

/// Sends a job-starting command; retried once on a lost reply, which is safe
/// because it carries a `commandId`.
async fn submit<F, Fut>(send: F) -> anyhow::Result<Accepted>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Accepted, ClientError>>,
{
    match send().await {
        Err(ClientError::NoReply { .. }) => {
            eprintln!("no reply yet, asking again with the same commandId");
            Ok(send().await?)
        }
        r => Ok(r?),
    }
}

fn command_id(given: &Option<String>) -> String {
    given
        .clone()
        .unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4()))
}

/// Asks on the terminal; refuses when stdin is not one.
async fn confirm(what: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to {what} without --yes: stdin is not a terminal to confirm on");
    }
    eprint!("type yes to {what} them: ");
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await??;
    if answer.trim() != "yes" {
        let done = if what == "delete" {
            "deleted"
        } else {
            "restored"
        };
        bail!("not confirmed: nothing {done}");
    }
    Ok(())
}

/// `contact-bulk export`: starts the job, shows its progress, downloads the file.
pub async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let filter = args.filter.to_json(args.limit)?;
    let org = &args.conn.org;
    let mut body = json!({
        "orgId": org, "commandId": command_id(&args.command_id), "filter": filter,
        "format": args.format, "gzip": args.gzip,
    });
    if !args.fields.is_empty() {
        body["fields"] = json!(args.fields);
    }
    if let Some(f) = &args.filename {
        body["filename"] = json!(f);
    }
    if let Some(r) = &args.requested_by {
        body["requestedBy"] = json!(r);
    }
    let cmd: ExportCommand = command(body)?;
    let nats = connect(&args.conn).await?;
    // Subscribed before the job exists, so its last event cannot be missed.
    let mut events = nats.job_events(org, None).await?;
    let job_id = submit(|| nats.export(&cmd)).await?.job_id;
    println!("export job {job_id} accepted");
    let snap = nats
        .follow(org, &job_id, &mut events, &mut JobView::stderr())
        .await?;
    ensure_completed(&snap)?;
    // A fresh snapshot carries a fresh 15-minute link.
    let snap = nats.job(org, &job_id).await?;
    let Some((result, url)) = snap
        .export_result()
        .and_then(|r| Some((r, r.download_url.as_deref()?)))
    else {
        bail!("completed export {job_id} without a downloadable result");
    };
    println!("completed: {} rows, {} bytes", result.rows, result.bytes);
    let bytes = u64::try_from(result.bytes).ok();
    let path = target_path(args.output.as_deref(), &result.file_name);
    let bar = download_bar(bytes);
    let got = download(url, &path, &result.sha256, bytes, &mut |n| {
        bar.set_position(n)
    })
    .await?;
    bar.finish_and_clear();
    println!("downloaded {} bytes to {}", got.bytes, got.path.display());
    println!("sha256 ok: {}", got.sha256);
    Ok(())
}

/// `contact-bulk delete`: dry run, confirmation, then the job with its progress.
pub async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let filter = args.filter.to_json(None)?;
    let org = &args.conn.org;
    let mut body =
        json!({"orgId": org, "filter": filter, "commandId": command_id(&args.command_id)});
    if let Some(r) = &args.requested_by {
        body["requestedBy"] = json!(r);
    }
    if args.hard_delete {
        body["hardDelete"] = json!(true);
    }
    let cmd: DeleteCommand = command(body)?;
    let nats = connect(&args.conn).await?;
    let dry = nats.delete_dry_run(&cmd).await?;
    println!(
        "will delete {} contacts, {} conversations, {} messages{}",
        dry.contacts,
        dry.conversations,
        dry.messages,
        if args.hard_delete {
            " for good (hard delete: nothing kept to restore)"
        } else {
            " (kept for restore until the retention ends)"
        }
    );
    if dry.contacts == 0 {
        println!("nothing matches: no job started");
        return Ok(());
    }
    if !args.yes {
        confirm("delete").await?;
    }
    let mut events = nats.job_events(org, None).await?;
    let job_id = submit(|| nats.delete(&cmd)).await?.job_id;
    println!("delete job {job_id} accepted");
    let snap = nats
        .follow(org, &job_id, &mut events, &mut JobView::stderr())
        .await?;
    let c = &snap.counts;
    println!(
        "{}: deleted {} contacts, {} conversations, {} messages",
        snap.status.as_str(),
        c.contacts,
        c.conversations,
        c.messages
    );
    ensure_completed(&snap)
}

/// `contact-bulk restore`: what the restore would put back, confirmation, then
/// the restore job with its progress.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let org = &args.conn.org;
    let mut body =
        json!({"orgId": org, "jobId": args.job_id, "commandId": command_id(&args.command_id)});
    if let Some(r) = &args.requested_by {
        body["requestedBy"] = json!(r);
    }
    let cmd: RestoreCommand = command(body)?;
    let nats = connect(&args.conn).await?;
    let dry = nats.restore_dry_run(&cmd).await?;
    println!(
        "will restore {} contacts, {} conversations, {} messages removed by delete {}",
        dry.contacts, dry.conversations, dry.messages, args.job_id
    );
    if !args.yes {
        confirm("restore").await?;
    }
    let mut events = nats.job_events(org, None).await?;
    let job_id = submit(|| nats.restore(&cmd)).await?.job_id;
    println!("restore job {job_id} accepted");
    let snap = nats
        .follow(org, &job_id, &mut events, &mut JobView::stderr())
        .await?;
    let c = &snap.counts;
    let skipped = snap.restore_result().map_or(0, |r| r.skipped);
    println!(
        "{}: restored {} contacts, {} conversations, {} messages; skipped {skipped} contacts that exist again",
        snap.status.as_str(),
        c.contacts,
        c.conversations,
        c.messages
    );
    ensure_completed(&snap)
}

/// `contact-bulk watch`: progress of an existing job until terminal, then its snapshot.
pub async fn watch(args: JobArgs) -> anyhow::Result<()> {
    let nats = connect(&args.conn).await?;
    let org = &args.conn.org;
    let mut events = nats.job_events(org, Some(&args.job_id)).await?;
    let snap = nats
        .follow(org, &args.job_id, &mut events, &mut JobView::stderr())
        .await?;
    println!("{}", serde_json::to_string_pretty(&snap)?);
    ensure_completed(&snap)
}

/// `contact-bulk cancel`: asks the job to stop and prints the snapshot the service returns.
pub async fn cancel(args: JobArgs) -> anyhow::Result<()> {
    let nats = connect(&args.conn).await?;
    let snap = nats.cancel(&args.conn.org, &args.job_id).await?;
    println!("{}", serde_json::to_string_pretty(&snap)?);
    if !snap.status.is_terminal() {
        eprintln!("cancel requested; the job stops at its next batch boundary");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> FilterArgs {
        FilterArgs {
            stage_ids: vec!["a".into(), "b".into()],
            org_wide: false,
            pipeline_type: None,
            owner_filter: Some("owned".into()),
            advanced: Some(r#"{"tags":["vip"]}"#.into()),
        }
    }

    #[test]
    fn filter_flags_become_the_contract_filter() {
        let f = filter().to_json(Some(5)).unwrap();
        assert_eq!(
            f,
            json!({"stageIds": ["a", "b"], "ownerFilter": "owned",
                   "advancedParams": {"tags": ["vip"]}, "limit": 5})
        );
        let mut wide = filter();
        wide.org_wide = true;
        assert_eq!(wide.to_json(None).unwrap()["orgWide"], true);
        assert!(wide.to_json(None).unwrap().get("stageIds").is_none());
    }

    #[test]
    fn malformed_advanced_json_names_the_field() {
        let mut f = filter();
        f.advanced = Some("{nope".into());
        let e = f.to_json(None).unwrap_err();
        assert!(e.to_string().contains("filter.advancedParams"), "{e}");
    }
}
