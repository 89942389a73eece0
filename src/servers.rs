//! Child-process guards for the real NATS and MongoDB-wire servers, used by
//! `contact-bulk dev`, the tests and the benchmarks. The servers run as separate
//! processes (never linked in) and are killed when their guard drops.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::process::{Child, Command};

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `nats-server`.
    Nats,
    /// `secantusd-rs` (MongoDB wire protocol).
    Mongo,
}

impl ServerKind {
    fn env_var(self) -> &'static str {
        match self {
            ServerKind::Nats => "CONTACT_BULK_NATS_SERVER",
            ServerKind::Mongo => "CONTACT_BULK_MONGO_SERVER",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            ServerKind::Nats => "nats-server",
            ServerKind::Mongo => "secantusd-rs",
        }
    }
}

/// The repo's `nats.conf`.
pub fn repo_nats_conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nats.conf")
}

/// Finds a server binary: the env var, then the install script's cache file, then `$PATH`.
pub fn find_binary(kind: ServerKind) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(kind.env_var()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("contact-bulk").join("env"));
    if let Some(text) = cache.and_then(|f| std::fs::read_to_string(f).ok()) {
        let prefix = format!("export {}=", kind.env_var());
        for line in text.lines() {
            if let Some(v) = line.strip_prefix(&prefix) {
                let p = PathBuf::from(v.trim().trim_matches('"'));
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(kind.binary());
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "{} not found: run scripts/install-servers.sh (or set {})",
        kind.binary(),
        kind.env_var()
    )
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

async fn spawn(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// Waits until `ready` says yes, the child exits, or the deadline passes.
async fn wait_ready<F, Fut>(
    child: &mut Child,
    deadline: Duration,
    log: &Path,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("server exited with {status}:\n{}", log_tail(log));
        }
        if ready().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= until {
            bail!("server not ready within {deadline:?}:\n{}", log_tail(log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kill(child: &mut Child) -> anyhow::Result<()> {
    child.start_kill().ok();
    child.wait().await?;
    Ok(())
}

/// A running `nats-server` with JetStream.
pub struct NatsServer {
    child: Child,
    port: u16,
}

impl NatsServer {
    /// Starts `nats-server -c <conf> -a 127.0.0.1 -p <port> -sd <dir>/jetstream`
    /// (`port` None = a free ephemeral port) and waits until it is ready.
    pub async fn start(
        nats_conf: &Path,
        dir: &Path,
        port: Option<u16>,
    ) -> anyhow::Result<NatsServer> {
        let bin = find_binary(ServerKind::Nats)?;
        std::fs::create_dir_all(dir)?;
        let log = dir.join("nats-server.log");
        let mut last = None;
        for _ in 0..5 {
            let port = match port {
                Some(p) => p,
                None => free_port()?,
            };
            let args = vec![
                "-c".into(),
                nats_conf.display().to_string(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-sd".into(),
                dir.join("jetstream").display().to_string(),
            ];
            let _ = std::fs::remove_file(&log);
            let mut child = spawn(&bin, &args, &log).await?;
            let log_ref = log.clone();
            let ready = wait_ready(&mut child, Duration::from_secs(10), &log, || {
                let log = log_ref.clone();
                async move {
                    std::fs::read_to_string(&log)
                        .map(|t| t.contains("Server is ready"))
                        .unwrap_or(false)
                }
            })
            .await;
            match ready {
                Ok(()) => return Ok(NatsServer { child, port }),
                Err(e) => {
                    let _ = kill(&mut child).await;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("nats-server did not start")))
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL (crash tests); `start` with the same port and dir brings it back.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        kill(&mut self.child).await
    }
}

/// A running `secantusd-rs` (MongoDB wire protocol).
pub struct MongoServer {
    child: Child,
    port: u16,
}

impl MongoServer {
    /// Starts the server on `dir` (`port` None = a free ephemeral port) and waits
    /// until it answers `ping`.
    pub async fn start(dir: &Path, port: Option<u16>) -> anyhow::Result<MongoServer> {
        let bin = find_binary(ServerKind::Mongo)?;
        std::fs::create_dir_all(dir)?;
        let log = dir.join("secantusd.log");
        let mut last = None;
        for _ in 0..5 {
            let port = match port {
                Some(p) => p,
                None => free_port()?,
            };
            let args = vec![
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--storage-path".into(),
                dir.join("data").display().to_string(),
                "--log-file-max".into(),
                "16MB".into(),
                "--cache-size".into(),
                "512M".into(),
            ];
            let mut child = spawn(&bin, &args, &log).await?;
            let uri = format!(
                "mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=500"
            );
            let ready = wait_ready(&mut child, Duration::from_secs(20), &log, || {
                let uri = uri.clone();
                async move { ping(&uri).await }
            })
            .await;
            match ready {
                Ok(()) => return Ok(MongoServer { child, port }),
                Err(e) => {
                    let _ = kill(&mut child).await;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("secantusd-rs did not start")))
    }

    /// `mongodb://127.0.0.1:PORT/?directConnection=true`.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL (crash tests); `start` with the same port and dir brings it back.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        kill(&mut self.child).await
    }
}

async fn ping(uri: &str) -> bool {
    if tokio::net::TcpStream::connect(
        uri.trim_start_matches("mongodb://")
            .split('/')
            .next()
            .unwrap_or_default(),
    )
    .await
    .is_err()
    {
        return false;
    }
    let Ok(client) = mongodb::Client::with_uri_str(uri).await else {
        return false;
    };
    client
        .database("admin")
        .run_command(bson::doc! {"ping": 1})
        .await
        .is_ok()
}
