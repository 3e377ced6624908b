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
    // No flusher thread: recovery does not use it, and it would be a thread started and
    // stopped per input.
    let options = SledOptions {
        flush_every_ms: None,
        ..SledOptions::default()
    };
    let outcome = SledStore::open(&dir, options).and_then(|store| {
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
///
/// One broker on a memory store serves the inputs in turn (building a broker per input, with
/// its persistence and timer threads, took most of the time of a run): each input ends by
/// purging the queue, so the next one starts from an empty queue on a healthy broker, as a
/// fresh broker would; a channel the input closed (a refused `user_id`) is replaced, and an
/// input that panicked leaves no broker behind, so the next one builds a fresh one.
pub fn publish_properties(data: &[u8]) {
    use crate::types::{BasicPublishOptions, QueuePurgeOptions};
    use crate::{Error, store::Store};

    static RIG: std::sync::Mutex<Option<PublishRig>> = std::sync::Mutex::new(None);
    let mut slot = RIG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut rig = match slot.take() {
        Some(rig) => rig,
        None => PublishRig::new(),
    };
    if rig.ch.is_closed() {
        rig.ch = PublishRig::channel(&rig.conn);
    }
    let ch = &rig.ch;
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
            let recovered = rig.store.recover().expect("the memory store recovers");
            // The newest message of the queue: the purge that ended the previous input may
            // still be on its way to the store.
            let record = &recovered.messages[0]
                .messages
                .last()
                .expect("a confirmed persistent message is in the store")
                .1;
            // Accepted properties nest within the limit: building and dropping them again on
            // this thread is safe.
            assert_eq!(record.properties, build_properties(data));
        }
        Err(Error::InvalidInput(_)) => {}
        // A `user_id` other than the connection's user is RabbitMQ's 406: it closes the
        // channel and touches nothing else.
        Err(Error::Channel(e)) if e.text.contains("user_id property set to") => {
            assert!(
                rig.broker.health().is_healthy(),
                "{:?}",
                rig.broker.health()
            );
            assert!(ch.is_closed(), "a channel error left the channel open");
            *slot = Some(rig);
            return;
        }
        Err(other) => panic!("publish failed with {other:?}, not InvalidInput"),
    }
    assert!(
        rig.broker.health().is_healthy(),
        "{:?}",
        rig.broker.health()
    );
    ch.basic_publish(
        "",
        "q",
        BasicPublishOptions::default(),
        b"after".to_vec(),
        crate::BasicProperties::default().with_delivery_mode(2),
    )
    .expect("a plain publish after the fuzzed one");
    assert!(ch.wait_for_confirms().expect("confirms on an open channel"));
    ch.queue_purge("q", QueuePurgeOptions::default())
        .expect("purging the queue on a healthy broker");
    *slot = Some(rig);
}

/// The broker [`publish_properties`] publishes to, kept from one input to the next.
struct PublishRig {
    store: crate::store::MemoryStore,
    broker: crate::Broker,
    conn: crate::Connection,
    /// In confirm mode; replaced when an input closed it.
    ch: crate::Channel,
}

impl PublishRig {
    /// A broker on an empty memory store with the durable queue `q`.
    fn new() -> PublishRig {
        use crate::FieldTable;
        use crate::types::QueueDeclareOptions;

        let store = crate::store::MemoryStore::new();
        let broker = crate::Broker::builder()
            .open_store(store.clone())
            .expect("an empty memory store opens");
        let conn = broker.connect();
        let ch = PublishRig::channel(&conn);
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare("q", durable, FieldTable::new())
            .expect("declaring a durable queue on a healthy store");
        PublishRig {
            store,
            broker,
            conn,
            ch,
        }
    }

    /// A new channel in confirm mode.
    fn channel(conn: &crate::Connection) -> crate::Channel {
        let ch = conn.channel().expect("the connection opens a channel");
        ch.confirm_select(crate::types::ConfirmSelectOptions::default())
            .expect("confirm mode on an open channel");
        ch
    }
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

/// Reads a fuzz input a byte at a time; past the end every read is 0, so any input makes a
/// complete (if short) case.
struct Cursor<'a> {
    data: &'a [u8],
}

