//! Export files stored in MongoDB as ordered chunks (`export_chunks`), one per flush.
//!
//! GridFS's own layout needs fixed-size chunks and a files document written at
//! close, so an upload cannot be resumed after a crash. Here each flush of the
//! export writes one chunk keyed `(jobId, n)` and then the job checkpoint names
//! the next `n`: a resumed job drops chunks past its checkpoint and carries on,
//! so the bytes and the checkpoint that covers them always agree.

use bson::{doc, spec::BinarySubtype, Binary, Document};
use futures::{Stream, StreamExt, TryStreamExt};
use mongodb::{options::ReplaceOptions, Collection, Database};
use sha2::{Digest, Sha256};

use crate::error::JobError;
use crate::store::names;

/// Chunked file storage for export results.
#[derive(Clone, Debug)]
pub struct Artifacts {
    chunks: Collection<Document>,
}

impl Artifacts {
    /// Uses the `export_chunks` collection of `db`.
    pub fn new(db: &Database) -> Artifacts {
        Artifacts {
            chunks: db.collection(names::CHUNKS),
        }
    }

    /// Writes chunk `n` of a job's file; writing it again replaces it (idempotent on retry).
    pub async fn put(&self, job_id: &str, n: i64, data: Vec<u8>) -> Result<(), JobError> {
        let chunk = doc! {
            "jobId": job_id,
            "n": n,
            "data": Binary { subtype: BinarySubtype::Generic, bytes: data },
        };
        self.chunks
            .replace_one(doc! {"jobId": job_id, "n": n}, chunk)
            .with_options(ReplaceOptions::builder().upsert(true).build())
            .await?;
        Ok(())
    }

    /// Drops chunks `n` and above: what a crash left past the last checkpoint.
    pub async fn truncate_from(&self, job_id: &str, n: i64) -> Result<(), JobError> {
        self.chunks
            .delete_many(doc! {"jobId": job_id, "n": {"$gte": n}})
            .await?;
        Ok(())
    }

    /// The file's bytes in order, a chunk at a time (memory stays at a couple of chunks).
    pub async fn stream(
        &self,
        job_id: &str,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, JobError>> + Send + 'static, JobError> {
        let cursor = self
            .chunks
            .find(doc! {"jobId": job_id})
            .sort(doc! {"n": 1})
            .batch_size(2)
            .await?;
        Ok(cursor.map(|doc| {
            let doc = doc?;
            match doc.get("data") {
                Some(bson::Bson::Binary(b)) => Ok(bytes::Bytes::from(b.bytes.clone())),
                _ => Err(JobError::Internal("export chunk without data".into())),
            }
        }))
    }

    /// Size and hex SHA-256 of the whole file, read back chunk by chunk.
    pub async fn digest(&self, job_id: &str) -> Result<(i64, String), JobError> {
        let mut stream = Box::pin(self.stream(job_id).await?);
        let mut hasher = Sha256::new();
        let mut size = 0i64;
        while let Some(chunk) = stream.try_next().await? {
            size += chunk.len() as i64;
            hasher.update(&chunk);
        }
        Ok((size, hex::encode(hasher.finalize())))
    }
}
