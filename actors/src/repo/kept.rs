//! What a delete keeps so that a restore can put it back: every contact it
//! removes, with its conversations and messages, as the raw BSON documents they
//! were (byte for byte), in one collection (`bulk_kept`) until the delete's
//! `restorableUntil`.
//!
//! A kept document is `{_id, orgId, jobId, contactId, expiresAt, doc}` where
//! `doc` is the original document, unchanged, and `_id` a string that orders
//! the kept documents of a delete by contact, kind apart:
//! `<jobId>:c:<contactId>` for the contact, `<jobId>:v:<contactId>:<id>` for a
//! conversation, `<jobId>:m:<contactId>:<id>` for a message. So a restore reads
//! a batch of contacts, and then each kind of their children, as one range of
//! the `_id` index, and a repeated keep of the same document (a batch redone
//! after a crash) is a duplicate key, not a second copy.

use bson::{doc, oid::ObjectId, rawdoc, Bson, DateTime, RawBsonRef, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::options::InsertManyOptions;
use mongodb::{Collection, Database};

use crate::error::JobError;
use crate::model::JobRecord;
use crate::store::{is_duplicate_key, names};

/// The kinds of kept document, by their tag in the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A contact (or application).
    Contact,
    /// One of its conversations.
    Conversation,
    /// One of its messages.
    Message,
}

impl Kind {
    fn tag(self) -> char {
        match self {
            Kind::Contact => 'c',
            Kind::Conversation => 'v',
            Kind::Message => 'm',
        }
    }
}

/// The kept-documents collection, raw.
pub fn collection(db: &Database) -> Collection<RawDocumentBuf> {
    db.collection(names::KEPT)
}

/// The key of a kept contact.
pub fn contact_key(job_id: &str, contact: ObjectId) -> String {
    format!("{job_id}:c:{}", contact.to_hex())
}

/// The key range `(after, upto]` of kept documents of `kind` whose contact is
/// in that range (`after`/`upto` `None`: from the first, to the last).
pub fn range(
    job_id: &str,
    kind: Kind,
    after: Option<ObjectId>,
    upto: Option<ObjectId>,
) -> bson::Document {
    let prefix = format!("{job_id}:{}:", kind.tag());
    // ';' sorts right after ':', so "<prefix><contact>;" bounds every key of
    // that contact (its own, and "<prefix><contact>:<child>").
    let lower = match after {
        Some(a) => doc! {"$gt": format!("{prefix}{};", a.to_hex())},
        None => doc! {"$gt": prefix.clone()},
    };
    let upper = match upto {
        Some(u) => format!("{prefix}{};", u.to_hex()),
        None => format!("{job_id}:{};", kind.tag()),
    };
    let mut r = lower;
    r.insert("$lt", upper);
    doc! {"_id": r}
}

fn child_key(job_id: &str, kind: Kind, contact: ObjectId, id: RawBsonRef<'_>) -> String {
    let id = match id {
        RawBsonRef::ObjectId(o) => o.to_hex(),
        RawBsonRef::String(s) => format!("s{s}"),
        other => format!("{:?}", Bson::try_from(other.to_raw_bson()).ok()),
    };
    format!("{job_id}:{}:{}:{id}", kind.tag(), contact.to_hex())
}

pub use super::crm::Kept;

