//! The keep step of a delete batch on MongoDB ([`super::KeptRepo::keep`];
//! `delete/cascade.rs` calls it before deleting the contacts): every contact
//! of the batch, with its conversations and messages, is kept in `bulk_kept`
//! (format: `kept.rs`), and each child is deleted right after it is known
//! kept. Nothing is deleted unkept.
//!
//! A batch is kept by slices of [`SLICE_CONTACTS`]. One pass over a slice
//! reads its contacts, then streams their children (two cursors side by
//! side). A contact's children are gathered into its bundle up to
//! [`EMBED_BYTES`]; the slice's bundles are written together when the stream
//! ends (one `insertMany`), then their children deleted by `_id`. Memory is
//! bounded whatever the data: a contact whose children outgrow its bundle, or
//! a slice whose gathered bytes outgrow [`BUFFER_BYTES`], has its bundle
//! written at once and its further children kept one by one in pages of
//! [`PAGE_DOCS`] (each page kept, then deleted).
//!
//! Crash discipline: a bundle or page is written before any child in it is
//! deleted, so a crash anywhere leaves every deleted child kept. A pass after a
//! crash (or a second pass for a child written meanwhile) finds its bundles
//! written already (a duplicate key): it then keeps apart only the children
//! that bundle does not hold, so no child is ever kept twice, and marks the
//! bundle `spilled`.

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;

use bson::{doc, oid::ObjectId, Bson, Document, RawBsonRef, RawDocumentBuf};
use futures::{StreamExt, TryStreamExt};
use mongodb::Database;

use super::crm::Pass;
use super::kept::{self, raw_err, Keeper, Kind, EMBED_BYTES};
use crate::error::JobError;
use crate::model::JobRecord;
use crate::store::names;

/// Most bytes of contacts and children gathered before bundles are written.
pub const BUFFER_BYTES: usize = 2 * 1024 * 1024;
/// Most children kept one by one per write (and deleted per delete).
pub const PAGE_DOCS: usize = 1000;
/// Most bytes of children kept one by one per write.
const PAGE_BYTES: usize = 2 * 1024 * 1024;
/// Most bundles per `insertMany`.
const BUNDLES_PER_WRITE: usize = SLICE_CONTACTS;

/// A contact of the pass.
enum Slot {
    /// Its bundle not written yet: what it will hold.
    Open(Gathered),
    /// Its bundle written; `held`: the children it holds when it was written
    /// before this pass (their id text), which are not kept again.
    Sealed { held: HashSet<String> },
}

#[derive(Default)]
struct Gathered {
    contact: RawDocumentBuf,
    conversations: Vec<RawDocumentBuf>,
    messages: Vec<RawDocumentBuf>,
    bytes: usize,
}

/// Children known kept, waiting to be deleted.
#[derive(Default)]
struct Doomed {
    conversations: Vec<Bson>,
    messages: Vec<Bson>,
}

impl Doomed {
    fn len(&self) -> u64 {
        (self.conversations.len() + self.messages.len()) as u64
    }

    fn push(&mut self, kind: Kind, id: Bson) {
        match kind {
            Kind::Message => self.messages.push(id),
            _ => self.conversations.push(id),
        }
    }
}

/// Keeps the contacts `ids` of the delete `job` that still exist, with their
/// conversations and messages, and deletes those children. The contacts
/// themselves are deleted by the caller once no child is left.
pub async fn keep(db: &Database, job: &JobRecord, ids: &[ObjectId]) -> Result<Pass, JobError> {
    // A batch is kept a slice of its contacts at a time: what one slice
    // gathers stays well under the buffer with ordinary contacts, so two
    // batches applied at once stay light; the buffer bounds the rest.
    let mut pass = Pass {
        left: Some(false),
        ..Pass::default()
    };
    for slice in ids.chunks(SLICE_CONTACTS) {
        let p = keep_slice(db, job, slice).await?;
        pass.contacts.extend(p.contacts);
        pass.conversations += p.conversations;
        pass.messages += p.messages;
        pass.left = Some(pass.left == Some(true) || p.left == Some(true));
    }
    Ok(pass)
}

