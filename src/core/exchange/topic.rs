//! Topic exchange matching: a word trie of binding patterns, and a naive reference matcher.
//!
//! Rules (SEMANTICS.md §2.5): binding patterns and routing keys are split on `.` into words; `""`
//! is zero words, `"a..b"` is `["a", "", "b"]` and `"."` is `["", ""]`. A literal pattern word
//! matches an equal key word (the empty word matches the empty word), `*` matches exactly one
//! word (an empty word counts) and `#` matches zero or more words. Only a whole word equal to `*`
//! or `#` is a wildcard (`a*` and `#b` are literals). Matching is anchored at both ends.
//!
//! [`TopicTrie`] is what the broker routes with; [`naive_match`] restates the rules as directly as
//! possible and serves as the oracle for unit tests, property tests and the fuzz target
//! ([`crate::fuzzing::topic_match`]).
//!
//! Both are bounded: neither recurses, and routing visits each (trie node, key word) pair at
//! most once, so `#.#.#.#.#` against a 256-word key costs nodes × words steps, not an
//! exponential number.

use std::collections::{BTreeMap, BTreeSet};

/// Whether the binding `pattern` matches the routing `key`, by the rules in the module doc.
///
/// This is the reference definition, kept simple rather than fast. With `p` the pattern words
/// and `k` the key words, `m(i, j)` = "`p[i..]` matches `k[j..]`":
///
/// - `m(P, j)` = `j == K` (an exhausted pattern matches only an exhausted key);
/// - `p[i] == "#"`: `m(i, j)` = `m(i + 1, j)` (`#` takes no word) or `m(i, j + 1)` (`#` takes
///   `k[j]` and may take more);
/// - otherwise: `m(i, j)` = `j < K` and (`p[i] == "*"` or `p[i] == k[j]`) and `m(i + 1, j + 1)`.
///
/// The recursion is evaluated bottom-up, one pattern word at a time, so the stack depth is
/// constant and the time is pattern words × key words however many `#` the pattern has.
pub fn naive_match(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = words(pattern).collect();
    let k: Vec<&str> = words(key).collect();
    // `next[j]` holds m(i + 1, j) while row `cur[j]` = m(i, j) is computed; start with i = P.
    let mut next: Vec<bool> = (0..=k.len()).map(|j| j == k.len()).collect();
    let mut cur = vec![false; k.len() + 1];
    for word in p.iter().rev() {
        for j in (0..=k.len()).rev() {
            let more_key = j < k.len();
            cur[j] = match *word {
                "#" => next[j] || (more_key && cur[j + 1]),
                "*" => more_key && next[j + 1],
                literal => more_key && k[j] == literal && next[j + 1],
            };
        }
        std::mem::swap(&mut cur, &mut next);
    }
    next[0]
}

/// The number of `#` words in a topic binding pattern.
///
/// The broker rejects patterns with more than 2 (SEMANTICS.md §2.3, RabbitMQ 4.3.5+); the trie
/// itself accepts any number.
pub fn hash_wildcards(pattern: &str) -> usize {
    words(pattern).filter(|w| *w == "#").count()
}

/// The words of a pattern or routing key: `""` has none, otherwise split on every `.`.
fn words(s: &str) -> impl Iterator<Item = &str> {
    (!s.is_empty()).then(|| s.split('.')).into_iter().flatten()
}

/// Index of a node in [`TopicTrie::nodes`].
type NodeId = usize;

/// The root node: always present, never freed; holds the destinations of the pattern `""`.
const ROOT: NodeId = 0;

/// A set of topic binding patterns, each with its destinations, routed by walking the key's
/// words through a trie.
///
/// A pattern is a path from the root: one edge per word, literal words keyed by text, `*` and
/// `#` on their own edges. Destinations sit in a [`BTreeSet`] at the node where their pattern
/// ends, so iteration order is deterministic. Nodes live in an arena; [`TopicTrie::remove`]
/// prunes nodes that no longer lead to any destination and recycles their slots.
#[derive(Clone, Debug)]
pub struct TopicTrie<D> {
    /// The arena; `nodes[ROOT]` is the root. Freed slots are reset and listed in `free`.
    nodes: Vec<Node<D>>,
    /// Arena slots available for reuse.
    free: Vec<NodeId>,
    /// Number of (pattern, destination) pairs.
    len: usize,
}

