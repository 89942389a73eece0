//! `contact-bulk bench`: throughput and memory of the real service binary.
//!
//! Each benchmark starts its own `nats-server` and MongoDB-wire server in a
//! scratch directory, creates the service's indexes before loading data (index
//! builds over existing documents are slow), seeds, then runs this very binary
//! as `serve` in a child process so its memory can be read from `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use mongodb::Database;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tracing::instrument::WithSubscriber;

use crate::servers::{repo_nats_conf, MongoServer, NatsServer};
use bson::oid::ObjectId;
use contact_bulk_client::{ensure_completed, ClientError, Nats, Quiet};
use contact_bulk_protocol::job::JobSnapshot;
use contact_bulk_protocol::replies::Accepted;

// Private: shared by the benchmarks only, so anything unused is reported.
pub mod cpu;
pub mod delete;
pub mod export;
pub mod restore;
pub mod ws;
pub mod ws_latency;
mod yardsticks;

/// Database the benchmarks use.
pub const DB: &str = "crm";

/// Options of `bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub what: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Export job rows/s against a raw cursor drain, and the service's peak RSS.
    Export(export::ExportBench),
    /// Cascade-delete job documents/s against plain deleteMany calls.
    Delete(delete::DeleteBench),
    /// Restore job documents/s against plain insertMany of the same documents.
    Restore(restore::RestoreBench),
    /// WebSocket bridge latency (p50/p99) with many clients on one job.
    Ws(ws::WsBench),
}

/// Options every benchmark takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Parent of the scratch directory (default: the system temp directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the scratch directory (servers' data and logs) afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// Runs `bench`.
pub async fn main(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchCommand::Export(a) => export::run(a).await,
        BenchCommand::Delete(a) => delete::run(a).await,
        BenchCommand::Restore(a) => restore::run(a).await,
        BenchCommand::Ws(a) => ws::run(a).await,
    }
}

