//! What a delete keeps so that a restore can put it back: every contact it
//! removes, with its conversations and messages, as the raw BSON documents they
//! were (byte for byte), in one collection (`bulk_kept`) until the delete's
//! `restorableUntil`. The keeping itself is `keep.rs`; this is the format.
//!
//! One kept document per contact, its **bundle**:
//! `{_id: "<jobId>:c:<contactId>", orgId, jobId, contactId, expiresAt, doc,
//! conversations: [..], messages: [..], counts: {conversations, messages},
//! spilled}`: `doc` is the contact as it was, the arrays its children as they
//! were (up to [`EMBED_BYTES`] of them), `counts` their lengths. Children that
//! did not fit (a contact with very many), or that were kept after its bundle
//! (a batch redone after a crash, a child written during the delete), are kept
//! one document each, `{_id: "<jobId>:v:<contactId>:<id>"}` for a
//! conversation, `"<jobId>:m:<contactId>:<id>"` for a message, same fields and
//! `doc`; the bundle then says `spilled: true`. (Deletes before bundles kept
//! every child that way; a bundle without `spilled` is read as spilled.)
//!
//! The keys order the kept documents of a delete by contact, kind apart, so a
//! restore reads a batch of contacts, and their spilled children, as ranges of
//! the `_id` index, and a repeated keep of the same document is a duplicate
//! key, not a second copy. A child is in exactly one place: a bundle's array
//! or a document of its own (a keep that finds the bundle written already
//! keeps apart only what that bundle does not hold).

use bson::{
    doc, oid::ObjectId, rawdoc, Bson, DateTime, RawArrayBuf, RawBsonRef, RawDocument,
    RawDocumentBuf,
};
use mongodb::options::InsertManyOptions;
use mongodb::{Collection, Database};

use crate::error::JobError;
use crate::store::{is_duplicate_key, names};

/// Most bytes of children a bundle holds; the rest are kept one by one. Small
/// enough that a restore batch of bundles stays a few MB.
pub const EMBED_BYTES: usize = 32 * 1024;

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

/// The key of a child kept on its own (`kind`: a conversation or a message).
pub fn child_key(job_id: &str, kind: Kind, contact: ObjectId, id: RawBsonRef<'_>) -> String {
    format!(
        "{job_id}:{}:{}:{}",
        kind.tag(),
        contact.to_hex(),
        id_text(id)
    )
}

/// A document's `_id` as text (hex for an ObjectId), as keys name it.
pub fn id_text(id: RawBsonRef<'_>) -> String {
    match id {
        RawBsonRef::ObjectId(o) => o.to_hex(),
        RawBsonRef::String(s) => format!("s{s}"),
        other => format!("{:?}", Bson::try_from(other.to_raw_bson()).ok()),
    }
}

/// Where and until when a delete keeps what it removes.
#[derive(Debug, Clone, Copy)]
pub struct Keeper<'a> {
    /// The delete job.
    pub job_id: &'a str,
    /// Its organisation.
    pub org: ObjectId,
    /// Its `restorableUntil` (the TTL index's `expiresAt`).
    pub until: DateTime,
}

impl Keeper<'_> {
    /// A child (conversation or message) kept on its own.
    pub fn single(
        &self,
        kind: Kind,
        contact: ObjectId,
        original: RawDocumentBuf,
    ) -> Result<RawDocumentBuf, JobError> {
        let id = original
            .get("_id")
            .map_err(raw_err)?
            .ok_or_else(|| JobError::Internal("document without _id".into()))?;
        let key = child_key(self.job_id, kind, contact, id);
        Ok(rawdoc! {
            "_id": key,
            "orgId": self.org,
            "jobId": self.job_id,
            "contactId": contact,
            "expiresAt": self.until,
            "doc": original,
        })
    }

    /// A contact's bundle: the contact and the children given.
    pub fn bundle(
        &self,
        contact: ObjectId,
        original: RawDocumentBuf,
        conversations: Vec<RawDocumentBuf>,
        messages: Vec<RawDocumentBuf>,
        spilled: bool,
    ) -> RawDocumentBuf {
        let counts = (conversations.len() as i64, messages.len() as i64);
        let array = |docs: Vec<RawDocumentBuf>| {
            let mut a = RawArrayBuf::new();
            for d in docs {
                a.push(d);
            }
            a
        };
        rawdoc! {
            "_id": contact_key(self.job_id, contact),
            "orgId": self.org,
            "jobId": self.job_id,
            "contactId": contact,
            "expiresAt": self.until,
            "doc": original,
            "conversations": array(conversations),
            "messages": array(messages),
            "counts": {
                "conversations": counts.0,
                "messages": counts.1,
            },
            "spilled": spilled,
        }
    }
}

/// The contact a kept document belongs to.
pub fn contact_of(k: &RawDocument) -> Result<ObjectId, JobError> {
    k.get_object_id("contactId").map_err(raw_err)
}

/// The original document inside a kept one, as it was.
pub fn original(k: &RawDocument) -> Result<&RawDocument, JobError> {
    k.get_document("doc").map_err(raw_err)
}

/// The children of `kind` a bundle holds (none for a bundle of the format
/// before bundles).
pub fn embedded(k: &RawDocument, kind: Kind) -> Result<Vec<&RawDocument>, JobError> {
    let field = match kind {
        Kind::Conversation => "conversations",
        Kind::Message => "messages",
        Kind::Contact => return Ok(Vec::new()),
    };
    let Some(array) = k.get_array(field).ok() else {
        return Ok(Vec::new());
    };
    array
        .into_iter()
        .map(|v| match v.map_err(raw_err)? {
            RawBsonRef::Document(d) => Ok(d),
            _ => Err(JobError::Internal(format!("kept {field}: not a document"))),
        })
        .collect()
}

/// How many children of `kind` a bundle holds, from its `counts`.
pub fn embedded_count(k: &RawDocument, kind: Kind) -> u64 {
    let field = match kind {
        Kind::Conversation => "conversations",
        Kind::Message => "messages",
        Kind::Contact => return 0,
    };
    k.get_document("counts")
        .ok()
        .and_then(|c| c.get_i64(field).ok())
        .map_or(0, |n| u64::try_from(n).unwrap_or(0))
}

/// Whether some of the bundle's children are kept one by one (true for the
/// format before bundles, which kept them all that way).
pub fn spilled(k: &RawDocument) -> bool {
    k.get_bool("spilled").unwrap_or(true)
}

/// Inserts new documents unordered; returns the positions of those whose
/// `_id` exists already (left as they are).
pub async fn insert_new(
    coll: &Collection<RawDocumentBuf>,
    docs: &[RawDocumentBuf],
) -> Result<Vec<usize>, JobError> {
    if docs.is_empty() {
        return Ok(Vec::new());
    }
    let opts = InsertManyOptions::builder().ordered(false).build();
    match coll.insert_many(docs).with_options(opts).await {
        Ok(_) => Ok(Vec::new()),
        Err(e) if is_duplicate_key(&e) => match e.kind.as_ref() {
            mongodb::error::ErrorKind::InsertMany(m) => {
                Ok(m.write_errors.iter().flatten().map(|w| w.index).collect())
            }
            _ => Ok((0..docs.len()).collect()),
        },
        Err(e) => Err(e.into()),
    }
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

pub(crate) fn raw_err(e: impl std::fmt::Display) -> JobError {
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
