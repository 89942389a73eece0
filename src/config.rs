//! Service configuration, built once from the environment (flags may override).

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::ServerAddr;
use clap::Args;
use contact_bulk_actors::job::JobSettings;
use contact_bulk_actors::supervisor::Caps;

/// Everything `serve` needs. Each field reads its environment variable, and a flag may override it.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// NATS server (JetStream enabled), or a comma-separated list of a cluster's servers.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Replicas of the JetStream streams the service creates (3 on a 3-node cluster).
    #[arg(long, env = "BULK_STREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=5))]
    pub stream_replicas: u16,
    /// Any MongoDB deployment.
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    pub mongodb_uri: String,
    /// Database holding the CRM collections.
    #[arg(long, env = "MONGODB_DB", default_value = "crm")]
    pub mongodb_db: String,
    /// HTTP API, WebSocket bridge and web page, one port.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// HS256 secret for bearer tokens and signed download links.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Base URL put in signed download links (defaults to `http://HTTP_ADDR`).
    #[arg(long, env = "PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Prefix of every NATS subject (`bulk` in production; tests use a unique one).
    #[arg(long, env = "BULK_SUBJECT_PREFIX", default_value = "bulk")]
    pub subject_prefix: String,
    /// Jobs running at once on this instance.
    #[arg(long, env = "BULK_MAX_RUNNING", default_value_t = 8)]
    pub max_running: usize,
    /// Jobs of one organisation running at once on this instance.
    #[arg(long, env = "BULK_MAX_PER_ORG", default_value_t = 2)]
    pub max_per_org: usize,
    /// Contacts read per export batch.
    #[arg(long, env = "BULK_EXPORT_BATCH", default_value_t = 1000)]
    pub export_batch: u32,
    /// `_id` ranges an export's selection is cut into, the next one read
    /// ahead while the current one streams (1: one query).
    #[arg(long, env = "BULK_EXPORT_RANGES", default_value_t = 32)]
    pub export_ranges: usize,
    /// How long an export's start waits for its count so that `total` is known
    /// from the `processing` snapshot on, in milliseconds; a longer count lands
    /// beside the first batches.
    #[arg(long, env = "BULK_EXPORT_TOTAL_WAIT_MS", default_value_t = 250)]
    pub export_total_wait_ms: u64,
    /// Contacts deleted per delete batch. Three batches are in memory at once
    /// (one prepared, one deleted, one announced); larger batches mean fewer
    /// round trips (measured: 500 → 0.47, 1,000 → 0.50, 2,000 → 0.54 of plain
    /// `deleteMany`, at 34, 49 and 75 MB).
    #[arg(long, env = "BULK_DELETE_BATCH", default_value_t = 2000)]
    pub delete_batch: u32,
    /// Job lease, in milliseconds; another instance takes an abandoned job over after it.
    #[arg(long, env = "BULK_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,
    /// How often to look for pending or abandoned jobs, in milliseconds.
    #[arg(long, env = "BULK_SCAN_MS", default_value_t = 2_000)]
    pub scan_ms: u64,
    /// Attempts at a job's work before it is marked failed: an attempt ends
    /// when an error of the job's own work outlasts the step retries (restarts,
    /// drains, takeovers and outages cost none).
    #[arg(long, env = "BULK_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i32,
    /// Job-starting requests (exports, deletes, restores, dry runs, counts) one
    /// organisation may make a minute, across all instances; 0 turns it off.
    #[arg(long, env = "BULK_RATE_PER_MIN", default_value_t = 30)]
    pub rate_per_min: u32,
    /// Jobs of one organisation that may wait to start; 0 turns it off.
    #[arg(long, env = "BULK_MAX_PENDING_PER_ORG", default_value_t = 100)]
    pub max_pending_per_org: u64,
    /// How long an export file is kept after its job ended (`30s`, `15m`, `168h`, `7d`).
    #[arg(long, env = "BULK_EXPORT_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub export_retention: Duration,
    /// How long an ended job record is kept.
    #[arg(long, env = "BULK_JOB_RETENTION", default_value = "90d", value_parser = humantime::parse_duration)]
    pub job_retention: Duration,
    /// How often each instance sweeps expired exports and jobs.
    #[arg(long, env = "BULK_RETENTION_SWEEP", default_value = "1m", value_parser = humantime::parse_duration)]
    pub retention_sweep: Duration,
    /// Tries of a failed step, in place, before the attempt ends.
    #[arg(long, env = "BULK_STEP_RETRIES", default_value_t = 5)]
    pub step_retries: u32,
    /// Longest wait between tries of a failed step, and between looks during
    /// an outage, in milliseconds.
    #[arg(long, env = "BULK_RETRY_MAX_MS", default_value_t = 5_000)]
    pub retry_max_ms: u64,
    /// Tests only: shifts this instance's clock by this many milliseconds
    /// (leases are judged by the database's clock, so they must not care).
    #[arg(
        long,
        env = "BULK_TEST_CLOCK_OFFSET_MS",
        default_value_t = 0,
        hide = true
    )]
    pub test_clock_offset_ms: i64,
    /// How long a delete keeps what it removes, so it can be restored
    /// (`30s`, `15m`, `168h`, `7d`).
    #[arg(long, env = "BULK_RESTORE_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub restore_retention: Duration,
    /// Contacts put back per restore batch.
    #[arg(long, env = "BULK_RESTORE_BATCH", default_value_t = 1000)]
    pub restore_batch: u32,
    /// Webhook deliveries.
    #[command(flatten)]
    pub webhooks: WebhookConfig,
}

