//! Record encoding: the key layout of the single sled tree and the versioned, checked value format.
//!
//! # Keys
//! All records live in one tree, so one `sled::Batch` covers any mix of them atomically. The
//! first byte says the kind; integers are big-endian so byte order is numeric order:
//!
//! | record | key |
//! |---|---|
//! | exchange | `b'E'` ++ name bytes |
//! | queue | `b'Q'` ++ id (u64 BE) |
//! | binding | `b'B'` ++ bincode(record) (deterministic: field tables are sorted maps) |
//! | message | `b'M'` ++ queue id (u64 BE) ++ seq (u64 BE) |
//! | policy | `b'P'` ++ name bytes |
//! | commit counter (sled only, not a record) | `b'C'` |
//!
//! A queue's messages are therefore one contiguous key range, iterated in FIFO order. The
//! commit counter is [`SledStore`](super::SledStore)'s own bookkeeping (see "Lost writes"
//! there): one key, rewritten by every flush, skipped by recovery.
//!
//! # Values
//! One format-version byte ([`FORMAT_VERSION`]), a checksum (from version 2), then a bincode 2
//! payload (`bincode::config::standard()`, serde API):
//! - exchange, queue, binding, policy: bincode(record);
//! - message: bincode(head) ++ raw body. The head holds every field but the body, plus the
//!   body's length; it is written and read by hand (module `head` documents the layout) because
//!   recovery decodes millions of them. The body stays out of bincode so recovery takes it as
//!   one slice.
//!
//! Version 2 (written now): `2` ++ CRC-32 (IEEE, 4 bytes little-endian) ++ payload. The CRC
//! covers the key, the version byte and the payload, so a value moved to another key fails as
//! surely as a flipped bit. It sits in front of the payload so a message body stays the value's
//! tail. Version 1 (no checksum): `1` ++ payload; still decoded, never written.
//!
//! The commit counter's value has the same frame: `2` ++ CRC-32 ++ the counter (u64
//! little-endian).
//!
//! # Checks
//! Encoding rejects, as [`StoreError::Invalid`], names and routing keys over
//! [`NAME_BYTES_MAX`], field tables nested deeper than [`FIELD_DEPTH_MAX`], and encoded
//! non-body parts over [`RECORD_HEAD_BYTES_MAX`]. Decoding applies the same checks, plus: known
//! version, checksum (version 2), bincode decodes (with a byte limit and a nesting limit, so a corrupt length or a
//! corrupt nesting cannot exhaust memory or the stack), no trailing bytes, and key and value
//! agree (an exchange's key is its name, a queue's its id, a binding's its encoding). Any
//! failure is [`StoreError::Corrupt`] naming the key.
//!
//! A future format bumps [`FORMAT_VERSION`] and keeps a decoder for every older version; the
//! fixtures under `tests/fixtures/store/v1/` and `v2/` must keep decoding.
//!
//! The checksum costs the hot path one CRC pass over each value the flusher encodes (with the
//! hand-written head, `benches/store.rs` group `codec` measures it) and recovery one pass per
//! value it decodes.

use std::marker::PhantomData;
use std::ops::Range;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    Batch, BindingRecord, DestinationRecord, ExchangeRecord, MessageRecord, Op, PolicyRecord,
    QueueRecord, RecoverySink, StoreError,
};
use crate::types::{FieldTable, FieldValue};

/// The format version written in front of every value.
pub const FORMAT_VERSION: u8 = 2;
/// The first format version, without a checksum; still decoded.
const VERSION_1: u8 = 1;
/// Bytes of the checksum that follows the version byte (version 2).
const CHECKSUM_BYTES: usize = 4;
/// Where a version 2 payload starts: after the version byte and the checksum.
const PAYLOAD_START: usize = 1 + CHECKSUM_BYTES;
/// Longest exchange name, queue name, exchange kind or routing key, in bytes (AMQP shortstr).
pub const NAME_BYTES_MAX: u64 = 255;
/// Deepest nesting of field tables and arrays: the broker's own limit, which every publish and
/// declare already passed, so a record within it always encodes.
pub use crate::types::field::FIELD_DEPTH_MAX;
/// Largest encoded record apart from a message body, in bytes (headers and arguments).
pub const RECORD_HEAD_BYTES_MAX: u64 = 1 << 20;

/// Key prefix of exchange records.
pub const EXCHANGE_PREFIX: u8 = b'E';
/// Key prefix of queue records.
pub const QUEUE_PREFIX: u8 = b'Q';
/// Key prefix of binding records.
pub const BINDING_PREFIX: u8 = b'B';
/// Key prefix of message records.
pub const MESSAGE_PREFIX: u8 = b'M';
/// Key prefix of policy records (from format version 2; a store without any still opens).
pub const POLICY_PREFIX: u8 = b'P';
/// The key of the commit counter ([`SledStore`](super::SledStore) only; not a record).
pub const COMMIT_KEY: [u8; 1] = [b'C'];

/// Upper bound of what bincode may allocate while decoding one record, so a corrupt length
/// prefix fails instead of allocating. Generous: bincode counts in-memory element sizes, and a
/// head of [`RECORD_HEAD_BYTES_MAX`] encoded bytes stays far below it.
const DECODE_LIMIT_BYTES: usize = 64 << 20;
/// Nesting limit of the serde decoder: every field-table level costs at most 3 serde levels
/// (enum, newtype, map), plus a few for the record structs around them.
const SERDE_DEPTH_MAX: u32 = 3 * FIELD_DEPTH_MAX + 16;

/// Any stored record with its key's contents.
// Handled one at a time (fixtures, fuzzing, error paths), never in bulk: boxing the message
// would cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A durable exchange.
    Exchange(ExchangeRecord),
    /// A durable queue.
    Queue(QueueRecord),
    /// A binding.
    Binding(BindingRecord),
    /// A policy.
    Policy(PolicyRecord),
    /// A message of queue `queue` at sequence number `seq`.
    Message {
        /// The queue's id.
        queue: u64,
        /// The message's sequence number.
        seq: u64,
        /// The message.
        record: MessageRecord,
    },
}

/// The key of an exchange record.
pub fn exchange_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(EXCHANGE_PREFIX);
    key.extend_from_slice(name.as_bytes());
    key
}

/// The key of a policy record.
pub fn policy_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(POLICY_PREFIX);
    key.extend_from_slice(name.as_bytes());
    key
}

