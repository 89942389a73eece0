//! WebSocket bridge (placeholder while the bridge is written; replaced by the real one).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::commands::App;

/// Fan-out of BULK_EVENTS to WebSocket sessions.
#[derive(Clone, Debug, Default)]
pub struct Hub;

impl Hub {
    /// Starts the hub.
    pub async fn start(
        _js: async_nats::jetstream::Context,
        _config: &crate::config::Config,
        _tasks: &mut tokio::task::JoinSet<()>,
    ) -> anyhow::Result<Hub> {
        Ok(Hub)
    }
}

/// `GET /ws`.
pub async fn upgrade(State(_app): State<Arc<App>>) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}
