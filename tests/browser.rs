//! The web page end to end in headless Chromium (Debian's `chromium` and
//! `chromium-driver`; `scripts/test.sh` installs them), driven over WebDriver
//! with fantoccini: token from the URL, export with its count, delete with its
//! dry-run impact and confirmation, live progress to 100 % over the WebSocket.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bson::{doc, oid::ObjectId, Document};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const ALL: &str = "contacts:export contacts:delete jobs:read";

// ---------- chromedriver ----------

/// A `chromedriver` child in its own process group; dropping it kills the group
/// (chromedriver and the Chromium it started), also when the test panics.
struct Driver {
    child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The Chromium binary: `CHROME_BIN`, Debian's real binary behind its wrapper script, or `chromium` on PATH.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROME_BIN") {
        return p.into();
    }
    let debian = Path::new("/usr/lib/chromium/chromium");
    if debian.is_file() {
        return debian.into();
    }
    which("chromium")
        .or_else(|| which("chromium-browser"))
        .expect("chromium not found: apt-get install -y chromium chromium-driver")
}

impl Driver {
    async fn start() -> Driver {
        let bin = which("chromedriver")
            .expect("chromedriver not found: apt-get install -y chromium chromium-driver");
        let profile = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(bin)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                profile.path().join("chromedriver.log").display()
            ))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver {
            child,
            port,
            dir: profile,
        };
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = match http.get(driver.url("/status")).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                return driver;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not get ready on port {port} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A headless Chromium session.
    async fn session(&self) -> Client {
        let data_dir = self.dir.path().join("profile");
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,1900".into(),
            format!("--user-data-dir={}", data_dir.display()),
        ];
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium().display().to_string(), "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url(""))
            .await
            .expect("a chromium session")
    }

    /// The browser console since the last call (chromedriver's log endpoint).
    async fn console(&self, client: &Client) -> Vec<Value> {
        let Ok(Some(id)) = client.session_id().await else {
            return Vec::new();
        };
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let resp = http
            .post(self.url(&format!("/session/{id}/se/log")))
            .json(&json!({"type": "browser"}))
            .send()
            .await;
        match resp {
            Ok(r) => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["value"].as_array().cloned()),
            Err(_) => None,
        }
        .unwrap_or_default()
    }
}

// ---------- page helpers ----------

