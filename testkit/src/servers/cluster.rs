//! A NATS cluster on loopback for tests: `size` `nats-server` nodes with
//! JetStream, each a [`NatsServer`] guard (own store dir and log, ephemeral
//! client port, SIGKILLed on drop), routed to each other.
//!
//! Each node picks its own client port (`-p -1`); route ports are reserved
//! just before the start (JetStream clustering needs every route configured up
//! front) and the whole start is retried should one be taken meanwhile. A node
//! killed with SIGKILL comes back ([`NatsServer::restart`]) on the same ports
//! with its store and rejoins.

use super::*;

/// Name of the test cluster (nodes are `n1`, `n2`, …).
const CLUSTER_NAME: &str = "contact-bulk-test";
/// How long the cluster gets to elect a JetStream meta leader.
const META_DEADLINE: Duration = Duration::from_secs(30);

/// A running NATS cluster; every node dies with it.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes under `dir/n1`, `dir/n2`, … with the repo's
    /// `nats.conf`, and returns once JetStream answers through the cluster
    /// (its meta leader is elected), so streams with `size` replicas can be made.
    pub async fn start(nats_conf: &Path, dir: &Path, size: usize) -> anyhow::Result<NatsCluster> {
        anyhow::ensure!(size >= 1, "a cluster has at least one node");
        let dir = prepare_dir(dir)?;
        let mut attempt = 1;
        let nodes = loop {
            match start_nodes(nats_conf, &dir, size).await {
                Ok(nodes) => break nodes,
                // A reserved route port was taken in between: new ports.
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!(attempt, error = %e, "nats cluster did not start, retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let cluster = NatsCluster { nodes };
        cluster.wait_jetstream(META_DEADLINE).await?;
        Ok(cluster)
    }

    /// The client URLs of every node, comma separated: what `NATS_URL` takes.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URL of one node.
    pub fn url(&self, node: usize) -> String {
        self.nodes[node].url()
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// One node: kill it (SIGKILL, store kept) and restart it on the same ports.
    pub fn node(&mut self, node: usize) -> &mut NatsServer {
        &mut self.nodes[node]
    }

    /// Waits until JetStream answers an account-info request through the
    /// cluster (a meta leader is elected), at most `deadline`.
    pub async fn wait_jetstream(&self, deadline: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        let servers = self
            .urls()
            .split(',')
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .event_callback(|_| async {})
            .connect(servers);
        let client = tokio::time::timeout_at(until, client)
            .await
            .map_err(|_| anyhow!("no cluster node accepted a client within {deadline:?}"))??;
        let js = async_nats::jetstream::new(client);
        let mut last = String::new();
        while Instant::now() < until {
            match tokio::time::timeout(Duration::from_secs(2), js.query_account()).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "no answer within 2 s".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let logs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}:\n{}", n.log.display(), log_tail(&n.log, 0)))
            .collect();
        bail!(
            "nats cluster: jetstream did not answer within {deadline:?} ({last})\n{}",
            logs.join("\n")
        )
    }
}

/// Starts every node with its route port and routes to all the others.
async fn start_nodes(nats_conf: &Path, dir: &Path, size: usize) -> anyhow::Result<Vec<NatsServer>> {
    let routes = reserve_ports(size)?;
    futures::future::try_join_all((0..size).map(|i| {
        // Every node is given every route, its own included (nats-server
        // skips a route to itself): the same list everywhere, as in production configs.
        let name = format!("n{}", i + 1);
        let node_dir = dir.join(&name);
        let args = node_args(&name, routes[i], &routes);
        async move { NatsServer::start_with(nats_conf, &node_dir, None, args).await }
    }))
    .await
}

/// `n` free loopback ports. JetStream's clustering needs every node's routes
/// configured up front (a seed node without routes refuses to start), so the
/// route ports are chosen before the nodes start; the client ports are still
/// the servers' own choice.
fn reserve_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A node's cluster arguments: its name, its route port and the routes it solicits.
fn node_args(name: &str, route_port: u16, routes: &[u16]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--server_name".into(),
        name.into(),
        "--cluster_name".into(),
        CLUSTER_NAME.into(),
        "--cluster".into(),
        format!("nats://127.0.0.1:{route_port}").into(),
    ];
    let routes: Vec<String> = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    args.extend(["--routes".into(), routes.join(",").into()]);
    args
}