/// The key of a queue record.
pub fn queue_key(id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = QUEUE_PREFIX;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// The common prefix of every message key of queue `queue`.
pub fn queue_messages_prefix(queue: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = MESSAGE_PREFIX;
    key[1..].copy_from_slice(&queue.to_be_bytes());
    key
}

/// The key of message `seq` of queue `queue`.
pub fn message_key(queue: u64, seq: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = MESSAGE_PREFIX;
    key[1..9].copy_from_slice(&queue.to_be_bytes());
    key[9..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The key of a binding record (its whole encoding). Fails as [`StoreError::Invalid`] if the
/// record does not pass the encode checks.
pub fn binding_key(binding: &BindingRecord) -> Result<Vec<u8>, StoreError> {
    check_binding(binding).map_err(StoreError::Invalid)?;
    let mut key = vec![BINDING_PREFIX];
    encode_payload(binding, &mut key)?;
    check_head_len(key.len() - 1).map_err(StoreError::Invalid)?;
    Ok(key)
}

/// Encodes any record as its `(key, value)`.
pub fn encode_record(record: &Record) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    match record {
        Record::Exchange(exchange) => encode_exchange(exchange),
        Record::Queue(queue) => encode_queue(queue),
        Record::Binding(binding) => encode_binding(binding),
        Record::Policy(policy) => encode_policy(policy),
        Record::Message { queue, seq, record } => encode_message(*queue, *seq, record),
    }
}

/// Decodes any record from its key and value, checking both; a message body is copied out of
/// `value`.
pub fn decode_record(key: &[u8], value: &[u8]) -> Result<Record, StoreError> {
    match key.first() {
        Some(&EXCHANGE_PREFIX) => decode_exchange(key, value).map(Record::Exchange),
        Some(&QUEUE_PREFIX) => decode_queue(key, value).map(Record::Queue),
        Some(&BINDING_PREFIX) => decode_binding(key, value).map(Record::Binding),
        Some(&POLICY_PREFIX) => decode_policy(key, value).map(Record::Policy),
        Some(&MESSAGE_PREFIX) => {
            let (queue, seq, record) =
                decode_message_with(key, value, |range| Bytes::copy_from_slice(&value[range]))?;
            Ok(Record::Message { queue, seq, record })
        }
        _ => Err(unknown_kind(key)),
    }
}

/// Encodes an exchange record as its `(key, value)`.
pub fn encode_exchange(exchange: &ExchangeRecord) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    check_exchange(exchange).map_err(StoreError::Invalid)?;
    let key = exchange_key(&exchange.name);
    let value = encode_value(&key, exchange)?;
    Ok((key, value))
}

/// Encodes a queue record as its `(key, value)`.
pub fn encode_queue(queue: &QueueRecord) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    check_queue(queue).map_err(StoreError::Invalid)?;
    let key = queue_key(queue.id).to_vec();
    let value = encode_value(&key, queue)?;
    Ok((key, value))
}

/// Encodes a binding record as its `(key, value)`.
pub fn encode_binding(binding: &BindingRecord) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    let key = binding_key(binding)?;
    let value = encode_value(&key, binding)?;
    Ok((key, value))
}

/// Encodes a policy record as its `(key, value)`.
pub fn encode_policy(policy: &PolicyRecord) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    check_policy(policy).map_err(StoreError::Invalid)?;
    let key = policy_key(&policy.name);
    let value = encode_value(&key, policy)?;
    Ok((key, value))
}

/// Encodes message `seq` of queue `queue` as its `(key, value)`; the value is version,
/// checksum, head, raw body.
pub fn encode_message(
    queue: u64,
    seq: u64,
    message: &MessageRecord,
) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    check_message(message).map_err(StoreError::Invalid)?;
    let key = message_key(queue, seq);
    let mut value = Vec::with_capacity(PAYLOAD_START + 32 + message.body.len());
    value.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0, 0]);
    head::encode(message, &mut value)?;
    check_head_len(value.len() - PAYLOAD_START).map_err(StoreError::Invalid)?;
    value.extend_from_slice(&message.body);
    seal(&key, &mut value);
    Ok((key.to_vec(), value))
}

/// Encodes the commit counter's value (see [`COMMIT_KEY`]).
pub(crate) fn encode_commit(counter: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(PAYLOAD_START + 8);
    value.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0, 0]);
    value.extend_from_slice(&counter.to_le_bytes());
    seal(&COMMIT_KEY, &mut value);
    value
}

/// Decodes the commit counter's value, checking its version and checksum.
pub(crate) fn decode_commit(value: &[u8]) -> Result<u64, StoreError> {
    let key = &COMMIT_KEY[..];
    if value.first() != Some(&FORMAT_VERSION) {
        return Err(corrupt(
            key,
            format!("commit counter is not in format {FORMAT_VERSION}"),
        ));
    }
    let (payload, _) = payload(key, value)?;
    let counter: [u8; 8] = payload.try_into().map_err(|_| {
        corrupt(
            key,
            format!("commit counter is {} bytes, not 8", payload.len()),
        )
    })?;
    Ok(u64::from_le_bytes(counter))
}

/// Decodes an exchange record, checking that the key is its name.
pub fn decode_exchange(key: &[u8], value: &[u8]) -> Result<ExchangeRecord, StoreError> {
    let exchange: ExchangeRecord = decode_value(key, value)?;
    check_exchange(&exchange).map_err(|reason| corrupt(key, reason))?;
    if key[1..] != *exchange.name.as_bytes() {
        return Err(corrupt(
            key,
            "key does not match the exchange name".to_string(),
        ));
    }
    Ok(exchange)
}

/// Decodes a queue record, checking that the key is its id.
pub fn decode_queue(key: &[u8], value: &[u8]) -> Result<QueueRecord, StoreError> {
    let queue: QueueRecord = decode_value(key, value)?;
    check_queue(&queue).map_err(|reason| corrupt(key, reason))?;
    if key != queue_key(queue.id) {
        return Err(corrupt(key, "key does not match the queue id".to_string()));
    }
    Ok(queue)
}

/// Decodes a binding record, checking that the key is its encoding.
pub fn decode_binding(key: &[u8], value: &[u8]) -> Result<BindingRecord, StoreError> {
    let binding: BindingRecord = decode_value(key, value)?;
    check_binding(&binding).map_err(|reason| corrupt(key, reason))?;
    let mut expected = vec![BINDING_PREFIX];
    encode_payload(&binding, &mut expected).map_err(|e| corrupt(key, e.to_string()))?;
    if key != expected {
        return Err(corrupt(key, "key does not match the binding".to_string()));
    }
    Ok(binding)
}

/// Decodes a policy record, checking that the key is its name.
pub fn decode_policy(key: &[u8], value: &[u8]) -> Result<PolicyRecord, StoreError> {
    let policy: PolicyRecord = decode_value(key, value)?;
    check_policy(&policy).map_err(|reason| corrupt(key, reason))?;
    if key[1..] != *policy.name.as_bytes() {
        return Err(corrupt(
            key,
            "key does not match the policy name".to_string(),
        ));
    }
    Ok(policy)
}

