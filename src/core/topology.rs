//! Exchanges, queue definitions and bindings: the declare / bind / delete rules of RabbitMQ
//! 4.2 and routing. Pure: no locks, the runtime publishes snapshots of it.
//!
//! # Costs
//! The runtime clones the topology for every change and publishes the clone while publishers
//! still route through the old one. Every collection here is persistent (see
//! [`crate::core::shared`]), so that clone is O(1), and declare, bind, unbind and delete cost
//! O(log n) in the number of queues and bindings (deleting a queue or exchange also pays for
//! each binding it takes with it). Two indexes keep deletes from scanning: the exchanges that
//! bind to each destination, and the exclusive queues of each connection.
//!
//! # Durable changes
//! Each change to a durable definition is recorded as a [`DurableChange`] as it is made, and
//! the runtime takes them with [`Topology::poll_durable_changes`] to write to the store: the
//! records of a change come from the change itself, never from comparing two topologies.
//!
//! # Invariants (checked by [`Topology::check_invariants`])
//! - every binding's destination exists (queue id or exchange name);
//! - the pre-declared exchanges exist;
//! - queue ids are unique and below the id counter;
//! - the by-id, exclusive-owner and binding-source indexes agree with the queues and bindings.

use smallvec::SmallVec;
use std::sync::Arc;

use crate::core::channel::QueueId;
use crate::core::exchange::{Binding, BindingRef, Destination, Exchange, ExchangeKind};
use crate::core::shared::{Map, OrdSet, SharedSet};
use crate::error::{AmqpError, ReplyCode};
use crate::types::{ExchangeDeclareOptions, FieldTable, FieldValue, QueueDeclareOptions};

/// Identifies a connection (owner of exclusive queues).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// A queue's definition.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueMeta {
    /// Its id.
    pub id: QueueId,
    /// Its name.
    pub name: Arc<str>,
    /// Survives a restart (never for exclusive queues).
    pub durable: bool,
    /// The owning connection of an exclusive queue.
    pub exclusive_owner: Option<ConnectionId>,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declared arguments.
    pub arguments: FieldTable,
}

/// Result of a queue declaration.
#[derive(Clone, Debug)]
pub struct QueueDeclared {
    /// The queue (new or existing).
    pub meta: Arc<QueueMeta>,
    /// Whether this call created it.
    pub created: bool,
}

/// The queues a publish routes to (rarely more than a few: kept on the stack).
pub type Targets = SmallVec<[QueueId; 4]>;

/// Names of the exchanges every broker starts with, and their kinds.
pub const PREDECLARED: [(&str, ExchangeKind); 7] = [
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    ("amq.rabbitmq.trace", ExchangeKind::Topic),
];

/// Classic-queue argument keys compared on redeclare.
const CLASSIC_KNOWN_ARGS: [&str; 14] = [
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-version",
    "x-single-active-consumer",
    "x-queue-type",
    "x-queue-master-locator",
    "x-queue-leader-locator",
];

/// Arguments a quorum queue takes (RabbitMQ 4.x `rabbit_quorum_queue:capabilities/0`).
const QUORUM_KNOWN_ARGS: [&str; 15] = [
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-overflow",
    "x-single-active-consumer",
    "x-queue-type",
    "x-quorum-initial-group-size",
    "x-delivery-limit",
    "x-message-ttl",
    "x-queue-leader-locator",
];

/// Arguments that belong to other queue types only: 406 on a classic queue.
const OTHER_TYPE_ARGS: [&str; 6] = [
    "x-delivery-limit",
    "x-dead-letter-strategy",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-quorum-initial-group-size",
    "x-max-age",
];

/// Ten years in milliseconds: the largest TTL RabbitMQ accepts.
pub const TTL_MAX_MS: i64 = 315_360_000_000;

/// A change to the durable definitions, for the store; taken with
/// [`Topology::poll_durable_changes`].
///
/// Durable are: durable exchanges (the pre-declared ones always exist and are never recorded),
/// durable queues (never exclusive ones), and bindings whose source and destination are both
/// durable. Changes come in the order they were made; a deleted queue or exchange is preceded
/// by the removal of each durable binding it took with it.
#[derive(Clone, Debug)]
pub enum DurableChange {
    /// A durable exchange was declared.
    ExchangeDeclared(Arc<Exchange>),
    /// A durable exchange was deleted.
    ExchangeDeleted(Arc<str>),
    /// A durable queue was declared.
    QueueDeclared(Arc<QueueMeta>),
    /// A durable queue was deleted (its messages go with it).
    QueueDeleted(Arc<QueueMeta>),
    /// A binding between durable ends was made.
    Bound(DurableBinding),
    /// A binding between durable ends was removed.
    Unbound(DurableBinding),
}

/// A binding between durable ends, its destination by name as the store keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct DurableBinding {
    /// The source exchange.
    pub source: Arc<str>,
    /// The destination.
    pub destination: NamedDestination,
    /// The binding key.
    pub routing_key: Arc<str>,
    /// The binding arguments.
    pub arguments: FieldTable,
}

/// A binding's destination by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamedDestination {
    /// A queue.
    Queue(Arc<str>),
    /// An exchange.
    Exchange(Arc<str>),
}

