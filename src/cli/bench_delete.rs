//! `contact-bulk bench delete`: three identical organisations; A is removed by a
//! cascade-delete job of the real service (audit entries, events and
//! notifications included), B by plain `deleteMany` calls per collection, the
//! fastest the server can remove the same documents (the target's yardstick),
//! and C by the job's own deletes alone (`deleteMany` with `$in` over batches
//! of the job's batch size, per collection), which shows what the job's other work costs.
//! Documents/s side by side.

use contact_bulk_protocol::subjects::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bson::{doc, oid::ObjectId, Document};
use clap::Args;
use serde_json::json;

use super::bench::{mb, print_table, rate, timed, Common, Harness, Memory};
use super::bench_cpu::CpuProbe;
use super::client::{counts, status, JobView};
use crate::seed::{seed_org, SeedSpec};

/// Options of `bench delete`.
#[derive(Debug, Clone, Args)]
pub struct DeleteBench {
    /// Contacts per organisation (each with 1 conversation of 2 messages).
    #[arg(long, default_value_t = 200_000)]
    pub contacts: u64,
    /// Scratch directory options.
    #[command(flatten)]
    pub common: Common,
}

/// CPU seconds per process during each side.
struct Cpu {
    job: String,
    job_json: serde_json::Value,
    base: String,
    base_json: serde_json::Value,
}

struct Side {
    contacts: u64,
    docs: u64,
    took: Duration,
}

impl Side {
    fn docs_rps(&self) -> f64 {
        rate(self.docs, self.took)
    }
    fn contacts_rps(&self) -> f64 {
        rate(self.contacts, self.took)
    }
}

/// Runs the delete benchmark.
pub async fn run(args: DeleteBench) -> anyhow::Result<()> {
    let n = args.contacts.max(1);
    let mut h = Harness::start(&args.common).await?;
    let spec = SeedSpec {
        contacts: n,
        conversation_every: 1,
        conversations_per_contact: 1,
        messages_per_conversation: 2,
        ..SeedSpec::demo()
    };
    eprintln!(
        "seeding three organisations of {n} contacts, {n} conversations, {} messages",
        2 * n
    );
    let (a, b, c) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
    let (seeded, took) = timed(futures::future::try_join3(
        seed_org(&h.db, a, &spec),
        seed_org(&h.db, b, &spec),
        seed_org(&h.db, c, &spec),
    ))
    .await;
    seeded?;
    eprintln!("seeded in {:.1} s", took.as_secs_f64());

    let service = h.service().await?;
    let probe = CpuProbe::new(h.dir(), service.pid);
    let before = probe.sample();
    let job = delete_job(&h, a).await?;
    let after_job = probe.sample();
    let mem = service.stop().await;
    let left =
        h.db.collection::<Document>("contacts")
            .count_documents(doc! {"orgId": a})
            .await?;
    if left != 0 || job.contacts != n {
        bail!(
            "the job left {left} contacts of {n} (deleted {})",
            job.contacts
        );
    }
    let before_base = probe.sample();
    let base = delete_many(&h, b).await?;
    let after_base = probe.sample();
    let batched = delete_batched(&h, c, batch_size()).await?;
    if batched.contacts != n || batched.docs != base.docs {
        bail!(
            "the batched baseline removed {} documents ({} contacts), expected {}",
            batched.docs,
            batched.contacts,
            base.docs
        );
    }
    let cpu = Cpu {
        job: after_job.since(&before),
        job_json: after_job.json_since(&before),
        base: after_base.since(&before_base),
        base_json: after_base.json_since(&before_base),
    };
    eprintln!(
        "job {:.0} docs/s, deleteMany {:.0} docs/s",
        job.docs_rps(),
        base.docs_rps()
    );
    report(n, &job, &base, &batched, mem, &cpu);
    Ok(())
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
    })
}

/// messages, conversations, contacts of `org`, one `deleteMany` each.
async fn delete_many(h: &Harness, org: ObjectId) -> anyhow::Result<Side> {
    let t0 = Instant::now();
    let mut docs = 0;
    let mut contacts = 0;
    for coll in ["messages", "conversations", "contacts"] {
        let r =
            h.db.collection::<Document>(coll)
                .delete_many(doc! {"orgId": org})
                .await?;
        docs += r.deleted_count;
        if coll == "contacts" {
            contacts = r.deleted_count;
        }
    }
    Ok(Side {
        contacts,
        docs,
        took: t0.elapsed(),
    })
}

