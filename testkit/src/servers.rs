//! Child-process guards for the real NATS and MongoDB-wire servers, used by
//! `contact-bulk dev`, the tests and the benchmarks.
//!
//! The servers are separate programs, run as child processes and never linked
//! in (`secantusd-rs` is GPL-2.0-only). Each guard:
//! - appends the server's stdout and stderr to a log file in its directory
//!   (`nats-server.log`, `secantusd.log`) and quotes its tail in start errors;
//! - lets the server pick its own port when none is given (`-p -1`,
//!   `--port 0`) and reads it back from the log, so there is no race between
//!   choosing a free port and binding it;
//! - returns only once the server really serves (NATS: the `INFO` line with
//!   JetStream on; MongoDB: a `ping` through the driver);
//! - SIGKILLs and reaps the server when dropped.
//!
//! The servers run in their own process group, so a Ctrl-C in the terminal
//! reaches only the parent, which can drain its jobs against live servers and
//! then drop the guards. On Linux they are also SIGKILLed by the kernel if the
//! parent dies without dropping its guards (`PR_SET_PDEATHSIG`), so an
//! interrupted test run leaves no servers behind.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

mod cluster;
mod process;
pub use cluster::NatsCluster;
pub use process::spawn_child;
use process::*;

/// How long `nats-server` gets to come up.
const NATS_DEADLINE: Duration = Duration::from_secs(10);
/// How long `secantusd-rs` gets to come up (WiredTiger recovery after a crash included).
const MONGO_DEADLINE: Duration = Duration::from_secs(20);
/// Start attempts when the server exits right away (e.g. its port was taken).
const ATTEMPTS: u32 = 5;
/// Poll interval while waiting for readiness.
const POLL: Duration = Duration::from_millis(20);

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `nats-server`.
    Nats,
    /// `secantusd-rs` (MongoDB wire protocol).
    Mongo,
}

impl ServerKind {
    /// The environment variable naming the binary.
    pub fn env_var(self) -> &'static str {
        match self {
            ServerKind::Nats => "CONTACT_BULK_NATS_SERVER",
            ServerKind::Mongo => "CONTACT_BULK_MONGO_SERVER",
        }
    }

    /// The binary's name on `$PATH`.
    pub fn binary_name(self) -> &'static str {
        match self {
            ServerKind::Nats => "nats-server",
            ServerKind::Mongo => "secantusd-rs",
        }
    }
}

/// The repo's `nats.conf` (JetStream on, limits for dev runs and tests).
pub fn repo_nats_conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats.conf")
}

/// Finds a server binary: the environment variable (`CONTACT_BULK_NATS_SERVER`
/// / `CONTACT_BULK_MONGO_SERVER`), then the `export` lines of
/// `${XDG_CACHE_HOME:-$HOME/.cache}/contact-bulk/env` (written by
/// `scripts/install-servers.sh`), then `$PATH`.
pub fn find_binary(kind: ServerKind) -> anyhow::Result<PathBuf> {
    let var = kind.env_var();
    let name = kind.binary_name();
    if let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        if is_executable(&path) {
            return Ok(path);
        }
        bail!(
            "{var}={} is not an executable file. Run `bash scripts/install-servers.sh` \
             from the repo root, then `source ~/.cache/contact-bulk/env` (or unset {var}).",
            path.display()
        );
    }
    let env_file = cache_env_file();
    if let Some(file) = &env_file {
        if let Some(path) = read_env_file(file, var) {
            if is_executable(&path) {
                return Ok(path);
            }
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let path = dir.join(name);
            if is_executable(&path) {
                return Ok(path);
            }
        }
    }
    let env_file = env_file.map_or_else(
        || "${XDG_CACHE_HOME:-$HOME/.cache}/contact-bulk/env".to_string(),
        |f| f.display().to_string(),
    );
    bail!(
        "\n\n  {name} NOT FOUND: it is not in ${var}, nor in {env_file}, nor on $PATH.\n  \
         Install the servers with `bash scripts/install-servers.sh` from the repo root \
         (about 5 minutes the first time, cached afterwards),\n  \
         then `source {env_file}`.\n"
    )
}

