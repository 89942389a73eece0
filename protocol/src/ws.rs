//! The WebSocket bridge's frames (contract section 8): client operations as
//! they arrive, and every frame the server sends.

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::limits::Text;
use crate::parse::decode;

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

/// A topic name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topic {
    /// Every job of the organisation.
    Jobs,
    /// `contact_removed`.
    Contacts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OpName {
    Subscribe,
    Unsubscribe,
    Ping,
    Auth,
}

/// A client frame as sent; [`ClientFrame::op`] checks which keys go with which op.
#[derive(Debug, Clone, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
struct ClientFrame {
    op: Option<serde_json::Value>,
    #[serde(default)]
    job_id: Option<Text>,
    #[serde(default)]
    topic: Option<serde_json::Value>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    token: Option<Text>,
}

crate::object_only!(ClientFrame);

/// Why a client frame was refused: the error frame's `code`, and the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// `bad_frame`, `unknown_op` or `validation_error`.
    pub code: &'static str,
    /// What is wrong, and where.
    pub error: ValidationError,
}

impl OpError {
    fn new(code: &'static str, field: &str, message: impl Into<String>) -> OpError {
        OpError {
            code,
            error: ValidationError::new(field, message),
        }
    }
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
pub fn parse_op(text: &str) -> Result<Op, OpError> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|_| OpError::new("bad_frame", "body", "frame is not valid JSON"))?;
    if !value.is_object() {
        return Err(OpError::new(
            "bad_frame",
            "body",
            "frame must be a JSON object",
        ));
    }
    let frame: ClientFrame = crate::parse::decode_value(value, "").map_err(|mut e| {
        // Never echo a huge key back.
        e.field = e.field.chars().take(64).collect();
        OpError {
            code: "validation_error",
            error: e,
        }
    })?;
    frame.op()
}

impl ClientFrame {
    fn op(self) -> Result<Op, OpError> {
        let invalid = |field: &str, message: &str| OpError::new("validation_error", field, message);
        let name = match self.op {
            None | Some(serde_json::Value::Null) => return Err(invalid("op", "is required")),
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(invalid("op", "must be a string")),
        };
        let op: OpName =
            serde_json::from_value(serde_json::Value::String(name.clone())).map_err(|_| {
                OpError::new(
                    "unknown_op",
                    "op",
                    format!("unknown op {name:?}: use subscribe, unsubscribe, auth or ping"),
                )
            })?;
        let allowed: &[&str] = match op {
            OpName::Ping => &[],
            OpName::Subscribe => &["jobId", "topic", "since"],
            OpName::Unsubscribe => &["jobId", "topic"],
            OpName::Auth => &["token"],
        };
        for (key, given) in [
            ("jobId", self.job_id.is_some()),
            ("topic", self.topic.is_some()),
            ("since", self.since.is_some()),
            ("token", self.token.is_some()),
        ] {
            if given && !allowed.contains(&key) {
                return Err(invalid(key, "unknown key"));
            }
        }
        match op {
            OpName::Ping => Ok(Op::Ping),
            OpName::Auth => match self.token {
                Some(t) if !t.trim().is_empty() => Ok(Op::Auth(t.trim().to_string())),
                _ => Err(invalid("token", "must be a non-empty string")),
            },
            OpName::Unsubscribe => Ok(Op::Unsubscribe(target(self.job_id, self.topic)?)),
            OpName::Subscribe => {
                let target = target(self.job_id, self.topic)?;
                if self.since.is_some() && !matches!(target, Target::Job(_)) {
                    return Err(invalid("since", "only applies to a jobId"));
                }
                Ok(Op::Subscribe(target, self.since))
            }
        }
    }
}

fn target(job: Option<Text>, topic: Option<serde_json::Value>) -> Result<Target, OpError> {
    let invalid = |field: &str, message: &str| OpError::new("validation_error", field, message);
    match (job, topic) {
        (Some(_), Some(_)) => Err(invalid("topic", "give either jobId or topic")),
        (None, None) => Err(invalid("jobId", "jobId or topic is required")),
        (Some(id), None) if valid_job_id(&id) => Ok(Target::Job(id.into_string())),
        (Some(_), None) => Err(invalid("jobId", "must be a job id string")),
        (None, Some(t)) => match serde_json::from_value::<Topic>(t) {
            Ok(Topic::Jobs) => Ok(Target::Jobs),
            Ok(Topic::Contacts) => Ok(Target::Contacts),
            Err(_) => Err(invalid("topic", "must be \"jobs\" or \"contacts\"")),
        },
    }
}

