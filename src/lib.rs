//! coney: an embedded, in-process message broker engine with RabbitMQ's semantics.

pub mod core;
#[doc(hidden)]
pub mod fuzzing;
pub mod types;

pub use types::{FieldTable, FieldValue};