async fn js(client: &Client, script: &str, args: Vec<Value>) -> Value {
    client
        .execute(script, args)
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Polls `script` until `pred` holds on its value, or panics naming `what`
/// (with the page's messages) after `secs`.
async fn wait_js(
    client: &Client,
    what: &str,
    secs: u64,
    script: &str,
    args: Vec<Value>,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let v = js(client, script, args.clone()).await;
        if pred(&v) {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            let msgs = js(client, MESSAGES, vec![]).await;
            panic!("{what}: not within {secs} s; last value {v}; page messages {msgs}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const MESSAGES: &str = "return Object.fromEntries(['#token-msg','#jobs-msg','#export-msg','#delete-msg','#restore-msg','#ws-state','#org-label']
  .map((s) => [s, document.querySelector(s).textContent]));";

const ROW: &str = "const r = document.querySelector(`tr[data-job-id=\"${arguments[0]}\"]`);
if (!r) return null;
const bar = r.querySelector('progress.bar');
return { status: r.querySelector('.status')?.textContent ?? null,
         value: bar && bar.hasAttribute('value') ? bar.value : null,
         max: bar ? bar.max : null,
         processed: r.querySelector('.processed')?.textContent ?? null,
         total: r.querySelector('.total')?.textContent ?? null,
         counts: r.querySelector('.counts')?.textContent ?? null,
         download: !!r.querySelector('button.download'),
         cancel: !!r.querySelector('button.cancel') };";

async fn css(client: &Client, sel: &str) -> fantoccini::elements::Element {
    client
        .find(Locator::Css(sel))
        .await
        .unwrap_or_else(|e| panic!("{sel}: {e}"))
}

/// Replaces an input's value by typing, as a person would.
async fn type_into(client: &Client, sel: &str, value: &str) {
    let e = css(client, sel).await;
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

/// The job id the page reports in a message like "… (job <uuid>)."
async fn job_in_message(client: &Client, sel: &str) -> String {
    let v = wait_js(
        client,
        &format!("{sel} names the started job"),
        20,
        "return document.querySelector(arguments[0]).textContent;",
        vec![json!(sel)],
        |v| v.as_str().is_some_and(|s| s.contains("(job ")),
    )
    .await;
    let s = v.as_str().unwrap();
    let id = s
        .split("(job ")
        .nth(1)
        .unwrap()
        .trim_end_matches(['.', ')']);
    uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("a job id in {s:?}"));
    id.to_string()
}

/// Waits until the job's row shows `completed` at 100 % and returns the row.
async fn wait_row_completed(client: &Client, job: &str) -> Value {
    wait_js(
        client,
        &format!("row of job {job} reaches 100 % / completed (live updates over /ws)"),
        120,
        ROW,
        vec![json!(job)],
        |r| r["status"] == "completed" && r["value"].as_f64() == Some(100.0),
    )
    .await
}

// ---------- data ----------

struct Org {
    id: ObjectId,
    stages: Vec<ObjectId>,
    contacts: Vec<Document>,
}

/// `n` contacts round-robin over 3 stages; contact i has i % 3 conversations of
/// i % 4 messages each.
async fn seed(db: &mongodb::Database, n: usize) -> Org {
    let id = ObjectId::new();
    let stages: Vec<ObjectId> = (0..3).map(|_| ObjectId::new()).collect();
    let named: Vec<(ObjectId, &str)> = stages
        .iter()
        .copied()
        .zip(["New Lead", "Qualified", "Won"])
        .collect();
    let pipe = pipeline(db, id, "Sales", &named).await;
    let (mut contacts, mut convs, mut msgs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let c = contact(id, pipe, stages[i % 3], i);
        let cid = c.get_object_id("_id").unwrap();
        for _ in 0..(i % 3) {
            let conv = ObjectId::new();
            convs.push(doc! {"_id": conv, "orgId": id, "contactId": cid});
            for _ in 0..(i % 4) {
                msgs.push(doc! {"_id": ObjectId::new(), "orgId": id, "conversationId": conv, "contactId": cid});
            }
        }
        contacts.push(c);
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

fn in_stages(org: &Org, stages: &[ObjectId]) -> BTreeSet<ObjectId> {
    org.contacts
        .iter()
        .filter(|c| stages.contains(&c.get_object_id("stageId").unwrap()))
        .map(|c| c.get_object_id("_id").unwrap())
        .collect()
}

async fn count(db: &mongodb::Database, coll: &str, filter: Document) -> u64 {
    db.collection::<Document>(coll)
        .count_documents(filter)
        .await
        .unwrap()
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshot.png")
}

// ---------- the test ----------

#[tokio::test]
async fn export_and_delete_from_the_page_with_live_progress() {
    let stack = Stack::start().await;
    let db = stack.db().await;
    let org = seed(&db, 3000).await;
    let svc = stack.service().await;
    let nats = stack.client().await;
    let driver = Driver::start().await;
    let client = driver.session().await;

    let t = token(org.id, ALL);
    client
        .goto(&format!("http://{}/#token={t}", svc.addr))
        .await
        .unwrap();
    wait_js(
        &client,
        "#org-label shows the token's organisation",
        20,
        "return document.querySelector('#org-label').textContent;",
        vec![],
        |v| v.as_str() == Some(&format!("org {}", org.id.to_hex())),
    )
    .await;
    // The token left the address bar and went into the input.
    let url = client.current_url().await.unwrap();
    assert!(url.fragment().is_none_or(|f| !f.contains("token")), "{url}");
    assert_eq!(
        css(&client, "#token-input")
            .await
            .prop("value")
            .await
            .unwrap(),
        Some(t.clone())
    );
    // The stage pickers come from /api/pipelines.
    wait_js(
        &client,
        "stage checkboxes of the pipeline",
        20,
        "return document.querySelectorAll('#pipelines input[data-stage-id]').length;",
        vec![],
        |v| v == 3,
    )
    .await;
    wait_js(
        &client,
        "#ws-state is live (the WebSocket bridge of src/ws.rs answers /ws)",
        20,
        "return document.querySelector('#ws-state').textContent;",
        vec![],
        |v| v == "live",
    )
    .await;

    // ---- export: count first, then start, then live progress to 100 %.
    let export_stages = [org.stages[0], org.stages[1]];
    let truth = in_stages(&org, &export_stages).len();
    let nats_count = request(
        &nats,
        "bulk.v1.count",
        json!({"orgId": org.id.to_hex(), "filter": {"stageIds": export_stages.map(|s| s.to_hex())}}),
    )
    .await;
    assert_eq!(nats_count["count"], truth, "{nats_count}");
    type_into(
        &client,
        "#f-stage-ids",
        &format!(
            "{}, {}",
            export_stages[0].to_hex(),
            export_stages[1].to_hex()
        ),
    )
    .await;
    assert!(
        !css(&client, "#export-start")
            .await
            .is_enabled()
            .await
            .unwrap(),
        "no export before the count is shown"
    );
    css(&client, "#export-count-btn")
        .await
        .click()
        .await
        .unwrap();
    let shown = wait_js(
        &client,
        "#export-count shows the count",
        20,
        "return document.querySelector('#export-count').textContent;",
        vec![],
        |v| v.as_str().is_some_and(|s| !s.is_empty()),
    )
    .await;
    assert_eq!(shown, truth.to_string(), "the page's count is the truth");
    assert!(css(&client, "#export-start")
        .await
        .is_enabled()
        .await
        .unwrap());
    css(&client, "#export-start").await.click().await.unwrap();
    let export_job = job_in_message(&client, "#export-msg").await;
    let row = wait_row_completed(&client, &export_job).await;
    assert!(
        row["download"] == true,
        "a finished export has .download: {row}"
    );
    assert!(row["cancel"] == false, "{row}");
    assert_eq!(row["processed"], truth.to_string(), "{row}");
    assert_eq!(row["total"], truth.to_string(), "{row}");
    // The file behind the row holds exactly those contacts.
    let snap = wait_terminal(&nats, org.id, &export_job).await;
    assert_eq!(snap["status"], "completed");
    assert_eq!(snap["result"]["rows"], truth);
    let data = download(&snap).await;
    assert_eq!(data.iter().filter(|b| **b == b'\n').count(), truth + 1);

    // ---- delete: dry-run impact, explicit confirmation, live progress.
    let delete_stage = org.stages[2];
    let doomed = in_stages(&org, &[delete_stage]);
    type_into(&client, "#f-stage-ids", &delete_stage.to_hex()).await;
    assert!(
        !css(&client, "#delete-start")
            .await
            .is_enabled()
            .await
            .unwrap(),
        "no delete before the impact is shown"
    );
    css(&client, "#delete-preview-btn")
        .await
        .click()
        .await
        .unwrap();
    let impact = wait_js(
        &client,
        "#delete-impact shows the dry run",
        20,
        "const p = document.querySelector('#delete-impact');
         return p.dataset.contacts === undefined ? null
           : { text: p.textContent, contacts: +p.dataset.contacts,
               conversations: +p.dataset.conversations, messages: +p.dataset.messages };",
        vec![],
        |v| !v.is_null(),
    )
    .await;
    let dry = request(
        &nats,
        "bulk.v1.delete",
        json!({"orgId": org.id.to_hex(), "filter": {"stageIds": [delete_stage.to_hex()]}, "dryRun": true}),
    )
    .await;
    assert_eq!(dry["dryRun"], true, "{dry}");
    let counts = &dry["counts"];
    assert_eq!(counts["contacts"], doomed.len());
    for k in ["contacts", "conversations", "messages"] {
        assert_eq!(impact[k], counts[k], "{k}: page {impact} vs dry run {dry}");
    }
    let text = impact["text"].as_str().unwrap();
    let numbers: Vec<u64> = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(
        numbers,
        ["contacts", "conversations", "messages"].map(|k| counts[k].as_u64().unwrap()),
        "the impact sentence: {text}"
    );

    // Mid-test picture: a finished export, the impact and the confirmation step.
    std::fs::create_dir_all(screenshot_path().parent().unwrap()).unwrap();
    std::fs::write(screenshot_path(), client.screenshot().await.unwrap()).unwrap();

    // A wrong confirmation keeps the button disabled; the count enables it.
    type_into(&client, "#delete-confirm-input", "delete").await;
    assert!(!css(&client, "#delete-start")
        .await
        .is_enabled()
        .await
        .unwrap());
    type_into(&client, "#delete-confirm-input", &doomed.len().to_string()).await;
    assert!(css(&client, "#delete-start")
        .await
        .is_enabled()
        .await
        .unwrap());
    assert_eq!(count(&db, "bulk_jobs", doc! {"kind": "delete"}).await, 0);
    css(&client, "#delete-start").await.click().await.unwrap();
    let delete_job = job_in_message(&client, "#delete-msg").await;
    let row = wait_row_completed(&client, &delete_job).await;
    assert!(row["download"] == false && row["cancel"] == false, "{row}");
    assert_eq!(row["processed"], doomed.len().to_string(), "{row}");
    let want = format!(
        "{} contacts, {} conversations, {} messages",
        counts["contacts"], counts["conversations"], counts["messages"]
    );
    assert_eq!(row["counts"], want, "{row}");

    // MongoDB agrees: those contacts and their children are gone, the rest stays.
    let ids: Vec<ObjectId> = doomed.iter().copied().collect();
    assert_eq!(count(&db, "contacts", doc! {"_id": {"$in": &ids}}).await, 0);
    assert_eq!(
        count(&db, "conversations", doc! {"contactId": {"$in": &ids}}).await,
        0
    );
    assert_eq!(
        count(&db, "messages", doc! {"contactId": {"$in": &ids}}).await,
        0
    );
    assert_eq!(
        count(&db, "contacts", doc! {"orgId": org.id}).await as usize,
        org.contacts.len() - doomed.len()
    );

    // ---- restore: the ended delete's Restore action, dry-run impact first,
    // explicit confirmation, live progress to 100 %.
    assert_eq!(count(&db, "bulk_jobs", doc! {"kind": "restore"}).await, 0);
    css(
        &client,
        &format!("tr[data-job-id=\"{delete_job}\"] button.restore"),
    )
    .await
    .click()
    .await
    .unwrap();
    let impact = wait_js(
        &client,
        "#restore-impact shows the restore's dry run",
        20,
        "const p = document.querySelector('#restore-impact');
         return p.dataset.contacts === undefined ? null
           : { text: p.textContent, contacts: +p.dataset.contacts,
               conversations: +p.dataset.conversations, messages: +p.dataset.messages };",
        vec![],
        |v| !v.is_null(),
    )
    .await;
    for k in ["contacts", "conversations", "messages"] {
        assert_eq!(
            impact[k], counts[k],
            "{k}: restore impact {impact} vs delete {dry}"
        );
    }
    assert_eq!(
        count(&db, "bulk_jobs", doc! {"kind": "restore"}).await,
        0,
        "nothing restored before the confirmation"
    );
    css(&client, "#restore-confirm")
        .await
        .click()
        .await
        .unwrap();
    let restore_job = wait_js(
        &client,
        "a restore row appears",
        20,
        "return [...document.querySelectorAll('#jobs tr[data-job-id]')]
           .filter((r) => r.querySelector('.kind')?.textContent === 'restore')
           .map((r) => r.dataset.jobId)[0] ?? null;",
        vec![],
        |v| v.is_string(),
    )
    .await;
    let restore_job = restore_job.as_str().unwrap().to_string();
    let row = wait_row_completed(&client, &restore_job).await;
    assert_eq!(row["processed"], doomed.len().to_string(), "{row}");
    assert_eq!(
        count(&db, "contacts", doc! {"orgId": org.id}).await as usize,
        org.contacts.len(),
        "every deleted contact is back"
    );
    assert_eq!(
        count(&db, "messages", doc! {"contactId": {"$in": &ids}}).await,
        counts["messages"].as_u64().unwrap()
    );

    // The jobs are listed, newest first, and the page reported no error.
    let order = js(
        &client,
        "return [...document.querySelectorAll('#jobs tr[data-job-id]')].map((r) => r.dataset.jobId);",
        vec![],
    )
    .await;
    assert_eq!(order, json!([restore_job, delete_job, export_job]));
    let errors = js(
        &client,
        "return [...document.querySelectorAll('.msg.error')].map((p) => p.id + ': ' + p.textContent);",
        vec![],
    )
    .await;
    assert_eq!(errors, json!([]), "error messages on the page");

    // A job waiting out an outage says so (its snapshot's `waiting`), as an
    // event of the organisation's stream brings it.
    let waiting_job = uuid::Uuid::new_v4().to_string();
    let snap = json!({"jobId": waiting_job, "kind": "delete", "orgId": org.id.to_hex(),
        "commandId": null, "status": "processing", "total": 100, "processed": 40,
        "counts": {"contacts": 40, "conversations": 0, "messages": 0}, "error": null,
        "attempts": 1, "createdAt": "2026-01-01T00:00:00.000Z", "startedAt": "2026-01-01T00:00:00.000Z",
        "finishedAt": null, "result": null, "waiting": "mongodb"});
    let js_ctx = async_nats::jetstream::new(nats.clone());
    js_ctx
        .publish(
            format!("bulk.v1.events.{}.job.{waiting_job}", org.id.to_hex()),
            serde_json::to_vec(&json!({"type": "job.progress", "job": snap}))
                .unwrap()
                .into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_js(
        &client,
        "the waiting badge",
        20,
        "return document.querySelector(`tr[data-job-id=\"${arguments[0]}\"] .waiting`)?.textContent ?? null;",
        vec![json!(waiting_job)],
        |v| v == "waiting for mongodb",
    )
    .await;

    let severe: Vec<Value> = driver
        .console(&client)
        .await
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    assert!(severe.is_empty(), "browser console errors: {severe:?}");
    client.close().await.unwrap();
}