/// One trie node: the pattern prefix spelled by the path from the root.
#[derive(Clone, Debug)]
struct Node<D> {
    /// Children by literal word (never `"*"` or `"#"`, which use the fields below).
    literals: BTreeMap<String, NodeId>,
    /// Child for the `*` word.
    star: Option<NodeId>,
    /// Child for the `#` word.
    hash: Option<NodeId>,
    /// Whether the edge into this node is `#`: such a node may consume further key words
    /// itself.
    is_hash: bool,
    /// Destinations of the pattern that ends here.
    dests: BTreeSet<D>,
}

impl<D> Node<D> {
    fn new(is_hash: bool) -> Self {
        Node {
            literals: BTreeMap::new(),
            star: None,
            hash: None,
            is_hash,
            dests: BTreeSet::new(),
        }
    }

    /// Whether the node leads nowhere: no destinations and no children, so it can be pruned.
    fn is_dead(&self) -> bool {
        self.dests.is_empty()
            && self.literals.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }

    fn child(&self, word: &str) -> Option<NodeId> {
        match word {
            "*" => self.star,
            "#" => self.hash,
            literal => self.literals.get(literal).copied(),
        }
    }
}

impl<D: Clone + Ord> Default for TopicTrie<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Clone + Ord> TopicTrie<D> {
    /// An empty trie.
    pub fn new() -> Self {
        TopicTrie {
            nodes: vec![Node::new(false)],
            free: Vec::new(),
            len: 0,
        }
    }

    /// Adds `dest` under `pattern`; returns whether the pair is new (`false` if it was already
    /// present, which leaves the trie unchanged).
    pub fn insert(&mut self, pattern: &str, dest: D) -> bool {
        let mut id = ROOT;
        for word in words(pattern) {
            id = match self.nodes[id].child(word) {
                Some(child) => child,
                None => self.add_child(id, word),
            };
        }
        let added = self.nodes[id].dests.insert(dest);
        if added {
            self.len += 1;
        }
        added
    }

    /// Removes `dest` from `pattern`; returns whether it was present. Nodes left without
    /// destinations or children are pruned.
    pub fn remove(&mut self, pattern: &str, dest: &D) -> bool {
        // The path as (parent, word) edges, so pruning can walk back up without recursion.
        let mut path: Vec<(NodeId, &str)> = Vec::new();
        let mut id = ROOT;
        for word in words(pattern) {
            match self.nodes[id].child(word) {
                Some(child) => {
                    path.push((id, word));
                    id = child;
                }
                None => return false,
            }
        }
        if !self.nodes[id].dests.remove(dest) {
            return false;
        }
        self.len -= 1;
        while let Some((parent, word)) = path.pop() {
            if !self.nodes[id].is_dead() {
                break;
            }
            self.unlink(parent, word);
            self.free.push(id);
            id = parent;
        }
        true
    }

    /// Whether the trie holds no (pattern, destination) pair.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of (pattern, destination) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Calls `out` for every destination whose pattern matches `key`.
    ///
    /// A destination bound under several matching patterns is passed once per pattern; callers
    /// that need each destination once deduplicate. Order: by pattern end node, then by `D`.
    ///
    /// This is an NFA walk: `active` holds the nodes whose pattern prefix matches the key words
    /// seen so far, deduplicated after every word, so each (node, word) pair is visited at most
    /// once. The only allocations are the two node lists, reused across words.
    pub fn route(&self, key: &str, out: &mut impl FnMut(&D)) {
        let mut active: Vec<NodeId> = Vec::new();
        let mut next: Vec<NodeId> = Vec::new();
        self.enter(ROOT, &mut active);
        for word in words(key) {
            if active.is_empty() {
                return;
            }
            next.clear();
            for &id in &active {
                let node = &self.nodes[id];
                if let Some(child) = node.literals.get(word) {
                    self.enter(*child, &mut next);
                }
                if let Some(star) = node.star {
                    self.enter(star, &mut next);
                }
                if node.is_hash {
                    // `#` takes this word too and stays available for more.
                    self.enter(id, &mut next);
                }
            }
            next.sort_unstable();
            next.dedup();
            std::mem::swap(&mut active, &mut next);
        }
        for &id in &active {
            self.nodes[id].dests.iter().for_each(&mut *out);
        }
    }

