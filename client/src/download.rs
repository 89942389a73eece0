//! Streams a finished export from its signed `downloadUrl` to a file, hashing
//! while writing (the file is never held in memory), then checks the sha256.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// What landed on disk.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// Final path.
    pub path: PathBuf,
    /// Bytes written.
    pub bytes: u64,
    /// Hex sha256 of what was written.
    pub sha256: String,
}

/// Where the file goes: `output`, or the server's file name (stripped of any
/// directory part) in the current directory.
pub fn target_path(output: Option<&Path>, file_name: &str) -> PathBuf {
    match output {
        Some(p) => p.to_path_buf(),
        None => {
            let name = Path::new(file_name)
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("export.csv"));
            PathBuf::from(".").join(name)
        }
    }
}

/// Downloads `url` to `path` through `<path>.part`, renamed once the sha256
/// equals `expected_sha256`. On a mismatch the `.part` file is kept and an
/// error names both digests. `progress` is told the bytes written so far
/// after each chunk.
pub async fn download(
    url: &str,
    path: &Path,
    expected_sha256: &str,
    expected_bytes: Option<u64>,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<Downloaded> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("downloading {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("download failed with http {status}: {body}");
    }
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let file = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("creating {}", part.display()))?;
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("reading the download")?;
        hasher.update(&chunk);
        out.write_all(&chunk)
            .await
            .with_context(|| format!("writing {}", part.display()))?;
        bytes += chunk.len() as u64;
        progress(bytes);
    }
    out.flush().await?;
    out.into_inner().sync_all().await?;
    let sha256 = hex::encode(hasher.finalize());
    if !sha256.eq_ignore_ascii_case(expected_sha256) {
        bail!(
            "sha256 mismatch: the job reports {expected_sha256}, the download is {sha256} \
             ({bytes} bytes kept in {})",
            part.display()
        );
    }
    if let Some(expected) = expected_bytes.filter(|e| *e != bytes) {
        bail!("size mismatch: the job reports {expected} bytes, the download has {bytes}");
    }
    tokio::fs::rename(&part, path)
        .await
        .with_context(|| format!("moving {} to {}", part.display(), path.display()))?;
    Ok(Downloaded {
        path: path.to_path_buf(),
        bytes,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_target_is_the_bare_file_name_here() {
        assert_eq!(
            target_path(None, "../x/contacts.csv"),
            PathBuf::from("./contacts.csv")
        );
        assert_eq!(
            target_path(Some(Path::new("/tmp/a.csv")), "b.csv"),
            PathBuf::from("/tmp/a.csv")
        );
    }
}
