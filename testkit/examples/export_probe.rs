//! Where an export's server CPU goes: each query the export job sends, run
//! alone against a seeded organisation, with the server's and this process's
//! CPU seconds (from `/proc`) and wall time. `cargo run --release -p
//! contact-bulk-testkit --example export_probe -- 300000`.

use std::time::Instant;

use bson::{doc, oid::ObjectId, Document, RawDocumentBuf};
use contact_bulk_actors::filter::Filter;
use contact_bulk_actors::id_ranges;
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
        "{what:<48} n={n:<8} wall {:.3} s  cpu {}",
        wall.as_secs_f64(),
        cpu.sample().json_since(&before)
    );
    Ok(())
}

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
        probe(&cpu, "drain {orgId} sort _id", drain(&coll, base.clone())).await?;
        probe(
            &cpu,
            "find bounded both sides sort _id",
            drain(&coll, bounded.clone()),
        )
        .await?;
        probe(&cpu, "snapshot bound (find_one > now)", async {
            contact_bulk_actors::snapshot::bound(&h.db, "contacts", &base).await?;
            Ok(0)
        })
        .await?;
        probe(&cpu, "count bounded both sides", async {
            Ok(
                contact_bulk_actors::snapshot::count(&h.db, "contacts", &bounded, None, None)
                    .await? as u64,
            )
        })
        .await?;
        probe(&cpu, "count {orgId}", async {
            Ok(
                contact_bulk_actors::snapshot::count(&h.db, "contacts", &base, None, None).await?
                    as u64,
            )
        })
        .await?;
        probe(&cpu, "count_documents {orgId}", async {
            Ok(h.db
                .collection::<Document>("contacts")
                .count_documents(base.clone())
                .await?)
        })
        .await?;
        probe(&cpu, "aggregate $match bounded, $count", async {
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
        probe(&cpu, "find bounded projection {_id:1} (covered?)", async {
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
            probe(&cpu, &what, async {
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
        probe(&cpu, "find {orgId} projection customFields", async {
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
    let mb: usize = 40;
    for (size, count) in [(1usize << 20, mb), (4 << 20, mb / 4), (256 << 10, mb * 4)] {
        let what = format!("{count} chunks of {} KiB, replace upsert", size >> 10);
        let job = ObjectId::new().to_hex();
        probe(&cpu, &what, async {
            for n in 0..count as i64 {
                let data = vec![b'x'; size];
                let chunk = doc! {"jobId": &job, "n": n, "epoch": 1i64,
                "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: data }};
                chunks
                    .replace_one(
                        doc! {"jobId": &job, "n": n, "epoch": {"$not": {"$gt": 1i64}}},
                        chunk,
                    )
                    .upsert(true)
                    .await?;
            }
            Ok(count as u64)
        })
        .await?;
        let what = format!("{count} chunks of {} KiB, insert_one", size >> 10);
        let job = ObjectId::new().to_hex();
        probe(&cpu, &what, async {
            for n in 0..count as i64 {
                let data = vec![b'x'; size];
                let chunk = doc! {"jobId": &job, "n": n, "epoch": 1i64,
                "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: data }};
                chunks.insert_one(chunk).await?;
            }
            Ok(count as u64)
        })
        .await?;
    }
    for round in 0..2 {
        let job = ObjectId::new().to_hex();
        let what = format!("round {round}: 40 x 1 MiB replace upsert {{jobId, n}} only");
        probe(&cpu, &what, async {
            for n in 0..40i64 {
                let chunk = doc! {"jobId": &job, "n": n, "epoch": 1i64,
                    "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![b'x'; 1 << 20] }};
                chunks.replace_one(doc! {"jobId": &job, "n": n}, chunk).upsert(true).await?;
            }
            Ok(40)
        })
        .await?;
        let job = ObjectId::new().to_hex();
        let what = format!("round {round}: 40 x 1 MiB replace upsert {{jobId, n, epoch $lte}}");
        probe(&cpu, &what, async {
            for n in 0..40i64 {
                let chunk = doc! {"jobId": &job, "n": n, "epoch": 1i64,
                    "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![b'x'; 1 << 20] }};
                chunks.replace_one(doc! {"jobId": &job, "n": n, "epoch": {"$lte": 1i64}}, chunk).upsert(true).await?;
            }
            Ok(40)
        })
        .await?;
        let what =
            format!("round {round}: 40 x 1 MiB replace upsert again {{jobId, n, epoch $lte 2}}");
        probe(&cpu, &what, async {
            for n in 0..40i64 {
                let chunk = doc! {"jobId": &job, "n": n, "epoch": 2i64,
                    "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![b'x'; 1 << 20] }};
                chunks.replace_one(doc! {"jobId": &job, "n": n, "epoch": {"$lte": 2i64}}, chunk).upsert(true).await?;
            }
            Ok(40)
        })
        .await?;
        let job = ObjectId::new().to_hex();
        let what = format!("round {round}: 40 x 1 MiB replace upsert {{_id: key, epoch}}");
        probe(&cpu, &what, async {
            for n in 0..40i64 {
                let key = format!("{job}:{n}");
                let chunk = doc! {"_id": &key, "jobId": &job, "n": n, "epoch": 1i64,
                    "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![b'x'; 1 << 20] }};
                chunks.replace_one(doc! {"_id": &key, "epoch": {"$not": {"$gt": 1i64}}}, chunk).upsert(true).await?;
            }
            Ok(40)
        })
        .await?;
        let what = format!("round {round}: same 40 again (rewrite, epoch 2)");
        probe(&cpu, &what, async {
            for n in 0..40i64 {
                let key = format!("{job}:{n}");
                let chunk = doc! {"_id": &key, "jobId": &job, "n": n, "epoch": 2i64,
                    "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![b'x'; 1 << 20] }};
                chunks.replace_one(doc! {"_id": &key, "epoch": {"$not": {"$gt": 2i64}}}, chunk).upsert(true).await?;
            }
            Ok(40)
        })
        .await?;
        let what = format!("round {round}: remove_from {{jobId, n >= 30}}");
        probe(&cpu, &what, async {
            Ok(chunks
                .delete_many(doc! {"jobId": &job, "n": {"$gte": 30i64}})
                .await?
                .deleted_count)
        })
        .await?;
        let what = format!("round {round}: count all chunks");
        probe(&cpu, &what, async {
            Ok(chunks.count_documents(doc! {}).await?)
        })
        .await?;
    }
    let id = ObjectId::new();
    jobs.insert_one(doc! {"_id": id, "jobId": id.to_hex(), "processed": 0i64})
        .await?;
    probe(&cpu, "100 checkpoint update_one", async {
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