/// Decodes a message record and its `(queue, seq)` from the key; `body` turns the body's byte
/// range within `value` into [`Bytes`] (a copy, or a slice of a shared buffer that holds
/// `value`).
#[inline]
pub fn decode_message_with(
    key: &[u8],
    value: &[u8],
    body: impl FnOnce(Range<usize>) -> Bytes,
) -> Result<(u64, u64, MessageRecord), StoreError> {
    let (queue, seq) = parse_message_key(key)?;
    let (payload, start) = payload(key, value)?;
    let (mut record, body_len, head_len) =
        head::decode(payload).map_err(|reason| corrupt(key, reason))?;
    check_head_len(head_len).map_err(|reason| corrupt(key, reason))?;
    let actual_len = len_u64(payload.len() - head_len);
    if actual_len != body_len {
        return Err(corrupt(
            key,
            format!("body is {actual_len} bytes, its head says {body_len}"),
        ));
    }
    // The payload starts at `start`, the body after the head.
    record.body = body(start + head_len..value.len());
    check_message(&record).map_err(|reason| corrupt(key, reason))?;
    Ok((queue, seq, record))
}

/// Formats bytes as lowercase hex (the key in [`StoreError::Corrupt`]'s text).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        write!(out, "{byte:02x}").expect("writing to a String cannot fail");
    }
    out
}

/// One change to the key space, the encoded form of an [`Op`].
#[derive(Debug)]
pub(crate) enum Write {
    /// Sets `key` to `value`.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Removes `key`.
    Remove { key: Vec<u8> },
    /// Removes the queue record `id` and every message key of queue `id`.
    RemoveQueue { id: u64 },
}

/// Encodes every op of a batch, in order. Fails (as [`StoreError::Invalid`]) before anything is
/// written if any record does not pass the checks, which is what keeps `apply` all or nothing.
pub(crate) fn encode_batch(batch: &Batch) -> Result<Vec<Write>, StoreError> {
    batch.ops().iter().map(encode_op).collect()
}

fn encode_op(op: &Op) -> Result<Write, StoreError> {
    Ok(match op {
        Op::PutExchange(exchange) => {
            let (key, value) = encode_exchange(exchange)?;
            Write::Put { key, value }
        }
        Op::DeleteExchange(name) => {
            check_name("exchange name", name).map_err(StoreError::Invalid)?;
            Write::Remove {
                key: exchange_key(name),
            }
        }
        Op::PutQueue(queue) => {
            let (key, value) = encode_queue(queue)?;
            Write::Put { key, value }
        }
        Op::DeleteQueue(id) => Write::RemoveQueue { id: *id },
        Op::PutBinding(binding) => {
            let (key, value) = encode_binding(binding)?;
            Write::Put { key, value }
        }
        Op::DeleteBinding(binding) => Write::Remove {
            key: binding_key(binding)?,
        },
        Op::PutPolicy(policy) => {
            let (key, value) = encode_policy(policy)?;
            Write::Put { key, value }
        }
        Op::DeletePolicy(name) => {
            check_name("policy name", name).map_err(StoreError::Invalid)?;
            Write::Remove {
                key: policy_key(name),
            }
        }
        Op::PutMessage { queue, seq, record } => {
            let (key, value) = encode_message(*queue, *seq, record)?;
            Write::Put { key, value }
        }
        Op::DeleteMessage { queue, seq } => Write::Remove {
            key: message_key(*queue, *seq).to_vec(),
        },
    })
}

/// Decodes one stored record and hands it to `sink`. `body` makes a message body from its
/// range in `value`.
pub(crate) fn feed(
    sink: &mut dyn RecoverySink,
    key: &[u8],
    value: &[u8],
    body: impl FnOnce(Range<usize>) -> Bytes,
) -> Result<(), StoreError> {
    match key.first() {
        Some(&MESSAGE_PREFIX) => {
            let (queue, seq, record) = decode_message_with(key, value, body)?;
            sink.message(queue, seq, record)
        }
        Some(&EXCHANGE_PREFIX) => sink.exchange(decode_exchange(key, value)?),
        Some(&QUEUE_PREFIX) => sink.queue(decode_queue(key, value)?),
        Some(&BINDING_PREFIX) => sink.binding(decode_binding(key, value)?),
        Some(&POLICY_PREFIX) => sink.policy(decode_policy(key, value)?),
        _ => Err(unknown_kind(key)),
    }
}

/// Encodes a non-message value for `key`: version, checksum, bincode payload.
fn encode_value<T: Serialize>(key: &[u8], record: &T) -> Result<Vec<u8>, StoreError> {
    let mut value = vec![FORMAT_VERSION, 0, 0, 0, 0];
    encode_payload(record, &mut value)?;
    check_head_len(value.len() - PAYLOAD_START).map_err(StoreError::Invalid)?;
    seal(key, &mut value);
    Ok(value)
}

/// Fills in the checksum of a version 2 `value` (written with zeros there) for `key`.
fn seal(key: &[u8], value: &mut [u8]) {
    let crc = checksum(key, value);
    value[1..PAYLOAD_START].copy_from_slice(&crc.to_le_bytes());
}

/// The CRC-32 of `key`, the version byte and the payload of a version 2 `value` (at least
/// [`PAYLOAD_START`] bytes long).
fn checksum(key: &[u8], value: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(key);
    crc.update(&value[..1]);
    crc.update(&value[PAYLOAD_START..]);
    crc.finalize()
}

fn encode_payload<T: Serialize>(record: &T, out: &mut Vec<u8>) -> Result<(), StoreError> {
    bincode::serde::encode_into_std_write(record, out, bincode::config::standard())
        .map(|_| ())
        .map_err(|e| StoreError::Invalid(format!("cannot encode: {e}")))
}

/// Checks the version and decodes a whole non-message value (no trailing bytes).
fn decode_value<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    let (payload, _) = payload(key, value)?;
    let (record, read) = decode_payload::<T>(payload).map_err(|reason| corrupt(key, reason))?;
    if read != payload.len() {
        return Err(corrupt(
            key,
            format!("{} trailing bytes", payload.len() - read),
        ));
    }
    Ok(record)
}

