//! The operator CLI (`export`, `delete`, `watch`) as the real binary against a
//! real stack with the service in-process (the benchmarks' own runs are in tests/bench.rs).

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use bson::{doc, oid::ObjectId, Document};
use common::*;
use serde_json::Value;

/// Runs the binary with `args` (stdin not a terminal) and returns its output.
async fn cli(stack: Option<&Stack>, dir: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_contact-bulk"));
    cmd.args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("BULK_SUBJECT_PREFIX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(stack) = stack {
        cmd.env("NATS_URL", stack.nats.url());
    }
    tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("contact-bulk {args:?} did not end within 300 s"))
        .expect("binary runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Org {
    id: ObjectId,
    stages: Vec<ObjectId>,
    contacts: Vec<Document>,
}

/// `n` contacts over 3 stages; every even one has a conversation with 2 messages.
async fn seed(db: &mongodb::Database, n: usize) -> Org {
    let id = ObjectId::new();
    let stages: Vec<ObjectId> = (0..3).map(|_| ObjectId::new()).collect();
    let named: Vec<(ObjectId, &str)> = stages
        .iter()
        .zip(["A", "B", "C"])
        .map(|(s, n)| (*s, n))
        .collect();
    let pipe = pipeline(db, id, "Sales", &named).await;
    let contacts: Vec<Document> = (0..n)
        .map(|i| contact(id, pipe, stages[i % 3], i))
        .collect();
    let mut convs = Vec::new();
    let mut msgs = Vec::new();
    for c in contacts.iter().step_by(2) {
        let (cid, conv) = (c.get_object_id("_id").unwrap(), ObjectId::new());
        convs.push(doc! {"_id": conv, "orgId": id, "contactId": cid});
        for _ in 0..2 {
            msgs.push(doc! {"_id": ObjectId::new(), "orgId": id, "conversationId": conv, "contactId": cid});
        }
    }
    insert(db, "contacts", contacts.clone()).await;
    insert(db, "conversations", convs).await;
    insert(db, "messages", msgs).await;
    Org {
        id,
        stages,
        contacts,
    }
}

async fn count(db: &mongodb::Database, coll: &str, filter: Document) -> u64 {
    db.collection::<Document>(coll)
        .count_documents(filter)
        .await
        .unwrap()
}

fn csv_rows(data: &[u8]) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(data)
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect()
}

