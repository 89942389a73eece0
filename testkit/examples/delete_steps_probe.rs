//! A delete batch's steps, as the keeping delete job sends them, replayed on
//! 10 batches of 1,000 contacts in `_id` order, with the server CPU of each
//! step summed over the batches (so the cost of reading just-deleted keys lands
//! where it does in the job). `cargo run --release -p contact-bulk-testkit
//! --example delete_steps_probe -- 20000`.

use std::collections::BTreeMap;
use std::time::Instant;

use bson::{doc, oid::ObjectId, rawdoc, Document, RawDocumentBuf};
use contact_bulk_testkit::bench::cpu::CpuProbe;
use futures::TryStreamExt;

struct Steps<'a> {
    cpu: &'a CpuProbe,
    totals: BTreeMap<String, (f64, f64)>,
}

impl Steps<'_> {
    async fn step<T, F: std::future::Future<Output = anyhow::Result<T>>>(
        &mut self,
        what: &str,
        f: F,
    ) -> anyhow::Result<T> {
        let before = self.cpu.sample();
        let t = Instant::now();
        let out = f.await?;
        let wall = t.elapsed().as_secs_f64();
        let cpu = self.cpu.sample().json_since(&before);
        let server = cpu["mongodb"].as_f64().unwrap_or(0.0);
        let e = self.totals.entry(what.to_string()).or_default();
        e.0 += wall;
        e.1 += server;
        Ok(out)
    }
}

async fn all(
    coll: &mongodb::Collection<RawDocumentBuf>,
    q: Document,
) -> anyhow::Result<Vec<RawDocumentBuf>> {
    Ok(coll.find(q).batch_size(10_000).await?.try_collect().await?)
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
    let mut s = Steps {
        cpu: &cpu,
        totals: BTreeMap::new(),
    };
    let job_id = uuid_like();
    let mut after: Option<ObjectId> = None;
    for b in ids.chunks(1000).take(10) {
        let upto = *b.last().unwrap();
        let mut range = doc! {"$lte": upto};
        if let Some(a) = after {
            range.insert("$gt", a);
        }
        let decision = s
            .step("1 decision read (range, projection)", async {
                Ok(h.db
                    .collection::<Document>("contacts")
                    .find(doc! {"_id": range.clone(), "orgId": org})
                    .projection(
                        doc! {"firstName": 1, "lastName": 1, "email": 1, "phone": 1, "ownerId": 1},
                    )
                    .await?
                    .try_collect::<Vec<_>>()
                    .await?)
            })
            .await?;
        let entries: Vec<RawDocumentBuf> = decision.iter().filter_map(|c| c.get_object_id("_id").ok()).map(|c| rawdoc! {
            "_id": ObjectId::new(), "orgId": org, "type": "CONTACT_DELETE", "contactId": c,
            "jobId": job_id.as_str(), "createdAt": bson::DateTime::now(),
            "contact": {"firstName": "a", "lastName": "b", "email": "c", "phone": "d"},
            "pipelineType": "contact", "bulkKey": format!("{}:{}", org.to_hex(), c.to_hex()),
        }).collect();
        s.step("2 audit insert_many (unordered)", async {
            Ok(raw("event_logs")
                .insert_many(entries)
                .ordered(false)
                .await?
                .inserted_ids
                .len())
        })
        .await?;
        let contacts = s
            .step(
                "3 keep: read contacts {_id $in}",
                all(&raw("contacts"), doc! {"_id": {"$in": b}}),
            )
            .await?;
        let convs = s
            .step(
                "4 keep: read conversations {contactId $in}",
                all(&raw("conversations"), doc! {"contactId": {"$in": b}}),
            )
            .await?;
        let msgs = s
            .step(
                "4 keep: read messages {contactId $in}",
                all(&raw("messages"), doc! {"contactId": {"$in": b}}),
            )
            .await?;
        let mut by: BTreeMap<ObjectId, (Vec<RawDocumentBuf>, Vec<RawDocumentBuf>)> =
            BTreeMap::new();
        for c in &convs {
            by.entry(c.get_object_id("contactId")?)
                .or_default()
                .0
                .push(c.clone());
        }
        for m in &msgs {
            by.entry(m.get_object_id("contactId")?)
                .or_default()
                .1
                .push(m.clone());
        }
        let bundles: Vec<RawDocumentBuf> = contacts
            .iter()
            .map(|c| {
                let id = c.get_object_id("_id").unwrap();
                let (cs, ms) = by.remove(&id).unwrap_or_default();
                let mut ca = bson::RawArrayBuf::new();
                for x in cs {
                    ca.push(x);
                }
                let mut ma = bson::RawArrayBuf::new();
                for x in ms {
                    ma.push(x);
                }
                let mut d = RawDocumentBuf::new();
                d.append("_id", format!("{job_id}:{}", id.to_hex()));
                d.append("jobId", job_id.as_str());
                d.append("contact", c.clone());
                d.append("conversations", ca);
                d.append("messages", ma);
                d
            })
            .collect();
        s.step("5 keep: insert_many bundles", async {
            Ok(raw("bulk_kept")
                .insert_many(bundles)
                .await?
                .inserted_ids
                .len())
        })
        .await?;
        let conv_ids: Vec<bson::Bson> = convs
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .map(bson::Bson::ObjectId)
            .collect();
        let msg_ids: Vec<bson::Bson> = msgs
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .map(bson::Bson::ObjectId)
            .collect();
        s.step("6 delete messages {_id $in}", async {
            Ok(h.db
                .collection::<Document>("messages")
                .delete_many(doc! {"_id": {"$in": &msg_ids}})
                .await?
                .deleted_count)
        })
        .await?;
        s.step("6 delete conversations {_id $in}", async {
            Ok(h.db
                .collection::<Document>("conversations")
                .delete_many(doc! {"_id": {"$in": &conv_ids}})
                .await?
                .deleted_count)
        })
        .await?;
        s.step(
            "7 children left: messages",
            all(&raw("messages"), doc! {"contactId": {"$in": b}}),
        )
        .await?;
        s.step(
            "7 children left: conversations",
            all(&raw("conversations"), doc! {"contactId": {"$in": b}}),
        )
        .await?;
        s.step("8 delete contacts {_id $in, orgId}", async {
            Ok(h.db
                .collection::<Document>("contacts")
                .delete_many(doc! {"_id": {"$in": b}, "orgId": org})
                .await?
                .deleted_count)
        })
        .await?;
        after = Some(upto);
    }
    let mut sum = 0.0;
    for (what, (wall, server)) in &s.totals {
        println!("{what:<48} wall {wall:.3} s  server cpu {server:.2} s");
        sum += server;
    }
    println!("total server cpu {sum:.2} s for 10,000 contacts");
    Ok(())
}

fn uuid_like() -> String {
    ObjectId::new().to_hex()
}
