#!/usr/bin/env python3
"""Writes the hand-written seed corpora of the fuzz targets (fuzz/corpus/<target>/).

topic_match: one file per routing_SUITE key with every pattern of SEMANTICS.md section 2.5's
matrix, plus edge cases. Format: key 0xFF pattern 0xFF pattern ... (see
coney::fuzzing::topic_match). Characters outside "abc.*#" are mapped onto it by the target, so
seeds use only those.

headers_match, field_table_codec, queue_commands: one file per rule or scenario, in the byte
formats their doc comments in src/fuzzing.rs describe (helpers below name the bytes). After a
fuzzing run the corpora are minimised with `cargo fuzz cmin`, so the committed files are not all
from here.
"""
import hashlib
import pathlib

SEP = b"\xff"
MATRIX_PATTERNS = ["a.b.c", "a.*.c", "a.#.b", "#", "#.#", "#.b", "*.*", "a.*", "a.#", "a.#.#",
                   "", "*", "*.#", "#.*.#", "*.#.#", "#.b.#", "*.*.*"]
# "oneword" of the matrix becomes "c": one word in the target's alphabet.
MATRIX_KEYS = ["a.b.c", "a.b", "a.b.b", "", "c", "a.a.a.a.a"]
CASES = [
    # The matrix: each key against all patterns, and against each pattern alone.
    *[(key, MATRIX_PATTERNS) for key in MATRIX_KEYS],
    *[("a.b.b", [p]) for p in MATRIX_PATTERNS],
    # Edge rules.
    ("a", ["a.#", "a.#.#", "a"]),
    ("a.b", ["a.#.b", "a.#.#.b"]),
    ("", ["*", "#.*.#", "", "#"]),
    ("a..b", ["a.*.b", "a.b", "a..b", "*.*.*"]),
    (".", ["*.*", "*", ".", "#.#"]),
    ("ab", ["a*", "#b", "ab", "*"]),
    ("a*.#b", ["a*.#b", "*.*", "a*.#"]),
    ("a.b.c.a.b.c", ["#.#.#.#.#", "#.a.#.c", "a.#.c.#", "*.#.*"]),
    ("a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a", ["#.#", "#.a", "a.#.a.#.a", "*.*.#.*.*"]),
    ("c.c.c", ["c.#", "c.*", "#.c.#.c.#.c.#"]),
    # As many `#` words as 255 bytes hold, alone and with words between, against a long key.
    (".".join(["a"] * 127), [".".join(["#"] * 128),
                             ".".join("#" if i % 2 == 0 else "a" for i in range(127)),
                             ".".join(["#"] * 126 + ["b"]),
                             ".".join("#" if i % 2 == 0 else "*" for i in range(127))]),
]


# ---- headers_match: indexes into the pools of src/fuzzing.rs --------------------------------
KEYS = {"a": 0, "b": 1, "c": 2, "x-a": 3, "x-b": 4, "x-match": 5, "X-a": 6, "": 7}
INTS = {0: 0, 1: 1, -1: 2, 5: 3, 127: 4, -128: 5, 255: 6, 5000: 7, 65535: 8, -32768: 9,
        2**31 - 1: 10, 2**32 - 1: 11, 2**53: 12, 2**53 + 1: 13, 2**63 - 1: 14, -2**63: 15}
DOUBLES = {"0": 0, "-0": 1, "1": 2, "5": 3, "5.5": 4, "0.1": 5, "-1": 6, "5000": 7, "2^53": 8,
           "2^63": 9, "nan": 10, "inf": 11, "-inf": 12, "255": 13}
FLOATS = {"0": 0, "-0": 1, "1": 2, "5": 3, "5.5": 4, "0.1": 5, "5000": 6, "nan": 7, "inf": 8,
          "2^32": 9}
DECIMALS = {(0, 5): 0, (0, 0): 1, (1, 50): 2, (2, 500): 3}
STRINGS = {"": 0, "5": 1, "5000": 2, "bar": 3, "all": 4, "any": 5, "any-with-x": 6,
           "\xff\x00": 7, "true": 8, "long": 9}