/// The exchanges, queues and bindings of a broker.
#[derive(Clone, Debug)]
pub struct Topology {
    exchanges: Map<Arc<str>, Arc<Exchange>>,
    /// The default exchange, also in `exchanges`: looked up without hashing an empty name.
    default_exchange: Arc<Exchange>,
    queues: Map<Arc<str>, Arc<QueueMeta>>,
    /// The same queues by id.
    queues_by_id: Map<QueueId, Arc<QueueMeta>>,
    /// The exchanges holding at least one binding to each destination, so that deleting a
    /// queue or exchange visits only those.
    sources: Map<Destination, SharedSet<Arc<str>>>,
    /// Exclusive queues by owner, so that closing a connection visits only its own.
    exclusive: OrdSet<(ConnectionId, QueueId)>,
    next_queue_id: u64,
    /// Durable changes not yet polled.
    durable_changes: Vec<DurableChange>,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Topology {
    /// A topology holding only the pre-declared exchanges.
    pub fn new() -> Self {
        let mut exchanges = Map::default();
        for (name, kind) in PREDECLARED {
            let internal = name == "amq.rabbitmq.trace";
            let ex = Exchange::new(name, kind, true, false, internal, FieldTable::new());
            exchanges.insert(Arc::from(name), Arc::new(ex));
        }
        let default_exchange = exchanges[""].clone();
        Self {
            exchanges,
            default_exchange,
            queues: Map::default(),
            queues_by_id: Map::default(),
            sources: Map::default(),
            exclusive: OrdSet::new(),
            next_queue_id: 1,
            durable_changes: Vec::new(),
        }
    }

    /// Whether `self` and `other` hold the very same exchange map (not a copy).
    #[cfg(test)]
    pub(crate) fn shares_exchanges_with(&self, other: &Topology) -> bool {
        self.exchanges.ptr_eq(&other.exchanges)
    }

    /// The durable changes made since the last call, in order (see [`DurableChange`]).
    pub fn poll_durable_changes(&mut self) -> Vec<DurableChange> {
        std::mem::take(&mut self.durable_changes)
    }

    // ---- queries --------------------------------------------------------------------------

    /// The exchange named `name`.
    pub fn exchange(&self, name: &str) -> Option<&Arc<Exchange>> {
        if name.is_empty() {
            return Some(&self.default_exchange);
        }
        self.exchanges.get(name)
    }

    /// The queue named `name`.
    pub fn queue(&self, name: &str) -> Option<&Arc<QueueMeta>> {
        self.queues.get(name)
    }

    /// Every queue, in no particular order.
    pub fn queues(&self) -> impl Iterator<Item = &Arc<QueueMeta>> {
        self.queues.values()
    }

    /// The queue with id `id`.
    pub fn queue_by_id(&self, id: QueueId) -> Option<&Arc<QueueMeta>> {
        self.queues_by_id.get(&id)
    }

    /// The exclusive queues `owner` declared, by id.
    pub fn exclusive_queues(&self, owner: ConnectionId) -> impl Iterator<Item = &Arc<QueueMeta>> {
        self.exclusive
            .range((owner, QueueId(0))..=(owner, QueueId(u64::MAX)))
            .filter_map(|(_, id)| self.queues_by_id.get(id))
    }

    /// Every exchange, in no particular order.
    pub fn exchanges(&self) -> impl Iterator<Item = &Arc<Exchange>> {
        self.exchanges.values()
    }

    /// The queue `name` if `conn` may use it: 404 if missing, 405 if exclusive to another
    /// connection.
    pub fn queue_for(&self, name: &str, conn: ConnectionId) -> Result<&Arc<QueueMeta>, AmqpError> {
        let q = self.queues.get(name).ok_or_else(|| no_queue(name))?;
        if q.exclusive_owner.is_some_and(|o| o != conn) {
            return Err(locked(name));
        }
        Ok(q)
    }

    /// The exchange `name` for publishing: 404 if missing, 403 if internal.
    pub fn exchange_for_publish(&self, name: &str) -> Result<&Arc<Exchange>, AmqpError> {
        let ex = self.exchange(name).ok_or_else(|| no_exchange(name))?;
        if ex.internal {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                format!("cannot publish to internal exchange '{name}' in vhost '/'"),
            ));
        }
        Ok(ex)
    }

    // ---- exchanges ------------------------------------------------------------------------

    /// `exchange.declare`. Returns whether the exchange was created.
    pub fn declare_exchange(
        &mut self,
        name: &str,
        kind: &str,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> Result<bool, AmqpError> {
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if options.passive {
            return self
                .exchanges
                .get(name)
                .map(|_| false)
                .ok_or_else(|| no_exchange(name));
        }
        let kind = ExchangeKind::parse(kind).ok_or_else(|| {
            AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!("unknown exchange type '{kind}'"),
            )
        })?;
        if let Some(existing) = self.exchanges.get(name) {
            return exchange_equivalent(existing, kind, options, &arguments).map(|()| false);
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let ex = Arc::new(Exchange::new(
            name,
            kind,
            options.durable,
            options.auto_delete,
            options.internal,
            arguments,
        ));
        if ex.durable {
            self.durable_changes
                .push(DurableChange::ExchangeDeclared(ex.clone()));
        }
        self.exchanges.insert(ex.name.clone(), ex);
        Ok(true)
    }

    /// `exchange.delete`. Idempotent for missing exchanges. Returns whether one was
    /// deleted.
    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<bool, AmqpError> {
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if name.starts_with("amq.") && PREDECLARED.iter().any(|(n, _)| *n == name) {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                format!("deletion of system exchange '{name}' in vhost '/' not allowed"),
            ));
        }
        let Some(ex) = self.exchanges.get(name) else {
            return Ok(false);
        };
        if if_unused && ex.binding_count() > 0 {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!("exchange '{name}' in vhost '/' in use"),
            ));
        }
        self.remove_exchange(name);
        Ok(true)
    }

    // ---- queues ---------------------------------------------------------------------------

    /// `queue.declare`. `server_name` makes an `amq.gen-` name when `name` is
    /// empty. The caller fills message and consumer counts from the queue's state.
    pub fn declare_queue(
        &mut self,
        name: &str,
        options: QueueDeclareOptions,
        mut arguments: FieldTable,
        conn: ConnectionId,
        server_name: impl FnOnce() -> String,
    ) -> Result<QueueDeclared, AmqpError> {
        if options.passive {
            let meta = self.queue_for(name, conn)?.clone();
            return Ok(QueueDeclared {
                meta,
                created: false,
            });
        }
        let name: Arc<str> = if name.is_empty() {
            Arc::from(server_name())
        } else if name.starts_with("amq.") {
            return Err(AmqpError::new(
                ReplyCode::AccessRefused,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        } else {
            Arc::from(name)
        };
        let durable = options.durable && !options.exclusive;
        if !arguments.contains_key("x-queue-type") {
            arguments.insert("x-queue-type", "classic");
        }
        if let Some(existing) = self.queues.get(&name) {
            queue_equivalent(existing, options, durable, &arguments, conn)?;
            return Ok(QueueDeclared {
                meta: existing.clone(),
                created: false,
            });
        }
        validate_queue_arguments(&name, &arguments)?;
        if arguments.get("x-queue-type").and_then(FieldValue::as_str) == Some("quorum") {
            // Quorum queues are durable, not exclusive, not auto-delete (§"How coney uses").
            let property = if options.auto_delete {
                Some("auto-delete")
            } else if options.exclusive {
                Some("exclusive-owner")
            } else if !options.durable {
                Some("non-durable")
            } else {
                None
            };
            if let Some(property) = property {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!("invalid property '{property}' for queue '{name}' in vhost '/'"),
                ));
            }
        }
        let meta = Arc::new(QueueMeta {
            id: QueueId(self.next_queue_id),
            name: name.clone(),
            durable,
            exclusive_owner: options.exclusive.then_some(conn),
            auto_delete: options.auto_delete,
            arguments,
        });
        self.next_queue_id += 1;
        if meta.durable {
            self.durable_changes
                .push(DurableChange::QueueDeclared(meta.clone()));
        }
        self.insert_queue(meta.clone());
        Ok(QueueDeclared {
            meta,
            created: true,
        })
    }

    /// Puts back a durable queue read from the store, with its id (recovery).
    pub fn restore_queue(
        &mut self,
        id: QueueId,
        name: &str,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Result<Arc<QueueMeta>, AmqpError> {
        if self.queues.contains_key(name) || self.queues_by_id.contains_key(&id) {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!("queue '{name}' (id {}) recovered twice", id.0),
            ));
        }
        validate_queue_arguments(name, &arguments)?;
        let meta = Arc::new(QueueMeta {
            id,
            name: Arc::from(name),
            durable: true,
            exclusive_owner: None,
            auto_delete,
            arguments,
        });
        self.next_queue_id = self.next_queue_id.max(id.0 + 1);
        self.insert_queue(meta.clone());
        Ok(meta)
    }

    /// Removes a queue and every binding to it (auto-deleting exchanges left without
    /// bindings). Returns its definition if it existed.
    pub fn remove_queue(&mut self, name: &str) -> Option<Arc<QueueMeta>> {
        let meta = self.queues.remove(name)?;
        self.queues_by_id.remove(&meta.id);
        if let Some(owner) = meta.exclusive_owner {
            self.exclusive.remove(&(owner, meta.id));
        }
        let named = meta
            .durable
            .then(|| NamedDestination::Queue(meta.name.clone()));
        self.remove_bindings_to(&Destination::Queue(meta.id), named);
        if meta.durable {
            self.durable_changes
                .push(DurableChange::QueueDeleted(meta.clone()));
        }
        Some(meta)
    }

    // ---- bindings -------------------------------------------------------------------------

    /// `queue.bind` / `exchange.bind`. Returns whether a new binding was made.
    pub fn bind(
        &mut self,
        source: &str,
        destination: DestinationName<'_>,
        routing_key: &str,
        arguments: FieldTable,
        conn: ConnectionId,
    ) -> Result<bool, AmqpError> {
        let dest = self.resolve_destination(source, destination, conn)?;
        let ex = self
            .exchanges
            .get(source)
            .ok_or_else(|| no_exchange(source))?;
        ex.validate_binding(routing_key, &arguments)
            .map_err(|e| AmqpError::new(ReplyCode::PreconditionFailed, e))?;
        let binding = Binding {
            destination: dest,
            routing_key: routing_key.to_owned(),
            arguments,
        };
        if ex.contains(&binding) {
            return Ok(false); // checked first, so a duplicate copies nothing
        }
        let durable = self.durable_binding(ex, &binding);
        let first_to_destination = !ex.has_bindings_to(&binding.destination);
        let source = ex.name.clone();
        let dest = binding.destination.clone();
        let ex = self
            .exchanges
            .get_mut(&source)
            .expect("the source exchange was found just above");
        Arc::make_mut(ex).bind(binding);
        if first_to_destination {
            match self.sources.get_mut(&dest) {
                Some(names) => {
                    names.insert(source);
                }
                None => {
                    let mut names = SharedSet::new();
                    names.insert(source);
                    self.sources.insert(dest, names);
                }
            }
        }
        self.durable_changes
            .extend(durable.map(DurableChange::Bound));
        Ok(true)
    }

    /// `queue.unbind` / `exchange.unbind`: idempotent. Returns whether a binding went.
    pub fn unbind(
        &mut self,
        source: &str,
        destination: DestinationName<'_>,
        routing_key: &str,
        arguments: FieldTable,
        conn: ConnectionId,
    ) -> Result<bool, AmqpError> {
        let dest = match self.resolve_destination(source, destination, conn) {
            Ok(d) => d,
            Err(e) if e.code == ReplyCode::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let Some(ex) = self.exchanges.get(source) else {
            return Ok(false);
        };
        let binding = Binding {
            destination: dest,
            routing_key: routing_key.to_owned(),
            arguments,
        };
        if !ex.contains(&binding) {
            return Ok(false);
        }
        let durable = self.durable_binding(ex, &binding);
        let source = ex.name.clone();
        let ex = self
            .exchanges
            .get_mut(&source)
            .expect("the source exchange was found just above");
        let ex = Arc::make_mut(ex);
        ex.unbind(&binding);
        let last_to_destination = !ex.has_bindings_to(&binding.destination);
        if last_to_destination {
            self.forget_source(&binding.destination, &source);
        }
        self.durable_changes
            .extend(durable.map(DurableChange::Unbound));
        self.auto_delete_exchanges(vec![source]);
        Ok(true)
    }

    // ---- routing --------------------------------------------------------------------------

    /// Routes a message published to `exchange` with `routing_keys` (the publish key, then CC
    /// and BCC keys) into `out`: each queue at most once, exchange-to-exchange bindings and
    /// alternate exchanges followed, each exchange visited once.
    pub fn route(
        &self,
        exchange: &Exchange,
        routing_keys: &[&str],
        headers: Option<&FieldTable>,
        out: &mut Targets,
    ) {
        if exchange.name.is_empty() {
            for key in routing_keys {
                if let Some(q) = self.queues.get(*key) {
                    out.push(q.id);
                }
            }
        } else {
            let mut visited: Vec<&str> = Vec::new();
            self.route_from(exchange, routing_keys, headers, out, &mut visited);
        }
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }

    fn route_from<'a>(
        &'a self,
        exchange: &'a Exchange,
        keys: &[&str],
        headers: Option<&FieldTable>,
        out: &mut Targets,
        visited: &mut Vec<&'a str>,
    ) {
        if visited.contains(&&*exchange.name) {
            return;
        }
        visited.push(&exchange.name);
        let mut next: Vec<&'a Exchange> = Vec::new();
        let mut any = false;
        for key in keys {
            exchange.route(key, headers, &mut |d| {
                any = true;
                match d {
                    Destination::Queue(id) => out.push(*id),
                    Destination::Exchange(name) => {
                        if let Some(e) = self.exchanges.get(name) {
                            next.push(e);
                        }
                    }
                }
            });
        }
        if !any
            && let Some(ae) = exchange
                .alternate_exchange()
                .and_then(|n| self.exchanges.get(n))
        {
            next.push(ae);
        }
        for e in next {
            self.route_from(e, keys, headers, out, visited);
        }
    }

    /// Checks the module's invariants.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (name, _) in PREDECLARED {
            if !self.exchanges.contains_key(name) {
                return Err(format!("pre-declared exchange '{name}' missing"));
            }
        }
        self.check_queue_indexes()?;
        let mut sources = 0;
        for (name, ex) in &self.exchanges {
            if **name != *ex.name {
                return Err(format!("exchange '{name}' stored under another name"));
            }
            ex.check_invariants()?;
            let mut last: Option<&Destination> = None;
            for b in ex.bindings() {
                let ok = match b.destination {
                    Destination::Queue(id) => self.queues_by_id.contains_key(id),
                    Destination::Exchange(e) => self.exchanges.contains_key(e),
                };
                if !ok {
                    return Err(format!(
                        "binding from '{name}' to a missing {:?}",
                        b.destination
                    ));
                }
                if last != Some(b.destination) {
                    last = Some(b.destination);
                    sources += 1;
                    if !self
                        .sources
                        .get(b.destination)
                        .is_some_and(|s| s.contains(name))
                    {
                        return Err(format!(
                            "'{name}' binds to {:?} but is not indexed as its source",
                            b.destination
                        ));
                    }
                }
            }
        }
        let indexed: usize = self.sources.values().map(SharedSet::len).sum();
        if indexed != sources {
            return Err(format!(
                "{indexed} (destination, source) pairs indexed, {sources} bound"
            ));
        }
        if !self.durable_changes.is_empty() {
            return Err("durable changes left unpolled".into());
        }
        Ok(())
    }

    /// The by-name, by-id and exclusive-owner views of the queues agree.
    fn check_queue_indexes(&self) -> Result<(), String> {
        if self.queues_by_id.len() != self.queues.len() {
            return Err("queue ids not unique".into());
        }
        let mut exclusive = 0;
        for (name, q) in &self.queues {
            if **name != *q.name || q.id.0 >= self.next_queue_id {
                return Err(format!("queue '{name}' misfiled or from the future"));
            }
            if !self
                .queues_by_id
                .get(&q.id)
                .is_some_and(|by_id| Arc::ptr_eq(by_id, q))
            {
                return Err(format!("queue '{name}' missing from the id index"));
            }
            if let Some(owner) = q.exclusive_owner {
                exclusive += 1;
                if !self.exclusive.contains(&(owner, q.id)) {
                    return Err(format!("exclusive queue '{name}' not indexed by owner"));
                }
            }
        }
        if exclusive != self.exclusive.len() {
            return Err("exclusive-owner index holds queues that are gone".into());
        }
        Ok(())
    }

    // ---- helpers --------------------------------------------------------------------------

    fn resolve_destination(
        &self,
        source: &str,
        destination: DestinationName<'_>,
        conn: ConnectionId,
    ) -> Result<Destination, AmqpError> {
        let dest = match destination {
            DestinationName::Queue(q) => Destination::Queue(self.queue_for(q, conn)?.id),
            DestinationName::Exchange(e) => {
                if e.is_empty() {
                    return Err(default_exchange_refused());
                }
                let ex = self.exchanges.get(e).ok_or_else(|| no_exchange(e))?;
                Destination::Exchange(ex.name.clone())
            }
        };
        if source.is_empty() {
            return Err(default_exchange_refused());
        }
        if !self.exchanges.contains_key(source) {
            return Err(no_exchange(source));
        }
        Ok(dest)
    }

    fn insert_queue(&mut self, meta: Arc<QueueMeta>) {
        if let Some(owner) = meta.exclusive_owner {
            self.exclusive.insert((owner, meta.id));
        }
        self.queues_by_id.insert(meta.id, meta.clone());
        self.queues.insert(meta.name.clone(), meta);
    }

    /// `binding` from `ex` as a store record, if both its ends are durable.
    fn durable_binding(&self, ex: &Exchange, binding: &Binding) -> Option<DurableBinding> {
        if !ex.durable {
            return None;
        }
        let destination = self.durable_destination(&binding.destination)?;
        Some(DurableBinding {
            source: ex.name.clone(),
            destination,
            routing_key: Arc::from(binding.routing_key.as_str()),
            arguments: binding.arguments.clone(),
        })
    }

    /// `dest` by name, if it exists and is durable.
    fn durable_destination(&self, dest: &Destination) -> Option<NamedDestination> {
        match dest {
            Destination::Queue(id) => self
                .queues_by_id
                .get(id)
                .filter(|q| q.durable)
                .map(|q| NamedDestination::Queue(q.name.clone())),
            Destination::Exchange(name) => self
                .exchanges
                .get(name)
                .filter(|e| e.durable)
                .map(|e| NamedDestination::Exchange(e.name.clone())),
        }
    }

    /// Removes exchange `name` with its own bindings and every binding to it.
    fn remove_exchange(&mut self, name: &str) {
        let Some(ex) = self.exchanges.get(name).cloned() else {
            return;
        };
        // Its own bindings go with it; their records are found while it is still there (it
        // may be bound to itself).
        let mut last: Option<&Destination> = None;
        for b in ex.bindings() {
            if ex.durable
                && let Some(destination) = self.durable_destination(b.destination)
            {
                self.durable_changes
                    .push(DurableChange::Unbound(durable_record(
                        &ex.name,
                        destination,
                        b,
                    )));
            }
            if last != Some(b.destination) {
                last = Some(b.destination);
                self.forget_source(b.destination, &ex.name);
            }
        }
        self.exchanges.remove(name);
        let named = ex
            .durable
            .then(|| NamedDestination::Exchange(ex.name.clone()));
        self.remove_bindings_to(&Destination::Exchange(ex.name.clone()), named);
        if ex.durable {
            self.durable_changes
                .push(DurableChange::ExchangeDeleted(ex.name.clone()));
        }
    }

    /// Removes every binding to `dest` (named when it is durable, so that bindings from durable
    /// exchanges are recorded as removed), then auto-deletes the exchanges it left without
    /// bindings. Visits only the exchanges that bind to `dest`.
    fn remove_bindings_to(&mut self, dest: &Destination, named: Option<NamedDestination>) {
        let Some(sources) = self.sources.remove(dest) else {
            return;
        };
        let names: Vec<Arc<str>> = sources.iter().cloned().collect();
        for name in &names {
            let Some(ex) = self.exchanges.get_mut(name) else {
                continue;
            };
            let ex = Arc::make_mut(ex);
            let journal = &mut self.durable_changes;
            let durable = named.as_ref().filter(|_| ex.durable);
            let source = ex.name.clone();
            ex.unbind_destination(dest, |b| {
                if let Some(destination) = durable {
                    journal.push(DurableChange::Unbound(durable_record(
                        &source,
                        destination.clone(),
                        b,
                    )));
                }
            });
        }
        self.auto_delete_exchanges(names);
    }

    /// `name` no longer binds to `dest`.
    fn forget_source(&mut self, dest: &Destination, name: &Arc<str>) {
        if let Some(names) = self.sources.get_mut(dest) {
            names.remove(name);
            if names.is_empty() {
                self.sources.remove(dest);
            }
        }
    }

    /// Deletes auto-delete exchanges among `candidates` that lost their last binding.
    fn auto_delete_exchanges(&mut self, candidates: Vec<Arc<str>>) {
        for name in candidates {
            let gone = self
                .exchanges
                .get(&name)
                .is_some_and(|e| e.auto_delete && e.binding_count() == 0);
            if gone {
                self.remove_exchange(&name);
            }
        }
    }
}

