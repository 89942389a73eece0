//! What an export reads, behind one repository: the snapshot's bound, the
//! count of `total`, the custom-field keys, the rows of an `_id` range as raw
//! batches, and the pipeline, stage and owner names of the rows.
//!
//! Rows stay raw BSON from the server to the encoder: a [`RawBatch`] holds a
//! batch's documents back to back in one buffer, so reading a row costs a copy
//! of its bytes and no allocation, and the encoder picks the fields it needs
//! straight from them (see [`crate::encode`]).

use async_trait::async_trait;
use bson::{oid::ObjectId, RawDocument};
use futures::stream::BoxStream;

use crate::error::JobError;
use crate::id_ranges::IdRange;
use crate::model::JobRecord;

/// Rows of one range, a batch at a time, in `_id` order.
pub type BatchStream = BoxStream<'static, Result<RawBatch, JobError>>;

/// The contacts an export reads, scoped to the job's organisation and filter.
#[async_trait]
pub trait ExportSource: NameSource {
    /// The `_id` bound of the job's selection frozen now (see
    /// [`crate::snapshot::bound`]).
    async fn bound(&self, job: &JobRecord) -> Result<ObjectId, JobError>;

    /// Documents of the selection with `_id <= bound`, capped by the filter's
    /// `limit`: the job's `total`.
    async fn count(&self, job: &JobRecord, bound: ObjectId) -> Result<i64, JobError>;

    /// Every custom-field key of the selection's documents with
    /// `_id <= bound` (the first `limit` in `_id` order), sorted.
    async fn custom_keys(&self, job: &JobRecord, bound: ObjectId) -> Result<Vec<String>, JobError>;

    /// The selection's documents in `range`, whole, in `_id` order, at most
    /// `limit` of them, `batch` per [`RawBatch`]. The stream ends after the
    /// last batch; an error ends it too.
    async fn rows(
        &self,
        job: &JobRecord,
        range: IdRange,
        limit: Option<i64>,
        batch: usize,
    ) -> Result<BatchStream, JobError>;
}

/// A pipeline's name and its stages' names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PipelineNames {
    /// The pipeline's `_id`.
    pub id: ObjectId,
    /// Its name (empty when it has none).
    pub name: String,
    /// Its stages: `_id` and name.
    pub stages: Vec<(ObjectId, String)>,
}

/// Pipeline, stage and owner names of an organisation (export columns).
#[async_trait]
pub trait NameSource: Send + Sync + 'static {
    /// Pipelines of `org` whose `_id`, or one of whose stages' `_id`, is in `ids`.
    async fn pipelines(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<PipelineNames>, JobError>;

    /// Names of the users of `org` among `ids`.
    async fn owners(
        &self,
        org: ObjectId,
        ids: &[ObjectId],
    ) -> Result<Vec<(ObjectId, String)>, JobError>;
}

/// A batch of raw documents stored back to back in one buffer.
#[derive(Debug, Clone, Default)]
pub struct RawBatch {
    bytes: Vec<u8>,
    /// Where each document ends in `bytes`.
    ends: Vec<usize>,
}

// Here rather than in `id_ranges`, so the arrow goes one way (repo → id_ranges).
impl crate::id_ranges::Rows for RawBatch {
    fn rows(&self) -> usize {
        self.len()
    }
}

impl RawBatch {
    /// Empty, with room for `rows` documents of about `row_bytes` each.
    pub fn with_capacity(rows: usize, row_bytes: usize) -> RawBatch {
        RawBatch {
            bytes: Vec::with_capacity(rows * row_bytes),
            ends: Vec::with_capacity(rows),
        }
    }

    /// Appends a copy of `doc`.
    pub fn push(&mut self, doc: &RawDocument) {
        self.bytes.extend_from_slice(doc.as_bytes());
        self.ends.push(self.bytes.len());
    }

    /// Documents held.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes held.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Keeps the first `rows` documents.
    pub fn truncate(&mut self, rows: usize) {
        if rows < self.ends.len() {
            self.ends.truncate(rows);
            self.bytes.truncate(self.ends.last().copied().unwrap_or(0));
        }
    }

    /// The `i`-th document.
    pub fn get(&self, i: usize) -> Result<&RawDocument, JobError> {
        let end = *self
            .ends
            .get(i)
            .ok_or_else(|| JobError::Internal(format!("row {i} past the batch's end")))?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        RawDocument::from_bytes(&self.bytes[start..end]).map_err(bad_bson)
    }

    /// The documents in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<&RawDocument, JobError>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The `_id` of the last document, if it is an ObjectId.
    pub fn last_id(&self) -> Option<ObjectId> {
        let last = self.get(self.len().checked_sub(1)?).ok()?;
        last.get_object_id("_id").ok()
    }
}

/// A document that could not be read as BSON.
pub fn bad_bson(e: impl std::fmt::Display) -> JobError {
    JobError::Internal(format!("reading a document: {e}"))
}
