//! [`WebhookRepo`] on MongoDB: the queries, indexes and atomic updates of the
//! webhook machinery (see [`super::webhooks`] for what each guarantees).

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};

use super::webhooks::{
    Attempt, Claim, Delivery, DeliveryStatus, Hook, NewDelivery, Next, Retry, WebhookRepo,
    DELIVERIES, LOG_LEN, WEBHOOKS,
};
use crate::error::JobError;
use crate::store::is_duplicate_key;

/// Registrations and deliveries in MongoDB.
#[derive(Debug, Clone)]
pub struct MongoWebhooks {
    hooks: Collection<Document>,
    deliveries: Collection<Document>,
}

impl MongoWebhooks {
    /// The collections of `db`.
    pub fn new(db: &Database) -> MongoWebhooks {
        MongoWebhooks {
            hooks: db.collection(WEBHOOKS),
            deliveries: db.collection(DELIVERIES),
        }
    }
}

fn hook_of(d: &Document) -> Option<Hook> {
    Some(Hook {
        id: d.get_object_id("_id").ok()?,
        org: d
            .get_object_id("orgId")
            .unwrap_or(ObjectId::from_bytes([0; 12])),
        url: d.get_str("url").unwrap_or_default().to_string(),
        events: d
            .get_array("events")
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
        secret: d.get_str("secret").unwrap_or_default().to_string(),
        created_at: d
            .get_datetime("createdAt")
            .copied()
            .unwrap_or(DateTime::from_millis(0)),
    })
}

fn int(d: &Document, key: &str) -> Option<i64> {
    match d.get(key) {
        Some(Bson::Int32(n)) => Some(i64::from(*n)),
        Some(Bson::Int64(n)) => Some(*n),
        _ => None,
    }
}

fn text(d: &Document, key: &str) -> Option<String> {
    d.get_str(key).ok().map(String::from)
}

fn attempt_of(e: &Document) -> Option<Attempt> {
    Some(Attempt {
        at: *e.get_datetime("at").ok()?,
        status_code: int(e, "statusCode").map(|n| n as i32),
        error: text(e, "error"),
        duration_ms: int(e, "durationMs").unwrap_or(0),
    })
}

