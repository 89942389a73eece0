//! JSON endpoints of the HTTP API: counts, jobs, exports, deletes, pipelines, health.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use contact_bulk_actors::filter::Filter;
use contact_bulk_actors::model::{JobKind, JobRecord};
use contact_bulk_actors::{JobError, ValidationError};
use contact_bulk_protocol::commands::{
    DeleteCommand, ExportCommand, JobId, RestoreBody, RestoreCommand,
};
use contact_bulk_protocol::filter::{DeleteFilter, FilterSpec};
use contact_bulk_protocol::parse::decode;
use contact_bulk_protocol::replies::CountReply;
use contact_bulk_protocol::types::{Limit, RowLimit};
use contact_bulk_protocol::Id;
use serde_json::{json, Value};

use super::{ApiError, Auth};
use crate::app::{App, DeleteOutcome, RestoreOutcome};
use crate::auth::{Caller, SCOPE_DELETE, SCOPE_EXPORT, SCOPE_PURGE, SCOPE_READ};

type ApiResult = Result<Response, ApiError>;

/// Decodes a JSON body as `T`; an empty body is `{}`. Errors name the body's
/// own keys, and nothing of the body reaches the use case undecoded.
fn decode_body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { bytes };
    decode(bytes).map_err(|e| ApiError::from_job(e.into()))
}

/// A body that is the filter itself (the delete and count endpoints).
fn filter_body<L: RowLimit + serde::de::DeserializeOwned>(
    bytes: &Bytes,
) -> Result<Filter, ApiError> {
    let spec: FilterSpec<L> = decode_body(bytes)?;
    Filter::from_spec(spec, "").map_err(|e| ApiError::from_job(e.into()))
}

/// A delete command from a body that is its filter, asked by `caller`.
fn delete_command(
    bytes: &Bytes,
    caller: &Caller,
    dry_run: bool,
) -> Result<DeleteCommand, ApiError> {
    // Validated here, at the body's own paths (`stageIds[1]`, not `filter.…`).
    let spec: DeleteFilter = decode_body(bytes)?;
    Filter::from_spec(spec.clone(), "").map_err(|e| ApiError::from_job(e.into()))?;
    Ok(DeleteCommand {
        filter: Some(spec),
        requested_by: caller.user.map(Id),
        dry_run: Some(dry_run),
        ..DeleteCommand::default()
    })
}

/// `GET /healthz`: 200 when MongoDB and NATS answer, 503 otherwise.
pub async fn healthz(State(app): State<Arc<App>>) -> Response {
    let mongo = tokio::time::timeout(std::time::Duration::from_secs(2), app.reads.ping())
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    let nats = app.nats.connection_state() == async_nats::connection::State::Connected;
    let status = if mongo && nats {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"mongodb": mongo, "nats": nats}))).into_response()
}

/// `POST /api/contacts/query-count`.
pub async fn query_count(State(app): State<Arc<App>>, auth: Auth, body: Bytes) -> ApiResult {
    let caller = auth.require_any(&[SCOPE_EXPORT, SCOPE_DELETE, SCOPE_READ])?;
    let filter = filter_body::<Limit>(&body)?;
    let count = app.count(caller.org, &filter).await?;
    Ok(Json(CountReply { count }).into_response())
}

/// `DELETE /api/contacts/query-bulk-delete`: 202 `{jobId, message}`; the job is
/// recorded before the reply, so the next poll finds it.
pub async fn query_bulk_delete(
    State(app): State<Arc<App>>,
    auth: Auth,
    Query(q): Query<std::collections::HashMap<String, String>>,
    body: Bytes,
) -> ApiResult {
    let caller = auth.require(SCOPE_DELETE)?.clone();
    let hard = match q.get("hardDelete").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::from_job(
                ValidationError::new("hardDelete", "must be true or false").into(),
            ))
        }
    };
    if hard {
        // An erasure keeps nothing to restore: it takes its own scope.
        auth.require(SCOPE_PURGE)?;
    }
    let mut cmd = delete_command(&body, &caller, false)?;
    cmd.hard_delete = Some(hard);
    match app.delete(cmd, Some(caller.org)).await? {
        DeleteOutcome::Job(job) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"jobId": job.job_id, "message": "Bulk delete started"})),
        )
            .into_response()),
        DeleteOutcome::DryRun(counts) => {
            Ok(Json(json!({"dryRun": true, "counts": counts})).into_response())
        }
    }
}

/// `POST /api/contacts/query-delete-preview`: what a delete would remove (the page's dry run).
pub async fn query_delete_preview(
    State(app): State<Arc<App>>,
    auth: Auth,
    body: Bytes,
) -> ApiResult {
    let caller = auth.require(SCOPE_DELETE)?.clone();
    let cmd = delete_command(&body, &caller, true)?;
    match app.delete(cmd, Some(caller.org)).await? {
        DeleteOutcome::DryRun(counts) => {
            Ok(Json(json!({"dryRun": true, "counts": counts})).into_response())
        }
        DeleteOutcome::Job(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "dry run created a job",
        )),
    }
}

