//! The export file's SHA-256, computed as its chunks are checkpointed (see `export.rs`).

use sha2::{Digest, Sha256};

/// The file's hash as it is written: chunk 0 (the header) when the export
/// starts, then each chunk once its checkpoint is written, in order. A resumed
/// export has none (a hasher's state cannot be stored with the checkpoint), so
/// it reads its file back once at completion, as does any export whose digest
/// fell out of step with its checkpoint.
pub(super) struct FileDigest {
    pub(super) hasher: Sha256,
    pub(super) bytes: i64,
    /// The chunk the hasher expects next.
    pub(super) next_chunk: i64,
}

impl FileDigest {
    /// Adds chunk `n`; out of order, the digest is dropped (read back instead).
    pub(super) fn add(digest: &mut Option<FileDigest>, n: i64, data: &[u8]) {
        match digest {
            Some(d) if d.next_chunk == n => {
                d.hasher.update(data);
                d.bytes += data.len() as i64;
                d.next_chunk += 1;
            }
            _ => *digest = None,
        }
    }
}
