//! Process plumbing of the server guards (`servers.rs`): logs, their rotation and
//! tails, and spawning children that die with this process.

use super::*;

/// The port at the end of the first line containing `marker` (`...on 127.0.0.1:4222`).
pub(super) fn port_after(text: &str, marker: &str) -> Option<u16> {
    let line = text.lines().find(|l| l.contains(marker))?;
    let rest = &line[line.find(marker)? + marker.len()..];
    let addr = rest.split_whitespace().next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// The log written since `offset` (what this attempt wrote).
pub(super) fn read_log(log: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(log) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Keeps one previous log (`<log>.1`) once the log passes 16 MB, so the logs
/// of a long-lived `.data` dir stay bounded.
pub(super) fn rotate_log(log: &Path) {
    const MAX: u64 = 16 << 20;
    if std::fs::metadata(log).is_ok_and(|m| m.len() > MAX) {
        let mut old = log.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(log, old);
    }
}

pub(super) fn log_tail(log: &Path, offset: u64) -> String {
    let text = read_log(log, offset);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

pub(super) async fn spawn_logged(
    bin: &Path,
    args: &[OsString],
    dir: &Path,
    log: &Path,
) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    // Own process group: a terminal's Ctrl-C goes to the parent only, which
    // drains against live servers before dropping the guards.
    #[cfg(unix)]
    cmd.process_group(0);
    spawn_child(cmd)
        .await
        .with_context(|| format!("starting {}", bin.display()))
}

/// Spawns on a thread that lives as long as the process: `PR_SET_PDEATHSIG`
/// fires when the *thread* that forked the child ends, and test threads end
/// after every test.
#[cfg(target_os = "linux")]
pub async fn spawn_child(mut cmd: Command) -> std::io::Result<Child> {
    use std::sync::mpsc;
    use std::sync::OnceLock;

    type Job = (
        Command,
        tokio::runtime::Handle,
        tokio::sync::oneshot::Sender<std::io::Result<Child>>,
    );
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

    extern "C" {
        fn prctl(option: std::os::raw::c_int, ...) -> std::os::raw::c_int;
    }
    const PR_SET_PDEATHSIG: std::os::raw::c_int = 1;
    const SIGKILL: std::os::raw::c_ulong = 9;
    const ESRCH: i32 = 3;

    let parent = std::process::id();
    // SAFETY: runs in the forked child before exec; it only makes two
    // async-signal-safe system calls (prctl, getppid) and does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if std::os::unix::process::parent_id() != parent {
                return Err(std::io::Error::from_raw_os_error(ESRCH));
            }
            Ok(())
        });
    }

    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name("server-spawner".into())
            .spawn(move || {
                for (mut cmd, handle, reply) in rx {
                    let _runtime = handle.enter();
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "no spawner thread; servers outlive a killed parent");
        }
        tx
    });
    let (reply, answer) = tokio::sync::oneshot::channel();
    match spawner.send((cmd, tokio::runtime::Handle::current(), reply)) {
        Ok(()) => answer
            .await
            .map_err(|_| std::io::Error::other("server spawner thread is gone"))?,
        // No spawner thread: spawn here (the child then dies with this thread).
        Err(mpsc::SendError((mut cmd, _, _))) => cmd.spawn(),
    }
}

#[cfg(not(target_os = "linux"))]
pub async fn spawn_child(mut cmd: Command) -> std::io::Result<Child> {
    cmd.spawn()
}

pub(super) async fn kill_and_wait(child: &mut Child) -> anyhow::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    // start_kill fails only when the child was already reaped.
    let _ = child.start_kill();
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .context("server did not die within 10 s of SIGKILL")??;
    Ok(())
}

/// SIGKILL and reap without a runtime (Drop): the port and the directory are
/// free once the guard is gone.
pub(super) fn kill_blocking(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let _ = child.start_kill();
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}
