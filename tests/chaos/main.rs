//! Chaos: three `contact-bulk serve` processes (the real binary) on one NATS
//! (a single server, or a 3-node cluster with R3 streams) and one MongoDB run an
//! export, a stage delete and an org-wide delete while instances are killed
//! with `kill -9` (the holder of a job most of the time, each replaced at
//! once), NATS is restarted (one node of the cluster) and MongoDB is restarted.
//! Then every job must be `completed` and every invariant of the data hold.
//!
//! The fault schedule comes from a seed, printed at the start; replay a run
//! with `CHAOS_SEED=<seed> cargo test --test chaos -- --nocapture`.
//! `CHAOS_KEEP=1` keeps the run's directory (instance and server logs);
//! `CHAOS_CALM=1` runs the same jobs without faults (the figures' yardstick).

#[path = "../common/mod.rs"]
mod common;
mod fleet;
mod world;

use std::collections::HashMap;
use std::time::Duration;

use bson::{doc, Document};
use common::{request, SECRET};
use contact_bulk_testkit::servers::{repo_nats_conf, MongoServer, NatsCluster, NatsServer};
use fleet::{Fleet, FleetEnv};
use futures::{FutureExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::time::Instant;
use world::{Sizes, World};

/// One chaos run at a time in this binary: each already loads both cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Service processes running at any time.
const FLEET: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_nine_and_server_restarts_lose_no_job() {
    run(Scenario {
        name: "single nats",
        cluster: false,
        kills: 24,
        min_while_running: 20,
        // Sized so the jobs outlast the kill schedule: grown by half when the
        // export and the delete got faster (issue 13).
        sizes: Sizes {
            export: 60_000,
            stage_delete: 13_500,
            org_delete: 9_000,
            bystander: 1_000,
        },
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_three_node_nats_cluster_with_r3_streams() {
    run(Scenario {
        name: "3-node nats cluster, R3",
        cluster: true,
        kills: 10,
        min_while_running: 8,
        sizes: Sizes {
            export: 40_000,
            stage_delete: 8_000,
            org_delete: 5_000,
            bystander: 500,
        },
    })
    .await;
}

struct Scenario {
    name: &'static str,
    cluster: bool,
    /// `kill -9`s of service instances.
    kills: usize,
    /// Of them, at least this many while jobs run (the rest is margin for a fast box).
    min_while_running: usize,
    sizes: Sizes,
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL the instance holding a job's lease (job chosen by `pick`).
    KillHolder { pick: usize },
    /// SIGKILL some instance (chosen by `pick`).
    KillAny { pick: usize },
    /// SIGKILL NATS (node `node` of a cluster), start it again after `down`.
    RestartNats { node: usize, down: Duration },
    /// SIGKILL MongoDB, start it again after `down`.
    RestartMongo { down: Duration },
}

/// The schedule: a pause, then a fault, in order.
fn schedule(seed: u64, kills: usize, nats_nodes: usize) -> Vec<(Duration, Fault)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults: Vec<Fault> = (0..kills)
        .map(|_| {
            let pick = rng.random_range(0..1000);
            if rng.random_bool(0.85) {
                Fault::KillHolder { pick }
            } else {
                Fault::KillAny { pick }
            }
        })
        .collect();
    // The server restarts land mid-schedule, apart from each other.
    let third = (kills / 3).max(1);
    let nats_at = rng.random_range(1..=third);
    let mongo_at = rng.random_range(third + 1..=2 * third);
    faults.insert(
        mongo_at,
        Fault::RestartMongo {
            down: Duration::from_millis(rng.random_range(500..2500)),
        },
    );
    faults.insert(
        nats_at,
        Fault::RestartNats {
            node: rng.random_range(0..nats_nodes),
            down: Duration::from_millis(rng.random_range(500..2500)),
        },
    );
    faults
        .into_iter()
        .map(|f| (Duration::from_millis(rng.random_range(300..1100)), f))
        .collect()
}

/// NATS: one server or a cluster.
enum Nats {
    One(Box<NatsServer>),
    Cluster(NatsCluster),
}

impl Nats {
    fn urls(&self) -> String {
        match self {
            Nats::One(s) => s.url(),
            Nats::Cluster(c) => c.urls(),
        }
    }

    fn nodes(&self) -> usize {
        match self {
            Nats::One(_) => 1,
            Nats::Cluster(c) => c.len(),
        }
    }

    async fn restart(&mut self, node: usize, down: Duration) {
        let server = match self {
            Nats::One(s) => s,
            Nats::Cluster(c) => c.node(node),
        };
        server.kill().await.expect("nats killed");
        // The outage itself: the service must wait through it.
        tokio::time::sleep(down).await;
        server
            .restart()
            .await
            .expect("nats restarts on its port and store");
    }
}

async fn run(scenario: Scenario) {
    let _serial = SERIAL.lock().await;
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("CHAOS_SEED is a u64"))
        .unwrap_or_else(rand::random);
    println!(
        "chaos ({}): seed {seed} (replay: CHAOS_SEED={seed} cargo test --test chaos)",
        scenario.name
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = repo_nats_conf();
    let nats_dir = dir.path().join("nats");
    let mongo_dir = dir.path().join("mongo");
    let (nats, mongo) = tokio::join!(
        async {
            if scenario.cluster {
                Nats::Cluster(
                    NatsCluster::start(&conf, &nats_dir, 3)
                        .await
                        .expect("3-node nats cluster must start (run scripts/install-servers.sh)"),
                )
            } else {
                Nats::One(Box::new(
                    NatsServer::start(&conf, &nats_dir, None)
                        .await
                        .expect("nats-server must start (run scripts/install-servers.sh)"),
                ))
            }
        },
        MongoServer::start(&mongo_dir, None)
    );
    let mut nats = nats;
    let mut mongo = mongo.expect("secantusd-rs must start (run scripts/install-servers.sh)");
    // CHAOS_CALM=1: the same jobs without a fault, the yardstick of the figures.
    let calm = std::env::var_os("CHAOS_CALM").is_some();
    let plan = if calm {
        Vec::new()
    } else {
        schedule(seed, scenario.kills, nats.nodes())
    };
    println!("chaos schedule: {plan:?}");

    let test_uri = format!("{}&serverSelectionTimeoutMS=3000", mongo.uri());
    let db = mongodb::Client::with_uri_str(&test_uri)
        .await
        .unwrap()
        .database("crm");
    let seeded = Instant::now();
    let w = world::seed(&db, scenario.sizes).await;
    println!("seeded in {:.1} s", seeded.elapsed().as_secs_f64());

    let mut fleet = Fleet::new(FleetEnv {
        nats_url: nats.urls(),
        mongodb_uri: format!("{}&serverSelectionTimeoutMS=2000", mongo.uri()),
        db_name: "crm".into(),
        replicas: if scenario.cluster { 3 } else { 1 },
        secret: SECRET.into(),
        dir: dir.path().to_path_buf(),
    });
    for _ in 0..FLEET {
        fleet.spawn();
    }
    fleet.wait_listening(Duration::from_secs(60)).await;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(contact_bulk::config::nats_servers(&nats.urls()).unwrap())
        .await
        .unwrap();

    let outcome = std::panic::AssertUnwindSafe(async {
        let started = Instant::now();
        let jobs = submit(&client, &w).await;
        let ids: Vec<String> = jobs.values().cloned().collect();
        wait_all_processing(&db, &ids).await;
        let mut kills = Kills::default();
        for (pause, fault) in plan {
            tokio::time::sleep(pause).await;
            for (n, status) in fleet.respawn_exited() {
                println!("instance {n} exited on its own ({status}); replaced");
            }
            match fault {
                Fault::RestartNats { node, down } => {
                    println!("chaos: nats node {node} down for {down:?}");
                    nats.restart(node, down).await;
                    kills.nats_restarts += 1;
                }
                Fault::RestartMongo { down } => {
                    println!("chaos: mongodb down for {down:?}");
                    mongo.kill().await.expect("mongodb killed");
                    tokio::time::sleep(down).await;
                    mongo
                        .restart()
                        .await
                        .expect("mongodb restarts on its port and data");
                    kills.mongo_restarts += 1;
                }
                Fault::KillHolder { pick } | Fault::KillAny { pick } => {
                    // A job whose holder was just killed names it until its
                    // lease runs out: aim at the jobs held by a live instance,
                    // waiting a little for a takeover if there is none yet.
                    let aim = matches!(fault, Fault::KillHolder { .. });
                    let (holders, live) = live_holders(&db, &ids, &mut fleet, aim).await;
                    let running = !holders.is_empty() || kills.jobs_running(&db, &ids).await;
                    let target = match fault {
                        Fault::KillHolder { .. } if !live.is_empty() => {
                            Some(live[pick % live.len()])
                        }
                        _ => None,
                    };
                    let (n, holder) = match target {
                        Some(n) => (n, true),
                        None => (fleet.live[pick % fleet.live.len()].n, false),
                    };
                    fleet.kill(n).await;
                    fleet.spawn();
                    kills.record(holder, running);
                }
            }
        }
        println!(
            "chaos: {} kills ({} of a job's holder, {} while jobs ran) in {:.1} s",
            kills.total,
            kills.holders,
            kills.while_running,
            started.elapsed().as_secs_f64()
        );
        let snaps = wait_all_terminal(&client, &db, &jobs, Duration::from_secs(240)).await;
        let elapsed = started.elapsed();
        for (name, snap) in &snaps {
            println!(
                "job {name}: {} attempts {} processed {} counts {}",
                snap["status"], snap["attempts"], snap["processed"], snap["counts"]
            );
        }
        for (name, snap) in &snaps {
            assert_eq!(snap["status"], "completed", "job {name}: {snap}");
        }
        println!(
            "chaos figures ({}): {} kill -9 survived ({} of a holder), {} nats restart(s), \
             {} mongodb restart(s); every job completed {:.1} s after submission",
            scenario.name,
            kills.total,
            kills.holders,
            kills.nats_restarts,
            kills.mongo_restarts,
            elapsed.as_secs_f64()
        );
        assert!(
            calm || (kills.nats_restarts, kills.mongo_restarts) == (1, 1),
            "one NATS and one MongoDB restart"
        );
        assert!(
            calm || kills.while_running >= scenario.min_while_running,
            "only {} of {} kills happened while jobs ran: the jobs were too quick; grow the data",
            kills.while_running,
            scenario.kills
        );
        let js = async_nats::jetstream::new(client.clone());
        if scenario.cluster {
            let mut stream = js.get_stream("BULK_EVENTS").await.unwrap();
            let info = stream.info().await.unwrap();
            assert_eq!(info.config.num_replicas, 3, "BULK_EVENTS is R3");
        }
        world::check_data(&db, &w).await;
        world::check_delete(&db, &js, &snaps["stage delete"], w.org_a, &w.stage_ids, 2).await;
        world::check_delete(&db, &js, &snaps["org delete"], w.org_b, &w.org_b_ids, 1).await;
        world::check_export(&snaps["export"], &w.export_ids).await;
    })
    .catch_unwind()
    .await;
    if let Err(panic) = outcome {
        println!("chaos ({}) failed; seed {seed}", scenario.name);
        for line in fleet
            .grep("job failed")
            .iter()
            .chain(&fleet.grep("failed, restarting"))
        {
            println!("{line}");
        }
        println!("{}", fleet.logs_report(30));
        if std::env::var_os("CHAOS_KEEP").is_some() {
            println!("run directory kept: {}", dir.keep().display());
        }
        std::panic::resume_unwind(panic);
    }
}

/// Starts the three jobs; their ids by name.
async fn submit(client: &async_nats::Client, w: &World) -> HashMap<&'static str, String> {
    let (a, b) = (w.org_a.to_hex(), w.org_b.to_hex());
    let asks = [
        (
            "export",
            "bulk.v1.export",
            json!({"orgId": a, "commandId": "chaos-export", "fields": ["id"],
                   "filter": {"stageIds": [w.kept.to_hex()]}}),
        ),
        (
            "stage delete",
            "bulk.v1.delete",
            json!({"orgId": a, "commandId": "chaos-stage-delete",
                   "filter": {"stageIds": [w.doomed.to_hex()]}}),
        ),
        (
            "org delete",
            "bulk.v1.delete",
            json!({"orgId": b, "commandId": "chaos-org-delete", "filter": {"orgWide": true}}),
        ),
    ];
    let mut jobs = HashMap::new();
    for (name, subject, body) in asks {
        let reply = request(client, subject, body).await;
        let id = reply["jobId"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no jobId in {reply}"))
            .to_string();
        jobs.insert(name, id);
    }
    jobs
}

/// What the kills hit.
#[derive(Default)]
struct Kills {
    total: usize,
    nats_restarts: usize,
    mongo_restarts: usize,
    holders: usize,
    while_running: usize,
}

impl Kills {
    fn record(&mut self, holder: bool, running: bool) {
        self.total += 1;
        self.holders += usize::from(holder);
        self.while_running += usize::from(running);
    }

    /// Whether any job is still unfinished (read from its record).
    async fn jobs_running(&self, db: &mongodb::Database, ids: &[String]) -> bool {
        let filter = doc! {"_id": {"$in": ids}, "status": {"$in": ["pending", "processing"]}};
        let jobs = db.collection::<Document>("bulk_jobs");
        let count = jobs.count_documents(filter);
        // Unknown (MongoDB just restarted): count it as running, as it most likely is.
        !matches!(
            tokio::time::timeout(Duration::from_secs(3), count).await,
            Ok(Ok(0))
        )
    }
}

/// The lease owners of the unfinished jobs and the live instances among them;
/// with `wait`, polls up to 1.5 s until one is live (a takeover happened).
async fn live_holders(
    db: &mongodb::Database,
    ids: &[String],
    fleet: &mut Fleet,
    wait: bool,
) -> (Vec<String>, Vec<usize>) {
    let until = Instant::now() + Duration::from_millis(1500);
    loop {
        let owners = holders(db, ids).await;
        let live: Vec<usize> = owners.iter().filter_map(|o| fleet.holder(o)).collect();
        if !wait || !live.is_empty() || owners.is_empty() || Instant::now() >= until {
            return (owners, live);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lease owners of the unfinished jobs (empty when MongoDB does not answer).
async fn holders(db: &mongodb::Database, ids: &[String]) -> Vec<String> {
    let read = async {
        let filter = doc! {"_id": {"$in": ids}, "status": {"$in": ["pending", "processing"]}};
        let mut cursor = db
            .collection::<Document>("bulk_jobs")
            .find(filter)
            .sort(doc! {"_id": 1})
            .await?;
        let mut owners = Vec::new();
        while let Some(job) = cursor.try_next().await? {
            if let Ok(owner) = job.get_str("leaseOwner") {
                owners.push(owner.to_string());
            }
        }
        mongodb::error::Result::Ok(owners)
    };
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Ok(owners)) => owners,
        _ => Vec::new(),
    }
}

/// Waits until every job is `processing` (the kills must land on running jobs).
async fn wait_all_processing(db: &mongodb::Database, ids: &[String]) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let filter = doc! {"_id": {"$in": ids}, "status": "processing"};
        let n = db
            .collection::<Document>("bulk_jobs")
            .count_documents(filter)
            .await
            .unwrap();
        if n as usize == ids.len() {
            return;
        }
        assert!(
            Instant::now() < until,
            "jobs not all processing within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (reading the records) until every job has ended, then fetches each
/// snapshot through the service (for its signed download link).
async fn wait_all_terminal(
    client: &async_nats::Client,
    db: &mongodb::Database,
    jobs: &HashMap<&'static str, String>,
    deadline: Duration,
) -> HashMap<&'static str, Value> {
    let until = Instant::now() + deadline;
    let ids: Vec<&String> = jobs.values().collect();
    loop {
        let filter =
            doc! {"_id": {"$in": &ids}, "status": {"$in": ["completed", "failed", "cancelled"]}};
        let coll = db.collection::<Document>("bulk_jobs");
        let ended = coll.count_documents(filter);
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), ended).await {
            if n as usize == ids.len() {
                break;
            }
        }
        if Instant::now() >= until {
            let mut states = Vec::new();
            for (name, id) in jobs {
                let rec = db
                    .collection::<Document>("bulk_jobs")
                    .find_one(doc! {"_id": id})
                    .await;
                states.push(format!("{name}: {rec:?}"));
            }
            panic!(
                "jobs not all ended within {deadline:?}:\n{}",
                states.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut snaps = HashMap::new();
    for (name, id) in jobs {
        let rec = db
            .collection::<Document>("bulk_jobs")
            .find_one(doc! {"_id": id})
            .await
            .unwrap()
            .expect("job record");
        let org = rec.get_object_id("orgId").unwrap().to_hex();
        let snap = request(client, "bulk.v1.job", json!({"orgId": org, "jobId": id})).await;
        snaps.insert(*name, snap);
    }
    snaps
}