fn names(contacts: &[&Document]) -> Vec<(String, String)> {
    contacts
        .iter()
        .map(|c| {
            (
                c.get_str("firstName").unwrap().to_string(),
                c.get_str("lastName").unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn export_downloads_the_file_with_exactly_the_seeded_rows() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 1200).await;
    let _svc = stack.service().await;
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("all.csv");
    let org_hex = org.id.to_hex();
    let out = cli(
        Some(&stack),
        tmp.path(),
        &[
            "export",
            "--org",
            &org_hex,
            "--org-wide",
            "--output",
            out_path.to_str().unwrap(),
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "export failed: {stdout}\n{stderr}");
    assert!(stdout.contains("sha256 ok: "), "{stdout}");
    let data = std::fs::read(&out_path).expect("the file is at --output");
    let rows = csv_rows(&data);
    let got: Vec<(String, String)> = rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(got, names(&org.contacts.iter().collect::<Vec<_>>()));
    assert!(!tmp.path().join("all.csv.part").exists());

    // `watch` on the finished job prints its terminal snapshot.
    let job_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("export job ")?.strip_suffix(" accepted"))
        .expect("job id printed")
        .to_string();
    let out = cli(
        Some(&stack),
        tmp.path(),
        &["watch", &job_id, "--org", &org_hex],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "watch failed: {stdout}\n{stderr}");
    let snap: Value = serde_json::from_str(&stdout).expect("snapshot JSON");
    assert_eq!(snap["status"], "completed");
    assert_eq!(snap["result"]["rows"], 1200);

    // Without --output the file lands under its own name in the current directory.
    let stage = org.stages[1].to_hex();
    let out = cli(
        Some(&stack),
        tmp.path(),
        &[
            "export",
            "--org",
            &org_hex,
            "--stage-ids",
            &stage,
            "--filename",
            "stage-b",
            "--limit",
            "50",
        ],
    )
    .await;
    assert!(out.status.success(), "{:?}", text(&out));
    let rows = csv_rows(&std::fs::read(tmp.path().join("stage-b.csv")).unwrap());
    let expected: Vec<&Document> = org
        .contacts
        .iter()
        .filter(|c| c.get_object_id("stageId").unwrap() == org.stages[1])
        .take(50)
        .collect();
    let got: Vec<(String, String)> = rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(got, names(&expected));
}

#[tokio::test]
async fn delete_with_yes_deletes_what_the_dry_run_announced() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 600).await;
    let _svc = stack.service().await;
    let tmp = tempfile::tempdir().unwrap();
    let (convs, msgs) = (
        count(&db, "conversations", doc! {}).await,
        count(&db, "messages", doc! {}).await,
    );
    let stages = format!("{},{}", org.stages[0].to_hex(), org.stages[2].to_hex());
    let out = cli(
        Some(&stack),
        tmp.path(),
        &[
            "delete",
            "--org",
            &org.id.to_hex(),
            "--stage-ids",
            &stages,
            "--yes",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "delete failed: {stdout}\n{stderr}");
    let announced = stdout
        .lines()
        .find_map(|l| l.strip_prefix("will delete "))
        .expect("impact printed");
    let numbers: Vec<u64> = announced
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    // 400 contacts in stages A and C; every even contact has 1 conversation, 2 messages.
    assert_eq!(numbers, [400, 200, 400], "{announced}");
    assert_eq!(count(&db, "contacts", doc! {"orgId": org.id}).await, 200);
    assert_eq!(
        count(
            &db,
            "contacts",
            doc! {"stageId": {"$in": [org.stages[0], org.stages[2]]}}
        )
        .await,
        0
    );
    assert_eq!(
        convs - count(&db, "conversations", doc! {}).await,
        numbers[1]
    );
    assert_eq!(msgs - count(&db, "messages", doc! {}).await, numbers[2]);
    assert!(
        stdout.contains("completed: deleted 400 contacts, 200 conversations, 400 messages"),
        "{stdout}"
    );
}

#[tokio::test]
async fn delete_without_yes_and_without_a_terminal_refuses() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 90).await;
    let _svc = stack.service().await;
    let tmp = tempfile::tempdir().unwrap();
    let out = cli(
        Some(&stack),
        tmp.path(),
        &["delete", "--org", &org.id.to_hex(), "--org-wide"],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");
    assert!(stdout.contains("will delete 90 contacts"), "{stdout}");
    assert_eq!(count(&db, "contacts", doc! {"orgId": org.id}).await, 90);
    assert_eq!(count(&db, "bulk_jobs", doc! {}).await, 0);
}

#[tokio::test]
async fn an_invalid_filter_exits_non_zero_naming_the_field() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 10).await;
    let _svc = stack.service().await;
    let tmp = tempfile::tempdir().unwrap();
    let org_hex = org.id.to_hex();
    for (args, field) in [
        (
            vec!["export", "--org", &org_hex, "--stage-ids", "nothex"],
            "filter.stageIds[0]",
        ),
        (
            vec!["delete", "--org", &org_hex, "--yes"],
            "filter.stageIds",
        ),
        (
            vec![
                "export",
                "--org",
                &org_hex,
                "--org-wide",
                "--advanced",
                r#"{"$where": "1"}"#,
            ],
            "filter.advancedParams",
        ),
        (vec!["export", "--org", "nope", "--org-wide"], "orgId"),
    ] {
        let out = cli(Some(&stack), tmp.path(), &args).await;
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {stdout}");
        assert!(
            stderr.contains(field),
            "{args:?}: {field} not named in {stderr}"
        );
    }
    assert_eq!(count(&db, "bulk_jobs", doc! {}).await, 0);
    assert_eq!(count(&db, "contacts", doc! {}).await, 10);
}

