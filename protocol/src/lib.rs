//! contact-bulk-protocol: the external contract (`CONTRACT.md`) as Rust types,
//! shared by the service (NATS intake, HTTP, WebSocket hub, events), the job
//! core (filters, formats) and the clients (CLI, benchmarks), so a request is
//! parsed, and an event written, in exactly one place.
//!
//! - [`limits`]: the caps of contract section 10 and the bounded types
//!   ([`List`], [`Text`]) that carry them, so an over-size list or string
//!   cannot be deserialised at all.
//! - [`parse`]: decoding with errors naming the exact field path
//!   (`filter.stageIds[1]`) as a [`ValidationError`].
//! - [`filter`], [`commands`], [`replies`]: what callers send and get back.
//! - [`job`]: the job snapshot (kinds, statuses, counts, results) every reply,
//!   event and HTTP body carries.
//! - [`events`], [`subjects`], [`ws`]: what the service publishes and where.
//!
//! This crate depends on nothing of the service: it is the bottom layer.

pub mod commands;
pub mod error;
pub mod events;
pub mod filter;
pub mod job;
pub mod limits;
pub mod parse;
pub mod replies;
pub mod subjects;
pub mod types;
pub mod ws;

pub use error::ValidationError;
pub use limits::{List, Text, MAX_BODY, MAX_LIST, MAX_STRING};
pub use types::Id;
