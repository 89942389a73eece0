//! Every HTTP error is JSON `{error, message}` (contract section 7): the
//! framework's own answers (unknown path, 405, 413 over the body limit, 415,
//! axum's extractor rejections, a failed WebSocket upgrade) are rewritten here
//! instead of leaving as plain text or an empty body.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

use super::ApiError;

/// Largest request body any endpoint reads (contract section 10).
pub const MAX_BODY: usize = 1024 * 1024;

/// Bytes of a framework rejection's text kept as the message.
const MAX_REJECTION_TEXT: usize = 4 * 1024;

/// The router's fallback: an unknown path is a JSON 404.
pub async fn unknown_path(req: Request) -> ApiError {
    let path: String = req.uri().path().chars().take(200).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {} {path}", req.method()),
    )
}

/// Rewrites any error response that is not JSON into `{error, message}`,
/// keeping its status and headers (`Allow` of a 405, `Retry-After` of a 429).
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&resp) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_REJECTION_TEXT)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (code, field, message) = describe(status, text);
    let mut json = serde_json::json!({"error": code, "message": message});
    if let Some(field) = field {
        json["field"] = field.into();
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut out = Response::from_parts(parts, Body::from(json.to_string()));
    *out.status_mut() = status;
    out
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"))
}

/// The contract's code, the field when one is to blame, and a message, for a
/// framework rejection with status `status` and text `text`.
fn describe(status: StatusCode, text: String) -> (&'static str, Option<&'static str>, String) {
    let or_reason = |text: String| {
        if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_lowercase()
        } else {
            text
        }
    };
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "validation_error",
            Some("body"),
            format!("body: must be at most {MAX_BODY} bytes (1 MiB)"),
        ),
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
            ("validation_error", None, or_reason(text))
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", None, or_reason(text)),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            None,
            "method not allowed on this path".into(),
        ),
        StatusCode::NOT_FOUND => ("not_found", None, or_reason(text)),
        StatusCode::UNAUTHORIZED => ("unauthorized", None, or_reason(text)),
        StatusCode::FORBIDDEN => ("forbidden", None, or_reason(text)),
        StatusCode::CONFLICT => ("conflict", None, or_reason(text)),
        StatusCode::GONE => ("gone", None, or_reason(text)),
        StatusCode::TOO_MANY_REQUESTS => ("rate_limited", None, or_reason(text)),
        s if s.is_server_error() => ("internal", None, or_reason(text)),
        _ => ("bad_request", None, or_reason(text)),
    }
}
