//! Exchanges, bindings and routing as RabbitMQ does them (SEMANTICS.md §2).

mod common;

use std::sync::{Arc, Mutex};

use coney::BasicAckOptions;
use coney::{
    BasicProperties, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    ExchangeKind, FieldTable, FieldValue, ReplyCode, Returned,
};

use common::*;

/// §2.5: the default exchange routes to the queue named by the routing key, and nowhere else.
#[test]
fn default_exchange_routes_by_queue_name() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "orders");
    declare(&ch, "invoices");
    publish(&ch, "", "orders", "o1");
    publish(&ch, "", "no-such-queue", "lost");
    let d = get(&ch, "orders").expect("routed by queue name");
    assert_eq!(body(&d), "o1");
    assert_eq!(d.exchange(), "");
    assert_eq!(d.routing_key(), "orders");
    d.ack(BasicAckOptions::default()).unwrap();
    assert_eq!(ready(&ch, "orders"), 0);
    assert_eq!(ready(&ch, "invoices"), 0);
    broker.check_invariants().unwrap();
}

/// §2.2: the default exchange cannot be declared (even passively) or deleted (403).
#[test]
fn default_exchange_cannot_be_declared_or_deleted() {
    let (broker, conn, _ch) = setup();
    let text = Some("ACCESS_REFUSED - operation not permitted on the default exchange");
    for passive in [false, true] {
        let ch = conn.channel().unwrap();
        let opts = ExchangeDeclareOptions {
            passive,
            durable: true,
            ..Default::default()
        };
        let r = ch.exchange_declare("", ExchangeKind::Direct, opts, FieldTable::new());
        channel_error(r, ReplyCode::AccessRefused, text);
        assert!(ch.is_closed());
    }
    let ch = conn.channel().unwrap();
    let r = ch.exchange_delete("", ExchangeDeleteOptions::default());
    channel_error(r, ReplyCode::AccessRefused, text);
    broker.check_invariants().unwrap();
}

/// §2.2/§2.5: the default exchange's bindings are implicit: bind, unbind and E2E binds to or
/// from it are refused with 403.
#[test]
fn default_exchange_cannot_be_bound() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    declare_exchange(&ch, "x", ExchangeKind::Fanout);
    let text = Some("ACCESS_REFUSED - operation not permitted on the default exchange");

    let ch = conn.channel().unwrap();
    let r = ch.queue_bind("q", "", "q", Default::default(), FieldTable::new());
    channel_error(r, ReplyCode::AccessRefused, text);

    let ch = conn.channel().unwrap();
    let r = ch.queue_unbind("q", "", "q", FieldTable::new());
    channel_error(r, ReplyCode::AccessRefused, text);

    let ch = conn.channel().unwrap();
    let r = ch.exchange_bind("x", "", "k", Default::default(), FieldTable::new());
    channel_error(r, ReplyCode::AccessRefused, text);

    let ch = conn.channel().unwrap();
    let r = ch.exchange_bind("", "x", "k", Default::default(), FieldTable::new());
    channel_error(r, ReplyCode::AccessRefused, text);
    broker.check_invariants().unwrap();
}

/// §2.1: amq.direct, amq.fanout, amq.topic, amq.headers and amq.match exist in a new broker;
/// redeclaring them with identical properties (durable) is fine (§2.2).
#[test]
fn predeclared_exchanges_exist() {
    let (broker, _conn, ch) = setup();
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.exchange_declare(name, kind.clone(), passive, FieldTable::new())
            .unwrap_or_else(|e| panic!("passive declare of {name}: {e}"));
        let same = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(name, kind, same, FieldTable::new())
            .unwrap_or_else(|e| panic!("identical redeclare of {name}: {e}"));
    }
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §2.2: creating an exchange whose name starts with `amq.` is refused (403).
#[test]
fn declaring_new_amq_exchange_is_refused() {
    let (broker, _conn, ch) = setup();
    let r = ch.exchange_declare(
        "amq.custom",
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::new(),
    );
    channel_error(
        r,
        ReplyCode::AccessRefused,
        Some("ACCESS_REFUSED - exchange name 'amq.custom' contains reserved prefix 'amq.*'"),
    );
    assert!(!exchange_exists(&broker, "amq.custom"));
    broker.check_invariants().unwrap();
}

/// §2.2: redeclaring with a different type, durable, auto_delete or internal flag is a 406
/// naming the field; an identical redeclare is fine.
#[test]
fn exchange_redeclare_must_be_equivalent() {
    let (broker, conn, ch) = setup();
    declare_exchange(&ch, "ex", ExchangeKind::Direct);
    declare_exchange(&ch, "ex", ExchangeKind::Direct);

    let cases = [
        (
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'ex' in vhost '/': received 'fanout' but current is 'direct'",
        ),
        (
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'ex' in vhost '/': received 'true' but current is 'false'",
        ),
        (
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for exchange 'ex' in vhost '/': received 'true' but current is 'false'",
        ),
        (
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                internal: true,
                ..Default::default()
            },
            "PRECONDITION_FAILED - inequivalent arg 'internal' for exchange 'ex' in vhost '/': received 'true' but current is 'false'",
        ),
    ];
    for (kind, opts, text) in cases {
        let ch = conn.channel().unwrap();
        let r = ch.exchange_declare("ex", kind, opts, FieldTable::new());
        channel_error(r, ReplyCode::PreconditionFailed, Some(text));
    }
    assert!(exchange_exists(&broker, "ex"));
    broker.check_invariants().unwrap();
}

