//! Where an export's server CPU goes: each query the export job sends, run
//! alone against a seeded organisation, with the server's and this process's
//! CPU seconds (from `/proc`) and wall time. `cargo run --release -p
//! contact-bulk-testkit --example export_probe -- 300000`.

use std::time::Instant;

use bson::{doc, oid::ObjectId, Document, RawDocumentBuf};
use contact_bulk_actors::filter::Filter;
use contact_bulk_actors::id_ranges;
use contact_bulk_testkit::bench::cpu::{measure, CpuProbe};
use contact_bulk_testkit::bench::{Common, Harness};
use contact_bulk_testkit::seed::{seed_org, SeedSpec};
use futures::TryStreamExt;

async fn drain(coll: &mongodb::Collection<RawDocumentBuf>, q: Document) -> anyhow::Result<u64> {
    let mut c = coll.find(q).sort(doc! {"_id": 1}).batch_size(1000).await?;
    let mut n = 0;
    while c.advance().await? {
        n += 1;
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300_000);
    let common = Common {
        data_dir: None,
        keep: false,
    };
    let h = Harness::start(&common).await?;
    let spec = SeedSpec {
        contacts: rows,
        conversation_every: 0,
        ..SeedSpec::demo()
    };
    let t = Instant::now();
    let org = seed_org(&h.db, ObjectId::new(), &spec).await?.org_id;
    eprintln!("seeded {rows} in {:.1} s", t.elapsed().as_secs_f64());
    let cpu = CpuProbe::new(h.dir(), std::process::id());
    let coll = h.db.collection::<RawDocumentBuf>("contacts");
    let filter = Filter {
        org_wide: true,
        ..Filter::default()
    };
    let base = filter.query(org);
    let bound = contact_bulk_actors::snapshot::bound(&h.db, "contacts", &base).await?;
    let mut bounded = base.clone();
    bounded.insert(
        "_id",
        doc! {"$gte": ObjectId::from_bytes([0; 12]), "$lte": bound},
    );
    for round in 0..2 {
        println!("-- round {round}");
        measure(&cpu, "drain {orgId} sort _id", drain(&coll, base.clone())).await?;
        measure(
            &cpu,
            "find bounded both sides sort _id",
            drain(&coll, bounded.clone()),
        )
        .await?;
        measure(&cpu, "snapshot bound (find_one > now)", async {
            contact_bulk_actors::snapshot::bound(&h.db, "contacts", &base).await?;
            Ok(0)
        })
        .await?;
        measure(&cpu, "count bounded both sides", async {
            Ok(
                contact_bulk_actors::snapshot::count(&h.db, "contacts", &bounded, None, None)
                    .await? as u64,
            )
        })
        .await?;
        measure(&cpu, "count {orgId}", async {
            Ok(
                contact_bulk_actors::snapshot::count(&h.db, "contacts", &base, None, None).await?
                    as u64,
            )
        })
        .await?;
        measure(&cpu, "count_documents {orgId}", async {
            Ok(h.db
                .collection::<Document>("contacts")
                .count_documents(base.clone())
                .await?)
        })
        .await?;
        measure(&cpu, "aggregate $match bounded, $count", async {
            let mut c =
                h.db.collection::<Document>("contacts")
                    .aggregate(vec![doc! {"$match": bounded.clone()}, doc! {"$count": "n"}])
                    .await?;
            let n = match c.try_next().await? {
                Some(d) => d.get_i32("n").map(i64::from).or_else(|_| d.get_i64("n"))?,
                None => 0,
            };
            Ok(n as u64)
        })
        .await?;
        measure(&cpu, "find bounded projection {_id:1} (covered?)", async {
            let mut c = coll
                .find(bounded.clone())
                .projection(doc! {"_id": 1})
                .batch_size(10_000)
                .await?;
            let mut n = 0;
            while c.advance().await? {
                n += 1;
            }
            Ok(n)
        })
        .await?;
        for parts in [4usize, 16] {
            let what = format!("{parts} ranges, sequential");
            measure(&cpu, &what, async {
                let mut n = 0;
                for r in id_ranges::split(None, bound, org, parts) {
                    let mut q = base.clone();
                    let mut b = match r.after {
                        Some(a) => doc! {"$gt": a},
                        None => doc! {"$gte": ObjectId::from_bytes([0; 12])},
                    };
                    b.insert("$lte", r.upto);
                    q.insert("_id", b);
                    n += drain(&coll, q).await?;
                }
                Ok(n)
            })
            .await?;
        }
        measure(&cpu, "find {orgId} projection customFields", async {
            let mut c = coll
                .find(bounded.clone())
                .sort(doc! {"_id": 1})
                .projection(doc! {"customFields": 1})
                .batch_size(2000)
                .await?;
            let mut n = 0;
            while c.advance().await? {
                n += 1;
            }
            Ok(n)
        })
        .await?;
    }
    contact_bulk_actors::store::ensure_indexes(&h.db).await?;
    let chunks = h.db.collection::<Document>("export_chunks");
    let jobs = h.db.collection::<Document>("bulk_jobs");
    // Each way an export chunk could be written, on 40 MiB: (KiB a chunk, how).
    let variants = [
        (1024, Write::FencedByJobAndN),
        (1024, Write::Insert),
        (4096, Write::FencedByJobAndN),
        (4096, Write::Insert),
        (256, Write::FencedByJobAndN),
        (256, Write::Insert),
        (1024, Write::ByJobAndN),
        (1024, Write::ByJobAndNEpochLte),
        (1024, Write::FencedById),
    ];
    for round in 0..2 {
        for (kib, how) in variants {
            let job = ObjectId::new().to_hex();
            let count = 40 * 1024 / kib;
            let what = format!("round {round}: {count} chunks of {kib} KiB, {how:?}");
            measure(
                &cpu,
                &what,
                write_chunks(&chunks, &job, count, kib << 10, 1, how),
            )
            .await?;
            if how == Write::FencedById {
                let what = format!("round {round}: the same again, epoch 2 (a resume)");
                measure(
                    &cpu,
                    &what,
                    write_chunks(&chunks, &job, count, kib << 10, 2, how),
                )
                .await?;
                let what = format!("round {round}: remove_from {{jobId, n >= 30}}");
                measure(&cpu, &what, async {
                    Ok(chunks
                        .delete_many(doc! {"jobId": &job, "n": {"$gte": 30i64}})
                        .await?
                        .deleted_count)
                })
                .await?;
            }
        }
    }
    let id = ObjectId::new();
    jobs.insert_one(doc! {"_id": id, "jobId": id.to_hex(), "processed": 0i64})
        .await?;
    measure(&cpu, "100 checkpoint update_one", async {
        for n in 0..100i64 {
            jobs.update_one(
                doc! {"_id": id, "lease.epoch": {"$not": {"$gt": 1i64}}},
                doc! {"$set": {"processed": n, "checkpoint": {"lastId": id, "nextChunk": n, "bytes": n}}},
            )
            .await?;
        }
        Ok(100)
    })
    .await?;
    for (what, q) in [("drain", base.clone()), ("bounded", bounded.clone())] {
        let explain = h
            .db
            .run_command(doc! {"explain": {"find": "contacts", "filter": q, "sort": {"_id": 1}}, "verbosity": "queryPlanner"})
            .await;
        println!("explain {what}: {explain:?}");
    }
    let explain = h
        .db
        .run_command(doc! {"explain": {"count": "contacts", "query": bounded.clone()}, "verbosity": "queryPlanner"})
        .await;
    println!("explain count: {explain:?}");
    Ok(())
}

