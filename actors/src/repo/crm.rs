//! The CRM data a delete works on, behind typed repositories: contacts with
//! their conversations and messages, the audit log (`event_logs`), assignee
//! notifications, and what a delete keeps for restores (`bulk_kept`).
//!
//! Documents stay raw BSON (`Document`) where the step only carries them from
//! one collection to another (audit entries, kept copies): the repositories own
//! the queries, the filters' field paths and the duplicate-key rules, not the
//! documents' shape.

use std::sync::Arc;

use async_trait::async_trait;
use bson::{oid::ObjectId, Bson, DateTime, Document, RawDocumentBuf};
use futures::stream::BoxStream;

use crate::error::JobError;
use crate::model::JobRecord;

/// The most contact ids a notification lists; its `count` stays exact.
pub const NOTIFICATION_SAMPLE: i32 = 1000;

/// Ids read from a cursor, a batch at a time.
pub type IdStream = BoxStream<'static, Result<ObjectId, JobError>>;

/// Contacts (or applications) of a job's selection, with their children.
/// Every call is scoped to the job's organisation.
#[async_trait]
pub trait ContactRepo: Send + Sync + 'static {
    /// The `_id` bound of the job's selection frozen now (see
    /// [`crate::snapshot::bound`]).
    async fn bound(&self, job: &JobRecord) -> Result<ObjectId, JobError>;

    /// Documents of the selection with `_id <= bound`.
    async fn count(&self, job: &JobRecord, bound: ObjectId) -> Result<i64, JobError>;

    /// The ids of the selection in `(after, upto]`, in `_id` order, read
    /// `batch` at a time from one cursor.
    async fn ids(
        &self,
        job: &JobRecord,
        after: Option<ObjectId>,
        upto: ObjectId,
        batch: usize,
    ) -> Result<IdStream, JobError>;

    /// The selection's documents in `(after, upto]` as they are now, with what
    /// an audit entry keeps of them (`_id`, names, email, phone, `ownerId`).
    async fn read_range(
        &self,
        job: &JobRecord,
        after: Option<ObjectId>,
        upto: ObjectId,
    ) -> Result<Vec<Document>, JobError>;

    /// Which of `ids` exist (in the job's organisation and collection).
    async fn present(&self, job: &JobRecord, ids: &[ObjectId]) -> Result<Vec<ObjectId>, JobError>;

    /// Deletes the contacts `ids` (idempotent).
    async fn delete(&self, job: &JobRecord, ids: &[ObjectId]) -> Result<u64, JobError>;

    /// Conversations and messages of the contacts `ids`.
    async fn count_children(&self, org: ObjectId, ids: &[ObjectId])
        -> Result<(u64, u64), JobError>;

    /// Deletes every conversation and message of the contacts `ids`.
    async fn delete_children_of(&self, org: ObjectId, ids: &[ObjectId]) -> Result<(), JobError>;

    /// Deletes these conversations and messages by `_id`.
    async fn delete_children(
        &self,
        org: ObjectId,
        conversations: &[Bson],
        messages: &[Bson],
    ) -> Result<(), JobError>;

    /// Whether any conversation or message of the contacts `ids` is left.
    async fn children_left(&self, org: ObjectId, ids: &[ObjectId]) -> Result<bool, JobError>;
}

/// What a batch carries of a contact's audit entry once it is written: who
/// gets notified and what `contact_removed` (or `contact_restored`) says.
/// A few words per contact, where the entry itself as a `Document` costs
/// about 2 KB of small allocations (three batches of them were half a
/// delete's peak memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The contact.
    pub contact: ObjectId,
    /// Its assignee.
    pub owner: Option<ObjectId>,
    /// When it was decided (`createdAt`).
    pub at: DateTime,
}

impl Decision {
    /// From an audit entry (`contactId`, `ownerId`, `createdAt`); `None`
    /// without a `contactId`.
    pub fn of(entry: &Document) -> Option<Decision> {
        Some(Decision {
            contact: entry.get_object_id("contactId").ok()?,
            owner: entry.get_object_id("ownerId").ok(),
            at: entry
                .get_datetime("createdAt")
                .copied()
                .unwrap_or_else(|_| DateTime::now()),
        })
    }
}