/// §2.2: among arguments only `alternate-exchange` is compared on redeclare.
#[test]
fn exchange_redeclare_compares_only_alternate_exchange_argument() {
    let (broker, conn, ch) = setup();
    let args = FieldTable::new()
        .with("alternate-exchange", "ae1")
        .with("x-foo", 1i32);
    ch.exchange_declare(
        "ex",
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        args,
    )
    .unwrap();
    let other_foo = FieldTable::new()
        .with("alternate-exchange", "ae1")
        .with("x-foo", 2i32);
    ch.exchange_declare(
        "ex",
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        other_foo,
    )
    .expect("x-foo is not compared");

    let ch = conn.channel().unwrap();
    let r = ch.exchange_declare(
        "ex",
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::new().with("alternate-exchange", "ae2"),
    );
    let e = channel_error(r, ReplyCode::PreconditionFailed, None);
    assert!(
        e.text
            .starts_with("PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'ex' in vhost '/'"),
        "{e}"
    );
    broker.check_invariants().unwrap();
}

/// §2.2: a passive declare of a missing exchange is a 404 that closes the channel.
#[test]
fn passive_declare_of_missing_exchange_is_404() {
    let (broker, _conn, ch) = setup();
    let r = ch.exchange_declare(
        "missing",
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::new(),
    );
    channel_error(
        r,
        ReplyCode::NotFound,
        Some("NOT_FOUND - no exchange 'missing' in vhost '/'"),
    );
    assert!(ch.is_closed());
    assert!(!exchange_exists(&broker, "missing"));
    broker.check_invariants().unwrap();
}

/// §2.2: delete with if-unused refuses an exchange that is the source of a binding (406); an
/// exchange that is only a binding destination is not "in use".
#[test]
fn exchange_delete_if_unused() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    declare_exchange(&ch, "src", ExchangeKind::Fanout);
    declare_exchange(&ch, "dst", ExchangeKind::Fanout);
    bind(&ch, "q", "src", "");
    ch.exchange_bind(
        "dst",
        "amq.fanout",
        "",
        Default::default(),
        FieldTable::new(),
    )
    .unwrap();
    let if_unused = ExchangeDeleteOptions {
        if_unused: true,
        ..Default::default()
    };

    let r = ch.exchange_delete("src", if_unused);
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - exchange 'src' in vhost '/' in use"),
    );
    assert!(exchange_exists(&broker, "src"));

    let ch = conn.channel().unwrap();
    ch.exchange_delete("dst", if_unused)
        .expect("a destination-only exchange is unused");
    assert!(!exchange_exists(&broker, "dst"));

    ch.queue_unbind("q", "src", "", FieldTable::new()).unwrap();
    ch.exchange_delete("src", if_unused).unwrap();
    assert!(!exchange_exists(&broker, "src"));
    broker.check_invariants().unwrap();
}

/// §2.2: deleting an exchange removes the bindings where it is the source or destination.
#[test]
fn exchange_delete_removes_its_bindings() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    declare_exchange(&ch, "mid", ExchangeKind::Fanout);
    bind(&ch, "q", "mid", "");
    ch.exchange_bind(
        "mid",
        "amq.fanout",
        "",
        Default::default(),
        FieldTable::new(),
    )
    .unwrap();
    publish(&ch, "amq.fanout", "", "via-mid");
    assert_eq!(ready(&ch, "q"), 1);
    ch.exchange_delete("mid", ExchangeDeleteOptions::default())
        .unwrap();
    publish(&ch, "amq.fanout", "", "nowhere");
    assert_eq!(get_all(&ch, "q"), ["via-mid"]);
    broker.check_invariants().unwrap();
}

