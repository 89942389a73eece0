//! WebSocket bridge (contract section 8): `GET /ws` upgrades an authenticated
//! connection into a session that receives the organisation's job and
//! `contact_removed` events from the `BULK_EVENTS` stream.
//!
//! - [`Hub`] (in `hub`) runs one JetStream ordered consumer per process and
//!   fans its events out on a `tokio::sync::broadcast` channel.
//! - Each connection (in `session`) has a send task, a receive task and an
//!   event task; frames wait in a bounded per-session [`outbox`] where the
//!   latest progress of a job replaces an older unsent one, status frames are
//!   never dropped and `contact_removed` events coalesce. A slow client only
//!   ever slows itself down.

mod hub;
mod outbox;
mod protocol;
mod session;

use std::sync::Arc;

use axum::extract::ws::{rejection::WebSocketUpgradeRejection, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::app::App;
use crate::auth::{AuthError, SCOPE_READ};
use crate::transport::http::{bearer, ApiError};

pub use hub::{Event, EventBody, Hub, JobEvent};

/// Largest client frame the bridge reads; bigger ones get a `too_large` error frame.
pub const MAX_CLIENT_FRAME: usize = 16 * 1024;

/// Largest message the WebSocket layer accepts at all: above it the connection
/// is closed with 1009 (too big) instead of answered with an error frame.
const MAX_WIRE_MESSAGE: usize = 256 * 1024;

/// Read buffer, and write batching target, of each WebSocket connection.
const WS_BUFFER: usize = 8 * 1024;

/// The `?token=` query parameter of browser upgrades (browsers cannot set headers).
#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    /// The bearer token.
    token: Option<String>,
}

/// What the bridge needs: the use cases (tokens, snapshots for a resync) and
/// the hub. The hub is the WebSocket transport's own: nothing else holds it.
#[derive(Clone)]
pub struct Bridge {
    /// The use cases.
    pub app: Arc<App>,
    /// Fan-out of `BULK_EVENTS` to the sessions.
    pub hub: Hub,
}

/// The `/ws` route, with its own state, to mount on the HTTP router.
pub fn routes<S: Clone + Send + Sync + 'static>(bridge: Bridge) -> axum::Router<S> {
    axum::Router::new()
        .route("/ws", axum::routing::get(upgrade))
        .with_state(bridge)
}

/// `GET /ws`: the token comes from `Authorization: Bearer` or `?token=`. Answers
/// 401 (missing or bad token) or 403 (no `jobs:read`) as JSON `{error, message}`
/// before any upgrade, then hands the socket to a session.
pub async fn upgrade(
    State(bridge): State<Bridge>,
    parts: Parts,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let token = bearer(&parts).or_else(|| {
        query
            .ok()
            .and_then(|Query(q)| q.token)
            .filter(|t| !t.trim().is_empty())
    });
    let caller = match token
        .ok_or(AuthError::Missing)
        .and_then(|t| bridge.app.keys.verify(&t))
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "ws upgrade refused");
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
                .into_response();
        }
    };
    if !caller.has(SCOPE_READ) {
        return ApiError::forbidden(SCOPE_READ).into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let org = caller.org;
    let exp = caller.exp;
    ws.max_message_size(MAX_WIRE_MESSAGE)
        .max_frame_size(MAX_WIRE_MESSAGE)
        // Client frames are small JSON ops: tungstenite's 128 KiB default read
        // buffer per connection was most of the service's memory at 1,000
        // clients. The buffer still grows for a larger frame, up to the limit.
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .on_failed_upgrade(move |e| tracing::debug!(org_id = %org, error = %e, "ws upgrade failed"))
        .on_upgrade(move |socket| session::run(socket, bridge, org, exp))
}
