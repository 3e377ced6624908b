//! AMQP 0-9-1 field tables and field values (the `headers` property, queue and binding arguments).
//!
//! The value kinds are the ones RabbitMQ encodes: `t` bool, `b` i8, `B` u8,
//! `s` i16, `u` u16, `I` i32, `i` u32, `l` i64, `f` f32, `d` f64, `D` decimal, `S` long string,
//! `x` byte array, `A` array, `T` timestamp, `F` table, `V` void.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// An AMQP field table: keys are short strings, values are [`FieldValue`]s.
///
/// Keys are kept sorted, so two tables with the same entries in a different order are equal, as
/// RabbitMQ treats them (binding identity, argument equivalence).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldTable(BTreeMap<String, FieldValue>);

impl FieldTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(
        &mut self,
        key: impl Into<String>,
        value: impl Into<FieldValue>,
    ) -> Option<FieldValue> {
        self.0.insert(key.into(), value.into())
    }

    /// Builder form of [`FieldTable::insert`].
    pub fn with(mut self, key: impl Into<String>, value: impl Into<FieldValue>) -> Self {
        self.insert(key, value);
        self
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0.get(key)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        self.0.remove(key)
    }

    /// Whether the table holds `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<FieldValue>> FromIterator<(K, V)> for FieldTable {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Deepest nesting of field tables and arrays the broker accepts (a plain table is depth 1), in
/// headers and in arguments. AMQP sets no such limit, but every copy, comparison and encoding of
/// a table walks it recursively, so an unbounded depth could overflow a thread's stack;
/// RabbitMQ's own headers (`x-death`) nest 3 deep. The store refuses deeper tables too.
pub const FIELD_DEPTH_MAX: u32 = 32;

/// Why a field table cannot be carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Nested deeper than [`FIELD_DEPTH_MAX`].
    TooDeep,
    /// A key over 255 bytes (keys are AMQP short strings).
    KeyTooLong(usize),
    /// Encoded, it would take this many bytes after its 4-byte length, more than that `u32`
    /// length can say.
    TooLarge(u64),
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableError::TooDeep => write!(f, "nests deeper than {FIELD_DEPTH_MAX} levels"),
            TableError::KeyTooLong(len) => {
                write!(f, "has a key of {len} bytes; at most 255 allowed")
            }
            TableError::TooLarge(size) => {
                write!(f, "encodes to {size} bytes; at most {} allowed", u32::MAX)
            }
        }
    }
}

impl FieldTable {
    /// The table's size in AMQP 0-9-1's wire encoding (its 4-byte length included), checking
    /// that it can be encoded and nests at most [`FIELD_DEPTH_MAX`] deep. The walk stops at
    /// the depth limit, so it is bounded whatever the table.
    pub(crate) fn wire_size(&self) -> Result<u64, TableError> {
        table_wire_size(self, 1)
    }

    /// Drops a table of any depth without recursion: nested tables and arrays are emptied
    /// into a work list first, so no drop goes deeper than one level. For tables refused for
    /// their depth, whose ordinary drop could overflow the stack.
    pub(crate) fn dismantle(self) {
        let mut work: Vec<FieldValue> = vec![FieldValue::Table(self)];
        while let Some(value) = work.pop() {
            match value {
                FieldValue::Table(mut table) => {
                    while let Some((_, value)) = table.0.pop_first() {
                        work.push(value);
                    }
                }
                FieldValue::Array(values) => work.extend(values),
                _ => {}
            }
        }
    }
}

fn table_wire_size(table: &FieldTable, depth: u32) -> Result<u64, TableError> {
    if depth > FIELD_DEPTH_MAX {
        return Err(TableError::TooDeep);
    }
    let mut size = 4;
    for (key, value) in &table.0 {
        if key.len() > 255 {
            return Err(TableError::KeyTooLong(key.len()));
        }
        size += 1 + key.len() as u64 + value_wire_size(value, depth)?;
    }
    Ok(size)
}

/// A value's size with its type tag; `depth` is that of the table or array holding it.
fn value_wire_size(value: &FieldValue, depth: u32) -> Result<u64, TableError> {
    let payload = match value {
        FieldValue::Bool(_) | FieldValue::I8(_) | FieldValue::U8(_) => 1,
        FieldValue::I16(_) | FieldValue::U16(_) => 2,
        FieldValue::I32(_) | FieldValue::U32(_) | FieldValue::F32(_) => 4,
        FieldValue::I64(_) | FieldValue::F64(_) | FieldValue::Timestamp(_) => 8,
        FieldValue::Decimal { .. } => 5,
        FieldValue::LongString(b) | FieldValue::ByteArray(b) => 4 + b.len() as u64,
        FieldValue::Array(values) => {
            if depth + 1 > FIELD_DEPTH_MAX {
                return Err(TableError::TooDeep);
            }
            let mut size = 4;
            for value in values {
                size += value_wire_size(value, depth + 1)?;
            }
            size
        }
        FieldValue::Table(table) => table_wire_size(table, depth + 1)?,
        FieldValue::Void => 0,
    };
    Ok(1 + payload)
}