/// §2.2: deleting a missing exchange succeeds (idempotent).
#[test]
fn exchange_delete_of_missing_exchange_is_ok() {
    let (broker, _conn, ch) = setup();
    ch.exchange_delete("never-declared", ExchangeDeleteOptions::default())
        .unwrap();
    ch.exchange_delete(
        "never-declared",
        ExchangeDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §2.2: system `amq.*` exchanges cannot be deleted (403).
#[test]
fn deleting_amq_direct_is_refused() {
    let (broker, _conn, ch) = setup();
    let r = ch.exchange_delete("amq.direct", ExchangeDeleteOptions::default());
    channel_error(
        r,
        ReplyCode::AccessRefused,
        Some("ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed"),
    );
    assert!(exchange_exists(&broker, "amq.direct"));
    broker.check_invariants().unwrap();
}

/// §2.5: direct exchanges match the binding key byte for byte (case-sensitive, no wildcards).
#[test]
fn direct_routing_is_exact_match() {
    let (broker, _conn, ch) = setup();
    for q in ["lower", "upper", "star"] {
        declare(&ch, q);
    }
    bind(&ch, "lower", "amq.direct", "key");
    bind(&ch, "upper", "amq.direct", "KEY");
    bind(&ch, "star", "amq.direct", "*");
    publish(&ch, "amq.direct", "key", "1");
    publish(&ch, "amq.direct", "KEY", "2");
    publish(&ch, "amq.direct", "key.more", "3");
    publish(&ch, "amq.direct", "anything", "4");
    publish(&ch, "amq.direct", "*", "5");
    assert_eq!(get_all(&ch, "lower"), ["1"]);
    assert_eq!(get_all(&ch, "upper"), ["2"]);
    assert_eq!(get_all(&ch, "star"), ["5"]);
    broker.check_invariants().unwrap();
}

/// §2.5: fanout delivers to every bound queue whatever the routing key.
#[test]
fn fanout_routes_to_every_binding() {
    let (broker, _conn, ch) = setup();
    declare_exchange(&ch, "fan", ExchangeKind::Fanout);
    for (q, key) in [("f1", ""), ("f2", "ignored"), ("f3", "#")] {
        declare(&ch, q);
        bind(&ch, q, "fan", key);
    }
    publish(&ch, "fan", "whatever", "m");
    for q in ["f1", "f2", "f3"] {
        assert_eq!(get_all(&ch, q), ["m"], "queue {q}");
    }
    broker.check_invariants().unwrap();
}

/// §2.5: the topic reference matrix of routing_SUITE (each binding key against each routing
/// key).
#[test]
fn topic_reference_matrix() {
    let (broker, _conn, ch) = setup();
    let keys = ["a.b.c", "a.b", "a.b.b", "", "oneword", "a.a.a.a.a"];
    let all: &[&str] = &keys;
    let nonempty: &[&str] = &["a.b.c", "a.b", "a.b.b", "oneword", "a.a.a.a.a"];
    let a_hash: &[&str] = &["a.b.c", "a.b", "a.b.b", "a.a.a.a.a"];
    let matrix: [(&str, &[&str]); 18] = [
        ("a.b.c", &["a.b.c"]),
        ("a.*.c", &["a.b.c"]),
        ("a.#.b", &["a.b", "a.b.b"]),
        ("#", all),
        ("#.#", all),
        ("#.b", &["a.b", "a.b.b"]),
        ("*.*", &["a.b"]),
        ("a.*", &["a.b"]),
        ("a.#", a_hash),
        ("a.#.#", a_hash),
        ("", &[""]),
        ("*", &["oneword"]),
        ("*.#", nonempty),
        ("#.*.#", nonempty),
        ("*.#.#", nonempty),
        ("#.b.#", &["a.b.c", "a.b", "a.b.b"]),
        ("*.*.*", &["a.b.c", "a.b.b"]),
        ("a.b", &["a.b"]),
    ];
    for (i, (binding, _)) in matrix.iter().enumerate() {
        let q = format!("t{i}");
        declare(&ch, &q);
        bind(&ch, &q, "amq.topic", binding);
    }
    for key in keys {
        publish(&ch, "amq.topic", key, key);
    }
    for (i, (binding, expected)) in matrix.iter().enumerate() {
        let got = get_all(&ch, &format!("t{i}"));
        assert_eq!(got, *expected, "binding '{binding}'");
    }
    broker.check_invariants().unwrap();
}

/// §2.5: topic edge rules: empty words are words (`*` matches one), `a.#` matches `a`,
/// `a*`/`#b` are literals, `*` never matches the empty key.
#[test]
fn topic_empty_words_and_literal_wildcards() {
    let (broker, _conn, ch) = setup();
    let cases: [(&str, &str, &[&str]); 6] = [
        ("e1", "a.*.b", &["a..b"]),
        ("e2", "*.*", &["."]),
        ("e3", "a.#", &["a..b", "a"]),
        ("e4", "a*", &["a*"]),
        ("e5", "#b", &["#b"]),
        ("e6", "*", &["a", "a*", "ab", "#b", "xb", "x"]),
    ];
    for (q, binding, _) in cases {
        declare(&ch, q);
        bind(&ch, q, "amq.topic", binding);
    }
    for key in ["a..b", ".", "a", "a*", "ab", "#b", "xb", "x", ""] {
        publish(&ch, "amq.topic", key, key);
    }
    for (q, binding, expected) in cases {
        assert_eq!(get_all(&ch, q), expected, "binding '{binding}'");
    }
    broker.check_invariants().unwrap();
}

/// §2.3 and "How coney uses this page": the limit of two `#` words is a 4.3.5+ rule; under the
/// default <=4.2 profile a `#.#.#` binding is accepted and matches like `#`.
#[test]
fn topic_binding_with_three_hashes_is_accepted_under_the_4_2_profile() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    bind(&ch, "q", "amq.topic", "#.#.#");
    publish(&ch, "amq.topic", "a.b.c", "m");
    publish(&ch, "amq.topic", "", "n");
    assert_eq!(get_all(&ch, "q"), ["m", "n"]);
    broker.check_invariants().unwrap();
}

/// §2.5 with the most `#` words a binding key holds (128 in 255 bytes): each binding matches as
/// the rules say, and routing stays cheap (no backtracking over the ways the `#` words could
/// split the key; this runs in milliseconds in a debug build).
#[test]
fn topic_binding_of_128_hashes_matches_by_the_rules() {
    let (broker, _conn, ch) = setup();
    let hashes = vec!["#"; 128].join(".");
    let between = (0..127)
        .map(|i| if i % 2 == 0 { "#" } else { "k" })
        .collect::<Vec<_>>()
        .join(".");
    let tail = format!("{}.x", vec!["#"; 126].join("."));
    assert!(hashes.len() == 255 && between.len() == 253 && tail.len() == 253);
    for (q, binding) in [("all", &hashes), ("between", &between), ("tail", &tail)] {
        declare(&ch, q);
        bind(&ch, q, "amq.topic", binding);
    }
    let k = |n: usize| vec!["k"; n].join(".");
    let keys = [
        String::new(),
        k(1),
        k(62),
        k(63),
        k(127),
        format!("{}.x", k(126)),
    ];
    for key in &keys {
        publish(&ch, "amq.topic", key, key);
    }
    // `#` x 128 matches every key; 64 `#` with `k` between need at least 63 `k`s (the last
    // `#` takes the `x`); the tail binding needs a last word `x`.
    assert_eq!(get_all(&ch, "all"), keys);
    assert_eq!(
        get_all(&ch, "between"),
        [k(63), k(127), format!("{}.x", k(126))]
    );
    assert_eq!(get_all(&ch, "tail"), [format!("{}.x", k(126))]);
    broker.check_invariants().unwrap();
}

/// Binds `queue` to amq.headers with `args`.
fn bind_headers(ch: &coney::Channel, queue: &str, args: FieldTable) {
    declare(ch, queue);
    ch.queue_bind(queue, "amq.headers", "", Default::default(), args)
        .unwrap();
}

/// §2.5 (exchanges_SUITE:headers_exchange): `all` needs every header, `any` one of them; no
/// headers match neither; the routing key is ignored.
#[test]
fn headers_all_and_any() {
    let (broker, _conn, ch) = setup();
    let pair = |mode: &str| {
        FieldTable::new()
            .with("x-match", mode)
            .with("foo", "bar")
            .with("fuu", "ber")
    };
    bind_headers(&ch, "q-all", pair("all"));
    bind_headers(&ch, "q-any", pair("any"));
    let both = FieldTable::new().with("foo", "bar").with("fuu", "ber");
    publish_headers(&ch, "amq.headers", "ignored", "both", both);
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "one",
        FieldTable::new().with("foo", "bar"),
    );
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "wrong-value",
        FieldTable::new().with("foo", "baz"),
    );
    publish(&ch, "amq.headers", "", "none");
    assert_eq!(get_all(&ch, "q-all"), ["both"]);
    assert_eq!(get_all(&ch, "q-any"), ["both", "one"]);
    broker.check_invariants().unwrap();
}

