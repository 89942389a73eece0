//! HTTP endpoints of webhooks (scope `webhooks:manage`): register, list, show,
//! delete, and a webhook's delivery log. The secret is shown once, in the
//! answer to the registration; it is kept only to sign deliveries.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bson::{oid::ObjectId, DateTime};
use contact_bulk_actors::model::rfc3339;
use contact_bulk_actors::repo::webhooks::{Attempt, Delivery, DeliveryStatus, Hook, Retry};
use contact_bulk_actors::{JobError, ValidationError};
use contact_bulk_protocol::commands::{WebhookEvent, WebhookRequest, MAX_URL};
use contact_bulk_protocol::parse::decode;
use contact_bulk_protocol::List;
use rand::RngCore;
use serde_json::{json, Value};

use crate::app::webhooks::{ssrf, EVENTS, MAX_PER_ORG, SCOPE_WEBHOOKS};
use crate::app::App;
use crate::transport::http::{ApiError, Auth};

type ApiResult = Result<Response, ApiError>;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::from_job(ValidationError::new(field, message).into())
}

fn db_error(e: JobError) -> ApiError {
    ApiError::from_job(e)
}

/// `POST /api/webhooks` `{url, events?}` → 201 `{id, url, events, secret, createdAt}`.
pub async fn create(State(app): State<Arc<App>>, auth: Auth, body: Bytes) -> ApiResult {
    let org = auth.require(SCOPE_WEBHOOKS)?.org;
    let hooks = &app.webhooks;
    let allow_private = hooks.config().allow_private;
    let req: WebhookRequest = decode(&body).map_err(|e| ApiError::from_job(e.into()))?;
    let raw_url = req.url.ok_or_else(|| invalid("url", "is required"))?;
    if raw_url.len() > MAX_URL {
        return Err(invalid(
            "url",
            format!("must be at most {MAX_URL} characters"),
        ));
    }
    let url = ssrf::check_url(&raw_url, allow_private).map_err(|m| invalid("url", m))?;
    ssrf::check_resolved(&url, allow_private)
        .await
        .map_err(|m| invalid("url", m))?;
    let events = events(req.events)?;

    let id = ObjectId::new();
    let now = hooks.now();
    let secret = new_secret();
    let url = url.to_string();
    let hook = Hook {
        id,
        org,
        url: url.clone(),
        events: events.clone(),
        secret: secret.clone(),
        created_at: now,
    };
    if !hooks
        .repo()
        .register(&hook, MAX_PER_ORG)
        .await
        .map_err(db_error)?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("an organisation has at most {MAX_PER_ORG} webhooks; delete one first"),
        ));
    }
    tracing::info!(webhook = %id, org = %org, url, "webhook registered");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id.to_hex(),
            "url": url,
            "events": events,
            "secret": secret,
            "createdAt": rfc3339(now),
        })),
    )
        .into_response())
}

/// `events`: a non-empty list of known event names (absent: all of them),
/// deduplicated in order.
fn events(list: Option<List<WebhookEvent>>) -> Result<Vec<String>, ApiError> {
    let Some(list) = list else {
        return Ok(EVENTS.iter().map(|e| e.to_string()).collect());
    };
    if list.is_empty() {
        return Err(invalid("events", "must name at least one event"));
    }
    let mut out: Vec<String> = Vec::new();
    for e in list.iter() {
        if !out.iter().any(|o| o == e.as_str()) {
            out.push(e.as_str().to_string());
        }
    }
    Ok(out)
}

/// `whsec_` and 32 random bytes in hex.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("whsec_{}", hex::encode(bytes))
}

/// A registration as listed: never its secret.
fn listed(h: &Hook) -> Value {
    json!({
        "id": h.id.to_hex(),
        "url": h.url,
        "events": h.events,
        "createdAt": rfc3339(h.created_at),
    })
}

/// `GET /api/webhooks` → `{webhooks: [{id, url, events, createdAt}]}`, oldest first.
pub async fn list(State(app): State<Arc<App>>, auth: Auth) -> ApiResult {
    let org = auth.require(SCOPE_WEBHOOKS)?.org;
    let docs = app
        .webhooks
        .repo()
        .hooks_of(org, MAX_PER_ORG as i64 * 2)
        .await
        .map_err(db_error)?;
    let list: Vec<Value> = docs.iter().map(listed).collect();
    Ok(Json(json!({"webhooks": list})).into_response())
}

