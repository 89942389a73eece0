//! The fleet of the chaos test: `contact-bulk serve` processes (the real
//! binary) on one NATS and one MongoDB, each with its log in the test's
//! directory and its lease owner id read from its `instance id` log line, so
//! the holder of a job (its record's `leaseOwner`) can be found and killed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// What every instance is started with (besides its own log).
#[derive(Clone)]
pub struct FleetEnv {
    pub nats_url: String,
    pub mongodb_uri: String,
    pub db_name: String,
    pub replicas: u16,
    pub secret: String,
    pub dir: PathBuf,
}

/// One `contact-bulk serve` process.
pub struct Instance {
    pub n: usize,
    pub child: Child,
    pub log: PathBuf,
}

/// The running instances, by number; replacements get new numbers.
pub struct Fleet {
    env: FleetEnv,
    next: usize,
    pub live: Vec<Instance>,
    /// Every instance ever started: lease owner id → instance number.
    pub owners: Arc<Mutex<HashMap<String, usize>>>,
}

impl Fleet {
    pub fn new(env: FleetEnv) -> Fleet {
        Fleet {
            env,
            next: 1,
            live: Vec::new(),
            owners: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Starts one more instance (does not wait for it to listen).
    pub fn spawn(&mut self) -> usize {
        let n = self.next;
        self.next += 1;
        let log = self.env.dir.join(format!("instance-{n}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_contact-bulk"))
            .arg("serve")
            .env("NATS_URL", &self.env.nats_url)
            .env("BULK_STREAM_REPLICAS", self.env.replicas.to_string())
            .env("MONGODB_URI", &self.env.mongodb_uri)
            .env("MONGODB_DB", &self.env.db_name)
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("JWT_SECRET", &self.env.secret)
            .env_remove("BULK_SUBJECT_PREFIX")
            .env("BULK_LEASE_MS", "2000")
            .env("BULK_SCAN_MS", "200")
            .env("BULK_EXPORT_BATCH", "250")
            .env("BULK_DELETE_BATCH", "100")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("contact-bulk serve starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take().expect("stderr piped");
        tokio::spawn(copy_log(
            stdout,
            stderr,
            log.clone(),
            n,
            self.owners.clone(),
        ));
        self.live.push(Instance { n, child, log });
        n
    }

    /// SIGKILLs instance `n` and reaps it; true if it was running.
    pub async fn kill(&mut self, n: usize) -> bool {
        let Some(i) = self.live.iter().position(|x| x.n == n) else {
            return false;
        };
        let mut inst = self.live.remove(i);
        let was_running = matches!(inst.child.try_wait(), Ok(None));
        let _ = inst.child.start_kill();
        tokio::time::timeout(Duration::from_secs(10), inst.child.wait())
            .await
            .expect("a killed instance is reaped within 10 s")
            .expect("wait for the killed instance");
        was_running
    }

    /// The live instance holding `owner`'s lease, if it is one of ours and still running.
    pub fn holder(&mut self, owner: &str) -> Option<usize> {
        let n = *self.owners.lock().unwrap().get(owner)?;
        let inst = self.live.iter_mut().find(|x| x.n == n)?;
        matches!(inst.child.try_wait(), Ok(None)).then_some(n)
    }

    /// Replaces instances that exited on their own (e.g. a start during an
    /// outage gave up): the fleet keeps its size.
    pub fn respawn_exited(&mut self) -> Vec<(usize, String)> {
        let mut gone = Vec::new();
        let mut i = 0;
        while i < self.live.len() {
            match self.live[i].child.try_wait() {
                Ok(Some(status)) => {
                    let inst = self.live.remove(i);
                    gone.push((inst.n, status.to_string()));
                }
                _ => i += 1,
            }
        }
        for _ in &gone {
            self.spawn();
        }
        gone
    }

    /// Waits until every live instance logged that it listens.
    pub async fn wait_listening(&self, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        for inst in &self.live {
            loop {
                let text = std::fs::read_to_string(&inst.log).unwrap_or_default();
                if text.contains("listening on http://") {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "instance {} did not listen within {deadline:?}; log:\n{}",
                    inst.n,
                    tail(&inst.log, 40)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The last lines of every instance's log (live or dead), for a failure report.
    pub fn logs_report(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in 1..self.next {
            let log = self.env.dir.join(format!("instance-{n}.log"));
            out.push_str(&format!(
                "--- instance {n} ({}) ---\n{}\n",
                log.display(),
                tail(&log, lines)
            ));
        }
        out
    }

    /// Every instance's log lines that match `needle` (for a failure report).
    pub fn grep(&self, needle: &str) -> Vec<String> {
        let mut out = Vec::new();
        for n in 1..self.next {
            let log = self.env.dir.join(format!("instance-{n}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            out.extend(
                text.lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| format!("[{n}] {l}")),
            );
        }
        out
    }
}

/// Copies an instance's stdout and stderr into its log file and records its
/// lease owner id from the `instance id` line.
async fn copy_log(
    stdout: tokio::process::ChildStdout,
    stderr: tokio::process::ChildStderr,
    log: PathBuf,
    n: usize,
    owners: Arc<Mutex<HashMap<String, usize>>>,
) {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .await
        .expect("instance log opens");
    let file = Arc::new(tokio::sync::Mutex::new(file));
    let err_file = file.clone();
    let errs = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut f = err_file.lock().await;
            let _ = f.write_all(format!("{line}\n").as_bytes()).await;
        }
    });
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("instance id") {
            if let Some(owner) = field(&line, "instance") {
                owners.lock().unwrap().insert(owner, n);
            }
        }
        let mut f = file.lock().await;
        let _ = f.write_all(format!("{line}\n").as_bytes()).await;
        let _ = f.flush().await;
    }
    let _ = errs.await;
}

/// The value of `name=value` in a tracing line (text format, ANSI off).
fn field(line: &str, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(|v| v.trim_matches('"').to_string())
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