    /// Checks the trie's structure, panicking on a violation (a bug in this module): every node
    /// reachable from the root exactly once, no reachable node other than the root dead, the
    /// `is_hash` flags match the edges, freed slots unreachable and reset, and `len` equal to
    /// the number of stored destinations. Tests and fuzz targets call it after every change.
    pub fn check_invariants(&self) {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![ROOT];
        let mut dests = 0;
        seen[ROOT] = true;
        while let Some(id) = stack.pop() {
            let node = &self.nodes[id];
            assert!(
                id == ROOT || !node.is_dead(),
                "topic trie: unpruned dead node {id}"
            );
            dests += node.dests.len();
            assert!(!node.literals.contains_key("*") && !node.literals.contains_key("#"));
            let children = node.literals.values().map(|&c| (c, false));
            let children = children
                .chain(node.star.map(|c| (c, false)))
                .chain(node.hash.map(|c| (c, true)));
            for (child, is_hash) in children {
                assert!(!seen[child], "topic trie: node {child} reachable twice");
                assert_eq!(
                    self.nodes[child].is_hash, is_hash,
                    "topic trie: is_hash of node {child}"
                );
                seen[child] = true;
                stack.push(child);
            }
        }
        assert_eq!(
            dests, self.len,
            "topic trie: len out of step with stored destinations"
        );
        for &id in &self.free {
            assert!(
                id != ROOT && !seen[id],
                "topic trie: freed node {id} still reachable"
            );
            assert!(
                self.nodes[id].is_dead(),
                "topic trie: freed node {id} not reset"
            );
            seen[id] = true;
        }
        assert!(
            seen.iter().all(|s| *s),
            "topic trie: leaked node (neither reachable nor free)"
        );
    }

    /// Pushes `id` and the chain of `#` children below it: a `#` can take zero words, so
    /// wherever a node is reached its `#` child is reached too.
    fn enter(&self, mut id: NodeId, set: &mut Vec<NodeId>) {
        loop {
            set.push(id);
            match self.nodes[id].hash {
                Some(hash) => id = hash,
                None => return,
            }
        }
    }