impl Config {
    /// Reads the environment only (no command line): what tests and embedders use.
    pub fn from_env() -> Config {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            config: Config,
        }
        use clap::Parser;
        Only::parse_from(["contact-bulk"]).config
    }

    /// The NATS servers of `NATS_URL` (one, or a cluster's comma-separated list).
    pub fn nats_servers(&self) -> anyhow::Result<Vec<ServerAddr>> {
        nats_servers(&self.nats_url)
    }

    /// Every NATS subject, under `BULK_SUBJECT_PREFIX`.
    pub fn subjects(&self) -> contact_bulk_protocol::subjects::Subjects {
        contact_bulk_protocol::subjects::Subjects::new(&self.subject_prefix)
    }

    /// The JWT secret, required to serve.
    pub fn secret(&self) -> anyhow::Result<&str> {
        self.jwt_secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow::anyhow!("JWT_SECRET is required"))
    }

    /// Base of links the service hands out.
    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.http_addr))
            .trim_end_matches('/')
            .to_string()
    }

    /// Job tunables.
    pub fn job_settings(&self) -> JobSettings {
        JobSettings {
            export_batch: self.export_batch.max(1),
            export_ranges: self.export_ranges.max(1),
            delete_batch: self.delete_batch.max(1),
            restore_batch: self.restore_batch.max(1),
            restore_retention: self.restore_retention,
            total_wait: Duration::from_millis(self.export_total_wait_ms),
            lease_ttl: Duration::from_millis(self.lease_ms.max(500)),
            max_attempts: self.max_attempts.max(1),
            step_retries: self.step_retries,
            retry_max: Duration::from_millis(self.retry_max_ms.max(100)),
            ..JobSettings::default()
        }
    }

    /// Supervisor limits.
    pub fn caps(&self) -> Caps {
        Caps {
            max_running: self.max_running.max(1),
            max_per_org: self.max_per_org.max(1),
            scan_interval: Duration::from_millis(self.scan_ms.max(100)),
        }
    }

    /// A subject under the configured prefix: `subject("v1.export")` = `bulk.v1.export`.
    pub fn subject(&self, tail: &str) -> String {
        format!("{}.{tail}", self.subject_prefix)
    }

    /// Name of the events stream (`BULK_EVENTS` with the default prefix).
    pub fn events_stream(&self) -> String {
        stream_name(&self.subject_prefix, "EVENTS")
    }

    /// Name of the durable intake stream (`BULK_SUBMIT` with the default prefix).
    pub fn submit_stream(&self) -> String {
        stream_name(&self.subject_prefix, "SUBMIT")
    }
}

/// Parses a NATS server list as every NATS client takes it: comma-separated
/// URLs (`nats://a:4222,nats://b:4222`), spaces around commas allowed, the
/// scheme optional. The client connects to one of them and fails over to the
/// others (and to servers the cluster announces).
pub fn nats_servers(list: &str) -> anyhow::Result<Vec<ServerAddr>> {
    let servers = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| anyhow::anyhow!("NATS_URL: invalid server {s:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if servers.is_empty() {
        anyhow::bail!("NATS_URL: no server given");
    }
    Ok(servers)
}