/// Contacts kept together (one read of each collection, one bundle write).
pub const SLICE_CONTACTS: usize = 500;

/// Most children per reply of the keep's reads.
const CHILD_BATCH: u32 = 4000;

async fn keep_slice(db: &Database, job: &JobRecord, ids: &[ObjectId]) -> Result<Pass, JobError> {
    if ids.is_empty() {
        return Ok(Pass::default());
    }
    let until = job
        .restorable_until
        .ok_or_else(|| JobError::Internal("delete without restorableUntil keeps nothing".into()))?;
    let mut k = Keep {
        db,
        keeper: Keeper {
            job_id: &job.job_id,
            org: job.org_id,
            until,
        },
        slots: HashMap::with_capacity(ids.len()),
        buffered: 0,
        page: Vec::new(),
        page_bytes: 0,
        page_ids: Doomed::default(),
        deleted: 0,
        pass: Pass::default(),
    };
    for c in read_contacts(db, job, ids).await? {
        // Read by `_id` alone (see `read_children`): another organisation's
        // contact is neither kept nor, being absent from the pass, deleted.
        if !matches!(c.get("orgId"), Ok(Some(RawBsonRef::ObjectId(o))) if o == job.org_id) {
            continue;
        }
        let id = c.get_object_id("_id").map_err(raw_err)?;
        k.pass.contacts.push(id);
        k.buffered += c.as_bytes().len();
        let gathered = Gathered {
            contact: c,
            ..Gathered::default()
        };
        k.slots.insert(id, Slot::Open(gathered));
    }
    if k.buffered > BUFFER_BYTES {
        k.seal_open(true).await?;
    }
    let mut read = 0u64;
    let mut children = read_children(db, ids).await?;
    while let Some((kind, child)) = children.try_next().await? {
        read += 1;
        // Children are read by their contact alone (see `read_children`); one
        // that names another organisation is that organisation's, left alone.
        if !matches!(child.get("orgId"), Ok(Some(RawBsonRef::ObjectId(o))) if o == job.org_id) {
            continue;
        }
        k.child(kind, child).await?;
    }
    drop(children);
    crate::failpoint::pause(crate::failpoint::KEEP_AFTER_READ, &job.org_id.to_hex()).await;
    // Children written since the read (a CRM adding a message to a contact
    // being deleted) are found by counting the slice's children now, before
    // the rest of them is deleted: those still there and those deleted since
    // the read are more than the read saw. A count over live index entries
    // costs a fraction of a query run after the deletes, which walks every
    // key just deleted (measured on secantusd-rs: ~0.2 s of server CPU per
    // 1,000 contacts of 2 conversations × 3 messages, a quarter of a batch).
    // The caller then runs another pass, which keeps them.
    let now = count_children(db, ids).await?;
    k.pass.left = Some(now + k.deleted > read);
    k.seal_open(false).await?;
    k.flush_page().await?;
    Ok(k.pass)
}

struct Keep<'a> {
    db: &'a Database,
    keeper: Keeper<'a>,
    slots: HashMap<ObjectId, Slot>,
    /// Bytes gathered in open slots.
    buffered: usize,
    /// Children kept one by one, not written yet.
    page: Vec<RawDocumentBuf>,
    page_bytes: usize,
    /// Their ids, deleted once the page is written.
    page_ids: Doomed,
    /// Children of the slice deleted so far (all of them read by this pass).
    deleted: u64,
    pass: Pass,
}

