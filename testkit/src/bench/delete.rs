//! `contact-bulk bench delete`: identical organisations per size (every
//! contact with 2 conversations of 3 messages, one stage); one is removed by a
//! cascade-delete job of the real service (keeping what it removes, audit
//! entries, events and notifications included), one by the server's limit
//! (contact ids read in `_id` order, then per 1,000 ids a `deleteMany` with
//! `$in` on messages, conversations and contacts), in pairs run one after the
//! other (`--repeat`, each pair on fresh organisations; the box is shared, so
//! the ratio is the median of the pairs'), and one by what a user would write
//! instead (the Node per-contact cascade of `yardsticks/`). Contacts/s side by
//! side, the ratios, the load average, the service's peak RSS and where the
//! CPU went.

use contact_bulk_protocol::commands::DeleteCommand;
use contact_bulk_protocol::filter::FilterSpec;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bson::{doc, oid::ObjectId, Document};
use clap::Args;
use serde_json::json;

use super::cpu::CpuProbe;
use super::yardsticks::Yardsticks;
use super::{mb, print_table, rate, round, Common, Harness, Memory};
use crate::seed::{seed_org, SeedSpec};

/// Ids per `deleteMany` of the batched yardstick.
const YARDSTICK_BATCH: usize = 1000;

/// Options of `bench delete`.
#[derive(Debug, Clone, Args)]
pub struct DeleteBench {
    /// Contacts per organisation, one run per size (each contact with 2
    /// conversations of 3 messages).
    #[arg(long, value_delimiter = ',', default_value = "20000,100000")]
    pub contacts: Vec<u64>,
    /// Runs per size, interleaved: yardstick, job, yardstick, job, … (each on
    /// freshly seeded organisations); the ratio is the median of the pairs'.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Leave out the Node yardstick (it takes minutes per size; for
    /// iterating on the job against the server's limit).
    #[arg(long)]
    pub skip_node: bool,
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

/// One size's figures: `job` and `batched` are the median runs of the pairs.
struct RunResult {
    contacts: u64,
    job: Side,
    batched: Side,
    node: Side,
    mem: Memory,
    /// job/batched of each pair, in run order.
    pairs: Vec<f64>,
    /// The 1-minute load average before each pair.
    load: Vec<f64>,
}

impl RunResult {
    /// The median of the pairs' job/batched.
    fn ratio_batched(&self) -> f64 {
        median(&self.pairs)
    }
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
            "ratioBatched": round(self.ratio_batched()),
            "ratioNode": round(self.over(&self.node)),
            "pairRatios": self.pairs.iter().map(|r| round(*r)).collect::<Vec<_>>(),
            "loadAverage": self.load.iter().map(|r| round(*r)).collect::<Vec<_>>(),
            "peakRssMb": round(mb(self.mem.hwm_kb)),
            "sampledRssMb": round(mb(self.mem.sampled_kb)),
        })
    }
}

/// The median (the mean of the middle two for an even count; 0 for none).
pub(super) fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The 1-minute load average (`/proc/loadavg`), 0 when unreadable.
pub(super) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The run whose rate is the median of `runs` (the lower middle one).
fn median_run(mut runs: Vec<Side>) -> Option<Side> {
    runs.sort_by(|a, b| a.contacts_rps().total_cmp(&b.contacts_rps()));
    let mid = runs.len().saturating_sub(1) / 2;
    runs.into_iter().nth(mid)
}