impl Cursor<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// One of `items`, picked by the next byte.
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[usize::from(self.byte()) % items.len()].clone()
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Keys of `headers_match` tables: plain ones, `x-` ones (compared only by the `*-with-x`
/// modes), `x-match` itself (never compared), and near misses (`X-a` does not start with `x-`).
const FIELD_KEYS: [&str; 8] = ["a", "b", "c", "x-a", "x-b", "x-match", "X-a", ""];

/// Integers the generated fields hold, in every width that fits them (else their low bytes):
/// the same value appears under several types, and next to floats and timestamps of that value.
const FIELD_INTS: [i64; 16] = [
    0,
    1,
    -1,
    5,
    127,
    -128,
    255,
    5000,
    65535,
    -32768,
    2_147_483_647,
    4_294_967_295,
    9_007_199_254_740_992,
    9_007_199_254_740_993,
    i64::MAX,
    i64::MIN,
];

/// Doubles of the generated fields: integral ones equal to `FIELD_INTS` entries, -0.0, NaN,
/// infinities, and values a `float` does not hold exactly.
const FIELD_DOUBLES: [f64; 14] = [
    0.0,
    -0.0,
    1.0,
    5.0,
    5.5,
    0.1,
    -1.0,
    5000.0,
    9_007_199_254_740_992.0,
    9_223_372_036_854_775_807.0,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    255.0,
];

/// Floats of the generated fields (`float 0.1` is not `double 0.1`).
const FIELD_FLOATS: [f32; 10] = [
    0.0,
    -0.0,
    1.0,
    5.0,
    5.5,
    0.1,
    5000.0,
    f32::NAN,
    f32::INFINITY,
    4_294_967_296.0,
];

/// Strings and byte arrays of the generated fields: numbers as text, `x-match` modes, bytes that
/// are not UTF-8, and one long value.
fn field_bytes(cursor: &mut Cursor) -> bytes::Bytes {
    const SHORT: [&[u8]; 9] = [
        b"",
        b"5",
        b"5000",
        b"bar",
        b"all",
        b"any",
        b"any-with-x",
        b"\xff\x00",
        b"true",
    ];
    match cursor.byte() % 10 {
        9 => bytes::Bytes::from(vec![b'z'; 300]),
        i => bytes::Bytes::from_static(SHORT[usize::from(i) % SHORT.len()]),
    }
}

/// Builds a field value from the input: every `FieldValue` kind, numbers from the pools above,
/// arrays and tables of up to 3 elements while `depth` is below `depth_max`.
fn field_value(cursor: &mut Cursor, depth: u32, depth_max: u32) -> crate::types::FieldValue {
    use crate::types::FieldValue as V;
    let int = |cursor: &mut Cursor| cursor.pick(&FIELD_INTS);
    // The value if it fits the width, else its low bytes.
    macro_rules! narrow {
        ($t:ty, $v:expr) => {{
            let v: i64 = $v;
            <$t>::try_from(v).unwrap_or_else(|_| {
                let low = v.to_le_bytes();
                <$t>::from_le_bytes(
                    low[..std::mem::size_of::<$t>()]
                        .try_into()
                        .expect("a prefix of the width's size"),
                )
            })
        }};
    }
    let nested = depth < depth_max;
    match cursor.byte() % 17 {
        0 => V::Bool(cursor.byte() % 2 == 1),
        1 => V::I8(narrow!(i8, int(cursor))),
        2 => V::U8(narrow!(u8, int(cursor))),
        3 => V::I16(narrow!(i16, int(cursor))),
        4 => V::U16(narrow!(u16, int(cursor))),
        5 => V::I32(narrow!(i32, int(cursor))),
        6 => V::U32(narrow!(u32, int(cursor))),
        7 => V::I64(int(cursor)),
        8 => V::F32(cursor.pick(&FIELD_FLOATS)),
        9 => V::F64(cursor.pick(&FIELD_DOUBLES)),
        10 => {
            let (scale, value) = cursor.pick(&[(0, 5), (0, 0), (1, 50), (2, 500), (0, u32::MAX)]);
            V::Decimal { scale, value }
        }
        11 => V::LongString(field_bytes(cursor)),
        12 => V::ByteArray(field_bytes(cursor)),
        13 => V::Timestamp(cursor.pick(&[0, 5, 1, 5000, 1_700_000_000, u64::MAX])),
        14 if nested => {
            let len = cursor.byte() % 4;
            V::Array(
                (0..len)
                    .map(|_| field_value(cursor, depth + 1, depth_max))
                    .collect(),
            )
        }
        15 if nested => V::Table(field_table(cursor, depth + 1, depth_max, 3)),
        _ => V::Void,
    }
}

/// Builds a table of up to `len_max` entries with keys from `FIELD_KEYS` (a later entry under
/// the same key replaces the earlier one).
fn field_table(
    cursor: &mut Cursor,
    depth: u32,
    depth_max: u32,
    len_max: u8,
) -> crate::types::FieldTable {
    let len = cursor.byte() % (len_max + 1);
    let mut table = crate::types::FieldTable::new();
    for _ in 0..len {
        let key = cursor.pick(&FIELD_KEYS);
        let value = field_value(cursor, depth, depth_max);
        table.insert(key, value);
    }
    table
}

/// Deepest nesting `headers_match` builds: deep enough for tables in arrays in tables.
const HEADERS_DEPTH_MAX: u32 = 3;

/// Fuzz target `headers_match`: [`headers_match`] and [`parse_x_match`] against
/// `reference_headers_match`, a plain restatement of the rules written apart from them.
///
/// Input: byte 0 picks the binding's `x-match` (absent, each of the four modes, a wrong string,
/// a wrong type, or a generated value); then the binding's other arguments (up to 6), a byte
/// whose low bit says whether the message has headers, and the headers (up to 6). Keys come
/// from `FIELD_KEYS`, values from `field_value`. Checks: `parse_x_match` reads exactly the
/// four modes and refuses everything else; `headers_match` under each of the four modes (the
/// parsed one and the others) agrees with the reference.
///
/// [`headers_match`]: crate::core::exchange::headers::headers_match
/// [`parse_x_match`]: crate::core::exchange::headers::parse_x_match
pub fn headers_match(data: &[u8]) {
    use crate::core::exchange::headers::{XMatch, headers_match, parse_x_match};
    use crate::types::FieldValue;

    let mut cursor = Cursor { data };
    let x_match = match cursor.byte() % 9 {
        0 => None,
        1 => Some(FieldValue::from("all")),
        2 => Some(FieldValue::from("any")),
        3 => Some(FieldValue::from("all-with-x")),
        4 => Some(FieldValue::from("any-with-x")),
        5 => Some(FieldValue::from(cursor.pick(&[
            "ALL",
            "all ",
            "",
            "x-all",
            "any-with-x\0",
        ]))),
        6 => Some(FieldValue::ByteArray(bytes::Bytes::from_static(b"all"))),
        _ => Some(field_value(&mut cursor, 1, HEADERS_DEPTH_MAX)),
    };
    let mut args = field_table(&mut cursor, 1, HEADERS_DEPTH_MAX, 6);
    args.remove("x-match");
    if let Some(value) = x_match {
        args.insert("x-match", value);
    }
    let headers =
        (cursor.byte() % 2 == 1).then(|| field_table(&mut cursor, 1, HEADERS_DEPTH_MAX, 6));

    let modes = [
        (XMatch::All, "all"),
        (XMatch::Any, "any"),
        (XMatch::AllWithX, "all-with-x"),
        (XMatch::AnyWithX, "any-with-x"),
    ];
    let expected_mode = match args.get("x-match") {
        None => Some(XMatch::All),
        Some(FieldValue::LongString(text)) => modes
            .iter()
            .find(|(_, name)| name.as_bytes() == &text[..])
            .map(|&(mode, _)| mode),
        Some(_) => None,
    };
    match (parse_x_match(&args), expected_mode) {
        (Ok(parsed), Some(expected)) => assert_eq!(parsed, expected, "args {args:?}"),
        (Err(_), None) => {}
        (parsed, expected) => {
            panic!("parse_x_match gave {parsed:?}, expected {expected:?}; args {args:?}")
        }
    }
    for (mode, name) in modes {
        let got = headers_match(mode, &args, headers.as_ref());
        let want = reference_headers_match(name, &args, headers.as_ref());
        assert_eq!(
            got, want,
            "mode {name}: headers_match says {got}, the reference {want}; args {args:?}, headers {headers:?}"
        );
    }
}

/// The headers-exchange rules (SEMANTICS.md §2.5 and the decisions documented on
/// `headers_match`), stated as plainly as possible for the engine's matcher to be checked
/// against: `mode` is `all`, `any`, `all-with-x` or `any-with-x`.
///
/// Each compared argument is matched, and the results combined: `all` modes need every one
/// (none: true), `any` modes at least one (none: false). Values are compared as the Erlang terms
/// RabbitMQ holds once it drops the type tags of top-level values ([`ErlTerm`]), with Erlang's
/// `==`.
fn reference_headers_match(
    mode: &str,
    args: &crate::types::FieldTable,
    headers: Option<&crate::types::FieldTable>,
) -> bool {
    use crate::types::FieldValue;

    let with_x = mode.ends_with("-with-x");
    let mut results = Vec::new();
    for (key, arg) in args.iter() {
        if key == "x-match" {
            continue;
        }
        if key.starts_with("x-") && !with_x {
            continue;
        }
        let header = headers.and_then(|h| h.get(key));
        let matched = match (arg, header) {
            (_, None) => false,
            (FieldValue::Void, Some(_)) => true,
            // Both timestamps: seconds against seconds (the documented decision).
            (FieldValue::Timestamp(a), Some(FieldValue::Timestamp(h))) => a == h,
            (arg, Some(header)) => {
                let arg = ErlTerm::of(arg);
                let header = match header {
                    // RabbitMQ 4.x turns a message's timestamp header into milliseconds.
                    FieldValue::Timestamp(seconds) => ErlTerm::Int(i128::from(*seconds) * 1000),
                    other => ErlTerm::of(other),
                };
                arg.erlang_eq(&header)
            }
        };
        results.push(matched);
    }
    if mode.starts_with("all") {
        results.iter().all(|&m| m)
    } else {
        results.iter().any(|&m| m)
    }
}

/// A field value as the Erlang term RabbitMQ holds for it once the type tag is dropped:
/// integers of every width are one integer type, `float` and `double` are doubles, strings and
/// byte arrays are binaries, booleans and void are atoms, a decimal is `{Scale, Value}`. Arrays
/// and tables keep their elements' tags: `[{Type, Value}]` and `[{Key, Type, Value}]` (key
/// order: our tables are sorted).
///
/// A table is a list as an array is, so an empty table is the empty array `[]` and the two
/// are equal.
#[derive(Debug)]
enum ErlTerm {
    Int(i128),
    Float(f64),
    Binary(Vec<u8>),
    Atom(&'static str),
    Tuple(Vec<ErlTerm>),
    List(Vec<ErlTerm>),
}

impl ErlTerm {
    fn of(value: &crate::types::FieldValue) -> ErlTerm {
        use crate::types::FieldValue as V;
        match value {
            V::Bool(true) => ErlTerm::Atom("true"),
            V::Bool(false) => ErlTerm::Atom("false"),
            V::I8(v) => ErlTerm::Int(i128::from(*v)),
            V::U8(v) => ErlTerm::Int(i128::from(*v)),
            V::I16(v) => ErlTerm::Int(i128::from(*v)),
            V::U16(v) => ErlTerm::Int(i128::from(*v)),
            V::I32(v) => ErlTerm::Int(i128::from(*v)),
            V::U32(v) => ErlTerm::Int(i128::from(*v)),
            V::I64(v) => ErlTerm::Int(i128::from(*v)),
            V::F32(v) => ErlTerm::Float(f64::from(*v)),
            V::F64(v) => ErlTerm::Float(*v),
            V::Decimal { scale, value } => ErlTerm::Tuple(vec![
                ErlTerm::Int(i128::from(*scale)),
                ErlTerm::Int(i128::from(*value)),
            ]),
            V::LongString(b) | V::ByteArray(b) => ErlTerm::Binary(b.to_vec()),
            V::Timestamp(seconds) => ErlTerm::Int(i128::from(*seconds)),
            V::Void => ErlTerm::Atom("undefined"),
            V::Array(items) => ErlTerm::List(
                items
                    .iter()
                    .map(|v| ErlTerm::Tuple(vec![ErlTerm::Atom(v.type_name()), ErlTerm::of(v)]))
                    .collect(),
            ),
            V::Table(table) => ErlTerm::List(
                table
                    .iter()
                    .map(|(k, v)| {
                        ErlTerm::Tuple(vec![
                            ErlTerm::Binary(k.as_bytes().to_vec()),
                            ErlTerm::Atom(v.type_name()),
                            ErlTerm::of(v),
                        ])
                    })
                    .collect(),
            ),
        }
    }

    /// Erlang's `==`: numbers by value (an integer equals a float exactly when the float is
    /// that integer; NaN equals nothing), everything else by kind and contents.
    fn erlang_eq(&self, other: &ErlTerm) -> bool {
        match (self, other) {
            (ErlTerm::Int(a), ErlTerm::Int(b)) => a == b,
            (ErlTerm::Float(a), ErlTerm::Float(b)) => a == b,
            (ErlTerm::Int(i), ErlTerm::Float(f)) | (ErlTerm::Float(f), ErlTerm::Int(i)) => {
                int_is_float(*i, *f)
            }
            (ErlTerm::Binary(a), ErlTerm::Binary(b)) => a == b,
            (ErlTerm::Atom(a), ErlTerm::Atom(b)) => a == b,
            (ErlTerm::Tuple(a), ErlTerm::Tuple(b)) | (ErlTerm::List(a), ErlTerm::List(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.erlang_eq(y))
            }
            _ => false,
        }
    }
}

/// Whether the double `f` is exactly the integer `i`: the nearest double to `i` must be `f`,
/// and converting `f` back must give `i` (so `i` was not rounded on the way).
fn int_is_float(i: i128, f: f64) -> bool {
    // `as` rounds to the nearest double, and saturates going back: both are what is wanted.
    let nearest = i as f64;
    nearest == f && f.is_finite() && f as i128 == i
}

/// Deepest wrapping `field_table_codec` adds around a built table: past
/// [`FIELD_DEPTH_MAX`](crate::types::field::FIELD_DEPTH_MAX), so both sides of the limit are
/// reached.
const CODEC_WRAP_MAX: u8 = 40;

/// Fuzz target `field_table_codec`: the AMQP field-table codec
/// ([`crate::types::field_codec`]).
///
/// Checks, on the input as wire bytes: decoding never panics; a table that decodes took at
/// most the input, and re-encodes to as many bytes as it took (every value has one encoded
/// size), which is its `wire_size()`, and which decode to a bitwise-equal table (floats by
/// bits: NaN) and encode again to the same bytes; every shorter prefix of the encoding is
/// `Truncated`; bytes after it are left alone. On a table built from the input (values from
/// `field_value`, keys up to 256 bytes, nested up to 40 levels deep): encoding refuses
/// exactly what `wire_size()` refuses, with the same error and nothing appended, and whatever
/// encodes round-trips as above.
pub fn field_table_codec(data: &[u8]) {
    use crate::types::field_codec::{decode_table, encode_table};

    match decode_table(data) {
        Ok((table, used)) => {
            assert!(
                used <= data.len(),
                "decode took {used} of {} bytes",
                data.len()
            );
            let encoded = check_codec_round_trip(&table);
            assert_eq!(
                encoded.len(),
                used,
                "re-encoding {table:?} changed its length"
            );
        }
        Err(e) => drop(e.to_string()),
    }

    let mut cursor = Cursor { data };
    let table = codec_table(&mut cursor);
    match table.wire_size() {
        Ok(_) => drop(check_codec_round_trip(&table)),
        Err(e) => {
            let mut out = vec![0xAB];
            assert_eq!(encode_table(&table, &mut out), Err(e));
            assert_eq!(out, [0xAB], "a refused table appended bytes");
        }
    }
}

/// Encodes a table that `wire_size()` accepts and checks the round trip (see
/// [`field_table_codec`]); returns the encoding.
fn check_codec_round_trip(table: &crate::types::FieldTable) -> Vec<u8> {
    use crate::types::field_codec::{DecodeError, decode_table, encode_table};

    let size = table.wire_size().expect("the caller checked wire_size");
    let mut encoded = Vec::new();
    encode_table(table, &mut encoded).expect("a table wire_size accepts encodes");
    assert_eq!(
        u64::try_from(encoded.len()).ok(),
        Some(size),
        "encoded length is not wire_size() for {table:?}"
    );
    let (back, used) = decode_table(&encoded).expect("an encoded table decodes");
    assert_eq!(
        used,
        encoded.len(),
        "decode did not take the whole encoding"
    );
    assert!(
        same_table(table, &back),
        "round trip changed {table:?} into {back:?}"
    );
    let mut again = Vec::new();
    encode_table(&back, &mut again).expect("a decoded table encodes");
    assert_eq!(
        again, encoded,
        "encode(decode(encode(t))) changed the bytes"
    );
    for cut in [0, encoded.len() / 2, encoded.len() - 1] {
        assert!(
            matches!(
                decode_table(&encoded[..cut]),
                Err(DecodeError::Truncated { .. })
            ),
            "a {cut}-byte prefix of a {}-byte table did not fail as truncated",
            encoded.len()
        );
    }
    let mut longer = encoded.clone();
    longer.extend_from_slice(b"\x00\xFF");
    assert_eq!(
        decode_table(&longer).map(|(_, used)| used),
        Ok(encoded.len()),
        "trailing bytes were read"
    );
    encoded
}

/// Equal tables, floats compared by their bits (so NaN equals itself, and -0.0 is not 0.0).
fn same_table(a: &crate::types::FieldTable, b: &crate::types::FieldTable) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((ka, va), (kb, vb))| ka == kb && same_value(va, vb))
}