fn stream_name(prefix: &str, tail: &str) -> String {
    let p: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{p}_{tail}")
}

#[cfg(test)]
mod tests {
    use super::nats_servers;

    #[test]
    fn nats_url_takes_a_comma_separated_list() {
        let one = nats_servers("nats://127.0.0.1:4222").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].port(), 4222);
        let three =
            nats_servers("nats://127.0.0.1:4222, nats://127.0.0.1:4223,127.0.0.1:4224").unwrap();
        let ports: Vec<u16> = three.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
    }

    #[test]
    fn a_bad_nats_url_names_the_variable_and_the_server() {
        let e = nats_servers("nats://127.0.0.1:4222,nats://host:port").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("NATS_URL") && msg.contains("nats://host:port"),
            "{msg}"
        );
        assert!(nats_servers(" , ")
            .unwrap_err()
            .to_string()
            .contains("NATS_URL"));
    }
}

/// Webhook tunables; the defaults are the contract's.
#[derive(Debug, Clone, Args)]
pub struct WebhookConfig {
    /// Allow webhook URLs and resolved addresses in loopback, private,
    /// link-local and other special ranges (development only).
    #[arg(
        long = "webhook-allow-private",
        env = "BULK_WEBHOOK_ALLOW_PRIVATE",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_private: bool,
    /// Delay before the first retry of a failed delivery, in milliseconds;
    /// each further retry waits twice as long (±10 %), up to the cap.
    #[arg(
        long = "webhook-backoff-ms",
        env = "BULK_WEBHOOK_BACKOFF_MS",
        default_value_t = 10_000
    )]
    pub backoff_ms: u64,
    /// Longest wait between two attempts, in milliseconds.
    #[arg(
        long = "webhook-backoff-max-ms",
        env = "BULK_WEBHOOK_BACKOFF_MAX_MS",
        default_value_t = 3_600_000
    )]
    pub backoff_max_ms: u64,
    /// How long a delivery is retried after it was created, in milliseconds.
    #[arg(
        long = "webhook-retry-for-ms",
        env = "BULK_WEBHOOK_RETRY_FOR_MS",
        default_value_t = 86_400_000
    )]
    pub retry_for_ms: u64,
    /// Timeout of one delivery attempt (connect, send and answer), in milliseconds.
    #[arg(
        long = "webhook-timeout-ms",
        env = "BULK_WEBHOOK_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub timeout_ms: u64,
    /// Deliveries sent at once by this instance.
    #[arg(
        long = "webhook-workers",
        env = "BULK_WEBHOOK_WORKERS",
        default_value_t = 4
    )]
    pub workers: usize,
    /// How often each instance looks for ended jobs whose terminal event was
    /// lost, in milliseconds.
    #[arg(
        long = "webhook-sweep-ms",
        env = "BULK_WEBHOOK_SWEEP_MS",
        default_value_t = 60_000
    )]
    pub sweep_ms: u64,
    /// How long after a job's end the sweep may step in for its event, in milliseconds.
    #[arg(
        long = "webhook-sweep-grace-ms",
        env = "BULK_WEBHOOK_SWEEP_GRACE_MS",
        default_value_t = 30_000
    )]
    pub sweep_grace_ms: u64,
    /// How often an idle worker looks for due deliveries, in milliseconds.
    #[arg(
        long = "webhook-poll-ms",
        env = "BULK_WEBHOOK_POLL_MS",
        default_value_t = 1_000
    )]
    pub poll_ms: u64,
}

impl WebhookConfig {
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(100))
    }

    /// How long a claimed delivery stays with its worker: an attempt's timeout
    /// plus room to record it. A worker that dies leaves it due again after this.
    pub(crate) fn lease(&self) -> Duration {
        self.timeout() + Duration::from_secs(30)
    }

    pub(crate) fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms.clamp(20, 60_000))
    }

    /// Delay after the `attempts`-th failed attempt (1-based), before jitter.
    pub(crate) fn backoff(&self, attempts: i32) -> Duration {
        let base = Duration::from_millis(self.backoff_ms.max(1));
        let cap = Duration::from_millis(self.backoff_max_ms.max(self.backoff_ms).max(1));
        let n = (attempts.max(1) - 1).min(30) as u32;
        base.saturating_mul(1u32 << n.min(20)).min(cap)
    }
}
