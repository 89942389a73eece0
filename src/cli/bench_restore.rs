//! `contact-bulk bench restore`: an organisation (every contact with 2
//! conversations of 3 messages) is removed by a delete job of the real service
//! (which keeps what it removes), then put back twice: first by plain
//! `insertMany` calls of the very documents the delete kept, 1,000 per call,
//! collection by collection (the yardstick; removed again untimed), then by
//! the restore job (audit entries, events and notifications included).
//! Documents/s side by side and the ratio.

use std::time::Instant;

use anyhow::{bail, Context};
use bson::{doc, oid::ObjectId, Document, RawDocumentBuf};
use clap::Args;
use contact_bulk_protocol::subjects::Command;
use futures::TryStreamExt;
use serde_json::json;

use super::bench::{mb, print_table, round, Common, Harness};
use super::client::{counts, status, JobView};
use contact_bulk_testkit::seed::{seed_org, SeedSpec};

/// Documents per `insertMany` of the yardstick.
const YARDSTICK_BATCH: usize = 1000;

/// Options of `bench restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreBench {
    /// Contacts per run, one run per size (each contact with 2 conversations
    /// of 3 messages).
    #[arg(long, value_delimiter = ',', default_value = "20000")]
    pub contacts: Vec<u64>,
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
        let r = run_one(&mut h, n).await?;
        eprintln!(
            "{n} contacts: restore job {:.0} docs/s, insertMany {:.0} docs/s ({:.2}x)",
            r.docs as f64 / r.restore_s,
            r.docs as f64 / r.insert_s,
            r.ratio()
        );
        results.push(r);
    }
    println!();
    println!("restore benchmark: a delete job's kept documents put back, every contact with 2 conversations x 3 messages");
    println!("yardstick: insertMany of the same documents, 1,000 per call, contacts then conversations then messages");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.contacts.to_string(),
                r.docs.to_string(),
                format!("{:.1}", r.delete_s),
                format!("{:.0}", r.docs as f64 / r.restore_s),
                format!("{:.0}", r.docs as f64 / r.insert_s),
                format!("{:.2}", r.ratio()),
                format!("{:.1}", mb(r.peak_kb)),
            ]
        })
        .collect();
    print_table(
        &[
            "contacts",
            "documents",
            "delete s",
            "restore docs/s",
            "insertMany docs/s",
            "restore/insertMany",
            "VmHWM MB",
        ],
        &rows,
    );
    println!(
        "target: restore/insertMany >= 0.50 ({})",
        if results.iter().all(|r| r.ratio() >= 0.5) {
            "met"
        } else {
            "missed"
        }
    );
    if args.json {
        let runs: Vec<_> = results
            .iter()
            .map(|r| {
                json!({
                    "contacts": r.contacts, "documents": r.docs,
                    "deleteSeconds": round(r.delete_s),
                    "restoreSeconds": round(r.restore_s),
                    "insertManySeconds": round(r.insert_s),
                    "ratio": round(r.ratio()),
                    "peakRssMb": round(mb(r.peak_kb)),
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
    let source = run_job(
        h,
        &hex,
        Command::Delete,
        json!({"orgId": hex, "filter": {"orgWide": true}}),
    )
    .await?;
    let delete_s = t.elapsed().as_secs_f64();
    let source_id = source["jobId"]
        .as_str()
        .context("delete snapshot without jobId")?
        .to_string();
    let (c, v, m) = counts(&source);
    let docs = c + v + m;

    // The yardstick: the kept documents, read untimed, inserted by insertMany.
    let mut by_coll: Vec<(&str, char, Vec<RawDocumentBuf>)> = vec![
        ("contacts", 'c', Vec::new()),
        ("conversations", 'v', Vec::new()),
        ("messages", 'm', Vec::new()),
    ];
    for (_, tag, out) in by_coll.iter_mut() {
        let mut cursor = h
            .db
            .collection::<RawDocumentBuf>("bulk_kept")
            .find(doc! {"_id": {"$gt": format!("{source_id}:{tag}:"), "$lt": format!("{source_id}:{tag};")}})
            .await?;
        while let Some(k) = cursor.try_next().await? {
            out.push(k.get_document("doc")?.to_raw_document_buf());
        }
    }
    let read: u64 = by_coll.iter().map(|(_, _, d)| d.len() as u64).sum();
    if read != docs {
        bail!("kept {read} documents, the delete removed {docs}");
    }
    let t = Instant::now();
    for (coll, _, list) in &by_coll {
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

    let t = Instant::now();
    let restored = run_job(
        h,
        &hex,
        Command::Restore,
        json!({"orgId": hex, "jobId": source_id}),
    )
    .await?;
    let restore_s = t.elapsed().as_secs_f64();
    let peak_kb = service.stop().await.hwm_kb;
    let (rc, rv, rm) = counts(&restored);
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
    Ok(RunResult {
        contacts: n,
        docs,
        delete_s,
        insert_s,
        restore_s,
        peak_kb,
    })
}

/// Starts a job by `subject` and follows it to its end; its final snapshot.
async fn run_job(
    h: &Harness,
    org: &str,
    subject: Command,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let mut events = h.nats.job_events(org, None).await?;
    let reply = h.nats.request(subject, &body).await?;
    let job_id = reply["jobId"]
        .as_str()
        .with_context(|| format!("{subject} reply without jobId: {reply}"))?;
    let snap = h
        .nats
        .follow(org, job_id, &mut events, &mut JobView::quiet())
        .await?;
    if status(&snap) != "completed" {
        bail!("{subject} job did not complete: {snap}");
    }
    Ok(snap)
}
