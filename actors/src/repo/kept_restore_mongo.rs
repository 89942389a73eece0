//! [`RestoreRepo`] on MongoDB: kept documents read as ranges of `bulk_kept`'s
//! `_id` index, audit entries by their unique `bulkKey`.

use async_trait::async_trait;
use bson::{doc, oid::ObjectId, Document, RawDocumentBuf};
use futures::{StreamExt, TryStreamExt};
use mongodb::options::InsertManyOptions;
use mongodb::Collection;

use super::crm_mongo::audit_key;
use super::kept::{self, Kind};
use super::kept_restore::{
    released_key, restore_key, Apart, Child, KeptContact, KeptSummary, RestoreRepo, Target,
};
use super::MongoCrm;
use crate::error::JobError;
use crate::model::JobRecord;
use crate::store::{is_duplicate_key, names};

/// Most bytes of kept bundles one read of kept contacts returns.
const BATCH_BYTES: usize = 8 * 1024 * 1024;

fn kind(child: Child) -> Kind {
    match child {
        Child::Conversation => Kind::Conversation,
        Child::Message => Kind::Message,
    }
}

/// A bundle as the restore reads it (its documents copied out once).
fn kept_contact(b: &RawDocumentBuf) -> Result<KeptContact, JobError> {
    let copy = |kind: Kind| -> Result<Vec<RawDocumentBuf>, JobError> {
        Ok(kept::embedded(b, kind)?
            .into_iter()
            .map(|d| d.to_raw_document_buf())
            .collect())
    };
    Ok(KeptContact {
        contact: kept::contact_of(b)?,
        doc: kept::original(b)?.to_raw_document_buf(),
        conversations: copy(Kind::Conversation)?,
        messages: copy(Kind::Message)?,
        spilled: kept::spilled(b),
    })
}

impl MongoCrm {
    fn event_logs(&self) -> Collection<Document> {
        self.db().collection(names::EVENT_LOGS)
    }

    fn kept(&self) -> Collection<RawDocumentBuf> {
        kept::collection(self.db())
    }
}

#[async_trait]
impl RestoreRepo for MongoCrm {
    async fn kept_total(&self, source: &str) -> Result<i64, JobError> {
        let range = kept::range(source, Kind::Contact, None, None);
        crate::snapshot::count(self.db(), names::KEPT, &range, None, None).await
    }

    async fn kept_contacts(
        &self,
        source: &str,
        after: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<KeptContact>, JobError> {
        let mut cursor = self
            .kept()
            .find(kept::range(source, Kind::Contact, after, None))
            .sort(doc! {"_id": 1})
            .limit(i64::from(limit.max(1)))
            .await?;
        let (mut contacts, mut bytes) = (Vec::new(), 0usize);
        while let Some(b) = cursor.try_next().await? {
            bytes += b.as_bytes().len();
            contacts.push(kept_contact(&b)?);
            if bytes >= BATCH_BYTES {
                break;
            }
        }
        Ok(contacts)
    }

    async fn kept_summaries(
        &self,
        source: &str,
        after: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<KeptSummary>, JobError> {
        let bundles: Vec<RawDocumentBuf> = self
            .kept()
            .find(kept::range(source, Kind::Contact, after, None))
            .sort(doc! {"_id": 1})
            .limit(i64::from(limit.max(1)))
            .projection(doc! {"contactId": 1, "counts": 1, "spilled": 1})
            .await?
            .try_collect()
            .await?;
        bundles
            .iter()
            .map(|b| {
                Ok(KeptSummary {
                    contact: kept::contact_of(b)?,
                    conversations: kept::embedded_count(b, Kind::Conversation),
                    messages: kept::embedded_count(b, Kind::Message),
                    spilled: kept::spilled(b),
                })
            })
            .collect()
    }

    async fn kept_apart(
        &self,
        source: &str,
        child: Child,
        after: Option<ObjectId>,
        upto: ObjectId,
    ) -> Result<Apart, JobError> {
        let cursor = self
            .kept()
            .find(kept::range(source, kind(child), after, Some(upto)))
            .batch_size(1000)
            .await?;
        Ok(cursor
            .map_err(JobError::from)
            .and_then(|k| async move {
                Ok((
                    kept::contact_of(&k)?,
                    kept::original(&k)?.to_raw_document_buf(),
                ))
            })
            .boxed())
    }

    async fn taken(&self, job: &JobRecord, ids: &[ObjectId]) -> Result<Vec<ObjectId>, JobError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .db()
            .collection::<Document>(job.filter.pipeline_type.collection())
            .find(doc! {"_id": {"$in": ids}})
            .projection(doc! {"_id": 1})
            .await?
            .try_filter_map(|d| async move { Ok(d.get_object_id("_id").ok()) })
            .try_collect()
            .await?)
    }

