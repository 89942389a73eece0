//! The contract's error codes and the validation error every edge reports.

use serde::{Deserialize, Serialize};

/// A request that cannot be accepted as given. Nothing has been changed.
///
/// `field` is the JSON path of the offending value as the caller sent it,
/// e.g. `filter.stageIds[1]` or `filter.advancedParams.createdAfter`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// JSON path of the offending value.
    pub field: String,
    /// Lowercase, human readable reason.
    pub message: String,
}

impl ValidationError {
    /// Builds a validation error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Error codes of contract section 4 (and the HTTP `error` of section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Bad input, named in `field`; nothing was changed.
    ValidationError,
    /// No such job (or another organisation's).
    NotFound,
    /// The request conflicts with a job's state or a `commandId`.
    Conflict,
    /// What was asked for is gone for good (expired file, old delete).
    Gone,
    /// Over a quota: retry after `retryAfterMs`.
    RateLimited,
    /// The service failed.
    Internal,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ValidationError => "validation_error",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Gone => "gone",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
        }
    }
}

/// The body of a NATS error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// What kind of error.
    pub code: ErrorCode,
    /// Lowercase, human readable.
    pub message: String,
    /// The offending field of a validation error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// When a rate-limited caller may try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// A NATS error reply: `{"error": {code, message, field?, retryAfterMs?}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The error.
    pub error: ErrorBody,
}

impl From<ValidationError> for ErrorReply {
    fn from(e: ValidationError) -> ErrorReply {
        ErrorReply {
            error: ErrorBody {
                code: ErrorCode::ValidationError,
                message: e.message,
                field: Some(e.field),
                retry_after_ms: None,
            },
        }
    }
}