impl Keep<'_> {
    async fn child(&mut self, kind: Kind, child: RawDocumentBuf) -> Result<(), JobError> {
        match kind {
            Kind::Message => self.pass.messages += 1,
            _ => self.pass.conversations += 1,
        }
        let contact = child.get_object_id("contactId").map_err(raw_err)?;
        let len = child.as_bytes().len();
        if let Some(Slot::Open(g)) = self.slots.get_mut(&contact) {
            if g.bytes + len <= EMBED_BYTES && self.buffered + len <= BUFFER_BYTES {
                match kind {
                    Kind::Message => g.messages.push(child),
                    _ => g.conversations.push(child),
                }
                g.bytes += len;
                self.buffered += len;
                return Ok(());
            }
            if g.bytes + len > EMBED_BYTES {
                // This contact's bundle is full: written now, the rest apart.
                self.seal(vec![contact], true).await?;
            } else {
                self.seal_open(true).await?;
            }
        }
        let id = child_id(&child)?;
        if let Some(Slot::Sealed { held }) = self.slots.get(&contact) {
            if held.contains(&kept::id_text(id_ref(&child)?)) {
                // Its bundle (written before this pass) holds it: only deleted.
                self.page_ids.push(kind, id);
                return self.flush_page_if_full().await;
            }
        }
        let single = self.keeper.single(kind, contact, child)?;
        self.page_bytes += single.as_bytes().len();
        self.page.push(single);
        self.page_ids.push(kind, id);
        self.flush_page_if_full().await
    }

    async fn flush_page_if_full(&mut self) -> Result<(), JobError> {
        let ids = self.page_ids.conversations.len() + self.page_ids.messages.len();
        if ids >= PAGE_DOCS || self.page_bytes >= PAGE_BYTES {
            self.flush_page().await?;
        }
        Ok(())
    }

    /// Writes the children kept one by one, then deletes them.
    async fn flush_page(&mut self) -> Result<(), JobError> {
        if self.page_ids.conversations.is_empty() && self.page_ids.messages.is_empty() {
            return Ok(());
        }
        let page = std::mem::take(&mut self.page);
        self.page_bytes = 0;
        write_singles(self.db, page).await?;
        crate::failpoint::hit("delete.spilled");
        let doomed = std::mem::take(&mut self.page_ids);
        self.deleted += doomed.len();
        delete_children(self.db, doomed).await
    }

    /// Writes the bundles of every open slot (`spilled`: more of their
    /// children may follow apart).
    async fn seal_open(&mut self, spilled: bool) -> Result<(), JobError> {
        let open: Vec<ObjectId> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Open(_)))
            .map(|(id, _)| *id)
            .collect();
        for chunk in open.chunks(BUNDLES_PER_WRITE) {
            self.seal(chunk.to_vec(), spilled).await?;
        }
        Ok(())
    }

    /// Writes the bundles of these open slots, then deletes the children they
    /// hold. A bundle written already (an earlier pass) is left as it is, and
    /// what it does not hold of the gathered children is kept apart.
    async fn seal(&mut self, contacts: Vec<ObjectId>, spilled: bool) -> Result<(), JobError> {
        // Each contact's gathered documents move into its bundle (one copy
        // of the batch at a time); the children's ids are kept aside.
        let mut sealed = Vec::with_capacity(contacts.len());
        let mut bundles = Vec::with_capacity(contacts.len());
        for id in contacts {
            let previous = self.slots.insert(
                id,
                Slot::Sealed {
                    held: HashSet::new(),
                },
            );
            let Some(Slot::Open(g)) = previous else {
                if let Some(previous) = previous {
                    self.slots.insert(id, previous);
                }
                continue;
            };
            self.buffered = self
                .buffered
                .saturating_sub(g.bytes + g.contact.as_bytes().len());
            let mut children = Vec::with_capacity(g.conversations.len() + g.messages.len());
            for c in &g.conversations {
                children.push((Kind::Conversation, child_id(c)?));
            }
            for c in &g.messages {
                children.push((Kind::Message, child_id(c)?));
            }
            sealed.push((id, children));
            bundles.push(
                self.keeper
                    .bundle(id, g.contact, g.conversations, g.messages, spilled),
            );
        }
        let taken = write_bundles(self.db, &bundles).await?;
        crate::failpoint::hit("delete.kept");
        let mut doomed = Doomed::default();
        let mut earlier: Vec<(ObjectId, RawDocumentBuf)> = Vec::new();
        for (i, ((id, children), bundle)) in sealed.into_iter().zip(bundles).enumerate() {
            if taken.contains(&i) {
                // Written before: what it holds must be known unless nothing
                // of this contact is left to keep.
                if spilled || !children.is_empty() {
                    earlier.push((id, bundle));
                }
                continue;
            }
            for (kind, child) in children {
                doomed.push(kind, child);
            }
        }
        self.deleted += doomed.len();
        delete_children(self.db, doomed).await?;
        if !earlier.is_empty() {
            self.reconcile(earlier).await?;
        }
        Ok(())
    }

    /// Bundles an earlier pass wrote, where this pass's bundles (`earlier`:
    /// what it gathered) were duplicates: what they hold is deleted, the rest
    /// of the gathered children is kept apart (and the bundle marked spilled).
    async fn reconcile(
        &mut self,
        earlier: Vec<(ObjectId, RawDocumentBuf)>,
    ) -> Result<(), JobError> {
        let keys: Vec<String> = earlier
            .iter()
            .map(|(id, _)| kept::contact_key(self.keeper.job_id, *id))
            .collect();
        let mut held: HashMap<ObjectId, (HashSet<String>, bool)> = HashMap::new();
        let mut cursor = kept::collection(self.db)
            .find(doc! {"_id": {"$in": &keys}})
            .await?;
        while let Some(b) = cursor.try_next().await? {
            let mut ids = HashSet::new();
            for kind in [Kind::Conversation, Kind::Message] {
                for c in kept::embedded(&b, kind)? {
                    if let Some(id) = c.get("_id").map_err(raw_err)? {
                        ids.insert(kept::id_text(id));
                    }
                }
            }
            held.insert(kept::contact_of(&b)?, (ids, kept::spilled(&b)));
        }
        let mut mark = Vec::new();
        for (id, gathered) in earlier {
            let (ids, mut spilled) = held.remove(&id).unwrap_or_default();
            for kind in [Kind::Conversation, Kind::Message] {
                for c in kept::embedded(&gathered, kind)? {
                    let c = c.to_raw_document_buf();
                    let bson_id = child_id(&c)?;
                    if ids.contains(&kept::id_text(id_ref(&c)?)) {
                        self.page_ids.push(kind, bson_id);
                        continue;
                    }
                    if !spilled {
                        mark.push(kept::contact_key(self.keeper.job_id, id));
                        spilled = true;
                    }
                    let single = self.keeper.single(kind, id, c)?;
                    self.page_bytes += single.as_bytes().len();
                    self.page.push(single);
                    self.page_ids.push(kind, bson_id);
                }
            }
            self.slots.insert(id, Slot::Sealed { held: ids });
        }
        if !mark.is_empty() {
            mark_spilled(self.db, mark).await?;
        }
        self.flush_page().await
    }
}

