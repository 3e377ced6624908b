//! Topic exchange matching: a word trie of binding patterns, and a naive reference matcher.
//!
//! Rules: binding patterns and routing keys are split on `.` into words; `""`
//! is zero words, `"a..b"` is `["a", "", "b"]` and `"."` is `["", ""]`. A literal pattern word
//! matches an equal key word (the empty word matches the empty word), `*` matches exactly one
//! word (an empty word counts) and `#` matches zero or more words. Only a whole word equal to `*`
//! or `#` is a wildcard (`a*` and `#b` are literals). Matching is anchored at both ends.
//!
//! [`TopicTrie`] is what the broker routes with; [`naive_match`] restates the rules as directly as
//! possible and serves as the oracle for unit tests, property tests and the fuzz target
//! ([`crate::fuzzing::topic_match`]).
//!
//! Both are bounded: neither recurses, and routing keeps each trie node at most once per key
//! word, with a run of `#` words as one node, so `#.#.#.#.#` against a 256-word key costs as
//! much as `#`, and any pattern costs at most nodes × words steps, never an exponential number.
//! The trie is persistent (see [`TopicTrie`]): topology snapshots share it, and a binding
//! change copies only its pattern's path.

use std::fmt;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::core::shared::{OrdMap, SharedSet};

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
/// RabbitMQ 4.3.5+ rejects patterns with more than 2; coney follows the 4.2
/// rules by default and accepts any number, as the trie does.
pub fn hash_wildcards(pattern: &str) -> usize {
    words(pattern).filter(|w| *w == "#").count()
}

/// The words of a pattern or routing key: `""` has none, otherwise split on every `.`.
fn words(s: &str) -> impl Iterator<Item = &str> {
    (!s.is_empty()).then(|| s.split('.')).into_iter().flatten()
}

/// One edge of the trie, as a pattern spells it: a literal word, `*`, or a run of consecutive
/// `#` words (at least one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Edge<'a> {
    Literal(&'a str),
    Star,
    Hashes(usize),
}

/// The edges of a pattern: its words, with each run of `#` words as one edge.
fn edges(pattern: &str) -> Vec<Edge<'_>> {
    let mut out = Vec::new();
    for word in words(pattern) {
        match (word, out.last_mut()) {
            ("#", Some(Edge::Hashes(run))) => *run += 1,
            ("#", _) => out.push(Edge::Hashes(1)),
            ("*", _) => out.push(Edge::Star),
            (literal, _) => out.push(Edge::Literal(literal)),
        }
    }
    out
}

/// A set of topic binding patterns, each with its destinations, routed by walking the key's
/// words through a trie.
///
/// A pattern is a path from the root: one edge per literal word (keyed by its text) or `*`, and
/// one edge per run of consecutive `#` words, keyed by the run's length. Runs are one edge
/// because `#.#` matches what `#` matches: a run of any length is a single routing state, so a
/// pattern of 128 `#` costs no more to route than `#`, while the trie still tells `#` and `#.#`
/// apart (they are different bindings). Destinations sit in a sorted set at the node where
/// their pattern ends, so iteration order is deterministic.
///
/// The trie is persistent: nodes are shared (`Arc`) and copied on write, so a clone is O(1)
/// and an insert or remove copies only the nodes on its pattern's path. The runtime keeps old
/// versions alive in topology snapshots that publishers are still reading. [`TopicTrie::remove`]
/// prunes nodes that no longer lead to any destination.
#[derive(Clone)]
pub struct TopicTrie<D: Clone + Ord> {
    root: Arc<Node<D>>,
    /// Number of (pattern, destination) pairs.
    len: usize,
    /// The id the next new node gets.
    next_id: u64,
}

/// One trie node: the pattern prefix spelled by the path from the root.
#[derive(Clone)]
struct Node<D: Clone + Ord> {
    /// Unique within one version of the trie (a node copied on write keeps its id): routing
    /// deduplicates and orders its states by it.
    id: u64,
    /// Children by literal word (never `"*"` or `"#"`).
    literals: OrdMap<Arc<str>, Arc<Node<D>>>,
    /// Child for the `*` word.
    star: Option<Arc<Node<D>>>,
    /// Children for runs of `#`, sorted by run length (a node rarely has more than one, and a
    /// 255-byte binding key allows at most 128 lengths). Empty on a node whose own edge is a
    /// run: runs are maximal.
    hashes: SmallVec<[(usize, Arc<Node<D>>); 1]>,
    /// Whether the edge into this node is a run of `#`: such a node may consume further key
    /// words itself.
    is_hash: bool,
    /// Destinations of the pattern that ends here.
    dests: SharedSet<D>,
}