    /// Creates the child of `parent` for `word`, reusing a freed slot if there is one.
    fn add_child(&mut self, parent: NodeId, word: &str) -> NodeId {
        let node = Node::new(word == "#");
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id] = node;
                id
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        let parent = &mut self.nodes[parent];
        match word {
            "*" => parent.star = Some(id),
            "#" => parent.hash = Some(id),
            literal => {
                parent.literals.insert(literal.to_owned(), id);
            }
        }
        id
    }

    /// Removes the edge `word` from `parent`.
    fn unlink(&mut self, parent: NodeId, word: &str) {
        let parent = &mut self.nodes[parent];
        match word {
            "*" => parent.star = None,
            "#" => parent.hash = None,
            literal => {
                parent.literals.remove(literal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Routing keys of the reference matrix (SEMANTICS.md §2.5, from routing_SUITE.erl).
    const KEYS: [&str; 6] = ["a.b.c", "a.b", "a.b.b", "", "oneword", "a.a.a.a.a"];

    /// Each binding pattern of the matrix with the keys (by column) it matches.
    const MATRIX: [(&str, [bool; 6]); 20] = {
        const ALL: [bool; 6] = [true; 6];
        const NONE: [bool; 6] = [false; 6];
        [
            ("a.b.c", [true, false, false, false, false, false]),
            ("a.*.c", [true, false, false, false, false, false]),
            ("a.#.b", [false, true, true, false, false, false]),
            ("#", ALL),
            ("#.#", ALL),
            ("#.b", [false, true, true, false, false, false]),
            ("*.*", [false, true, false, false, false, false]),
            ("a.*", [false, true, false, false, false, false]),
            ("a.#", [true, true, true, false, false, true]),
            ("a.#.#", [true, true, true, false, false, true]),
            ("", [false, false, false, true, false, false]),
            ("*", [false, false, false, false, true, false]),
            ("*.#", [true, true, true, false, true, true]),
            ("#.*.#", [true, true, true, false, true, true]),
            ("*.#.#", [true, true, true, false, true, true]),
            ("#.b.#", [true, true, true, false, false, false]),
            ("*.*.*", [true, false, true, false, false, false]),
            ("b.#", NONE),
            ("a.b.c.d", NONE),
            ("a.b.#.c.d", NONE),
        ]
    };

    /// Edge rules of §2.5 and the word-splitting rules, as (pattern, key, matches).
    const EDGES: &[(&str, &str, bool)] = &[
        ("a.#", "a", true),
        ("a.#.b", "a.b", true),
        ("*", "", false),
        ("*", "x", true),
        ("#.*.#", "", false),
        ("#.*.#", "x", true),
        ("", "", true),
        ("", "a", false),
        ("", ".", false),
        ("#", "", true),
        ("a..b", "a..b", true),
        ("a.*.b", "a..b", true),
        ("a.b", "a..b", false),
        ("*.*", ".", true),
        ("*", ".", false),
        (".", ".", true),
        (".", "", false),
        ("*", "#", true),
        ("a*", "ab", false),
        ("a*", "a*", true),
        ("#b", "a.b", false),
        ("#b", "#b", true),
        ("a.#.#.b", "a.b", true),
        ("a.#.#.b", "a.x.y.z.b", true),
        ("a.#.c", "a.b.c.d", false),
        ("#.#.#.#.#", "a.b.c", true),
        ("A", "a", false),
    ];

    /// Routes `key` through `trie`, collecting every destination passed to `out`, sorted.
    fn routed(trie: &TopicTrie<u32>, key: &str) -> Vec<u32> {
        let mut out = Vec::new();
        trie.route(key, &mut |d| out.push(*d));
        out.sort_unstable();
        out
    }

    #[test]
    fn naive_match_reproduces_the_reference_matrix() {
        for (pattern, row) in MATRIX {
            for (key, expected) in KEYS.iter().zip(row) {
                assert_eq!(
                    naive_match(pattern, key),
                    expected,
                    "pattern {pattern:?} key {key:?}"
                );
            }
        }
    }

    #[test]
    fn trie_reproduces_the_reference_matrix() {
        let mut trie = TopicTrie::new();
        for (dest, (pattern, _)) in (0u32..).zip(MATRIX) {
            assert!(trie.insert(pattern, dest));
        }
        trie.check_invariants();
        for (column, key) in KEYS.iter().enumerate() {
            let expected: Vec<u32> = (0u32..)
                .zip(MATRIX)
                .filter(|(_, (_, row))| row[column])
                .map(|(d, _)| d)
                .collect();
            assert_eq!(routed(&trie, key), expected, "key {key:?}");
        }
    }

    #[test]
    fn edge_rules_hold_for_naive_and_trie() {
        for &(pattern, key, expected) in EDGES {
            assert_eq!(
                naive_match(pattern, key),
                expected,
                "naive: pattern {pattern:?} key {key:?}"
            );
            let mut trie = TopicTrie::new();
            trie.insert(pattern, 7u32);
            let want: &[u32] = if expected { &[7] } else { &[] };
            assert_eq!(
                routed(&trie, key),
                want,
                "trie: pattern {pattern:?} key {key:?}"
            );
        }
    }

    #[test]
    fn insert_reports_duplicates_and_counts_pairs() {
        let mut trie = TopicTrie::new();
        assert!(trie.is_empty());
        assert!(trie.insert("a.*", 1u32));
        assert!(!trie.insert("a.*", 1));
        assert!(trie.insert("a.*", 2));
        assert!(trie.insert("a.#", 1));
        assert!(trie.insert("", 1));
        assert_eq!(trie.len(), 4);
        assert!(!trie.is_empty());
        trie.check_invariants();
        // Destination 1 matches through two patterns and is passed twice.
        assert_eq!(routed(&trie, "a.b"), vec![1, 1, 2]);
        assert_eq!(routed(&trie, ""), vec![1]);
    }

    #[test]
    fn remove_prunes_to_an_empty_trie() {
        let mut trie = TopicTrie::new();
        let patterns = [
            "a.b.c", "a.b", "a.#.c", "a.*.c", "#", "#.#", "", "a..b", "*.#.*",
        ];
        for (dest, pattern) in (0u32..).zip(patterns) {
            trie.insert(pattern, dest);
            trie.insert(pattern, dest + 100);
        }
        let nodes_full = trie.nodes.len();
        trie.check_invariants();
        assert!(!trie.remove("a.b.c", &5), "wrong destination");
        assert!(!trie.remove("a.x", &0), "pattern absent");
        assert!(!trie.remove("a.b.c.d", &0), "pattern ends below a leaf");
        for (dest, pattern) in (0u32..).zip(patterns) {
            assert!(trie.remove(pattern, &dest));
            assert!(!trie.remove(pattern, &dest));
            trie.check_invariants();
            assert!(trie.remove(pattern, &(dest + 100)));
            trie.check_invariants();
            assert!(routed(&trie, "a.b.c").iter().all(|d| *d % 100 > dest));
        }
        assert!(trie.is_empty());
        assert_eq!(trie.len(), 0);
        assert_eq!(
            trie.free.len(),
            nodes_full - 1,
            "every node but the root is free"
        );
        // Freed slots are reused.
        trie.insert("x.y.z", 1);
        trie.check_invariants();
        assert_eq!(trie.nodes.len(), nodes_full);
        assert_eq!(routed(&trie, "x.y.z"), vec![1]);
    }

    #[test]
    fn removing_a_prefix_pattern_keeps_longer_ones() {
        let mut trie = TopicTrie::new();
        trie.insert("a", 1u32);
        trie.insert("a.b", 2);
        trie.insert("a.#", 3);
        assert!(trie.remove("a", &1));
        trie.check_invariants();
        assert_eq!(routed(&trie, "a.b"), vec![2, 3]);
        assert_eq!(routed(&trie, "a"), vec![3]);
        assert!(trie.remove("a.#", &3));
        trie.check_invariants();
        assert_eq!(routed(&trie, "a"), Vec::<u32>::new());
        assert_eq!(routed(&trie, "a.b"), vec![2]);
    }

    #[test]
    fn many_hashes_against_a_long_key_stay_cheap() {
        // 128 `#` words against 256 one-byte words: exponential without deduplication.
        let pattern = vec!["#"; 128].join(".");
        let key = vec!["k"; 256].join(".");
        let miss = format!("{pattern}.x");
        let mut trie = TopicTrie::new();
        trie.insert(&pattern, 1u32);
        trie.insert(&miss, 2);
        assert_eq!(routed(&trie, &key), vec![1]);
        assert!(naive_match(&pattern, &key));
        assert!(!naive_match(&miss, &key));
        assert_eq!(hash_wildcards(&pattern), 128);
    }

    #[test]
    fn long_patterns_do_not_recurse() {
        let pattern = vec!["w"; 100_000].join(".");
        let mut trie = TopicTrie::new();
        trie.insert(&pattern, 1u32);
        trie.check_invariants();
        assert_eq!(routed(&trie, &pattern), vec![1]);
        assert!(!naive_match(&pattern, "w.w"));
        assert!(trie.remove(&pattern, &1));
        trie.check_invariants();
        assert_eq!(trie.nodes.len() - trie.free.len(), 1);
    }

    #[test]
    fn hash_wildcards_counts_whole_words_only() {
        assert_eq!(hash_wildcards(""), 0);
        assert_eq!(hash_wildcards("#"), 1);
        assert_eq!(hash_wildcards("#.#.#"), 3);
        assert_eq!(hash_wildcards("a.#b.#.b#"), 1);
        assert_eq!(hash_wildcards("*.*"), 0);
    }

    /// A pattern or key of 0..6 words drawn from `alphabet`.
    fn joined(alphabet: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(alphabet), 0..6).prop_map(|w| w.join("."))
    }

    proptest! {
        #[test]
        fn trie_agrees_with_naive(
            patterns in prop::collection::vec(joined(&["a", "b", "", "*", "#"]), 1..8),
            keys in prop::collection::vec(joined(&["a", "b", ""]), 1..8),
        ) {
            let mut trie = TopicTrie::new();
            for (dest, pattern) in (0u32..).zip(&patterns) {
                trie.insert(pattern, dest);
            }
            trie.check_invariants();
            for key in &keys {
                let expected: Vec<u32> =
                    (0u32..).zip(&patterns).filter(|(_, p)| naive_match(p, key)).map(|(d, _)| d).collect();
                prop_assert_eq!(routed(&trie, key), expected, "key {:?}", key);
            }
            for (dest, pattern) in (0u32..).zip(&patterns).step_by(2) {
                prop_assert!(trie.remove(pattern, &dest));
            }
            trie.check_invariants();
            for key in &keys {
                let expected: Vec<u32> = (0u32..)
                    .zip(&patterns)
                    .filter(|(d, p)| d % 2 == 1 && naive_match(p, key))
                    .map(|(d, _)| d)
                    .collect();
                prop_assert_eq!(routed(&trie, key), expected, "key {:?} after removals", key);
            }
        }
    }
}
