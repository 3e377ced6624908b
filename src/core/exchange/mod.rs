//! Exchanges, their bindings and routing.
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

use smallvec::SmallVec;

use crate::core::channel::QueueId;
use crate::core::shared::OrdMap;
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

/// One binding from an exchange. Identity is all three fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    /// Where it leads.
    pub destination: Destination,
    /// The binding key.
    pub routing_key: String,
    /// The binding arguments.
    pub arguments: FieldTable,
}

/// A binding as its exchange holds it.
#[derive(Clone, Copy, Debug)]
pub struct BindingRef<'a> {
    /// Where it leads.
    pub destination: &'a Destination,
    /// The binding key.
    pub routing_key: &'a Arc<str>,
    /// The binding arguments.
    pub arguments: &'a FieldTable,
}

/// Bindings are kept by (destination, binding key): the bindings to one destination are one
/// range, and those differing only in arguments share an entry.
type BindingKey = (Destination, Arc<str>);

/// The bindings sharing one destination and key, one per argument table (almost always one).
type ArgTables = SmallVec<[Arc<BoundArgs>; 1]>;

/// One binding's arguments, with the headers match mode read from them once.
#[derive(Debug)]
struct BoundArgs {
    arguments: FieldTable,
    /// [`headers::XMatch::All`] for exchanges of other kinds (never read).
    x_match: headers::XMatch,
}

/// An exchange's definition and bindings.
///
/// The bindings and the routing index are persistent collections (see
/// [`crate::core::shared`]): the topology snapshots share an exchange, and a bind or unbind
/// copies O(log n) of it, not every binding.
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
    bindings: OrdMap<BindingKey, ArgTables>,
    /// The number of bindings (argument tables in `bindings`).
    binding_count: usize,
    index: Index,
}

