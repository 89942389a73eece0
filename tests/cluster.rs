//! A 3-node NATS cluster on loopback (the harness's `NatsCluster`): the service
//! takes the cluster as a comma-separated `NATS_URL`, makes its streams with
//! `BULK_STREAM_REPLICAS` replicas, and a job survives a node's `kill -9`.

mod common;

use std::time::Duration;

use bson::{doc, oid::ObjectId, Document};
use common::*;
use contact_bulk_testkit::servers::{repo_nats_conf, MongoServer, NatsCluster};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_list_gets_r3_streams_and_a_job_survives_a_node_kill() {
    let dir = tempfile::tempdir().unwrap();
    let (conf, nats_dir, mongo_dir) = (
        repo_nats_conf(),
        dir.path().join("nats"),
        dir.path().join("mongo"),
    );
    let (cluster, mongo) = tokio::join!(
        NatsCluster::start(&conf, &nats_dir, 3),
        MongoServer::start(&mongo_dir, None)
    );
    let mut cluster = cluster.expect("3-node nats cluster must start");
    let mongo = mongo.expect("secantusd-rs must start");
    let urls = cluster.urls();
    assert_eq!(urls.split(',').count(), 3, "{urls}");

    let db = mongodb::Client::with_uri_str(mongo.uri())
        .await
        .unwrap()
        .database("crm");
    let org = ObjectId::new();
    let stage = ObjectId::new();
    let pipe = pipeline(&db, org, "Sales", &[(stage, "New")]).await;
    let docs: Vec<Document> = (0..3000).map(|i| contact(org, pipe, stage, i)).collect();
    let convs: Vec<Document> = docs
        .iter()
        .map(|d| doc! {"_id": ObjectId::new(), "orgId": org, "contactId": d.get_object_id("_id").unwrap()})
        .collect();
    insert(&db, "contacts", docs).await;
    insert(&db, "conversations", convs).await;

    // An older deployment's R1 stream is raised to R3 by the start.
    let js = async_nats::jetstream::new(
        async_nats::connect(contact_bulk::config::nats_servers(&urls).unwrap())
            .await
            .unwrap(),
    );
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BULK_EVENTS".into(),
        subjects: vec!["bulk.v1.events.>".into()],
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();

    let mut config = contact_bulk::config::Config::from_env();
    config.nats_url = urls.clone();
    config.stream_replicas = 3;
    config.mongodb_uri = format!("{}&serverSelectionTimeoutMS=2000", mongo.uri());
    config.mongodb_db = "crm".into();
    config.http_addr = "127.0.0.1:0".parse().unwrap();
    config.jwt_secret = Some(SECRET.into());
    config.public_url = None;
    config.subject_prefix = "bulk".into();
    config.lease_ms = 2_000;
    config.scan_ms = 200;
    config.delete_batch = 50;
    let _svc = contact_bulk::Service::start(config)
        .await
        .expect("the service starts on a cluster list");

    let client = async_nats::connect(contact_bulk::config::nats_servers(&urls).unwrap())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    for name in ["BULK_EVENTS", "BULK_SUBMIT"] {
        let mut stream = js.get_stream(name).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{name} replicas");
        let peers = info.cluster.as_ref().map_or(0, |c| c.replicas.len());
        assert_eq!(peers, 2, "{name}: a leader and two replicas");
    }

    let reply = request(
        &client,
        "bulk.v1.delete",
        json!({"orgId": org.to_hex(), "filter": {"orgWide": true}}),
    )
    .await;
    let job = reply["jobId"].as_str().unwrap().to_string();
    wait_job(&client, org, &job, 60, |s| {
        s["processed"].as_i64().unwrap_or(0) >= 300
    })
    .await;
    // Any one node: the stream leader, the service's own server or a replica.
    let node = (rand::random::<u32>() % 3) as usize;
    cluster.node(node).kill().await.unwrap();
    // While the node is down the job goes on, or waits for NATS (`waiting`);
    // it never fails. Known limit (README, chaos test): in some runs the
    // publishes answer "no stream found" until the node is back, so this
    // waits for progress or for the wait to show, not for progress alone.
    let snap = wait_job(&client, org, &job, 120, |s| {
        s["processed"].as_i64().unwrap_or(0) >= 1500
            || s["waiting"] == "nats"
            || s["status"] != "processing"
    })
    .await;
    assert_ne!(snap["status"], "failed", "{snap}");
    cluster
        .node(node)
        .restart()
        .await
        .expect("the node restarts on its ports and store");
    let snap = wait_terminal(&client, org, &job).await;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["counts"]["contacts"], 3000);
    assert_eq!(snap["counts"]["conversations"], 3000);
    assert_eq!(
        db.collection::<Document>("contacts")
            .count_documents(doc! {"orgId": org})
            .await
            .unwrap(),
        0
    );
    // The restarted node caught up: the stream answers through it alone.
    let alone = async_nats::connect(cluster.url(node)).await.unwrap();
    let js = async_nats::jetstream::new(alone);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut stream = js.get_stream("BULK_EVENTS").await.unwrap();
        let info = stream.info().await.unwrap();
        let current = info
            .cluster
            .as_ref()
            .map(|c| c.replicas.iter().all(|r| r.current))
            .unwrap_or(false);
        if current {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replicas not current after 30 s: {:?}",
            info.cluster
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_killed_cluster_node_restarts_on_its_ports_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(&repo_nats_conf(), dir.path(), 3)
        .await
        .expect("3-node nats cluster must start");
    let client = async_nats::connect(contact_bulk::config::nats_servers(&cluster.urls()).unwrap())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "R3".into(),
        subjects: vec!["r3.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("an R3 stream on the cluster");
    for i in 0..10 {
        js.publish(format!("r3.{i}"), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // The first node is the one the others were routed to at the start.
    let url = cluster.url(0);
    cluster.node(0).kill().await.unwrap();
    // A new stream leader may take a moment to be elected: until then a
    // publish is answered "no responders"; the two live nodes then keep writing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for i in 10..20 {
        loop {
            // A retry after a lost ack is deduplicated by its message id.
            let msg = async_nats::jetstream::message::PublishMessage::build()
                .payload("x".into())
                .message_id(format!("m{i}"));
            let ack = match js.send_publish(format!("r3.{i}"), msg).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match ack {
                Ok(()) => break,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "two of three nodes did not take writes within 30 s: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster.node(0).restart().await.unwrap();
    assert_eq!(cluster.url(0), url, "same client port");
    cluster
        .wait_jetstream(Duration::from_secs(30))
        .await
        .unwrap();
    let alone = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = alone
            .get_stream("R3")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        let peers = info
            .cluster
            .as_ref()
            .map_or(0, |c| c.replicas.iter().filter(|r| r.current).count());
        if info.state.messages == 20 && peers == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node did not rejoin within 30 s: {} messages, {:?}",
            info.state.messages,
            info.cluster
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn r3_streams_on_a_single_server_fail_the_start_at_once() {
    let stack = Stack::start().await;
    let started = std::time::Instant::now();
    let mut config = stack.config();
    config.stream_replicas = 3;
    let err = contact_bulk::Service::start(config)
        .await
        .err()
        .expect("R3 streams on a single server are refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("BULK_EVENTS") && msg.contains("3 replica"),
        "the error names the stream and the replicas: {msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a configuration error is not retried like an outage"
    );
}