STAMPS = {0: 0, 5: 1, 1: 2, 5000: 3, 1700000000: 4, 2**64 - 1: 5}
WIDTHS = {"i8": 1, "u8": 2, "i16": 3, "u16": 4, "i32": 5, "u32": 6, "i64": 7}
XMATCH = {None: 0, "all": 1, "any": 2, "all-with-x": 3, "any-with-x": 4, "bad-text": 5,
          "bad-type": 6}


def boolean(b): return [0, int(b)]
def integer(width, v): return [WIDTHS[width], INTS[v]]
def f32(v): return [8, FLOATS[v]]
def f64(v): return [9, DOUBLES[v]]
def decimal(scale, value): return [10, DECIMALS[(scale, value)]]
def longstr(s): return [11, STRINGS[s]]
def binary(s): return [12, STRINGS[s]]
def stamp(v): return [13, STAMPS[v]]
def array(*values): return [14, len(values)] + [b for v in values for b in v]
def void(): return [16]


def table(entries):
    return [len(entries)] + [b for k, v in entries for b in [KEYS[k]] + v]


def nested(entries): return [15] + table(entries)


def headers_case(x_match, args, headers):
    # A wrong text is one of several: the byte after the selector picks it.
    data = [XMATCH[x_match]] + ([0] if x_match == "bad-text" else []) + table(args)
    data += [0] if headers is None else [1] + table(headers)
    return bytes(data)


HEADERS_CASES = [
    # exchanges_SUITE: all and any over two string arguments.
    headers_case("all", [("a", longstr("bar")), ("b", longstr("5"))],
                 [("a", longstr("bar")), ("b", longstr("5"))]),
    headers_case("all", [("a", longstr("bar")), ("b", longstr("5"))], [("a", longstr("bar"))]),
    headers_case("any", [("a", longstr("bar")), ("b", longstr("5"))], [("a", longstr("bar"))]),
    headers_case("any", [("a", longstr("bar"))], None),
    # No compared arguments: all matches everything, any nothing.
    headers_case(None, [], None),
    headers_case("all", [("x-a", longstr("bar"))], None),
    headers_case("any", [("x-a", longstr("bar"))], [("x-a", longstr("bar"))]),
    # The with-x modes compare x- arguments, never x-match.
    headers_case("all-with-x", [("x-a", longstr("bar")), ("a", integer("i32", 1))],
                 [("x-a", longstr("bar")), ("a", integer("i64", 1))]),
    headers_case("any-with-x", [("x-a", longstr("bar")), ("X-a", longstr("5"))],
                 [("x-a", longstr("bar")), ("x-match", longstr("any"))]),
    # Void asks for presence only; a void header satisfies only that.
    headers_case("all", [("a", void())], [("a", longstr("any"))]),
    headers_case("any", [("a", void()), ("b", integer("i8", 5))], [("b", void())]),
    # Numbers by value across widths and floats; strings never equal numbers.
    headers_case("all", [("a", integer("i32", 5))], [("a", integer("i64", 5))]),
    headers_case("all", [("a", integer("u16", 65535))], [("a", integer("i16", -1))]),
    headers_case("all", [("a", integer("i32", 5))], [("a", f64("5"))]),
    headers_case("all", [("a", f32("5"))], [("a", integer("u8", 5))]),
    headers_case("all", [("a", f64("-0"))], [("a", integer("i64", 0))]),
    headers_case("all", [("a", f64("nan"))], [("a", f64("nan"))]),
    headers_case("all", [("a", f32("0.1"))], [("a", f64("0.1"))]),
    headers_case("all", [("a", integer("i64", 2**53 + 1))], [("a", f64("2^53"))]),
    headers_case("all", [("a", integer("i64", 2**63 - 1))], [("a", f64("2^63"))]),
    headers_case("all", [("a", longstr("5"))], [("a", integer("i64", 5))]),
    headers_case("all", [("a", binary("bar"))], [("a", longstr("bar"))]),
    headers_case("all", [("a", boolean(True))], [("a", integer("u8", 1))]),
    headers_case("all", [("a", decimal(2, 500))], [("a", decimal(1, 50))]),
    headers_case("all", [("a", decimal(0, 5))], [("a", integer("i64", 5))]),
    # Timestamps: a header's seconds become milliseconds, except against a timestamp argument.
    headers_case("all", [("a", integer("i64", 5000))], [("a", stamp(5))]),
    headers_case("all", [("a", stamp(5))], [("a", stamp(5))]),
    headers_case("all", [("a", stamp(5))], [("a", integer("i32", 5))]),
    headers_case("all", [("a", integer("i64", 2**63 - 1))], [("a", stamp(2**64 - 1))]),
    # Nested values compare with their elements' type tags.
    headers_case("all", [("a", array(integer("i32", 1), longstr("bar")))],
                 [("a", array(integer("i32", 1), longstr("bar")))]),
    headers_case("all", [("a", array(integer("i32", 5)))], [("a", array(integer("i64", 5)))]),
    headers_case("all", [("a", nested([("b", stamp(5)), ("c", array(boolean(True)))]))],
                 [("a", nested([("c", array(boolean(True))), ("b", stamp(5))]))]),
    headers_case("all", [("a", array())], [("a", nested([]))]),
    # x-match values parse_x_match refuses.
    headers_case("bad-text", [("a", longstr("bar"))], [("a", longstr("bar"))]),
    headers_case("bad-type", [("a", longstr("bar"))], [("a", longstr("bar"))]),
    bytes([7, 11, 4]) + bytes(table([("a", longstr("long"))])) + bytes([1]) +
    bytes(table([("a", binary("long"))])),
]