/// The bulk-delete entries of the audit log: one per contact (`bulkKey`
/// `<orgId>:<contactId>`, unique), the decision that it goes.
#[async_trait]
pub trait AuditRepo: Send + Sync + 'static {
    /// Writes these entries (raw: one allocation each). `true` when every one
    /// was new (they are the batch's record as they stand); `false` when some
    /// existed already (another job's decision, or this job's before a
    /// failure): read them back with [`AuditRepo::recorded`].
    async fn decide(&self, entries: Vec<RawDocumentBuf>) -> Result<bool, JobError>;

    /// This job's entries for contacts in `(after, upto]` (`upto` `None`: to
    /// the end), in contact order.
    async fn recorded(
        &self,
        job: &JobRecord,
        after: Option<ObjectId>,
        upto: Option<ObjectId>,
    ) -> Result<Vec<Decision>, JobError>;

    /// The contacts of this job's entries after `after`, in order.
    async fn decided_after(
        &self,
        job: &JobRecord,
        after: Option<ObjectId>,
    ) -> Result<IdStream, JobError>;

    /// Removes this job's entries of these contacts (decisions given back).
    async fn withdraw(&self, job: &JobRecord, contacts: &[ObjectId]) -> Result<(), JobError>;
}

/// One notification per assignee and job.
#[async_trait]
pub trait NotificationRepo: Send + Sync + 'static {
    /// Adds a batch (its highest id `upto`) of `contacts` to the notification
    /// of `owner` for `job` (`kind`: `contacts_removed`, `contacts_restored`),
    /// listing them when `list` (the sample is not full yet). A batch already
    /// added (`lastBatch >= upto`) adds nothing.
    async fn add(
        &self,
        job: &JobRecord,
        kind: &'static str,
        owner: ObjectId,
        upto: ObjectId,
        contacts: &[ObjectId],
        list: bool,
    ) -> Result<(), JobError>;
}

/// What one keep pass of a batch kept and deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// The contacts kept (now or by an earlier pass), to be deleted next.
    pub contacts: Vec<ObjectId>,
    /// Conversations kept (now or by an earlier pass) and deleted.
    pub conversations: u64,
    /// Messages kept (now or by an earlier pass) and deleted.
    pub messages: u64,
    /// Whether children of these contacts are left (written since the pass
    /// read them), when the pass knows; `None`: ask
    /// [`ContactRepo::children_left`].
    pub left: Option<bool>,
}

/// What deletes keep for restores.
#[async_trait]
pub trait KeptRepo: Send + Sync + 'static {
    /// Keeps the contacts `ids` of the delete `job` that still exist, with
    /// their conversations and messages, byte for byte (a document kept
    /// before stays as first kept, and is kept once), and deletes each child
    /// once it is known kept. The contacts themselves are left for the caller
    /// to delete (those of [`Pass::contacts`]).
    async fn keep(&self, job: &JobRecord, ids: &[ObjectId]) -> Result<Pass, JobError>;

    /// Conversations and messages the delete `job_id` kept for its contacts
    /// in `(after, upto]`: what that batch deleted, whatever crashes it took.
    async fn kept_children(
        &self,
        job_id: &str,
        after: Option<ObjectId>,
        upto: ObjectId,
    ) -> Result<(u64, u64), JobError>;

    /// Puts back the kept conversations and messages of the contacts `ids`
    /// of the delete `job` (contacts that still exist: a batch given back
    /// after its keep had deleted their children), byte for byte; a child
    /// whose `_id` exists stays as it is. Returns how many were put back.
    async fn put_back_children(
        &self,
        job: &JobRecord,
        ids: &[ObjectId],
    ) -> Result<(u64, u64), JobError>;
}

/// The repositories of a delete, together.
#[derive(Clone)]
pub struct Crm {
    /// Contacts and their children.
    pub contacts: Arc<dyn ContactRepo>,
    /// Bulk-delete audit entries.
    pub audit: Arc<dyn AuditRepo>,
    /// Assignee notifications.
    pub notifications: Arc<dyn NotificationRepo>,
    /// Kept documents.
    pub kept: Arc<dyn KeptRepo>,
    /// What a restore reads and writes.
    pub restore: Arc<dyn super::RestoreRepo>,
}

impl Crm {
    /// All of them on one implementation (MongoDB, or the in-memory fake).
    pub fn of<R>(repo: Arc<R>) -> Crm
    where
        R: ContactRepo + AuditRepo + NotificationRepo + KeptRepo + super::RestoreRepo,
    {
        Crm {
            contacts: repo.clone(),
            audit: repo.clone(),
            notifications: repo.clone(),
            kept: repo.clone(),
            restore: repo,
        }
    }
}
