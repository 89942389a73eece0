//! Test harness: real `nats-server` and MongoDB-wire servers on ephemeral ports
//! with throw-away directories, the service in-process, and helpers that wait
//! for states with a deadline (never a bare sleep).
#![allow(dead_code)]

use std::time::Duration;

use bson::{oid::ObjectId, Document};
use contact_bulk::config::Config;
use contact_bulk::Service;
use contact_bulk_testkit::seed;
use contact_bulk_testkit::servers::{repo_nats_conf, MongoServer, NatsServer};
use futures::StreamExt;
use serde_json::{json, Value};

/// Secret every test token is signed with.
pub const SECRET: &str = "test-secret-for-contact-bulk";

/// Both servers and a scratch directory; everything dies with it.
pub struct Stack {
    pub nats: NatsServer,
    pub mongo: MongoServer,
    pub dir: tempfile::TempDir,
    pub db_name: String,
}

impl Stack {
    /// Starts both servers. Missing binaries fail loudly.
    pub async fn start() -> Stack {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("nats")).unwrap();
        std::fs::create_dir_all(dir.path().join("mongo")).unwrap();
        let conf = repo_nats_conf();
        let (nats_dir, mongo_dir) = (dir.path().join("nats"), dir.path().join("mongo"));
        let (nats, mongo) = tokio::join!(
            NatsServer::start(&conf, &nats_dir, None),
            MongoServer::start(&mongo_dir, None)
        );
        Stack {
            nats: nats.expect("nats-server must start (run scripts/install-servers.sh)"),
            mongo: mongo.expect("secantusd-rs must start (run scripts/install-servers.sh)"),
            dir,
            db_name: "crm".into(),
        }
    }

    /// Service configuration pointing at this stack, with short leases and scans.
    pub fn config(&self) -> Config {
        let mut c = Config::from_env();
        c.nats_url = self.nats.url();
        // Fail fast while a server is down, so retries (not hangs) are what tests see.
        c.mongodb_uri = format!("{}&serverSelectionTimeoutMS=2000", self.mongo.uri());
        c.mongodb_db = self.db_name.clone();
        c.http_addr = "127.0.0.1:0".parse().unwrap();
        c.jwt_secret = Some(SECRET.into());
        c.public_url = None;
        c.subject_prefix = "bulk".into();
        c.lease_ms = 2_000;
        c.scan_ms = 200;
        c
    }

    /// The service, started in-process.
    pub async fn service(&self) -> Service {
        Service::start(self.config()).await.expect("service starts")
    }

    /// The service with a tweaked configuration.
    pub async fn service_with(&self, f: impl FnOnce(&mut Config)) -> Service {
        let mut c = self.config();
        f(&mut c);
        Service::start(c).await.expect("service starts")
    }

    /// The CRM database.
    pub async fn db(&self) -> mongodb::Database {
        mongodb::Client::with_uri_str(self.mongo.uri())
            .await
            .unwrap()
            .database(&self.db_name)
    }

    /// A NATS client.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.nats.url()).await.unwrap()
    }
}

/// A request/reply with a deadline; the reply as JSON.
pub async fn request(client: &async_nats::Client, subject: &str, body: Value) -> Value {
    let payload = serde_json::to_vec(&body).unwrap();
    let msg = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(subject.to_string(), payload.into()),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply on {subject} within 20 s"))
    .unwrap_or_else(|e| panic!("request on {subject} failed: {e}"));
    serde_json::from_slice(&msg.payload).unwrap()
}

