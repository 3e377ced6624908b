//! Headers exchange matching: a binding's arguments against a message's `headers` table.
//!
//! Rules (RabbitMQ `rabbit_exchange_type_headers.erl`):
//!
//! - The binding argument `x-match` picks the mode ([`XMatch`]): `all` (the default), `any`,
//!   `all-with-x`, `any-with-x`. `x-match` itself is never compared. `all`/`any` also skip every
//!   other argument whose key starts with `x-`; the `*-with-x` modes compare them.
//! - An argument of type void asks only that the header be present (with any value).
//! - Otherwise the header must be present with an equal value, type tags aside; see
//!   [`headers_match`] for what "equal" means across kinds.
//! - `all` matches when every compared argument matches, so with none it matches every message,
//!   headers or not; `any` matches when at least one does, so with none it matches nothing.

use crate::types::{FieldTable, FieldValue};

/// How a headers binding combines its per-argument matches (binding argument `x-match`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XMatch {
    /// Every argument not starting with `x-` must match (`x-match` absent or `all`).
    All,
    /// At least one argument not starting with `x-` must match.
    Any,
    /// Every argument except `x-match` must match, `x-` ones included.
    AllWithX,
    /// At least one argument other than `x-match` must match, `x-` ones included.
    AnyWithX,
}

impl XMatch {
    /// Whether arguments whose key starts with `x-` are compared (only `x-match` never is).
    fn compares_x_args(self) -> bool {
        matches!(self, XMatch::AllWithX | XMatch::AnyWithX)
    }
}

/// Reads the `x-match` argument of a headers binding.
///
/// Absent means [`XMatch::All`]. Any other value than a long string `all`, `any`, `all-with-x`
/// or `any-with-x` is an error carrying RabbitMQ's text for the 406 PRECONDITION_FAILED reply:
/// `Invalid x-match field value <<"foo">>; expected all, any, all-with-x, or any-with-x` for a
/// long string, `Invalid x-match field type long (value 5); expected longstr` for another type.
/// Values are rendered as Erlang's `~tp` prints them (on one line; Erlang may wrap very long
/// values).
pub fn parse_x_match(args: &FieldTable) -> Result<XMatch, String> {
    let Some(value) = args.get("x-match") else {
        return Ok(XMatch::All);
    };
    match value {
        FieldValue::LongString(text) => match &text[..] {
            b"all" => Ok(XMatch::All),
            b"any" => Ok(XMatch::Any),
            b"all-with-x" => Ok(XMatch::AllWithX),
            b"any-with-x" => Ok(XMatch::AnyWithX),
            other => Err(format!(
                "Invalid x-match field value {}; expected all, any, all-with-x, or any-with-x",
                erlang_binary(other)
            )),
        },
        other => Err(format!(
            "Invalid x-match field type {} (value {}); expected longstr",
            other.type_name(),
            erlang_value(other)
        )),
    }
}