/// Runs the delete benchmark.
pub async fn run(args: DeleteBench) -> anyhow::Result<()> {
    let mut sizes: Vec<u64> = args.contacts.iter().map(|&n| n.max(1)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let node = match args.skip_node {
        true => None,
        false => Some(Yardsticks::install().await?),
    };
    let mut h = Harness::start(&args.common).await?;
    let mut results = Vec::new();
    for n in sizes {
        let r = run_one(&mut h, node.as_ref(), n, args.repeat.max(1)).await?;
        eprintln!(
            "{n} contacts: job {:.0}/s, batched deleteMany {:.0}/s ({:.2}x, pairs {:?}), node cascade {:.0}/s ({:.2}x), peak rss {:.1} MB, load {:?}",
            r.job.contacts_rps(),
            r.batched.contacts_rps(),
            r.ratio_batched(),
            r.pairs,
            r.node.contacts_rps(),
            r.over(&r.node),
            mb(r.mem.hwm_kb),
            r.load,
        );
        results.push(r);
    }
    report(&results, args.json);
    Ok(())
}

/// An organisation of `n` contacts with 2 conversations × 3 messages each:
/// the delete benchmark's (and the delete probes').
pub fn children_spec(n: u64) -> SeedSpec {
    SeedSpec {
        contacts: n,
        pipelines: 1,
        stages_per_pipeline: 1,
        conversation_every: 1,
        conversations_per_contact: 2,
        messages_per_conversation: 3,
        ..SeedSpec::demo()
    }
}

/// The delete probes' world (`testkit/examples/delete_*probe.rs`): fresh
/// servers with the service's indexes, one organisation of `n` contacts as
/// [`children_spec`] seeds it, and its contact ids in `_id` order.
pub async fn probe_org(n: u64) -> anyhow::Result<(Harness, ObjectId, Vec<ObjectId>)> {
    use futures::TryStreamExt;
    let h = Harness::start(&Common {
        data_dir: None,
        keep: false,
    })
    .await?;
    contact_bulk_actors::store::ensure_indexes(&h.db).await?;
    let org = crate::seed::seed_org(&h.db, ObjectId::new(), &children_spec(n))
        .await?
        .org_id;
    let ids =
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
    Ok((h, org, ids))
}

/// Seeds `count` organisations of `n` contacts side by side.
async fn seed(h: &Harness, n: u64, count: usize) -> anyhow::Result<Vec<crate::seed::SeededOrg>> {
    let spec = children_spec(n);
    eprintln!(
        "seeding {count} organisations of {n} contacts, {} conversations, {} messages",
        2 * n,
        6 * n
    );
    let t = Instant::now();
    let orgs =
        futures::future::try_join_all((0..count).map(|_| seed_org(&h.db, ObjectId::new(), &spec)))
            .await?;
    eprintln!("seeded in {:.1} s", t.elapsed().as_secs_f64());
    Ok(orgs)
}

async fn run_one(
    h: &mut Harness,
    node: Option<&Yardsticks>,
    n: u64,
    repeat: u32,
) -> anyhow::Result<RunResult> {
    let expected_docs = 9 * n;
    let service = h.service().await?;
    let probe = CpuProbe::new(h.dir(), service.pid);
    let (mut jobs, mut batches, mut pairs, mut load) = (vec![], vec![], vec![], vec![]);
    let mut node_org = None;
    for rep in 0..repeat {
        // Fresh organisations for each pair (and the Node one with the first).
        let with_node = rep == 0 && node.is_some();
        let mut orgs = seed(h, n, if with_node { 3 } else { 2 }).await?;
        if with_node {
            node_org = orgs.pop();
        }
        let (a, b) = (orgs[0].org_id, orgs[1].org_id);
        load.push(load_average());
        let before = probe.sample();
        let mut batched = delete_batched(h, b).await?;
        batched.cpu = probe.sample().json_since(&before);
        let before = probe.sample();
        let mut job = delete_job(h, a).await?;
        job.cpu = probe.sample().json_since(&before);
        eprintln!(
            "pair {}: job {:.0}/s, batched {:.0}/s, ratio {:.2} (load {:.1})",
            rep + 1,
            job.contacts_rps(),
            batched.contacts_rps(),
            job.contacts_rps() / batched.contacts_rps().max(f64::MIN_POSITIVE),
            load.last().copied().unwrap_or(0.0)
        );
        check_removed(
            h,
            n,
            &[("job", &job, a), ("batched deleteMany", &batched, b)],
        )
        .await?;
        if job.docs != expected_docs || batched.docs != expected_docs {
            bail!(
                "documents removed: job {}, batched {}, expected {expected_docs}",
                job.docs,
                batched.docs
            );
        }
        pairs.push(job.contacts_rps() / batched.contacts_rps().max(f64::MIN_POSITIVE));
        jobs.push(job);
        batches.push(batched);
        // What the job wrote besides its deletes goes (untimed), so every
        // pair runs against a database of the same size.
        clean_up(h, a).await?;
    }
    let node_side = match (node, node_org) {
        (Some(node), Some(c)) => {
            let stage = *c.stage_ids.first().context("seeded without a stage")?;
            let before = probe.sample();
            let run = node
                .delete(&h.mongo.uri(), super::DB, c.org_id, stage)
                .await?;
            let side = Side {
                contacts: run.count,
                docs: run.count * 9,
                took: run.took,
                cpu: probe.sample().json_since(&before),
            };
            check_removed(h, n, &[("node cascade", &side, c.org_id)]).await?;
            side
        }
        _ => Side {
            contacts: 0,
            docs: 0,
            took: Duration::ZERO,
            cpu: json!({}),
        },
    };
    let mem = service.stop().await;
    Ok(RunResult {
        contacts: n,
        job: median_run(jobs).context("no job run")?,
        batched: median_run(batches).context("no yardstick run")?,
        node: node_side,
        mem,
        pairs,
        load,
    })
}

/// Fails unless each side removed all `n` contacts and left nothing of its organisation.
async fn check_removed(
    h: &Harness,
    n: u64,
    sides: &[(&str, &Side, ObjectId)],
) -> anyhow::Result<()> {
    for (name, side, org) in sides {
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
    Ok(())
}

/// Removes what a delete job of `org` wrote: kept documents, audit entries,
/// notifications.
async fn clean_up(h: &Harness, org: ObjectId) -> anyhow::Result<()> {
    for coll in ["bulk_kept", "event_logs", "notifications"] {
        h.db.collection::<Document>(coll)
            .delete_many(doc! {"orgId": org})
            .await?;
    }
    Ok(())
}

async fn delete_job(h: &Harness, org: ObjectId) -> anyhow::Result<Side> {
    let cmd = DeleteCommand {
        org_id: Some(org.into()),
        filter: Some(FilterSpec::org_wide()),
        ..DeleteCommand::default()
    };
    let (snap, took) = h.run_job(&org.to_hex(), |nats| nats.delete(&cmd)).await?;
    let c = snap.counts;
    Ok(Side {
        contacts: c.contacts,
        docs: c.contacts + c.conversations + c.messages,
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
    println!("the job keeps what it removes (restorable); runs interleaved: yardstick, job, … per pair; job/batched is the median of the pairs' ratios, rates are the median runs");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.contacts.to_string(),
                format!("{:.1}", r.job.took.as_secs_f64()),
                format!("{:.0}", r.job.contacts_rps()),
                format!("{:.0}", r.batched.contacts_rps()),
                format!("{:.2}", r.ratio_batched()),
                r.pairs
                    .iter()
                    .map(|p| format!("{p:.2}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                format!("{:.0}", r.node.contacts_rps()),
                format!("{:.2}", r.over(&r.node)),
                format!("{:.1}", mb(r.mem.hwm_kb)),
                r.load
                    .iter()
                    .map(|p| format!("{p:.1}"))
                    .collect::<Vec<_>>()
                    .join(" "),
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
            "pairs",
            "node contacts/s",
            "job/node",
            "VmHWM MB",
            "load avg",
        ],
        &rows,
    );
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "targets: job/batched >= 0.50 ({}), job/node >= 10 ({}), peak RSS <= 64 MB ({})",
        verdict(results.iter().all(|r| r.ratio_batched() >= 0.5)),
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