fn same_value(a: &crate::types::FieldValue, b: &crate::types::FieldValue) -> bool {
    use crate::types::FieldValue as V;
    match (a, b) {
        (V::F32(x), V::F32(y)) => x.to_bits() == y.to_bits(),
        (V::F64(x), V::F64(y)) => x.to_bits() == y.to_bits(),
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (V::Table(x), V::Table(y)) => same_table(x, y),
        (x, y) => x == y,
    }
}

/// The table `field_table_codec` builds: up to 8 entries from [`field_value`] (nested up to 4
/// deep), maybe a key of 255 or 256 bytes, maybe wrapped as the single entry of tables and
/// arrays nested up to `CODEC_WRAP_MAX` deep.
fn codec_table(cursor: &mut Cursor) -> crate::types::FieldTable {
    use crate::types::{FieldTable, FieldValue};

    let mut table = field_table(cursor, 1, 4, 8);
    match cursor.byte() % 8 {
        0 => drop(table.insert("k".repeat(255), FieldValue::Void)),
        1 => drop(table.insert("k".repeat(256), FieldValue::U8(1))),
        _ => {}
    }
    let wrap = cursor.byte() % (CODEC_WRAP_MAX + 1);
    if wrap == 0 {
        return table;
    }
    let mut value = FieldValue::Table(table);
    for level in 1..wrap {
        value = if level % 2 == 0 {
            FieldValue::Array(vec![value])
        } else {
            FieldValue::Table(FieldTable::new().with("w", value))
        };
    }
    FieldTable::new().with("w", value)
}

