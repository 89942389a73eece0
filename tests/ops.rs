//! Running it like a service: quotas across instances, `X-RateLimit-*` and 429,
//! `/metrics`, NATS micro-service discovery and retention, against real servers.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bson::{doc, oid::ObjectId, Document};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

async fn seed(db: &mongodb::Database, n: usize) -> (ObjectId, ObjectId) {
    let org = ObjectId::new();
    let stage = ObjectId::new();
    let pipeline = pipeline(db, org, "Sales", &[(stage, "New Lead")]).await;
    let contacts = (0..n).map(|i| contact(org, pipeline, stage, i)).collect();
    insert(db, "contacts", contacts).await;
    (org, stage)
}

/// Waits until at least `secs` seconds are left in the current UTC minute, so
/// a test counting one fixed window is not split across two.
async fn early_in_a_minute(secs: u64) {
    loop {
        let into = chrono::Utc::now().timestamp_millis().rem_euclid(60_000) as u64;
        if 60_000 - into >= secs * 1000 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(60_000 - into + 50)).await;
    }
}

/// Every reply to one request published on `subject`, gathered for `window`.
async fn gather(client: &async_nats::Client, subject: &str, window: Duration) -> Vec<Value> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_string(), inbox, "".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        out.push(serde_json::from_slice(&msg.payload).unwrap());
    }
    out
}

async fn get_metrics(base: &str) -> String {
    let resp = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "content type {ct}");
    resp.text().await.unwrap()
}

fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn every_instance_answers_srv_ping_and_the_endpoints_keep_the_queue_group() {
    let stack = Stack::start().await;
    let (a, b) = tokio::join!(stack.service(), stack.service());
    let client = stack.client().await;

    let pongs = gather(&client, "$SRV.PING.contact-bulk", Duration::from_secs(2)).await;
    let ids: HashSet<&str> = pongs.iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(pongs.len(), 2, "one pong per instance: {pongs:?}");
    assert_eq!(ids.len(), 2, "two distinct instances: {pongs:?}");
    assert!(pongs.iter().all(|p| p["name"] == "contact-bulk"));

    let infos = gather(&client, "$SRV.INFO.contact-bulk", Duration::from_secs(2)).await;
    assert_eq!(infos.len(), 2, "{infos:?}");
    for info in &infos {
        let mut subjects: Vec<(&str, &str)> = info["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["queue_group"], "contact-bulk", "{e}");
                (e["name"].as_str().unwrap(), e["subject"].as_str().unwrap())
            })
            .collect();
        subjects.sort();
        assert_eq!(
            subjects,
            vec![
                ("cancel", "bulk.v1.cancel"),
                ("count", "bulk.v1.count"),
                ("delete", "bulk.v1.delete"),
                ("export", "bulk.v1.export"),
                ("job", "bulk.v1.job"),
                ("restore", "bulk.v1.restore"),
            ]
        );
    }

    // Queue group: a command is answered once, not once per instance.
    let (org, _) = seed(&stack.db().await, 3).await;
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    let body = json!({"orgId": org.to_hex(), "filter": {"orgWide": true}});
    for _ in 0..10 {
        client
            .publish_with_reply(
                "bulk.v1.count",
                inbox.clone(),
                serde_json::to_vec(&body).unwrap().into(),
            )
            .await
            .unwrap();
    }
    let mut replies = 0;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["count"], 3, "{v}");
        replies += 1;
    }
    assert_eq!(replies, 10, "each request answered exactly once");

    let stats = gather(&client, "$SRV.STATS.contact-bulk", Duration::from_secs(2)).await;
    assert_eq!(stats.len(), 2);
    let served: u64 = stats
        .iter()
        .flat_map(|s| s["endpoints"].as_array().unwrap().iter())
        .filter(|e| e["name"] == "count")
        .map(|e| e["num_requests"].as_u64().unwrap())
        .sum();
    assert_eq!(served, 10, "{stats:?}");

    a.stop().await.unwrap();
    let pongs = gather(&client, "$SRV.PING.contact-bulk", Duration::from_secs(1)).await;
    assert_eq!(
        pongs.len(),
        1,
        "a stopped instance no longer answers: {pongs:?}"
    );
    b.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_series_move_with_a_job() {
    let stack = Stack::start().await;
    let svc = stack.service().await;
    let base = format!("http://{}", svc.addr);
    let (org, _) = seed(&stack.db().await, 1_500).await;
    let client = stack.client().await;

    let before = get_metrics(&base).await;
    for name in [
        "bulk_jobs_started_total",
        "bulk_jobs_finished_total",
        "bulk_jobs_running",
        "bulk_jobs_pending",
        "bulk_rows_exported_total",
        "bulk_contacts_deleted_total",
        "bulk_contacts_restored_total",
        "bulk_ws_connections",
        "bulk_webhook_deliveries_total",
        "bulk_command_duration_seconds",
    ] {
        assert!(
            before.contains(&format!("# TYPE {}", name.trim_end_matches("_total"))),
            "{name} missing in\n{before}"
        );
    }

    let reply = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job_id = reply["jobId"].as_str().unwrap().to_string();
    let done = wait_terminal(&client, org, &job_id).await;
    assert_eq!(done["status"], "completed", "{done}");

    let after = get_metrics(&base).await;
    let delta = |name: &str| series(&after, name) - series(&before, name);
    assert!(delta("bulk_jobs_started_total") >= 1.0);
    assert!(delta("bulk_jobs_finished_total{kind=\"export\",status=\"completed\"}") >= 1.0);
    assert!(
        delta("bulk_rows_exported_total") >= 1_500.0,
        "rows: {}",
        delta("bulk_rows_exported_total")
    );
    let count = "bulk_command_duration_seconds_count{subject=\"bulk.v1.export\"}";
    assert!(delta(count) >= 1.0, "{after}");

    // The delete side: counted per batch as contacts go.
    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job_id = reply["jobId"].as_str().unwrap().to_string();
    let done = wait_terminal(&client, org, &job_id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let last = get_metrics(&base).await;
    assert!(
        series(&last, "bulk_contacts_deleted_total")
            - series(&after, "bulk_contacts_deleted_total")
            >= 1_500.0
    );
    assert!(
        series(
            &last,
            "bulk_jobs_finished_total{kind=\"delete\",status=\"completed\"}"
        ) - series(
            &after,
            "bulk_jobs_finished_total{kind=\"delete\",status=\"completed\"}"
        ) >= 1.0
    );

    // And a restore of that delete puts them back, counted per batch too.
    let reply = request(
        &client,
        "bulk.v1.restore",
        json!({"orgId": org.to_hex(), "jobId": &job_id}),
    )
    .await;
    let restore_id = reply["jobId"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
        .to_string();
    let done = wait_terminal(&client, org, &restore_id).await;
    assert_eq!(done["status"], "completed", "{done}");
    let restored = get_metrics(&base).await;
    let restored_delta = series(&restored, "bulk_contacts_restored_total")
        - series(&last, "bulk_contacts_restored_total");
    assert!(restored_delta >= 1_500.0, "restored {restored_delta}");
    let finished = "bulk_jobs_finished_total{kind=\"restore\",status=\"completed\"}";
    assert!(series(&restored, finished) - series(&last, finished) >= 1.0);
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn the_rate_limit_holds_across_two_instances_and_spares_other_orgs_and_replays() {
    let stack = Stack::start().await;
    let limited = |c: &mut contact_bulk::config::Config| c.rate_per_min = 5;
    let (a, b) = tokio::join!(stack.service_with(limited), stack.service_with(limited));
    let db = stack.db().await;
    let (org, _) = seed(&db, 5).await;
    let (other, _) = seed(&db, 2).await;
    let client = stack.client().await;
    early_in_a_minute(20).await;

    // One export with a commandId while there is room.
    let first = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "commandId": "nightly", "filter": {"orgWide": true}}),
    )
    .await;
    let job_id = first["jobId"].as_str().expect("accepted").to_string();

    // Then a burst, spread over both instances by the queue group.
    let count = json!({"orgId": org.to_hex(), "filter": {"orgWide": true}});
    let replies = futures::future::join_all(
        (0..12).map(|_| request(&client, "bulk.v1.count", count.clone())),
    )
    .await;
    let accepted = replies.iter().filter(|r| r.get("count").is_some()).count();
    let refused: Vec<&Value> = replies
        .iter()
        .filter(|r| r["error"]["code"] == "rate_limited")
        .collect();
    assert_eq!(
        accepted, 4,
        "5 a minute, one used by the export: {replies:?}"
    );
    assert_eq!(refused.len(), 8, "{replies:?}");
    for r in &refused {
        let ms = r["error"]["retryAfterMs"].as_u64().expect("retryAfterMs");
        assert!((1..=60_000).contains(&ms), "{r}");
    }
    // Both instances took part: the limit is not per process.
    let stats = gather(&client, "$SRV.STATS.contact-bulk", Duration::from_secs(2)).await;
    let per_instance: Vec<u64> = stats
        .iter()
        .map(|s| {
            s["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "count")
                .map(|e| e["num_requests"].as_u64().unwrap())
                .sum()
        })
        .collect();
    assert_eq!(per_instance.len(), 2);
    assert!(per_instance.iter().all(|n| *n > 0), "{per_instance:?}");

    // Every kind of job-starting command is refused now, dry runs included.
    let dry = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.to_hex(), "dryRun": true, "filter": {"orgWide": true}}),
    )
    .await;
    assert_eq!(dry["error"]["code"], "rate_limited", "{dry}");
    let export = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    assert_eq!(export["error"]["code"], "rate_limited", "{export}");

    // A replay is never limited: same job, nothing new.
    let again = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "commandId": "nightly", "filter": {"orgWide": true}}),
    )
    .await;
    assert_eq!(again["jobId"], job_id.as_str(), "{again}");

    // Another organisation has its own budget.
    let theirs = request(
        &client,
        "bulk.v1.count",
        json!({"orgId": other.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    assert_eq!(theirs["count"], 2, "{theirs}");

    let jobs = db
        .collection::<Document>("bulk_jobs")
        .count_documents(doc! {"orgId": org})
        .await
        .unwrap();
    assert_eq!(jobs, 1, "refused commands created nothing");
    tokio::join!(a.stop(), b.stop()).0.unwrap();
}

#[tokio::test]
async fn http_job_starting_endpoints_carry_rate_limit_headers_and_answer_429() {
    let stack = Stack::start().await;
    let svc = stack
        .service_with(|c| {
            c.rate_per_min = 3;
            c.max_pending_per_org = 2;
        })
        .await;
    let base = format!("http://{}", svc.addr);
    let db = stack.db().await;
    let (org, _) = seed(&db, 4).await;
    let tok = token(org, "contacts:export contacts:delete jobs:read");
    let http = reqwest::Client::new();
    early_in_a_minute(20).await;

    let header = |r: &reqwest::Response, h: &str| -> u64 {
        r.headers()
            .get(h)
            .unwrap_or_else(|| panic!("{h} missing"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let export = http
        .post(format!("{base}/api/exports"))
        .bearer_auth(&tok)
        .json(&json!({"commandId": "page-export"}))
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 202);
    assert_eq!(header(&export, "x-ratelimit-limit"), 3);
    assert_eq!(header(&export, "x-ratelimit-remaining"), 2);
    assert!((1..=60).contains(&header(&export, "x-ratelimit-reset")));
    let job: Value = export.json().await.unwrap();

    for remaining in [1, 0] {
        let r = http
            .post(format!("{base}/api/contacts/query-count"))
            .bearer_auth(&tok)
            .json(&json!({"orgWide": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining"), remaining);
    }
    let r = http
        .delete(format!("{base}/api/contacts/query-bulk-delete"))
        .bearer_auth(&tok)
        .json(&json!({"orgWide": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry = header(&r, "retry-after");
    let reset = header(&r, "x-ratelimit-reset");
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert!(retry <= reset.max(1), "retry {retry} reset {reset}");
    assert_eq!(header(&r, "x-ratelimit-remaining"), 0);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(body["retryAfterMs"].as_u64().unwrap() > 0, "{body}");

    // The streamed export is an export too.
    let r = http
        .get(format!(
            "{base}/api/contacts/query-bulk-export?orgWide=true"
        ))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);

    // A replay over HTTP goes through, with the window's headers.
    let r = http
        .post(format!("{base}/api/exports"))
        .bearer_auth(&tok)
        .json(&json!({"commandId": "page-export"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "x-ratelimit-remaining"), 0);
    let replay: Value = r.json().await.unwrap();
    assert_eq!(replay["jobId"], job["jobId"]);

    // Reads are not job-starting: no quota, no headers.
    let r = http
        .get(format!("{base}/api/jobs"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ratelimit-limit").is_none());
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn too_many_waiting_jobs_are_refused_with_rate_limited() {
    let stack = Stack::start().await;
    let svc = stack.service_with(|c| c.max_pending_per_org = 2).await;
    let db = stack.db().await;
    let (org, _) = seed(&db, 2).await;
    // Two jobs waiting, held (by a lease far ahead) so no instance starts them.
    let held = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 3_600_000);
    for i in 0..2 {
        db.collection::<Document>("bulk_jobs")
            .insert_one(
                doc! {"_id": format!("waiting-{i}-{org}"), "orgId": org, "kind": "export",
                "status": "pending", "leaseOwner": "elsewhere", "leaseUntil": held,
                "createdAt": bson::DateTime::now()},
            )
            .await
            .unwrap();
    }
    let client = stack.client().await;
    let r = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("waiting"),
        "{r}"
    );
    assert!(r["error"]["retryAfterMs"].as_u64().unwrap() > 0);
    // Counts start no job: the waiting jobs do not stop them.
    let r = request(
        &client,
        "bulk.v1.count",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    assert_eq!(r["count"], 2, "{r}");
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn an_export_past_its_retention_is_gone_and_old_jobs_are_removed() {
    let stack = Stack::start().await;
    let short = |c: &mut contact_bulk::config::Config| {
        c.export_retention = Duration::from_secs(10);
        c.job_retention = Duration::from_secs(20);
        c.retention_sweep = Duration::from_millis(500);
    };
    // Two sweepers at once, as with several instances.
    let (a, b) = tokio::join!(stack.service_with(short), stack.service_with(short));
    let base = format!("http://{}", a.addr);
    let db = stack.db().await;
    let (org, _) = seed(&db, 300).await;
    let client = stack.client().await;
    let reply = request(
        &client,
        "bulk.v1.export",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}, "format": "ndjson"}),
    )
    .await;
    let job_id = reply["jobId"].as_str().unwrap().to_string();
    let done = wait_terminal(&client, org, &job_id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"]["expired"], false);
    let link = done["result"]["downloadUrl"].as_str().unwrap().to_string();
    let chunks = db.collection::<Document>("export_chunks");
    assert!(
        chunks
            .count_documents(doc! {"jobId": &job_id})
            .await
            .unwrap()
            > 0
    );

    let expired = wait_job(&client, org, &job_id, 90, |s| {
        s["result"]["expired"] == true
    })
    .await;
    assert!(
        expired["result"]["downloadUrl"].is_null(),
        "no fresh link: {expired}"
    );
    // The sweep (every 500 ms here) removes the data soon after, then marks
    // the record (chunks go first, so a cut-short sweep is finished by the next).
    let jobs = db.collection::<Document>("bulk_jobs");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let chunks_left = chunks
            .count_documents(doc! {"jobId": &job_id})
            .await
            .unwrap();
        let record = jobs.find_one(doc! {"_id": &job_id}).await.unwrap().unwrap();
        let marked = record
            .get_document("result")
            .ok()
            .and_then(|r| r.get_bool("expired").ok())
            == Some(true);
        if chunks_left == 0 && marked {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sweep incomplete: {chunks_left} chunks left, marked {marked}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = reqwest::get(&link).await.unwrap();
    assert_eq!(r.status(), 410);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "gone", "{body}");
    let r = reqwest::Client::new()
        .get(format!("{base}/api/exports/{job_id}/download"))
        .bearer_auth(token(org, "jobs:read"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);

    // Then the record itself goes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let r = request(
            &client,
            "bulk.v1.job",
            json!({"orgId": org.to_hex(), "jobId": &job_id}),
        )
        .await;
        if r["error"]["code"] == "not_found" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job record kept: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::join!(a.stop(), b.stop()).0.unwrap();
}
