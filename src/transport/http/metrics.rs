//! `GET /metrics`: the process's Prometheus metrics (contract section 13), no token.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use contact_bulk_actors::metrics;

use crate::app::App;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every series. `bulk_jobs_pending` is read from MongoDB here (jobs
/// wait in the database, not in any one process); if the database does not
/// answer within a second the last value stays.
pub async fn scrape(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let pending = tokio::time::timeout(Duration::from_secs(1), app.store.count_pending(None)).await;
    match pending {
        Ok(Ok(n)) => metrics::set_jobs_pending(n as i64),
        Ok(Err(e)) => tracing::debug!(error = %e, "pending jobs not counted"),
        Err(_) => tracing::debug!("pending jobs not counted in time"),
    }
    // The body is OpenMetrics text, which the classic Prometheus parser reads
    // too; the content type follows what the scraper asked for.
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let content_type = if wants_openmetrics {
        OPENMETRICS
    } else {
        PROMETHEUS_TEXT
    };
    ([(header::CONTENT_TYPE, content_type)], metrics::render()).into_response()
}