    async fn put_back(
        &self,
        job: &JobRecord,
        target: Target,
        docs: Vec<RawDocumentBuf>,
    ) -> Result<u64, JobError> {
        let name = match target {
            Target::Contacts => job.filter.pipeline_type.collection(),
            Target::Children(Child::Conversation) => names::CONVERSATIONS,
            Target::Children(Child::Message) => names::MESSAGES,
        };
        kept::insert_raw(&self.db().collection(name), docs).await
    }

    async fn write_restores(&self, entries: &[Document]) -> Result<bool, JobError> {
        if entries.is_empty() {
            return Ok(true);
        }
        let opts = InsertManyOptions::builder().ordered(false).build();
        match self
            .event_logs()
            .insert_many(entries)
            .with_options(opts)
            .await
        {
            Ok(r) => Ok(r.inserted_ids.len() == entries.len()),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn restores_of(
        &self,
        source: &str,
        contacts: &[ObjectId],
    ) -> Result<Vec<Document>, JobError> {
        let keys: Vec<String> = contacts.iter().map(|c| restore_key(source, *c)).collect();
        Ok(self
            .event_logs()
            .find(doc! {"bulkKey": {"$in": keys}})
            .projection(doc! {"contactId": 1, "ownerId": 1, "createdAt": 1, "jobId": 1})
            .await?
            .try_collect()
            .await?)
    }

    async fn adopt(
        &self,
        job: &JobRecord,
        source: &str,
        from: &str,
        contacts: &[ObjectId],
    ) -> Result<(), JobError> {
        let keys: Vec<String> = contacts.iter().map(|c| restore_key(source, *c)).collect();
        self.event_logs()
            .update_many(
                doc! {"bulkKey": {"$in": keys}, "jobId": from},
                doc! {"$set": {"jobId": &job.job_id, "adoptedFrom": from}},
            )
            .await?;
        Ok(())
    }

    async fn release_deleted(
        &self,
        job: &JobRecord,
        source: &str,
        contacts: &[ObjectId],
    ) -> Result<(), JobError> {
        let org = job.org_id;
        let keys: Vec<String> = contacts.iter().map(|c| audit_key(org, *c)).collect();
        let held = doc! {"bulkKey": {"$in": &keys}, "jobId": source, "type": "CONTACT_DELETE"};
        let originals: Vec<Document> = self
            .event_logs()
            .find(held.clone())
            .await?
            .try_collect()
            .await?;
        if originals.is_empty() {
            return Ok(());
        }
        let copies: Vec<Document> = originals
            .into_iter()
            .filter_map(|mut e| {
                let contact = e.get_object_id("contactId").ok()?;
                e.remove("_id");
                e.insert("bulkKey", released_key(org, contact, source));
                e.insert("restoredBy", &job.job_id);
                Some(e)
            })
            .collect();
        // A copy written before a crash is a duplicate key: the original goes.
        self.write_restores(&copies).await?;
        self.event_logs().delete_many(held).await?;
        Ok(())
    }

    async fn restored_after(&self, job: &JobRecord) -> Result<Vec<ObjectId>, JobError> {
        let Some(src) = job.source_job_id.as_deref() else {
            return Ok(Vec::new());
        };
        let lower = match job.checkpoint.last_id {
            Some(after) => format!("{};", restore_key(src, after)),
            None => format!("restore:{src}:"),
        };
        let decided: Vec<Document> = self
            .event_logs()
            .find(doc! {
                "bulkKey": {"$gt": lower, "$lt": format!("restore:{src};")},
                "jobId": &job.job_id,
            })
            .projection(doc! {"contactId": 1})
            .await?
            .try_collect()
            .await?;
        Ok(decided
            .iter()
            .filter_map(|d| d.get_object_id("contactId").ok())
            .collect())
    }

    async fn withdraw_restores(
        &self,
        job: &JobRecord,
        contacts: &[ObjectId],
    ) -> Result<(), JobError> {
        let Some(src) = job.source_job_id.as_deref() else {
            return Ok(());
        };
        if contacts.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = contacts.iter().map(|c| restore_key(src, *c)).collect();
        self.event_logs()
            .delete_many(doc! {"bulkKey": {"$in": keys}, "jobId": &job.job_id})
            .await?;
        Ok(())
    }
}
