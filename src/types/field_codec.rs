//! AMQP 0-9-1 wire codec of field tables (the `headers` property, method arguments), as an
//! AMQP 0-9-1 listener needs it.
//!
//! The encoding is RabbitMQ's (`rabbit_binary_generator.erl`, `rabbit_binary_parser.erl`),
//! big-endian throughout:
//!
//! - a table is a `u32` byte length, then entries: a short-string key (`u8` length, bytes), a
//!   one-byte type tag and the value;
//! - an array is a `u32` byte length, then tagged values;
//! - the tags are those listed on [`FieldValue`]: `t` bool (one byte; any non-zero byte reads
//!   as true, true is written as 1), `b` i8, `B` u8, `s` i16, `u` u16, `I` i32, `i` u32, `l`
//!   i64, `f` f32, `d` f64, `D` decimal (`u8` scale, `u32` value), `S` long string and `x`
//!   byte array (`u32` length, bytes), `A` array, `T` timestamp (`u64` seconds), `F` table, `V`
//!   void (no bytes).
//!
//! Decoding is for bytes from the network: every failure is a [`DecodeError`], never a panic.
//! Nesting is bounded at [`FIELD_DEPTH_MAX`] (a plain table is depth 1, as
//! `FieldTable::wire_size` counts), so the recursion is too; no length prefix is trusted
//! before the bytes it announces are there, so what is allocated is bounded by the input's
//! length.
//!
//! Duplicate keys in a table are refused ([`DecodeError::DuplicateKey`]): a [`FieldTable`] holds
//! one value per key, and RabbitMQ keeps both entries and looks keys up by the first, so taking
//! either one here could route or configure differently from RabbitMQ. No client library we know
//! of sends them (they build tables from maps).

use bytes::Bytes;

use super::field::{FIELD_DEPTH_MAX, FieldTable, FieldValue, TableError};

/// Why bytes do not decode to a field table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A length prefix or fixed-size value runs past the end of the input or of the table or
    /// array holding it (also: a length prefix over-long for what follows).
    #[error(
        "field table truncated at offset {offset}: {needed} bytes needed, {available} available"
    )]
    Truncated {
        /// Offset in the input where the missing bytes start.
        offset: usize,
        /// Bytes the value needed there.
        needed: u64,
        /// Bytes left in the input or the enclosing table or array.
        available: u64,
    },
    /// A type tag that is not one of RabbitMQ's.
    #[error("unknown field value type {tag:#04x} at offset {offset}")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
        /// Its offset in the input.
        offset: usize,
    },
    /// A key that is not UTF-8 (keys are kept as Rust strings).
    #[error("field table key at offset {offset} is not UTF-8")]
    KeyNotUtf8 {
        /// Offset of the key's bytes in the input.
        offset: usize,
    },
    /// A table holding the same key twice (see the module doc).
    #[error("field table holds key {key:?} twice")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// Tables and arrays nested deeper than [`FIELD_DEPTH_MAX`].
    #[error("field tables and arrays nest deeper than {FIELD_DEPTH_MAX} levels")]
    TooDeep,
}

/// Appends the wire encoding of `table` (its `u32` length first) to `out`. Refuses, appending
/// nothing, a table `FieldTable::wire_size` refuses (too deep, a key over 255 bytes) or one
/// whose encoding is too long for its `u32` length ([`TableError::TooLarge`]; every nested
/// length is shorter, so it fits too). The bytes appended are exactly `wire_size()` many.
pub fn encode_table(table: &FieldTable, out: &mut Vec<u8>) -> Result<(), TableError> {
    let size = table.wire_size()?;
    let body = size - 4;
    if u32::try_from(body).is_err() {
        return Err(TableError::TooLarge(body));
    }
    let start = out.len();
    write_table(table, out);
    debug_assert_eq!(
        u64::try_from(out.len() - start).ok(),
        Some(size),
        "encoded length differs from wire_size"
    );
    Ok(())
}

/// Decodes a table (its `u32` length first) from the start of `input`, returning it with the
/// number of bytes it took; bytes after it are left alone.
pub fn decode_table(input: &[u8]) -> Result<(FieldTable, usize), DecodeError> {
    let mut reader = Reader { input, at: 0 };
    let table = reader.table(1)?;
    Ok((table, reader.at))
}