/// §2.5: `x-match` absent means `all`; `all` ignores `x-` arguments (so with only `x-` args it
/// matches everything, even messages without headers), `any` ignores them (so it matches
/// nothing); the `*-with-x` modes compare `x-` arguments too.
#[test]
fn headers_x_arguments_and_with_x_modes() {
    let (broker, _conn, ch) = setup();
    bind_headers(&ch, "q-default", FieldTable::new().with("k", "v"));
    bind_headers(
        &ch,
        "q-all",
        FieldTable::new()
            .with("x-match", "all")
            .with("x-tenant", "t1"),
    );
    bind_headers(
        &ch,
        "q-any",
        FieldTable::new()
            .with("x-match", "any")
            .with("x-tenant", "t1"),
    );
    bind_headers(
        &ch,
        "q-all-x",
        FieldTable::new()
            .with("x-match", "all-with-x")
            .with("x-tenant", "t1")
            .with("k", "v"),
    );
    bind_headers(
        &ch,
        "q-any-x",
        FieldTable::new()
            .with("x-match", "any-with-x")
            .with("x-tenant", "t1")
            .with("k", "nope"),
    );
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "tenant+k",
        FieldTable::new().with("x-tenant", "t1").with("k", "v"),
    );
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "tenant",
        FieldTable::new().with("x-tenant", "t1"),
    );
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "k",
        FieldTable::new().with("k", "v"),
    );
    publish(&ch, "amq.headers", "", "bare");
    assert_eq!(get_all(&ch, "q-default"), ["tenant+k", "k"]);
    assert_eq!(get_all(&ch, "q-all"), ["tenant+k", "tenant", "k", "bare"]);
    assert!(get_all(&ch, "q-any").is_empty());
    assert_eq!(get_all(&ch, "q-all-x"), ["tenant+k"]);
    assert_eq!(get_all(&ch, "q-any-x"), ["tenant+k", "tenant"]);
    broker.check_invariants().unwrap();
}

/// §2.5 (exchanges_SUITE:headers_exchange_key_presence_only): a void argument only asks that
/// the header be present, whatever its value.
#[test]
fn headers_void_argument_checks_presence() {
    let (broker, _conn, ch) = setup();
    bind_headers(&ch, "q", FieldTable::new().with("flag", FieldValue::Void));
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "string",
        FieldTable::new().with("flag", "anything"),
    );
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "int",
        FieldTable::new().with("flag", 7i64),
    );
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "void",
        FieldTable::new().with("flag", FieldValue::Void),
    );
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "other",
        FieldTable::new().with("other", "x"),
    );
    publish(&ch, "amq.headers", "", "bare");
    assert_eq!(get_all(&ch, "q"), ["string", "int", "void"]);
    broker.check_invariants().unwrap();
}

/// §2.5: header values compare by value, type tags aside: integer kinds are equal to each
/// other and to an equal double; a string never equals a number.
#[test]
fn headers_numbers_compare_by_value() {
    let (broker, _conn, ch) = setup();
    bind_headers(&ch, "q", FieldTable::new().with("n", 5i32));
    let values: [(&str, FieldValue); 7] = [
        ("i64", FieldValue::I64(5)),
        ("u8", FieldValue::U8(5)),
        ("i16", FieldValue::I16(5)),
        ("f64", FieldValue::F64(5.0)),
        ("str", FieldValue::from("5")),
        ("six", FieldValue::I64(6)),
        ("f64-frac", FieldValue::F64(5.5)),
    ];
    for (name, v) in values {
        publish_headers(&ch, "amq.headers", "", name, FieldTable::new().with("n", v));
    }
    assert_eq!(get_all(&ch, "q"), ["i64", "u8", "i16", "f64"]);
    broker.check_invariants().unwrap();
}

/// §2.3: a headers binding whose `x-match` is not all/any/all-with-x/any-with-x is a 406.
#[test]
fn headers_invalid_x_match_is_refused() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let r = ch.queue_bind(
        "q",
        "amq.headers",
        "",
        Default::default(),
        FieldTable::new().with("x-match", "some"),
    );
    let e = channel_error(r, ReplyCode::PreconditionFailed, None);
    assert!(
        e.text
            .starts_with("PRECONDITION_FAILED - Invalid x-match field value"),
        "{e}"
    );

    let ch = conn.channel().unwrap();
    let r = ch.queue_bind(
        "q",
        "amq.headers",
        "",
        Default::default(),
        FieldTable::new().with("x-match", 1i64),
    );
    channel_error(r, ReplyCode::PreconditionFailed, None);

    let ch = conn.channel().unwrap();
    publish(&ch, "amq.headers", "", "m");
    assert!(get_all(&ch, "q").is_empty(), "no binding was made");
    broker.check_invariants().unwrap();
}

