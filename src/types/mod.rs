//! Value types of the public API: field tables, message properties, option structs, deliveries.

pub mod field;

pub use field::{FieldTable, FieldValue};