/// A frame the server sends; `J` is the job snapshot (or its serialised form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerFrame<J> {
    /// At once on subscribing to a job (`gap: true` when events may be missed).
    #[serde(rename = "snapshot")]
    Snapshot {
        /// The job.
        job: J,
        /// Events may have been missed since the last frame.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        gap: bool,
    },
    /// `job.progress`.
    #[serde(rename = "job.progress")]
    Progress {
        /// Stream sequence of the event.
        seq: u64,
        /// The job.
        job: J,
    },
    /// `job.status`.
    #[serde(rename = "job.status")]
    Status {
        /// Stream sequence of the event.
        seq: u64,
        /// The job.
        job: J,
    },
    /// One or more `contact_removed`, coalesced.
    #[serde(rename = "contact_removed", rename_all = "camelCase")]
    ContactRemoved {
        /// Sequence of the last event included.
        seq: u64,
        /// 24-hex ids.
        contact_ids: Vec<String>,
    },
    /// One or more `contact_restored`, coalesced.
    #[serde(rename = "contact_restored", rename_all = "camelCase")]
    ContactRestored {
        /// Sequence of the last event included.
        seq: u64,
        /// 24-hex ids.
        contact_ids: Vec<String>,
    },
    /// Something went wrong; the connection lives on (except `token_expired`).
    #[serde(rename = "error", rename_all = "camelCase")]
    Error {
        /// `bad_frame`, `validation_error`, `not_found`, `token_expired`, ….
        code: String,
        /// Human readable.
        message: String,
        /// The offending key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
        /// The job a `not_found` is about.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<String>,
    },
    /// The answer to `ping`.
    #[serde(rename = "pong")]
    Pong,
}

impl<J> ServerFrame<J> {
    /// An error frame.
    pub fn error(code: &str, message: impl Into<String>) -> ServerFrame<J> {
        ServerFrame::Error {
            code: code.to_string(),
            message: message.into(),
            field: None,
            job_id: None,
        }
    }
}

impl<J> From<OpError> for ServerFrame<J> {
    fn from(e: OpError) -> ServerFrame<J> {
        let field = (e.code == "validation_error").then(|| e.error.field.clone());
        let message = match &field {
            Some(f) => format!("{f}: {}", e.error.message),
            None => e.error.message,
        };
        ServerFrame::Error {
            code: e.code.to_string(),
            message,
            field,
            job_id: None,
        }
    }
}

/// Decodes a server frame (clients: the CLI, benchmarks, tests).
pub fn parse_frame<J: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<ServerFrame<J>, ValidationError> {
    decode(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

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
        assert_eq!(code(r#"{"op":"ping","jobId":"a"}"#), "validation_error");
        let e = parse_op(r#"{"op":"ping","x":1}"#).unwrap_err();
        assert_eq!(e.error.field, "x");
        let frame: Value = serde_json::to_value(ServerFrame::<Value>::from(e)).unwrap();
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["field"], "x");
    }

    #[test]
    fn server_frames_have_the_contract_shape() {
        let f = |v: ServerFrame<Value>| serde_json::to_string(&v).unwrap();
        assert_eq!(
            f(ServerFrame::Progress {
                seq: 3,
                job: json!({})
            }),
            r#"{"type":"job.progress","seq":3,"job":{}}"#
        );
        assert_eq!(
            f(ServerFrame::Snapshot {
                job: json!({}),
                gap: false
            }),
            r#"{"type":"snapshot","job":{}}"#
        );
        assert_eq!(
            f(ServerFrame::ContactRemoved {
                seq: 9,
                contact_ids: vec!["c".into()]
            }),
            r#"{"type":"contact_removed","seq":9,"contactIds":["c"]}"#
        );
        assert_eq!(f(ServerFrame::Pong), r#"{"type":"pong"}"#);
        assert_eq!(
            f(ServerFrame::error("token_expired", "gone")),
            r#"{"type":"error","code":"token_expired","message":"gone"}"#
        );
        let back: ServerFrame<Value> =
            parse_frame(r#"{"type":"job.status","seq":1,"job":{"a":1}}"#).unwrap();
        assert_eq!(
            back,
            ServerFrame::Status {
                seq: 1,
                job: json!({"a": 1})
            }
        );
    }
}
