//! Where a delete batch's server CPU goes: each query the delete job sends
//! for one batch of 1,000 contacts, run alone (reads repeated, writes on a
//! fresh batch each), with the server's and this process's CPU seconds.
//! `cargo run --release -p contact-bulk-testkit --example delete_probe -- 20000`.

use std::time::Instant;

use bson::{doc, oid::ObjectId, Document, RawDocumentBuf};
use contact_bulk_testkit::bench::cpu::{measure, CpuProbe};
use futures::TryStreamExt;

async fn drain(coll: &mongodb::Collection<RawDocumentBuf>, q: Document) -> anyhow::Result<u64> {
    let mut c = coll.find(q).batch_size(10_000).await?;
    let mut n = 0;
    while c.advance().await? {
        n += 1;
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let contacts: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let (h, org, ids) = contact_bulk_testkit::bench::delete::probe_org(contacts).await?;
    let cpu = CpuProbe::new(h.dir(), std::process::id());
    let raw = |name: &str| h.db.collection::<RawDocumentBuf>(name);
    let batches: Vec<&[ObjectId]> = ids.chunks(1000).collect();
    let b = batches[batches.len() / 2];
    let indexes = h.db.run_command(doc! {"listIndexes": "messages"}).await?;
    println!("messages indexes: {indexes}");
    for round in 0..3 {
        if round == 2 {
            for coll in ["conversations", "messages"] {
                let t = Instant::now();
                h.db.collection::<Document>(coll)
                    .create_index(
                        mongodb::IndexModel::builder()
                            .keys(doc! {"contactId": 1, "orgId": 1})
                            .build(),
                    )
                    .await?;
                println!(
                    "index {{contactId, orgId}} on {coll} in {:.2} s",
                    t.elapsed().as_secs_f64()
                );
            }
        }
        println!("-- round {round} (reads of one batch of {})", b.len());
        measure(
            &cpu,
            "contacts {_id $in, orgId}",
            drain(&raw("contacts"), doc! {"_id": {"$in": b}, "orgId": org}),
        )
        .await?;
        for coll in ["conversations", "messages"] {
            measure(
                &cpu,
                &format!("{coll} {{orgId, contactId $in}}"),
                drain(&raw(coll), doc! {"orgId": org, "contactId": {"$in": b}}),
            )
            .await?;
            measure(
                &cpu,
                &format!("{coll} {{contactId $in, orgId}}"),
                drain(&raw(coll), doc! {"contactId": {"$in": b}, "orgId": org}),
            )
            .await?;
            measure(
                &cpu,
                &format!("{coll} {{contactId $in}}"),
                drain(&raw(coll), doc! {"contactId": {"$in": b}}),
            )
            .await?;
            measure(
                &cpu,
                &format!("{coll} find_one {{orgId, contactId $in}}"),
                async {
                    Ok(raw(coll)
                        .find_one(doc! {"orgId": org, "contactId": {"$in": b}})
                        .await?
                        .map_or(0, |_| 1))
                },
            )
            .await?;
            measure(
                &cpu,
                &format!("{coll} find_one {{contactId $in, orgId}}"),
                async {
                    Ok(raw(coll)
                        .find_one(doc! {"contactId": {"$in": b}, "orgId": org})
                        .await?
                        .map_or(0, |_| 1))
                },
            )
            .await?;
        }
    }
    // Writes, each on a batch of its own.
    let mut rest = batches.iter().skip(1);
    for how in ["{orgId, contactId $in}", "{contactId $in, orgId}"] {
        let Some(b) = rest.next() else { break };
        let filter = match how {
            "{orgId, contactId $in}" => doc! {"orgId": org, "contactId": {"$in": *b}},
            _ => doc! {"contactId": {"$in": *b}, "orgId": org},
        };
        for coll in ["messages", "conversations"] {
            let f = filter.clone();
            measure(&cpu, &format!("delete_many {coll} {how}"), async {
                Ok(h.db
                    .collection::<Document>(coll)
                    .delete_many(f)
                    .await?
                    .deleted_count)
            })
            .await?;
        }
        measure(&cpu, "delete_many contacts {_id $in, orgId}", async {
            Ok(h.db
                .collection::<Document>("contacts")
                .delete_many(doc! {"_id": {"$in": *b}, "orgId": org})
                .await?
                .deleted_count)
        })
        .await?;
    }
    if let Some(b) = rest.next() {
        let ids = message_ids(&raw("messages"), b).await?;
        measure(&cpu, "delete_many messages {_id $in, orgId}", async {
            Ok(h.db
                .collection::<Document>("messages")
                .delete_many(doc! {"_id": {"$in": &ids}, "orgId": org})
                .await?
                .deleted_count)
        })
        .await?;
    }
    if let Some(b) = rest.next() {
        let ids = message_ids(&raw("messages"), b).await?;
        measure(&cpu, "delete_many messages {_id $in}", async {
            Ok(h.db
                .collection::<Document>("messages")
                .delete_many(doc! {"_id": {"$in": &ids}})
                .await?
                .deleted_count)
        })
        .await?;
        measure(&cpu, "delete_many contacts {_id $in}", async {
            Ok(h.db
                .collection::<Document>("contacts")
                .delete_many(doc! {"_id": {"$in": *b}})
                .await?
                .deleted_count)
        })
        .await?;
        measure(
            &cpu,
            "find messages {contactId $in} after delete",
            drain(&raw("messages"), doc! {"contactId": {"$in": *b}}),
        )
        .await?;
        measure(
            &cpu,
            "find messages {orgId, contactId $in} after delete",
            drain(
                &raw("messages"),
                doc! {"orgId": org, "contactId": {"$in": *b}},
            ),
        )
        .await?;
    }
    if let Some(b) = rest.next() {
        let docs: Vec<RawDocumentBuf> = raw("messages")
            .find(doc! {"contactId": {"$in": *b}})
            .await?
            .try_collect()
            .await?;
        let bundles: Vec<RawDocumentBuf> = docs
            .chunks(6)
            .map(|c| {
                let mut arr = bson::RawArrayBuf::new();
                for d in c {
                    arr.push(d.clone());
                }
                let mut d = RawDocumentBuf::new();
                d.append("_id", ObjectId::new().to_hex());
                d.append("children", arr);
                d
            })
            .collect();
        measure(&cpu, "insert_many 1000 bundles of 6 messages", async {
            Ok(h.db
                .collection::<RawDocumentBuf>("bulk_kept_probe")
                .insert_many(bundles)
                .await?
                .inserted_ids
                .len() as u64)
        })
        .await?;
    }
    if let Some(b) = rest.next() {
        let entries: Vec<Document> = b.iter().map(|c| doc! {"_id": ObjectId::new(), "orgId": org, "bulkKey": format!("{org}:{c}"), "type": "CONTACT_DELETE", "contactId": c}).collect();
        measure(&cpu, "insert_many 1000 audit entries", async {
            Ok(h.db
                .collection::<Document>("event_logs")
                .insert_many(entries)
                .await?
                .inserted_ids
                .len() as u64)
        })
        .await?;
    }
    // A delete's notification upsert, as the job sends it (one per assignee
    // and batch), against one keyed by `_id`; 2,000 prior notifications.
    let notes = h.db.collection::<Document>("notifications");
    let prior: Vec<Document> = (0..2000)
        .map(|i| doc! {"bulkKey": format!("old:{i}"), "userId": ObjectId::new(), "count": 1i64})
        .collect();
    notes.insert_many(prior).await?;
    for round in 0..2 {
        let key = format!("job{round}:owner");
        for by in ["bulkKey", "_id"] {
            let what = format!("200 upserts {{{by}: key, lastBatch $not $gte}}");
            measure(&cpu, &what, async {
                for n in 0..200i64 {
                    notes
                        .update_one(
                            doc! {by: &key, "lastBatch": {"$not": {"$gte": n}}},
                            doc! {"$set": {"lastBatch": n}, "$inc": {"count": 1i64}},
                        )
                        .upsert(true)
                        .await?;
                }
                Ok(200)
            })
            .await?;
        }
    }
    Ok(())
}

/// The `_id`s of the messages of these contacts.
async fn message_ids(
    messages: &mongodb::Collection<RawDocumentBuf>,
    contacts: &[ObjectId],
) -> anyhow::Result<Vec<ObjectId>> {
    Ok(messages
        .find(doc! {"contactId": {"$in": contacts}})
        .projection(doc! {"_id": 1})
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .iter()
        .filter_map(|d| d.get_object_id("_id").ok())
        .collect())
}