/// Most commands taken from one `queue_commands` input.
const QUEUE_COMMANDS_MAX: usize = 256;

/// Fuzz target `queue_commands`: a core [`Queue`](crate::core::queue::Queue) driven by a
/// sequence of commands decoded from the input, through its public API only, as the runtime
/// drives it (consumers admitted by `can_consume`, fresh numbers for re-appended requeues, a
/// no-ack consumer's credit returned as its receiver takes deliveries, an undelivered dispatch
/// handed back at once).
///
/// Input: 8 bytes of configuration (queue type, single active consumer, `x-message-ttl`,
/// `x-max-length`, `x-max-length-bytes`, `x-overflow`, `x-delivery-limit`, `x-max-priority`),
/// then commands (at most 256), each an opcode byte and its argument bytes: publish (with or
/// without an `expiration`, a priority and a padded body), consume (prefetch, no-ack, priority,
/// exclusive), cancel, one dispatch (maybe undelivered), a dispatch pass with housekeeping,
/// ack, reject, requeue (a client's and a return), `basic.get`, purge, time passing,
/// housekeeping, credit, and settles of numbers the queue does not hold.
///
/// After every command: `check_invariants()`, and a model (`QueueModel`) that keeps where
/// each message is agrees with the queue: every message published is in exactly one of ready
/// (with its redelivered flag, delivery count and deadline), unacked (under its number),
/// removed with a reason (from the effects: a removal must come from where the reason says),
/// delivered without ack, acked or purged. Also: an acked or removed message never comes back; a
/// requeued one comes back flagged redelivered with its delivery count + 1 (or is removed over
/// the delivery limit); a publish is refused exactly when a reject overflow mode's limit would
/// be passed; nothing is handed out expired (but a TTL-0 message to a consumer at its arrival
/// instant); after housekeeping the head has not expired and a drop-head limit holds; a dispatch
/// pass ends only when no consumer can take a message; settles of numbers not held do nothing.
pub fn queue_commands(data: &[u8]) {
    let mut cursor = Cursor { data };
    let mut model = QueueModel::new(&mut cursor);
    for _ in 0..QUEUE_COMMANDS_MAX {
        if cursor.is_empty() {
            break;
        }
        model.step(&mut cursor);
        model.drain_effects();
        model.check();
    }
}

