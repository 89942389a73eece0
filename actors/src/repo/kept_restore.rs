//! What a restore reads and writes, behind one typed repository: the kept
//! contacts of a delete (`bulk_kept`, format in `kept.rs`), the CRM
//! collections they go back to, and the audit entries that decide and record
//! it (CONTACT_RESTORE, one per delete and contact; the delete's own entries
//! moved off their key). MongoDB: `kept_restore_mongo.rs`; in memory, with
//! crash points: `kept_restore_mem.rs` (on [`super::MemCrm`]).

use async_trait::async_trait;
use bson::{oid::ObjectId, Document, RawDocumentBuf};
use futures::stream::BoxStream;

use crate::error::JobError;
use crate::model::JobRecord;

/// A kept contact as a restore reads it: the contact and the children its
/// bundle holds, byte for byte as they were.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptContact {
    /// The contact's `_id`.
    pub contact: ObjectId,
    /// The contact as it was.
    pub doc: RawDocumentBuf,
    /// Conversations the bundle holds.
    pub conversations: Vec<RawDocumentBuf>,
    /// Messages the bundle holds.
    pub messages: Vec<RawDocumentBuf>,
    /// Whether more of its children are kept apart ([`RestoreRepo::kept_apart`]).
    pub spilled: bool,
}

/// What a kept contact holds, without the documents (dry runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptSummary {
    /// The contact's `_id`.
    pub contact: ObjectId,
    /// Conversations its bundle holds.
    pub conversations: u64,
    /// Messages its bundle holds.
    pub messages: u64,
    /// Whether more of its children are kept apart.
    pub spilled: bool,
}

/// A kind of child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child {
    /// A conversation.
    Conversation,
    /// A message.
    Message,
}

/// Where documents go back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The job's contact collection (contacts or applications).
    Contacts,
    /// A kind of child's collection.
    Children(Child),
}

/// Children kept apart: (their contact, the child as it was).
pub type Apart = BoxStream<'static, Result<(ObjectId, RawDocumentBuf), JobError>>;

/// The restore's persistence. Kept documents never change, so every read of
/// them is repeatable; every write is idempotent (an insert whose `_id` exists
/// leaves it as it is, an entry whose key exists is not written again).
#[async_trait]
pub trait RestoreRepo: Send + Sync + 'static {
    /// How many contacts the delete `source` kept.
    async fn kept_total(&self, source: &str) -> Result<i64, JobError>;

    /// The next kept contacts of `source` after `after`, in `_id` order: at
    /// most `limit`, and about 8 MB.
    async fn kept_contacts(
        &self,
        source: &str,
        after: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<KeptContact>, JobError>;

    /// The same as summaries (counts from the bundles), `limit` at most.
    async fn kept_summaries(
        &self,
        source: &str,
        after: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<KeptSummary>, JobError>;

    /// The children of `kind` kept apart for the contacts of `source` in
    /// `(after, upto]`, in contact order.
    async fn kept_apart(
        &self,
        source: &str,
        kind: Child,
        after: Option<ObjectId>,
        upto: ObjectId,
    ) -> Result<Apart, JobError>;

    /// Which of `ids` exist in the job's contact collection (any organisation:
    /// an `_id` taken is taken).
    async fn taken(&self, job: &JobRecord, ids: &[ObjectId]) -> Result<Vec<ObjectId>, JobError>;

    /// Inserts documents as they are, unordered; one whose `_id` exists stays
    /// as it is. Returns how many were new.
    async fn put_back(
        &self,
        job: &JobRecord,
        target: Target,
        docs: Vec<RawDocumentBuf>,
    ) -> Result<u64, JobError>;

    /// Writes CONTACT_RESTORE entries (unique `bulkKey`); whether every one
    /// was new.
    async fn write_restores(&self, entries: &[Document]) -> Result<bool, JobError>;

    /// The CONTACT_RESTORE entries of `source` for `contacts`, whoever wrote
    /// them (`contactId`, `ownerId`, `createdAt`, `jobId`).
    async fn restores_of(
        &self,
        source: &str,
        contacts: &[ObjectId],
    ) -> Result<Vec<Document>, JobError>;

    /// Makes the entries of `source` for `contacts` that job `from` wrote the
    /// restore `job`'s (`adoptedFrom: from`).
    async fn adopt(
        &self,
        job: &JobRecord,
        source: &str,
        from: &str,
        contacts: &[ObjectId],
    ) -> Result<(), JobError>;

    /// Moves the delete `source`'s CONTACT_DELETE entries of `contacts` to a
    /// key of their own (a copy marked `restoredBy`, then the original
    /// removed), freeing the key a later delete takes.
    async fn release_deleted(
        &self,
        job: &JobRecord,
        source: &str,
        contacts: &[ObjectId],
    ) -> Result<(), JobError>;

    /// The contacts of the restore `job`'s entries beyond its checkpoint.
    async fn restored_after(&self, job: &JobRecord) -> Result<Vec<ObjectId>, JobError>;

    /// Removes the restore `job`'s entries of `contacts`.
    async fn withdraw_restores(
        &self,
        job: &JobRecord,
        contacts: &[ObjectId],
    ) -> Result<(), JobError>;
}

/// The unique key of a contact's CONTACT_RESTORE entry: one per delete and
/// contact, so whatever restore jobs of that delete run, none puts it back twice.
pub fn restore_key(source: &str, contact: ObjectId) -> String {
    format!("restore:{source}:{}", contact.to_hex())
}

/// The key a restored contact's CONTACT_DELETE entry keeps: unique (one entry
/// per delete and contact) and outside every delete's key range of the
/// organisation (`<orgId>:` … `<orgId>;`).
pub fn released_key(org: ObjectId, contact: ObjectId, source: &str) -> String {
    format!("released:{}:{}:{source}", org.to_hex(), contact.to_hex())
}