fn cache_env_file() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("contact-bulk").join("env"))
}

/// The value of `var` in a file of `export VAR="value"` lines.
fn read_env_file(file: &Path, var: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let value = line.strip_prefix(var)?.strip_prefix('=')?.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        (!value.is_empty()).then(|| PathBuf::from(value))
    })
}

fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

/// A running `nats-server` with JetStream; SIGKILLed and reaped on drop.
pub struct NatsServer {
    child: Child,
    port: u16,
    bin: PathBuf,
    conf: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    /// Arguments after the common ones (a cluster node's name and routes).
    extra: Vec<OsString>,
}

impl NatsServer {
    /// Starts `nats-server -c <nats_conf> -a 127.0.0.1 -p <port> -sd <dir>/jetstream`
    /// (`port` None = an ephemeral port) and waits, at most 10 s, until it
    /// accepts connections with JetStream ready. The log is `<dir>/nats-server.log`.
    pub async fn start(
        nats_conf: &Path,
        dir: &Path,
        port: Option<u16>,
    ) -> anyhow::Result<NatsServer> {
        let bin = find_binary(ServerKind::Nats)?;
        let conf = std::path::absolute(nats_conf)?;
        if !conf.is_file() {
            bail!("nats config {} does not exist", conf.display());
        }
        let dir = prepare_dir(dir)?;
        let log = dir.join("nats-server.log");
        let (child, port) = launch_nats(&bin, &conf, &dir, &log, port, &[]).await?;
        Ok(NatsServer {
            child,
            port,
            bin,
            conf,
            dir,
            log,
            extra: Vec::new(),
        })
    }

    /// Like [`NatsServer::start`], with `extra` arguments after the common ones;
    /// [`NatsServer::restart`] passes them again.
    async fn start_with(
        nats_conf: &Path,
        dir: &Path,
        port: Option<u16>,
        extra: Vec<OsString>,
    ) -> anyhow::Result<NatsServer> {
        let bin = find_binary(ServerKind::Nats)?;
        let conf = std::path::absolute(nats_conf)?;
        let dir = prepare_dir(dir)?;
        let log = dir.join("nats-server.log");
        let (child, port) = launch_nats(&bin, &conf, &dir, &log, port, &extra).await?;
        Ok(NatsServer {
            child,
            port,
            bin,
            conf,
            dir,
            log,
            extra,
        })
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGKILL and wait (crash tests). The directory is kept: [`NatsServer::restart`],
    /// or `start` with the same port and dir, brings it back with its streams.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        kill_and_wait(&mut self.child).await
    }

    /// Kills the server if it runs, then starts it again on the same port and dir.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        let (child, _) = launch_nats(
            &self.bin,
            &self.conf,
            &self.dir,
            &self.log,
            Some(self.port),
            &self.extra,
        )
        .await?;
        self.child = child;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill_blocking(&mut self.child);
    }
}

/// A running `secantusd-rs` (MongoDB wire protocol); SIGKILLed and reaped on drop.
pub struct MongoServer {
    child: Child,
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    log: PathBuf,
}

impl MongoServer {
    /// Starts `secantusd-rs --host 127.0.0.1 --port <port> --storage-path <dir>/data
    /// --log-file-max 16MB --cache-size 512M --sync-on-commit` (`port` None = an
    /// ephemeral port)
    /// and waits, at most 20 s, until it answers `ping`. The log is
    /// `<dir>/secantusd.log`; an empty `<dir>/secantusd.toml` is passed as
    /// `--config` so no config file elsewhere on the machine is picked up.
    pub async fn start(dir: &Path, port: Option<u16>) -> anyhow::Result<MongoServer> {
        let bin = find_binary(ServerKind::Mongo)?;
        let dir = prepare_dir(dir)?;
        let log = dir.join("secantusd.log");
        let (child, port) = launch_mongo(&bin, &dir, &log, port).await?;
        Ok(MongoServer {
            child,
            port,
            bin,
            dir,
            log,
        })
    }