/// Where a message of `queue_commands` is, as the model follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Waiting for a delivery.
    Ready {
        delivered: bool,
        count: u32,
    },
    /// Delivered, to be settled under `seq`.
    Unacked {
        seq: u64,
        consumer: Option<u64>,
        count: u32,
    },
    /// Delivered to a no-ack consumer or a no-ack `basic.get`.
    NoAck,
    Acked,
    Purged,
    /// The command just run must produce this removal effect.
    Awaiting(crate::core::queue::Removal),
    Removed(crate::core::queue::Removal),
}

/// A message of `queue_commands`: its body is its index in [`QueueModel::messages`] (8 bytes,
/// little-endian), padded.
#[derive(Debug)]
struct TrackedMessage {
    place: Place,
    enqueued_at_ms: u64,
    deadline_ms: Option<u64>,
    size: u64,
}

/// A consumer of `queue_commands`.
#[derive(Debug)]
struct ModelConsumer {
    id: u64,
    no_ack: bool,
    prefetch: u32,
    exclusive: bool,
    /// No-ack deliveries its receiver has not taken yet (released by `handle_credit`).
    window: u32,
}

/// The queue under test and what the model expects of it.
struct QueueModel {
    queue: crate::core::queue::Queue,
    messages: Vec<TrackedMessage>,
    consumers: Vec<ModelConsumer>,
    next_consumer: u64,
    /// The queue's next sequence number: the runtime reserves numbers the same way.
    next_seq: u64,
    /// Numbers of messages that left the queue for good, for settles that must do nothing.
    gone_seqs: Vec<u64>,
    now_ms: u64,
    /// A publish was accepted since the last housekeeping: it applies a drop-head limit.
    published: bool,
    /// Per message: the last check that saw it ready (each must be seen once per check).
    seen: Vec<u64>,
    checks: u64,
}

impl QueueModel {
    /// A model and a queue configured by the first bytes of the input.
    fn new(cursor: &mut Cursor) -> QueueModel {
        use crate::core::queue::{Queue, QueueConfig};
        use crate::types::{FieldTable, FieldValue};

        let mut args = FieldTable::new();
        if cursor.byte() % 2 == 1 {
            args.insert("x-queue-type", "quorum");
        }
        if cursor.byte() % 4 == 1 {
            args.insert("x-single-active-consumer", true);
        }
        let mut optional = |cursor: &mut Cursor, key: &str, values: &[Option<i64>]| {
            if let Some(v) = cursor.pick(values) {
                args.insert(key, FieldValue::I64(v));
            }
        };
        optional(
            cursor,
            "x-message-ttl",
            &[None, None, Some(0), Some(5), Some(100)],
        );
        optional(cursor, "x-max-length", &[None, Some(0), Some(1), Some(3)]);
        optional(
            cursor,
            "x-max-length-bytes",
            &[None, None, Some(20), Some(60)],
        );
        optional(
            cursor,
            "x-delivery-limit",
            &[None, Some(-1), Some(0), Some(2)],
        );
        optional(cursor, "x-max-priority", &[None, None, Some(3)]);
        let overflow = cursor.pick(&[
            None,
            Some("drop-head"),
            Some("reject-publish"),
            Some("reject-publish-dlx"),
        ]);
        if let Some(overflow) = overflow {
            args.insert("x-overflow", overflow);
        }
        QueueModel {
            queue: Queue::with_config(QueueConfig::from_arguments(&args)),
            messages: Vec::new(),
            consumers: Vec::new(),
            next_consumer: 1,
            next_seq: 0,
            gone_seqs: Vec::new(),
            now_ms: 1_000,
            published: false,
            seen: Vec::new(),
            checks: 0,
        }
    }

    /// Decodes one command and runs it against the queue and the model.
    fn step(&mut self, cursor: &mut Cursor) {
        match cursor.byte() % 16 {
            0 => self.publish(cursor, false),
            1 => self.publish(cursor, true),
            2 => self.consume(cursor),
            3 => self.cancel(cursor),
            4 => self.dispatch_one(cursor),
            5 => self.dispatch_pass(),
            6 => self.ack(cursor),
            7 => self.reject(cursor),
            8 => self.requeue(cursor, true),
            9 => self.requeue(cursor, false),
            10 => self.get(cursor),
            11 => self.purge(),
            12 => self.now_ms += cursor.pick(&[1, 2, 5, 100, 1_000]),
            13 => self.housekeeping(),
            14 => self.credit(cursor),
            _ => self.settle_gone(cursor),
        }
    }

