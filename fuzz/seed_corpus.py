#!/usr/bin/env python3
"""Writes the seed corpus of the topic_match fuzz target (fuzz/corpus/topic_match/).

One file per routing_SUITE key with every pattern of SEMANTICS.md section 2.5's matrix, plus
edge cases. Format: key 0xFF pattern 0xFF pattern ... (see coney::fuzzing::topic_match).
Characters outside "abc.*#" are mapped onto it by the target, so seeds use only those.
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


def main():
    out = pathlib.Path(__file__).resolve().parent / "corpus" / "topic_match"
    out.mkdir(parents=True, exist_ok=True)
    for key, patterns in CASES:
        data = SEP.join([key.encode(), *[p.encode() for p in patterns]])
        (out / hashlib.sha1(data).hexdigest()).write_bytes(data)


if __name__ == "__main__":
    main()