impl<D: Clone + Ord> Node<D> {
    fn new(id: u64, is_hash: bool) -> Self {
        Node {
            id,
            literals: OrdMap::new(),
            star: None,
            hashes: SmallVec::new(),
            is_hash,
            dests: SharedSet::new(),
        }
    }

    fn child_count(&self) -> usize {
        self.literals.len() + usize::from(self.star.is_some()) + self.hashes.len()
    }

    /// Whether the node leads nowhere: no destinations and no children, so it can be pruned.
    fn is_dead(&self) -> bool {
        self.dests.is_empty() && self.child_count() == 0
    }

    fn child(&self, edge: Edge<'_>) -> Option<&Arc<Node<D>>> {
        match edge {
            Edge::Literal(word) => self.literals.get(word),
            Edge::Star => self.star.as_ref(),
            Edge::Hashes(run) => self
                .hashes
                .binary_search_by_key(&run, |(r, _)| *r)
                .ok()
                .map(|at| &self.hashes[at].1),
        }
    }

    /// The child for `edge`, created with id `*next_id` if absent.
    fn child_or_insert(&mut self, edge: Edge<'_>, next_id: &mut u64) -> &mut Arc<Node<D>> {
        let mut fresh = |is_hash| {
            *next_id += 1;
            Arc::new(Node::new(*next_id - 1, is_hash))
        };
        match edge {
            Edge::Literal(word) => {
                if !self.literals.contains_key(word) {
                    self.literals.insert(Arc::from(word), fresh(false));
                }
                self.literals
                    .get_mut(word)
                    .expect("the child was inserted above if it was missing")
            }
            Edge::Star => self.star.get_or_insert_with(|| fresh(false)),
            Edge::Hashes(run) => {
                let at = match self.hashes.binary_search_by_key(&run, |(r, _)| *r) {
                    Ok(at) => at,
                    Err(at) => {
                        self.hashes.insert(at, (run, fresh(true)));
                        at
                    }
                };
                &mut self.hashes[at].1
            }
        }
    }

    /// Removes the child for `edge`.
    fn unlink(&mut self, edge: Edge<'_>) {
        match edge {
            Edge::Literal(word) => {
                self.literals.remove(word);
            }
            Edge::Star => self.star = None,
            Edge::Hashes(run) => {
                self.hashes.retain(|(r, _)| *r != run);
            }
        }
    }
}

impl<D: Clone + Ord> Drop for Node<D> {
    /// Drops the subtree without recursion (a pattern may be tens of thousands of words deep):
    /// children this node holds the last reference to are emptied onto a stack first.
    fn drop(&mut self) {
        if self.child_count() == 0 {
            return;
        }
        let mut stack = Vec::new();
        take_children(self, &mut stack);
        while let Some(child) = stack.pop() {
            if let Some(mut node) = Arc::into_inner(child) {
                take_children(&mut node, &mut stack);
            }
        }
    }
}

/// Moves `node`'s children onto `stack`.
fn take_children<D: Clone + Ord>(node: &mut Node<D>, stack: &mut Vec<Arc<Node<D>>>) {
    stack.extend(
        std::mem::take(&mut node.literals)
            .into_iter()
            .map(|(_, c)| c),
    );
    stack.extend(node.star.take());
    stack.extend(node.hashes.drain(..).map(|(_, c)| c));
}

impl<D: Clone + Ord> Default for TopicTrie<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Clone + Ord> fmt::Debug for TopicTrie<D> {
    /// A summary: the trie is deep and shared, so its nodes are not printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicTrie").field("len", &self.len).finish()
    }
}

impl<D: Clone + Ord> TopicTrie<D> {
    /// An empty trie.
    pub fn new() -> Self {
        TopicTrie {
            root: Arc::new(Node::new(0, false)),
            len: 0,
            next_id: 1,
        }
    }

