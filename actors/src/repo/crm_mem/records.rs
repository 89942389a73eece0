//! The fake's audit entries, notifications and kept documents (the CRM side
//! of a delete besides the contacts), split from `crm_mem.rs` for length.

use super::*;

#[async_trait]
impl AuditRepo for MemCrm {
    async fn decide(&self, entries: Vec<RawDocumentBuf>) -> Result<bool, JobError> {
        let entries: Vec<Document> = entries
            .iter()
            .map(|e| e.to_document())
            .collect::<Result<_, _>>()
            .map_err(|e| JobError::Internal(format!("raw: {e}")))?;
        self.guarded("decide", |d| {
            let mut all_new = true;
            for e in entries {
                let key = e.get_str("bulkKey").unwrap_or_default().to_string();
                match d.audits.entry(key) {
                    Entry::Occupied(_) => all_new = false,
                    Entry::Vacant(v) => {
                        v.insert(e);
                    }
                }
            }
            all_new
        })
    }

    async fn recorded(
        &self,
        job: &JobRecord,
        after: Option<ObjectId>,
        upto: Option<ObjectId>,
    ) -> Result<Vec<Decision>, JobError> {
        self.guarded("recorded", |d| {
            own_entries(d, job, after, upto)
                .iter()
                .filter_map(Decision::of)
                .collect()
        })
    }

    async fn decided_after(
        &self,
        job: &JobRecord,
        after: Option<ObjectId>,
    ) -> Result<IdStream, JobError> {
        let ids: Vec<ObjectId> = self.guarded("decided_after", |d| {
            own_entries(d, job, after, None)
                .iter()
                .filter_map(|a| a.get_object_id("contactId").ok())
                .collect()
        })?;
        Ok(futures::stream::iter(ids.into_iter().map(Ok)).boxed())
    }

    async fn withdraw(&self, job: &JobRecord, contacts: &[ObjectId]) -> Result<(), JobError> {
        self.guarded("withdraw", |d| {
            for c in contacts {
                let key = audit_key(job.org_id, *c);
                if d.audits
                    .get(&key)
                    .is_some_and(|a| a.get_str("jobId").ok() == Some(job.job_id.as_str()))
                {
                    d.audits.remove(&key);
                }
            }
        })
    }
}

#[async_trait]
impl NotificationRepo for MemCrm {
    async fn add(
        &self,
        job: &JobRecord,
        _kind: &'static str,
        owner: ObjectId,
        upto: ObjectId,
        contacts: &[ObjectId],
        list: bool,
    ) -> Result<(), JobError> {
        let key = format!("{}:{}", job.job_id, owner.to_hex());
        self.guarded("add", |d| {
            let note = d.notes.entry(key).or_default();
            if note.last_batch.is_some_and(|l| l >= upto) {
                return;
            }
            note.last_batch = Some(upto);
            note.count += contacts.len() as i64;
            if list {
                note.contact_ids.extend_from_slice(contacts);
                note.contact_ids
                    .truncate(crate::repo::crm::NOTIFICATION_SAMPLE as usize);
            }
        })
    }
}

#[async_trait]
impl KeptRepo for MemCrm {
    async fn keep(
        &self,
        job: &JobRecord,
        ids: &[ObjectId],
    ) -> Result<crate::repo::crm::Pass, JobError> {
        if !ids.is_empty() && job.restorable_until.is_none() {
            return Err(JobError::Internal(
                "delete without restorableUntil keeps nothing".into(),
            ));
        }
        let coll = job.filter.pipeline_type.collection().to_string();
        let job_id = job.job_id.clone();
        // Kept first (each document once: the first copy stays) ...
        let (pass, conversations, messages) = self.guarded("keep", |d| {
            let mut pass = crate::repo::crm::Pass::default();
            let (mut conversations, mut messages) = (Vec::new(), Vec::new());
            let mut copies = Vec::new();
            for id in ids {
                if let Some(c) = d.contacts.get(&(coll.clone(), *id)) {
                    copies.push(((job_id.clone(), 'c', *id, None), c.clone()));
                    pass.contacts.push(*id);
                }
            }
            for (tag, m, out) in [
                ('v', &d.conversations, &mut conversations),
                ('m', &d.messages, &mut messages),
            ] {
                for (child, doc) in children_of(m, job.org_id, ids) {
                    let Ok(contact) = doc.get_object_id("contactId") else {
                        continue;
                    };
                    out.push(Bson::ObjectId(*child));
                    copies.push(((job_id.clone(), tag, contact, Some(*child)), doc.clone()));
                }
            }
            for (key, doc) in copies {
                d.kept.entry(key).or_insert(doc);
            }
            pass.conversations = conversations.len() as u64;
            pass.messages = messages.len() as u64;
            (pass, conversations, messages)
        })?;
        // ... then exactly what was kept is deleted.
        ContactRepo::delete_children(self, job.org_id, &conversations, &messages).await?;
        Ok(pass)
    }

    async fn kept_children(
        &self,
        job_id: &str,
        after: Option<ObjectId>,
        upto: ObjectId,
    ) -> Result<(u64, u64), JobError> {
        self.guarded("kept_children", |d| {
            let (mut conversations, mut messages) = (0, 0);
            for (j, tag, contact, child) in d.kept.keys() {
                if j != job_id || child.is_none() || *contact > upto {
                    continue;
                }
                if after.is_some_and(|a| *contact <= a) {
                    continue;
                }
                match tag {
                    'v' => conversations += 1,
                    _ => messages += 1,
                }
            }
            (conversations, messages)
        })
    }

    async fn put_back_children(
        &self,
        job: &JobRecord,
        ids: &[ObjectId],
    ) -> Result<(u64, u64), JobError> {
        let wanted: std::collections::BTreeSet<ObjectId> = ids.iter().copied().collect();
        self.guarded("put_back_children", |d| {
            let (mut conversations, mut messages) = (0, 0);
            let kept: Vec<_> = d
                .kept
                .iter()
                .filter(|((j, _, contact, child), _)| {
                    *j == job.job_id && child.is_some() && wanted.contains(contact)
                })
                .map(|((_, tag, _, child), doc)| (*tag, *child, doc.clone()))
                .collect();
            for (tag, child, doc) in kept {
                let Some(child) = child else { continue };
                let (map, n) = match tag {
                    'v' => (&mut d.conversations, &mut conversations),
                    _ => (&mut d.messages, &mut messages),
                };
                if let std::collections::btree_map::Entry::Vacant(v) = map.entry(child) {
                    v.insert(doc);
                    *n += 1;
                }
            }
            (conversations, messages)
        })
    }
}
