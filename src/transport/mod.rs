//! The transports: how requests reach the use cases ([`crate::app`]) and how
//! job events leave the service. Each decodes bytes into the protocol's types
//! and calls the use cases; none is called by them.
//!
//! - [`nats`]: the command intake (request/reply and the durable submit
//!   stream) and the job events published to `BULK_EVENTS`.
//! - [`http`]: the HTTP API, the download stream and the web page.
//! - [`ws`]: the WebSocket bridge (`GET /ws`), mounted on the HTTP router.

pub mod http;
pub mod nats;
pub mod ws;