    /// Adds `dest` under `pattern`; returns whether the pair is new (`false` if it was already
    /// present, which leaves the trie unchanged).
    pub fn insert(&mut self, pattern: &str, dest: D) -> bool {
        let edges = edges(pattern);
        if self.find(&edges).is_some_and(|n| n.dests.contains(&dest)) {
            return false; // checked first, so a duplicate copies no shared node
        }
        let mut node = &mut self.root;
        for &edge in &edges {
            node = Arc::make_mut(node).child_or_insert(edge, &mut self.next_id);
        }
        Arc::make_mut(node).dests.insert(dest);
        self.len += 1;
        true
    }

    /// Removes `dest` from `pattern`; returns whether it was present. Nodes left without
    /// destinations or children are pruned.
    pub fn remove(&mut self, pattern: &str, dest: &D) -> bool {
        let edges = edges(pattern);
        let Some(cut) = self.prune_depth(&edges, dest) else {
            return false;
        };
        // Copy the path down to the node that changes: the parent of the highest dead node,
        // or the pattern's end node if none dies.
        let mut node = &mut self.root;
        for &edge in &edges[..cut] {
            node = Arc::make_mut(node).child_or_insert(edge, &mut self.next_id);
        }
        let node = Arc::make_mut(node);
        if cut < edges.len() {
            node.unlink(edges[cut]);
        } else {
            node.dests.remove(dest);
        }
        self.len -= 1;
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
    /// that need each destination once deduplicate. Order: by pattern end node, deterministic
    /// for a given history of inserts and removals.
    ///
    /// This is an NFA walk over the trie (see `Walk` below): each step keeps each node at most
    /// once, so it costs O(a log h) for `a` active nodes of which `h` are runs of `#`, and
    /// routing is polynomial in the patterns and the key however many `#` they hold. Nothing
    /// allocates while few nodes are active.
    pub fn route(&self, key: &str, out: &mut impl FnMut(&D)) {
        let mut walk = Walk::new(&self.root);
        for word in words(key) {
            if walk.is_over() {
                return;
            }
            walk.step(word);
        }
        walk.emit(out);
    }

    /// Checks the trie's structure, panicking on a violation (a bug in this module): node ids
    /// unique and below the counter, no node other than the root dead, the `is_hash` flags
    /// match the edges, runs of `#` maximal and non-empty, no literal edge spelled `*` or `#`,
    /// and `len` equal to the number of stored destinations. Tests and fuzz targets call it
    /// after every change.
    pub fn check_invariants(&self) {
        let mut ids = std::collections::BTreeSet::new();
        let mut stack: Vec<(&Node<D>, bool)> = vec![(&self.root, true)];
        let mut dests = 0;
        while let Some((node, is_root)) = stack.pop() {
            assert!(ids.insert(node.id), "topic trie: node id {} twice", node.id);
            assert!(
                node.id < self.next_id,
                "topic trie: node id {} not yet issued",
                node.id
            );
            assert!(
                is_root || !node.is_dead(),
                "topic trie: unpruned dead node {}",
                node.id
            );
            assert!(!is_root || !node.is_hash, "topic trie: root marked `#`");
            dests += node.dests.len();
            assert!(!node.literals.contains_key("*") && !node.literals.contains_key("#"));
            assert!(
                !node.is_hash || node.hashes.is_empty(),
                "topic trie: run of `#` at node {} not maximal",
                node.id
            );
            assert!(
                node.hashes.first().is_none_or(|(run, _)| *run > 0)
                    && node.hashes.windows(2).all(|w| w[0].0 < w[1].0),
                "topic trie: runs of `#` at node {} empty or unsorted",
                node.id
            );
            for child in node.literals.values().chain(node.star.as_ref()) {
                assert!(!child.is_hash, "topic trie: is_hash of node {}", child.id);
                stack.push((child, false));
            }
            for (_, child) in &node.hashes {
                assert!(child.is_hash, "topic trie: is_hash of node {}", child.id);
                stack.push((child, false));
            }
        }
        assert_eq!(
            dests, self.len,
            "topic trie: len out of step with stored destinations"
        );
    }

    /// The node where the pattern with `edges` ends, if the trie holds that path.
    fn find(&self, edges: &[Edge<'_>]) -> Option<&Node<D>> {
        let mut node = &*self.root;
        for &edge in edges {
            node = node.child(edge)?;
        }
        Some(node)
    }

    /// For removing `dest` from the pattern with `edges`: `None` if the pair is absent, else how
    /// many edges lead to the node that changes. That is `edges.len()` when only the end node's
    /// destinations change; otherwise it is `i` such that the node after edge `i` and all below
    /// it on the path die (no destinations left, no other children), so edge `i` is unlinked.
    /// The root never dies.
    fn prune_depth(&self, edges: &[Edge<'_>], dest: &D) -> Option<usize> {
        let mut path: Vec<&Node<D>> = Vec::with_capacity(edges.len() + 1);
        let mut node = &*self.root;
        path.push(node);
        for &edge in edges {
            node = node.child(edge)?;
            path.push(node);
        }
        if !node.dests.contains(dest) {
            return None;
        }
        // The end node dies if `dest` was its only destination and it has no children; a node
        // above dies if it has no destinations and its only child is the dying one.
        let mut cut = edges.len();
        let end_dies = !edges.is_empty() && node.dests.len() == 1 && node.child_count() == 0;
        if end_dies {
            cut -= 1;
            while cut > 0 {
                let above = path[cut];
                if above.dests.is_empty() && above.child_count() == 1 {
                    cut -= 1;
                } else {
                    break;
                }
            }
        }
        Some(cut)
    }
}

/// The state of [`TopicTrie::route`]: the nodes whose pattern prefix matches the key words
/// seen so far, kept in two parts so that neither needs deduplicating by sorting.
///
/// - A run of `#` takes every further word, so once reached it stays active to the end: runs
///   are only ever added, to `runs`, kept sorted by id; a run is added when its parent is
///   entered, unless it is already there (a binary search).
/// - Any other node is entered from its one parent through its one edge, and each active node
///   is held once, so `nodes` never holds a node twice.
///
/// Entering a node also enters its runs, since a run may take zero words; runs are maximal, so
/// a run has no runs below it.
struct Walk<'a, D: Clone + Ord> {
    /// Active nodes other than runs of `#`.
    nodes: SmallVec<[&'a Node<D>; 8]>,
    /// `nodes` for the next word, built during a step (kept to reuse its buffer).
    next: SmallVec<[&'a Node<D>; 8]>,
    /// Active runs of `#` with their ids, sorted by id.
    runs: SmallVec<[(u64, &'a Node<D>); 8]>,
    /// Runs reached during the current step: they take words from the next one on.
    fresh: SmallVec<[(u64, &'a Node<D>); 8]>,
}

impl<'a, D: Clone + Ord> Walk<'a, D> {
    /// The walk before any key word: the root and its runs.
    fn new(root: &'a Node<D>) -> Self {
        let mut walk = Walk {
            nodes: SmallVec::new(),
            next: SmallVec::new(),
            runs: SmallVec::new(),
            fresh: SmallVec::new(),
        };
        enter(root, &mut walk.nodes, &mut walk.fresh, &walk.runs);
        walk.settle();
        walk
    }

    /// Whether no pattern can match any more.
    fn is_over(&self) -> bool {
        self.nodes.is_empty() && self.runs.is_empty()
    }

    /// Takes one key word: every active node (runs included) moves along its edge for `word`
    /// and its `*` edge; runs also stay where they are.
    fn step(&mut self, word: &str) {
        let Walk {
            nodes,
            next,
            runs,
            fresh,
        } = self;
        next.clear();
        for node in nodes.iter().chain(runs.iter().map(|(_, run)| run)) {
            if let Some(child) = node.literals.get(word) {
                enter(child, next, fresh, runs);
            }
            if let Some(star) = &node.star {
                enter(star, next, fresh, runs);
            }
        }
        std::mem::swap(nodes, next);
        self.settle();
    }

    /// Adds the runs reached during the step to `runs`.
    fn settle(&mut self) {
        if self.fresh.is_empty() {
            return;
        }
        self.runs.extend(self.fresh.drain(..));
        self.runs.sort_unstable_by_key(|(id, _)| *id);
        self.runs.dedup_by_key(|(id, _)| *id);
    }

    /// Passes the destinations of every active node to `out`.
    fn emit(&self, out: &mut impl FnMut(&D)) {
        let runs = self.runs.iter().map(|(_, run)| run);
        for node in self.nodes.iter().chain(runs) {
            node.dests.for_each(&mut *out);
        }
    }
}

/// Makes `node` (never a run) active for the next word in `next`, and its runs not yet in
/// `runs` in `fresh`.
fn enter<'a, D: Clone + Ord>(
    node: &'a Node<D>,
    next: &mut SmallVec<[&'a Node<D>; 8]>,
    fresh: &mut SmallVec<[(u64, &'a Node<D>); 8]>,
    runs: &[(u64, &'a Node<D>)],
) {
    next.push(node);
    for (_, run) in &node.hashes {
        if runs.binary_search_by_key(&run.id, |(id, _)| *id).is_err() {
            fresh.push((run.id, run));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Routing keys of the reference matrix (from routing_SUITE.erl).
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

    /// RabbitMQ's edge rules of topic matching and the word-splitting rules, as (pattern, key, matches).
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

    impl<D: Clone + Ord> TopicTrie<D> {
        /// The nodes reachable from the root, the root included.
        fn node_count(&self) -> usize {
            let mut stack = vec![&*self.root];
            let mut n = 0;
            while let Some(node) = stack.pop() {
                n += 1;
                let children = node.literals.values().chain(&node.star);
                let runs = node.hashes.iter().map(|(_, c)| c);
                stack.extend(children.chain(runs).map(|c| &**c));
            }
            n
        }
    }

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
        assert_eq!(trie.node_count(), 1, "every node but the root is pruned");
        trie.insert("x.y.z", 1);
        trie.check_invariants();
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
        let snapshot = trie.clone();
        assert!(trie.remove(&pattern, &1));
        trie.check_invariants();
        assert_eq!(trie.node_count(), 1);
        assert_eq!(routed(&snapshot, &pattern), vec![1]);
        drop(snapshot); // the last reference to the long chain: dropped without recursion
    }

    #[test]
    fn runs_of_hashes_are_one_edge_but_distinct_patterns() {
        let mut trie = TopicTrie::new();
        assert!(trie.insert("#", 1u32));
        assert!(trie.insert("#.#", 1));
        assert!(trie.insert("a.#.#.#", 2));
        assert!(trie.insert("a.#", 2));
        assert!(!trie.insert("#.#", 1));
        trie.check_invariants();
        // root, `#`, `#.#` (run of 2), `a`, `a.#`, `a.#.#.#` (run of 3).
        assert_eq!(trie.node_count(), 6);
        assert_eq!(routed(&trie, "a.b"), vec![1, 1, 2, 2]);
        assert!(trie.remove("#.#", &1));
        assert!(!trie.remove("#.#", &1));
        trie.check_invariants();
        assert_eq!(routed(&trie, "a"), vec![1, 2, 2]);
        assert!(trie.remove("a.#.#.#", &2));
        trie.check_invariants();
        assert_eq!(routed(&trie, "a"), vec![1, 2]);
        assert_eq!(trie.node_count(), 4);
    }

    #[test]
    fn many_hashes_with_words_between_match_as_the_naive_matcher() {
        // 64 `#` with a word between each: many states, each kept once per key word.
        let pattern = (0..127)
            .map(|i| if i % 2 == 0 { "#" } else { "k" })
            .collect::<Vec<_>>()
            .join(".");
        let mut trie = TopicTrie::new();
        trie.insert(&pattern, 1u32);
        for words in [62, 63, 64, 128] {
            let key = vec!["k"; words].join(".");
            let want: &[u32] = if naive_match(&pattern, &key) {
                &[1]
            } else {
                &[]
            };
            assert_eq!(routed(&trie, &key), want, "{words} words");
        }
        assert!(naive_match(&pattern, &vec!["k"; 63].join(".")));
        assert!(!naive_match(&pattern, &vec!["k"; 62].join(".")));
    }

    #[test]
    fn a_change_copies_only_its_pattern_path() {
        let mut trie = TopicTrie::new();
        for i in 0..100u32 {
            trie.insert(&format!("a{i}.b.c"), i);
        }
        let before = trie.clone();
        trie.insert("a7.b.x", 1000);
        trie.remove("a9.b.c", &9);
        trie.check_invariants();
        before.check_invariants();
        let shared =
            |word: &str| Arc::ptr_eq(&trie.root.literals[word], &before.root.literals[word]);
        assert!(!shared("a7"), "the changed path is copied");
        assert!(shared("a8"), "untouched subtrees are the same nodes");
        assert!(!trie.root.literals.contains_key("a9"));
        assert!(before.root.literals.contains_key("a9"));
        assert_eq!(routed(&before, "a9.b.c"), vec![9]);
        assert_eq!(routed(&before, "a7.b.x"), Vec::<u32>::new());
        assert_eq!(routed(&trie, "a7.b.x"), vec![1000]);
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
