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
