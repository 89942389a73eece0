//! The frozen selection of a job: the upper `_id` bound that every later read
//! of the job is limited to, and the count of `total` under it.
//!
//! The MongoDB repositories (under `repo/`) are its only
//! callers: the job steps and the use cases ask their repositories.
//!
//! Both are written for servers whose index scans cost the size of the key
//! range they cover whatever the `limit` (secantusd-rs behaves so): they only
//! ever ask for narrow ranges or for the whole range once.

use std::time::{SystemTime, UNIX_EPOCH};

use bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::Database;

use crate::error::JobError;

/// The `_id` bound of a job starting now over `query` in `collection`.
///
/// ObjectIds begin with their creation second, so every contact created up to
/// now sorts at or below `now·ffffffffffffffff`. Ids minted on a clock ahead
/// of this one may sort above it: the largest of those (a narrow, usually
/// empty range) raises the bound so that nothing that exists is left out.
/// Contacts created after the start normally sort above the bound and are not
/// part of the job.
pub async fn bound(
    db: &Database,
    collection: &str,
    query: &Document,
) -> Result<ObjectId, JobError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .min(u32::MAX as u64) as u32;
    let mut bytes = [0xffu8; 12];
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    let now = ObjectId::from_bytes(bytes);
    let mut above = query.clone();
    above.insert("_id", doc! {"$gt": now});
    let ahead = db
        .collection::<Document>(collection)
        .find_one(above)
        .sort(doc! {"_id": -1})
        .projection(doc! {"_id": 1})
        .await?;
    Ok(ahead
        .and_then(|d| d.get_object_id("_id").ok())
        .unwrap_or(now))
}

/// Counts the documents of `query` in `collection` with `_id <= bound` (all of
/// them without a bound), capped by `limit`. The `count` command with a predicate is exact and, unlike the
/// aggregation behind `countDocuments`, a bare count scan of the index.
pub async fn count(
    db: &Database,
    collection: &str,
    query: &Document,
    bound: Option<ObjectId>,
    limit: Option<u64>,
) -> Result<i64, JobError> {
    count_hinted(db, collection, query, bound, limit, None).await
}

/// [`count`] with the index to use (`hint`, a key pattern).
pub async fn count_hinted(
    db: &Database,
    collection: &str,
    query: &Document,
    bound: Option<ObjectId>,
    limit: Option<u64>,
    hint: Option<Document>,
) -> Result<i64, JobError> {
    let mut query = query.clone();
    if let Some(bound) = bound {
        query.insert("_id", doc! {"$lte": bound});
    }
    let mut command = doc! {"count": collection, "query": query};
    if let Some(hint) = hint {
        command.insert("hint", hint);
    }
    let reply = db.run_command(command).await?;
    let n = match reply.get("n") {
        Some(Bson::Int32(n)) => *n as i64,
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Double(n)) => *n as i64,
        _ => {
            return Err(JobError::Internal(format!(
                "count reply without n: {reply}"
            )))
        }
    };
    Ok(limit.map_or(n, |l| n.min(l as i64)))
}