/// Keeps the contacts `ids` of the delete `job` that still exist, with their
/// conversations and messages, before the batch deletes them: one read per
/// collection, one `insertMany` (unordered; a document kept by an earlier try
/// of the batch is a duplicate key and stays as first kept). Returns the ids
/// of the children kept, which are what the batch then deletes.
pub async fn keep(db: &Database, job: &JobRecord, ids: &[ObjectId]) -> Result<Kept, JobError> {
    let mut kept = Kept::default();
    if ids.is_empty() {
        return Ok(kept);
    }
    let until = job
        .restorable_until
        .ok_or_else(|| JobError::Internal("delete without restorableUntil keeps nothing".into()))?;
    let org = job.org_id;
    let raw = |name: &str| db.collection::<RawDocumentBuf>(name);
    let children = doc! {"orgId": org, "contactId": {"$in": ids}};
    let read = |coll: Collection<RawDocumentBuf>, filter: bson::Document| async move {
        coll.find(filter)
            .batch_size(10_000)
            .await?
            .try_collect::<Vec<RawDocumentBuf>>()
            .await
    };
    let (contacts, conversations, messages) = futures::try_join!(
        read(
            raw(job.filter.pipeline_type.collection()),
            doc! {"_id": {"$in": ids}, "orgId": org},
        ),
        read(raw(names::CONVERSATIONS), children.clone()),
        read(raw(names::MESSAGES), children),
    )?;
    let mut docs = Vec::with_capacity(contacts.len() + conversations.len() + messages.len());
    let job_id = job.job_id.as_str();
    for c in contacts {
        let id = c.get_object_id("_id").map_err(raw_err)?;
        docs.push(wrap(contact_key(job_id, id), org, job_id, id, until, c)?);
    }
    for (kind, list, out) in [
        (Kind::Conversation, conversations, &mut kept.conversations),
        (Kind::Message, messages, &mut kept.messages),
    ] {
        for d in list {
            let contact = d.get_object_id("contactId").map_err(raw_err)?;
            let id = d
                .get("_id")
                .map_err(raw_err)?
                .ok_or_else(|| JobError::Internal("document without _id".into()))?;
            out.push(Bson::try_from(id.to_raw_bson()).map_err(raw_err)?);
            let key = child_key(job_id, kind, contact, id);
            docs.push(wrap(key, org, job_id, contact, until, d)?);
        }
    }
    insert_raw(&collection(db), docs).await?;
    Ok(kept)
}

fn wrap(
    key: String,
    org: ObjectId,
    job_id: &str,
    contact: ObjectId,
    until: DateTime,
    original: RawDocumentBuf,
) -> Result<RawDocumentBuf, JobError> {
    Ok(rawdoc! {
        "_id": key,
        "orgId": org,
        "jobId": job_id,
        "contactId": contact,
        "expiresAt": until,
        "doc": original,
    })
}

/// Inserts raw documents unordered; those whose `_id` exists already are left
/// as they are. Returns how many were new.
pub async fn insert_raw(
    coll: &Collection<RawDocumentBuf>,
    docs: Vec<RawDocumentBuf>,
) -> Result<u64, JobError> {
    if docs.is_empty() {
        return Ok(0);
    }
    let n = docs.len() as u64;
    let opts = InsertManyOptions::builder().ordered(false).build();
    match coll.insert_many(docs).with_options(opts).await {
        Ok(r) => Ok(r.inserted_ids.len() as u64),
        Err(e) if is_duplicate_key(&e) => match e.kind.as_ref() {
            mongodb::error::ErrorKind::InsertMany(m) => {
                let dup = m.write_errors.as_ref().map_or(0, |w| w.len() as u64);
                Ok(n.saturating_sub(dup))
            }
            _ => Ok(0),
        },
        Err(e) => Err(e.into()),
    }
}

fn raw_err(e: impl std::fmt::Display) -> JobError {
    JobError::Internal(format!("kept document: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_contact_fall_in_its_range_and_no_other() {
        let job = "0b7c3f9e-1111-4222-8333-944455556666";
        let (a, b, c) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        let in_range = |key: &str, r: &bson::Document| {
            let r = r.get_document("_id").unwrap();
            key > r.get_str("$gt").unwrap() && key < r.get_str("$lt").unwrap()
        };
        let msg = ObjectId::new();
        let key = child_key(job, Kind::Message, b, RawBsonRef::ObjectId(msg));
        assert!(in_range(&key, &range(job, Kind::Message, Some(a), Some(b))));
        assert!(in_range(&key, &range(job, Kind::Message, None, None)));
        assert!(!in_range(
            &key,
            &range(job, Kind::Message, Some(b), Some(c))
        ));
        assert!(!in_range(&key, &range(job, Kind::Conversation, None, None)));
        let ck = contact_key(job, b);
        assert!(in_range(&ck, &range(job, Kind::Contact, Some(a), Some(b))));
        assert!(!in_range(&ck, &range(job, Kind::Contact, Some(b), None)));
        assert!(in_range(&ck, &range(job, Kind::Contact, None, Some(c))));
    }
}