    fn publish(&mut self, cursor: &mut Cursor, with_expiration: bool) {
        use crate::core::queue::{Overflow, Removal};
        use crate::types::{BasicProperties, Message};

        let index = self.messages.len();
        let id = u64::try_from(index).expect("a message index fits in u64");
        let mut body = id.to_le_bytes().to_vec();
        body.resize(8 + cursor.pick(&[0, 0, 5, 20]), b'.');
        let (expiration, ttl_ms) = if with_expiration {
            cursor.pick(&[
                (Some("0"), Some(0)),
                (Some("1"), Some(1)),
                (Some("5"), Some(5)),
                (Some("007"), Some(7)),
                (Some("100"), Some(100)),
                (Some("-1"), None),
                (Some("5ms"), None),
                (Some(""), None),
            ])
        } else {
            (None, None)
        };
        let properties = BasicProperties {
            priority: cursor.pick(&[None, Some(0), Some(1), Some(3), Some(9)]),
            expiration: expiration.map(str::to_owned),
            ..BasicProperties::default()
        };
        let size = u64::try_from(body.len()).expect("a small body");
        let message = std::sync::Arc::new(Message {
            exchange: "".into(),
            routing_key: "q".into(),
            properties,
            body: bytes::Bytes::from(body),
            dead_lettered: false,
            bcc: Vec::new(),
        });

        let config = *self.queue.config();
        let deadline_ms = match (config.message_ttl, ttl_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|ttl| self.now_ms + ttl);
        let (ready_len, ready_bytes) = self.ready_totals();
        let refused = config.overflow != Overflow::DropHead
            && (config.max_length.is_some_and(|max| ready_len + 1 > max)
                || config
                    .max_length_bytes
                    .is_some_and(|max| ready_bytes + size > max));

        let accepted = self.queue.handle_enqueue(message, self.now_ms);
        assert_eq!(
            accepted, !refused,
            "publish of message {id}: accepted {accepted}"
        );
        self.next_seq += 1;
        self.published |= accepted && config.has_length_limit();
        self.messages.push(TrackedMessage {
            place: if accepted {
                Place::Ready {
                    delivered: false,
                    count: 0,
                }
            } else {
                Place::Awaiting(Removal::Refused)
            },
            enqueued_at_ms: self.now_ms,
            deadline_ms,
            size,
        });
        self.seen.push(0);
    }

    fn consume(&mut self, cursor: &mut Cursor) {
        use crate::core::queue::{ConsumerId, ConsumerSpec, QueueKind};

        let no_ack = cursor.byte().is_multiple_of(3);
        let prefetch = cursor.pick(&[0, 1, 2, 3]);
        // A no-ack consumer's window is never 0.
        let prefetch = if no_ack { prefetch.max(1) } else { prefetch };
        let priority = cursor.pick(&[0, 0, 1, 2]);
        let exclusive = cursor.byte().is_multiple_of(8);
        let config = self.queue.config();
        let refused = self.consumers.iter().any(|c| c.exclusive)
            || (exclusive
                && (!self.consumers.is_empty()
                    || (config.single_active_consumer && config.kind == QueueKind::Classic)));
        assert_eq!(
            self.queue.can_consume(exclusive).is_err(),
            refused,
            "can_consume(exclusive: {exclusive}) with consumers {:?}",
            self.consumers
        );
        if refused {
            return;
        }
        let id = self.next_consumer;
        self.next_consumer += 1;
        self.queue.handle_consume(ConsumerSpec {
            id: ConsumerId(id),
            prefetch,
            no_ack,
            exclusive,
            priority,
        });
        self.consumers.push(ModelConsumer {
            id,
            no_ack,
            prefetch,
            exclusive,
            window: 0,
        });
    }

    fn cancel(&mut self, cursor: &mut Cursor) {
        use crate::core::queue::ConsumerId;

        let pick = usize::from(cursor.byte());
        if self.consumers.is_empty() || pick % 8 == 7 {
            assert!(
                !self.queue.handle_cancel(ConsumerId(self.next_consumer)),
                "cancelled a consumer that never was"
            );
            return;
        }
        let consumer = self.consumers.remove(pick % self.consumers.len());
        assert!(self.queue.handle_cancel(ConsumerId(consumer.id)));
    }

    fn dispatch_one(&mut self, cursor: &mut Cursor) {
        let undelivered = cursor.byte().is_multiple_of(4);
        let Some(dispatch) = self.queue.poll_dispatch(self.now_ms) else {
            return;
        };
        let before = self.delivered(&dispatch);
        if undelivered {
            let consumer = dispatch.consumer.expect("a dispatch names its consumer").0;
            self.queue.handle_undelivered(dispatch);
            self.messages[before.0].place = before.1;
            self.consumers.retain(|c| c.id != consumer);
        }
    }

    /// Delivers while the queue will, then housekeeping: the runtime's dispatch pass.
    fn dispatch_pass(&mut self) {
        while let Some(dispatch) = self.queue.poll_dispatch(self.now_ms) {
            self.delivered(&dispatch);
        }
        if self.queue.ready_len() > 0 && !self.queue.config().single_active_consumer {
            for c in &self.consumers {
                let held = self.held_by(c.id);
                let credit = if c.no_ack {
                    c.window < c.prefetch
                } else {
                    c.prefetch == 0 || held < c.prefetch
                };
                assert!(
                    !credit,
                    "dispatch stopped with {} ready while consumer {} (holding {held}) has credit: {c:?}",
                    self.queue.ready_len(),
                    c.id
                );
            }
        }
        self.housekeeping();
    }

