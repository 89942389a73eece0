//! contact-bulk-testkit: everything that runs the service rather than being it,
//! kept out of the service's library.
//!
//! - [`servers`]: the real `nats-server` and MongoDB-wire `secantusd-rs` as
//!   child processes on ephemeral ports (the workspace's only `unsafe`:
//!   `PR_SET_PDEATHSIG` before `exec`).
//! - [`seed`]: the one way to seed organisations, contacts, pipelines and
//!   their children, used by the tests, `contact-bulk dev` and the benchmarks.
//!
//! - [`bench`]: the benchmarks behind `contact-bulk bench` (export, delete,
//!   restore, WebSocket latency) and their yardsticks (the server's own limit,
//!   the Node scripts), reading the service through `contact-bulk-client`.
//!
//! Used by `tests/` (through `tests/common`) and by the `contact-bulk` binary's
//! `dev` and `bench` subcommands; the service library does not depend on it.

pub mod bench;
pub mod seed;
pub mod servers;
