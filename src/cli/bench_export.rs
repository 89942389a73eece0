//! `contact-bulk bench export`: an org-wide CSV export job through the real
//! service (rows/s from the reply to the completed event) against a raw cursor
//! drain of the same query with the same driver, plus the service's peak RSS,
//! at a smaller size and at the asked one so memory growth with N shows.

use contact_bulk_protocol::subjects::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bson::{oid::ObjectId, Document};
use clap::Args;
use contact_bulk_actors::encode::ColumnSpec;
use contact_bulk_actors::filter::Filter;
use futures::TryStreamExt;
use serde_json::json;

use super::bench::{mb, print_table, rate, timed, Common, Harness, Memory};
use super::client::{status, JobView};
use crate::seed::{seed_org, SeedSpec};

/// Options of `bench export`.
#[derive(Debug, Clone, Args)]
pub struct ExportBench {
    /// Contacts of the largest run.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Contacts of the first, smaller run (default: rows/10 when rows >= 100000; 0 = none).
    #[arg(long)]
    pub small: Option<u64>,
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
    drain: Duration,
    mem: Memory,
}

impl RunResult {
    fn export_rps(&self) -> f64 {
        rate(self.rows, self.export)
    }
    fn drain_rps(&self) -> f64 {
        rate(self.rows, self.drain)
    }
    fn ratio(&self) -> f64 {
        let d = self.drain_rps();
        if d > 0.0 {
            self.export_rps() / d
        } else {
            0.0
        }
    }
    fn json(&self) -> serde_json::Value {
        json!({
            "rows": self.rows,
            "exportSeconds": round(self.export.as_secs_f64()),
            "initSeconds": round(self.init.as_secs_f64()),
            "exportRowsPerSec": round(self.export_rps()),
            "drainSeconds": round(self.drain.as_secs_f64()),
            "drainRowsPerSec": round(self.drain_rps()),
            "ratio": round(self.ratio()),
            "peakRssMb": round(mb(self.mem.hwm_kb)),
            "sampledRssMb": round(mb(self.mem.sampled_kb)),
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs the export benchmark.
pub async fn run(args: ExportBench) -> anyhow::Result<()> {
    let small = args.small.unwrap_or(if args.rows >= 100_000 {
        args.rows / 10
    } else {
        0
    });
    let mut sizes = vec![args.rows.max(1)];
    if small > 0 && small < args.rows {
        sizes.insert(0, small);
    }
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
        let r = run_one(&mut h, n, org).await?;
        eprintln!(
            "{n} rows: export {:.0} rows/s, drain {:.0} rows/s, ratio {:.2}, peak rss {:.1} MB",
            r.export_rps(),
            r.drain_rps(),
            r.ratio(),
            mb(r.mem.hwm_kb)
        );
        results.push(r);
    }
    report(&results);
    Ok(())
}

async fn run_one(h: &mut Harness, n: u64, org: ObjectId) -> anyhow::Result<RunResult> {
    let service = h.service().await?;
    // Drain before and after the export; the faster one is the reference, so
    // a cold cache never flatters the ratio.
    let (first, d1) = timed(drain(&h.db, org)).await;
    let (export, init) = export_job(h, n, org).await?;
    let (second, d2) = timed(drain(&h.db, org)).await;
    let mem = service.stop().await;
    for count in [first?, second?] {
        if count != n {
            bail!("drain read {count} documents, expected {n}");
        }
    }
    Ok(RunResult {
        rows: n,
        export,
        init,
        drain: d1.min(d2),
        mem,
    })
}

/// `find({orgId}).sort({_id: 1})`, batch size 1000, the export's projection,
/// counting documents.
async fn drain(db: &mongodb::Database, org: ObjectId) -> anyhow::Result<u64> {
    let filter = Filter {
        org_wide: true,
        ..Filter::default()
    };
    let mut cursor = db
        .collection::<Document>("contacts")
        .find(filter.query(org))
        .sort(bson::doc! {"_id": 1})
        .projection(ColumnSpec::default_columns().projection())
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

fn report(results: &[RunResult]) {
    println!();
    println!("export benchmark: org-wide CSV, default columns, one service process per size");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.rows.to_string(),
                format!("{:.1}", r.export.as_secs_f64()),
                format!("{:.0}", r.export_rps()),
                format!("{:.1}", r.drain.as_secs_f64()),
                format!("{:.0}", r.drain_rps()),
                format!("{:.2}", r.ratio()),
                format!("{:.1}", mb(r.mem.hwm_kb)),
                format!("{:.1}", mb(r.mem.sampled_kb)),
            ]
        })
        .collect();
    print_table(
        &[
            "rows",
            "export s",
            "export rows/s",
            "drain s",
            "drain rows/s",
            "ratio",
            "VmHWM MB",
            "max VmRSS MB",
        ],
        &rows,
    );
    let Some(last) = results.last() else {
        return;
    };
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "targets: ratio >= 0.80 ({}), peak RSS <= 64 MB ({})",
        verdict(last.ratio() >= 0.8),
        verdict(results.iter().all(|r| r.mem.hwm_kb <= 64 * 1024)),
    );
    let mut line = last.json();
    line["bench"] = json!("export");
    line["runs"] = json!(results.iter().map(RunResult::json).collect::<Vec<_>>());
    println!("{line}");
}