    /// Checks a dispatch against the model and records it; returns the message's index and
    /// where it was before.
    fn delivered(&mut self, dispatch: &crate::core::queue::Dispatch) -> (usize, Place) {
        let index = self.index_of(&dispatch.entry);
        let now_ms = self.now_ms;
        let tracked = &self.messages[index];
        let before = tracked.place;
        let Place::Ready { delivered, count } = before else {
            panic!("message {index} handed out from {before:?}");
        };
        assert_eq!(
            (dispatch.entry.delivered, dispatch.entry.delivery_count),
            (delivered, count),
            "message {index}: redelivered flag and delivery count"
        );
        assert_eq!(dispatch.entry.expires_at_ms, tracked.deadline_ms);
        if let Some(deadline) = tracked.deadline_ms {
            let arriving = dispatch.consumer.is_some()
                && deadline == tracked.enqueued_at_ms
                && now_ms == deadline;
            assert!(
                deadline > now_ms || arriving,
                "message {index} handed out at {now_ms} though it expired at {deadline}"
            );
        }
        if let Some(consumer) = dispatch.consumer {
            let c = self
                .consumers
                .iter_mut()
                .find(|c| c.id == consumer.0)
                .unwrap_or_else(|| panic!("dispatch to unknown consumer {consumer:?}"));
            assert_eq!(
                dispatch.no_ack, c.no_ack,
                "dispatch's no-ack differs from its consumer's"
            );
            if c.no_ack {
                c.window += 1;
                assert!(
                    c.window <= c.prefetch,
                    "no-ack consumer {} over its window",
                    c.id
                );
            }
            if self.queue.config().single_active_consumer {
                assert_eq!(
                    self.queue.active_consumer(),
                    Some(consumer),
                    "single active consumer: a delivery to another"
                );
            }
        }
        self.messages[index].place = if dispatch.no_ack {
            Place::NoAck
        } else {
            assert!(self.queue.holds_unacked(dispatch.entry.seq));
            Place::Unacked {
                seq: dispatch.entry.seq,
                consumer: dispatch.consumer.map(|c| c.0),
                count,
            }
        };
        (index, before)
    }

