//! Entry points for fuzz targets and their corpus replay.
//!
//! Each function takes arbitrary bytes and panics when it finds a bug. `fuzz/fuzz_targets/`
//! wraps them for cargo-fuzz (libFuzzer); `tests/fuzz_corpus.rs` replays the committed corpus
//! and regression files through them without libFuzzer.

use std::collections::BTreeSet;

use crate::core::exchange::topic::{TopicTrie, naive_match};

/// Longest pattern or key built from the input: AMQP short strings hold at most 255 bytes.
const TOPIC_LEN_MAX: usize = 255;

/// Most patterns built from one input.
const TOPIC_PATTERNS_MAX: usize = 16;

/// Bytes that stand for themselves in a pattern or key; every other byte maps onto them, so
/// random input is dense in separators and wildcards and matches often. The committed corpus is
/// written in these characters and stays readable.
const TOPIC_ALPHABET: [u8; 6] = *b"abc.*#";

/// Separates the key and the patterns in a `topic_match` input.
const TOPIC_SEPARATOR: u8 = 0xFF;

/// Fuzz target: routes a key through a [`TopicTrie`] and checks it against [`naive_match`].
///
/// Input: `key 0xFF pattern 0xFF pattern ...`, each part mapped onto `TOPIC_ALPHABET` and cut
/// to 255 bytes. Besides the given patterns (at most 16) the trie holds some derived from them
/// (the key, the key with `.#` appended, each given pattern's first half with and without a
/// `#.` prefix), so that there are at least two and they share prefixes. Checks, with the
/// trie's invariants after each phase (not after each change: a broken structure persists
/// within a phase, and a walk per change made runs several times slower): each pattern's
/// destination is routed exactly when `naive_match` says so, and once; the same after removing
/// every other pattern; the trie is empty after removing the rest; and a clone taken before
/// the removals (the trie is persistent: clones share nodes) still routes as before them.
pub fn topic_match(data: &[u8]) {
    let (key, patterns) = topic_input(data);
    let mut trie = TopicTrie::new();
    for (dest, pattern) in patterns.iter().enumerate() {
        assert!(
            trie.insert(pattern, dest),
            "insert of a new (pattern, dest) returned false"
        );
    }
    trie.check_invariants();
    assert_eq!(trie.len(), patterns.len());
    check_route(&trie, &key, &patterns, |_| true);
    let snapshot = trie.clone();

    for (dest, pattern) in patterns.iter().enumerate().step_by(2) {
        assert!(
            trie.remove(pattern, &dest),
            "remove of {pattern:?} returned false"
        );
        assert!(
            !trie.remove(pattern, &dest),
            "second remove of {pattern:?} returned true"
        );
    }
    trie.check_invariants();
    check_route(&trie, &key, &patterns, |dest| dest % 2 == 1);

    for (dest, pattern) in patterns.iter().enumerate().skip(1).step_by(2) {
        assert!(
            trie.remove(pattern, &dest),
            "remove of {pattern:?} returned false"
        );
    }
    trie.check_invariants();
    assert!(
        trie.is_empty(),
        "trie not empty after removing every pattern"
    );
    snapshot.check_invariants();
    assert_eq!(snapshot.len(), patterns.len());
    check_route(&snapshot, &key, &patterns, |_| true);
}

/// Asserts that routing `key` yields exactly the destinations `dest` (indexes into `patterns`)
/// with `present(dest)` whose pattern matches by [`naive_match`], each once.
fn check_route(
    trie: &TopicTrie<usize>,
    key: &str,
    patterns: &[String],
    present: impl Fn(usize) -> bool,
) {
    let mut routed = BTreeSet::new();
    trie.route(key, &mut |dest| {
        assert!(
            routed.insert(*dest),
            "destination {dest} routed twice for key {key:?}"
        )
    });
    let expected: BTreeSet<usize> = (0..patterns.len())
        .filter(|&d| present(d) && naive_match(&patterns[d], key))
        .collect();
    assert_eq!(routed, expected, "key {key:?}, patterns {patterns:?}");
}

