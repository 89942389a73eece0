//! What a delete kept, read back on MongoDB: a batch's kept children counted
//! (`KeptRepo::kept_children`) and put back (`KeptRepo::put_back_children`),
//! for the delete's counts after a crash and the give-back of a failed batch.
//! The keep itself is `keep.rs`; the format is `kept.rs`.

use bson::{doc, oid::ObjectId, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::Database;

use super::kept::{self, Kind};
use crate::error::JobError;
use crate::model::JobRecord;
use crate::store::names;

/// The conversations and messages a delete kept for its contacts in
/// `(after, upto]`: those its bundles hold and those kept apart. Each child
/// is kept once, so this is what the batch deleted, whatever crashes it took.
pub async fn kept_children(
    db: &Database,
    job_id: &str,
    after: Option<ObjectId>,
    upto: ObjectId,
) -> Result<(u64, u64), JobError> {
    let mut embedded = kept::collection(db)
        .find(kept::range(job_id, Kind::Contact, after, Some(upto)))
        .projection(doc! {"counts": 1})
        .await?;
    let (mut conversations, mut messages) = (0u64, 0u64);
    while let Some(b) = embedded.try_next().await? {
        conversations += kept::embedded_count(&b, Kind::Conversation);
        messages += kept::embedded_count(&b, Kind::Message);
    }
    let apart = |kind: Kind| {
        let range = kept::range(job_id, kind, after, Some(upto));
        async move { crate::snapshot::count(db, names::KEPT, &range, None, None).await }
    };
    let (v, m) = futures::try_join!(apart(Kind::Conversation), apart(Kind::Message))?;
    let non_negative = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok((conversations + non_negative(v), messages + non_negative(m)))
}

/// [`super::crm::KeptRepo::put_back_children`] on MongoDB: the bundles of
/// the contacts (one `$in` read per 1,000; a contact without a bundle lost
/// nothing, as a bundle is written before any of its children is deleted),
/// the children they hold, then those kept apart for spilled bundles (read
/// by pages of the `_id` index); inserted unordered (an `_id` that exists
/// stays as it is), conversations before messages. Idempotent, so a
/// give-back that crashes half way is simply done again.
pub async fn put_back_children(
    db: &Database,
    job: &JobRecord,
    ids: &[ObjectId],
) -> Result<(u64, u64), JobError> {
    let coll = kept::collection(db);
    let targets = [
        (
            Kind::Conversation,
            'v',
            db.collection::<RawDocumentBuf>(names::CONVERSATIONS),
        ),
        (
            Kind::Message,
            'm',
            db.collection::<RawDocumentBuf>(names::MESSAGES),
        ),
    ];
    let mut put = [0u64, 0u64];
    for chunk in ids.chunks(1000) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|c| kept::contact_key(&job.job_id, *c))
            .collect();
        let bundles: Vec<RawDocumentBuf> = coll
            .find(doc! {"_id": {"$in": keys}})
            .await?
            .try_collect()
            .await?;
        for (n, (kind, tag, target)) in targets.iter().enumerate() {
            let mut page = Vec::new();
            for b in &bundles {
                for d in kept::embedded(b, *kind)? {
                    page.push(d.to_raw_document_buf());
                    if page.len() == 1000 {
                        put[n] += kept::insert_raw(target, std::mem::take(&mut page)).await?;
                    }
                }
            }
            put[n] += kept::insert_raw(target, std::mem::take(&mut page)).await?;
            for b in bundles.iter().filter(|b| kept::spilled(b)) {
                let contact = kept::contact_of(b)?;
                let prefix = format!("{}:{tag}:{}", job.job_id, contact.to_hex());
                let filter =
                    doc! {"_id": {"$gt": format!("{prefix}:"), "$lt": format!("{prefix};")}};
                let mut cursor = coll.find(filter).sort(doc! {"_id": 1}).await?;
                while let Some(k) = cursor.try_next().await? {
                    page.push(kept::original(&k)?.to_raw_document_buf());
                    if page.len() == 1000 {
                        put[n] += kept::insert_raw(target, std::mem::take(&mut page)).await?;
                    }
                }
                put[n] += kept::insert_raw(target, std::mem::take(&mut page)).await?;
            }
        }
    }
    Ok((put[0], put[1]))
}
