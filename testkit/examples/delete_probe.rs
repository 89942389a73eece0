//! Where a delete batch's server CPU goes: each query the delete job sends
//! for one batch of 1,000 contacts, run alone (reads repeated, writes on a
//! fresh batch each), with the server's and this process's CPU seconds.
//! `cargo run --release -p contact-bulk-testkit --example delete_probe -- 20000`.

use std::time::Instant;

use bson::{doc, oid::ObjectId, Document, RawDocumentBuf};
use contact_bulk_testkit::bench::cpu::CpuProbe;
use contact_bulk_testkit::bench::{Common, Harness};
use contact_bulk_testkit::seed::{seed_org, SeedSpec};
use futures::TryStreamExt;

async fn probe<F: std::future::Future<Output = anyhow::Result<u64>>>(
    cpu: &CpuProbe,
    what: &str,
    f: F,
) -> anyhow::Result<()> {
    let before = cpu.sample();
    let t = Instant::now();
    let n = f.await?;
    let wall = t.elapsed();
    println!(
        "{what:<56} n={n:<6} wall {:.3} s  cpu {}",
        wall.as_secs_f64(),
        cpu.sample().json_since(&before)
    );
    Ok(())
}

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
    let common = Common {
        data_dir: None,
        keep: false,
    };
    let h = Harness::start(&common).await?;
    contact_bulk_actors::store::ensure_indexes(&h.db).await?;
    let spec = SeedSpec {
        contacts,
        conversation_every: 1,
        conversations_per_contact: 2,
        messages_per_conversation: 3,
        ..SeedSpec::demo()
    };
    let org = seed_org(&h.db, ObjectId::new(), &spec).await?.org_id;
    let cpu = CpuProbe::new(h.dir(), std::process::id());
    let raw = |name: &str| h.db.collection::<RawDocumentBuf>(name);
    let ids: Vec<ObjectId> =
        h.db.collection::<Document>("contacts")
            .find(doc! {"orgId": org})
            .sort(doc! {"_id": 1})
            .projection(doc! {"_id": 1})
            .await?
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .collect();
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
        probe(
            &cpu,
            "contacts {_id $in, orgId}",
            drain(&raw("contacts"), doc! {"_id": {"$in": b}, "orgId": org}),
        )
        .await?;
        for coll in ["conversations", "messages"] {
            probe(
                &cpu,
                &format!("{coll} {{orgId, contactId $in}}"),
                drain(&raw(coll), doc! {"orgId": org, "contactId": {"$in": b}}),
            )
            .await?;
            probe(
                &cpu,
                &format!("{coll} {{contactId $in, orgId}}"),
                drain(&raw(coll), doc! {"contactId": {"$in": b}, "orgId": org}),
            )
            .await?;
            probe(
                &cpu,
                &format!("{coll} {{contactId $in}}"),
                drain(&raw(coll), doc! {"contactId": {"$in": b}}),
            )
            .await?;
            probe(
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
            probe(
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
            probe(&cpu, &format!("delete_many {coll} {how}"), async {
                Ok(h.db
                    .collection::<Document>(coll)
                    .delete_many(f)
                    .await?
                    .deleted_count)
            })
            .await?;
        }
        probe(&cpu, "delete_many contacts {_id $in, orgId}", async {
            Ok(h.db
                .collection::<Document>("contacts")
                .delete_many(doc! {"_id": {"$in": *b}, "orgId": org})
                .await?
                .deleted_count)
        })
        .await?;
    }
    if let Some(b) = rest.next() {
        let ids: Vec<ObjectId> = raw("messages")
            .find(doc! {"contactId": {"$in": *b}})
            .projection(doc! {"_id": 1})
            .await?
            .try_collect::<Vec<_>>()
            .await?
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .collect();
        probe(&cpu, "delete_many messages {_id $in, orgId}", async {
            Ok(h.db
                .collection::<Document>("messages")
                .delete_many(doc! {"_id": {"$in": &ids}, "orgId": org})
                .await?
                .deleted_count)
        })
        .await?;
    }
    if let Some(b) = rest.next() {
        let ids: Vec<ObjectId> = raw("messages")
            .find(doc! {"contactId": {"$in": *b}})
            .projection(doc! {"_id": 1})
            .await?
            .try_collect::<Vec<_>>()
            .await?
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .collect();
        probe(&cpu, "delete_many messages {_id $in}", async {
            Ok(h.db
                .collection::<Document>("messages")
                .delete_many(doc! {"_id": {"$in": &ids}})
                .await?
                .deleted_count)
        })
        .await?;
        probe(&cpu, "delete_many contacts {_id $in}", async {
            Ok(h.db
                .collection::<Document>("contacts")
                .delete_many(doc! {"_id": {"$in": *b}})
                .await?
                .deleted_count)
        })
        .await?;
        probe(
            &cpu,
            "find messages {contactId $in} after delete",
            drain(&raw("messages"), doc! {"contactId": {"$in": *b}}),
        )
        .await?;
        probe(
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
        probe(&cpu, "insert_many 1000 bundles of 6 messages", async {
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
        probe(&cpu, "insert_many 1000 audit entries", async {
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
        probe(&cpu, "200 upserts {bulkKey, lastBatch $not $gte}", async {
            for n in 0..200i64 {
                notes
                    .update_one(
                        doc! {"bulkKey": &key, "lastBatch": {"$not": {"$gte": n}}},
                        doc! {"$set": {"lastBatch": n}, "$inc": {"count": 1i64}},
                    )
                    .upsert(true)
                    .await?;
            }
            Ok(200)
        })
        .await?;
        probe(&cpu, "200 upserts {_id: key, lastBatch $not $gte}", async {
            for n in 0..200i64 {
                notes
                    .update_one(
                        doc! {"_id": &key, "lastBatch": {"$not": {"$gte": n}}},
                        doc! {"$set": {"lastBatch": n}, "$inc": {"count": 1i64}},
                    )
                    .upsert(true)
                    .await?;
            }
            Ok(200)
        })
        .await?;
    }
    Ok(())
}
