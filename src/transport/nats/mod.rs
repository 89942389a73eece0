//! The NATS transport: commands in ([`intake`]), job events out ([`events`]).

pub mod events;
pub mod intake;