    /// `mongodb://127.0.0.1:PORT/?directConnection=true`.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGKILL and wait (crash tests). The directory is kept: [`MongoServer::restart`],
    /// or `start` with the same port and dir, brings it back with its data.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        kill_and_wait(&mut self.child).await
    }

    /// Kills the server if it runs, then starts it again on the same port and dir.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        let (child, _) = launch_mongo(&self.bin, &self.dir, &self.log, Some(self.port)).await?;
        self.child = child;
        Ok(())
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        kill_blocking(&mut self.child);
    }
}

fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = std::path::absolute(dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// One server's start parameters.
struct Launch {
    name: &'static str,
    deadline: Duration,
    probe: Probe,
}

/// How readiness is checked once the log says the server listens.
#[derive(Clone, Copy)]
enum Probe {
    /// Read the `INFO` line; JetStream must be on.
    NatsInfo,
    /// `ping` through the MongoDB driver.
    MongoPing,
}

/// Why one start attempt failed.
enum Failure {
    /// The server exited on its own: worth another attempt.
    Exited(anyhow::Error),
    /// Anything else (deadline, I/O): final.
    Fatal(anyhow::Error),
}

async fn launch_nats(
    bin: &Path,
    conf: &Path,
    dir: &Path,
    log: &Path,
    port: Option<u16>,
    extra: &[OsString],
) -> anyhow::Result<(Child, u16)> {
    let mut args: Vec<OsString> = vec!["-c".into(), conf.into(), "-a".into(), "127.0.0.1".into()];
    // -1: nats-server picks a free port and logs it.
    args.extend(["-p".into(), port.map_or(-1, i32::from).to_string().into()]);
    args.extend(["-sd".into(), dir.join("jetstream").into()]);
    args.extend(extra.iter().cloned());
    let spec = Launch {
        name: "nats-server",
        deadline: NATS_DEADLINE,
        probe: Probe::NatsInfo,
    };
    launch(spec, bin, &args, dir, log, |text| {
        let port = port_after(text, "Listening for client connections on ")?;
        text.contains("Server is ready").then_some(port)
    })
    .await
}

async fn launch_mongo(
    bin: &Path,
    dir: &Path,
    log: &Path,
    port: Option<u16>,
) -> anyhow::Result<(Child, u16)> {
    let config = dir.join("secantusd.toml");
    if !config.exists() {
        std::fs::write(
            &config,
            "# Empty on purpose: every setting is a command-line flag (see src/servers.rs).\n",
        )
        .with_context(|| format!("writing {}", config.display()))?;
    }
    let args: Vec<OsString> = vec![
        "--config".into(),
        config.into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        // 0: secantusd-rs picks a free port and prints it.
        port.unwrap_or(0).to_string().into(),
        "--storage-path".into(),
        dir.join("data").into(),
        "--log-file-max".into(),
        "16MB".into(),
        "--cache-size".into(),
        "512M".into(),
        // Every acknowledged write is fsynced, as a journaled MongoDB would keep
        // it: without it a SIGKILL of the server loses recent acknowledged
        // writes (job records, checkpoints) and the crash tests test nothing.
        "--sync-on-commit".into(),
    ];
    let spec = Launch {
        name: "secantusd-rs",
        deadline: MONGO_DEADLINE,
        probe: Probe::MongoPing,
    };
    launch(spec, bin, &args, dir, log, |text| {
        port_after(text, "listening on ")
    })
    .await
}

/// Starts `bin` until it comes up (up to [`ATTEMPTS`] times when it exits right
/// away). `listening` finds the port in the log written by this attempt once
/// the server says it serves; then the port is probed with the server's protocol.
async fn launch(
    spec: Launch,
    bin: &Path,
    args: &[OsString],
    dir: &Path,
    log: &Path,
    listening: impl Fn(&str) -> Option<u16>,
) -> anyhow::Result<(Child, u16)> {
    let name = spec.name;
    rotate_log(log);
    let mut attempt = 1;
    loop {
        let offset = std::fs::metadata(log).map_or(0, |m| m.len());
        let mut child = spawn_logged(bin, args, dir, log).await?;
        let started = Instant::now();
        let until = started + spec.deadline;
        let outcome =
            wait_ready(name, &mut child, log, offset, until, &listening, spec.probe).await;
        match outcome {
            Ok(port) => {
                tracing::debug!(
                    server = name,
                    port,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "server ready"
                );
                return Ok((child, port));
            }
            Err(failure) => {
                let _ = kill_and_wait(&mut child).await;
                let tail = log_tail(log, offset);
                match failure {
                    Failure::Exited(e) if attempt < ATTEMPTS => {
                        tracing::warn!(server = name, attempt, error = %e, log = %tail, "server exited at start, retrying");
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                    }
                    Failure::Exited(e) | Failure::Fatal(e) => {
                        bail!(
                            "{name} ({}) did not come up (attempt {attempt} of {ATTEMPTS}): {e:#}\n\
                             last lines of {}:\n{tail}",
                            bin.display(),
                            log.display()
                        );
                    }
                }
            }
        }
    }
}

async fn wait_ready(
    name: &str,
    child: &mut Child,
    log: &Path,
    offset: u64,
    until: Instant,
    listening: &impl Fn(&str) -> Option<u16>,
    probe: Probe,
) -> Result<u16, Failure> {
    // Phase 1: the log says the server listens (and on which port).
    let port = loop {
        check_running(name, child)?;
        if let Some(port) = listening(&read_log(log, offset)) {
            break port;
        }
        if Instant::now() >= until {
            return Err(Failure::Fatal(anyhow!(
                "{name} did not log that it listens"
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    // Phase 2: the server answers its own protocol on that port.
    let mongo = match probe {
        Probe::NatsInfo => None,
        Probe::MongoPing => {
            let uri = format!(
                "mongodb://127.0.0.1:{port}/?directConnection=true\
                 &serverSelectionTimeoutMS=1000&connectTimeoutMS=1000"
            );
            let client = mongodb::Client::with_uri_str(&uri)
                .await
                .map_err(|e| Failure::Fatal(e.into()))?;
            Some(client)
        }
    };
    loop {
        check_running(name, child)?;
        let answered = match &mongo {
            Some(client) => ping_mongo(client).await,
            None => nats_info_with_jetstream(port).await,
        };
        if answered {
            return Ok(port);
        }
        if Instant::now() >= until {
            return Err(Failure::Fatal(anyhow!(
                "{name} logged that it listens on port {port} but did not answer in time"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn check_running(name: &str, child: &mut Child) -> Result<(), Failure> {
    match child.try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(status)) => Err(Failure::Exited(anyhow!("{name} exited with {status}"))),
        Err(e) => Err(Failure::Fatal(e.into())),
    }
}

/// Connects, reads the `INFO {...}` line NATS greets with and checks JetStream is on.
async fn nats_info_with_jetstream(port: u16) -> bool {
    let probe = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut line = String::new();
        tokio::io::BufReader::new(stream)
            .read_line(&mut line)
            .await?;
        anyhow::Ok(line.starts_with("INFO ") && line.contains("\"jetstream\":true"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Ok(true))
    )
}

async fn ping_mongo(client: &mongodb::Client) -> bool {
    let admin = client.database("admin");
    let ping = admin.run_command(bson::doc! {"ping": 1});
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ping).await,
        Ok(Ok(_))
    )
}