/// The payload of a value and where it starts, after checking the version byte and (version
/// 2) the checksum.
#[inline]
fn payload<'v>(key: &[u8], value: &'v [u8]) -> Result<(&'v [u8], usize), StoreError> {
    match value.first() {
        Some(&FORMAT_VERSION) => {
            let Some(stored) = value.get(1..PAYLOAD_START) else {
                return Err(corrupt(key, "value ends inside its checksum".to_string()));
            };
            let stored = u32::from_le_bytes(stored.try_into().expect("a 4-byte range"));
            let computed = checksum(key, value);
            if stored != computed {
                return Err(corrupt(
                    key,
                    format!("checksum mismatch: stored {stored:08x}, computed {computed:08x}"),
                ));
            }
            Ok((&value[PAYLOAD_START..], PAYLOAD_START))
        }
        Some(&VERSION_1) => Ok((&value[1..], 1)),
        Some(version) => Err(corrupt(
            key,
            format!(
                "unknown format version {version} (this build reads {VERSION_1} to \
                 {FORMAT_VERSION})"
            ),
        )),
        None => Err(corrupt(key, "empty value".to_string())),
    }
}

/// Decodes a bincode payload under the byte and nesting limits; returns the bytes read.
fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<(T, usize), String> {
    let config = bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>();
    bincode::serde::seed_decode_from_slice(
        depth::Seed::<PhantomData<T>>::top(SERDE_DEPTH_MAX),
        payload,
        config,
    )
    .map_err(|e| format!("undecodable: {e}"))
}

fn parse_message_key(key: &[u8]) -> Result<(u64, u64), StoreError> {
    let Ok(key17) = <&[u8; 17]>::try_from(key) else {
        return Err(corrupt(
            key,
            format!("message key is {} bytes, not 17", key.len()),
        ));
    };
    let queue = u64::from_be_bytes(key17[1..9].try_into().expect("8 bytes of a 17-byte key"));
    let seq = u64::from_be_bytes(key17[9..].try_into().expect("8 bytes of a 17-byte key"));
    Ok((queue, seq))
}

/// The error for a key whose first byte is none of the four prefixes.
fn unknown_kind(key: &[u8]) -> StoreError {
    match key.first() {
        Some(prefix) => corrupt(key, format!("unknown key prefix 0x{prefix:02x}")),
        None => corrupt(key, "empty key".to_string()),
    }
}

fn corrupt(key: &[u8], reason: String) -> StoreError {
    StoreError::Corrupt {
        key: key.to_vec(),
        reason,
    }
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).expect("usize is at most 64 bits on every supported target")
}

fn check_head_len(len: usize) -> Result<(), String> {
    let len = len_u64(len);
    if len > RECORD_HEAD_BYTES_MAX {
        return Err(format!(
            "record is {len} bytes without its body, over the {RECORD_HEAD_BYTES_MAX}-byte limit"
        ));
    }
    Ok(())
}

fn check_exchange(exchange: &ExchangeRecord) -> Result<(), String> {
    check_name("exchange name", &exchange.name)?;
    check_name("exchange kind", &exchange.kind)?;
    check_table("exchange arguments", &exchange.arguments)
}

fn check_queue(queue: &QueueRecord) -> Result<(), String> {
    check_name("queue name", &queue.name)?;
    check_table("queue arguments", &queue.arguments)
}

fn check_binding(binding: &BindingRecord) -> Result<(), String> {
    check_name("binding source", &binding.source)?;
    match &binding.destination {
        DestinationRecord::Queue(name) => check_name("binding destination queue", name)?,
        DestinationRecord::Exchange(name) => check_name("binding destination exchange", name)?,
    }
    check_name("binding key", &binding.routing_key)?;
    check_table("binding arguments", &binding.arguments)
}

fn check_policy(policy: &PolicyRecord) -> Result<(), String> {
    check_name("policy name", &policy.name)?;
    check_table("policy definition", &policy.definition)
}

fn check_message(message: &MessageRecord) -> Result<(), String> {
    check_name("message exchange", &message.exchange)?;
    check_name("message routing key", &message.routing_key)?;
    match &message.properties.headers {
        Some(headers) => check_table("message headers", headers),
        None => Ok(()),
    }
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    let len = len_u64(name.len());
    if len > NAME_BYTES_MAX {
        return Err(format!(
            "{what} is {len} bytes, over the {NAME_BYTES_MAX}-byte limit"
        ));
    }
    Ok(())
}

fn check_table(what: &str, table: &FieldTable) -> Result<(), String> {
    if table_depth_exceeds(table, 1) {
        return Err(format!("{what} nest deeper than {FIELD_DEPTH_MAX} levels"));
    }
    Ok(())
}

/// Whether `table`, at nesting `depth`, or anything inside it is deeper than the limit. The
/// recursion stops at the limit, so it is bounded whatever the input.
fn table_depth_exceeds(table: &FieldTable, depth: u32) -> bool {
    depth > FIELD_DEPTH_MAX
        || table
            .iter()
            .any(|(_, value)| value_depth_exceeds(value, depth))
}

fn value_depth_exceeds(value: &FieldValue, depth: u32) -> bool {
    match value {
        FieldValue::Table(table) => table_depth_exceeds(table, depth + 1),
        FieldValue::Array(values) => {
            depth + 1 > FIELD_DEPTH_MAX
                || values
                    .iter()
                    .any(|value| value_depth_exceeds(value, depth + 1))
        }
        _ => false,
    }
}

/// The message head, written and read by hand in bincode 2's standard encoding (the format of
/// `bincode::serde` for a struct of these fields in this order, which a unit test checks),
/// because recovery decodes millions of them: a 64-byte message decodes in about 130 ns this
/// way against about 200 ns through serde.
///
/// v1 head, in order: `exchange`, `routing_key` (strings: varint length ++ UTF-8); the 14
/// properties (`content_type`, `content_encoding`, `headers`, `delivery_mode`, `priority`,
/// `correlation_id`, `reply_to`, `expiration`, `message_id`, `timestamp`, `kind`, `user_id`,
/// `app_id`, `cluster_id`; each an option: byte 0 or 1 then the value; `headers` a field table
/// through serde, `delivery_mode` and `priority` one raw byte, `timestamp` a varint);
/// `delivery_count` (varint), flags (one byte: bit 0 `delivered`, bit 1 `dead_lettered`, bit 2
/// "has BCC keys", bit 3 "pending dead letter"; records written before `dead_lettered` existed
/// hold 0 or 1 there), the BCC keys only when bit 2 is set (a varint count, at least 1, then
/// that many strings), the pending dead letter's reason only when bit 3 is set (a string),
/// `enqueued_at_ms` (varint), body length (varint). Varints: below 251 one byte; else 251, 252 or 253 then a little-endian u16, u32 or
/// u64.
mod head {
    use super::{
        DECODE_LIMIT_BYTES, FieldTable, MessageRecord, PhantomData, SERDE_DEPTH_MAX, StoreError,
        depth, len_u64,
    };
    use crate::types::BasicProperties;