/// The store record of binding `b` from `source` to the durable `destination`.
fn durable_record(
    source: &Arc<str>,
    destination: NamedDestination,
    b: BindingRef<'_>,
) -> DurableBinding {
    DurableBinding {
        source: source.clone(),
        destination,
        routing_key: b.routing_key.clone(),
        arguments: b.arguments.clone(),
    }
}

/// The destination of a bind or unbind, by name.
#[derive(Clone, Copy, Debug)]
pub enum DestinationName<'a> {
    /// A queue.
    Queue(&'a str),
    /// An exchange.
    Exchange(&'a str),
}

fn exchange_equivalent(
    ex: &Exchange,
    kind: ExchangeKind,
    o: ExchangeDeclareOptions,
    args: &FieldTable,
) -> Result<(), AmqpError> {
    let name = &ex.name;
    let differ = |field: &str, received: &str, current: &str| {
        AmqpError::new(
            ReplyCode::PreconditionFailed,
            format!(
                "inequivalent arg '{field}' for exchange '{name}' in vhost '/': received '{received}' but current is '{current}'"
            ),
        )
    };
    if ex.kind != kind {
        return Err(differ("type", kind.name(), ex.kind.name()));
    }
    for (field, received, current) in [
        ("durable", o.durable, ex.durable),
        ("auto_delete", o.auto_delete, ex.auto_delete),
        ("internal", o.internal, ex.internal),
    ] {
        if received != current {
            return Err(differ(field, &received.to_string(), &current.to_string()));
        }
    }
    check_arg_equivalence(
        "alternate-exchange",
        args.get("alternate-exchange"),
        ex.arguments.get("alternate-exchange"),
        &format!("exchange '{name}'"),
    )
}

fn queue_equivalent(
    q: &QueueMeta,
    o: QueueDeclareOptions,
    durable: bool,
    args: &FieldTable,
    conn: ConnectionId,
) -> Result<(), AmqpError> {
    let owner_differs = q.exclusive_owner.is_some_and(|owner| owner != conn);
    if owner_differs || o.exclusive != q.exclusive_owner.is_some() {
        return Err(AmqpError::new(
            ReplyCode::ResourceLocked,
            format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                q.name
            ),
        ));
    }
    let resource = format!("queue '{}'", q.name);
    for (field, received, current) in [
        ("durable", durable, q.durable),
        ("auto_delete", o.auto_delete, q.auto_delete),
    ] {
        if received != current {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!(
                    "inequivalent arg '{field}' for {resource} in vhost '/': received '{received}' but current is '{current}'"
                ),
            ));
        }
    }
    let known: &[&str] =
        if q.arguments.get("x-queue-type").and_then(FieldValue::as_str) == Some("quorum") {
            &QUORUM_KNOWN_ARGS
        } else {
            &CLASSIC_KNOWN_ARGS
        };
    for key in known {
        check_arg_equivalence(key, args.get(key), q.arguments.get(key), &resource)?;
    }
    Ok(())
}

