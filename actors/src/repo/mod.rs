//! The persistence layer: typed repositories between the job machinery and MongoDB.
//!
//! Callers (the supervisor, the job actors, the service's transports) name what
//! they want done (take a lease, checkpoint, finish, list an organisation's
//! jobs) and never write BSON or field paths themselves: each repository owns
//! its collection's invariants (leases on the database's clock, the epoch
//! fence, idempotent creation) in one place. Each trait has a MongoDB
//! implementation and an in-memory fake with the same semantics, so the job
//! logic is unit-tested without servers, on tokio's paused clock.

pub mod chunks;
pub mod crm;
pub mod crm_mem;
pub mod crm_mongo;
pub mod export;
pub mod export_mem;
pub mod export_mongo;
pub mod jobs;
pub mod jobs_mem;
pub mod jobs_mongo;
pub mod keep;
pub mod kept;
pub mod kept_back;
pub mod kept_restore;
mod kept_restore_mem;
mod kept_restore_mongo;
pub mod quota;
pub mod reads;
pub mod reads_mem;
pub mod webhooks;
pub mod webhooks_mem;
pub mod webhooks_mongo;

pub use chunks::{ChunkRepo, MemChunks};
pub use crm::{AuditRepo, ContactRepo, Crm, Decision, KeptRepo, NotificationRepo, Pass};
pub use crm_mem::MemCrm;
pub use crm_mongo::MongoCrm;
pub use export::{BatchStream, ExportSource, NameSource, PipelineNames, RawBatch};
pub use export_mem::MemExport;
pub use export_mongo::MongoExport;
pub use jobs::{Ending, JobPatch, JobRepo, Lease, Sweep};
pub use jobs_mem::MemJobs;
pub use jobs_mongo::MongoJobs;
pub use kept_restore::{KeptContact, KeptSummary, RestoreRepo};
pub use quota::{MemQuota, MongoQuota, QuotaRepo};
pub use reads::{ContactReads, DocStream, MongoReads};
pub use reads_mem::MemReads;
pub use webhooks::WebhookRepo;
pub use webhooks_mem::MemWebhooks;
pub use webhooks_mongo::MongoWebhooks;

#[cfg(test)]
mod tests;