/// §2.3: binding to a missing exchange or queue is a 404; unbinding what does not exist is ok.
#[test]
fn bind_to_missing_things_is_404_and_unbind_is_idempotent() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let r = ch.queue_bind("q", "nope", "k", Default::default(), FieldTable::new());
    channel_error(
        r,
        ReplyCode::NotFound,
        Some("NOT_FOUND - no exchange 'nope' in vhost '/'"),
    );

    let ch = conn.channel().unwrap();
    let r = ch.queue_bind(
        "nope",
        "amq.direct",
        "k",
        Default::default(),
        FieldTable::new(),
    );
    channel_error(
        r,
        ReplyCode::NotFound,
        Some("NOT_FOUND - no queue 'nope' in vhost '/'"),
    );

    let ch = conn.channel().unwrap();
    let r = ch.exchange_bind(
        "nope",
        "amq.direct",
        "k",
        Default::default(),
        FieldTable::new(),
    );
    channel_error(r, ReplyCode::NotFound, None);

    let ch = conn.channel().unwrap();
    ch.queue_unbind("q", "amq.direct", "never-bound", FieldTable::new())
        .unwrap();
    ch.queue_unbind("nope", "amq.direct", "k", FieldTable::new())
        .unwrap();
    ch.queue_unbind("q", "nope", "k", FieldTable::new())
        .unwrap();
    ch.exchange_unbind(
        "nope",
        "amq.direct",
        "k",
        Default::default(),
        FieldTable::new(),
    )
    .unwrap();
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// §2.3: re-binding an identical binding is a no-op: one unbind removes it.
#[test]
fn identical_bind_is_a_no_op() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    bind(&ch, "q", "amq.direct", "k");
    bind(&ch, "q", "amq.direct", "k");
    publish(&ch, "amq.direct", "k", "1");
    ch.queue_unbind("q", "amq.direct", "k", FieldTable::new())
        .unwrap();
    publish(&ch, "amq.direct", "k", "2");
    assert_eq!(get_all(&ch, "q"), ["1"]);
    broker.check_invariants().unwrap();
}

/// §2.6: exchange-to-exchange bindings route the same message on with the destination's own
/// rules; delivery reports the original exchange and routing key.
#[test]
fn exchange_to_exchange_binding() {
    let (broker, _conn, ch) = setup();
    declare_exchange(&ch, "src", ExchangeKind::Topic);
    declare_exchange(&ch, "dst", ExchangeKind::Direct);
    declare(&ch, "direct-q");
    declare(&ch, "via-dst");
    bind(&ch, "direct-q", "src", "a.*");
    bind(&ch, "via-dst", "dst", "a.b");
    ch.exchange_bind("dst", "src", "a.#", Default::default(), FieldTable::new())
        .unwrap();
    publish(&ch, "src", "a.b", "ab");
    publish(&ch, "src", "a.c", "ac");
    publish(&ch, "src", "a.b.c", "abc");
    assert_eq!(get_all(&ch, "direct-q"), ["ab", "ac"]);
    let d = get(&ch, "via-dst").unwrap();
    assert_eq!(body(&d), "ab");
    assert_eq!(d.exchange(), "src");
    assert_eq!(d.routing_key(), "a.b");
    d.ack(BasicAckOptions::default()).unwrap();
    assert!(get_all(&ch, "via-dst").is_empty());
    broker.check_invariants().unwrap();
}

/// §2.6: each exchange is visited once per publish, so a cycle of E2E bindings is harmless and
/// each queue gets exactly one copy.
#[test]
fn exchange_binding_cycle_delivers_one_copy() {
    let (broker, _conn, ch) = setup();
    declare_exchange(&ch, "e1", ExchangeKind::Fanout);
    declare_exchange(&ch, "e2", ExchangeKind::Fanout);
    ch.exchange_bind("e2", "e1", "", Default::default(), FieldTable::new())
        .unwrap();
    ch.exchange_bind("e1", "e2", "", Default::default(), FieldTable::new())
        .unwrap();
    declare(&ch, "qa");
    declare(&ch, "qb");
    bind(&ch, "qa", "e1", "");
    bind(&ch, "qb", "e2", "");
    bind(&ch, "qb", "e1", "");
    publish(&ch, "e1", "", "from-e1");
    publish(&ch, "e2", "", "from-e2");
    assert_eq!(get_all(&ch, "qa"), ["from-e1", "from-e2"]);
    assert_eq!(get_all(&ch, "qb"), ["from-e1", "from-e2"]);
    broker.check_invariants().unwrap();
}

/// §2.4: a queue matched by several bindings of one exchange receives one copy.
#[test]
fn queue_bound_twice_gets_one_copy() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    bind(&ch, "q", "amq.topic", "a.*");
    bind(&ch, "q", "amq.topic", "*.b");
    bind(&ch, "q", "amq.topic", "#");
    ch.queue_bind(
        "q",
        "amq.topic",
        "a.b",
        Default::default(),
        FieldTable::new().with("variant", 1i32),
    )
    .unwrap();
    publish(&ch, "amq.topic", "a.b", "once");
    assert_eq!(get_all(&ch, "q"), ["once"]);
    broker.check_invariants().unwrap();
}