# ---- field_table_codec: wire bytes (also read as a table-building program) -------------------
def wire_table(entries):
    body = b"".join(bytes([len(k)]) + k + v for k, v in entries)
    return len(body).to_bytes(4, "big") + body


def wire_long(tag, data): return tag + len(data).to_bytes(4, "big") + data


def wire_array(*values):
    body = b"".join(values)
    return b"A" + len(body).to_bytes(4, "big") + body


def deep(levels):
    data = wire_table([])
    for _ in range(levels - 1):
        data = wire_table([(b"k", b"F" + data)])
    return data


CODEC_CASES = [
    wire_table([]),
    wire_table([(b"t", b"t\x01"), (b"f", b"t\x07"), (b"b", b"b\xfe"), (b"B", b"B\xfe"),
                (b"s", b"s\xff\xfe"), (b"u", b"u\xff\xfe"), (b"I", b"I\xff\xff\xff\xfe"),
                (b"i", b"i\x01\x02\x03\x04"), (b"l", b"l" + (2**63 - 1).to_bytes(8, "big")),
                (b"V", b"V")]),
    wire_table([(b"f", b"f\x7f\xc0\x00\x01"), (b"d", b"d\x7f\xf8\x00\x00\xde\xad\xbe\xef"),
                (b"z", b"d\x80" + bytes(7)), (b"D", b"D\x02\x00\x00\x01\xf4"),
                (b"T", b"T" + (1700000000).to_bytes(8, "big"))]),
    wire_table([(b"S", wire_long(b"S", b"text")), (b"x", wire_long(b"x", b"\x00\xff")),
                (b"e", wire_long(b"S", b""))]),
    wire_table([(b"A", wire_array(b"b\x01", wire_long(b"S", b"a"), b"V", wire_array())),
                (b"F", b"F" + wire_table([(b"k", b"B\x01"), (b"j", wire_array(b"t\x00"))]))]),
    wire_table([(b"k" * 255, b"V")]),
    deep(32),
    deep(33),
    wire_table([(b"k", b"V"), (b"k", b"B\x01")]),
    wire_table([(b"\xff", b"V")]),
    wire_table([(b"k", b"Z")]),
    wire_table([(b"k", b"S\xff\xff\xff\xffabc")]),
    wire_table([(b"k", wire_long(b"S", b"abcdef"))])[:-2],
    b"\xff\xff\xff\xff",
    wire_table([(b"b", b"B\x02"), (b"a", b"B\x01")]) + b"trailing",
]


# ---- queue_commands: configuration bytes, then commands -------------------------------------
def queue_case(quorum=0, sac=0, ttl=0, max_len=0, max_bytes=0, limit=0, prio=0, overflow=0,
               commands=()):
    """Indexes: ttl None/None/0/5/100, max_len None/0/1/3, max_bytes None/None/20/60, limit
    None/-1/0/2, prio None/None/3, overflow None/drop-head/reject-publish/reject-publish-dlx."""
    return bytes([quorum, sac, ttl, max_len, max_bytes, limit, prio, overflow]) + bytes(
        b for c in commands for b in c)


