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
use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use contact_bulk_actors::model::rfc3339;
use contact_bulk_actors::{JobError, ValidationError};
use contact_bulk_protocol::commands::{WebhookEvent, WebhookRequest, MAX_URL};
use contact_bulk_protocol::parse::decode;
use contact_bulk_protocol::List;
use futures::TryStreamExt;
use rand::RngCore;
use serde_json::{json, Value};

use crate::app::webhooks::{ssrf, EVENTS, MAX_PER_ORG, SCOPE_WEBHOOKS};
use crate::app::App;
use crate::transport::http::{ApiError, Auth};

type ApiResult = Result<Response, ApiError>;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::from_job(ValidationError::new(field, message).into())
}

fn db_error(e: mongodb::error::Error) -> ApiError {
    ApiError::from_job(JobError::Mongo(e))
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
    let now = DateTime::now();
    let secret = new_secret();
    let url = url.to_string();
    hooks
        .inner
        .hooks
        .insert_one(doc! {
            "_id": id, "orgId": org, "url": &url, "events": &events,
            "secret": &secret, "createdAt": now,
        })
        .await
        .map_err(db_error)?;
    // Counted after the insert, so that concurrent registrations cannot pass
    // the limit together: the one that finds too many takes itself back.
    let count = hooks
        .inner
        .hooks
        .count_documents(doc! {"orgId": org})
        .await
        .map_err(db_error)?;
    if count > MAX_PER_ORG {
        hooks
            .inner
            .hooks
            .delete_one(doc! {"_id": id})
            .await
            .map_err(db_error)?;
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
fn listed(d: &Document) -> Value {
    json!({
        "id": d.get_object_id("_id").map(|i| i.to_hex()).unwrap_or_default(),
        "url": d.get_str("url").unwrap_or_default(),
        "events": d.get_array("events").map(|a| a.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>()).unwrap_or_default(),
        "createdAt": d.get_datetime("createdAt").map(|t| rfc3339(*t)).unwrap_or_default(),
    })
}

/// `GET /api/webhooks` → `{webhooks: [{id, url, events, createdAt}]}`, oldest first.
pub async fn list(State(app): State<Arc<App>>, auth: Auth) -> ApiResult {
    let org = auth.require(SCOPE_WEBHOOKS)?.org;
    let docs: Vec<Document> = app
        .webhooks
        .inner
        .hooks
        .find(doc! {"orgId": org})
        .projection(doc! {"secret": 0})
        .sort(doc! {"createdAt": 1, "_id": 1})
        .limit(MAX_PER_ORG as i64 * 2)
        .await
        .map_err(db_error)?
        .try_collect()
        .await
        .map_err(db_error)?;
    let list: Vec<Value> = docs.iter().map(listed).collect();
    Ok(Json(json!({"webhooks": list})).into_response())
}

/// The caller's webhook, or 404 (another organisation's, a malformed id).
async fn own(app: &App, org: ObjectId, id: &str) -> Result<Document, ApiError> {
    let id = ObjectId::parse_str(id).map_err(|_| ApiError::not_found("webhook"))?;
    app.webhooks
        .inner
        .hooks
        .find_one(doc! {"_id": id, "orgId": org})
        .projection(doc! {"secret": 0})
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
    let hook = own(&app, org, &id).await?;
    let id = hook
        .get_object_id("_id")
        .map_err(|_| ApiError::not_found("webhook"))?;
    let hooks = &app.webhooks.inner;
    let gone = hooks
        .hooks
        .delete_one(doc! {"_id": id, "orgId": org})
        .await
        .map_err(db_error)?;
    if gone.deleted_count == 0 {
        return Err(ApiError::not_found("webhook"));
    }
    hooks
        .deliveries
        .delete_many(doc! {"webhookId": id})
        .await
        .map_err(db_error)?;
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
    let hook = own(&app, org, &id).await?;
    let id = hook
        .get_object_id("_id")
        .map_err(|_| ApiError::not_found("webhook"))?;
    let docs: Vec<Document> = app
        .webhooks
        .inner
        .deliveries
        .find(doc! {"webhookId": id, "orgId": org})
        .projection(doc! {"body": 0, "leaseToken": 0})
        .sort(doc! {"createdAt": -1, "_id": -1})
        .limit(limit)
        .await
        .map_err(db_error)?
        .try_collect()
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
    let hook = own(&app, org, &id).await?;
    let hook_id = hook
        .get_object_id("_id")
        .map_err(|_| ApiError::not_found("webhook"))?;
    let delivery_id =
        ObjectId::parse_str(&delivery_id).map_err(|_| ApiError::not_found("delivery"))?;
    let deliveries = &app.webhooks.inner.deliveries;
    let mine = doc! {"_id": delivery_id, "webhookId": hook_id, "orgId": org};
    let mut filter = mine.clone();
    filter.insert("status", doc! {"$in": ["pending", "failed"]});
    filter.insert("leaseToken", Bson::Null);
    let updated = deliveries
        .find_one_and_update(
            filter,
            doc! {"$set": {"status": "pending", "nextAttemptAt": DateTime::now()}},
        )
        .projection(doc! {"body": 0, "leaseToken": 0})
        .return_document(mongodb::options::ReturnDocument::After)
        .await
        .map_err(db_error)?;
    match updated {
        Some(d) => {
            app.webhooks.inner.wake.notify_waiters();
            Ok((StatusCode::ACCEPTED, Json(delivery(&d))).into_response())
        }
        None => {
            let found = deliveries
                .find_one(mine)
                .projection(doc! {"status": 1})
                .await
                .map_err(db_error)?
                .ok_or_else(|| ApiError::not_found("delivery"))?;
            let message = if found.get_str("status") == Ok("succeeded") {
                "the delivery has succeeded; it is not sent again"
            } else {
                "the delivery is being sent right now"
            };
            Err(ApiError::new(StatusCode::CONFLICT, "conflict", message))
        }
    }
}

fn time(d: &Document, key: &str) -> Value {
    d.get_datetime(key)
        .map(|t| json!(rfc3339(*t)))
        .unwrap_or(Value::Null)
}

fn opt_i64(d: &Document, key: &str) -> Value {
    match d.get(key) {
        Some(Bson::Int32(n)) => json!(n),
        Some(Bson::Int64(n)) => json!(n),
        _ => Value::Null,
    }
}

fn opt_str(d: &Document, key: &str) -> Value {
    d.get_str(key).map(|s| json!(s)).unwrap_or(Value::Null)
}

fn delivery(d: &Document) -> Value {
    let status = d.get_str("status").unwrap_or_default();
    let log: Vec<Value> = d
        .get_array("log")
        .map(|a| {
            a.iter()
                .rev()
                .filter_map(|e| e.as_document())
                .map(|e| {
                    json!({
                        "at": time(e, "at"),
                        "statusCode": opt_i64(e, "statusCode"),
                        "error": opt_str(e, "error"),
                        "durationMs": opt_i64(e, "durationMs"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "id": d.get_object_id("_id").map(|i| i.to_hex()).unwrap_or_default(),
        "type": opt_str(d, "type"),
        "jobId": opt_str(d, "jobId"),
        "status": status,
        "attempts": opt_i64(d, "attempts"),
        "createdAt": time(d, "createdAt"),
        "nextAttemptAt": if status == "pending" { time(d, "nextAttemptAt") } else { Value::Null },
        "deliveredAt": time(d, "deliveredAt"),
        "lastStatusCode": opt_i64(d, "lastStatusCode"),
        "lastError": opt_str(d, "lastError"),
        "log": log,
    })
}