/// Whether a message with `headers` (`None`: the message has no headers table) matches a headers
/// binding with arguments `binding_args` under mode `x_match` (normally from [`parse_x_match`]
/// on the same arguments).
///
/// A non-void argument matches when the header of the same key is present and its value equals
/// the argument's, comparing values as RabbitMQ does (it drops the AMQP type tags of top-level
/// values and compares the bare Erlang terms):
///
/// - integers of every kind compare by value (`signedint 5` equals `long 5`); integers and
///   floats compare by value too (`double 5.0` equals `signedint 5`, as RabbitMQ 3.10
///   compares them with Erlang `==`);
/// - a `float` compares as the double it widens to (`float 0.1` is not `double 0.1`);
/// - long strings and byte arrays compare by bytes, with each other too (both are Erlang
///   binaries); a string never equals a number (`longstr "5"` is not `long 5`);
/// - booleans equal booleans, decimals equal decimals with the same scale and digits;
/// - a void header holds no value, so it satisfies only a void (presence) argument;
/// - nested arrays and tables compare structurally *with* their elements' type tags, as
///   RabbitMQ does (inside an array or table it keeps `{Type, Value}` pairs): `[long 5]` is not
///   `[signedint 5]`. Our tables are key-sorted, so entry order never matters, where RabbitMQ
///   compares nested tables in wire order. An empty array and an empty table are equal: both
///   are the empty Erlang list.
///
/// Timestamps: RabbitMQ 4.x converts a message's top-level `timestamp` header from seconds to
/// milliseconds before comparing, but leaves binding arguments as they are. So a `timestamp`
/// header of `5` matches a `long 5000` argument here as there, and a `timestamp 5` argument
/// matches a `long 5` header. A `timestamp` argument against a `timestamp` header compares the
/// seconds directly: RabbitMQ would compare `5` with `5000` and never match the same instant,
/// which no user can want (RabbitMQ 3.x, without the conversion, matched them too).
pub fn headers_match(
    x_match: XMatch,
    binding_args: &FieldTable,
    headers: Option<&FieldTable>,
) -> bool {
    let mut compared = binding_args.iter().filter(|(key, _)| {
        *key != "x-match" && (x_match.compares_x_args() || !key.starts_with("x-"))
    });
    let arg_matches = |(key, arg): (&str, &FieldValue)| match headers.and_then(|h| h.get(key)) {
        None => false,
        Some(header) => matches!(arg, FieldValue::Void) || value_matches(arg, header),
    };
    match x_match {
        XMatch::All | XMatch::AllWithX => compared.all(arg_matches),
        XMatch::Any | XMatch::AnyWithX => compared.any(arg_matches),
    }
}

/// Whether a message header value equals a (non-void) binding argument value, per
/// [`headers_match`].
fn value_matches(arg: &FieldValue, header: &FieldValue) -> bool {
    use FieldValue::*;
    if let (Timestamp(arg), Timestamp(header)) = (arg, header) {
        return arg == header;
    }
    if let (Some(arg), Some(header)) = (Number::of_arg(arg), Number::of_header(header)) {
        return arg.equals(header);
    }
    match (arg, header) {
        (LongString(a) | ByteArray(a), LongString(h) | ByteArray(h)) => a == h,
        (Bool(a), Bool(h)) => a == h,
        (
            Decimal {
                scale: sa,
                value: va,
            },
            Decimal {
                scale: sh,
                value: vh,
            },
        ) => sa == sh && va == vh,
        // Tag-sensitive structural equality: `FieldValue`'s derived `PartialEq`.
        (Array(a), Array(h)) => a == h,
        (Table(a), Table(h)) => a == h,
        // Both are Erlang lists once their tag is dropped (`mc_amqpl:routing_value/2` keeps
        // the value as is), and the empty ones are the same list, `[]`.
        (Array(a), Table(h)) => a.is_empty() && h.is_empty(),
        (Table(a), Array(h)) => a.is_empty() && h.is_empty(),
        _ => false,
    }
}

