//! The quota repository: per-organisation request counters of fixed rate
//! windows (`bulk_quota`, one document per organisation and UTC minute, `_id`
//! `<orgId>:<minute>`), shared by every instance.
//!
//! It owns one invariant: a request is counted exactly once, atomically, however
//! many instances count the same window at the same moment (an `$inc` upsert
//! with `findOneAndUpdate`; the loser of two racing first inserts retries and
//! finds the document). The policy (limits, what is refused) is the caller's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use mongodb::options::{FindOneAndUpdateOptions, ReturnDocument};
use mongodb::{Collection, Database};

use crate::error::JobError;
use crate::store::is_duplicate_key;

/// Counter documents of the rate windows.
pub const QUOTA_COLLECTION: &str = "bulk_quota";

/// Rate-window counters.
#[async_trait]
pub trait QuotaRepo: Send + Sync + std::fmt::Debug + 'static {
    /// Counts one request of `org` in `window` (ending at `ends_at`) and
    /// returns the window's count including it.
    async fn bump(&self, org: ObjectId, window: &str, ends_at: DateTime) -> Result<i64, JobError>;

    /// Requests counted in `window` so far (0 for a window nobody counted in).
    async fn used(&self, window: &str) -> Result<i64, JobError>;

    /// Removes the counters of windows that ended before `cutoff`; how many went.
    async fn sweep(&self, cutoff: DateTime) -> Result<u64, JobError>;
}

/// [`QuotaRepo`] on MongoDB.
#[derive(Debug, Clone)]
pub struct MongoQuota {
    windows: Collection<Document>,
}

impl MongoQuota {
    /// The counters in `db`.
    pub fn new(db: &Database) -> MongoQuota {
        MongoQuota {
            windows: db.collection(QUOTA_COLLECTION),
        }
    }
}

#[async_trait]
impl QuotaRepo for MongoQuota {
    async fn bump(&self, org: ObjectId, window: &str, ends_at: DateTime) -> Result<i64, JobError> {
        let opts = FindOneAndUpdateOptions::builder()
            .upsert(true)
            .return_document(ReturnDocument::After)
            .build();
        let update = doc! {
            "$inc": {"count": 1i64},
            "$setOnInsert": {"orgId": org, "endsAt": ends_at},
        };
        let mut tries = 0;
        let doc = loop {
            let r = self
                .windows
                .find_one_and_update(doc! {"_id": window}, update.clone())
                .with_options(opts.clone())
                .await;
            match r {
                // Two first requests of a minute racing to insert: the loser
                // finds the document on its next try.
                Err(e) if is_duplicate_key(&e) && tries < 3 => tries += 1,
                r => break r?,
            }
        };
        Ok(doc.as_ref().map_or(1, count_of))
    }

    async fn used(&self, window: &str) -> Result<i64, JobError> {
        let d = self.windows.find_one(doc! {"_id": window}).await?;
        Ok(d.as_ref().map_or(0, count_of))
    }

    async fn sweep(&self, cutoff: DateTime) -> Result<u64, JobError> {
        let r = self
            .windows
            .delete_many(doc! {"endsAt": {"$lt": cutoff}})
            .await?;
        Ok(r.deleted_count)
    }
}

fn count_of(d: &Document) -> i64 {
    match d.get("count") {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Double(n)) => *n as i64,
        _ => 0,
    }
}

/// Window id → (org, end, count).
type Windows = BTreeMap<String, (ObjectId, DateTime, i64)>;

/// [`QuotaRepo`] in memory, atomic under one lock like the upsert; clones
/// share the counters.
#[derive(Debug, Clone, Default)]
pub struct MemQuota {
    windows: Arc<Mutex<Windows>>,
}

impl MemQuota {
    /// No counters.
    pub fn new() -> MemQuota {
        MemQuota::default()
    }

    /// Windows counted and not swept.
    pub fn windows(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl QuotaRepo for MemQuota {
    async fn bump(&self, org: ObjectId, window: &str, ends_at: DateTime) -> Result<i64, JobError> {
        let mut w = self.lock();
        let entry = w.entry(window.to_string()).or_insert((org, ends_at, 0));
        entry.2 += 1;
        Ok(entry.2)
    }

    async fn used(&self, window: &str) -> Result<i64, JobError> {
        Ok(self.lock().get(window).map_or(0, |e| e.2))
    }

    async fn sweep(&self, cutoff: DateTime) -> Result<u64, JobError> {
        let mut w = self.lock();
        let before = w.len();
        w.retain(|_, e| e.1 >= cutoff);
        Ok((before - w.len()) as u64)
    }
}
