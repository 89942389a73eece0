//! `contact-bulk bench restore`: an organisation (every contact with 2
//! conversations of 3 messages) is removed by a delete job of the real service
//! (which keeps what it removes), then put back twice: first by plain
//! `insertMany` calls of the very documents the delete kept, 1,000 per call,
//! collection by collection (the yardstick; removed again untimed), then by
//! the restore job (audit entries, events and notifications included).
//! Documents/s side by side and the ratio, `--repeat` times on fresh
//! organisations (the median run by ratio is reported, with the load average).

use std::time::Instant;

use anyhow::bail;
use bson::{doc, oid::ObjectId, Document, RawDocumentBuf};
use clap::Args;
use contact_bulk_protocol::commands::{DeleteCommand, JobId, RestoreCommand};
use contact_bulk_protocol::filter::FilterSpec;
use futures::TryStreamExt;
use serde_json::json;

use super::{mb, print_table, round, Common, Harness};
use crate::seed::{seed_org, SeedSpec};
use contact_bulk_actors::restore::kept::{self, Kind};

/// Documents per `insertMany` of the yardstick.
const YARDSTICK_BATCH: usize = 1000;

/// Options of `bench restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreBench {
    /// Contacts per run, one run per size (each contact with 2 conversations
    /// of 3 messages).
    #[arg(long, value_delimiter = ',', default_value = "20000")]
    pub contacts: Vec<u64>,
    /// Runs per size, each on a fresh organisation: yardstick then job; the
    /// ratio is the median of the runs'.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Print one JSON line for scripts after the table.
    #[arg(long)]
    pub json: bool,
    /// Scratch directory options.
    #[command(flatten)]
    pub common: Common,
}

struct RunResult {
    contacts: u64,
    docs: u64,
    delete_s: f64,
    insert_s: f64,
    restore_s: f64,
    peak_kb: u64,
    /// The 1-minute load average before the run.
    load: f64,
}

impl RunResult {
    fn ratio(&self) -> f64 {
        if self.restore_s > 0.0 {
            self.insert_s / self.restore_s
        } else {
            0.0
        }
    }
}