/// The job's batch size (`BULK_DELETE_BATCH`, which the service child inherits),
/// for the batched baseline.
fn batch_size() -> usize {
    std::env::var("BULK_DELETE_BATCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&b: &usize| b > 0)
        .unwrap_or(contact_bulk_actors::job::JobSettings::default().delete_batch as usize)
}

/// `org` removed by the job's own deletes and nothing else: contact ids read in
/// `_id` order, then per batch messages, conversations, contacts by `$in`.
async fn delete_batched(h: &Harness, org: ObjectId, batch: usize) -> anyhow::Result<Side> {
    use futures::TryStreamExt;
    let t0 = Instant::now();
    let contacts = h.db.collection::<Document>("contacts");
    let mut cursor = contacts
        .find(doc! {"orgId": org})
        .sort(doc! {"_id": 1})
        .projection(doc! {"_id": 1})
        .batch_size(batch as u32)
        .await?;
    let (mut docs, mut removed) = (0, 0);
    let mut ids = Vec::with_capacity(batch);
    loop {
        let next = cursor.try_next().await?;
        if let Some(d) = &next {
            ids.push(d.get_object_id("_id")?);
        }
        if ids.len() == batch || (next.is_none() && !ids.is_empty()) {
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
    })
}

fn report(n: u64, job: &Side, base: &Side, batched: &Side, mem: Memory, cpu: &Cpu) {
    let over = |side: &Side| {
        if side.docs_rps() > 0.0 {
            job.docs_rps() / side.docs_rps()
        } else {
            0.0
        }
    };
    let ratio = over(base);
    let ratio_batched = over(batched);
    println!();
    println!("delete benchmark: {n} contacts per organisation, 1 conversation and 2 messages each");
    let row = |name: &str, s: &Side| {
        vec![
            name.to_string(),
            s.docs.to_string(),
            format!("{:.1}", s.took.as_secs_f64()),
            format!("{:.0}", s.contacts_rps()),
            format!("{:.0}", s.docs_rps()),
        ]
    };
    print_table(
        &[
            "method",
            "documents",
            "seconds",
            "contacts/s",
            "documents/s",
        ],
        &[
            row("cascade-delete job", job),
            row("deleteMany x3", base),
            row(&format!("deleteMany $in x{}", batch_size()), batched),
        ],
    );
    println!(
        "ratio {ratio:.2} (target >= 0.50: {}); service VmHWM {:.1} MB, max VmRSS {:.1} MB",
        if ratio >= 0.5 { "met" } else { "missed" },
        mb(mem.hwm_kb),
        mb(mem.sampled_kb)
    );
    println!(
        "against the job's own deletes alone (deleteMany $in, batches of {}): ratio {ratio_batched:.2}", batch_size()
    );
    println!("cpu during the job: {}", cpu.job);
    println!("cpu during deleteMany: {}", cpu.base);
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    println!(
        "{}",
        json!({
            "bench": "delete",
            "contacts": n,
            "jobDocuments": job.docs,
            "jobSeconds": r3(job.took.as_secs_f64()),
            "jobContactsPerSec": r3(job.contacts_rps()),
            "jobDocsPerSec": r3(job.docs_rps()),
            "baselineDocuments": base.docs,
            "baselineSeconds": r3(base.took.as_secs_f64()),
            "baselineDocsPerSec": r3(base.docs_rps()),
            "ratio": r3(ratio),
            "batchedDocuments": batched.docs,
            "batchedSeconds": r3(batched.took.as_secs_f64()),
            "batchedDocsPerSec": r3(batched.docs_rps()),
            "ratioBatched": r3(ratio_batched),
            "peakRssMb": r3(mb(mem.hwm_kb)),
            "sampledRssMb": r3(mb(mem.sampled_kb)),
            "jobCpuSeconds": cpu.job_json,
            "baselineCpuSeconds": cpu.base_json,
        })
    );
}