/// Splits the input into a key and patterns as [`topic_match`] describes.
fn topic_input(data: &[u8]) -> (String, Vec<String>) {
    let mut parts = data.split(|b| *b == TOPIC_SEPARATOR).map(topic_text);
    let key = parts.next().unwrap_or_default();
    let given: Vec<String> = parts.take(TOPIC_PATTERNS_MAX).collect();
    let mut patterns = given.clone();
    patterns.push(key.clone());
    patterns.push(format!("{key}.#"));
    for pattern in &given {
        let half = &pattern[..pattern.len() / 2];
        patterns.push(half.to_owned());
        patterns.push(format!("#.{half}"));
    }
    (key, patterns)
}

/// Maps bytes onto `TOPIC_ALPHABET` (its own characters unchanged), at most 255 of them.
fn topic_text(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(TOPIC_LEN_MAX)
        .map(|&b| {
            let c = if TOPIC_ALPHABET.contains(&b) {
                b
            } else {
                TOPIC_ALPHABET[usize::from(b) % TOPIC_ALPHABET.len()]
            };
            char::from(c)
        })
        .collect()
}

/// Fuzz target `record_decode`: arbitrary bytes as a stored key and value must decode to a
/// record or a typed error, never a panic; a record that decodes must encode back to bytes
/// that decode and encode to the same bytes (compared as bytes: a NaN float is not equal to
/// itself).
///
/// Layout of `data`: the first byte is the key's length (capped by the input), then the key,
/// then the value.
pub fn record_decode(data: &[u8]) {
    use crate::store::codec::{decode_record, encode_record};
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let (key, value) = rest.split_at(usize::from(len).min(rest.len()));
    let Ok(record) = decode_record(key, value) else {
        return;
    };
    let encoded = encode_record(&record).expect("a decoded record encodes");
    let again = decode_record(&encoded.0, &encoded.1).expect("a re-encoded record decodes");
    let reencoded = encode_record(&again).expect("a decoded record encodes");
    assert_eq!(
        reencoded, encoded,
        "encode(decode(encode(record))) changed the bytes"
    );
}

/// Most edits taken from one `store_open` input.
const STORE_EDITS_MAX: usize = 8;
/// Bytes of one `store_open` edit: op, file, offset (3 bytes, little-endian), value.
const STORE_EDIT_LEN: usize = 6;

/// Fuzz target `store_open`: a small valid sled store, damaged as the input says, must open
/// and recover to exactly what it held, or fail with a typed error ([`StoreError`]); never
/// panic, and never come back with other data.
///
/// The store (built once per process, deterministically: definitions, messages, some deleted)
/// is kept in memory as its files and written to a fresh directory for each input. The input
/// is a list of 6-byte edits, at most 8: `op, file, offset (u24 little-endian), value`. The
/// first edit's `file` picks the file every edit damages (one of the store's files, sorted by
/// path, modulo their count; the other edits' `file` bytes are ignored) and `offset` a byte in
/// it (modulo its length); `op % 4` is 0 or 1 to xor the byte with `value` (0 counts as 1), 2
/// to cut the file there, 3 to delete it.
///
/// One file at a time: damage to both the log and the commit file can hide a loss (the log cut
/// back to an older commit and the commit file's newer slot destroyed reads as an older store
/// that is complete), which no check inside the store can tell from a store that never had the
/// lost writes.
///
/// sled panics on some damaged files; [`SledStore`] catches those on the thread that opens it
/// and on its recovery reader, and reports them as typed errors, so panics on those threads
/// are not findings by themselves (a panic that escapes the store is). A panic on any other
/// thread is: the first call installs a panic hook that tells them apart, and hands only the
/// latter (and panics outside this target) on to the hook it replaced.
///
/// [`StoreError`]: crate::store::StoreError
/// [`SledStore`]: crate::store::SledStore
pub fn store_open(data: &[u8]) {
    use crate::store::{SledOptions, SledStore, Store};
    let base = store_base();
    let file = data.get(1).copied().unwrap_or(0);
    let edits: Vec<StoreEdit> = data
        .chunks_exact(STORE_EDIT_LEN)
        .take(STORE_EDITS_MAX)
        .map(|edit| StoreEdit::parse(edit, file, &base.files))
        .collect();
    let dir = scratch_dir("store-open");
    base.write_to(&dir);
    for edit in &edits {
        edit.apply(&dir, &base.files);
    }
    let unguarded = UNGUARDED_PANICS.load(std::sync::atomic::Ordering::SeqCst);
    let guard = Guarded::enter();
    let outcome = SledStore::open(&dir, SledOptions::default()).and_then(|store| {
        let recovered = store.recover();
        drop(store);
        recovered
    });
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        UNGUARDED_PANICS.load(std::sync::atomic::Ordering::SeqCst),
        unguarded,
        "a thread the store does not guard panicked; edits {edits:?}"
    );
    if let Ok(recovered) = outcome {
        assert!(
            recovered == base.expected,
            "the damaged store opened with other data; edits {edits:?} of files {:?}",
            base.files
                .iter()
                .map(|(path, bytes)| (path, bytes.len()))
                .collect::<Vec<_>>()
        );
    }
}

