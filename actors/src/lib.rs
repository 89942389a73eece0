//! contact-bulk-actors: the job model, the filter, the supervisor and the job actors.
//!
//! The service crate (`contact-bulk`) feeds commands in through [`supervisor`]
//! and reads job state through [`store`]; everything that touches contacts lives here.

pub mod encode;
pub mod error;
pub mod filter;

pub use error::{JobError, ValidationError};