/// A numeric value as Erlang holds it once the type tag is dropped: an integer (of any size) or
/// a double.
#[derive(Clone, Copy, Debug)]
enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    /// The number a binding argument holds, if numeric (a timestamp is its seconds).
    fn of_arg(value: &FieldValue) -> Option<Number> {
        match *value {
            FieldValue::Timestamp(seconds) => Some(Number::Int(seconds.into())),
            _ => Self::of_value(value),
        }
    }

    /// The number a message header holds, if numeric (a timestamp is in milliseconds, as
    /// RabbitMQ 4.x converts it; `i128` holds `u64::MAX * 1000` without overflow).
    fn of_header(value: &FieldValue) -> Option<Number> {
        match *value {
            FieldValue::Timestamp(seconds) => Some(Number::Int(i128::from(seconds) * 1000)),
            _ => Self::of_value(value),
        }
    }

    /// Integers and floats; decimals are not numbers here (Erlang keeps them as tuples).
    fn of_value(value: &FieldValue) -> Option<Number> {
        match *value {
            FieldValue::I8(v) => Some(Number::Int(v.into())),
            FieldValue::U8(v) => Some(Number::Int(v.into())),
            FieldValue::I16(v) => Some(Number::Int(v.into())),
            FieldValue::U16(v) => Some(Number::Int(v.into())),
            FieldValue::I32(v) => Some(Number::Int(v.into())),
            FieldValue::U32(v) => Some(Number::Int(v.into())),
            FieldValue::I64(v) => Some(Number::Int(v.into())),
            FieldValue::F32(v) => Some(Number::Float(v.into())),
            FieldValue::F64(v) => Some(Number::Float(v)),
            _ => None,
        }
    }

    /// Exact equality by value, like Erlang `==` between numbers.
    fn equals(self, other: Number) -> bool {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => a == b,
            (Number::Float(a), Number::Float(b)) => a == b,
            (Number::Int(i), Number::Float(f)) | (Number::Float(f), Number::Int(i)) => {
                float_equals_int(f, i)
            }
        }
    }
}

/// Whether `f` is exactly the integer `i`, without rounding `i` to a double on the way.
fn float_equals_int(f: f64, i: i128) -> bool {
    // 2^127: doubles in [-2^127, 2^127) with no fraction convert to i128 exactly.
    const LIMIT: f64 = 170_141_183_460_469_231_731_687_303_715_884_105_728.0;
    f.fract() == 0.0 && (-LIMIT..LIMIT).contains(&f) && f as i128 == i
}

/// A field value rendered as Erlang's `~tp` prints the term RabbitMQ holds for it.
fn erlang_value(value: &FieldValue) -> String {
    match value {
        FieldValue::Bool(b) => b.to_string(),
        FieldValue::I8(_)
        | FieldValue::U8(_)
        | FieldValue::I16(_)
        | FieldValue::U16(_)
        | FieldValue::I32(_)
        | FieldValue::U32(_)
        | FieldValue::I64(_) => value.render(),
        FieldValue::F32(v) => erlang_float(f64::from(*v)),
        FieldValue::F64(v) => erlang_float(*v),
        FieldValue::Decimal { scale, value } => format!("{{{scale},{value}}}"),
        FieldValue::LongString(b) | FieldValue::ByteArray(b) => erlang_binary(b),
        FieldValue::Timestamp(t) => t.to_string(),
        FieldValue::Void => "undefined".to_owned(),
        FieldValue::Array(items) => {
            let items: Vec<String> = items
                .iter()
                .map(|v| format!("{{{},{}}}", v.type_name(), erlang_value(v)))
                .collect();
            format!("[{}]", items.join(","))
        }
        FieldValue::Table(table) => {
            let entries: Vec<String> = table
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{{{},{},{}}}",
                        erlang_binary(k.as_bytes()),
                        v.type_name(),
                        erlang_value(v)
                    )
                })
                .collect();
            format!("[{}]", entries.join(","))
        }
    }
}

/// A double as Erlang prints it: shortest round-trip digits, always with a `.` in the mantissa
/// (`5.0`, `1.0e20`). Erlang switches to exponent form at other magnitudes than Rust does, so
/// very large or small values may differ in form, never in value.
fn erlang_float(v: f64) -> String {
    let text = format!("{v:?}");
    match text.split_once('e') {
        Some((mantissa, exponent)) if !mantissa.contains('.') => format!("{mantissa}.0e{exponent}"),
        _ => text,
    }
}

