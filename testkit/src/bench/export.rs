//! `contact-bulk bench export`: an org-wide CSV export job through the real
//! service (rows/s from the reply to the completed event) side by side with
//! the two yardsticks of the same organisation in the same run: the server's
//! limit (a raw cursor drain: `RawDocumentBuf`, no projection, the same filter
//! and `_id` sort, batches of 1,000) and what a user would write instead (the
//! Node export of `yardsticks/`), plus the service's peak RSS, at each size.
//! The rounds of a size are interleaved (drain, job, node, drain, …) and each
//! ratio compares a job with the yardsticks run next to it; the medians are
//! reported with the load average, since the box's speed drifts.

use contact_bulk_protocol::commands::ExportCommand;
use contact_bulk_protocol::filter::{FilterSpec, Format};
use std::time::Duration;

use anyhow::bail;
use bson::{oid::ObjectId, RawDocumentBuf};
use clap::Args;
use contact_bulk_actors::filter::Filter;
use futures::TryStreamExt;
use serde_json::json;

use super::cpu::CpuProbe;
use super::yardsticks::Yardsticks;
use super::{mb, print_table, rate, round, timed, Common, Harness, Memory};
use crate::seed::{seed_org, SeedSpec};

/// Options of `bench export`.
#[derive(Debug, Clone, Args)]
pub struct ExportBench {
    /// Contacts of each run (one organisation and one service process per size).
    #[arg(long, value_delimiter = ',', default_value = "300000,1000000")]
    pub rows: Vec<u64>,
    /// Rounds per size, interleaved (drain, job, node, drain, job, node, …,
    /// drain): each job is compared with the yardsticks run next to it, and
    /// the median of those ratios is reported, so a drift of the box's speed
    /// over the run moves both sides of a ratio alike.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Print one JSON line for scripts after the table.
    #[arg(long)]
    pub json: bool,
    /// Scratch directory options.
    #[command(flatten)]
    pub common: Common,
}

/// One round: the job and the yardsticks run next to it.
#[derive(Debug, Clone)]
struct Round {
    export: Duration,
    /// From the reply to `startedAt` (snapshot, header).
    init: Duration,
    /// The faster of the drains just before and just after the job.
    drain: Duration,
    node: Duration,
    cpu: serde_json::Value,
}

impl Round {
    fn over_drain(&self) -> f64 {
        ratio(secs(self.drain), secs(self.export))
    }
    fn over_node(&self) -> f64 {
        ratio(secs(self.node), secs(self.export))
    }
}

/// One size's figures.
#[derive(Debug, Clone)]
struct RunResult {
    rows: u64,
    rounds: Vec<Round>,
    mem: Memory,
    /// 1-minute load average before and after the size's rounds.
    load: (f64, f64),
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The median (the lower middle of an even count); 0 for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n => v[(n - 1) / 2],
    }
}