fn check_arg_equivalence(
    key: &str,
    received: Option<&FieldValue>,
    current: Option<&FieldValue>,
    resource: &str,
) -> Result<(), AmqpError> {
    let same = match (received, current) {
        (None, None) => true,
        (Some(a), Some(b)) => a.equivalent(b),
        _ => false,
    };
    if same {
        return Ok(());
    }
    let show = |v: Option<&FieldValue>| match v {
        Some(v) => format!("the value '{}' of type '{}'", v.render(), v.type_name()),
        None => "none".to_owned(),
    };
    Err(AmqpError::new(
        ReplyCode::PreconditionFailed,
        format!(
            "inequivalent arg '{key}' for {resource} in vhost '/': received {} but current is {}",
            show(received),
            show(current)
        ),
    ))
}

/// Validates a new queue's arguments: 406 `invalid arg` on the first bad one.
fn validate_queue_arguments(name: &str, args: &FieldTable) -> Result<(), AmqpError> {
    let invalid = |key: &str, reason: String| {
        AmqpError::new(
            ReplyCode::PreconditionFailed,
            format!("invalid arg '{key}' for queue '{name}' in vhost '/': {reason}"),
        )
    };
    let quorum = args.get("x-queue-type").and_then(FieldValue::as_str) == Some("quorum");
    for (key, value) in args.iter() {
        let other_type = CLASSIC_KNOWN_ARGS.contains(&key) || OTHER_TYPE_ARGS.contains(&key);
        if quorum && other_type && !QUORUM_KNOWN_ARGS.contains(&key) {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!(
                    "invalid arg '{key}' for queue '{name}' in vhost '/' of queue type rabbit_quorum_queue"
                ),
            ));
        }
        let int = || {
            value
                .as_i64()
                .ok_or_else(|| format!("{{unacceptable_type,{}}}", value.type_name()))
        };
        let check = match key {
            "x-message-ttl" => int().and_then(|v| range(v, 0, TTL_MAX_MS)),
            "x-expires" => int().and_then(|v| {
                if v == 0 {
                    Err("{value_zero,0}".into())
                } else {
                    range(v, 1, TTL_MAX_MS)
                }
            }),
            "x-max-length" | "x-max-length-bytes" => int().and_then(|v| range(v, 0, i64::MAX)),
            "x-max-priority" => int().and_then(|v| range(v, 0, 255)),
            "x-overflow" => match value.as_str() {
                Some("drop-head" | "reject-publish" | "reject-publish-dlx") => Ok(()),
                Some(other) => Err(format!("{{unknown_overflow,<<\"{other}\">>}}")),
                None => Err(format!("{{unacceptable_type,{}}}", value.type_name())),
            },
            "x-dead-letter-exchange" => string_arg(value),
            "x-dead-letter-routing-key" => string_arg(value).and_then(|()| {
                if args.contains_key("x-dead-letter-exchange") {
                    Ok(())
                } else {
                    Err("routing_key_but_no_dlx_defined".into())
                }
            }),
            "x-single-active-consumer" => value
                .as_bool()
                .map(|_| ())
                .ok_or_else(|| format!("{{unacceptable_type,{}}}", value.type_name())),
            "x-queue-type" => match value.as_str() {
                Some("classic" | "quorum") => Ok(()),
                Some(other) => Err(format!("unsupported queue type '{other}'")),
                None => Err(format!("{{unacceptable_type,{}}}", value.type_name())),
            },
            "x-delivery-limit" if quorum => int().map(|_| ()),
            "x-dead-letter-strategy" if quorum => match value.as_str() {
                Some("at-most-once" | "at-least-once") => Ok(()),
                Some(other) => Err(format!("{{invalid_dead_letter_strategy,<<\"{other}\">>}}")),
                None => Err(format!("{{unacceptable_type,{}}}", value.type_name())),
            },
            "x-max-in-memory-length" | "x-max-in-memory-bytes" | "x-quorum-initial-group-size"
                if quorum =>
            {
                int().and_then(|v| range(v, 0, i64::MAX))
            }
            k if !quorum && OTHER_TYPE_ARGS.contains(&k) => {
                return Err(AmqpError::new(
                    ReplyCode::PreconditionFailed,
                    format!(
                        "invalid arg '{k}' for queue '{name}' in vhost '/' of queue type rabbit_classic_queue"
                    ),
                ));
            }
            _ => Ok(()),
        };
        check.map_err(|reason| invalid(key, reason))?;
    }
    Ok(())
}