/// §2.2: an auto-delete exchange is deleted when its last binding as source goes (unbind or
/// destination queue deleted).
#[test]
fn auto_delete_exchange_goes_with_its_last_binding() {
    let (broker, _conn, ch) = setup();
    let ad = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.exchange_declare("ad1", ExchangeKind::Fanout, ad, FieldTable::new())
        .unwrap();
    declare(&ch, "q1");
    declare(&ch, "q2");
    bind(&ch, "q1", "ad1", "");
    bind(&ch, "q2", "ad1", "");
    ch.queue_unbind("q1", "ad1", "", FieldTable::new()).unwrap();
    assert!(exchange_exists(&broker, "ad1"), "one binding left");
    ch.queue_unbind("q2", "ad1", "", FieldTable::new()).unwrap();
    assert!(!exchange_exists(&broker, "ad1"));

    ch.exchange_declare("ad2", ExchangeKind::Fanout, ad, FieldTable::new())
        .unwrap();
    bind(&ch, "q1", "ad2", "");
    ch.queue_delete("q1", Default::default()).unwrap();
    assert!(!exchange_exists(&broker, "ad2"));
    broker.check_invariants().unwrap();
}

/// §2.2: an auto-delete exchange that never had a binding as source is never auto-deleted
/// (being an E2E destination does not count).
#[test]
fn auto_delete_exchange_never_bound_stays() {
    let (broker, _conn, ch) = setup();
    let ad = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.exchange_declare("ad", ExchangeKind::Fanout, ad, FieldTable::new())
        .unwrap();
    declare(&ch, "q");
    bind(&ch, "q", "amq.fanout", "");
    ch.queue_unbind("q", "amq.fanout", "", FieldTable::new())
        .unwrap();
    ch.exchange_bind(
        "ad",
        "amq.fanout",
        "",
        Default::default(),
        FieldTable::new(),
    )
    .unwrap();
    ch.exchange_unbind(
        "ad",
        "amq.fanout",
        "",
        Default::default(),
        FieldTable::new(),
    )
    .unwrap();
    publish(&ch, "ad", "", "m");
    assert!(exchange_exists(&broker, "ad"));
    broker.check_invariants().unwrap();
}

/// §2.2: publishing to an internal exchange is a 403, but it works as an E2E destination.
#[test]
fn internal_exchange_refuses_publish_but_routes_e2e() {
    let (broker, conn, ch) = setup();
    let internal = ExchangeDeclareOptions {
        internal: true,
        ..Default::default()
    };
    ch.exchange_declare("int", ExchangeKind::Fanout, internal, FieldTable::new())
        .unwrap();
    declare_exchange(&ch, "front", ExchangeKind::Direct);
    declare(&ch, "q");
    bind(&ch, "q", "int", "");
    ch.exchange_bind("int", "front", "k", Default::default(), FieldTable::new())
        .unwrap();

    let r = ch.basic_publish(
        "int",
        "",
        BasicPublishOptions::default(),
        b"direct".to_vec(),
        BasicProperties::default(),
    );
    channel_error(
        r,
        ReplyCode::AccessRefused,
        Some("ACCESS_REFUSED - cannot publish to internal exchange 'int' in vhost '/'"),
    );
    assert!(ch.is_closed());

    let ch = conn.channel().unwrap();
    publish(&ch, "front", "k", "via-front");
    let d = get(&ch, "q").expect("routed through the internal exchange");
    assert_eq!(body(&d), "via-front");
    assert_eq!(d.exchange(), "front");
    d.ack(BasicAckOptions::default()).unwrap();
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §2.6: the alternate exchange receives messages the exchange's own bindings cannot route;
/// they count as routed (no return) and keep their exchange and routing key. A missing AE is
/// ignored.
#[test]
fn alternate_exchange_catches_unroutable() {
    let (broker, _conn, ch) = setup();
    let returned: Arc<Mutex<Vec<Returned>>> = Arc::default();
    let sink = returned.clone();
    ch.set_return_handler(move |r| sink.lock().unwrap().push(r));

    let internal = ExchangeDeclareOptions {
        internal: true,
        ..Default::default()
    };
    ch.exchange_declare("ae", ExchangeKind::Fanout, internal, FieldTable::new())
        .unwrap();
    ch.exchange_declare(
        "main",
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::new().with("alternate-exchange", "ae"),
    )
    .unwrap();
    ch.exchange_declare(
        "orphan",
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::new().with("alternate-exchange", "no-such-ae"),
    )
    .unwrap();
    declare(&ch, "routed");
    declare(&ch, "unrouted");
    bind(&ch, "routed", "main", "k");
    bind(&ch, "unrouted", "ae", "");

    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    for (ex, key, b) in [
        ("main", "k", "hit"),
        ("main", "other", "miss"),
        ("orphan", "x", "lost"),
    ] {
        ch.basic_publish(
            ex,
            key,
            mandatory,
            b.as_bytes().to_vec(),
            BasicProperties::default(),
        )
        .unwrap();
    }
    assert_eq!(get_all(&ch, "routed"), ["hit"]);
    let d = get(&ch, "unrouted").expect("caught by the AE");
    assert_eq!(body(&d), "miss");
    assert_eq!(d.exchange(), "main");
    assert_eq!(d.routing_key(), "other");
    d.ack(BasicAckOptions::default()).unwrap();
    assert_eq!(ready(&ch, "unrouted"), 0);
    let returned = returned.lock().unwrap();
    assert_eq!(returned.len(), 1, "only the orphan publish is returned");
    assert_eq!(returned[0].exchange, "orphan");
    assert_eq!(&returned[0].body[..], b"lost");
    broker.check_invariants().unwrap();
}

/// §2.4: CC and BCC headers add routing keys; BCC is removed before delivery, CC stays; the
/// delivery's routing key is the publish key; non-string array elements are skipped.
#[test]
fn cc_and_bcc_add_routing_keys() {
    let (broker, _conn, ch) = setup();
    for (q, key) in [("q1", "k1"), ("q2", "k2"), ("q3", "k3"), ("q4", "k4")] {
        declare(&ch, q);
        bind(&ch, q, "amq.direct", key);
    }
    let headers = FieldTable::new()
        .with("CC", vec![FieldValue::I32(5), FieldValue::from("k2")])
        .with("BCC", vec![FieldValue::from("k3"), FieldValue::from("k1")])
        .with("app", "kept");
    publish_headers(&ch, "amq.direct", "k1", "m", headers);
    for q in ["q1", "q2", "q3"] {
        let d = get(&ch, q).unwrap_or_else(|| panic!("{q} receives a copy"));
        assert_eq!(d.routing_key(), "k1", "{q}");
        let h = d.properties().headers.as_ref().expect("headers kept");
        assert!(!h.contains_key("BCC"), "{q}: BCC stripped");
        assert_eq!(
            h.get("CC"),
            Some(&FieldValue::Array(vec![
                FieldValue::I32(5),
                FieldValue::from("k2")
            ]))
        );
        assert_eq!(h.get("app"), Some(&FieldValue::from("kept")));
        d.ack(BasicAckOptions::default()).unwrap();
        assert!(get(&ch, q).is_none(), "{q}: one copy only");
    }
    assert!(get(&ch, "q4").is_none());
    broker.check_invariants().unwrap();
}

/// §2.4/§2.5: CC works on the default exchange too (each key names a queue), one copy each.
#[test]
fn cc_on_default_exchange() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "qa");
    declare(&ch, "qb");
    let cc = FieldTable::new().with(
        "CC",
        vec![
            FieldValue::from("qb"),
            FieldValue::from("qa"),
            FieldValue::from("missing"),
        ],
    );
    publish_headers(&ch, "", "qa", "m", cc);
    assert_eq!(get_all(&ch, "qa"), ["m"]);
    assert_eq!(get_all(&ch, "qb"), ["m"]);
    broker.check_invariants().unwrap();
}

