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
