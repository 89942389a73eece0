//! The bridge's wire protocol: client operations parsed strictly, and the
//! server frames that are not job events.
//!
//! Error codes of `{"type": "error", "code", "message"}`: `bad_frame` (not a
//! JSON object, or binary), `too_large` (over 16 KiB), `unknown_op`,
//! `validation_error` (a missing, unknown or invalid key, named in `field`),
//! `too_many_subscriptions`, `not_found` (with `jobId`), `lagged` (events of a
//! topic were lost), `unauthorized` (an `auth` frame's token is bad),
//! `forbidden` (an `auth` token of another organisation or without
//! `jobs:read`), `token_expired` (then the server closes), `internal`.

use axum::extract::ws::Utf8Bytes;
use serde_json::{json, Map, Value};

/// What a client subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One job's events, after a snapshot.
    Job(String),
    /// Every job event of the organisation.
    Jobs,
    /// The organisation's `contact_removed` events.
    Contacts,
}

/// A client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `subscribe`, with `since` only for jobs.
    Subscribe(Target, Option<u64>),
    /// `unsubscribe`.
    Unsubscribe(Target),
    /// `ping`.
    Ping,
    /// `auth`: replaces the connection's token (same organisation).
    Auth(String),
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// Error code.
    pub code: &'static str,
    /// Human-readable reason.
    pub message: String,
    /// The offending key, when there is one.
    pub field: Option<String>,
}

impl FrameError {
    fn new(code: &'static str, message: impl Into<String>) -> FrameError {
        FrameError {
            code,
            message: message.into(),
            field: None,
        }
    }

    fn field(field: &str, message: &str) -> FrameError {
        FrameError {
            code: "validation_error",
            message: format!("{field}: {message}"),
            field: Some(field.to_string()),
        }
    }

    /// The error frame.
    pub fn frame(&self) -> Utf8Bytes {
        let mut v = json!({"type": "error", "code": self.code, "message": self.message});
        if let Some(f) = &self.field {
            v["field"] = json!(f);
        }
        Utf8Bytes::from(v.to_string())
    }
}

/// An error frame.
pub fn error(code: &'static str, message: impl Into<String>) -> Utf8Bytes {
    FrameError::new(code, message).frame()
}

/// `not_found` for a job, naming it.
pub fn not_found(job_id: &str) -> Utf8Bytes {
    let v =
        json!({"type": "error", "code": "not_found", "message": "job not found", "jobId": job_id});
    Utf8Bytes::from(v.to_string())
}

/// The frame for a frame larger than the limit.
pub fn too_large(limit: usize) -> FrameError {
    FrameError::new("too_large", format!("frames are limited to {limit} bytes"))
}

/// The frame for binary messages.
pub fn binary() -> FrameError {
    FrameError::new("bad_frame", "frames are JSON text, not binary")
}

/// A snapshot frame (`gap: true` when events may have been missed).
pub fn snapshot(job: Value, gap: bool) -> Utf8Bytes {
    let mut v = json!({"type": "snapshot", "job": job});
    if gap {
        v["gap"] = json!(true);
    }
    Utf8Bytes::from(v.to_string())
}

/// True for ids that are safe inside a NATS subject token (UUIDs are).
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses one client frame.
pub fn parse_op(text: &str) -> Result<Op, FrameError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|_| FrameError::new("bad_frame", "frame is not valid JSON"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| FrameError::new("bad_frame", "frame must be a JSON object"))?;
    let op = match obj.get("op") {
        None | Some(Value::Null) => return Err(FrameError::field("op", "is required")),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(FrameError::field("op", "must be a string")),
    };
    match op {
        "ping" => {
            only(obj, &["op"])?;
            Ok(Op::Ping)
        }
        "subscribe" => {
            only(obj, &["op", "jobId", "topic", "since"])?;
            let target = target(obj)?;
            let since =
                match obj.get("since") {
                    None | Some(Value::Null) => None,
                    Some(_) if !matches!(target, Target::Job(_)) => {
                        return Err(FrameError::field("since", "only applies to a jobId"))
                    }
                    Some(v) => Some(v.as_u64().ok_or_else(|| {
                        FrameError::field("since", "must be a non-negative integer")
                    })?),
                };
            Ok(Op::Subscribe(target, since))
        }
        "unsubscribe" => {
            only(obj, &["op", "jobId", "topic"])?;
            Ok(Op::Unsubscribe(target(obj)?))
        }
        "auth" => {
            only(obj, &["op", "token"])?;
            match obj.get("token") {
                Some(Value::String(t)) if !t.trim().is_empty() => Ok(Op::Auth(t.trim().into())),
                _ => Err(FrameError::field("token", "must be a non-empty string")),
            }
        }
        other => Err(FrameError::new(
            "unknown_op",
            format!("unknown op {other:?}: use subscribe, unsubscribe, auth or ping"),
        )),
    }
}

