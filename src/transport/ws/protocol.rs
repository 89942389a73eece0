//! The bridge's frames as bytes: client operations are parsed, and server
//! frames written, by the protocol crate's types (`contact_bulk_protocol::ws`);
//! this module only turns them into the socket's text frames.
//!
//! Error codes of `{"type": "error", "code", "message"}`: `bad_frame` (not a
//! JSON object, or binary), `too_large` (over 16 KiB), `unknown_op`,
//! `validation_error` (a missing, unknown or invalid key, named in `field`),
//! `too_many_subscriptions`, `not_found` (with `jobId`), `lagged` (events of a
//! topic were lost), `unauthorized` (an `auth` frame's token is bad),
//! `forbidden` (an `auth` token of another organisation or without
//! `jobs:read`), `token_expired` (then the server closes), `internal`.

use axum::extract::ws::Utf8Bytes;
use contact_bulk_protocol::events::ContactEventType;
use contact_bulk_protocol::ws::ServerFrame;
pub use contact_bulk_protocol::ws::{parse_op, Op, OpError, Target};
use serde::Serialize;

/// A server frame as a text frame.
pub fn frame<J: Serialize>(f: &ServerFrame<J>) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(f).unwrap_or_default())
}

/// An error frame.
pub fn error(code: &'static str, message: impl Into<String>) -> Utf8Bytes {
    frame(&ServerFrame::<()>::error(code, message))
}

/// The error frame of a refused client frame.
pub fn refused(e: OpError) -> Utf8Bytes {
    frame(&ServerFrame::<()>::from(e))
}

/// `not_found` for a job, naming it.
pub fn not_found(job_id: &str) -> Utf8Bytes {
    frame(&ServerFrame::<()>::Error {
        code: "not_found".into(),
        message: "job not found".into(),
        field: None,
        job_id: Some(job_id.to_string()),
    })
}

/// The frame for a frame larger than the limit.
pub fn too_large(limit: usize) -> Utf8Bytes {
    error("too_large", format!("frames are limited to {limit} bytes"))
}

/// The frame for binary messages.
pub fn binary() -> Utf8Bytes {
    error("bad_frame", "frames are JSON text, not binary")
}

/// A snapshot frame (`gap: true` when events may have been missed).
pub fn snapshot<J: Serialize>(job: J, gap: bool) -> Utf8Bytes {
    frame(&ServerFrame::Snapshot { job, gap })
}

/// A coalesced `contact_removed` or `contact_restored` frame (by `kind`).
pub fn contacts(kind: &str, seq: u64, contact_ids: Vec<String>) -> Utf8Bytes {
    match ContactEventType::parse(kind) {
        Some(ContactEventType::Restored) => {
            frame(&ServerFrame::<()>::ContactRestored { seq, contact_ids })
        }
        _ => frame(&ServerFrame::<()>::ContactRemoved { seq, contact_ids }),
    }
}