impl RunResult {
    fn rates(&self, of: impl Fn(&Round) -> Duration) -> f64 {
        median(self.rounds.iter().map(|r| rate(self.rows, of(r))).collect())
    }
    fn export_rps(&self) -> f64 {
        self.rates(|r| r.export)
    }
    fn drain_rps(&self) -> f64 {
        self.rates(|r| r.drain)
    }
    fn node_rps(&self) -> f64 {
        self.rates(|r| r.node)
    }
    fn over_drain(&self) -> f64 {
        median(self.rounds.iter().map(Round::over_drain).collect())
    }
    fn over_node(&self) -> f64 {
        median(self.rounds.iter().map(Round::over_node).collect())
    }
    fn json(&self) -> serde_json::Value {
        let rounds: Vec<serde_json::Value> = self
            .rounds
            .iter()
            .map(|r| {
                json!({
                    "exportSeconds": round(secs(r.export)),
                    "initSeconds": round(secs(r.init)),
                    "drainSeconds": round(secs(r.drain)),
                    "nodeSeconds": round(secs(r.node)),
                    "ratioDrain": round(r.over_drain()),
                    "ratioNode": round(r.over_node()),
                    "jobCpuSeconds": r.cpu,
                })
            })
            .collect();
        json!({
            "rows": self.rows,
            "repeat": self.rounds.len(),
            "exportRowsPerSec": round(self.export_rps()),
            "drainRowsPerSec": round(self.drain_rps()),
            "nodeRowsPerSec": round(self.node_rps()),
            "ratioDrain": round(self.over_drain()),
            "ratioNode": round(self.over_node()),
            "peakRssMb": round(mb(self.mem.hwm_kb)),
            "sampledRssMb": round(mb(self.mem.sampled_kb)),
            "loadAverage": [self.load.0, self.load.1],
            "rounds": rounds,
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

/// The 1-minute load average (0 where `/proc/loadavg` is missing).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
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
        let r = run_one(&mut h, &node, n, org, args.repeat.max(1)).await?;
        eprintln!(
            "{n} rows: export {:.0} rows/s, raw drain {:.0} ({:.2}x), node {:.0} ({:.2}x), peak rss {:.1} MB, load {:.1}-{:.1}",
            r.export_rps(),
            r.drain_rps(),
            r.over_drain(),
            r.node_rps(),
            r.over_node(),
            mb(r.mem.hwm_kb),
            r.load.0,
            r.load.1,
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
    repeat: usize,
) -> anyhow::Result<RunResult> {
    let load_before = load_average();
    let service = h.service().await?;
    let probe = CpuProbe::new(h.dir(), service.pid);
    let out = h.dir().join(format!("node-export-{n}.csv"));
    let check = |what: &str, count: u64| {
        if count == n {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "{what} read {count} documents, expected {n}"
            ))
        }
    };
    // drain, job, node, drain, job, node, …, drain: each job sits between two
    // drains (the faster one is its yardstick, so a cold cache never flatters
    // the ratio) and next to one Node run.
    let (first, mut drain_before) = timed(drain(&h.db, org)).await;
    check("the raw drain", first?)?;
    let mut rounds = Vec::with_capacity(repeat);
    for i in 0..repeat {
        let before = probe.sample();
        let (export, init) = export_job(h, n, org).await?;
        let cpu = probe.sample().json_since(&before);
        let node_run = node.export(&h.mongo.uri(), super::DB, org, &out).await?;
        let _ = std::fs::remove_file(&out);
        check("the node export", node_run.count)?;
        let (count, drain_after) = timed(drain(&h.db, org)).await;
        check("the raw drain", count?)?;
        eprintln!(
            "  {n} rows, round {}: job {:.2} s, drain {:.2} s / {:.2} s, node {:.2} s",
            i + 1,
            secs(export),
            secs(drain_before),
            secs(drain_after),
            secs(node_run.took),
        );
        rounds.push(Round {
            export,
            init,
            drain: drain_before.min(drain_after),
            node: node_run.took,
            cpu,
        });
        drain_before = drain_after;
    }
    let mem = service.stop().await;
    Ok(RunResult {
        rows: n,
        rounds,
        mem,
        load: (load_before, load_average()),
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
    let cmd = ExportCommand {
        org_id: Some(org.into()),
        format: Some(Format::Csv),
        filter: Some(FilterSpec::org_wide()),
        ..ExportCommand::default()
    };
    let (snap, took) = h.run_job(&org.to_hex(), |nats| nats.export(&cmd)).await?;
    let rows = snap.export_result().map(|r| r.rows);
    if rows != i64::try_from(n).ok() {
        bail!(
            "export {} completed with {rows:?} rows, not {n}",
            snap.job_id
        );
    }
    let ms = |t: Option<&str>| {
        t.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis())
    };
    let init = match (ms(Some(&snap.created_at)), ms(snap.started_at.as_deref())) {
        (Some(c), Some(s)) if s >= c => Duration::from_millis((s - c) as u64),
        _ => Duration::ZERO,
    };
    Ok((took, init))
}

fn report(results: &[RunResult], json_line: bool) {
    println!();
    println!("export benchmark: org-wide CSV, default columns, one service process per size");
    println!("yardsticks: raw drain (RawDocumentBuf, no projection, _id sort, batches of 1,000); node export.js (mongodb driver -> csv-stringify -> file)");
    println!("rounds interleaved (drain, job, node, …, drain); rates and ratios are medians over the rounds");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.rows.to_string(),
                r.rounds.len().to_string(),
                format!("{:.0}", r.export_rps()),
                format!("{:.0}", r.drain_rps()),
                format!("{:.2}", r.over_drain()),
                format!("{:.0}", r.node_rps()),
                format!("{:.2}", r.over_node()),
                format!("{:.1}", mb(r.mem.hwm_kb)),
                format!("{:.1}-{:.1}", r.load.0, r.load.1),
            ]
        })
        .collect();
    print_table(
        &[
            "rows",
            "rounds",
            "job rows/s",
            "raw drain rows/s",
            "job/drain",
            "node rows/s",
            "job/node",
            "VmHWM MB",
            "load avg",
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
        for (i, round) in r.rounds.iter().enumerate() {
            println!(
                "{} rows, round {}: job/drain {:.2}, job/node {:.2}; cpu seconds during the job: {}",
                r.rows,
                i + 1,
                round.over_drain(),
                round.over_node(),
                round.cpu
            );
        }
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
