//! Replies of the NATS commands (contract section 4) that are not a job
//! snapshot (that is [`crate::job::JobSnapshot`]).

use serde::{Deserialize, Serialize};

/// `bulk.v1.count`: `{count}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountReply {
    /// Matching contacts.
    pub count: u64,
}

/// A reply that is either the value or the contract's error
/// (`{"error": {...}}`), as clients read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply<T> {
    /// The error reply.
    Error(crate::error::ErrorReply),
    /// The value.
    Ok(T),
}