fn only(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), FrameError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => {
            // Never echo a huge key back.
            let shown: String = k.chars().take(64).collect();
            Err(FrameError::field(&shown, "unknown key"))
        }
        None => Ok(()),
    }
}

fn target(obj: &Map<String, Value>) -> Result<Target, FrameError> {
    let job = obj.get("jobId").filter(|v| !v.is_null());
    let topic = obj.get("topic").filter(|v| !v.is_null());
    match (job, topic) {
        (Some(_), Some(_)) => Err(FrameError::field("topic", "give either jobId or topic")),
        (None, None) => Err(FrameError::field("jobId", "jobId or topic is required")),
        (Some(Value::String(id)), None) if valid_job_id(id) => Ok(Target::Job(id.clone())),
        (Some(_), None) => Err(FrameError::field("jobId", "must be a job id string")),
        (None, Some(Value::String(t))) if t == "jobs" => Ok(Target::Jobs),
        (None, Some(Value::String(t))) if t == "contacts" => Ok(Target::Contacts),
        (None, Some(_)) => Err(FrameError::field(
            "topic",
            "must be \"jobs\" or \"contacts\"",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_parse() {
        assert_eq!(parse_op(r#"{"op":"ping"}"#), Ok(Op::Ping));
        assert_eq!(
            parse_op(r#"{"op":"subscribe","jobId":"a-1","since":5}"#),
            Ok(Op::Subscribe(Target::Job("a-1".into()), Some(5)))
        );
        assert_eq!(
            parse_op(r#"{"op":"subscribe","topic":"contacts"}"#),
            Ok(Op::Subscribe(Target::Contacts, None))
        );
        assert_eq!(
            parse_op(r#"{"op":"unsubscribe","topic":"jobs"}"#),
            Ok(Op::Unsubscribe(Target::Jobs))
        );
        assert_eq!(
            parse_op(r#"{"op":"auth","token":"a.b.c"}"#),
            Ok(Op::Auth("a.b.c".into()))
        );
    }

    #[test]
    fn bad_frames_get_codes() {
        let code = |t: &str| parse_op(t).unwrap_err().code;
        assert_eq!(code("nope"), "bad_frame");
        assert_eq!(code("[1]"), "bad_frame");
        assert_eq!(code(r#"{"op":"dance"}"#), "unknown_op");
        assert_eq!(code(r#"{}"#), "validation_error");
        assert_eq!(code(r#"{"op":"subscribe"}"#), "validation_error");
        assert_eq!(
            code(r#"{"op":"subscribe","jobId":"a.>"}"#),
            "validation_error"
        );
        assert_eq!(code(r#"{"op":"subscribe","jobId":7}"#), "validation_error");
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"all"}"#),
            "validation_error"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"jobs","since":1}"#),
            "validation_error"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","jobId":"a","since":-1}"#),
            "validation_error"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","jobId":"a","topic":"jobs"}"#),
            "validation_error"
        );
        assert_eq!(code(r#"{"op":"auth"}"#), "validation_error");
        assert_eq!(code(r#"{"op":"auth","token":5}"#), "validation_error");
        assert_eq!(
            code(r#"{"op":"auth","token":"t","x":1}"#),
            "validation_error"
        );
        let e = parse_op(r#"{"op":"ping","x":1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("x"));
        let frame: Value = serde_json::from_str(e.frame().as_str()).unwrap();
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["field"], "x");
    }
}