fn id_ref(d: &RawDocumentBuf) -> Result<RawBsonRef<'_>, JobError> {
    d.get("_id")
        .map_err(raw_err)?
        .ok_or_else(|| JobError::Internal("document without _id".into()))
}

fn child_id(d: &RawDocumentBuf) -> Result<Bson, JobError> {
    Bson::try_from(id_ref(d)?.to_raw_bson()).map_err(raw_err)
}

// The database calls of the keep, one small function each.

/// The batch's contacts that still exist, whole and raw.
async fn read_contacts(
    db: &Database,
    job: &JobRecord,
    ids: &[ObjectId],
) -> Result<Vec<RawDocumentBuf>, JobError> {
    // The whole slice in the first reply: one round trip.
    let batch = u32::try_from(ids.len()).unwrap_or(u32::MAX).max(1);
    Ok(db
        .collection::<RawDocumentBuf>(job.filter.pipeline_type.collection())
        .find(doc! {"_id": {"$in": ids}})
        .batch_size(batch)
        .await?
        .try_collect()
        .await?)
}

/// Their conversations and messages, streamed from both collections side by
/// side. The filter names the contacts only: the organisation is checked on
/// each document read (the caller does), because a second predicate beside
/// the indexed `contactId` made secantusd-rs spend 2–3× the CPU on the read
/// (17 against 7 ms for a slice's conversations, 45 against 14 ms for its
/// messages), and the whole documents are read anyway.
async fn read_children(
    db: &Database,
    ids: &[ObjectId],
) -> Result<impl futures::Stream<Item = Result<(Kind, RawDocumentBuf), JobError>> + Unpin, JobError>
{
    let filter = doc! {"contactId": {"$in": ids}};
    let (conversations_coll, messages_coll) = (
        db.collection::<RawDocumentBuf>(names::CONVERSATIONS),
        db.collection::<RawDocumentBuf>(names::MESSAGES),
    );
    // Replies of up to CHILD_BATCH documents (a few hundred KB of ordinary
    // children): a slice's children in one or two round trips.
    let (conversations, messages) = futures::try_join!(
        conversations_coll
            .find(filter.clone())
            .batch_size(CHILD_BATCH)
            .into_future(),
        messages_coll
            .find(filter)
            .batch_size(CHILD_BATCH)
            .into_future(),
    )?;
    let tag = |kind: Kind| {
        move |r: mongodb::error::Result<RawDocumentBuf>| {
            r.map(|d| (kind, d)).map_err(JobError::from)
        }
    };
    Ok(futures::stream::select(
        conversations.map(tag(Kind::Conversation)),
        messages.map(tag(Kind::Message)),
    ))
}

