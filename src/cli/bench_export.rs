//! `contact-bulk bench export`: an org-wide CSV export job through the real
//! service (rows/s from the reply to the completed event) side by side with
//! the two yardsticks of the same organisation in the same run: the server's
//! limit (a raw cursor drain: `RawDocumentBuf`, no projection, the same filter
//! and `_id` sort, batches of 1,000) and what a user would write instead (the
//! Node export of `yardsticks/`), plus the service's peak RSS, at each size.

use contact_bulk_protocol::subjects::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bson::{oid::ObjectId, RawDocumentBuf};
use clap::Args;
use contact_bulk_actors::filter::Filter;
use futures::TryStreamExt;
use serde_json::json;

use super::bench::{mb, print_table, rate, round, timed, Common, Harness, Memory};
use super::bench_cpu::CpuProbe;
use super::client::{status, JobView};
use super::yardsticks::Yardsticks;
use contact_bulk_testkit::seed::{seed_org, SeedSpec};

/// Options of `bench export`.
#[derive(Debug, Clone, Args)]
pub struct ExportBench {
    /// Contacts of each run (one organisation and one service process per size).
    #[arg(long, value_delimiter = ',', default_value = "300000,1000000")]
    pub rows: Vec<u64>,
    /// Print one JSON line for scripts after the table.
    #[arg(long)]
    pub json: bool,
    /// Scratch directory options.
    #[command(flatten)]
    pub common: Common,
}

/// One size's figures.
#[derive(Debug, Clone)]
struct RunResult {
    rows: u64,
    export: Duration,
    /// From the reply to `startedAt` (snapshot, total count).
    init: Duration,
    /// The faster of two raw drains (one before the job, one after).
    drain: Duration,
    node: Duration,
    mem: Memory,
    cpu: serde_json::Value,
}

