//! `contact-bulk bench delete`: three identical organisations per size (every
//! contact with 2 conversations of 3 messages, one stage); A is removed by a
//! cascade-delete job of the real service (audit entries, events and
//! notifications included), B by the server's limit (contact ids read in `_id`
//! order, then per 1,000 ids a `deleteMany` with `$in` on messages,
//! conversations and contacts) and C by what a user would write instead (the
//! Node per-contact cascade of `yardsticks/`). Contacts/s side by side, the
//! ratios, the service's peak RSS and where the CPU went.

use contact_bulk_protocol::subjects::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bson::{doc, oid::ObjectId, Document};
use clap::Args;
use serde_json::json;

use super::bench::{mb, print_table, rate, round, Common, Harness, Memory};
use super::bench_cpu::CpuProbe;
use super::client::{counts, status, JobView};
use super::yardsticks::Yardsticks;
use contact_bulk_testkit::seed::{seed_org, SeedSpec};

/// Ids per `deleteMany` of the batched yardstick.
const YARDSTICK_BATCH: usize = 1000;

/// Options of `bench delete`.
#[derive(Debug, Clone, Args)]
pub struct DeleteBench {
    /// Contacts per organisation, one run per size (each contact with 2
    /// conversations of 3 messages).
    #[arg(long, value_delimiter = ',', default_value = "20000,100000")]
    pub contacts: Vec<u64>,
    /// Print one JSON line for scripts after the table.
    #[arg(long)]
    pub json: bool,
    /// Scratch directory options.
    #[command(flatten)]
    pub common: Common,
}

/// One side's figures.
struct Side {
    contacts: u64,
    docs: u64,
    took: Duration,
    cpu: serde_json::Value,
}

impl Side {
    fn contacts_rps(&self) -> f64 {
        rate(self.contacts, self.took)
    }
    fn json(&self) -> serde_json::Value {
        json!({
            "contacts": self.contacts,
            "documents": self.docs,
            "seconds": round(self.took.as_secs_f64()),
            "contactsPerSec": round(self.contacts_rps()),
            "cpuSeconds": self.cpu,
        })
    }
}

/// One size's figures.
struct RunResult {
    contacts: u64,
    job: Side,
    batched: Side,
    node: Side,
    mem: Memory,
}

impl RunResult {
    fn over(&self, side: &Side) -> f64 {
        let s = side.contacts_rps();
        if s > 0.0 {
            self.job.contacts_rps() / s
        } else {
            0.0
        }
    }
    fn json(&self) -> serde_json::Value {
        json!({
            "contacts": self.contacts,
            "job": self.job.json(),
            "batched": self.batched.json(),
            "node": self.node.json(),
            "ratioBatched": round(self.over(&self.batched)),
            "ratioNode": round(self.over(&self.node)),
            "peakRssMb": round(mb(self.mem.hwm_kb)),
            "sampledRssMb": round(mb(self.mem.sampled_kb)),
        })
    }
}