/// One AMQP field value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FieldValue {
    /// `t`: boolean.
    Bool(bool),
    /// `b`: signed 8-bit.
    I8(i8),
    /// `B`: unsigned 8-bit.
    U8(u8),
    /// `s`: signed 16-bit.
    I16(i16),
    /// `u`: unsigned 16-bit.
    U16(u16),
    /// `I`: signed 32-bit ("signedint").
    I32(i32),
    /// `i`: unsigned 32-bit.
    U32(u32),
    /// `l`: signed 64-bit ("long").
    I64(i64),
    /// `f`: 32-bit float.
    F32(f32),
    /// `d`: 64-bit float.
    F64(f64),
    /// `D`: decimal, `value / 10^scale`.
    Decimal {
        /// Number of decimal digits after the point.
        scale: u8,
        /// The unscaled value.
        value: u32,
    },
    /// `S`: long string (bytes, usually UTF-8).
    LongString(Bytes),
    /// `x`: byte array.
    ByteArray(Bytes),
    /// `A`: array of values.
    Array(Vec<FieldValue>),
    /// `T`: timestamp, seconds since the Unix epoch.
    Timestamp(u64),
    /// `F`: nested table.
    Table(FieldTable),
    /// `V`: void (no value).
    Void,
}

impl FieldValue {
    /// The long string's text, if this is a UTF-8 long string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongString(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value as an `i64` if it is of an integer type (RabbitMQ's integer class: the signed and
    /// unsigned integer kinds; decimals only when their scale is 0).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            FieldValue::I8(v) => Some(v.into()),
            FieldValue::U8(v) => Some(v.into()),
            FieldValue::I16(v) => Some(v.into()),
            FieldValue::U16(v) => Some(v.into()),
            FieldValue::I32(v) => Some(v.into()),
            FieldValue::U32(v) => Some(v.into()),
            FieldValue::I64(v) => Some(v),
            FieldValue::Decimal { scale: 0, value } => Some(value.into()),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            FieldValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The AMQP type name RabbitMQ uses in error texts (`long`, `longstr`, `signedint`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldValue::Bool(_) => "bool",
            FieldValue::I8(_) => "byte",
            FieldValue::U8(_) => "unsignedbyte",
            FieldValue::I16(_) => "short",
            FieldValue::U16(_) => "unsignedshort",
            FieldValue::I32(_) => "signedint",
            FieldValue::U32(_) => "unsignedint",
            FieldValue::I64(_) => "long",
            FieldValue::F32(_) => "float",
            FieldValue::F64(_) => "double",
            FieldValue::Decimal { .. } => "decimal",
            FieldValue::LongString(_) => "longstr",
            FieldValue::ByteArray(_) => "binary",
            FieldValue::Array(_) => "array",
            FieldValue::Timestamp(_) => "timestamp",
            FieldValue::Table(_) => "table",
            FieldValue::Void => "void",
        }
    }

    /// Equality as RabbitMQ's argument equivalence check sees it: all integer
    /// kinds form one class, the two float kinds another, everything else compares by exact kind.
    pub fn equivalent(&self, other: &FieldValue) -> bool {
        if let (Some(a), Some(b)) = (self.integer_class(), other.integer_class()) {
            return a == b;
        }
        match (self, other) {
            (FieldValue::F32(a), FieldValue::F32(b)) => a == b,
            (FieldValue::F64(a), FieldValue::F64(b)) => a == b,
            (FieldValue::F32(a), FieldValue::F64(b)) | (FieldValue::F64(b), FieldValue::F32(a)) => {
                f64::from(*a) == *b
            }
            (a, b) => a == b,
        }
    }

    /// Integer-class value including decimals of any scale, as (value, scale).
    fn integer_class(&self) -> Option<(i64, u8)> {
        match *self {
            FieldValue::Decimal { scale, value } => Some((value.into(), scale)),
            _ => self.as_i64().map(|v| (v, 0)),
        }
    }

    /// Renders the value as RabbitMQ does in `inequivalent arg` texts.
    pub fn render(&self) -> String {
        match self {
            FieldValue::LongString(b) | FieldValue::ByteArray(b) => {
                String::from_utf8_lossy(b).into_owned()
            }
            FieldValue::Bool(b) => b.to_string(),
            FieldValue::F32(v) => v.to_string(),
            FieldValue::F64(v) => v.to_string(),
            FieldValue::Decimal { scale, value } => format!("{{decimal,{scale},{value}}}"),
            FieldValue::Timestamp(t) => t.to_string(),
            FieldValue::Array(_) | FieldValue::Table(_) => format!("{self:?}"),
            FieldValue::Void => "void".to_owned(),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

macro_rules! from_impls {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for FieldValue {
            fn from(v: $t) -> Self {
                FieldValue::$v(v)
            }
        }
    )*};
}
from_impls!(bool => Bool, i8 => I8, u8 => U8, i16 => I16, u16 => U16, i32 => I32, u32 => U32,
    i64 => I64, f32 => F32, f64 => F64, Vec<FieldValue> => Array, FieldTable => Table);

impl From<&str> for FieldValue {
    fn from(v: &str) -> Self {
        FieldValue::LongString(Bytes::copy_from_slice(v.as_bytes()))
    }
}

impl From<String> for FieldValue {
    fn from(v: String) -> Self {
        FieldValue::LongString(Bytes::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_kinds_are_one_class_for_equivalence() {
        assert!(FieldValue::I64(5).equivalent(&FieldValue::I32(5)));
        assert!(FieldValue::U8(5).equivalent(&FieldValue::I16(5)));
        assert!(!FieldValue::I64(5).equivalent(&FieldValue::I64(6)));
        assert!(!FieldValue::from("5").equivalent(&FieldValue::I64(5)));
    }

    #[test]
    fn tables_ignore_insertion_order() {
        let a = FieldTable::new().with("a", 1i32).with("b", "x");
        let b = FieldTable::new().with("b", "x").with("a", 1i32);
        assert_eq!(a, b);
    }
}
