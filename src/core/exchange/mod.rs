//! Exchanges, their bindings and routing (SEMANTICS.md §2).
//!
//! The kinds, one file each:
//! - [`direct`]: binding key equal to the routing key;
//! - [`fanout`]: every binding;
//! - [`topic`]: dot-separated words with `*` and `#` wildcards, matched through a trie;
//! - [`headers`]: the message headers against the binding arguments (`x-match`).
//!
//! The default exchange is a direct exchange whose bindings are implicit (every queue by name);
//! the topology routes it without an index.

pub mod direct;
pub mod fanout;
pub mod headers;
pub mod topic;

use std::sync::Arc;

use crate::core::channel::QueueId;
use crate::types::FieldTable;

/// The kind of an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Every binding.
    Fanout,
    /// Wildcard patterns over dot-separated words.
    Topic,
    /// Header values against binding arguments.
    Headers,
}

impl ExchangeKind {
    /// Parses the AMQP type name (`direct`, `fanout`, `topic`, `headers`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "direct" => Some(Self::Direct),
            "fanout" => Some(Self::Fanout),
            "topic" => Some(Self::Topic),
            "headers" => Some(Self::Headers),
            _ => None,
        }
    }

    /// The AMQP type name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// Where a binding leads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// A queue.
    Queue(QueueId),
    /// Another exchange (exchange-to-exchange binding).
    Exchange(Arc<str>),
}

/// One binding from an exchange. Identity is all three fields (§2.3).
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    /// Where it leads.
    pub destination: Destination,
    /// The binding key.
    pub routing_key: String,
    /// The binding arguments.
    pub arguments: FieldTable,
}

/// An exchange's definition and bindings.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// Its name.
    pub name: Arc<str>,
    /// Its kind.
    pub kind: ExchangeKind,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding as source goes.
    pub auto_delete: bool,
    /// Not publishable directly.
    pub internal: bool,
    /// Declared arguments (`alternate-exchange`).
    pub arguments: FieldTable,
    bindings: Vec<Binding>,
    index: Index,
}

#[derive(Clone, Debug)]
enum Index {
    Direct(direct::DirectIndex),
    Fanout(fanout::FanoutIndex),
    Topic(topic::TopicTrie<Destination>),
    Headers(Vec<(headers::XMatch, usize)>),
}

impl Exchange {
    /// A new exchange without bindings.
    pub fn new(
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        let index = match kind {
            ExchangeKind::Direct => Index::Direct(Default::default()),
            ExchangeKind::Fanout => Index::Fanout(Default::default()),
            ExchangeKind::Topic => Index::Topic(Default::default()),
            ExchangeKind::Headers => Index::Headers(Vec::new()),
        };
        Self {
            name: name.into(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            bindings: Vec::new(),
            index,
        }
    }

    /// The exchange's bindings, in the order they were made.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// The alternate exchange named in the arguments.
    pub fn alternate_exchange(&self) -> Option<&str> {
        self.arguments
            .get("alternate-exchange")
            .and_then(|v| v.as_str())
    }

    /// Checks a binding for this exchange's kind: `Err` with the 406 explanation.
    ///
    /// The topic limit of two `#` words ([`topic::hash_wildcards`]) is a RabbitMQ 4.3.5 rule and
    /// not applied under the default 4.2 profile; the trie's matching cost is bounded anyway.
    pub fn validate_binding(
        &self,
        _routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), String> {
        match self.kind {
            ExchangeKind::Headers => headers::parse_x_match(arguments).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Adds a binding (validated by the caller); false if an identical one exists.
    pub fn bind(&mut self, binding: Binding) -> bool {
        if self.bindings.contains(&binding) {
            return false;
        }
        let dest = binding.destination.clone();
        // The index holds each (key, destination) once; bindings differing only in arguments
        // share it, except for headers where the arguments are the match.
        let shared = self.kind != ExchangeKind::Headers
            && self
                .bindings
                .iter()
                .any(|b| b.destination == dest && self.same_index_key(b, &binding));
        match &mut self.index {
            Index::Direct(ix) if !shared => ix.insert(&binding.routing_key, dest),
            Index::Fanout(ix) if !shared => ix.insert(dest),
            Index::Topic(ix) if !shared => {
                ix.insert(&binding.routing_key, dest);
            }
            Index::Headers(ix) => {
                let x = headers::parse_x_match(&binding.arguments).unwrap_or(headers::XMatch::All);
                ix.push((x, self.bindings.len()));
            }
            _ => {}
        }
        self.bindings.push(binding);
        true
    }

    /// Removes a binding; false if there was none.
    pub fn unbind(&mut self, binding: &Binding) -> bool {
        let Some(pos) = self.bindings.iter().position(|b| b == binding) else {
            return false;
        };
        self.bindings.remove(pos);
        self.reindex_after_removal(binding, pos);
        true
    }

    /// Removes every binding to `dest`; returns how many.
    pub fn unbind_destination(&mut self, dest: &Destination) -> usize {
        let gone: Vec<Binding> = self
            .bindings
            .iter()
            .filter(|b| &b.destination == dest)
            .cloned()
            .collect();
        for b in &gone {
            self.unbind(b);
        }
        gone.len()
    }

    /// Calls `out` for every destination the exchange's own bindings give for one routing key
    /// (duplicates possible; callers dedupe).
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut impl FnMut(&Destination),
    ) {
        match &self.index {
            Index::Direct(ix) => ix.route(routing_key, out),
            Index::Fanout(ix) => ix.route(out),
            Index::Topic(ix) => ix.route(routing_key, out),
            Index::Headers(ix) => {
                for &(x, i) in ix {
                    let b = &self.bindings[i];
                    if headers::headers_match(x, &b.arguments, headers) {
                        out(&b.destination);
                    }
                }
            }
        }
    }

    fn same_index_key(&self, a: &Binding, b: &Binding) -> bool {
        self.kind == ExchangeKind::Fanout || a.routing_key == b.routing_key
    }

    fn reindex_after_removal(&mut self, removed: &Binding, pos: usize) {
        let dest = &removed.destination;
        let still_shared = self.kind != ExchangeKind::Headers
            && self
                .bindings
                .iter()
                .any(|b| &b.destination == dest && self.same_index_key(b, removed));
        match &mut self.index {
            Index::Direct(ix) if !still_shared => ix.remove(&removed.routing_key, dest),
            Index::Fanout(ix) if !still_shared => ix.remove(dest),
            Index::Topic(ix) if !still_shared => {
                ix.remove(&removed.routing_key, dest);
            }
            Index::Headers(ix) => {
                ix.retain(|&(_, i)| i != pos);
                for (_, i) in ix.iter_mut() {
                    if *i > pos {
                        *i -= 1;
                    }
                }
            }
            _ => {}
        }
    }
}
