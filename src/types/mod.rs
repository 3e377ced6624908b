//! Value types of the public API: field tables, message properties, option structs, messages.

pub mod body;
pub mod exchange_kind;
pub mod field;
pub mod field_codec;
pub mod message;
pub mod options;
pub mod properties;

pub use body::IntoBody;
pub use bytes::Bytes;
pub use exchange_kind::ExchangeKind;
pub use field::{FieldTable, FieldValue};
pub use message::Message;
pub use options::*;
pub use properties::BasicProperties;