/// §2.4: a CC header that is not an array is a 406 and nothing is routed.
#[test]
fn non_array_cc_is_refused() {
    let (broker, conn, ch) = setup();
    declare(&ch, "q");
    let r = ch.basic_publish(
        "",
        "q",
        BasicPublishOptions::default(),
        b"m".to_vec(),
        BasicProperties::default().with_headers(FieldTable::new().with("CC", 5i64)),
    );
    channel_error(
        r,
        ReplyCode::PreconditionFailed,
        Some("PRECONDITION_FAILED - invalid message: {unacceptable_type_in_header,\"CC\",long}"),
    );
    let ch = conn.channel().unwrap();
    assert_eq!(ready(&ch, "q"), 0);
    broker.check_invariants().unwrap();
}

/// §2.3: bindings differing only in arguments coexist; removing one leaves the other routing.
#[test]
fn unbinding_one_of_two_argument_variants_keeps_the_other() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    let a1 = FieldTable::new().with("v", 1i32);
    let a2 = FieldTable::new().with("v", 2i32);
    for ex in ["amq.direct", "amq.topic", "amq.fanout"] {
        ch.queue_bind("q", ex, "k", Default::default(), a1.clone())
            .unwrap();
        ch.queue_bind("q", ex, "k", Default::default(), a2.clone())
            .unwrap();
        publish(&ch, ex, "k", "both");
        ch.queue_unbind("q", ex, "k", a1.clone()).unwrap();
        publish(&ch, ex, "k", "one-left");
        ch.queue_unbind("q", ex, "k", a2.clone()).unwrap();
        publish(&ch, ex, "k", "none-left");
        assert_eq!(get_all(&ch, "q"), ["both", "one-left"], "exchange {ex}");
    }
    broker.check_invariants().unwrap();
}

/// §2.3/§2.5: unbinding one headers binding leaves the exchange's other bindings matching as
/// before.
#[test]
fn headers_unbind_keeps_other_bindings() {
    let (broker, _conn, ch) = setup();
    bind_headers(&ch, "h1", FieldTable::new().with("a", 1i32));
    bind_headers(&ch, "h2", FieldTable::new().with("b", 2i32));
    bind_headers(
        &ch,
        "h3",
        FieldTable::new().with("x-match", "any").with("c", 3i32),
    );
    ch.queue_unbind("h1", "amq.headers", "", FieldTable::new().with("a", 1i32))
        .unwrap();
    let all = FieldTable::new()
        .with("a", 1i32)
        .with("b", 2i32)
        .with("c", 3i32);
    publish_headers(&ch, "amq.headers", "", "m", all);
    publish_headers(
        &ch,
        "amq.headers",
        "",
        "only-a",
        FieldTable::new().with("a", 1i32),
    );
    assert!(get_all(&ch, "h1").is_empty());
    assert_eq!(get_all(&ch, "h2"), ["m"]);
    assert_eq!(get_all(&ch, "h3"), ["m"]);
    broker.check_invariants().unwrap();
}

/// §2.3: a topic queue bound with two patterns keeps routing on the other after one unbind.
#[test]
fn topic_unbind_one_pattern_keeps_the_other() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    bind(&ch, "q", "amq.topic", "a.*");
    bind(&ch, "q", "amq.topic", "a.#");
    ch.queue_unbind("q", "amq.topic", "a.*", FieldTable::new())
        .unwrap();
    publish(&ch, "amq.topic", "a.b", "ab");
    publish(&ch, "amq.topic", "a.b.c", "abc");
    ch.queue_unbind("q", "amq.topic", "a.#", FieldTable::new())
        .unwrap();
    publish(&ch, "amq.topic", "a.b", "gone");
    assert_eq!(get_all(&ch, "q"), ["ab", "abc"]);
    broker.check_invariants().unwrap();
}