/// Conversations and messages of these contacts, of any organisation (as
/// `read_children` reads them), by the `count` command.
async fn count_children(db: &Database, ids: &[ObjectId]) -> Result<u64, JobError> {
    let filter = doc! {"contactId": {"$in": ids}};
    let (conversations, messages) = futures::try_join!(
        crate::snapshot::count(db, names::CONVERSATIONS, &filter, None, None),
        crate::snapshot::count(db, names::MESSAGES, &filter, None, None),
    )?;
    Ok(u64::try_from(conversations + messages).unwrap_or(0))
}

/// Writes bundles; the positions of those written before (duplicate keys).
async fn write_bundles(
    db: &Database,
    bundles: &[RawDocumentBuf],
) -> Result<HashSet<usize>, JobError> {
    Ok(kept::insert_new(&kept::collection(db), bundles)
        .await?
        .into_iter()
        .collect())
}

/// Writes children kept one by one (those written before stay as they are).
async fn write_singles(db: &Database, page: Vec<RawDocumentBuf>) -> Result<(), JobError> {
    kept::insert_raw(&kept::collection(db), page).await?;
    Ok(())
}

/// Marks bundles as having children kept apart.
async fn mark_spilled(db: &Database, keys: Vec<String>) -> Result<(), JobError> {
    kept::collection(db)
        .update_many(
            doc! {"_id": {"$in": keys}},
            doc! {"$set": {"spilled": true}},
        )
        .await?;
    Ok(())
}

/// Deletes kept children by `_id`, both collections side by side. The ids
/// are those of documents read with the organisation checked, and an `_id`
/// names one document: no second predicate is needed (nor paid for).
async fn delete_children(db: &Database, doomed: Doomed) -> Result<(), JobError> {
    let by_ids = |name: &str, ids: Vec<Bson>| {
        let coll = db.collection::<Document>(name);
        async move {
            if !ids.is_empty() {
                coll.delete_many(doc! {"_id": {"$in": ids}}).await?;
            }
            Ok::<_, JobError>(())
        }
    };
    futures::try_join!(
        by_ids(names::MESSAGES, doomed.messages),
        by_ids(names::CONVERSATIONS, doomed.conversations),
    )?;
    Ok(())
}