async fn own_job(app: &App, auth: &Auth, job_id: &str) -> Result<JobRecord, ApiError> {
    // Another organisation's job is indistinguishable from a missing one.
    app.store
        .get(auth.0.org, job_id)
        .await
        .map_err(|e| match e {
            JobError::NotFound(_) => ApiError::not_found("job"),
            e => ApiError::from_job(e),
        })
}

/// `GET /api/contacts/bulk-job/{jobId}`.
pub async fn get_job(
    State(app): State<Arc<App>>,
    auth: Auth,
    Path(job_id): Path<String>,
) -> ApiResult {
    auth.require(SCOPE_READ)?;
    let job = own_job(&app, &auth, &job_id).await?;
    Ok(Json(app.snapshot(&job)).into_response())
}

/// `POST /api/contacts/bulk-job/{jobId}/cancel`: needs the scope of the job's kind.
pub async fn cancel_job(
    State(app): State<Arc<App>>,
    auth: Auth,
    Path(job_id): Path<String>,
) -> ApiResult {
    let job = own_job(&app, &auth, &job_id).await?;
    match job.kind {
        JobKind::Export => auth.require_any(&[SCOPE_EXPORT])?,
        JobKind::Delete | JobKind::Restore => auth.require_any(&[SCOPE_DELETE])?,
    };
    let job = app.cancel(auth.0.org, &job_id).await?;
    Ok(Json(app.snapshot(&job)).into_response())
}

/// `POST /api/contacts/bulk-job/{jobId}/restore`: body `{dryRun?}`; 202 with
/// the restore job's snapshot, or 200 `{dryRun, counts}`; 409 while the
/// delete runs, 410 when it kept nothing (hard delete, past retention).
pub async fn restore_job(
    State(app): State<Arc<App>>,
    auth: Auth,
    Path(job_id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let caller = auth.require(SCOPE_DELETE)?.clone();
    let req: RestoreBody = decode_body(&body)?;
    let cmd = RestoreCommand {
        job_id: Some(JobId(job_id)),
        requested_by: caller.user.map(Id),
        command_id: req.command_id,
        dry_run: req.dry_run,
        org_id: None,
    };
    match app.restore(cmd, Some(caller.org)).await {
        Ok(RestoreOutcome::Job(job)) => {
            Ok((StatusCode::ACCEPTED, Json(app.snapshot(&job))).into_response())
        }
        Ok(RestoreOutcome::DryRun(counts)) => {
            Ok(Json(json!({"dryRun": true, "counts": counts})).into_response())
        }
        // Another organisation's job is indistinguishable from a missing one.
        Err(JobError::NotFound(_)) => Err(ApiError::not_found("job")),
        Err(e) => Err(ApiError::from_job(e)),
    }
}

/// `POST /api/exports`: 202 with the snapshot.
pub async fn create_export(State(app): State<Arc<App>>, auth: Auth, body: Bytes) -> ApiResult {
    let caller = auth.require(SCOPE_EXPORT)?.clone();
    let mut cmd: ExportCommand = decode_body(&body)?;
    if let Some(user) = caller.user {
        cmd.requested_by = Some(Id(user));
    }
    let job = app
        .export(cmd, Some(caller.org))
        .await
        .map_err(ApiError::from_job)?;
    Ok((StatusCode::ACCEPTED, Json(app.snapshot(&job))).into_response())
}

/// `GET /api/exports/{jobId}`.
pub async fn get_export(
    State(app): State<Arc<App>>,
    auth: Auth,
    Path(job_id): Path<String>,
) -> ApiResult {
    auth.require_any(&[SCOPE_READ, SCOPE_EXPORT])?;
    let job = own_job(&app, &auth, &job_id).await?;
    if job.kind != JobKind::Export {
        return Err(ApiError::not_found("export"));
    }
    Ok(Json(app.snapshot(&job)).into_response())
}

/// `GET /api/jobs?limit=N`: the organisation's recent jobs, newest first.
pub async fn list_jobs(
    State(app): State<Arc<App>>,
    auth: Auth,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    let caller = auth.require(SCOPE_READ)?;
    let limit = match q.get("limit") {
        None => 50,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| {
                ApiError::from_job(
                    ValidationError::new("limit", "must be an integer from 1 to 500").into(),
                )
            })?,
    };
    let jobs = app.store.list(caller.org, limit).await?;
    let jobs: Vec<_> = jobs.iter().map(|j| app.snapshot(j)).collect();
    Ok(Json(json!({"jobs": jobs})).into_response())
}

/// `GET /api/pipelines`: the organisation's pipelines and stages (for the page's filter form).
pub async fn pipelines(State(app): State<Arc<App>>, auth: Auth) -> ApiResult {
    let caller = auth.require_any(&[SCOPE_READ, SCOPE_EXPORT, SCOPE_DELETE])?;
    let pipelines = app.reads.list_pipelines(caller.org).await?;
    let list: Vec<Value> = pipelines
        .iter()
        .map(|p| {
            let stages: Vec<Value> = p
                .stages
                .iter()
                .map(|(id, name)| json!({"id": id.to_hex(), "name": name}))
                .collect();
            json!({"id": p.id.to_hex(), "name": p.name, "stages": stages})
        })
        .collect();
    Ok(Json(json!({"pipelines": list})).into_response())
}