/// Polls `bulk.v1.job` until `pred` holds, or panics after `secs`.
pub async fn wait_job(
    client: &async_nats::Client,
    org: ObjectId,
    job_id: &str,
    secs: u64,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let payload = serde_json::to_vec(&json!({"orgId": org.to_hex(), "jobId": job_id})).unwrap();
    loop {
        let reply = tokio::time::timeout(
            Duration::from_secs(20),
            client.request("bulk.v1.job", payload.clone().into()),
        )
        .await
        .unwrap_or_else(|_| panic!("no reply on bulk.v1.job within 20 s"));
        let snap: Value = match reply {
            Ok(m) => serde_json::from_slice(&m.payload).unwrap(),
            // Right after a NATS restart the test's client may be back before
            // the service has resubscribed: poll again, within the deadline.
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "bulk.v1.job had no responders until the deadline"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => panic!("request on bulk.v1.job failed: {e}"),
        };
        if pred(&snap) {
            return snap;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {job_id} did not reach the expected state within {secs} s; last: {snap}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a terminal status.
pub async fn wait_terminal(client: &async_nats::Client, org: ObjectId, job_id: &str) -> Value {
    wait_job(client, org, job_id, 120, |s| {
        matches!(
            s["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
    })
    .await
}

/// A bearer token for `org` with `scope`.
pub fn token(org: ObjectId, scope: &str) -> String {
    contact_bulk::auth::Keys::new(SECRET, "")
        .mint(&ObjectId::new().to_hex(), &org.to_hex(), scope, 3600)
        .unwrap()
}

/// Downloads a completed export through the signed link of its snapshot.
pub async fn download(snapshot: &Value) -> Vec<u8> {
    let url = snapshot["result"]["downloadUrl"]
        .as_str()
        .unwrap_or_else(|| panic!("no downloadUrl in {snapshot}"));
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200, "download of {url}");
    resp.bytes().await.unwrap().to_vec()
}

/// Gunzips (multi-member) bytes.
pub fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A pipeline with named stages, inserted for `org` (the test kit's seeding).
pub async fn pipeline(
    db: &mongodb::Database,
    org: ObjectId,
    name: &str,
    stages: &[(ObjectId, &str)],
) -> ObjectId {
    seed::pipeline(db, org, name, stages).await.unwrap()
}

/// A contact document (not inserted).
pub fn contact(org: ObjectId, pipeline: ObjectId, stage: ObjectId, i: usize) -> Document {
    seed::contact(org, pipeline, stage, i)
}

/// Inserts documents in chunks.
pub async fn insert(db: &mongodb::Database, coll: &str, docs: Vec<Document>) {
    seed::insert(db, coll, docs).await.unwrap()
}

/// Every message on `subject` arriving until `until` says stop, or the deadline passes.
pub async fn collect_until(
    sub: &mut async_nats::Subscriber,
    secs: u64,
    until: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .expect("deadline waiting for events")
            .expect("subscription ended");
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        let stop = until(&v);
        out.push(v);
        if stop {
            return out;
        }
    }
}

/// Every document of `org` in contacts, conversations and messages, as raw
/// bytes by (collection, hex `_id`): what "every byte back" compares.
pub async fn raw_state(
    db: &mongodb::Database,
    org: ObjectId,
) -> std::collections::BTreeMap<(String, String), Vec<u8>> {
    use futures::TryStreamExt;
    let mut out = std::collections::BTreeMap::new();
    for coll in ["contacts", "conversations", "messages"] {
        let docs: Vec<bson::RawDocumentBuf> = db
            .collection::<bson::RawDocumentBuf>(coll)
            .find(bson::doc! {"orgId": org})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        for d in docs {
            let id = d.get_object_id("_id").unwrap().to_hex();
            out.insert((coll.to_string(), id), d.as_bytes().to_vec());
        }
    }
    out
}

/// Every message stored in BULK_EVENTS under `subject`, in stream order.
pub async fn stored_events(
    client: &async_nats::Client,
    subject: String,
) -> Vec<async_nats::jetstream::Message> {
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream("BULK_EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut info = consumer.clone();
    let pending = info.info().await.unwrap().num_pending as usize;
    let mut out = Vec::with_capacity(pending);
    if pending == 0 {
        return out;
    }
    let mut messages = consumer.messages().await.unwrap();
    while out.len() < pending {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream read deadline")
            .unwrap()
            .unwrap();
        out.push(m);
    }
    out
}

/// Every event of `org` of this `kind` (`contact_removed`, `contact_restored`)
/// in the BULK_EVENTS stream, with its `Nats-Msg-Id` as `_msgId`.
pub async fn contact_events(client: &async_nats::Client, org: ObjectId, kind: &str) -> Vec<Value> {
    let subject = format!("bulk.v1.events.{}.{kind}", org.to_hex());
    stored_events(client, subject)
        .await
        .into_iter()
        .map(|m| {
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string());
            let mut v: Value = serde_json::from_slice(&m.payload).unwrap();
            v["_msgId"] = json!(id);
            v
        })
        .collect()
}

/// The real binary serving this stack (1 s leases, 200 ms scans, then `env`),
/// once it logs `listening on http://`; its output is drained.
pub async fn start_binary(stack: &Stack, env: &[(&str, &str)]) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_contact-bulk"));
    cmd.arg("serve")
        .env("NATS_URL", stack.nats.url())
        .env("MONGODB_URI", stack.mongo.uri())
        .env("MONGODB_DB", &stack.db_name)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("JWT_SECRET", SECRET)
        .env("BULK_LEASE_MS", "1000")
        .env("BULK_SCAN_MS", "200")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("binary starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("listening on http://") {
                return true;
            }
        }
        false
    })
    .await
    .expect("binary ready within 60 s");
    assert!(ready, "binary exited before listening");
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Every document of `coll` matching `filter`.
pub async fn find_all(db: &mongodb::Database, coll: &str, filter: Document) -> Vec<Document> {
    use futures::TryStreamExt;
    db.collection::<Document>(coll)
        .find(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}
