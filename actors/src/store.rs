//! The MongoDB schema the repositories share: collection names, the indexes
//! every query relies on, and how a duplicate key shows in an error.

use std::time::Duration;

use bson::{doc, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::IndexOptions;
use mongodb::{Database, IndexModel};

use crate::error::JobError;

/// Collection names, in one place.
pub mod names {
    /// Job records.
    pub const JOBS: &str = "bulk_jobs";
    /// Export file chunks.
    pub const CHUNKS: &str = "export_chunks";
    /// Audit log.
    pub const EVENT_LOGS: &str = "event_logs";
    /// Assignee notifications.
    pub const NOTIFICATIONS: &str = "notifications";
    /// Conversations of contacts.
    pub const CONVERSATIONS: &str = "conversations";
    /// Messages of conversations.
    pub const MESSAGES: &str = "messages";
    /// Pipelines with their stages.
    pub const PIPELINES: &str = "pipelines";
    /// CRM users (assignees).
    pub const USERS: &str = "users";
    /// What deletes removed, kept for restores (`repo::kept`).
    pub const KEPT: &str = "bulk_kept";
}

/// True when a MongoDB error is a duplicate-key violation (E11000).
pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().all(|w| w.code == 11000)),
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

/// Creates the indexes jobs rely on. Index builds over existing data can take
/// a while, so each one is logged.
pub async fn ensure_indexes(db: &Database) -> Result<(), JobError> {
    let unique_sparse = || IndexOptions::builder().unique(true).sparse(true).build();
    let plan: Vec<(&str, IndexModel)> = vec![
        (
            names::JOBS,
            IndexModel::builder()
                .keys(doc! {"commandKey": 1})
                .options(unique_sparse())
                .build(),
        ),
        (
            names::JOBS,
            // The scan for jobs to start: per organisation, oldest first.
            IndexModel::builder()
                .keys(doc! {"status": 1, "orgId": 1, "createdAt": 1})
                .build(),
        ),
        (
            names::JOBS,
            IndexModel::builder()
                .keys(doc! {"orgId": 1, "createdAt": -1})
                .build(),
        ),
        (
            names::JOBS,
            // The clean-ups still owed (`cleanupPending` exists only while
            // one is): each scan looks, so the look must not read every job.
            IndexModel::builder()
                .keys(doc! {"cleanupPending": 1})
                .options(IndexOptions::builder().sparse(true).build())
                .build(),
        ),
        (
            names::JOBS,
            // The n-th restore of a delete: one at a time, and how a
            // delete's restores are found.
            IndexModel::builder()
                .keys(doc! {"restoreKey": 1})
                .options(unique_sparse())
                .build(),
        ),
        (
            names::KEPT,
            // Kept documents go when their retention ends (the server's
            // TTL monitor; restores also refuse expired deletes themselves).
            IndexModel::builder()
                .keys(doc! {"expiresAt": 1})
                .options(
                    IndexOptions::builder()
                        .expire_after(Duration::from_secs(0))
                        .build(),
                )
                .build(),
        ),
        (
            names::CHUNKS,
            IndexModel::builder()
                .keys(doc! {"jobId": 1, "n": 1})
                .options(IndexOptions::builder().unique(true).build())
                .build(),
        ),
        (
            names::EVENT_LOGS,
            // `<orgId>:<contactId>` of bulk-delete entries: one per deleted
            // contact, and how a job finds its own by contact id range.
            // Sparse, so the CRM's own entries are not constrained.
            IndexModel::builder()
                .keys(doc! {"bulkKey": 1})
                .options(unique_sparse())
                .build(),
        ),
        (
            names::NOTIFICATIONS,
            IndexModel::builder()
                .keys(doc! {"bulkKey": 1})
                .options(unique_sparse())
                .build(),
        ),
        (
            names::CONVERSATIONS,
            IndexModel::builder().keys(doc! {"contactId": 1}).build(),
        ),
        (
            names::MESSAGES,
            IndexModel::builder().keys(doc! {"contactId": 1}).build(),
        ),
    ];
    let mut plan = plan;
    for coll in ["contacts", "applications"] {
        plan.push((
            coll,
            IndexModel::builder()
                .keys(doc! {"orgId": 1, "stageId": 1, "_id": 1})
                .build(),
        ));
        plan.push((
            coll,
            IndexModel::builder()
                .keys(doc! {"orgId": 1, "_id": 1})
                .build(),
        ));
    }
    for (coll, model) in plan {
        let keys = model.keys.clone();
        let started = std::time::Instant::now();
        tracing::info!(collection = coll, keys = %keys, "ensuring index");
        db.collection::<Document>(coll).create_index(model).await?;
        tracing::info!(collection = coll, keys = %keys, elapsed_ms = started.elapsed().as_millis() as u64, "index ready");
    }
    Ok(())
}
