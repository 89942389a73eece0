//! Error types of the actors crate: what callers (intake, HTTP) act on.

pub use contact_bulk_protocol::ValidationError;

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
        self.error_code().as_str()
    }

    /// The contract's error code, typed.
    pub fn error_code(&self) -> contact_bulk_protocol::error::ErrorCode {
        use contact_bulk_protocol::error::ErrorCode;
        match self {
            JobError::Validation(_) => ErrorCode::ValidationError,
            JobError::NotFound(_) => ErrorCode::NotFound,
            JobError::Conflict(_) => ErrorCode::Conflict,
            JobError::Gone(_) => ErrorCode::Gone,
            JobError::Mongo(_) | JobError::Internal(_) => ErrorCode::Internal,
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