fn delivery_of(d: &Document) -> Option<Delivery> {
    Some(Delivery {
        id: d.get_object_id("_id").ok()?,
        kind: text(d, "type"),
        job_id: text(d, "jobId"),
        status: d.get_str("status").ok().and_then(DeliveryStatus::parse),
        attempts: int(d, "attempts"),
        created_at: d.get_datetime("createdAt").ok().copied(),
        next_attempt_at: d.get_datetime("nextAttemptAt").ok().copied(),
        delivered_at: d.get_datetime("deliveredAt").ok().copied(),
        last_status_code: int(d, "lastStatusCode"),
        last_error: text(d, "lastError"),
        log: d
            .get_array("log")
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_document())
                    .filter_map(attempt_of)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn claim_of(d: &Document, token: String) -> Option<Claim> {
    Some(Claim {
        id: d.get_object_id("_id").ok()?,
        webhook_id: d.get_object_id("webhookId").ok()?,
        token,
        body: d.get_str("body").ok()?.to_string(),
        attempts: d.get_i32("attempts").unwrap_or(0),
        created_at: *d.get_datetime("createdAt").ok()?,
    })
}

#[async_trait]
impl WebhookRepo for MongoWebhooks {
    async fn ensure_indexes(&self) -> Result<(), JobError> {
        self.hooks
            .create_index(IndexModel::builder().keys(doc! {"orgId": 1}).build())
            .await?;
        let deliveries = [
            IndexModel::builder()
                .keys(doc! {"webhookId": 1, "jobId": 1})
                .options(IndexOptions::builder().unique(true).build())
                .build(),
            IndexModel::builder()
                .keys(doc! {"status": 1, "nextAttemptAt": 1})
                .build(),
            IndexModel::builder()
                .keys(doc! {"webhookId": 1, "createdAt": -1})
                .build(),
        ];
        for index in deliveries {
            self.deliveries.create_index(index).await?;
        }
        Ok(())
    }

    async fn register(&self, hook: &Hook, max: u64) -> Result<bool, JobError> {
        self.hooks
            .insert_one(doc! {
                "_id": hook.id, "orgId": hook.org, "url": &hook.url, "events": &hook.events,
                "secret": &hook.secret, "createdAt": hook.created_at,
            })
            .await?;
        // Counted after the insert, so that concurrent registrations cannot pass
        // the limit together: the one that finds too many takes itself back.
        let count = self.hooks.count_documents(doc! {"orgId": hook.org}).await?;
        if count > max {
            self.hooks.delete_one(doc! {"_id": hook.id}).await?;
            return Ok(false);
        }
        Ok(true)
    }

    async fn hooks_of(&self, org: ObjectId, limit: i64) -> Result<Vec<Hook>, JobError> {
        let docs: Vec<Document> = self
            .hooks
            .find(doc! {"orgId": org})
            .projection(doc! {"secret": 0})
            .sort(doc! {"createdAt": 1, "_id": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs.iter().filter_map(hook_of).collect())
    }

    async fn hook_of(&self, org: ObjectId, id: ObjectId) -> Result<Option<Hook>, JobError> {
        let d = self
            .hooks
            .find_one(doc! {"_id": id, "orgId": org})
            .projection(doc! {"secret": 0})
            .await?;
        Ok(d.as_ref().and_then(hook_of))
    }

    async fn hook(&self, id: ObjectId) -> Result<Option<Hook>, JobError> {
        let d = self.hooks.find_one(doc! {"_id": id}).await?;
        Ok(d.as_ref().and_then(hook_of))
    }

    async fn remove(&self, org: ObjectId, id: ObjectId) -> Result<bool, JobError> {
        let gone = self
            .hooks
            .delete_one(doc! {"_id": id, "orgId": org})
            .await?;
        if gone.deleted_count == 0 {
            return Ok(false);
        }
        self.deliveries.delete_many(doc! {"webhookId": id}).await?;
        Ok(true)
    }

    async fn subscribers(
        &self,
        org: ObjectId,
        event: &str,
    ) -> Result<Vec<(ObjectId, DateTime)>, JobError> {
        let docs: Vec<Document> = self
            .hooks
            .find(doc! {"orgId": org, "events": event})
            .projection(doc! {"_id": 1, "createdAt": 1})
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|h| {
                Some((
                    h.get_object_id("_id").ok()?,
                    *h.get_datetime("createdAt").ok()?,
                ))
            })
            .collect())
    }

    async fn all_hooks(&self) -> Result<Vec<Hook>, JobError> {
        let docs: Vec<Document> = self
            .hooks
            .find(doc! {})
            .projection(doc! {"_id": 1, "orgId": 1, "events": 1, "createdAt": 1})
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter(|d| d.get_object_id("orgId").is_ok() && d.get_datetime("createdAt").is_ok())
            .filter_map(hook_of)
            .collect())
    }

    async fn enqueue(&self, d: &NewDelivery) -> Result<bool, JobError> {
        let insert = doc! {
            "_id": d.id,
            "orgId": d.org,
            "type": &d.kind,
            "body": &d.body,
            "status": DeliveryStatus::Pending.as_str(),
            "attempts": 0,
            "createdAt": d.created_at,
            "nextAttemptAt": d.created_at,
            "log": [],
        };
        let upsert = self
            .deliveries
            .update_one(
                doc! {"webhookId": d.webhook_id, "jobId": &d.job_id},
                doc! {"$setOnInsert": insert},
            )
            .upsert(true)
            .await;
        match upsert {
            Ok(r) => Ok(r.upserted_id.is_some()),
            // Another instance inserted the same delivery at the same moment.
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn queued(
        &self,
        hooks: &[ObjectId],
        jobs: &[&str],
    ) -> Result<HashSet<(ObjectId, String)>, JobError> {
        let docs: Vec<Document> = self
            .deliveries
            .find(doc! {"webhookId": {"$in": hooks}, "jobId": {"$in": jobs}})
            .projection(doc! {"webhookId": 1, "jobId": 1})
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                Some((
                    d.get_object_id("webhookId").ok()?,
                    d.get_str("jobId").ok()?.to_string(),
                ))
            })
            .collect())
    }

    async fn claim(&self, now: DateTime, lease: Duration) -> Result<Option<Claim>, JobError> {
        let token = uuid::Uuid::new_v4().to_string();
        let lease_end = DateTime::from_millis(now.timestamp_millis() + lease.as_millis() as i64);
        let doc = self
            .deliveries
            .find_one_and_update(
                doc! {"status": "pending", "nextAttemptAt": {"$lte": now}},
                doc! {"$set": {"nextAttemptAt": lease_end, "leaseToken": &token}},
            )
            .sort(doc! {"nextAttemptAt": 1})
            .return_document(ReturnDocument::After)
            .await?;
        let Some(d) = doc else {
            return Ok(None);
        };
        let claimed = claim_of(&d, token);
        if claimed.is_none() {
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            tracing::warn!(delivery = %id, "malformed webhook delivery set aside");
            let _ = self
                .deliveries
                .update_one(
                    doc! {"_id": id},
                    doc! {"$set": {"status": "failed", "lastError": "malformed delivery record"}},
                )
                .await;
        }
        Ok(claimed)
    }

    async fn record(
        &self,
        claim: &Claim,
        attempts: i32,
        attempt: &Attempt,
        next: Next,
    ) -> Result<bool, JobError> {
        let entry = doc! {
            "at": attempt.at,
            "statusCode": attempt.status_code,
            "error": attempt.error.clone(),
            "durationMs": attempt.duration_ms,
        };
        let mut set = doc! {
            "attempts": attempts,
            "lastAttemptAt": attempt.at,
            "lastStatusCode": attempt.status_code,
            "lastError": attempt.error.clone(),
            "leaseToken": Bson::Null,
        };
        match next {
            Next::Delivered(at) => {
                set.insert("status", DeliveryStatus::Succeeded.as_str());
                set.insert("deliveredAt", at);
            }
            Next::RetryAt(at) => {
                set.insert("nextAttemptAt", at);
            }
            Next::GaveUp => {
                set.insert("status", DeliveryStatus::Failed.as_str());
            }
        }
        let update = doc! {
            "$set": set,
            "$push": {"log": {"$each": [entry], "$slice": -LOG_LEN}},
        };
        let r = self
            .deliveries
            .update_one(doc! {"_id": claim.id, "leaseToken": &claim.token}, update)
            .await?;
        Ok(r.matched_count > 0)
    }

    async fn drop_claimed(&self, claim: &Claim) -> Result<(), JobError> {
        self.deliveries
            .delete_one(doc! {"_id": claim.id, "leaseToken": &claim.token})
            .await?;
        Ok(())
    }

    async fn prune(&self, before: DateTime) -> Result<u64, JobError> {
        let gone = self
            .deliveries
            .delete_many(doc! {
                "status": {"$in": ["succeeded", "failed"]},
                "createdAt": {"$lt": before},
            })
            .await?;
        Ok(gone.deleted_count)
    }

    async fn deliveries(
        &self,
        org: ObjectId,
        hook: ObjectId,
        limit: i64,
    ) -> Result<Vec<Delivery>, JobError> {
        let docs: Vec<Document> = self
            .deliveries
            .find(doc! {"webhookId": hook, "orgId": org})
            .projection(doc! {"body": 0, "leaseToken": 0})
            .sort(doc! {"createdAt": -1, "_id": -1})
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs.iter().filter_map(delivery_of).collect())
    }

    async fn retry(
        &self,
        org: ObjectId,
        hook: ObjectId,
        delivery: ObjectId,
        now: DateTime,
    ) -> Result<Retry, JobError> {
        let mine = doc! {"_id": delivery, "webhookId": hook, "orgId": org};
        let mut filter = mine.clone();
        filter.insert("status", doc! {"$in": ["pending", "failed"]});
        filter.insert("leaseToken", Bson::Null);
        let updated = self
            .deliveries
            .find_one_and_update(
                filter,
                doc! {"$set": {"status": "pending", "nextAttemptAt": now}},
            )
            .projection(doc! {"body": 0, "leaseToken": 0})
            .return_document(ReturnDocument::After)
            .await?;
        if let Some(d) = updated.as_ref().and_then(delivery_of) {
            return Ok(Retry::Due(Box::new(d)));
        }
        let found = self
            .deliveries
            .find_one(mine)
            .projection(doc! {"status": 1})
            .await?;
        Ok(match found {
            None => Retry::NotFound,
            Some(d) if d.get_str("status") == Ok("succeeded") => Retry::Succeeded,
            Some(_) => Retry::Busy,
        })
    }
}