/// How an exchange finds its destinations for a routing key. Each holds every (key,
/// destination) pair of the bindings once (fanout: every destination once); headers exchanges
/// match every binding's arguments, so they route over the bindings themselves.
#[derive(Clone, Debug)]
enum Index {
    Direct(direct::DirectIndex),
    Fanout(fanout::FanoutIndex),
    Topic(topic::TopicTrie<Destination>),
    Headers,
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
            ExchangeKind::Headers => Index::Headers,
        };
        Self {
            name: name.into(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            bindings: OrdMap::new(),
            binding_count: 0,
            index,
        }
    }

    /// The exchange's bindings, by destination, then binding key.
    pub fn bindings(&self) -> impl Iterator<Item = BindingRef<'_>> {
        self.bindings.iter().flat_map(binding_refs)
    }

    /// The bindings to `dest`, by binding key. O(log n) to find the first.
    pub fn bindings_to<'a>(
        &'a self,
        dest: &'a Destination,
    ) -> impl Iterator<Item = BindingRef<'a>> {
        let first: BindingKey = (dest.clone(), Arc::from(""));
        self.bindings
            .range(first..)
            .take_while(move |((d, _), _)| d == dest)
            .flat_map(binding_refs)
    }

    /// Whether any binding leads to `dest`.
    pub fn has_bindings_to(&self, dest: &Destination) -> bool {
        self.bindings_to(dest).next().is_some()
    }

    /// The number of bindings.
    pub fn binding_count(&self) -> usize {
        self.binding_count
    }

    /// Whether the exchange holds `binding`.
    pub fn contains(&self, binding: &Binding) -> bool {
        self.bindings
            .get(&binding_key(binding))
            .is_some_and(|tables| tables.iter().any(|a| a.arguments == binding.arguments))
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
        let key = binding_key(&binding);
        let x_match = match self.kind {
            ExchangeKind::Headers => {
                headers::parse_x_match(&binding.arguments).unwrap_or(headers::XMatch::All)
            }
            _ => headers::XMatch::All,
        };
        let bound = Arc::new(BoundArgs {
            arguments: binding.arguments,
            x_match,
        });
        if let Some(tables) = self.bindings.get(&key) {
            // Same destination and key: the index entry is shared, only the arguments differ.
            if tables.iter().any(|a| a.arguments == bound.arguments) {
                return false;
            }
            self.bindings
                .get_mut(&key)
                .expect("the entry was found just above")
                .push(bound);
        } else {
            let first_to_destination = !self.has_bindings_to(&key.0);
            match &mut self.index {
                Index::Direct(ix) => ix.insert(&key.1, key.0.clone()),
                Index::Topic(ix) => {
                    ix.insert(&key.1, key.0.clone());
                }
                Index::Fanout(ix) if first_to_destination => ix.insert(key.0.clone()),
                Index::Fanout(_) | Index::Headers => {}
            }
            let mut tables = ArgTables::new();
            tables.push(bound);
            self.bindings.insert(key, tables);
        }
        self.binding_count += 1;
        true
    }

    /// Removes a binding; false if there was none.
    pub fn unbind(&mut self, binding: &Binding) -> bool {
        let key = binding_key(binding);
        let Some(tables) = self.bindings.get(&key) else {
            return false;
        };
        let Some(at) = tables.iter().position(|a| a.arguments == binding.arguments) else {
            return false;
        };
        if tables.len() > 1 {
            self.bindings
                .get_mut(&key)
                .expect("the entry was found just above")
                .remove(at);
        } else {
            self.bindings.remove(&key);
            self.unindex(&key);
        }
        self.binding_count -= 1;
        true
    }

    /// Removes every binding to `dest`, calling `removed` for each first; returns how many.
    /// O(k log n) for k bindings to `dest`.
    pub fn unbind_destination(
        &mut self,
        dest: &Destination,
        mut removed: impl FnMut(BindingRef<'_>),
    ) -> usize {
        let first: BindingKey = (dest.clone(), Arc::from(""));
        let gone: Vec<(BindingKey, ArgTables)> = self
            .bindings
            .range(first..)
            .take_while(|((d, _), _)| d == dest)
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        let mut count = 0;
        for entry in &gone {
            binding_refs((&entry.0, &entry.1)).for_each(&mut removed);
            count += entry.1.len();
            self.bindings.remove(&entry.0);
            self.unindex(&entry.0);
        }
        self.binding_count -= count;
        count
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
            Index::Headers => {
                for ((dest, _), tables) in &self.bindings {
                    let matches = |a: &Arc<BoundArgs>| {
                        headers::headers_match(a.x_match, &a.arguments, headers)
                    };
                    if tables.iter().any(matches) {
                        out(dest);
                    }
                }
            }
        }
    }

    /// Checks that the binding count and the routing index agree with the bindings.
    pub fn check_invariants(&self) -> Result<(), String> {
        let counted: usize = self.bindings.values().map(|t| t.len()).sum();
        if counted != self.binding_count || self.bindings.values().any(|t| t.is_empty()) {
            return Err(format!(
                "exchange '{}': {counted} bindings held, {} counted",
                self.name, self.binding_count
            ));
        }
        let (indexed, expected) = match &self.index {
            Index::Direct(ix) => (ix.len(), self.bindings.len()),
            Index::Topic(ix) => {
                ix.check_invariants();
                (ix.len(), self.bindings.len())
            }
            Index::Fanout(ix) => {
                let mut dests: Vec<&Destination> = self.bindings.keys().map(|(d, _)| d).collect();
                dests.dedup();
                (ix.len(), dests.len())
            }
            Index::Headers => (0, 0),
        };
        if indexed != expected {
            return Err(format!(
                "exchange '{}': index holds {indexed} entries for {expected} (key, destination) pairs",
                self.name
            ));
        }
        Ok(())
    }

    /// Drops `key`'s routing entry (its last binding went).
    fn unindex(&mut self, key: &BindingKey) {
        let (dest, routing_key) = key;
        let last_to_destination =
            matches!(self.index, Index::Fanout(_)) && !self.has_bindings_to(dest);
        match &mut self.index {
            Index::Direct(ix) => ix.remove(routing_key, dest),
            Index::Topic(ix) => {
                ix.remove(routing_key, dest);
            }
            Index::Fanout(ix) if last_to_destination => ix.remove(dest),
            Index::Fanout(_) | Index::Headers => {}
        }
    }
}

fn binding_key(binding: &Binding) -> BindingKey {
    (
        binding.destination.clone(),
        Arc::from(binding.routing_key.as_str()),
    )
}

/// The bindings of one (destination, key) entry.
fn binding_refs<'a>(
    (key, tables): (&'a BindingKey, &'a ArgTables),
) -> impl Iterator<Item = BindingRef<'a>> {
    tables.iter().map(move |a| BindingRef {
        destination: &key.0,
        routing_key: &key.1,
        arguments: &a.arguments,
    })
}