    /// Most BCC keys a head may state: each takes at least one byte of a head that is at most
    /// [`super::RECORD_HEAD_BYTES_MAX`] long.
    const BCC_KEYS_MAX: u64 = super::RECORD_HEAD_BYTES_MAX;

    /// The dead-letter reasons a pending dead letter may name.
    const DEATH_REASONS: [&str; 4] = ["rejected", "expired", "maxlen", "delivery_limit"];

    /// Appends the head of `m` to `out`.
    pub(super) fn encode(m: &MessageRecord, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let p = &m.properties;
        string(out, &m.exchange);
        string(out, &m.routing_key);
        opt_string(out, &p.content_type);
        opt_string(out, &p.content_encoding);
        match &p.headers {
            None => out.push(0),
            Some(headers) => {
                out.push(1);
                bincode::serde::encode_into_std_write(headers, out, bincode::config::standard())
                    .map_err(|e| StoreError::Invalid(format!("cannot encode headers: {e}")))?;
            }
        }
        opt_byte(out, p.delivery_mode);
        opt_byte(out, p.priority);
        opt_string(out, &p.correlation_id);
        opt_string(out, &p.reply_to);
        opt_string(out, &p.expiration);
        opt_string(out, &p.message_id);
        match p.timestamp {
            None => out.push(0),
            Some(timestamp) => {
                out.push(1);
                varint(out, timestamp);
            }
        }
        opt_string(out, &p.kind);
        opt_string(out, &p.user_id);
        opt_string(out, &p.app_id);
        opt_string(out, &p.cluster_id);
        varint(out, u64::from(m.delivery_count));
        let has_bcc = !m.bcc.is_empty();
        out.push(
            u8::from(m.delivered)
                | u8::from(m.dead_lettered) << 1
                | u8::from(has_bcc) << 2
                | u8::from(m.pending_dead_letter.is_some()) << 3,
        );
        if has_bcc {
            varint(out, len_u64(m.bcc.len()));
            for key in &m.bcc {
                string(out, key);
            }
        }
        if let Some(reason) = &m.pending_dead_letter {
            string(out, reason);
        }
        varint(out, m.enqueued_at_ms);
        varint(out, len_u64(m.body.len()));
        Ok(())
    }

    /// Reads a head: the record (with an empty body), the body length it states, and the bytes
    /// the head took.
    #[inline]
    pub(super) fn decode(buf: &[u8]) -> Result<(MessageRecord, u64, usize), String> {
        let mut r = Reader { buf, pos: 0 };
        let exchange = r.string("exchange")?;
        let routing_key = r.string("routing key")?;
        let properties = BasicProperties {
            content_type: r.opt_string("content_type")?,
            content_encoding: r.opt_string("content_encoding")?,
            headers: r.opt_headers()?,
            delivery_mode: r.opt_byte("delivery_mode")?,
            priority: r.opt_byte("priority")?,
            correlation_id: r.opt_string("correlation_id")?,
            reply_to: r.opt_string("reply_to")?,
            expiration: r.opt_string("expiration")?,
            message_id: r.opt_string("message_id")?,
            timestamp: if r.tag("timestamp")? {
                Some(r.varint("timestamp")?)
            } else {
                None
            },
            kind: r.opt_string("type")?,
            user_id: r.opt_string("user_id")?,
            app_id: r.opt_string("app_id")?,
            cluster_id: r.opt_string("cluster_id")?,
        };
        let delivery_count = u32::try_from(r.varint("delivery count")?)
            .map_err(|_| "delivery count over u32".to_string())?;
        let flags = r.byte("flags")?;
        if flags > 15 {
            return Err(format!("flags: invalid value {flags}"));
        }
        let mut bcc = Vec::new();
        if flags & 4 != 0 {
            let count = r.varint("BCC key count")?;
            if count == 0 || count > BCC_KEYS_MAX {
                return Err(format!("BCC key count: invalid value {count}"));
            }
            for _ in 0..count {
                bcc.push(r.string("BCC key")?);
            }
        }
        let pending_dead_letter = if flags & 8 != 0 {
            let reason = r.string("pending dead-letter reason")?;
            if !DEATH_REASONS.contains(&reason.as_str()) {
                return Err(format!("pending dead-letter reason: unknown '{reason}'"));
            }
            Some(reason)
        } else {
            None
        };
        let enqueued_at_ms = r.varint("enqueued_at_ms")?;
        let body_len = r.varint("body length")?;
        let record = MessageRecord {
            exchange,
            routing_key,
            properties,
            body: bytes::Bytes::new(),
            delivery_count,
            delivered: flags & 1 != 0,
            enqueued_at_ms,
            dead_lettered: flags & 2 != 0,
            bcc,
            pending_dead_letter,
        };
        Ok((record, body_len, r.pos))
    }

    fn varint(out: &mut Vec<u8>, v: u64) {
        if let Ok(small) = u8::try_from(v)
            && small < 251
        {
            out.push(small);
        } else if let Ok(v16) = u16::try_from(v) {
            out.push(251);
            out.extend_from_slice(&v16.to_le_bytes());
        } else if let Ok(v32) = u32::try_from(v) {
            out.push(252);
            out.extend_from_slice(&v32.to_le_bytes());
        } else {
            out.push(253);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        varint(out, len_u64(s.len()));
        out.extend_from_slice(s.as_bytes());
    }

    fn opt_string(out: &mut Vec<u8>, s: &Option<String>) {
        match s {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                string(out, s);
            }
        }
    }

    fn opt_byte(out: &mut Vec<u8>, b: Option<u8>) {
        match b {
            None => out.push(0),
            Some(b) => out.extend_from_slice(&[1, b]),
        }
    }