    /// An unacked message picked by the next byte: (index, seq, delivery count).
    fn pick_unacked(&self, cursor: &mut Cursor) -> Option<(usize, u64, u32)> {
        let pick = usize::from(cursor.byte());
        let unacked: Vec<(usize, u64, u32)> = self
            .messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| match m.place {
                Place::Unacked { seq, count, .. } => Some((i, seq, count)),
                _ => None,
            })
            .collect();
        (!unacked.is_empty()).then(|| unacked[pick % unacked.len()])
    }

    fn ack(&mut self, cursor: &mut Cursor) {
        let Some((index, seq, _)) = self.pick_unacked(cursor) else {
            return;
        };
        let entry = self
            .queue
            .handle_ack(seq)
            .unwrap_or_else(|| panic!("ack of unacked {seq} found nothing"));
        assert_eq!(
            self.index_of(&entry),
            index,
            "ack of {seq} gave another message"
        );
        self.messages[index].place = Place::Acked;
        self.gone_seqs.push(seq);
    }

    fn reject(&mut self, cursor: &mut Cursor) {
        use crate::core::queue::Removal;
        let Some((index, seq, _)) = self.pick_unacked(cursor) else {
            return;
        };
        assert!(
            self.queue.handle_reject(seq),
            "reject of unacked {seq} found nothing"
        );
        self.messages[index].place = Place::Awaiting(Removal::Rejected);
        self.gone_seqs.push(seq);
    }

    /// A client's requeue (`client`: re-appended on a queue that does so) or a return (the
    /// holder went away).
    fn requeue(&mut self, cursor: &mut Cursor, client: bool) {
        use crate::core::queue::{Removal, Requeue, RequeueTo};
        let Some((index, seq, count)) = self.pick_unacked(cursor) else {
            return;
        };
        let to = if client && self.queue.config().requeues_to_tail() {
            RequeueTo::Tail(self.next_seq)
        } else {
            RequeueTo::Return
        };
        let count = count.saturating_add(1);
        let over_limit = self
            .queue
            .config()
            .delivery_limit
            .is_some_and(|limit| count > limit);
        match self.queue.handle_requeue(seq, to) {
            Some(Requeue::Removed) => {
                assert!(over_limit, "requeue {count} removed under the limit");
                self.messages[index].place = Place::Awaiting(Removal::DeliveryLimit);
                self.gone_seqs.push(seq);
            }
            Some(Requeue::Back {
                seq: now_seq,
                delivery_count,
                message,
                ..
            }) => {
                assert!(!over_limit, "requeue {count} kept over the limit");
                assert_eq!(delivery_count, count, "delivery count after a requeue");
                assert_eq!(self.body_index(&message.body), index);
                match to {
                    RequeueTo::Tail(fresh) => {
                        assert_eq!(now_seq, fresh);
                        self.next_seq += 1;
                        self.gone_seqs.push(seq);
                    }
                    RequeueTo::Return => assert_eq!(now_seq, seq),
                }
                self.messages[index].place = Place::Ready {
                    delivered: true,
                    count,
                };
            }
            None => panic!("requeue of unacked {seq} found nothing"),
        }
    }

    fn get(&mut self, cursor: &mut Cursor) {
        let no_ack = cursor.byte().is_multiple_of(2);
        match self.queue.handle_get(self.now_ms, no_ack) {
            Some(dispatch) => {
                assert!(dispatch.consumer.is_none() && dispatch.no_ack == no_ack);
                self.delivered(&dispatch);
            }
            None => assert_eq!(self.queue.ready_len(), 0, "basic.get found nothing"),
        }
    }

    fn purge(&mut self) {
        let (ready_len, _) = self.ready_totals();
        let purged = self.queue.handle_purge();
        assert_eq!(purged.len() as u64, ready_len, "purge took another count");
        for entry in &purged {
            let index = self.index_of(entry);
            let place = &mut self.messages[index].place;
            assert!(
                matches!(place, Place::Ready { .. }),
                "purged from {place:?}"
            );
            *place = Place::Purged;
        }
    }

    fn housekeeping(&mut self) {
        use crate::core::queue::Overflow;
        self.queue.handle_housekeeping(self.now_ms);
        self.drain_effects();
        if let Some(deadline) = self.queue.next_deadline() {
            assert!(
                deadline > self.now_ms,
                "the head expired at {deadline}, now {}",
                self.now_ms
            );
        }
        let config = *self.queue.config();
        if std::mem::take(&mut self.published) && config.overflow == Overflow::DropHead {
            let (len, bytes) = self.ready_totals();
            assert!(
                config.max_length.is_none_or(|max| len <= max)
                    && config.max_length_bytes.is_none_or(|max| bytes <= max),
                "drop-head left {len} messages of {bytes} bytes under {config:?}"
            );
        }
    }

    fn credit(&mut self, cursor: &mut Cursor) {
        use crate::core::queue::ConsumerId;
        let pick = usize::from(cursor.byte());
        let taken = self
            .consumers
            .iter_mut()
            .filter(|c| c.window > 0)
            .nth(pick % 4)
            .map(|c| {
                let count = u32::from(cursor.byte()) % c.window + 1;
                c.window -= count;
                (c.id, count)
            });
        if let Some((id, count)) = taken {
            self.queue.handle_credit(ConsumerId(id), count);
        }
    }

    /// An ack, reject or requeue of a number the queue does not hold: nothing happens.
    fn settle_gone(&mut self, cursor: &mut Cursor) {
        use crate::core::queue::RequeueTo;
        let op = cursor.byte();
        let pick = usize::from(cursor.byte());
        let seq = match self.gone_seqs.len() {
            0 => self.next_seq + 1,
            n => self.gone_seqs[pick % n],
        };
        assert!(
            !self
                .messages
                .iter()
                .any(|m| matches!(m.place, Place::Unacked { seq: s, .. } if s == seq)),
            "a gone number {seq} is unacked again"
        );
        match op % 3 {
            0 => assert!(self.queue.handle_ack(seq).is_none(), "ack of gone {seq}"),
            1 => assert!(!self.queue.handle_reject(seq), "reject of gone {seq}"),
            _ => assert!(
                self.queue.handle_requeue(seq, RequeueTo::Return).is_none(),
                "requeue of gone {seq}"
            ),
        }
    }

    /// Applies the queue's removal effects to the model, checking each comes from where its
    /// reason says, and that every removal the last command owed came.
    fn drain_effects(&mut self) {
        use crate::core::queue::{Effect, Overflow, Removal};
        let config = *self.queue.config();
        while let Some(Effect::Removed { entry, reason }) = self.queue.poll_effect() {
            let index = self.index_of(&entry);
            let tracked = &mut self.messages[index];
            let allowed = match (tracked.place, reason) {
                (Place::Awaiting(owed), reason) => owed == reason,
                (Place::Ready { .. }, Removal::Expired) => {
                    tracked.deadline_ms.is_some_and(|d| self.now_ms >= d)
                }
                (Place::Ready { .. }, Removal::MaxLen) => {
                    config.overflow == Overflow::DropHead && config.has_length_limit()
                }
                _ => false,
            };
            assert!(
                allowed,
                "message {index} removed as {reason:?} from {:?} at {}",
                tracked.place, self.now_ms
            );
            tracked.place = Place::Removed(reason);
        }
        if let Some(owed) = self
            .messages
            .iter()
            .position(|m| matches!(m.place, Place::Awaiting(_)))
        {
            panic!(
                "message {owed}: no removal effect for {:?}",
                self.messages[owed].place
            );
        }
    }

    /// The queue agrees with the model: see [`queue_commands`].
    fn check(&mut self) {
        if let Err(broken) = self.queue.check_invariants() {
            panic!("queue invariant broken: {broken}");
        }
        self.checks += 1;
        let mut ready = 0;
        for entry in self.queue.ready() {
            let index = self.index_of(entry);
            assert_ne!(self.seen[index], self.checks, "message {index} ready twice");
            self.seen[index] = self.checks;
            ready += 1;
            let tracked = &self.messages[index];
            let Place::Ready { delivered, count } = tracked.place else {
                panic!("message {index} is ready, but {:?}", tracked.place);
            };
            assert_eq!(
                (entry.delivered, entry.delivery_count, entry.expires_at_ms),
                (delivered, count, tracked.deadline_ms),
                "message {index}: redelivered, delivery count, deadline"
            );
        }
        let (ready_len, ready_bytes) = self.ready_totals();
        assert_eq!(ready, ready_len, "ready messages the queue lost");
        assert_eq!(self.queue.ready_len(), ready_len);
        assert_eq!(self.queue.ready_bytes(), ready_bytes);
        let mut unacked = 0;
        for m in &self.messages {
            if let Place::Unacked { seq, .. } = m.place {
                unacked += 1;
                assert!(self.queue.holds_unacked(seq), "unacked {seq} lost");
            }
        }
        assert_eq!(self.queue.unacked_len(), unacked, "unacked count");
        assert_eq!(
            u64::from(self.queue.consumer_count()),
            self.consumers.len() as u64
        );
        if self.queue.config().single_active_consumer {
            let active = self.queue.active_consumer().map(|c| c.0);
            assert_eq!(
                active.is_some(),
                !self.consumers.is_empty(),
                "single active consumer"
            );
            assert!(active.is_none_or(|a| self.consumers.iter().any(|c| c.id == a)));
        }
    }

    /// Ready messages and their body bytes, by the model.
    fn ready_totals(&self) -> (u64, u64) {
        self.messages
            .iter()
            .filter(|m| matches!(m.place, Place::Ready { .. }))
            .fold((0, 0), |(len, bytes), m| (len + 1, bytes + m.size))
    }

    /// Unacked messages held by consumer `id`.
    fn held_by(&self, id: u64) -> u32 {
        let held = self
            .messages
            .iter()
            .filter(|m| matches!(m.place, Place::Unacked { consumer: Some(c), .. } if c == id))
            .count();
        u32::try_from(held).expect("at most 256 messages")
    }

    fn index_of(&self, entry: &crate::core::queue::Entry) -> usize {
        self.body_index(&entry.message.body)
    }

    fn body_index(&self, body: &[u8]) -> usize {
        let id = u64::from_le_bytes(body[..8].try_into().expect("bodies start with their id"));
        let index = usize::try_from(id).expect("an index");
        assert!(index < self.messages.len(), "a message never published");
        index
    }
}