/// The run command's stack: `contact-bulk dev` starts its own servers, seeds
/// the demo organisation and prints how to reach it; `contact-bulk export`
/// against it downloads every demo contact; SIGTERM stops it cleanly.
#[tokio::test]
async fn cli_export_against_the_dev_stack() {
    use tokio::io::AsyncBufReadExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut dev = tokio::process::Command::new(env!("CARGO_BIN_EXE_contact-bulk"))
        .args([
            "dev",
            "--data-dir",
            tmp.path().join("data").to_str().unwrap(),
            "--http-addr",
            "127.0.0.1:0",
            "--demo-contacts",
            "1500",
        ])
        .env("RUST_LOG", "warn")
        .env_remove("BULK_SUBJECT_PREFIX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(dev.stdout.take().unwrap()).lines();
    let (mut nats, mut org, mut page) = (None, None, None);
    let deadline = Duration::from_secs(120);
    tokio::time::timeout(deadline, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let line = line.trim().to_string();
            if let Some(v) = line.strip_prefix("nats:") {
                nats = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("org:") {
                org = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("web page:") {
                page = Some(v.trim().to_string());
            }
            if line.starts_with("press Ctrl-C") {
                break;
            }
        }
    })
    .await
    .expect("dev stack up within 120 s");
    let (nats, org, page) = (nats.unwrap(), org.unwrap(), page.unwrap());
    // The printed page address serves the page and a healthy service.
    let base = page.split("/#token=").next().unwrap().to_string();
    assert!(page.contains("/#token="), "{page}");
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);

    let out_path = tmp.path().join("demo.csv");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_contact-bulk"));
    cmd.args([
        "export",
        "--org",
        &org,
        "--org-wide",
        "--output",
        out_path.to_str().unwrap(),
    ])
    .env("NATS_URL", &nats)
    .env("RUST_LOG", "warn")
    .env_remove("BULK_SUBJECT_PREFIX")
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("export within 300 s")
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "export failed: {stdout}\n{stderr}");
    let rows = csv_rows(&std::fs::read(&out_path).unwrap());
    assert_eq!(rows.len(), 1500, "every demo contact once");

    // SIGTERM drains and exits 0.
    let pid = dev.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(60), dev.wait())
        .await
        .expect("dev exits within 60 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn watch_shows_a_job_waiting_out_a_mongodb_outage_and_follows_it_to_the_end() {
    let mut stack = Stack::start().await;
    let db = stack.db().await;
    // Slow enough (small batches) to be mid-way when the watcher has started.
    let org = seed(&db, 20_000).await;
    let _svc = stack.service_with(|c| c.export_batch = 5).await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.export",
        serde_json::json!({"orgId": org.id.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    wait_job(&client, org.id, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) > 0
    })
    .await;
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_contact-bulk"))
        .args(["watch", &job, "--org", &org.id.to_hex()])
        .env("NATS_URL", stack.nats.url())
        .env("RUST_LOG", "warn")
        .env_remove("BULK_SUBJECT_PREFIX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = watch.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    // The watcher is subscribed once it printed the job's first state; a job
    // announces its wait once, when it starts waiting.
    let mut seen = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("watch prints the job's state within 60 s")
        .expect("watch is running");
    assert!(first.contains("processing"), "{first}");
    seen.push(first);
    stack.mongo.kill().await.unwrap();
    let shown = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = rx.recv().await {
            seen.push(line.clone());
            if line.contains("processing (waiting for mongodb)") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(shown, Ok(true)),
        "watch did not show the wait: {seen:?}"
    );
    stack.mongo.restart().await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(120), watch.wait_with_output())
        .await
        .expect("watch ends within 120 s of the outage")
        .unwrap();
    assert!(out.status.success(), "watch failed: {seen:?}");
    let snap: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["processed"], 20_000, "{snap}");
}

#[tokio::test]
async fn restore_with_yes_puts_back_what_the_delete_removed() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 120).await;
    let (contacts, convs, msgs) = (
        count(&db, "contacts", doc! {"orgId": org.id}).await,
        count(&db, "conversations", doc! {}).await,
        count(&db, "messages", doc! {}).await,
    );
    let _svc = stack.service().await;
    let tmp = tempfile::tempdir().unwrap();
    let hex = org.id.to_hex();
    let out = cli(
        Some(&stack),
        tmp.path(),
        &["delete", "--org", &hex, "--org-wide", "--yes"],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "delete failed: {stdout}\n{stderr}");
    let job = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("delete job ")
                .and_then(|r| r.strip_suffix(" accepted"))
        })
        .expect("job id printed")
        .to_string();
    assert_eq!(count(&db, "contacts", doc! {"orgId": org.id}).await, 0);
    // Without --yes and without a terminal: the impact, then a refusal.
    let out = cli(Some(&stack), tmp.path(), &["restore", &job, "--org", &hex]).await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "will restore {contacts} contacts, {convs} conversations, {msgs} messages"
        )),
        "{stdout}"
    );
    assert_eq!(count(&db, "contacts", doc! {"orgId": org.id}).await, 0);
    let out = cli(
        Some(&stack),
        tmp.path(),
        &["restore", &job, "--org", &hex, "--yes"],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "restore failed: {stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("completed: restored {contacts} contacts, {convs} conversations, {msgs} messages; skipped 0")),
        "{stdout}"
    );
    assert_eq!(
        count(&db, "contacts", doc! {"orgId": org.id}).await,
        contacts
    );
    assert_eq!(count(&db, "messages", doc! {}).await, msgs);
}