/// Runs the delete benchmark.
pub async fn run(args: DeleteBench) -> anyhow::Result<()> {
    let mut sizes: Vec<u64> = args.contacts.iter().map(|&n| n.max(1)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let node = Yardsticks::install().await?;
    let mut h = Harness::start(&args.common).await?;
    let mut results = Vec::new();
    for n in sizes {
        let r = run_one(&mut h, &node, n).await?;
        eprintln!(
            "{n} contacts: job {:.0}/s, batched deleteMany {:.0}/s ({:.2}x), node cascade {:.0}/s ({:.2}x), peak rss {:.1} MB",
            r.job.contacts_rps(),
            r.batched.contacts_rps(),
            r.over(&r.batched),
            r.node.contacts_rps(),
            r.over(&r.node),
            mb(r.mem.hwm_kb)
        );
        results.push(r);
    }
    report(&results, args.json);
    Ok(())
}

async fn run_one(h: &mut Harness, node: &Yardsticks, n: u64) -> anyhow::Result<RunResult> {
    let spec = SeedSpec {
        contacts: n,
        pipelines: 1,
        stages_per_pipeline: 1,
        conversation_every: 1,
        conversations_per_contact: 2,
        messages_per_conversation: 3,
        ..SeedSpec::demo()
    };
    eprintln!(
        "seeding three organisations of {n} contacts, {} conversations, {} messages",
        2 * n,
        6 * n
    );
    let t = Instant::now();
    let (a, b, c) = futures::future::try_join3(
        seed_org(&h.db, ObjectId::new(), &spec),
        seed_org(&h.db, ObjectId::new(), &spec),
        seed_org(&h.db, ObjectId::new(), &spec),
    )
    .await?;
    eprintln!("seeded in {:.1} s", t.elapsed().as_secs_f64());
    let expected_docs = 9 * n;

    let service = h.service().await?;
    let probe = CpuProbe::new(h.dir(), service.pid);
    let before = probe.sample();
    let mut job = delete_job(h, a.org_id).await?;
    job.cpu = probe.sample().json_since(&before);

    let before = probe.sample();
    let mut batched = delete_batched(h, b.org_id).await?;
    batched.cpu = probe.sample().json_since(&before);

    let stage = *c.stage_ids.first().context("seeded without a stage")?;
    let before = probe.sample();
    let run = node
        .delete(&h.mongo.uri(), super::bench::DB, c.org_id, stage)
        .await?;
    let node_cpu = probe.sample().json_since(&before);
    let mem = service.stop().await;
    let node_side = Side {
        contacts: run.count,
        docs: run.count * 9,
        took: run.took,
        cpu: node_cpu,
    };
    for (name, side, org) in [
        ("job", &job, a.org_id),
        ("batched deleteMany", &batched, b.org_id),
        ("node cascade", &node_side, c.org_id),
    ] {
        let mut left = 0;
        for coll in ["contacts", "conversations", "messages"] {
            left +=
                h.db.collection::<Document>(coll)
                    .count_documents(doc! {"orgId": org})
                    .await?;
        }
        if side.contacts != n || left != 0 {
            bail!(
                "{name} removed {} contacts of {n} and left {left} documents",
                side.contacts
            );
        }
    }
    if job.docs != expected_docs || batched.docs != expected_docs {
        bail!(
            "documents removed: job {}, batched {}, expected {expected_docs}",
            job.docs,
            batched.docs
        );
    }
    Ok(RunResult {
        contacts: n,
        job,
        batched,
        node: node_side,
        mem,
    })
}

async fn delete_job(h: &Harness, org: ObjectId) -> anyhow::Result<Side> {
    let org = org.to_hex();
    let mut events = h.nats.job_events(&org, None).await?;
    let reply = h
        .nats
        .request(
            Command::Delete,
            &json!({"orgId": org, "filter": {"orgWide": true}}),
        )
        .await?;
    let t0 = Instant::now();
    let job_id = reply["jobId"]
        .as_str()
        .context("delete reply without jobId")?;
    let snap = h
        .nats
        .follow(&org, job_id, &mut events, &mut JobView::quiet())
        .await?;
    let took = t0.elapsed();
    if status(&snap) != "completed" {
        bail!("delete job did not complete: {snap}");
    }
    let (c, v, m) = counts(&snap);
    Ok(Side {
        contacts: c,
        docs: c + v + m,
        took,
        cpu: json!({}),
    })
}

/// The server's limit: contact ids of `org` read in `_id` order, then per
/// 1,000 ids messages, conversations and contacts by `deleteMany` with `$in`.
async fn delete_batched(h: &Harness, org: ObjectId) -> anyhow::Result<Side> {
    use futures::TryStreamExt;
    let t0 = Instant::now();
    let contacts = h.db.collection::<Document>("contacts");
    let mut cursor = contacts
        .find(doc! {"orgId": org})
        .sort(doc! {"_id": 1})
        .projection(doc! {"_id": 1})
        .batch_size(YARDSTICK_BATCH as u32)
        .await?;
    let (mut docs, mut removed) = (0, 0);
    let mut ids = Vec::with_capacity(YARDSTICK_BATCH);
    loop {
        let next = cursor.try_next().await?;
        if let Some(d) = &next {
            ids.push(d.get_object_id("_id")?);
        }
        if ids.len() == YARDSTICK_BATCH || (next.is_none() && !ids.is_empty()) {
            let children = doc! {"orgId": org, "contactId": {"$in": &ids}};
            for coll in ["messages", "conversations"] {
                docs +=
                    h.db.collection::<Document>(coll)
                        .delete_many(children.clone())
                        .await?
                        .deleted_count;
            }
            let n = contacts
                .delete_many(doc! {"_id": {"$in": &ids}, "orgId": org})
                .await?
                .deleted_count;
            docs += n;
            removed += n;
            ids.clear();
        }
        if next.is_none() {
            break;
        }
    }
    Ok(Side {
        contacts: removed,
        docs,
        took: t0.elapsed(),
        cpu: json!({}),
    })
}

fn report(results: &[RunResult], json_line: bool) {
    println!();
    println!("delete benchmark: org-wide cascade, every contact with 2 conversations x 3 messages, one service process per size");
    println!("yardsticks: batched deleteMany ($in over 1,000 ids per collection: messages, conversations, contacts); node delete.js (per-contact cascade with audit entry and notification)");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.contacts.to_string(),
                format!("{:.1}", r.job.took.as_secs_f64()),
                format!("{:.0}", r.job.contacts_rps()),
                format!("{:.0}", r.batched.contacts_rps()),
                format!("{:.2}", r.over(&r.batched)),
                format!("{:.0}", r.node.contacts_rps()),
                format!("{:.2}", r.over(&r.node)),
                format!("{:.1}", mb(r.mem.hwm_kb)),
            ]
        })
        .collect();
    print_table(
        &[
            "contacts",
            "job s",
            "job contacts/s",
            "batched contacts/s",
            "job/batched",
            "node contacts/s",
            "job/node",
            "VmHWM MB",
        ],
        &rows,
    );
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "targets: job/batched >= 0.50 ({}), job/node >= 10 ({}), peak RSS <= 64 MB ({})",
        verdict(results.iter().all(|r| r.over(&r.batched) >= 0.5)),
        verdict(results.iter().all(|r| r.over(&r.node) >= 10.0)),
        verdict(results.iter().all(|r| r.mem.hwm_kb <= 64 * 1024)),
    );
    for r in results {
        println!(
            "cpu seconds at {} contacts: job {}, batched {}, node {}",
            r.contacts, r.job.cpu, r.batched.cpu, r.node.cpu
        );
    }
    let Some(last) = results.last() else {
        return;
    };
    if json_line {
        let mut line = last.json();
        line["bench"] = json!("delete");
        line["runs"] = json!(results.iter().map(RunResult::json).collect::<Vec<_>>());
        println!("{line}");
    }
}