/// The caller's webhook, or 404 (another organisation's, a malformed id).
async fn own(app: &App, org: ObjectId, id: &str) -> Result<Hook, ApiError> {
    let id = ObjectId::parse_str(id).map_err(|_| ApiError::not_found("webhook"))?;
    app.webhooks
        .repo()
        .hook_of(org, id)
        .await
        .map_err(db_error)?
        .ok_or_else(|| ApiError::not_found("webhook"))
}

/// `GET /api/webhooks/{id}` → `{id, url, events, createdAt}`.
pub async fn show(State(app): State<Arc<App>>, auth: Auth, Path(id): Path<String>) -> ApiResult {
    let org = auth.require(SCOPE_WEBHOOKS)?.org;
    let hook = own(&app, org, &id).await?;
    Ok(Json(listed(&hook)).into_response())
}

/// `DELETE /api/webhooks/{id}` → 204; its pending deliveries go with it.
pub async fn remove(State(app): State<Arc<App>>, auth: Auth, Path(id): Path<String>) -> ApiResult {
    let org = auth.require(SCOPE_WEBHOOKS)?.org;
    let id = own(&app, org, &id).await?.id;
    let gone = app
        .webhooks
        .repo()
        .remove(org, id)
        .await
        .map_err(db_error)?;
    if !gone {
        return Err(ApiError::not_found("webhook"));
    }
    tracing::info!(webhook = %id, org = %org, "webhook deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/webhooks/{id}/deliveries?limit=N` → `{deliveries: [...]}`, newest
/// first: each with its status, attempts and the log of its last attempts.
pub async fn deliveries(
    State(app): State<Arc<App>>,
    auth: Auth,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let org = auth.require(SCOPE_WEBHOOKS)?.org;
    let limit = match q.get("limit") {
        None => 50,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=200).contains(n))
            .ok_or_else(|| invalid("limit", "must be an integer from 1 to 200"))?,
    };
    let id = own(&app, org, &id).await?.id;
    let docs = app
        .webhooks
        .repo()
        .deliveries(org, id, limit)
        .await
        .map_err(db_error)?;
    let list: Vec<Value> = docs.iter().map(delivery).collect();
    Ok(Json(json!({"deliveries": list})).into_response())
}

/// `POST /api/webhooks/{id}/deliveries/{deliveryId}/retry` → 202 with the
/// delivery: a pending one is tried now, a given-up one once more. A delivery
/// that succeeded is not sent again (409), nor one being sent right now.
pub async fn retry(
    State(app): State<Arc<App>>,
    auth: Auth,
    Path((id, delivery_id)): Path<(String, String)>,
) -> ApiResult {
    let org = auth.require(SCOPE_WEBHOOKS)?.org;
    let hook_id = own(&app, org, &id).await?.id;
    let delivery_id =
        ObjectId::parse_str(&delivery_id).map_err(|_| ApiError::not_found("delivery"))?;
    let hooks = &app.webhooks;
    let now = hooks.now();
    let retried = hooks
        .repo()
        .retry(org, hook_id, delivery_id, now)
        .await
        .map_err(db_error)?;
    let message = match retried {
        Retry::Due(d) => {
            hooks.wake_workers();
            return Ok((StatusCode::ACCEPTED, Json(delivery(&d))).into_response());
        }
        Retry::NotFound => return Err(ApiError::not_found("delivery")),
        Retry::Succeeded => "the delivery has succeeded; it is not sent again",
        Retry::Busy => "the delivery is being sent right now",
    };
    Err(ApiError::new(StatusCode::CONFLICT, "conflict", message))
}

fn time(t: Option<DateTime>) -> Value {
    t.map(|t| json!(rfc3339(t))).unwrap_or(Value::Null)
}

fn attempt(e: &Attempt) -> Value {
    json!({
        "at": rfc3339(e.at),
        "statusCode": e.status_code,
        "error": e.error,
        "durationMs": e.duration_ms,
    })
}

fn delivery(d: &Delivery) -> Value {
    let status = d.status.map(DeliveryStatus::as_str).unwrap_or_default();
    let log: Vec<Value> = d.log.iter().rev().map(attempt).collect();
    json!({
        "id": d.id.to_hex(),
        "type": d.kind,
        "jobId": d.job_id,
        "status": status,
        "attempts": d.attempts,
        "createdAt": time(d.created_at),
        "nextAttemptAt": if d.status == Some(DeliveryStatus::Pending) { time(d.next_attempt_at) } else { Value::Null },
        "deliveredAt": time(d.delivered_at),
        "lastStatusCode": d.last_status_code,
        "lastError": d.last_error,
        "log": log,
    })
}