// ---- encoding -----------------------------------------------------------------------------

/// Writes a table whose size was checked by [`encode_table`].
fn write_table(table: &FieldTable, out: &mut Vec<u8>) {
    let at = start_length(out);
    for (key, value) in table.iter() {
        let len = u8::try_from(key.len()).expect("wire_size checked keys are at most 255 bytes");
        out.push(len);
        out.extend_from_slice(key.as_bytes());
        write_value(value, out);
    }
    finish_length(out, at);
}

fn write_value(value: &FieldValue, out: &mut Vec<u8>) {
    out.push(tag(value));
    match value {
        FieldValue::Bool(b) => out.push(u8::from(*b)),
        FieldValue::I8(v) => out.extend_from_slice(&v.to_be_bytes()),
        FieldValue::U8(v) => out.push(*v),
        FieldValue::I16(v) => out.extend_from_slice(&v.to_be_bytes()),
        FieldValue::U16(v) => out.extend_from_slice(&v.to_be_bytes()),
        FieldValue::I32(v) => out.extend_from_slice(&v.to_be_bytes()),
        FieldValue::U32(v) => out.extend_from_slice(&v.to_be_bytes()),
        FieldValue::I64(v) => out.extend_from_slice(&v.to_be_bytes()),
        // Bit patterns, so a NaN keeps its payload.
        FieldValue::F32(v) => out.extend_from_slice(&v.to_bits().to_be_bytes()),
        FieldValue::F64(v) => out.extend_from_slice(&v.to_bits().to_be_bytes()),
        FieldValue::Decimal { scale, value } => {
            out.push(*scale);
            out.extend_from_slice(&value.to_be_bytes());
        }
        FieldValue::LongString(bytes) | FieldValue::ByteArray(bytes) => {
            let len = u32::try_from(bytes.len()).expect("encode_table checked the total size");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
        FieldValue::Array(values) => {
            let at = start_length(out);
            for value in values {
                write_value(value, out);
            }
            finish_length(out, at);
        }
        FieldValue::Timestamp(v) => out.extend_from_slice(&v.to_be_bytes()),
        FieldValue::Table(table) => write_table(table, out),
        FieldValue::Void => {}
    }
}

/// The type tag RabbitMQ writes for `value`.
fn tag(value: &FieldValue) -> u8 {
    match value {
        FieldValue::Bool(_) => b't',
        FieldValue::I8(_) => b'b',
        FieldValue::U8(_) => b'B',
        FieldValue::I16(_) => b's',
        FieldValue::U16(_) => b'u',
        FieldValue::I32(_) => b'I',
        FieldValue::U32(_) => b'i',
        FieldValue::I64(_) => b'l',
        FieldValue::F32(_) => b'f',
        FieldValue::F64(_) => b'd',
        FieldValue::Decimal { .. } => b'D',
        FieldValue::LongString(_) => b'S',
        FieldValue::ByteArray(_) => b'x',
        FieldValue::Array(_) => b'A',
        FieldValue::Timestamp(_) => b'T',
        FieldValue::Table(_) => b'F',
        FieldValue::Void => b'V',
    }
}

/// Reserves a `u32` length, returning where it goes.
fn start_length(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

/// Fills in the length reserved at `at` with the bytes written since.
fn finish_length(out: &mut [u8], at: usize) {
    let len = u32::try_from(out.len() - at - 4).expect("encode_table checked the total size");
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

// ---- decoding -----------------------------------------------------------------------------

/// Reads from `input`, at offset `at`; every read is checked against the end of `input`, which
/// the table and array readers narrow to their announced length.
struct Reader<'a> {
    input: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Reads a table at nesting depth `depth` (the outermost is 1).
    fn table(&mut self, depth: u32) -> Result<FieldTable, DecodeError> {
        if depth > FIELD_DEPTH_MAX {
            return Err(DecodeError::TooDeep);
        }
        let mut inner = self.sub_reader()?;
        let mut table = FieldTable::new();
        while inner.at < inner.input.len() {
            let key = inner.key()?;
            let value = inner.value(depth)?;
            if table.contains_key(&key) {
                return Err(DecodeError::DuplicateKey { key });
            }
            table.insert(key, value);
        }
        Ok(table)
    }

    /// Reads an array at nesting depth `depth`.
    fn array(&mut self, depth: u32) -> Result<Vec<FieldValue>, DecodeError> {
        if depth > FIELD_DEPTH_MAX {
            return Err(DecodeError::TooDeep);
        }
        let mut inner = self.sub_reader()?;
        // Grown one value at a time: each takes at least its tag byte, so the length is bounded
        // by the bytes read, never by a length prefix.
        let mut values = Vec::new();
        while inner.at < inner.input.len() {
            values.push(inner.value(depth)?);
        }
        Ok(values)
    }

    /// Reads a `u32` length and returns a reader over that many bytes, which this reader
    /// skips. The sub-reader keeps offsets relative to the whole input, for errors.
    fn sub_reader(&mut self) -> Result<Reader<'a>, DecodeError> {
        let len = self.u32()?;
        let start = self.at;
        let body = self.take(len.into())?;
        Ok(Reader {
            input: &self.input[..start + body.len()],
            at: start,
        })
    }

    fn key(&mut self) -> Result<String, DecodeError> {
        let len = self.u8()?;
        let offset = self.at;
        let bytes = self.take(len.into())?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::KeyNotUtf8 { offset })
    }

    /// Reads a tagged value held by a table or array at depth `depth`.
    fn value(&mut self, depth: u32) -> Result<FieldValue, DecodeError> {
        let offset = self.at;
        let tag = self.u8()?;
        Ok(match tag {
            b't' => FieldValue::Bool(self.u8()? != 0),
            b'b' => FieldValue::I8(i8::from_be_bytes(self.array_of()?)),
            b'B' => FieldValue::U8(self.u8()?),
            b's' => FieldValue::I16(i16::from_be_bytes(self.array_of()?)),
            b'u' => FieldValue::U16(u16::from_be_bytes(self.array_of()?)),
            b'I' => FieldValue::I32(i32::from_be_bytes(self.array_of()?)),
            b'i' => FieldValue::U32(self.u32()?),
            b'l' => FieldValue::I64(i64::from_be_bytes(self.array_of()?)),
            b'f' => FieldValue::F32(f32::from_bits(u32::from_be_bytes(self.array_of()?))),
            b'd' => FieldValue::F64(f64::from_bits(u64::from_be_bytes(self.array_of()?))),
            b'D' => FieldValue::Decimal {
                scale: self.u8()?,
                value: self.u32()?,
            },
            b'S' => FieldValue::LongString(self.long_bytes()?),
            b'x' => FieldValue::ByteArray(self.long_bytes()?),
            b'A' => FieldValue::Array(self.array(depth + 1)?),
            b'T' => FieldValue::Timestamp(u64::from_be_bytes(self.array_of()?)),
            b'F' => FieldValue::Table(self.table(depth + 1)?),
            b'V' => FieldValue::Void,
            tag => return Err(DecodeError::UnknownTag { tag, offset }),
        })
    }

    /// A `u32` length, then that many bytes, copied.
    fn long_bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()?;
        Ok(Bytes::copy_from_slice(self.take(len.into())?))
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array_of()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array_of()?))
    }

    /// The next `N` bytes.
    fn array_of<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N as u64)?;
        Ok(bytes.try_into().expect("take returns exactly N bytes"))
    }

    /// The next `len` bytes, if there are that many before the end.
    fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let available = self.input.len() - self.at;
        match usize::try_from(len) {
            Ok(n) if n <= available => {
                let bytes = &self.input[self.at..self.at + n];
                self.at += n;
                Ok(bytes)
            }
            _ => Err(DecodeError::Truncated {
                offset: self.at,
                needed: len,
                available: available as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(table: &FieldTable) -> Vec<u8> {
        let mut out = Vec::new();
        encode_table(table, &mut out).expect("test tables encode");
        out
    }

    /// A table of one entry `k` holding the value whose tag and payload are `tagged`.
    fn one_entry(tagged: &[u8]) -> Vec<u8> {
        let mut entry = vec![1, b'k'];
        entry.extend_from_slice(tagged);
        let mut bytes = u32::try_from(entry.len()).unwrap().to_be_bytes().to_vec();
        bytes.extend_from_slice(&entry);
        bytes
    }

    /// Each tag's bytes decode to the value, and the value encodes to the same bytes.
    #[test]
    fn each_tag_has_a_known_encoding() {
        let cases: Vec<(Vec<u8>, FieldValue)> = vec![
            (b"t\x01".to_vec(), FieldValue::Bool(true)),
            (b"t\x00".to_vec(), FieldValue::Bool(false)),
            (b"b\xfe".to_vec(), FieldValue::I8(-2)),
            (b"B\xfe".to_vec(), FieldValue::U8(254)),
            (b"s\xff\xfe".to_vec(), FieldValue::I16(-2)),
            (b"u\xff\xfe".to_vec(), FieldValue::U16(65534)),
            (b"I\xff\xff\xff\xfe".to_vec(), FieldValue::I32(-2)),
            (b"i\x01\x02\x03\x04".to_vec(), FieldValue::U32(0x0102_0304)),
            (
                b"l\xff\xff\xff\xff\xff\xff\xff\xfe".to_vec(),
                FieldValue::I64(-2),
            ),
            (b"f\x3f\xc0\x00\x00".to_vec(), FieldValue::F32(1.5)),
            (
                b"d\x40\x14\x00\x00\x00\x00\x00\x00".to_vec(),
                FieldValue::F64(5.0),
            ),
            (
                b"D\x02\x00\x00\x01\xf4".to_vec(),
                FieldValue::Decimal {
                    scale: 2,
                    value: 500,
                },
            ),
            (b"S\x00\x00\x00\x03abc".to_vec(), FieldValue::from("abc")),
            (
                b"x\x00\x00\x00\x02\x00\xff".to_vec(),
                FieldValue::ByteArray(Bytes::from_static(b"\x00\xff")),
            ),
            (
                b"A\x00\x00\x00\x07b\x01S\x00\x00\x00\x00".to_vec(),
                FieldValue::Array(vec![FieldValue::I8(1), FieldValue::from("")]),
            ),
            (b"A\x00\x00\x00\x00".to_vec(), FieldValue::Array(vec![])),
            (
                b"T\x00\x00\x00\x00\x65\x53\xf1\x00".to_vec(),
                FieldValue::Timestamp(1_700_000_000),
            ),
            (
                b"F\x00\x00\x00\x03\x01jV".to_vec(),
                FieldValue::Table(FieldTable::new().with("j", FieldValue::Void)),
            ),
            (b"V".to_vec(), FieldValue::Void),
        ];
        for (tagged, value) in cases {
            let bytes = one_entry(&tagged);
            let table = FieldTable::new().with("k", value.clone());
            assert_eq!(
                decode_table(&bytes),
                Ok((table.clone(), bytes.len())),
                "{value:?}"
            );
            assert_eq!(encode(&table), bytes, "{value:?}");
            assert_eq!(table.wire_size().unwrap(), bytes.len() as u64);
        }
    }

    #[test]
    fn any_non_zero_bool_byte_reads_as_true_and_writes_as_one() {
        let (table, _) = decode_table(&one_entry(b"t\x07")).unwrap();
        assert_eq!(table.get("k"), Some(&FieldValue::Bool(true)));
        assert_eq!(encode(&table), one_entry(b"t\x01"));
    }

    #[test]
    fn entries_are_written_in_key_order_and_bytes_after_the_table_are_left() {
        let table = FieldTable::new().with("b", 1u8).with("a", 2u8);
        let mut bytes = encode(&table);
        assert_eq!(bytes, b"\x00\x00\x00\x08\x01aB\x02\x01bB\x01");
        bytes.extend_from_slice(b"rest");
        assert_eq!(decode_table(&bytes), Ok((table, 12)));
    }

    #[test]
    fn nan_payloads_survive_a_round_trip() {
        let nan = f64::from_bits(0x7ff8_0000_dead_beef);
        let table = FieldTable::new().with("n", nan).with("f", f32::NAN);
        let (back, _) = decode_table(&encode(&table)).unwrap();
        match back.get("n") {
            Some(FieldValue::F64(v)) => assert_eq!(v.to_bits(), nan.to_bits()),
            other => panic!("{other:?}"),
        }
    }

    /// Tables nested `levels` deep (the outermost counts as 1), in wire form.
    fn nested(levels: u32) -> Vec<u8> {
        let mut bytes = b"\x00\x00\x00\x00".to_vec();
        for _ in 1..levels {
            let mut entry = b"\x01kF".to_vec();
            entry.extend_from_slice(&bytes);
            bytes = u32::try_from(entry.len()).unwrap().to_be_bytes().to_vec();
            bytes.extend_from_slice(&entry);
        }
        bytes
    }

    #[test]
    fn nesting_is_bounded_at_the_depth_limit() {
        let (deepest, _) = decode_table(&nested(FIELD_DEPTH_MAX)).unwrap();
        assert_eq!(encode(&deepest), nested(FIELD_DEPTH_MAX));
        assert_eq!(
            decode_table(&nested(FIELD_DEPTH_MAX + 1)),
            Err(DecodeError::TooDeep)
        );
        assert_eq!(decode_table(&nested(1000)), Err(DecodeError::TooDeep));
        // Arrays count as levels too.
        let mut too_deep = FieldValue::Array(vec![]);
        for _ in 1..FIELD_DEPTH_MAX {
            too_deep = FieldValue::Array(vec![too_deep]);
        }
        let table = FieldTable::new().with("a", too_deep);
        assert_eq!(
            encode_table(&table, &mut Vec::new()),
            Err(TableError::TooDeep)
        );
    }

    #[test]
    fn truncated_input_is_an_error_at_every_cut() {
        let table = FieldTable::new()
            .with("s", "text")
            .with("a", vec![FieldValue::I64(1), FieldValue::Void])
            .with("t", FieldTable::new().with("d", 2.5f64));
        let bytes = encode(&table);
        for cut in 0..bytes.len() {
            assert!(
                matches!(
                    decode_table(&bytes[..cut]),
                    Err(DecodeError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        assert_eq!(decode_table(&bytes), Ok((table, bytes.len())));
    }

    #[test]
    fn over_long_length_prefixes_are_refused_without_allocating() {
        assert_eq!(
            decode_table(b"\xff\xff\xff\xff\x01k"),
            Err(DecodeError::Truncated {
                offset: 4,
                needed: u64::from(u32::MAX),
                available: 2
            })
        );
        // A long string claiming more than its table holds, though the input has more.
        let mut bytes = one_entry(b"S\x00\x00\x00\x05ab");
        bytes.extend_from_slice(b"cdefgh");
        assert_eq!(
            decode_table(&bytes),
            Err(DecodeError::Truncated {
                offset: 11,
                needed: 5,
                available: 2
            })
        );
        // An array claiming 4 GiB.
        assert!(matches!(
            decode_table(&one_entry(b"A\xff\xff\xff\xff")),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn unknown_tags_bad_keys_and_duplicate_keys_are_refused() {
        assert_eq!(
            decode_table(&one_entry(b"Z")),
            Err(DecodeError::UnknownTag {
                tag: b'Z',
                offset: 6
            })
        );
        assert_eq!(
            decode_table(b"\x00\x00\x00\x03\x01\xffV"),
            Err(DecodeError::KeyNotUtf8 { offset: 5 })
        );
        assert_eq!(
            decode_table(b"\x00\x00\x00\x07\x01kV\x01kB\x01"),
            Err(DecodeError::DuplicateKey { key: "k".into() })
        );
        // The same key in different nested tables is fine.
        let ok = FieldTable::new()
            .with("k", FieldTable::new().with("k", 1u8))
            .with("j", FieldTable::new().with("k", 1u8));
        assert_eq!(
            decode_table(&encode(&ok)),
            Ok((ok.clone(), encode(&ok).len()))
        );
    }

    #[test]
    fn keys_over_255_bytes_are_refused_when_encoding() {
        let table = FieldTable::new().with("k".repeat(256), 1u8);
        let mut out = b"keep".to_vec();
        assert_eq!(
            encode_table(&table, &mut out),
            Err(TableError::KeyTooLong(256))
        );
        assert_eq!(out, b"keep", "nothing appended");
    }
}