    /// A cursor over a head; every read checks the bytes are there.
    struct Reader<'a> {
        buf: &'a [u8],
        pos: usize,
    }

    impl<'a> Reader<'a> {
        #[inline]
        fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
            let end = self
                .pos
                .checked_add(n)
                .filter(|end| *end <= self.buf.len())
                .ok_or_else(|| format!("{what}: record ends early"))?;
            let bytes = &self.buf[self.pos..end];
            self.pos = end;
            Ok(bytes)
        }

        #[inline]
        fn byte(&mut self, what: &str) -> Result<u8, String> {
            Ok(self.take(1, what)?[0])
        }

        /// A bool or an option tag: 0 or 1.
        #[inline]
        fn tag(&mut self, what: &str) -> Result<bool, String> {
            match self.byte(what)? {
                0 => Ok(false),
                1 => Ok(true),
                other => Err(format!("{what}: invalid tag {other}")),
            }
        }

        #[inline]
        fn varint(&mut self, what: &str) -> Result<u64, String> {
            Ok(match self.byte(what)? {
                small @ 0..=250 => u64::from(small),
                251 => u64::from(u16::from_le_bytes(self.array(what)?)),
                252 => u64::from(u32::from_le_bytes(self.array(what)?)),
                253 => u64::from_le_bytes(self.array(what)?),
                other => return Err(format!("{what}: invalid varint tag {other}")),
            })
        }

        #[inline]
        fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
            Ok(self
                .take(N, what)?
                .try_into()
                .expect("take returns exactly N bytes"))
        }

        #[inline]
        fn string(&mut self, what: &str) -> Result<String, String> {
            let len = usize::try_from(self.varint(what)?)
                .map_err(|_| format!("{what}: length over usize"))?;
            let bytes = self.take(len, what)?;
            std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|e| format!("{what}: {e}"))
        }

        #[inline]
        fn opt_string(&mut self, what: &str) -> Result<Option<String>, String> {
            if self.tag(what)? {
                self.string(what).map(Some)
            } else {
                Ok(None)
            }
        }

        #[inline]
        fn opt_byte(&mut self, what: &str) -> Result<Option<u8>, String> {
            if self.tag(what)? {
                self.byte(what).map(Some)
            } else {
                Ok(None)
            }
        }

        /// The headers go through serde, under the same byte and nesting limits as records.
        #[inline]
        fn opt_headers(&mut self) -> Result<Option<FieldTable>, String> {
            if !self.tag("headers")? {
                return Ok(None);
            }
            let config = bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>();
            let seed = depth::Seed::<PhantomData<FieldTable>>::top(SERDE_DEPTH_MAX);
            let (headers, read) =
                bincode::serde::seed_decode_from_slice(seed, &self.buf[self.pos..], config)
                    .map_err(|e| format!("headers: undecodable: {e}"))?;
            self.pos += read;
            Ok(Some(headers))
        }
    }
}

/// A serde adapter that bounds nesting while decoding, so a corrupt record cannot recurse the
/// decoder into a stack overflow (bincode has no such limit). Every nested seq, map, enum,
/// option or newtype costs one level; past the limit decoding fails with a custom error.
mod depth {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{
        self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess,
        Visitor,
    };

    /// Decodes a `T` (or runs a seed) with `left` levels of nesting allowed.
    pub(super) struct Seed<S> {
        seed: S,
        left: u32,
    }

    impl<T> Seed<PhantomData<T>> {
        /// The seed of a whole record.
        pub(super) fn top(left: u32) -> Self {
            Seed {
                seed: PhantomData,
                left,
            }
        }
    }

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
        type Value = S::Value;

