//! The Node yardsticks of the benchmarks (`yardsticks/` in the repository, a
//! verbatim copy of the shared ones): what a user would write instead of
//! contact-bulk, run as they are with the official `mongodb` driver and
//! `csv-stringify` from npm.
//!
//! The scripts are compiled into the binary, so a release build benchmarks from
//! anywhere; `npm install` runs once per version of the scripts in a scratch
//! copy under `${XDG_CACHE_HOME:-~/.cache}/contact-bulk/yardsticks/`, outside
//! the clone, and the finished copy is renamed into place so a concurrent or
//! interrupted install never leaves a half-filled one behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use bson::oid::ObjectId;
use sha2::{Digest, Sha256};
use tokio::process::Command;

const FILES: [(&str, &str); 4] = [
    (
        "package.json",
        include_str!("../../../yardsticks/package.json"),
    ),
    ("export.js", include_str!("../../../yardsticks/export.js")),
    ("delete.js", include_str!("../../../yardsticks/delete.js")),
    ("README.md", include_str!("../../../yardsticks/README.md")),
];

/// Written last into a copy whose `npm install` succeeded.
const INSTALLED: &str = ".installed";

/// The installed Node yardsticks.
#[derive(Debug, Clone)]
pub struct Yardsticks {
    dir: PathBuf,
    node: PathBuf,
}

/// What a yardstick script printed: the documents it handled and its own
/// timing (from after it connected to the end of its work).
#[derive(Debug, Clone, Copy)]
pub struct NodeRun {
    /// Rows written (export) or contacts removed (delete).
    pub count: u64,
    /// Its own measurement.
    pub took: Duration,
}

impl Yardsticks {
    /// Finds `node` and `npm` (`NODE` and `NPM` override the `PATH` lookup) and
    /// installs the scripts' npm packages into the cache unless already there.
    pub async fn install() -> anyhow::Result<Yardsticks> {
        let node = tool("NODE", "node")?;
        let npm = tool("NPM", "npm")?;
        let dir = cache_root()?.join(version());
        if !dir.join(INSTALLED).exists() {
            install_into(&dir, &npm).await?;
        }
        Ok(Yardsticks { dir, node })
    }

    /// `node export.js URI DB ORG OUT`.
    pub async fn export(
        &self,
        uri: &str,
        db: &str,
        org: ObjectId,
        out: &Path,
    ) -> anyhow::Result<NodeRun> {
        let out = out.to_string_lossy().to_string();
        self.run("export.js", &[uri, db, &org.to_hex(), &out], "rows")
            .await
    }

    /// `node delete.js URI DB ORG STAGE`.
    pub async fn delete(
        &self,
        uri: &str,
        db: &str,
        org: ObjectId,
        stage: ObjectId,
    ) -> anyhow::Result<NodeRun> {
        self.run(
            "delete.js",
            &[uri, db, &org.to_hex(), &stage.to_hex()],
            "contacts",
        )
        .await
    }

    async fn run(&self, script: &str, args: &[&str], key: &str) -> anyhow::Result<NodeRun> {
        let out = Command::new(&self.node)
            .arg(self.dir.join(script))
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running node {script}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "node {script} failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_line(&stdout, key).with_context(|| format!("node {script} printed {stdout:?}"))
    }
}

/// The last JSON line of a script's output: `{"<key>": n, "seconds": s}`.
fn parse_line(stdout: &str, key: &str) -> anyhow::Result<NodeRun> {
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .context("no JSON line")?;
    let count = line[key].as_u64().with_context(|| format!("no {key}"))?;
    let seconds = line["seconds"].as_f64().context("no seconds")?;
    if !(seconds.is_finite() && seconds >= 0.0) {
        bail!("bad seconds {seconds}");
    }
    Ok(NodeRun {
        count,
        took: Duration::from_secs_f64(seconds),
    })
}

/// Sixteen hex digits of the scripts' hash: a changed script gets a fresh copy.
fn version() -> String {
    let mut h = Sha256::new();
    for (name, text) in FILES {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(text.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..8])
}

fn cache_root() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(cache.join("contact-bulk").join("yardsticks"))
}

/// `var` from the environment, else `name` on the `PATH`.
fn tool(var: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(v));
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .with_context(|| {
            format!("{name} not found on PATH (set {var}; scripts/test.sh installs it on Debian)")
        })
}

async fn install_into(dir: &Path, npm: &Path) -> anyhow::Result<()> {
    let parent = dir
        .parent()
        .context("yardsticks directory without parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let scratch = parent.join(format!(".install-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&scratch)?;
    let result = async {
        for (name, text) in FILES {
            std::fs::write(scratch.join(name), text)?;
        }
        eprintln!(
            "installing the Node yardsticks' npm packages into {}",
            dir.display()
        );
        let out = Command::new(npm)
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&scratch)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("running npm install")?;
        if !out.status.success() {
            bail!(
                "npm install failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for module in ["mongodb", "csv-stringify"] {
            if !scratch.join("node_modules").join(module).is_dir() {
                bail!("npm install did not install {module}");
            }
        }
        std::fs::write(scratch.join(INSTALLED), b"")?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&scratch, dir) {
        let _ = std::fs::remove_dir_all(&scratch);
        // Another install finished first: theirs serves as well.
        if !dir.join(INSTALLED).exists() {
            return Err(e).with_context(|| format!("moving the install to {}", dir.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_scripts_line() {
        let run = parse_line("noise\n{\"rows\": 3000, \"seconds\": 0.5}\n", "rows").unwrap();
        assert_eq!(run.count, 3000);
        assert_eq!(run.took, Duration::from_millis(500));
        assert!(parse_line("{\"contacts\": 1}", "contacts").is_err());
        assert!(parse_line("nothing", "rows").is_err());
    }

    #[test]
    fn the_version_follows_the_scripts() {
        assert_eq!(version().len(), 16);
        assert_eq!(version(), version());
    }
}
