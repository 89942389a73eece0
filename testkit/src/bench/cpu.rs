//! Where a benchmark's time goes: CPU seconds of the service child, the
//! MongoDB-wire server and nats-server over an interval, read from `/proc`.

use std::path::Path;
use std::time::Instant;

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS: f64 = 100.0;

/// The processes to watch.
pub struct CpuProbe {
    procs: Vec<(&'static str, u32)>,
}

/// CPU seconds per process at one instant.
#[derive(Debug, Clone)]
pub struct CpuSample {
    seconds: Vec<(&'static str, f64)>,
}

impl CpuProbe {
    /// The service child, plus the servers whose command line names `scratch`.
    pub fn new(scratch: &Path, service_pid: u32) -> CpuProbe {
        let mut procs = vec![("service", service_pid)];
        let dir = scratch.to_string_lossy().to_string();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    continue;
                };
                let cmd = String::from_utf8_lossy(&cmd);
                if !cmd.contains(&dir) {
                    continue;
                }
                if cmd.contains("nats-server") {
                    procs.push(("nats", pid));
                } else if cmd.contains("secantusd") {
                    procs.push(("mongodb", pid));
                }
            }
        }
        CpuProbe { procs }
    }

    /// Reads every process's CPU time now.
    pub fn sample(&self) -> CpuSample {
        CpuSample {
            seconds: self
                .procs
                .iter()
                .map(|(name, pid)| (*name, cpu_seconds(*pid).unwrap_or(0.0)))
                .collect(),
        }
    }
}

impl CpuSample {
    /// CPU seconds per process since `before`, as JSON.
    pub fn json_since(&self, before: &CpuSample) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for ((name, now), (_, then)) in self.seconds.iter().zip(&before.seconds) {
            m.insert(
                (*name).to_string(),
                serde_json::json!(((now - then) * 100.0).round() / 100.0),
            );
        }
        serde_json::Value::Object(m)
    }
}

/// User + system CPU seconds of a process.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<f64> {
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

/// Runs `f` (which returns how many documents it handled) and prints one
/// line: its wall time and the CPU seconds of each process meanwhile. The
/// probes of `testkit/examples/` are made of these.
pub async fn measure<F: std::future::Future<Output = anyhow::Result<u64>>>(
    cpu: &CpuProbe,
    what: &str,
    f: F,
) -> anyhow::Result<()> {
    let before = cpu.sample();
    let t = Instant::now();
    let n = f.await?;
    println!(
        "{what:<56} n={n:<8} wall {:.3} s  cpu {}",
        t.elapsed().as_secs_f64(),
        cpu.sample().json_since(&before)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let stat = "42 (contact bulk) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(parse_stat(stat), Some(3.0));
        assert!(cpu_seconds(std::process::id()).is_some());
    }
}