/// One edit of a `store_open` input, resolved against the store's files.
#[derive(Debug)]
enum StoreEdit {
    /// Xor the byte at `offset` of file `file` with `value`.
    Xor { file: usize, offset: u64, value: u8 },
    /// Cut file `file` to `len` bytes.
    Cut { file: usize, len: u64 },
    /// Delete file `file`.
    Delete { file: usize },
}

impl StoreEdit {
    fn parse(edit: &[u8], file: u8, files: &[(std::path::PathBuf, Vec<u8>)]) -> StoreEdit {
        let file = usize::from(file) % files.len();
        let offset = u64::from(u32::from_le_bytes([edit[2], edit[3], edit[4], 0]));
        let len = u64::try_from(files[file].1.len()).expect("a file's length fits in u64");
        let offset = offset % len.max(1);
        match edit[0] % 4 {
            0 | 1 => StoreEdit::Xor {
                file,
                offset,
                value: edit[5].max(1),
            },
            2 => StoreEdit::Cut { file, len: offset },
            _ => StoreEdit::Delete { file },
        }
    }

    /// Applies the edit to the store in `dir` (an earlier edit may have cut or deleted the
    /// file: then there is less or nothing to edit).
    fn apply(&self, dir: &std::path::Path, files: &[(std::path::PathBuf, Vec<u8>)]) {
        let path = |file: usize| dir.join(&files[file].0);
        match *self {
            StoreEdit::Xor {
                file,
                offset,
                value,
            } => {
                let Ok(mut bytes) = std::fs::read(path(file)) else {
                    return;
                };
                if let Some(byte) = usize::try_from(offset)
                    .ok()
                    .and_then(|offset| bytes.get_mut(offset))
                {
                    *byte ^= value;
                    std::fs::write(path(file), bytes).expect("writing a scratch file");
                }
            }
            StoreEdit::Cut { file, len } => {
                if let Ok(handle) = std::fs::OpenOptions::new().write(true).open(path(file)) {
                    let current = handle.metadata().map_or(0, |m| m.len());
                    handle
                        .set_len(len.min(current))
                        .expect("cutting a scratch file");
                }
            }
            StoreEdit::Delete { file } => {
                let _ = std::fs::remove_file(path(file));
            }
        }
    }
}

/// The undamaged store of `store_open`: its files and what it recovers to.
struct StoreBase {
    /// (path relative to the store directory, bytes), sorted by path.
    files: Vec<(std::path::PathBuf, Vec<u8>)>,
    expected: crate::store::Recovered,
}