fn range(v: i64, min: i64, max: i64) -> Result<(), String> {
    if v < min {
        Err(format!("{{value_negative,{v}}}"))
    } else if v > max {
        Err(format!("{{value_too_large,{v},{max}}}"))
    } else {
        Ok(())
    }
}

fn string_arg(v: &FieldValue) -> Result<(), String> {
    match v {
        FieldValue::LongString(_) => Ok(()),
        other => Err(format!("{{unacceptable_type,{}}}", other.type_name())),
    }
}

/// 404 for a missing queue.
pub fn no_queue(name: &str) -> AmqpError {
    AmqpError::new(
        ReplyCode::NotFound,
        format!("no queue '{name}' in vhost '/'"),
    )
}

/// 404 for a missing exchange.
pub fn no_exchange(name: &str) -> AmqpError {
    AmqpError::new(
        ReplyCode::NotFound,
        format!("no exchange '{name}' in vhost '/'"),
    )
}

/// 405 for an exclusive queue of another connection.
pub fn locked(name: &str) -> AmqpError {
    AmqpError::new(
        ReplyCode::ResourceLocked,
        format!(
            "cannot obtain exclusive access to locked queue '{name}' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
        ),
    )
}

fn default_exchange_refused() -> AmqpError {
    AmqpError::new(
        ReplyCode::AccessRefused,
        "operation not permitted on the default exchange",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONN: ConnectionId = ConnectionId(1);

    fn declare(t: &mut Topology, name: &str, durable: bool) -> Arc<QueueMeta> {
        let options = QueueDeclareOptions {
            durable,
            ..Default::default()
        };
        let declared = t
            .declare_queue(name, options, FieldTable::new(), CONN, || unreachable!())
            .expect("a valid declare");
        assert!(declared.created);
        declared.meta
    }

    fn exchange(t: &mut Topology, name: &str, kind: &str, durable: bool) {
        let options = ExchangeDeclareOptions {
            durable,
            ..Default::default()
        };
        assert!(
            t.declare_exchange(name, kind, options, FieldTable::new())
                .expect("a valid declare")
        );
    }

    fn bind(t: &mut Topology, source: &str, queue: &str, key: &str) -> bool {
        t.bind(
            source,
            DestinationName::Queue(queue),
            key,
            FieldTable::new(),
            CONN,
        )
        .expect("a valid bind")
    }

    /// A topology with `n` queues, each bound to a topic and a fanout exchange.
    fn populated(n: usize) -> Topology {
        let mut t = Topology::new();
        exchange(&mut t, "t", "topic", false);
        exchange(&mut t, "f", "fanout", false);
        for i in 0..n {
            let q = format!("q{i}");
            declare(&mut t, &q, false);
            assert!(bind(&mut t, "t", &q, &format!("k.{i}.#")));
            assert!(bind(&mut t, "f", &q, ""));
        }
        t.check_invariants().expect("invariants");
        t
    }

    #[test]
    fn a_declare_leaves_every_exchange_shared_with_the_previous_snapshot() {
        let before = populated(200);
        let mut after = before.clone();
        declare(&mut after, "new", true);
        assert_eq!(after.poll_durable_changes().len(), 1);
        after.check_invariants().expect("invariants");
        // The default exchange's bindings are implicit: a declare touches no exchange at all.
        assert!(after.exchanges.ptr_eq(&before.exchanges));
        assert!(Arc::ptr_eq(
            &after.default_exchange,
            &before.default_exchange
        ));
        for name in ["t", "f", ""] {
            let (a, b) = (after.exchange(name), before.exchange(name));
            assert!(
                Arc::ptr_eq(a.expect("exists"), b.expect("exists")),
                "'{name}' copied"
            );
        }
        assert!(before.queue("new").is_none());
        assert_eq!(after.queues().count(), before.queues().count() + 1);
    }

    #[test]
    fn a_bind_copies_its_exchange_only() {
        let before = populated(200);
        let mut after = before.clone();
        declare(&mut after, "new", false);
        assert!(bind(&mut after, "t", "new", "x.y"));
        after.check_invariants().expect("invariants");
        assert!(!Arc::ptr_eq(&after.exchanges["t"], &before.exchanges["t"]));
        assert!(Arc::ptr_eq(&after.exchanges["f"], &before.exchanges["f"]));
        assert_eq!(after.exchanges["t"].binding_count(), 201);
        assert_eq!(before.exchanges["t"].binding_count(), 200);
        assert!(
            !bind(&mut after, "t", "new", "x.y"),
            "a duplicate is no change"
        );
    }

    #[test]
    fn deleting_a_queue_removes_its_bindings_and_leaves_the_old_snapshot_whole() {
        let before = populated(50);
        let mut after = before.clone();
        let meta = after.remove_queue("q7").expect("q7 exists");
        after.check_invariants().expect("invariants");
        before.check_invariants().expect("invariants");
        let dest = Destination::Queue(meta.id);
        assert!(!after.exchanges["t"].has_bindings_to(&dest));
        assert!(!after.exchanges["f"].has_bindings_to(&dest));
        assert!(before.exchanges["t"].has_bindings_to(&dest));
        let mut routed = Targets::new();
        after.route(&after.exchanges["t"], &["k.7.z"], None, &mut routed);
        assert!(routed.is_empty());
        before.route(&before.exchanges["t"], &["k.7.z"], None, &mut routed);
        assert_eq!(routed.as_slice(), &[meta.id]);
    }

    #[test]
    fn exclusive_queues_are_found_by_owner() {
        let mut t = Topology::new();
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        for (name, conn) in [("a", 1), ("b", 2), ("c", 1)] {
            t.declare_queue(
                name,
                exclusive,
                FieldTable::new(),
                ConnectionId(conn),
                || unreachable!(),
            )
            .expect("a valid declare");
        }
        declare(&mut t, "shared", false);
        let owned: Vec<&str> = t
            .exclusive_queues(ConnectionId(1))
            .map(|q| &*q.name)
            .collect();
        assert_eq!(owned, ["a", "c"]);
        t.remove_queue("a");
        t.check_invariants().expect("invariants");
        let owned: Vec<&str> = t
            .exclusive_queues(ConnectionId(1))
            .map(|q| &*q.name)
            .collect();
        assert_eq!(owned, ["c"]);
    }

    #[test]
    fn durable_changes_name_what_changed_and_nothing_else() {
        let mut t = Topology::new();
        exchange(&mut t, "d", "direct", true);
        exchange(&mut t, "tmp", "direct", false);
        declare(&mut t, "dq", true);
        declare(&mut t, "tq", false);
        let kinds = |t: &mut Topology| -> Vec<String> {
            t.poll_durable_changes()
                .iter()
                .map(|c| match c {
                    DurableChange::ExchangeDeclared(e) => format!("+e {}", e.name),
                    DurableChange::ExchangeDeleted(e) => format!("-e {e}"),
                    DurableChange::QueueDeclared(q) => format!("+q {}", q.name),
                    DurableChange::QueueDeleted(q) => format!("-q {}", q.name),
                    DurableChange::Bound(b) => format!("+b {}>{:?}", b.source, b.destination),
                    DurableChange::Unbound(b) => format!("-b {}>{:?}", b.source, b.destination),
                })
                .collect()
        };
        assert_eq!(kinds(&mut t), ["+e d", "+q dq"]);
        bind(&mut t, "d", "dq", "k");
        bind(&mut t, "d", "tq", "k"); // transient destination: not durable
        bind(&mut t, "tmp", "dq", "k"); // transient source: not durable
        bind(&mut t, "amq.direct", "dq", "k"); // pre-declared sources are durable
        assert_eq!(
            kinds(&mut t),
            ["+b d>Queue(\"dq\")", "+b amq.direct>Queue(\"dq\")"]
        );
        t.remove_queue("dq");
        assert_eq!(
            kinds(&mut t),
            ["-b amq.direct>Queue(\"dq\")", "-b d>Queue(\"dq\")", "-q dq"]
        );
        assert!(t.delete_exchange("d", false).expect("deletable"));
        assert_eq!(kinds(&mut t), ["-e d"]);
        t.check_invariants().expect("invariants");
    }
}
