//! The HTTP API (contract section 7), the web page and the WebSocket bridge, on one port.

mod api;
mod metrics;
mod ratelimit;
mod rejections;
mod stream;
pub mod webhooks;

pub use rejections::MAX_BODY;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use contact_bulk_actors::JobError;
use serde_json::json;

use crate::app::App;
use crate::auth::{AuthError, Caller};
use crate::config::Config;

/// Builds the router.
pub async fn router(
    app: Arc<App>,
    _config: &Config,
    mounted: Router<Arc<App>>,
) -> anyhow::Result<Router> {
    Ok(Router::new()
        .route("/", get(page_index))
        .route("/app.js", get(page_js))
        .route("/app.css", get(page_css))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(metrics::scrape))
        .route(
            "/api/contacts/query-bulk-export",
            get(stream::query_bulk_export),
        )
        .route("/api/contacts/query-count", post(api::query_count))
        .route(
            "/api/contacts/query-bulk-delete",
            delete(api::query_bulk_delete),
        )
        .route(
            "/api/contacts/query-delete-preview",
            post(api::query_delete_preview),
        )
        .route("/api/contacts/bulk-job/{job_id}", get(api::get_job))
        .route(
            "/api/contacts/bulk-job/{job_id}/cancel",
            post(api::cancel_job),
        )
        .route(
            "/api/contacts/bulk-job/{job_id}/restore",
            post(api::restore_job),
        )
        .route("/api/exports", post(api::create_export))
        .route("/api/exports/{job_id}", get(api::get_export))
        .route("/api/exports/{job_id}/download", get(stream::download))
        .route("/api/jobs", get(api::list_jobs))
        .route("/api/pipelines", get(api::pipelines))
        .route("/api/webhooks", get(webhooks::list).post(webhooks::create))
        .route(
            "/api/webhooks/{id}",
            get(webhooks::show).delete(webhooks::remove),
        )
        .route("/api/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route(
            "/api/webhooks/{id}/deliveries/{delivery_id}/retry",
            post(webhooks::retry),
        )
        // The WebSocket bridge (`/ws`), mounted by the caller so that the
        // HTTP transport does not depend on it; it gets the same error layers.
        .merge(mounted)
        .layer(axum::middleware::from_fn(ratelimit::headers))
        .fallback(rejections::unknown_path)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(rejections::json_errors))
        .with_state(app))
}

async fn page_index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../../../web/index.html"),
    )
}

async fn page_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../../web/app.js"),
    )
}

async fn page_css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../../web/app.css"),
    )
}

/// An HTTP error: JSON `{error, message, field?}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    message: String,
    field: Option<String>,
    retry_after_ms: Option<u64>,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            message: message.into(),
            field: None,
            retry_after_ms: None,
        }
    }

    /// 404 for a job that is not the caller's (or does not exist).
    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// 403 for a missing scope.
    pub fn forbidden(scope: &str) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("token lacks the {scope} scope"),
        )
    }

    /// The HTTP error of a use case's error; a validation error keeps its
    /// field path, which decoding made the body's own (`stageIds[1]` for a
    /// body that is the filter, `filter.stageIds[1]` for one holding it).
    pub fn from_job(e: JobError) -> ApiError {
        let (status, error) = match &e {
            JobError::Validation(_) => (StatusCode::BAD_REQUEST, "validation_error"),
            JobError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            JobError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            JobError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            JobError::Gone(_) => (StatusCode::GONE, "gone"),
            JobError::Mongo(_) | JobError::Internal(_) | JobError::Unavailable { .. } => {
                tracing::warn!(error = %e, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let (message, field) = match &e {
            JobError::Validation(v) => (v.to_string(), Some(v.field.clone())),
            _ => (e.to_string(), None),
        };
        ApiError {
            status,
            error,
            message,
            field,
            retry_after_ms: e.retry_after_ms(),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        ApiError::from_job(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.error, "message": self.message});
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        if let Some(ms) = self.retry_after_ms {
            body["retryAfterMs"] = json!(ms);
        }
        (self.status, Json(body)).into_response()
    }
}

/// The bearer token's caller; rejects with 401.
pub struct Auth(pub Caller);

impl FromRequestParts<Arc<App>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(AuthError::Missing);
        token
            .and_then(|t| app.keys.verify(&t))
            .map(Auth)
            .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))
    }
}

/// The bearer token of a request, from the header (or `?token=` for WebSocket upgrades).
pub fn bearer(parts: &Parts) -> Option<String> {
    if let Some(h) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
    {
        let (scheme, token) = h.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
            return Some(token.trim().to_string());
        }
        return None;
    }
    None
}

impl Auth {
    /// 403 unless the token has `scope`.
    pub fn require(&self, scope: &str) -> Result<&Caller, ApiError> {
        if self.0.has(scope) {
            Ok(&self.0)
        } else {
            Err(ApiError::forbidden(scope))
        }
    }

    /// 403 unless the token has one of `scopes`.
    pub fn require_any(&self, scopes: &[&str]) -> Result<&Caller, ApiError> {
        if scopes.iter().any(|s| self.0.has(s)) {
            Ok(&self.0)
        } else {
            Err(ApiError::forbidden(&scopes.join(" or ")))
        }
    }
}