impl RunResult {
    fn export_rps(&self) -> f64 {
        rate(self.rows, self.export)
    }
    fn drain_rps(&self) -> f64 {
        rate(self.rows, self.drain)
    }
    fn node_rps(&self) -> f64 {
        rate(self.rows, self.node)
    }
    fn over_drain(&self) -> f64 {
        ratio(self.export_rps(), self.drain_rps())
    }
    fn over_node(&self) -> f64 {
        ratio(self.export_rps(), self.node_rps())
    }
    fn json(&self) -> serde_json::Value {
        json!({
            "rows": self.rows,
            "exportSeconds": round(self.export.as_secs_f64()),
            "initSeconds": round(self.init.as_secs_f64()),
            "exportRowsPerSec": round(self.export_rps()),
            "drainSeconds": round(self.drain.as_secs_f64()),
            "drainRowsPerSec": round(self.drain_rps()),
            "nodeSeconds": round(self.node.as_secs_f64()),
            "nodeRowsPerSec": round(self.node_rps()),
            "ratioDrain": round(self.over_drain()),
            "ratioNode": round(self.over_node()),
            "peakRssMb": round(mb(self.mem.hwm_kb)),
            "sampledRssMb": round(mb(self.mem.sampled_kb)),
            "jobCpuSeconds": self.cpu,
        })
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Runs the export benchmark.
pub async fn run(args: ExportBench) -> anyhow::Result<()> {
    let mut sizes: Vec<u64> = args.rows.iter().map(|&n| n.max(1)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let node = Yardsticks::install().await?;
    let mut h = Harness::start(&args.common).await?;
    eprintln!("seeding {sizes:?} contacts (one organisation per size)");
    let (orgs, took) = timed(futures::future::try_join_all(sizes.iter().map(|&n| {
        let db = h.db.clone();
        async move {
            let spec = SeedSpec {
                contacts: n,
                conversation_every: 0,
                ..SeedSpec::demo()
            };
            seed_org(&db, ObjectId::new(), &spec)
                .await
                .map(|o| (n, o.org_id))
        }
    })))
    .await;
    let orgs = orgs?;
    eprintln!("seeded in {:.1} s", took.as_secs_f64());
    let mut results = Vec::new();
    for (n, org) in orgs {
        let r = run_one(&mut h, &node, n, org).await?;
        eprintln!(
            "{n} rows: export {:.0} rows/s, raw drain {:.0} ({:.2}x), node {:.0} ({:.2}x), peak rss {:.1} MB",
            r.export_rps(),
            r.drain_rps(),
            r.over_drain(),
            r.node_rps(),
            r.over_node(),
            mb(r.mem.hwm_kb)
        );
        results.push(r);
    }
    report(&results, args.json);
    Ok(())
}

async fn run_one(
    h: &mut Harness,
    node: &Yardsticks,
    n: u64,
    org: ObjectId,
) -> anyhow::Result<RunResult> {
    let service = h.service().await?;
    let probe = CpuProbe::new(h.dir(), service.pid);
    // Drain before and after the export; the faster one is the yardstick, so
    // a cold cache never flatters the ratio.
    let (first, d1) = timed(drain(&h.db, org)).await;
    let out = h.dir().join(format!("node-export-{n}.csv"));
    let node_run = node
        .export(&h.mongo.uri(), super::bench::DB, org, &out)
        .await?;
    let _ = std::fs::remove_file(&out);
    let before = probe.sample();
    let (export, init) = export_job(h, n, org).await?;
    let cpu = probe.sample().json_since(&before);
    let (second, d2) = timed(drain(&h.db, org)).await;
    let mem = service.stop().await;
    for count in [first?, second?, node_run.count] {
        if count != n {
            bail!("a yardstick read {count} documents, expected {n}");
        }
    }
    Ok(RunResult {
        rows: n,
        export,
        init,
        drain: d1.min(d2),
        node: node_run.took,
        mem,
        cpu,
    })
}

/// The server's limit: `find(<the job's org-wide filter>).sort({_id: 1})`,
/// batches of 1,000, no projection, each document left as raw BSON.
async fn drain(db: &mongodb::Database, org: ObjectId) -> anyhow::Result<u64> {
    let filter = Filter {
        org_wide: true,
        ..Filter::default()
    };
    let mut cursor = db
        .collection::<RawDocumentBuf>("contacts")
        .find(filter.query(org))
        .sort(bson::doc! {"_id": 1})
        .batch_size(1000)
        .await?;
    let mut n = 0u64;
    while cursor.try_next().await?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// The export job, timed from its reply to its completed event; also the
/// time from the reply to its `startedAt`.
async fn export_job(h: &Harness, n: u64, org: ObjectId) -> anyhow::Result<(Duration, Duration)> {
    let org = org.to_hex();
    let mut events = h.nats.job_events(&org, None).await?;
    let reply = h
        .nats
        .request(
            Command::Export,
            &json!({"orgId": org, "format": "csv", "filter": {"orgWide": true}}),
        )
        .await?;
    let t0 = Instant::now();
    let job_id = reply["jobId"]
        .as_str()
        .context("export reply without jobId")?;
    let snap = h
        .nats
        .follow(&org, job_id, &mut events, &mut JobView::quiet())
        .await?;
    let took = t0.elapsed();
    if status(&snap) != "completed" || snap["result"]["rows"].as_u64() != Some(n) {
        bail!("export did not complete with {n} rows: {snap}");
    }
    let ms = |k: &str| {
        snap[k]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis())
    };
    let init = match (ms("createdAt"), ms("startedAt")) {
        (Some(c), Some(s)) if s >= c => Duration::from_millis((s - c) as u64),
        _ => Duration::ZERO,
    };
    Ok((took, init))
}

fn report(results: &[RunResult], json_line: bool) {
    println!();
    println!("export benchmark: org-wide CSV, default columns, one service process per size");
    println!("yardsticks: raw drain (RawDocumentBuf, no projection, _id sort, batches of 1,000); node export.js (mongodb driver -> csv-stringify -> file)");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.rows.to_string(),
                format!("{:.1}", r.export.as_secs_f64()),
                format!("{:.0}", r.export_rps()),
                format!("{:.0}", r.drain_rps()),
                format!("{:.2}", r.over_drain()),
                format!("{:.0}", r.node_rps()),
                format!("{:.2}", r.over_node()),
                format!("{:.1}", mb(r.mem.hwm_kb)),
            ]
        })
        .collect();
    print_table(
        &[
            "rows",
            "job s",
            "job rows/s",
            "raw drain rows/s",
            "job/drain",
            "node rows/s",
            "job/node",
            "VmHWM MB",
        ],
        &rows,
    );
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "targets: job/drain >= 0.80 ({}), job/node >= 3 ({}), peak RSS <= 64 MB ({})",
        verdict(results.iter().all(|r| r.over_drain() >= 0.8)),
        verdict(results.iter().all(|r| r.over_node() >= 3.0)),
        verdict(results.iter().all(|r| r.mem.hwm_kb <= 64 * 1024)),
    );
    for r in results {
        println!("cpu seconds during the {} row job: {}", r.rows, r.cpu);
    }
    let Some(last) = results.last() else {
        return;
    };
    if json_line {
        let mut line = last.json();
        line["bench"] = json!("export");
        line["runs"] = json!(results.iter().map(RunResult::json).collect::<Vec<_>>());
        println!("{line}");
    }
}
