//! contact-bulk-actors: the job model, the filter, the supervisor and the job actors.
//!
//! The service crate (`contact-bulk`) creates job records through the job
//! repository ([`repo`]), hands them to the [`supervisor`], and reads their
//! state back through the repository; everything that reads or deletes
//! contacts lives here.

pub mod artifact;
pub mod delete;
pub mod encode;
pub mod error;
pub mod events;
pub mod export;
pub mod failpoint;
pub mod filter;
pub mod id_ranges;
pub mod job;
pub mod kinds;
pub mod lookup;
pub mod metrics;
pub mod model;
mod pending_chunk;
pub mod repo;
pub mod restore;
pub mod snapshot;
pub mod store;
pub mod supervisor;
#[cfg(test)]
mod testing;

pub use error::{Dependency, JobError, ValidationError};