def publish(pad=0, prio=0): return [0, pad, prio]
def publish_exp(exp, pad=0, prio=0): return [1, pad, exp, prio]  # exp: 0 "0", 2 "5", 5 "-1"
def consume(no_ack=False, prefetch=0, prio=0, exclusive=False):
    return [2, 0 if no_ack else 1, prefetch, prio, 0 if exclusive else 1]
def cancel(pick=0): return [3, pick]
def dispatch(undelivered=False): return [4, 0 if undelivered else 1]
PASS = [5]
def ack(pick=0): return [6, pick]
def reject(pick=0): return [7, pick]
def requeue(pick=0): return [8, pick]
def give_back(pick=0): return [9, pick]
def get(no_ack=False): return [10, 0 if no_ack else 1]
PURGE = [11]
def later(index): return [12, index]  # 1, 2, 5, 100, 1000 ms
HOUSEKEEPING = [13]
def credit(pick=0, count=0): return [14, pick, count]
def settle_gone(op=0, pick=0): return [15, op, pick]


QUEUE_CASES = [
    queue_case(commands=[publish(), publish(), consume(prefetch=1), PASS, ack(), PASS, ack()]),
    queue_case(commands=[publish(), publish(), get(), get(), publish(), give_back(1),
                         give_back(0), get(True), PASS, settle_gone()]),
    queue_case(quorum=1, limit=3, commands=[publish(), consume(prefetch=1), PASS, requeue(), PASS,
                                            requeue(), PASS, requeue(), PASS, requeue()]),
    queue_case(quorum=1, limit=1, commands=[publish(), publish(), get(), get(), requeue(0),
                                            requeue(0), get(), settle_gone(2)]),
    queue_case(ttl=3, commands=[publish(), later(2), publish_exp(0), consume(), PASS, later(3),
                                get(), HOUSEKEEPING]),
    queue_case(commands=[consume(prefetch=1), publish_exp(0), PASS, publish_exp(2), later(2),
                         PASS, ack(), later(3), PASS]),
    queue_case(max_len=2, commands=[publish(), publish(), publish(), HOUSEKEEPING, get(),
                                    give_back(), HOUSEKEEPING]),
    queue_case(max_len=3, overflow=2, commands=[publish(), publish(), publish(), publish()]),
    queue_case(max_bytes=2, overflow=3, commands=[publish(5), publish(5), publish(0)]),
    queue_case(sac=1, commands=[consume(prefetch=2), consume(prio=2), publish(), publish(),
                                publish(), PASS, cancel(0), PASS, ack(), ack()]),
    queue_case(quorum=1, sac=1, commands=[consume(), publish(), PASS, consume(prio=3), publish(),
                                          PASS, ack(), PASS]),
    queue_case(commands=[publish(), publish(), get(), PURGE, give_back(), get(True)]),
    queue_case(commands=[consume(no_ack=True, prefetch=2), publish(), publish(), publish(), PASS,
                         credit(0, 0), PASS, credit(0, 1), PASS]),
    queue_case(commands=[consume(exclusive=True), consume(), cancel(), consume(),
                         consume(exclusive=True)]),
    queue_case(quorum=1, commands=[publish(), consume(), dispatch(True), give_back(), consume(),
                                   dispatch(), give_back(), dispatch(True), PASS]),
    queue_case(prio=2, commands=[publish(prio=1), publish(prio=3), publish(prio=4),
                                 get(), give_back(), get(True), get(True)]),
    queue_case(quorum=1, limit=1, commands=[publish(), publish(prio=3), publish(prio=3),
                                            get(), get(), requeue(), requeue(), PASS, consume(),
                                            PASS]),
]


def write(target, cases):
    out = pathlib.Path(__file__).resolve().parent / "corpus" / target
    out.mkdir(parents=True, exist_ok=True)
    for data in cases:
        (out / hashlib.sha1(data).hexdigest()).write_bytes(data)


def main():
    write("topic_match",
          [SEP.join([key.encode(), *[p.encode() for p in patterns]]) for key, patterns in CASES])
    write("headers_match", HEADERS_CASES)
    write("field_table_codec", CODEC_CASES)
    write("queue_commands", QUEUE_CASES)


if __name__ == "__main__":
    main()