/// How a chunk is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// The fenced upsert chunks had before (filter `jobId`, `n`, `epoch $not $gt`).
    FencedByJobAndN,
    /// A plain `insert_one`.
    Insert,
    /// An upsert on `jobId` and `n` alone.
    ByJobAndN,
    /// An upsert on `jobId`, `n` and `epoch $lte`.
    ByJobAndNEpochLte,
    /// The fenced upsert chunks have now (filter `_id`, `epoch $not $gt`).
    FencedById,
}

/// Writes `count` chunks of `size` bytes for `job` under `epoch`.
async fn write_chunks(
    chunks: &mongodb::Collection<Document>,
    job: &str,
    count: usize,
    size: usize,
    epoch: i64,
    how: Write,
) -> anyhow::Result<u64> {
    for n in 0..count as i64 {
        let key = format!("{job}:{n}");
        let mut chunk = doc! {"jobId": job, "n": n, "epoch": epoch,
        "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![b'x'; size] }};
        let filter = match how {
            Write::Insert => {
                chunks.insert_one(chunk).await?;
                continue;
            }
            Write::FencedByJobAndN => {
                doc! {"jobId": job, "n": n, "epoch": {"$not": {"$gt": epoch}}}
            }
            Write::ByJobAndN => doc! {"jobId": job, "n": n},
            Write::ByJobAndNEpochLte => doc! {"jobId": job, "n": n, "epoch": {"$lte": epoch}},
            Write::FencedById => {
                chunk.insert("_id", &key);
                doc! {"_id": &key, "epoch": {"$not": {"$gt": epoch}}}
            }
        };
        chunks.replace_one(filter, chunk).upsert(true).await?;
    }
    Ok(count as u64)
}