/// §2.6: if an E2E destination exchange routes nowhere, *its* alternate exchange is used; the
/// source's own AE is not (its bindings produced a destination).
#[test]
fn alternate_exchange_of_e2e_destination() {
    let (broker, _conn, ch) = setup();
    declare_exchange(&ch, "dst-ae", ExchangeKind::Fanout);
    declare_exchange(&ch, "src-ae", ExchangeKind::Fanout);
    ch.exchange_declare(
        "dst",
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::new().with("alternate-exchange", "dst-ae"),
    )
    .unwrap();
    ch.exchange_declare(
        "src",
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::new().with("alternate-exchange", "src-ae"),
    )
    .unwrap();
    ch.exchange_bind("dst", "src", "", Default::default(), FieldTable::new())
        .unwrap();
    declare(&ch, "dst-caught");
    declare(&ch, "src-caught");
    bind(&ch, "dst-caught", "dst-ae", "");
    bind(&ch, "src-caught", "src-ae", "");
    publish(&ch, "src", "unmatched", "m");
    assert_eq!(get_all(&ch, "dst-caught"), ["m"]);
    assert!(get_all(&ch, "src-caught").is_empty());
    broker.check_invariants().unwrap();
}

/// §2.6: alternate exchanges chain, and a loop of AEs is cut (the message is unroutable and
/// returned when mandatory).
#[test]
fn alternate_exchanges_chain_and_loops_are_cut() {
    let (broker, _conn, ch) = setup();
    let returned: Arc<Mutex<Vec<Returned>>> = Arc::default();
    let sink = returned.clone();
    ch.set_return_handler(move |r| sink.lock().unwrap().push(r));
    let with_ae = |name: &str, ae: &str| {
        ch.exchange_declare(
            name,
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::new().with("alternate-exchange", ae),
        )
        .unwrap();
    };
    with_ae("a1", "a2");
    with_ae("a2", "a3");
    declare_exchange(&ch, "a3", ExchangeKind::Fanout);
    declare(&ch, "end");
    bind(&ch, "end", "a3", "");
    with_ae("l1", "l2");
    with_ae("l2", "l1");
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    ch.basic_publish(
        "a1",
        "k",
        mandatory,
        b"chained".to_vec(),
        BasicProperties::default(),
    )
    .unwrap();
    ch.basic_publish(
        "l1",
        "k",
        mandatory,
        b"looped".to_vec(),
        BasicProperties::default(),
    )
    .unwrap();
    assert_eq!(get_all(&ch, "end"), ["chained"]);
    let returned = returned.lock().unwrap();
    assert_eq!(returned.len(), 1);
    assert_eq!(returned[0].exchange, "l1");
    broker.check_invariants().unwrap();
}

/// §2.2: deleting the destination exchange of an auto-delete exchange's only binding deletes
/// the auto-delete exchange.
#[test]
fn auto_delete_exchange_goes_when_e2e_destination_is_deleted() {
    let (broker, _conn, ch) = setup();
    ch.exchange_declare(
        "ad",
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .unwrap();
    declare_exchange(&ch, "dst", ExchangeKind::Fanout);
    ch.exchange_bind("dst", "ad", "", Default::default(), FieldTable::new())
        .unwrap();
    ch.exchange_delete("dst", ExchangeDeleteOptions::default())
        .unwrap();
    assert!(!exchange_exists(&broker, "ad"));
    broker.check_invariants().unwrap();
}

/// §2.5: nested arrays and tables in headers compare structurally.
#[test]
fn headers_nested_values_compare_structurally() {
    let (broker, _conn, ch) = setup();
    let nested = FieldTable::new().with("k", "v");
    bind_headers(
        &ch,
        "q",
        FieldTable::new()
            .with("arr", vec![FieldValue::from("x"), FieldValue::I64(1)])
            .with("tbl", nested.clone()),
    );
    let matching = FieldTable::new()
        .with("arr", vec![FieldValue::from("x"), FieldValue::I64(1)])
        .with("tbl", nested);
    publish_headers(&ch, "amq.headers", "", "same", matching);
    let different = FieldTable::new()
        .with("arr", vec![FieldValue::I64(1), FieldValue::from("x")])
        .with("tbl", FieldTable::new().with("k", "other"));
    publish_headers(&ch, "amq.headers", "", "different", different);
    assert_eq!(get_all(&ch, "q"), ["same"]);
    broker.check_invariants().unwrap();
}

/// An exchange type by name (lapin's `ExchangeKind::Custom`): a built-in name works as that
/// type; any other, RabbitMQ's plugin types included, is RabbitMQ 4.x's 406
/// `unknown exchange type` (a channel error), on a new name and on an existing one alike.
#[test]
fn exchange_types_by_name() {
    let (broker, conn, ch) = setup();
    ch.exchange_declare(
        "by-name",
        ExchangeKind::Custom("topic".into()),
        ExchangeDeclareOptions::default(),
        FieldTable::new(),
    )
    .unwrap();
    declare(&ch, "eu");
    bind(&ch, "eu", "by-name", "orders.eu.*");
    publish(&ch, "by-name", "orders.eu.paris", "routed as a topic");
    assert_eq!(get_all(&ch, "eu"), ["routed as a topic"]);
    // Redeclaring it through the built-in variant is the same type: equivalent.
    ch.exchange_declare(
        "by-name",
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::new(),
    )
    .unwrap();
    for name in [
        "x-consistent-hash",
        "x-delayed-message",
        "x-random",
        "Topic",
    ] {
        for exchange in ["fresh", "by-name"] {
            let ch = conn.channel().unwrap();
            let r = ch.exchange_declare(
                exchange,
                ExchangeKind::Custom(name.into()),
                ExchangeDeclareOptions::default(),
                FieldTable::new(),
            );
            let text = format!("PRECONDITION_FAILED - unknown exchange type '{name}'");
            channel_error(r, ReplyCode::PreconditionFailed, Some(&text));
            assert!(ch.is_closed());
            assert!(!conn.is_closed(), "a channel error");
        }
    }
    assert!(!exchange_exists(&broker, "fresh"));
    broker.check_invariants().unwrap();
}
