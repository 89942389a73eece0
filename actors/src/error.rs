//! Error types of the actors crate: what callers (intake, HTTP) act on.

pub use contact_bulk_protocol::job::Dependency;
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
    /// A server the job depends on is unreachable: an outage, not a fault of
    /// the job's own work. Jobs wait it out; it never costs an attempt.
    #[error("{service} unavailable: {message}")]
    Unavailable {
        /// Which server.
        service: Dependency,
        /// What failed.
        message: String,
    },
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
            JobError::RateLimited { .. } => ErrorCode::RateLimited,
            JobError::Mongo(_) | JobError::Internal(_) | JobError::Unavailable { .. } => {
                ErrorCode::Internal
            }
        }
    }

    /// The server this error says is unreachable, if it is an outage rather
    /// than an error of the job's own work: a connection refused or reset, a
    /// timeout, no server selectable, a server shutting down or stepping down,
    /// a cursor lost with its server; NATS without responders or connection.
    pub fn outage(&self) -> Option<Dependency> {
        match self {
            JobError::Unavailable { service, .. } => Some(*service),
            JobError::Mongo(e) if mongo_outage(e) => Some(Dependency::Mongodb),
            _ => None,
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

/// Whether a MongoDB error means the server could not be reached or could not
/// serve for now (as opposed to rejecting the request itself).
pub fn mongo_outage(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    // Codes of a server going away, shutting down, stepping down or not yet
    // primary, of a network failure, and of a cursor lost with its server.
    const CODES: &[i32] = &[
        6, 7, 43, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
    ];
    if e.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
        || e.contains_label("RetryableError")
        || e.contains_label(mongodb::error::SYSTEM_OVERLOADED_ERROR)
    {
        return true;
    }
    match e.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => true,
        ErrorKind::Command(c) => CODES.contains(&c.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => CODES.contains(&w.code),
        ErrorKind::InsertMany(m) => m
            .write_concern_error
            .as_ref()
            .is_some_and(|w| CODES.contains(&w.code)),
        _ => false,
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