impl StoreBase {
    fn write_to(&self, dir: &std::path::Path) {
        for (rel, bytes) in &self.files {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().expect("a file in a directory"))
                .expect("creating a scratch directory");
            std::fs::write(path, bytes).expect("writing a scratch file");
        }
    }
}

thread_local! {
    /// Whether this thread is opening a store in `store_open` (its panics are the store's to
    /// catch).
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as opening a store until dropped (also when a panic unwinds through).
struct Guarded;

impl Guarded {
    fn enter() -> Guarded {
        GUARDED.with(|guarded| guarded.set(true));
        Guarded
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        GUARDED.with(|guarded| guarded.set(false));
    }
}

/// Panics seen on threads the store does not guard, since the hook was installed.
static UNGUARDED_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Builds the base store once, and installs the panic hook (see [`store_open`]).
fn store_base() -> &'static StoreBase {
    static BASE: std::sync::OnceLock<StoreBase> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let guarded = GUARDED.with(std::cell::Cell::get)
                || std::thread::current().name() == Some("coney-recover");
            if !guarded {
                UNGUARDED_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                previous(info);
            }
        }));
        build_store_base()
    })
}

fn build_store_base() -> StoreBase {
    use std::sync::Arc;

    use crate::store::{
        Batch, BindingRecord, DestinationRecord, ExchangeRecord, MessageRecord, Op, QueueRecord,
        SledOptions, SledStore, Store,
    };
    use crate::types::{BasicProperties, FieldTable};

    let dir = scratch_dir("store-open-base");
    // No sled flusher thread: the files depend on the ops alone, so a corpus replays the same.
    let options = SledOptions {
        flush_every_ms: None,
        ..SledOptions::default()
    };
    {
        let store = SledStore::open(&dir, options).expect("a fresh store opens");
        let mut batch = Batch::new();
        batch.push(Op::PutExchange(ExchangeRecord {
            name: "orders".into(),
            kind: "topic".into(),
            auto_delete: false,
            internal: false,
            arguments: FieldTable::new(),
        }));
        for (id, name) in [(1, "created"), (2, "all")] {
            batch.push(Op::PutQueue(QueueRecord {
                id,
                name: name.into(),
                auto_delete: false,
                arguments: FieldTable::new(),
            }));
        }
        batch.push(Op::PutBinding(BindingRecord {
            source: "orders".into(),
            destination: DestinationRecord::Queue("all".into()),
            routing_key: "order.#".into(),
            arguments: FieldTable::new(),
        }));
        store.apply(&batch).expect("applying definitions");
        store.flush().expect("flushing definitions");
        for seq in 0..24u64 {
            let record = Arc::new(MessageRecord {
                exchange: "orders".into(),
                routing_key: "order.created".into(),
                properties: BasicProperties::default().with_delivery_mode(2),
                body: bytes::Bytes::from(vec![u8::try_from(seq).expect("small"); 40]),
                delivery_count: 0,
                delivered: false,
                enqueued_at_ms: 1_700_000_000_000 + seq,
                dead_lettered: false,
                bcc: Vec::new(),
                pending_dead_letter: None,
            });
            let batch = Batch::from(vec![Op::PutMessage {
                queue: 1 + seq % 2,
                seq,
                record,
            }]);
            store.apply(&batch).expect("applying a message");
            if seq % 4 == 3 {
                store.flush().expect("flushing messages");
            }
        }
        let acks: Vec<Op> = (0..24u64)
            .step_by(3)
            .map(|seq| Op::DeleteMessage {
                queue: 1 + seq % 2,
                seq,
            })
            .collect();
        store.apply(&Batch::from(acks)).expect("applying acks");
        store.flush().expect("flushing acks");
    }
    let mut files = Vec::new();
    collect_files(&dir, std::path::Path::new(""), &mut files);
    files.sort();
    let _ = std::fs::remove_dir_all(&dir);
    let base = StoreBase {
        files,
        expected: crate::store::Recovered::default(),
    };
    let check = scratch_dir("store-open-expected");
    base.write_to(&check);
    let expected = SledStore::open(&check, SledOptions::default())
        .and_then(|store| store.recover())
        .expect("the undamaged store recovers");
    let _ = std::fs::remove_dir_all(&check);
    assert_eq!(expected.messages.len(), 2, "both queues hold messages");
    StoreBase { expected, ..base }
}

