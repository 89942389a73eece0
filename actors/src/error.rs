//! Error types of the actors crate: what callers (intake, HTTP) act on.

use serde::Serialize;

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

/// Errors of job operations, mapped one to one onto the contract's error codes.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad input; maps to `validation_error`.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The job (or other entity) does not exist in this organisation.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with the job's state.
    #[error("{0}")]
    Conflict(String),
    /// A quota of the organisation is used up; maps to `rate_limited`.
    #[error("{message}")]
    RateLimited {
        /// Lowercase, human readable reason.
        message: String,
        /// How long to wait before retrying.
        retry_after_ms: u64,
    },
    /// What was asked for existed but is no longer there (a restore of a hard
    /// delete, or past the retention); maps to `gone`.
    #[error("{0}")]
    Gone(String),
    /// MongoDB failed.
    #[error("database error: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl JobError {
    /// The contract's error code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            JobError::Validation(_) => "validation_error",
            JobError::NotFound(_) => "not_found",
            JobError::Conflict(_) => "conflict",
            JobError::RateLimited { .. } => "rate_limited",
            JobError::Gone(_) => "gone",
            JobError::Mongo(_) | JobError::Internal(_) => "internal",
        }
    }

    /// How long to wait before retrying, for `rate_limited`.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            JobError::RateLimited { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        }
    }

    /// The offending field, for validation errors.
    pub fn field(&self) -> Option<&str> {
        match self {
            JobError::Validation(v) => Some(&v.field),
            _ => None,
        }
    }
}

impl From<bson::ser::Error> for JobError {
    fn from(e: bson::ser::Error) -> Self {
        JobError::Internal(format!("bson encoding: {e}"))
    }
}

impl From<bson::de::Error> for JobError {
    fn from(e: bson::de::Error) -> Self {
        JobError::Internal(format!("bson decoding: {e}"))
    }
}