/// A binary as Erlang's `~tp` prints it: `<<"text">>` when every byte is printable ASCII (or a
/// common escape), `<<"text"/utf8>>` for printable UTF-8 beyond ASCII, else the bytes
/// (`<<0,255>>`). Erlang would also print printable Latin-1 that is not UTF-8 as text; we print
/// its bytes.
fn erlang_binary(bytes: &[u8]) -> String {
    let escape = |c: char| match c {
        '"' => Some("\\\"".to_owned()),
        '\\' => Some("\\\\".to_owned()),
        '\n' => Some("\\n".to_owned()),
        '\r' => Some("\\r".to_owned()),
        '\t' => Some("\\t".to_owned()),
        '\u{b}' => Some("\\v".to_owned()),
        '\u{8}' => Some("\\b".to_owned()),
        '\u{c}' => Some("\\f".to_owned()),
        '\u{1b}' => Some("\\e".to_owned()),
        c if c.is_control() => None,
        c => Some(c.to_string()),
    };
    if bytes.is_empty() {
        return "<<>>".to_owned();
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        let printed: Option<String> = text.chars().map(escape).collect();
        if let Some(printed) = printed {
            let suffix = if text.is_ascii() { "" } else { "/utf8" };
            return format!("<<\"{printed}\"{suffix}>>");
        }
    }
    let items: Vec<String> = bytes.iter().map(u8::to_string).collect();
    format!("<<{}>>", items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
        entries.iter().cloned().collect()
    }

    /// `headers_match` with the mode parsed from the arguments, as the broker calls it.
    fn matches(args: &FieldTable, headers: Option<&FieldTable>) -> bool {
        headers_match(
            parse_x_match(args).expect("test arguments are valid"),
            args,
            headers,
        )
    }

    /// Whether a binding `{key: arg}` matches a message `{key: header}`.
    fn value_match(arg: FieldValue, header: FieldValue) -> bool {
        matches(&table(&[("k", arg)]), Some(&table(&[("k", header)])))
    }

    #[test]
    fn parse_x_match_reads_the_four_modes_and_defaults_to_all() {
        assert_eq!(parse_x_match(&FieldTable::new()), Ok(XMatch::All));
        assert_eq!(
            parse_x_match(&table(&[("foo", "any".into())])),
            Ok(XMatch::All)
        );
        for (text, mode) in [
            ("all", XMatch::All),
            ("any", XMatch::Any),
            ("all-with-x", XMatch::AllWithX),
            ("any-with-x", XMatch::AnyWithX),
        ] {
            assert_eq!(parse_x_match(&table(&[("x-match", text.into())])), Ok(mode));
        }
    }

    #[test]
    fn parse_x_match_rejects_other_values_with_rabbitmq_text() {
        let err = |v: FieldValue| parse_x_match(&table(&[("x-match", v)])).unwrap_err();
        assert_eq!(
            err("foo".into()),
            "Invalid x-match field value <<\"foo\">>; expected all, any, all-with-x, or any-with-x"
        );
        assert_eq!(
            err("ALL".into()),
            "Invalid x-match field value <<\"ALL\">>; expected all, any, all-with-x, or any-with-x"
        );
        assert_eq!(
            err(FieldValue::I64(5)),
            "Invalid x-match field type long (value 5); expected longstr"
        );
        assert_eq!(
            err(FieldValue::ByteArray(Bytes::from_static(b"all"))),
            "Invalid x-match field type binary (value <<\"all\">>); expected longstr"
        );
        assert_eq!(
            err(FieldValue::Void),
            "Invalid x-match field type void (value undefined); expected longstr"
        );
        assert_eq!(
            err(FieldValue::Bool(true)),
            "Invalid x-match field type bool (value true); expected longstr"
        );
        assert_eq!(
            err(FieldValue::F64(1e20)),
            "Invalid x-match field type double (value 1.0e20); expected longstr"
        );
        assert_eq!(
            err(FieldValue::Array(vec![FieldValue::I32(1), "a".into()])),
            "Invalid x-match field type array (value [{signedint,1},{longstr,<<\"a\">>}]); expected longstr"
        );
    }

    #[test]
    fn erlang_binaries_print_like_tp() {
        assert_eq!(erlang_binary(b""), "<<>>");
        assert_eq!(erlang_binary(b"a\"b\\c\n"), "<<\"a\\\"b\\\\c\\n\">>");
        assert_eq!(erlang_binary("héllo".as_bytes()), "<<\"héllo\"/utf8>>");
        assert_eq!(erlang_binary(&[0, 255]), "<<0,255>>");
        assert_eq!(
            erlang_value(&FieldValue::Decimal {
                scale: 2,
                value: 500
            }),
            "{2,500}"
        );
        assert_eq!(erlang_value(&FieldValue::F32(0.5)), "0.5");
        assert_eq!(
            erlang_value(&FieldValue::Table(table(&[("k", FieldValue::U8(1))]))),
            "[{<<\"k\">>,unsignedbyte,1}]"
        );
    }

    #[test]
    fn exchanges_suite_all_and_any() {
        let q1 = table(&[
            ("x-match", "all".into()),
            ("foo", "bar".into()),
            ("fuu", "ber".into()),
        ]);
        let q2 = table(&[
            ("x-match", "any".into()),
            ("foo", "bar".into()),
            ("fuu", "ber".into()),
        ]);
        let both = table(&[("foo", "bar".into()), ("fuu", "ber".into())]);
        let one = table(&[("foo", "bar".into())]);
        assert!(matches(&q1, Some(&both)));
        assert!(matches(&q2, Some(&both)));
        assert!(!matches(&q1, Some(&one)));
        assert!(matches(&q2, Some(&one)));
        assert!(!matches(&q1, None));
        assert!(!matches(&q2, None));
        assert!(!matches(&q1, Some(&FieldTable::new())));
    }

    #[test]
    fn all_without_compared_args_matches_everything_and_any_nothing() {
        let all = table(&[("x-match", "all".into()), ("x-foo", "bar".into())]);
        let any = table(&[("x-match", "any".into()), ("x-foo", "bar".into())]);
        let headers = table(&[("x-foo", "bar".into())]);
        assert!(matches(&FieldTable::new(), None));
        assert!(matches(&all, None));
        assert!(matches(&all, Some(&headers)));
        assert!(!matches(&any, None));
        assert!(
            !matches(&any, Some(&headers)),
            "x- args are not compared by any"
        );
        assert!(!matches(
            &table(&[("x-match", "any".into())]),
            Some(&headers)
        ));
        // The with-x modes with only x-match behave the same.
        assert!(matches(&table(&[("x-match", "all-with-x".into())]), None));
        assert!(!matches(
            &table(&[("x-match", "any-with-x".into())]),
            Some(&headers)
        ));
    }

    #[test]
    fn with_x_modes_compare_x_args_but_not_x_match() {
        let all_x = table(&[
            ("x-match", "all-with-x".into()),
            ("x-foo", "bar".into()),
            ("a", 1i32.into()),
        ]);
        let any_x = table(&[
            ("x-match", "any-with-x".into()),
            ("x-foo", "bar".into()),
            ("a", 1i32.into()),
        ]);
        let x_only = table(&[("x-foo", "bar".into())]);
        let both = table(&[("x-foo", "bar".into()), ("a", 1i64.into())]);
        let wrong_x = table(&[("x-foo", "baz".into()), ("a", 1i64.into())]);
        assert!(matches(&all_x, Some(&both)));
        assert!(!matches(&all_x, Some(&x_only)));
        assert!(!matches(&all_x, Some(&wrong_x)));
        assert!(matches(&any_x, Some(&x_only)));
        assert!(matches(&any_x, Some(&wrong_x)));
        // A message header "x-match" is irrelevant: the binding's x-match is never compared.
        assert!(matches(
            &table(&[("x-match", "all-with-x".into())]),
            Some(&table(&[("x-match", "any".into())]))
        ));
        // The plain modes ignore the x- argument.
        let all = table(&[
            ("x-match", "all".into()),
            ("x-foo", "bar".into()),
            ("a", 1i32.into()),
        ]);
        assert!(matches(&all, Some(&wrong_x)));
    }

    #[test]
    fn void_args_ask_for_presence_only() {
        let args = table(&[("x-match", "all".into()), ("k", FieldValue::Void)]);
        assert!(matches(&args, Some(&table(&[("k", "anything".into())]))));
        assert!(matches(&args, Some(&table(&[("k", FieldValue::Void)]))));
        assert!(matches(
            &args,
            Some(&table(&[("k", FieldValue::Array(vec![]))]))
        ));
        assert!(!matches(&args, Some(&table(&[("j", 1i32.into())]))));
        assert!(!matches(&args, None));
        let any = table(&[
            ("x-match", "any".into()),
            ("k", FieldValue::Void),
            ("j", 2i32.into()),
        ]);
        assert!(matches(&any, Some(&table(&[("k", 0i32.into())]))));
        // A void header satisfies only a presence check.
        assert!(!value_match("v".into(), FieldValue::Void));
    }

    #[test]
    fn integers_compare_by_value_across_kinds() {
        assert!(value_match(FieldValue::I32(5), FieldValue::I64(5)));
        assert!(value_match(FieldValue::U8(5), FieldValue::I16(5)));
        assert!(value_match(
            FieldValue::U32(u32::MAX),
            FieldValue::I64(u32::MAX.into())
        ));
        assert!(value_match(FieldValue::I8(-1), FieldValue::I64(-1)));
        assert!(!value_match(FieldValue::I32(5), FieldValue::I32(6)));
        assert!(!value_match(FieldValue::U16(u16::MAX), FieldValue::I16(-1)));
    }

    #[test]
    fn numbers_compare_by_value_across_integers_and_floats() {
        assert!(value_match(FieldValue::I32(5), FieldValue::F64(5.0)));
        assert!(value_match(FieldValue::F64(5.0), FieldValue::I64(5)));
        assert!(value_match(FieldValue::I64(5), FieldValue::F32(5.0)));
        assert!(!value_match(FieldValue::I32(5), FieldValue::F64(5.5)));
        assert!(value_match(FieldValue::F32(1.5), FieldValue::F64(1.5)));
        assert!(
            !value_match(FieldValue::F32(0.1), FieldValue::F64(0.1)),
            "float widens to a different double"
        );
        // No rounding through f64: 2^53 + 1 is not the double 2^53.
        assert!(!value_match(
            FieldValue::I64((1 << 53) + 1),
            FieldValue::F64(9_007_199_254_740_992.0)
        ));
        assert!(value_match(
            FieldValue::I64(1 << 53),
            FieldValue::F64(9_007_199_254_740_992.0)
        ));
        assert!(!value_match(
            FieldValue::I64(i64::MAX),
            FieldValue::F64(f64::INFINITY)
        ));
        assert!(!value_match(
            FieldValue::F64(f64::NAN),
            FieldValue::F64(f64::NAN)
        ));
    }

    #[test]
    fn strings_never_equal_numbers_and_binaries_compare_by_bytes() {
        assert!(!value_match("5".into(), FieldValue::I64(5)));
        assert!(!value_match(FieldValue::I64(5), "5".into()));
        assert!(value_match("bar".into(), "bar".into()));
        assert!(!value_match("bar".into(), "Bar".into()));
        assert!(value_match(
            "bar".into(),
            FieldValue::ByteArray(Bytes::from_static(b"bar"))
        ));
        assert!(value_match(
            FieldValue::ByteArray(Bytes::from_static(b"\xff")),
            FieldValue::LongString(Bytes::from_static(b"\xff"))
        ));
    }

    #[test]
    fn bools_and_decimals_compare_within_their_kind() {
        assert!(value_match(true.into(), true.into()));
        assert!(!value_match(true.into(), false.into()));
        assert!(!value_match(true.into(), FieldValue::I8(1)));
        assert!(!value_match(FieldValue::U8(0), false.into()));
        let dec = |scale, value| FieldValue::Decimal { scale, value };
        assert!(value_match(dec(2, 500), dec(2, 500)));
        assert!(!value_match(dec(2, 500), dec(1, 50)));
        assert!(!value_match(dec(0, 5), FieldValue::I64(5)));
    }

    #[test]
    fn timestamps_compare_as_numbers() {
        let ts = FieldValue::Timestamp;
        assert!(value_match(ts(5), ts(5)));
        assert!(!value_match(ts(5), ts(6)));
        // A timestamp header is in milliseconds for any non-timestamp argument ...
        assert!(value_match(FieldValue::I64(5000), ts(5)));
        assert!(!value_match(FieldValue::I64(5), ts(5)));
        assert!(value_match(FieldValue::F64(5000.0), ts(5)));
        // ... while a timestamp argument stays in seconds.
        assert!(value_match(ts(5), FieldValue::I64(5)));
        assert!(!value_match(ts(5), FieldValue::I64(5000)));
        // No overflow on the conversion.
        assert!(!value_match(FieldValue::I64(i64::MAX), ts(u64::MAX)));
        assert!(!value_match("5".into(), ts(5)));
    }

    #[test]
    fn nested_values_compare_structurally_with_type_tags() {
        let arr = |items: Vec<FieldValue>| FieldValue::Array(items);
        assert!(value_match(
            arr(vec![FieldValue::I32(1), "a".into()]),
            arr(vec![FieldValue::I32(1), "a".into()])
        ));
        assert!(!value_match(
            arr(vec![FieldValue::I32(1), "a".into()]),
            arr(vec!["a".into(), FieldValue::I32(1)])
        ));
        assert!(!value_match(
            arr(vec![FieldValue::I32(5)]),
            arr(vec![FieldValue::I64(5)])
        ));
        // An empty array and an empty table are both the Erlang list `[]` to RabbitMQ.
        assert!(value_match(
            arr(vec![]),
            FieldValue::Table(FieldTable::new())
        ));
        assert!(value_match(
            FieldValue::Table(FieldTable::new()),
            arr(vec![])
        ));
        assert!(!value_match(
            arr(vec![FieldValue::I32(1)]),
            FieldValue::Table(table(&[("a", 1i32.into())]))
        ));
        let inner = table(&[("x", 1i32.into()), ("y", arr(vec![true.into()]))]);
        assert!(value_match(
            FieldValue::Table(inner.clone()),
            FieldValue::Table(inner.clone())
        ));
        let other = table(&[("x", 1i64.into()), ("y", arr(vec![true.into()]))]);
        assert!(!value_match(
            FieldValue::Table(inner),
            FieldValue::Table(other)
        ));
    }

    #[test]
    fn all_needs_every_compared_arg_and_any_needs_one() {
        let args = |mode: &str| {
            table(&[
                ("x-match", mode.into()),
                ("a", 1i32.into()),
                ("b", "two".into()),
            ])
        };
        let a_only = table(&[("a", 1i64.into()), ("c", "extra".into())]);
        let both = table(&[
            ("a", 1i8.into()),
            ("b", "two".into()),
            ("c", "extra".into()),
        ]);
        let wrong = table(&[("a", 2i64.into()), ("b", "TWO".into())]);
        assert!(!matches(&args("all"), Some(&a_only)));
        assert!(matches(&args("all"), Some(&both)));
        assert!(!matches(&args("all"), Some(&wrong)));
        assert!(matches(&args("any"), Some(&a_only)));
        assert!(matches(&args("any"), Some(&both)));
        assert!(!matches(&args("any"), Some(&wrong)));
    }
}
