//! Exchanges, queue definitions and bindings: the declare / bind / delete rules of RabbitMQ
//! (SEMANTICS.md §1-§2) and routing. Pure: no locks, the runtime publishes snapshots of it.
//!
//! # Invariants (checked by [`Topology::check_invariants`])
//! - every binding's destination exists (queue id or exchange name);
//! - the pre-declared exchanges exist;
//! - queue ids are unique and below the id counter.

use rustc_hash::FxHashMap as HashMap;
use smallvec::SmallVec;
use std::sync::Arc;

use crate::core::channel::QueueId;
use crate::core::exchange::{Binding, Destination, Exchange, ExchangeKind};
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

/// Names of the exchanges every broker starts with (§2.1), and their kinds.
pub const PREDECLARED: [(&str, ExchangeKind); 7] = [
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    ("amq.rabbitmq.trace", ExchangeKind::Topic),
];

/// Classic-queue argument keys compared on redeclare (§1.3).
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

/// Arguments that belong to other queue types only: 406 on a classic queue (§1.4).
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

/// The exchanges, queues and bindings of a broker.
#[derive(Clone, Debug)]
pub struct Topology {
    exchanges: HashMap<Arc<str>, Arc<Exchange>>,
    /// The default exchange, also in `exchanges`: looked up without hashing an empty name.
    default_exchange: Arc<Exchange>,
    queues: HashMap<Arc<str>, Arc<QueueMeta>>,
    next_queue_id: u64,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Topology {
    /// A topology holding only the pre-declared exchanges.
    pub fn new() -> Self {
        let mut exchanges = HashMap::default();
        for (name, kind) in PREDECLARED {
            let internal = name == "amq.rabbitmq.trace";
            let ex = Exchange::new(name, kind, true, false, internal, FieldTable::new());
            exchanges.insert(Arc::from(name), Arc::new(ex));
        }
        let default_exchange = exchanges[""].clone();
        Self {
            exchanges,
            default_exchange,
            queues: HashMap::default(),
            next_queue_id: 1,
        }
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

    /// Every exchange, in no particular order.
    pub fn exchanges(&self) -> impl Iterator<Item = &Arc<Exchange>> {
        self.exchanges.values()
    }

    /// The queue `name` if `conn` may use it: 404 if missing, 405 if exclusive to another
    /// connection (§1.5).
    pub fn queue_for(&self, name: &str, conn: ConnectionId) -> Result<&Arc<QueueMeta>, AmqpError> {
        let q = self.queues.get(name).ok_or_else(|| no_queue(name))?;
        if q.exclusive_owner.is_some_and(|o| o != conn) {
            return Err(locked(name));
        }
        Ok(q)
    }

    /// The exchange `name` for publishing: 404 if missing, 403 if internal (§2.7).
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

    /// `exchange.declare` (§2.2). Returns whether the exchange was created.
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
        let ex = Exchange::new(
            name,
            kind,
            options.durable,
            options.auto_delete,
            options.internal,
            arguments,
        );
        self.exchanges.insert(Arc::from(name), Arc::new(ex));
        Ok(true)
    }

    /// `exchange.delete` (§2.2). Idempotent for missing exchanges. Returns whether one was
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
        if if_unused && !ex.bindings().is_empty() {
            return Err(AmqpError::new(
                ReplyCode::PreconditionFailed,
                format!("exchange '{name}' in vhost '/' in use"),
            ));
        }
        self.remove_exchange(name);
        Ok(true)
    }

    // ---- queues ---------------------------------------------------------------------------

    /// `queue.declare` (§1.1-§1.4). `server_name` makes an `amq.gen-` name when `name` is
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
        self.queues.insert(name, meta.clone());
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
        if self.queues.contains_key(name) || self.queues.values().any(|q| q.id == id) {
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
        self.queues.insert(meta.name.clone(), meta.clone());
        Ok(meta)
    }

    /// Removes a queue and every binding to it (auto-deleting exchanges left without bindings,
    /// §2.2). Returns its definition if it existed.
    pub fn remove_queue(&mut self, name: &str) -> Option<Arc<QueueMeta>> {
        let meta = self.queues.remove(name)?;
        self.remove_bindings_to(&Destination::Queue(meta.id));
        Some(meta)
    }

    // ---- bindings -------------------------------------------------------------------------

    /// `queue.bind` / `exchange.bind` (§2.3). Returns whether a new binding was made.
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
            .get_mut(source)
            .ok_or_else(|| no_exchange(source))?;
        ex.validate_binding(routing_key, &arguments)
            .map_err(|e| AmqpError::new(ReplyCode::PreconditionFailed, e))?;
        Ok(Arc::make_mut(ex).bind(Binding {
            destination: dest,
            routing_key: routing_key.to_owned(),
            arguments,
        }))
    }

    /// `queue.unbind` / `exchange.unbind` (§2.3): idempotent. Returns whether a binding went.
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
        let Some(ex) = self.exchanges.get_mut(source) else {
            return Ok(false);
        };
        let binding = Binding {
            destination: dest,
            routing_key: routing_key.to_owned(),
            arguments,
        };
        if !ex.bindings().contains(&binding) {
            return Ok(false);
        }
        Arc::make_mut(ex).unbind(&binding);
        self.auto_delete_exchanges(vec![Arc::from(source)]);
        Ok(true)
    }

    // ---- routing --------------------------------------------------------------------------

    /// Routes a message published to `exchange` with `routing_keys` (the publish key, then CC
    /// and BCC keys, §2.4) into `out`: each queue at most once, exchange-to-exchange bindings and
    /// alternate exchanges followed, each exchange visited once (§2.6).
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
        let ids: std::collections::HashSet<QueueId> = self.queues.values().map(|q| q.id).collect();
        if ids.len() != self.queues.len() || ids.iter().any(|id| id.0 >= self.next_queue_id) {
            return Err("queue ids not unique or from the future".into());
        }
        for (name, ex) in &self.exchanges {
            if **name != *ex.name {
                return Err(format!("exchange '{name}' stored under another name"));
            }
            for b in ex.bindings() {
                let ok = match &b.destination {
                    Destination::Queue(id) => ids.contains(id),
                    Destination::Exchange(e) => self.exchanges.contains_key(e),
                };
                if !ok {
                    return Err(format!(
                        "binding from '{name}' to a missing {:?}",
                        b.destination
                    ));
                }
            }
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

    fn remove_exchange(&mut self, name: &str) {
        if let Some(ex) = self.exchanges.remove(name) {
            self.remove_bindings_to(&Destination::Exchange(ex.name.clone()));
        }
    }

    fn remove_bindings_to(&mut self, dest: &Destination) {
        let mut touched = Vec::new();
        for (name, ex) in self.exchanges.iter_mut() {
            if ex.bindings().iter().any(|b| &b.destination == dest) {
                Arc::make_mut(ex).unbind_destination(dest);
                touched.push(name.clone());
            }
        }
        touched.sort();
        self.auto_delete_exchanges(touched);
    }

    /// Deletes auto-delete exchanges among `candidates` that lost their last binding (§2.2).
    fn auto_delete_exchanges(&mut self, candidates: Vec<Arc<str>>) {
        for name in candidates {
            let gone = self
                .exchanges
                .get(&name)
                .is_some_and(|e| e.auto_delete && e.bindings().is_empty());
            if gone {
                self.remove_exchange(&name);
            }
        }
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

/// Validates a new queue's arguments (§1.4): 406 `invalid arg` on the first bad one.
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
