//! Streaming endpoints: the synchronous CSV export of seed 000 and export downloads.
//! Both send bytes as they are read; neither ever holds a whole file.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use contact_bulk_actors::encode::{ColumnSpec, Encoder, Format};
use contact_bulk_actors::filter::{filter_from_query_params, Filter};
use contact_bulk_actors::lookup::NameCache;
use contact_bulk_actors::model::{JobKind, JobStatus};
use contact_bulk_actors::JobError;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{bearer, ApiError, Auth};
use crate::app::App;
use crate::auth::{SCOPE_EXPORT, SCOPE_READ};

const BATCH: usize = 1000;

/// `GET /api/contacts/query-bulk-export`: CSV streamed as the cursor is read.
pub async fn query_bulk_export(
    State(app): State<Arc<App>>,
    auth: Auth,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let caller = auth.require(SCOPE_EXPORT)?.clone();
    let filter = filter_from_query_params(&params).map_err(|e| ApiError::from_job(e.into()))?;
    app.quota
        .admit(caller.org, crate::app::quota::Admission::Check)
        .await?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        if let Err(e) = produce_csv(&app, caller.org, filter, &tx).await {
            tracing::warn!(error = %e, "streamed export aborted");
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
    });
    let name = format!("contacts-{}.csv", chrono::Utc::now().format("%Y-%m-%d"));
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response())
}

async fn produce_csv(
    app: &App,
    org: bson::oid::ObjectId,
    filter: Filter,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), JobError> {
    let columns = ColumnSpec::default_columns();
    let encoder = Encoder::new(Format::Csv, columns.clone());
    let header = encoder.header().await.map_err(io)?;
    if tx.send(Ok(header.into())).await.is_err() {
        return Ok(());
    }
    let mut cursor = app
        .reads
        .documents(org, &filter, columns.projection(), BATCH as u32)
        .await?;
    let mut names = NameCache::default();
    let mut docs = Vec::with_capacity(BATCH);
    loop {
        let next = cursor.try_next().await?;
        let done = next.is_none();
        docs.extend(next);
        if docs.len() == BATCH || (done && !docs.is_empty()) {
            names
                .resolve(app.names.as_ref(), org, docs.iter(), true, false)
                .await?;
            let mut out = Vec::with_capacity(docs.len() * 96);
            encoder
                .encode_batch(&docs, &names.names, &mut out)
                .await
                .map_err(io)?;
            docs.clear();
            if tx.send(Ok(out.into())).await.is_err() {
                // The client went away: stop reading.
                return Ok(());
            }
        }
        if done {
            return Ok(());
        }
    }
}

fn io(e: std::io::Error) -> JobError {
    JobError::Internal(format!("encoding: {e}"))
}

/// `GET /api/exports/{jobId}/download`: with a bearer token of the job's
/// organisation, or with the signed `downloadUrl` alone.
pub async fn download(
    State(app): State<Arc<App>>,
    Path(job_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (mut parts, _) = req.into_parts();
    let job = if bearer(&parts).is_some() {
        let auth = <Auth as axum::extract::FromRequestParts<Arc<App>>>::from_request_parts(
            &mut parts, &app,
        )
        .await?;
        auth.require_any(&[SCOPE_READ, SCOPE_EXPORT])?;
        app.store
            .get(auth.0.org, &job_id)
            .await
            .map_err(|e| match e {
                JobError::NotFound(_) => ApiError::not_found("export"),
                e => ApiError::from_job(e),
            })?
    } else {
        let expires = q.get("expires").and_then(|e| e.parse::<i64>().ok());
        let sig = q.get("signature");
        let (Some(expires), Some(sig)) = (expires, sig) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token or signed link",
            ));
        };
        if !app.keys.check_link(&job_id, expires, sig) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "download link is invalid or expired",
            ));
        }
        app.store
            .get_any(&job_id)
            .await?
            .ok_or_else(|| ApiError::not_found("export"))?
    };
    if job.kind != JobKind::Export {
        return Err(ApiError::not_found("export"));
    }
    let Some(result) = job
        .result
        .as_ref()
        .filter(|_| job.status == JobStatus::Completed)
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("export is {}, not completed", job.status.as_str()),
        ));
    };
    if app.retention.export_expired(&job) {
        return Err(ApiError::new(
            StatusCode::GONE,
            "gone",
            "export file has expired and its data was removed",
        ));
    }
    let content_type = if result.gzip {
        "application/gzip"
    } else {
        result.format.content_type()
    };
    let stream = app.artifacts.stream(&job.job_id, result.chunks).await?;
    let body =
        Body::from_stream(stream.map(|r| r.map_err(|e| std::io::Error::other(e.to_string()))));
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", result.file_name),
            ),
            (header::CONTENT_LENGTH, result.bytes.to_string()),
            (header::CACHE_CONTROL, "private, no-store".to_string()),
        ],
        body,
    )
        .into_response())
}