/// Runs the restore benchmark.
pub async fn run(args: RestoreBench) -> anyhow::Result<()> {
    let mut h = Harness::start(&args.common).await?;
    let mut results = Vec::new();
    for n in args.contacts.iter().map(|&n| n.max(1)) {
        let mut runs = Vec::new();
        for rep in 0..args.repeat.max(1) {
            let r = run_one(&mut h, n).await?;
            eprintln!(
                "{n} contacts, run {}: delete job {:.0} contacts/s, restore job {:.0} docs/s, insertMany {:.0} docs/s ({:.2}x), load {:.1}",
                rep + 1,
                n as f64 / r.delete_s,
                r.docs as f64 / r.restore_s,
                r.docs as f64 / r.insert_s,
                r.ratio(),
                r.load,
            );
            runs.push(r);
        }
        // The run of median ratio stands for the size.
        runs.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
        let mid = (runs.len() - 1) / 2;
        let ratios: Vec<f64> = runs.iter().map(RunResult::ratio).collect();
        eprintln!("{n} contacts: ratios {ratios:?}");
        results.push((runs.swap_remove(mid), ratios));
    }
    println!();
    println!("restore benchmark: a delete job's kept documents put back, every contact with 2 conversations x 3 messages");
    println!("yardstick: insertMany of the same documents, 1,000 per call, contacts then conversations then messages");
    println!("each run: the delete job (keeping what it removes), the yardstick, then the restore job; the median run by ratio is shown");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(r, ratios)| {
            vec![
                r.contacts.to_string(),
                r.docs.to_string(),
                format!("{:.1}", r.delete_s),
                format!("{:.0}", r.contacts as f64 / r.delete_s),
                format!("{:.0}", r.docs as f64 / r.restore_s),
                format!("{:.0}", r.docs as f64 / r.insert_s),
                format!("{:.2}", r.ratio()),
                ratios
                    .iter()
                    .map(|p| format!("{p:.2}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                format!("{:.1}", mb(r.peak_kb)),
                format!("{:.1}", r.load),
            ]
        })
        .collect();
    print_table(
        &[
            "contacts",
            "documents",
            "delete s",
            "delete contacts/s",
            "restore docs/s",
            "insertMany docs/s",
            "restore/insertMany",
            "runs",
            "VmHWM MB",
            "load avg",
        ],
        &rows,
    );
    println!(
        "target: restore/insertMany >= 0.50 ({})",
        if results.iter().all(|(r, _)| r.ratio() >= 0.5) {
            "met"
        } else {
            "missed"
        }
    );
    if args.json {
        let runs: Vec<_> = results
            .iter()
            .map(|(r, ratios)| {
                json!({
                    "contacts": r.contacts, "documents": r.docs,
                    "deleteSeconds": round(r.delete_s),
                    "restoreSeconds": round(r.restore_s),
                    "insertManySeconds": round(r.insert_s),
                    "ratio": round(r.ratio()),
                    "runRatios": ratios.iter().map(|x| round(*x)).collect::<Vec<_>>(),
                    "peakRssMb": round(mb(r.peak_kb)),
                    "loadAverage": round(r.load),
                })
            })
            .collect();
        println!("{}", json!({"bench": "restore", "runs": runs}));
    }
    Ok(())
}

async fn run_one(h: &mut Harness, n: u64) -> anyhow::Result<RunResult> {
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
        "seeding {n} contacts, {} conversations, {} messages",
        2 * n,
        6 * n
    );
    let org = seed_org(&h.db, ObjectId::new(), &spec).await?.org_id;
    let service = h.service().await?;
    let hex = org.to_hex();

    let t = Instant::now();
    let delete = DeleteCommand {
        org_id: Some(org.into()),
        filter: Some(FilterSpec::org_wide()),
        ..DeleteCommand::default()
    };
    let (source, _) = h.run_job(&hex, |nats| nats.delete(&delete)).await?;
    let delete_s = t.elapsed().as_secs_f64();
    let source_id = source.job_id;
    let c = source.counts;
    let docs = c.contacts + c.conversations + c.messages;

    // The yardstick: the kept documents, read untimed, inserted by insertMany.
    let by_coll = kept_originals(h, &source_id).await?;
    let read: u64 = by_coll.iter().map(|(_, d)| d.len() as u64).sum();
    if read != docs {
        bail!("kept {read} documents, the delete removed {docs}");
    }
    let t = Instant::now();
    for (coll, list) in &by_coll {
        for chunk in list.chunks(YARDSTICK_BATCH) {
            h.db.collection::<RawDocumentBuf>(coll)
                .insert_many(chunk.to_vec())
                .await?;
        }
    }
    let insert_s = t.elapsed().as_secs_f64();
    drop(by_coll);
    for coll in ["contacts", "conversations", "messages"] {
        h.db.collection::<Document>(coll)
            .delete_many(doc! {"orgId": org})
            .await?;
    }

    let load = super::delete::load_average();
    let t = Instant::now();
    let restore = RestoreCommand {
        org_id: Some(org.into()),
        job_id: Some(JobId(source_id.clone())),
        ..RestoreCommand::default()
    };
    let (restored, _) = h.run_job(&hex, |nats| nats.restore(&restore)).await?;
    let restore_s = t.elapsed().as_secs_f64();
    let peak_kb = service.stop().await.hwm_kb;
    let r = restored.counts;
    let (rc, rv, rm) = (r.contacts, r.conversations, r.messages);
    let mut left = 0;
    for coll in ["contacts", "conversations", "messages"] {
        left +=
            h.db.collection::<Document>(coll)
                .count_documents(doc! {"orgId": org})
                .await?;
    }
    if rc + rv + rm != docs || left != docs {
        bail!(
            "restored {} documents ({left} in place) of {docs}",
            rc + rv + rm
        );
    }
    // What the jobs wrote besides the data goes (untimed), so every run
    // starts from a database of the same size.
    for coll in [
        "contacts",
        "conversations",
        "messages",
        "bulk_kept",
        "event_logs",
        "notifications",
    ] {
        h.db.collection::<Document>(coll)
            .delete_many(doc! {"orgId": org})
            .await?;
    }
    Ok(RunResult {
        contacts: n,
        docs,
        delete_s,
        insert_s,
        restore_s,
        peak_kb,
        load,
    })
}

/// The original documents a delete kept, by collection: each contact's
/// bundle (the contact and the children it holds) and the children kept apart.
async fn kept_originals(
    h: &Harness,
    source_id: &str,
) -> anyhow::Result<Vec<(&'static str, Vec<RawDocumentBuf>)>> {
    let (mut contacts, mut conversations, mut messages) = (vec![], vec![], vec![]);
    let coll = h.db.collection::<RawDocumentBuf>("bulk_kept");
    let range = |tag: char| {
        doc! {"_id": {"$gt": format!("{source_id}:{tag}:"), "$lt": format!("{source_id}:{tag};")}}
    };
    let mut bundles = coll.find(range('c')).await?;
    while let Some(k) = bundles.try_next().await? {
        contacts.push(kept::original(&k)?.to_raw_document_buf());
        for (kind, out) in [
            (Kind::Conversation, &mut conversations),
            (Kind::Message, &mut messages),
        ] {
            for d in kept::embedded(&k, kind)? {
                out.push(d.to_raw_document_buf());
            }
        }
    }
    for (tag, out) in [('v', &mut conversations), ('m', &mut messages)] {
        let mut apart = coll.find(range(tag)).await?;
        while let Some(k) = apart.try_next().await? {
            out.push(kept::original(&k)?.to_raw_document_buf());
        }
    }
    Ok(vec![
        ("contacts", contacts),
        ("conversations", conversations),
        ("messages", messages),
    ])
}