/// A scratch directory, removed on drop unless kept.
pub struct Scratch {
    /// Its path.
    pub path: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Servers, a database handle and a NATS client; everything stops on drop.
pub struct Harness {
    // Fields drop in order: clients first, then the servers, then the directory.
    /// NATS client with the service's subject prefix.
    pub nats: Nats,
    /// The CRM database.
    pub db: Database,
    /// The MongoDB-wire server.
    pub mongo: MongoServer,
    /// NATS.
    pub nats_server: NatsServer,
    /// JWT secret the service child is started with.
    pub secret: String,
    started_services: u32,
    scratch: Scratch,
}

impl Harness {
    /// Starts both servers in a fresh scratch directory and creates the
    /// service's indexes while the collections are still empty.
    pub async fn start(common: &Common) -> anyhow::Result<Harness> {
        let parent = common.data_dir.clone().unwrap_or_else(std::env::temp_dir);
        let path = parent.join(format!("contact-bulk-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let scratch = Scratch {
            path,
            keep: common.keep,
        };
        let (nats_dir, mongo_dir) = (scratch.path.join("nats"), scratch.path.join("mongo"));
        let conf = repo_nats_conf();
        let (nats_server, mongo) = tokio::join!(
            NatsServer::start(&conf, &nats_dir, None),
            MongoServer::start(&mongo_dir, None)
        );
        let (nats_server, mongo) = (nats_server?, mongo?);
        let db = mongodb::Client::with_uri_str(mongo.uri())
            .await?
            .database(DB);
        // The service logs each index; here they are created on empty
        // collections, and stdout is kept for the report.
        contact_bulk_actors::store::ensure_indexes(&db)
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await
            .context("creating indexes before seeding")?;
        let nats = Nats::connect(&nats_server.url(), "bulk").await?;
        Ok(Harness {
            mongo,
            nats_server,
            db,
            nats,
            secret: format!("{:032x}", rand::random::<u128>()),
            started_services: 0,
            scratch,
        })
    }

    /// The scratch directory (servers' data and logs).
    pub fn dir(&self) -> &Path {
        &self.scratch.path
    }

    /// Starts a job of `org` with `start` (one of the client's typed
    /// commands) and follows it to its end: its completed snapshot and the
    /// time from the accepted reply to the end.
    pub async fn run_job<'a, Fut>(
        &'a self,
        org: &str,
        start: impl FnOnce(&'a Nats) -> Fut,
    ) -> anyhow::Result<(JobSnapshot, Duration)>
    where
        Fut: std::future::Future<Output = Result<Accepted, ClientError>>,
    {
        // Subscribed before the job exists, so its last event cannot be missed.
        let mut events = self.nats.job_events(org, None).await?;
        let accepted = start(&self.nats).await?;
        let t0 = Instant::now();
        let snap = self
            .nats
            .follow(org, &accepted.job_id, &mut events, &mut Quiet)
            .await?;
        let took = t0.elapsed();
        ensure_completed(&snap)?;
        Ok((snap, took))
    }

    /// A bearer token of `org` with `scope`, minted by `contact-bulk token`
    /// (this executable) with the secret the service child gets, so the
    /// benchmarks need nothing of the service's library.
    pub async fn token(&self, org: ObjectId, scope: &str) -> anyhow::Result<String> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let out = Command::new(exe)
            .args(["token", "--org", &org.to_hex(), "--scope", scope])
            .args(["--user", &ObjectId::new().to_hex(), "--ttl", "3600"])
            .env("JWT_SECRET", &self.secret)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running `contact-bulk token`")?;
        if !out.status.success() {
            bail!(
                "`contact-bulk token` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// Starts `contact-bulk serve` (this executable) against the servers and
    /// waits for its `listening on http://` line.
    pub async fn service(&mut self) -> anyhow::Result<ServiceChild> {
        self.started_services += 1;
        let log = self
            .scratch
            .path
            .join(format!("service-{}.log", self.started_services));
        ServiceChild::start(self, &log).await
    }
}

/// The service binary running as a child process.
pub struct ServiceChild {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// Where its HTTP listens.
    pub addr: SocketAddr,
    peak_kb: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

/// Memory of a finished service child.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmHWM`: the kernel's peak resident set, in KiB.
    pub hwm_kb: u64,
    /// Highest `VmRSS` seen by sampling every 100 ms, in KiB.
    pub sampled_kb: u64,
}

impl ServiceChild {
    async fn start(h: &Harness, log: &Path) -> anyhow::Result<ServiceChild> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let err_log = std::fs::File::create(log.with_extension("stderr"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .env("NATS_URL", h.nats_server.url())
            .env("MONGODB_URI", h.mongo.uri())
            .env("MONGODB_DB", DB)
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("JWT_SECRET", &h.secret)
            .env("BULK_SUBJECT_PREFIX", "bulk")
            .env("NO_COLOR", "1")
            .env_remove("PUBLIC_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err_log))
            .kill_on_drop(true);
        // Whatever the caller's filter, the `listening on` line must come out.
        let filter = match std::env::var("RUST_LOG") {
            Ok(f) if !f.trim().is_empty() => format!("{f},contact_bulk=info"),
            _ => "info".to_string(),
        };
        cmd.env("RUST_LOG", filter);
        // Like the servers: killed with this process, even by SIGKILL.
        let mut child = crate::servers::spawn_child(cmd)
            .await
            .context("starting the service")?;
        let pid = child.id().context("service exited at once")?;
        let stdout = child.stdout.take().context("service stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut out = tokio::fs::File::create(log).await?;
        let ready = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await? {
                out.write_all(line.as_bytes()).await?;
                out.write_all(b"\n").await?;
                if let Some(addr) = listening_addr(&line) {
                    return Ok::<_, anyhow::Error>(Some(addr));
                }
            }
            Ok(None)
        })
        .await;
        let addr = match ready {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => bail!("service exited before listening; see {}", log.display()),
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("service not listening within 120 s; see {}", log.display()),
        };
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = out.write_all(line.as_bytes()).await;
                let _ = out.write_all(b"\n").await;
            }
        });
        let peak_kb = Arc::new(AtomicU64::new(0));
        let peak = peak_kb.clone();
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                match proc_status_kb(pid, "VmRSS") {
                    Some(kb) => {
                        peak.fetch_max(kb, Ordering::Relaxed);
                    }
                    None => break,
                }
            }
        });
        Ok(ServiceChild {
            child,
            pid,
            addr,
            peak_kb,
            sampler,
        })
    }

    /// Reads the memory figures, then kills the process.
    pub async fn stop(mut self) -> Memory {
        let mem = Memory {
            hwm_kb: proc_status_kb(self.pid, "VmHWM").unwrap_or(0),
            sampled_kb: self.peak_kb.load(Ordering::Relaxed),
        };
        self.sampler.abort();
        let _ = self.child.kill().await;
        mem
    }
}

/// `ADDR` of a `listening on http://ADDR` log line.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("listening on http://")?;
    let addr: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
        .collect();
    addr.parse().ok()
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kb(&text, key)
}

fn parse_status_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// KiB as MiB.
pub fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Three decimals, for JSON lines.
pub fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `n / seconds`, 0 for an empty interval.
pub fn rate(n: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// Prints a right-aligned table (first column left-aligned).
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        println!("{}", parts.join("  "));
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Times a future.
pub async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let v = f.await;
    (v, t.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_status_lines() {
        let text = "Name:\tcontact-bulk\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(parse_status_kb(text, "VmHWM"), Some(51_200));
        assert_eq!(parse_status_kb(text, "VmRSS"), Some(40_960));
        assert_eq!(parse_status_kb(text, "VmSwap"), None);
        assert!(proc_status_kb(std::process::id(), "VmRSS").is_some_and(|kb| kb > 0));
    }

    #[test]
    fn finds_the_listening_address() {
        let line = "2026-01-01T00:00:00Z  INFO contact_bulk: listening on http://127.0.0.1:4567";
        assert_eq!(listening_addr(line), "127.0.0.1:4567".parse().ok());
        let ansi = "\u{1b}[2m..\u{1b}[0m listening on http://127.0.0.1:80\u{1b}[0m";
        assert_eq!(listening_addr(ansi), "127.0.0.1:80".parse().ok());
        assert_eq!(listening_addr("stream ready"), None);
    }
}