/// Appends every file under `root.join(rel)` to `out`, as (path relative to `root`, bytes).
fn collect_files(
    root: &std::path::Path,
    rel: &std::path::Path,
    out: &mut Vec<(std::path::PathBuf, Vec<u8>)>,
) {
    for entry in std::fs::read_dir(root.join(rel)).expect("listing the base store") {
        let entry = entry.expect("listing the base store");
        let rel = rel.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            collect_files(root, &rel, out);
        } else {
            let bytes = std::fs::read(root.join(&rel)).expect("reading the base store");
            out.push((rel, bytes));
        }
    }
}

/// A fresh, empty directory under the system temp dir, unique in this process.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("coney-fuzz-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

/// Stack size of the thread [`publish_properties`] publishes on: small, so a recursion through
/// deep headers anywhere on the publish, persist or recover path overflows it and fails.
const PUBLISH_STACK_BYTES: usize = 256 * 1024;

/// Fuzz target: publishes a persistent message with properties built from the input (headers
/// nested to any depth, long values, over-long short strings) to a durable queue, on a thread
/// with a small stack. Checks: the call either succeeds, and then the message is confirmed and
/// recovered from the store with exactly those properties, or is refused with
/// `Error::InvalidInput` (nothing else); either way the broker stays healthy and a plain
/// persistent publish afterwards is confirmed. Nothing recurses through the headers deeper
/// than the nesting limit (the small stack would overflow).
///
/// Input: a program of one-byte operations (see `build_properties`), run twice to build two
/// equal property sets: one is published, the other compared with what the store recovered.
pub fn publish_properties(data: &[u8]) {
    use crate::store::{MemoryStore, Store};
    use crate::types::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use crate::{Broker, Error, FieldTable};

    let store = MemoryStore::new();
    let broker = Broker::builder()
        .open_store(store.clone())
        .expect("an empty memory store opens");
    let conn = broker.connect();
    let ch = conn.channel().expect("a fresh connection opens a channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("q", durable, FieldTable::new())
        .expect("declaring a durable queue on a healthy store");
    ch.confirm_select(ConfirmSelectOptions::default())
        .expect("confirm mode on an open channel");
    let program = data.to_vec();
    let publisher = ch.clone();
    let published = std::thread::Builder::new()
        .stack_size(PUBLISH_STACK_BYTES)
        .spawn(move || {
            let properties = build_properties(&program);
            publisher.basic_publish(
                "",
                "q",
                BasicPublishOptions::default(),
                b"m".to_vec(),
                properties,
            )
        })
        .expect("spawning the publishing thread")
        .join()
        .expect("publishing overflowed its stack or panicked");
    match published {
        Ok(()) => {
            assert!(ch.wait_for_confirms().expect("confirms on an open channel"));
            let recovered = store.recover().expect("the memory store recovers");
            let record = &recovered.messages[0].messages[0].1;
            // Accepted properties nest within the limit: building and dropping them again on
            // this thread is safe.
            assert_eq!(record.properties, build_properties(data));
        }
        Err(Error::InvalidInput(_)) => {}
        // A `user_id` other than the connection's user is RabbitMQ's 406: it closes the
        // channel and touches nothing else.
        Err(Error::Channel(e)) if e.text.contains("user_id property set to") => {
            assert!(broker.health().is_healthy(), "{:?}", broker.health());
            return;
        }
        Err(other) => panic!("publish failed with {other:?}, not InvalidInput"),
    }
    assert!(broker.health().is_healthy(), "{:?}", broker.health());
    ch.basic_publish(
        "",
        "q",
        BasicPublishOptions::default(),
        b"after".to_vec(),
        crate::BasicProperties::default().with_delivery_mode(2),
    )
    .expect("a plain publish after the fuzzed one");
    assert!(ch.wait_for_confirms().expect("confirms on an open channel"));
}

/// Builds persistent properties from a program of one-byte operations (low 3 bits; most take
/// the next byte as an argument `a`), without recursion, so inputs may nest thousands deep:
/// 0 open a table under key `a`; 1 close the innermost table or array; 2 a long string of `a`
/// bytes; 3 an `i32`; 4 open an array under key `a`; 5 set short-string property `a % 10` to
/// `2 * b` bytes (the byte after `a`), over 255 allowed; 6 a byte array of `a` KiB; 7 set the
/// priority to `a`. Keys are one letter (never `CC` or `BCC`, which routing interprets).
fn build_properties(program: &[u8]) -> crate::BasicProperties {
    use crate::{FieldTable, FieldValue};

    enum Frame {
        Table(String, FieldTable),
        Array(String, Vec<FieldValue>),
    }
    fn add(frame: &mut Frame, key: String, value: FieldValue) {
        match frame {
            Frame::Table(_, table) => {
                // A replaced value may nest deep: drop it without recursion.
                if let Some(old) = table.insert(key, value) {
                    FieldTable::new().with("old", old).dismantle();
                }
            }
            Frame::Array(_, values) => values.push(value),
        }
    }
    fn close(stack: &mut Vec<Frame>) {
        if stack.len() < 2 {
            return;
        }
        let (key, value) = match stack.pop().expect("checked: at least two frames") {
            Frame::Table(key, table) => (key, FieldValue::Table(table)),
            Frame::Array(key, values) => (key, FieldValue::Array(values)),
        };
        add(
            stack.last_mut().expect("checked: one frame left"),
            key,
            value,
        );
    }

    let mut properties = crate::BasicProperties::default().with_delivery_mode(2);
    let mut stack = vec![Frame::Table(String::new(), FieldTable::new())];
    let mut bytes = program.iter().copied();
    while let Some(op) = bytes.next() {
        let a = bytes.next().unwrap_or(0);
        let key = char::from(b'a' + a % 16).to_string();
        let frame = stack.last_mut().expect("the root frame is never popped");
        match op % 8 {
            0 => stack.push(Frame::Table(key, FieldTable::new())),
            1 => close(&mut stack),
            2 => add(
                frame,
                key,
                FieldValue::LongString(vec![b'x'; usize::from(a)].into()),
            ),
            3 => add(frame, key, FieldValue::I32(i32::from(a))),
            4 => stack.push(Frame::Array(key, Vec::new())),
            5 => {
                let text = "s".repeat(2 * usize::from(bytes.next().unwrap_or(0)));
                let field = match a % 10 {
                    0 => &mut properties.content_type,
                    1 => &mut properties.content_encoding,
                    2 => &mut properties.correlation_id,
                    3 => &mut properties.reply_to,
                    4 => &mut properties.message_id,
                    5 => &mut properties.kind,
                    6 => &mut properties.user_id,
                    7 => &mut properties.app_id,
                    8 => &mut properties.cluster_id,
                    _ => &mut properties.content_encoding,
                };
                *field = Some(text);
            }
            6 => add(
                frame,
                key,
                FieldValue::ByteArray(vec![0u8; 1024 * usize::from(a)].into()),
            ),
            _ => properties.priority = Some(a),
        }
    }
    while stack.len() > 1 {
        close(&mut stack);
    }
    let Some(Frame::Table(_, headers)) = stack.pop() else {
        unreachable!("the root frame is a table")
    };
    if !headers.is_empty() {
        properties.headers = Some(headers);
    }
    properties
}