        fn deserialize<D: Deserializer<'de>>(self, inner: D) -> Result<S::Value, D::Error> {
            self.seed.deserialize(Limited {
                inner,
                left: self.left,
            })
        }
    }

    struct Limited<D> {
        inner: D,
        left: u32,
    }

    macro_rules! forward_deserialize {
        ($($method:ident($($arg:ident: $ty:ty),*)),* $(,)?) => {$(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
                self.inner.$method($($arg,)* Limit { inner: visitor, left: self.left })
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<D> {
        type Error = D::Error;

        forward_deserialize!(
            deserialize_any(),
            deserialize_bool(),
            deserialize_i8(),
            deserialize_i16(),
            deserialize_i32(),
            deserialize_i64(),
            deserialize_i128(),
            deserialize_u8(),
            deserialize_u16(),
            deserialize_u32(),
            deserialize_u64(),
            deserialize_u128(),
            deserialize_f32(),
            deserialize_f64(),
            deserialize_char(),
            deserialize_str(),
            deserialize_string(),
            deserialize_bytes(),
            deserialize_byte_buf(),
            deserialize_option(),
            deserialize_unit(),
            deserialize_unit_struct(name: &'static str),
            deserialize_newtype_struct(name: &'static str),
            deserialize_seq(),
            deserialize_tuple(len: usize),
            deserialize_tuple_struct(name: &'static str, len: usize),
            deserialize_map(),
            deserialize_struct(name: &'static str, fields: &'static [&'static str]),
            deserialize_enum(name: &'static str, variants: &'static [&'static str]),
            deserialize_identifier(),
            deserialize_ignored_any(),
        );

        fn is_human_readable(&self) -> bool {
            self.inner.is_human_readable()
        }
    }

    /// A visitor that hands one level less to whatever it descends into.
    struct Limit<V> {
        inner: V,
        left: u32,
    }

    impl<V> Limit<V> {
        fn descend<E: de::Error>(&self) -> Result<u32, E> {
            self.left
                .checked_sub(1)
                .ok_or_else(|| E::custom("record nests too deep"))
        }
    }

    macro_rules! forward_visit {
        ($($method:ident($ty:ty)),* $(,)?) => {$(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.inner.$method(v)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Limit<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.inner.expecting(f)
        }

        forward_visit!(
            visit_bool(bool),
            visit_i8(i8),
            visit_i16(i16),
            visit_i32(i32),
            visit_i64(i64),
            visit_i128(i128),
            visit_u8(u8),
            visit_u16(u16),
            visit_u32(u32),
            visit_u64(u64),
            visit_u128(u128),
            visit_f32(f32),
            visit_f64(f64),
            visit_char(char),
            visit_str(&str),
            visit_borrowed_str(&'de str),
            visit_string(String),
            visit_bytes(&[u8]),
            visit_borrowed_bytes(&'de [u8]),
            visit_byte_buf(Vec<u8>),
        );

        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.inner.visit_none()
        }

        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.inner.visit_unit()
        }

        fn visit_some<D: Deserializer<'de>>(self, inner: D) -> Result<V::Value, D::Error> {
            let left = self.descend()?;
            self.inner.visit_some(Limited { inner, left })
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(
            self,
            inner: D,
        ) -> Result<V::Value, D::Error> {
            let left = self.descend()?;
            self.inner.visit_newtype_struct(Limited { inner, left })
        }

        fn visit_seq<A: SeqAccess<'de>>(self, inner: A) -> Result<V::Value, A::Error> {
            let left = self.descend()?;
            self.inner.visit_seq(Access { inner, left })
        }

        fn visit_map<A: MapAccess<'de>>(self, inner: A) -> Result<V::Value, A::Error> {
            let left = self.descend()?;
            self.inner.visit_map(Access { inner, left })
        }

        fn visit_enum<A: EnumAccess<'de>>(self, inner: A) -> Result<V::Value, A::Error> {
            let left = self.descend()?;
            self.inner.visit_enum(Access { inner, left })
        }
    }

    /// Seq, map, enum and variant access that limit what they hand out.
    struct Access<A> {
        inner: A,
        left: u32,
    }

    impl<A> Access<A> {
        fn seed<S>(&self, seed: S) -> Seed<S> {
            Seed {
                seed,
                left: self.left,
            }
        }
    }

    impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Access<A> {
        type Error = A::Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, A::Error> {
            let seed = self.seed(seed);
            self.inner.next_element_seed(seed)
        }

        fn size_hint(&self) -> Option<usize> {
            self.inner.size_hint()
        }
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Access<A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            let seed = self.seed(seed);
            self.inner.next_key_seed(seed)
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(
            &mut self,
            seed: V,
        ) -> Result<V::Value, A::Error> {
            let seed = self.seed(seed);
            self.inner.next_value_seed(seed)
        }

        fn size_hint(&self) -> Option<usize> {
            self.inner.size_hint()
        }
    }

    impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Access<A> {
        type Error = A::Error;
        type Variant = Access<A::Variant>;

        fn variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<(S::Value, Self::Variant), A::Error> {
            let left = self.left;
            let (value, inner) = self.inner.variant_seed(Seed { seed, left })?;
            Ok((value, Access { inner, left }))
        }
    }

    impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Access<A> {
        type Error = A::Error;

        fn unit_variant(self) -> Result<(), A::Error> {
            self.inner.unit_variant()
        }

        fn newtype_variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<S::Value, A::Error> {
            let seed = self.seed(seed);
            self.inner.newtype_variant_seed(seed)
        }

        fn tuple_variant<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.inner.tuple_variant(
                len,
                Limit {
                    inner: visitor,
                    left: self.left,
                },
            )
        }

        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.inner.struct_variant(
                fields,
                Limit {
                    inner: visitor,
                    left: self.left,
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::BasicProperties;

    fn deep_headers(depth: u32) -> FieldTable {
        let mut table = FieldTable::new().with("leaf", FieldValue::I32(1));
        for _ in 1..depth {
            table = FieldTable::new().with("t", FieldValue::Table(table));
        }
        table
    }

    fn message(headers: Option<FieldTable>) -> MessageRecord {
        MessageRecord {
            exchange: "ex".into(),
            routing_key: "rk".into(),
            properties: BasicProperties {
                headers,
                ..BasicProperties::default()
            },
            body: Bytes::from_static(b"hello"),
            delivery_count: 2,
            delivered: true,
            enqueued_at_ms: 7,
            dead_lettered: false,
            bcc: Vec::new(),
            pending_dead_letter: None,
        }
    }

    /// What the hand-written head must equal: bincode's serde encoding of this struct.
    #[derive(Serialize)]
    struct SerdeHead<'a> {
        exchange: &'a str,
        routing_key: &'a str,
        properties: &'a BasicProperties,
        delivery_count: u32,
        flags: u8,
        /// Present only when flag bit 2 says so: a length-prefixed sequence, as serde writes it.
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        bcc: &'a [String],
        /// Present only when flag bit 3 says so.
        #[serde(skip_serializing_if = "str::is_empty")]
        pending_dead_letter: &'a str,
        enqueued_at_ms: u64,
        body_len: u64,
    }

    fn boundary_messages() -> Vec<MessageRecord> {
        let headers = FieldTable::new()
            .with(
                "x-death",
                FieldValue::Array(vec![FieldValue::Table(
                    FieldTable::new().with("count", FieldValue::I64(1)),
                )]),
            )
            .with("f", FieldValue::F64(0.5));
        let mut out = Vec::new();
        for (n, v) in [
            0u64,
            250,
            251,
            65_535,
            65_536,
            u64::from(u32::MAX),
            1 << 32,
            u64::MAX,
        ]
        .into_iter()
        .enumerate()
        {
            let mut m = message(if n % 2 == 0 {
                Some(headers.clone())
            } else {
                None
            });
            m.delivery_count = u32::try_from(v).unwrap_or(u32::MAX);
            m.enqueued_at_ms = v;
            m.delivered = n % 3 == 0;
            m.dead_lettered = n % 4 == 1;
            if n % 4 == 2 {
                m.bcc = (0..n).map(|k| "b".repeat(k * 60)).collect();
            }
            if n % 3 == 1 {
                m.pending_dead_letter = Some("delivery_limit".into());
            }
            m.routing_key = "r".repeat(n * 36);
            m.body = Bytes::from(vec![7u8; n * 40]);
            if n % 2 == 1 {
                m.properties = BasicProperties::default()
                    .with_content_type("text/plain")
                    .with_content_encoding("utf-8")
                    .with_delivery_mode(2)
                    .with_priority(255)
                    .with_correlation_id("c")
                    .with_reply_to("r")
                    .with_expiration("1000")
                    .with_message_id("m")
                    .with_timestamp(v)
                    .with_kind("k")
                    .with_user_id("u")
                    .with_app_id("a")
                    .with_cluster_id("cl");
            }
            out.push(m);
        }
        out
    }

    #[test]
    fn hand_written_head_is_bincode_of_the_serde_struct() {
        for m in boundary_messages() {
            let head = SerdeHead {
                exchange: &m.exchange,
                routing_key: &m.routing_key,
                properties: &m.properties,
                delivery_count: m.delivery_count,
                flags: u8::from(m.delivered)
                    | u8::from(m.dead_lettered) << 1
                    | u8::from(!m.bcc.is_empty()) << 2
                    | u8::from(m.pending_dead_letter.is_some()) << 3,
                bcc: &m.bcc,
                pending_dead_letter: m.pending_dead_letter.as_deref().unwrap_or_default(),
                enqueued_at_ms: m.enqueued_at_ms,
                body_len: len_u64(m.body.len()),
            };
            let mut expected =
                bincode::serde::encode_to_vec(&head, bincode::config::standard()).unwrap();
            expected.extend_from_slice(&m.body);
            let (key, value) = encode_message(1, 2, &m).unwrap();
            assert_eq!(value[0], FORMAT_VERSION);
            assert_eq!(value[PAYLOAD_START..], expected);
            let (_, _, decoded) =
                decode_message_with(&key, &value, |r| Bytes::copy_from_slice(&value[r])).unwrap();
            assert_eq!(decoded, m);
        }
    }

    #[test]
    fn truncated_or_extended_message_values_are_corrupt() {
        let m = boundary_messages().swap_remove(1);
        let (key, value) = encode_message(1, 2, &m).unwrap();
        for cut in 0..value.len() {
            let err = decode_record(&key, &value[..cut]).unwrap_err();
            assert!(
                matches!(err, StoreError::Corrupt { .. }),
                "cut {cut}: {err}"
            );
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(matches!(
            decode_record(&key, &longer),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn message_round_trips_and_body_is_raw_tail() {
        let m = message(Some(FieldTable::new().with("a", FieldValue::Bool(true))));
        let (key, value) = encode_message(3, 4, &m).unwrap();
        assert_eq!(value[0], FORMAT_VERSION);
        assert!(value.ends_with(b"hello"));
        assert_eq!(
            decode_record(&key, &value).unwrap(),
            Record::Message {
                queue: 3,
                seq: 4,
                record: m
            }
        );
    }

    #[test]
    fn nesting_at_the_limit_passes_and_beyond_is_invalid() {
        let ok = message(Some(deep_headers(FIELD_DEPTH_MAX)));
        let (key, value) = encode_message(0, 0, &ok).unwrap();
        decode_record(&key, &value).unwrap();
        let deep = message(Some(deep_headers(FIELD_DEPTH_MAX + 1)));
        assert!(matches!(
            encode_message(0, 0, &deep),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn arrays_count_as_nesting() {
        let mut value = FieldValue::I8(0);
        for _ in 0..FIELD_DEPTH_MAX {
            value = FieldValue::Array(vec![value]);
        }
        // The table is level 1, then FIELD_DEPTH_MAX arrays: one too many.
        let m = message(Some(FieldTable::new().with("a", value)));
        assert!(matches!(
            encode_message(0, 0, &m),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn corrupt_deep_nesting_fails_without_overflowing_the_stack() {
        // Hand-build the bincode of 100k nested tables in an exchange's arguments: each level is
        // map len 1, key "" (len 0), variant Table (index 15).
        let mut payload = Vec::new();
        encode_payload(&"x", &mut payload).unwrap(); // name
        encode_payload(&"direct", &mut payload).unwrap(); // kind
        payload.extend([0, 0]); // auto_delete, internal
        for _ in 0..100_000 {
            payload.extend([1, 0, 15]);
        }
        let key = exchange_key("x");
        let value = sealed(&key, &payload);
        let err = decode_record(&key, &value).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { ref reason, .. } if reason.contains("deep")),
            "{err}"
        );
    }

    #[test]
    fn corrupt_huge_length_fails_without_allocating() {
        let queue = QueueRecord {
            id: 1,
            name: "q".into(),
            auto_delete: false,
            arguments: FieldTable::new(),
        };
        let (key, value) = encode_queue(&queue).unwrap();
        // id 1 is one varint byte; then the name's length: claim u64::MAX - 1 bytes.
        let mut payload = value[PAYLOAD_START..PAYLOAD_START + 1].to_vec();
        payload.push(253);
        payload.extend((u64::MAX - 1).to_le_bytes());
        let err = decode_record(&key, &sealed(&key, &payload)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn key_and_value_must_agree() {
        let queue = QueueRecord {
            id: 1,
            name: "q".into(),
            auto_delete: false,
            arguments: FieldTable::new(),
        };
        let (key, value) = encode_queue(&queue).unwrap();
        // Under another key the checksum fails first; resealed, the check of the id does.
        let other = queue_key(2);
        let err = decode_record(&other, &value).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { ref reason, .. } if reason.contains("checksum")),
            "{err}"
        );
        let err = decode_record(&other, &sealed(&other, &value[PAYLOAD_START..])).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { ref reason, .. } if reason.contains("queue id"))
        );
        assert_eq!(key, queue_key(1));
    }

    #[test]
    fn trailing_bytes_and_unknown_versions_are_corrupt() {
        let exchange = ExchangeRecord {
            name: "x".into(),
            kind: "topic".into(),
            auto_delete: false,
            internal: false,
            arguments: FieldTable::new(),
        };
        let (key, value) = encode_exchange(&exchange).unwrap();
        let mut longer = value[PAYLOAD_START..].to_vec();
        longer.push(0);
        let err = decode_record(&key, &sealed(&key, &longer)).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { ref reason, .. } if reason.contains("trailing"))
        );
        let mut future = value.clone();
        future[0] = 3;
        let err = decode_record(&key, &future).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { ref reason, .. } if reason.contains("version 3"))
        );
    }

    #[test]
    fn long_names_are_invalid() {
        let exchange = ExchangeRecord {
            name: "x".repeat(256),
            kind: "topic".into(),
            auto_delete: false,
            internal: false,
            arguments: FieldTable::new(),
        };
        assert!(matches!(
            encode_exchange(&exchange),
            Err(StoreError::Invalid(_))
        ));
    }

    /// A version 2 value of `payload` for `key`, with a right checksum.
    fn sealed(key: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut value = vec![FORMAT_VERSION, 0, 0, 0, 0];
        value.extend_from_slice(payload);
        seal(key, &mut value);
        value
    }

    #[test]
    fn every_flipped_bit_of_a_value_or_key_is_corrupt() {
        let m = boundary_messages().swap_remove(1);
        let (key, value) = encode_message(1, 2, &m).unwrap();
        for bit in 0..value.len() * 8 {
            let mut flipped = value.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let err = decode_record(&key, &flipped).unwrap_err();
            assert!(
                matches!(err, StoreError::Corrupt { .. }),
                "bit {bit}: {err}"
            );
        }
        for bit in 8..key.len() * 8 {
            let mut flipped = key.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let err = decode_record(&flipped, &value).unwrap_err();
            assert!(
                matches!(err, StoreError::Corrupt { ref reason, .. } if reason.contains("checksum")),
                "key bit {bit}: {err}"
            );
        }
    }

    #[test]
    fn version_1_values_still_decode() {
        let m = message(None);
        let (key, value) = encode_message(1, 2, &m).unwrap();
        let mut v1 = vec![VERSION_1];
        v1.extend_from_slice(&value[PAYLOAD_START..]);
        assert_eq!(
            decode_record(&key, &v1).unwrap(),
            Record::Message {
                queue: 1,
                seq: 2,
                record: m
            }
        );
    }

    #[test]
    fn commit_counter_round_trips_and_is_checked() {
        let value = encode_commit(0x0102_0304_0506_0708);
        assert_eq!(decode_commit(&value), Ok(0x0102_0304_0506_0708));
        for bit in 0..value.len() * 8 {
            let mut flipped = value.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(decode_commit(&flipped), Err(StoreError::Corrupt { ref key, .. }) if key == &COMMIT_KEY),
                "bit {bit}"
            );
        }
        assert!(decode_commit(&value[..value.len() - 1]).is_err());
    }
}
