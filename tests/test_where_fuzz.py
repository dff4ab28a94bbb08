"""The ``where`` language under fuzzing (hypothesis).

Two properties: (1) any text at all, and any mangling of a valid expression, either
filters or raises the one :class:`ConfigError` (never an OverflowError, RecursionError,
pyarrow error or other exception); (2) a randomly generated valid expression selects
exactly the rows that a plain-Python evaluator of SQL's three-valued logic (written here,
``LIKE`` through ``re``) selects."""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.errors import ConfigError
from retrieval.index.filters import MAX_DEPTH, MAX_PREDICATES, allowed_ids

ROWS: list[dict[str, Any]] = [
    {"image_id": 1, "n": 3, "x": 0.5, "s": "trips/2023/a_1.jpg", "b": True},
    {"image_id": 2, "n": -7, "x": None, "s": "trips/2024/b%2.jpg", "b": False},
    {"image_id": 3, "n": None, "x": 2.25, "s": None, "b": None},
    {"image_id": 4, "n": 0, "x": -1.0, "s": "home/c.png", "b": True},
    {"image_id": 5, "n": 2**62, "x": 1e300, "s": "it's/ok.jpg", "b": False},
    {"image_id": 6, "n": 3, "x": 0.5, "s": "", "b": True},
]
TABLE = pa.Table.from_pylist(
    ROWS,
    schema=pa.schema(
        [
            ("image_id", pa.int64()),
            ("n", pa.int64()),
            ("x", pa.float64()),
            ("s", pa.string()),
            ("b", pa.bool_()),
        ]
    ),
)
DICT_TABLE = TABLE.set_column(3, "s", TABLE.column("s").dictionary_encode())
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------- the reference evaluator


def like_regex(pattern: str) -> re.Pattern[str]:
    """SQL LIKE as a regular expression: % any run, _ one character, \\% \\_ literal."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)


def evaluate(node: tuple, row: dict[str, Any]) -> bool | None:
    """SQL three-valued logic: None is unknown."""
    kind = node[0]
    if kind in ("AND", "OR"):
        values = [evaluate(n, row) for n in node[1]]
        if kind == "AND":
            return False if False in values else None if None in values else True
        return True if True in values else None if None in values else False
    if kind == "NOT":
        value = evaluate(node[1], row)
        return None if value is None else not value
    column = row[node[1]]
    if kind == "ISNULL":
        return (column is not None) if node[2] else (column is None)
    if column is None:
        return None
    if kind == "CMP":
        op, value = node[2], node[3]
        return {
            "=": column == value,
            "!=": column != value,
            "<": column < value,
            "<=": column <= value,
            ">": column > value,
            ">=": column >= value,
        }[op]
    if kind == "IN":
        found = column in node[2]
        return not found if node[3] else found
    if kind == "LIKE":
        found = like_regex(node[2]).fullmatch(column) is not None
        return not found if node[3] else found
    raise AssertionError(kind)


# ----------------------------------------------------------- the generator


def literal(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def render(node: tuple) -> str:
    kind = node[0]
    if kind in ("AND", "OR"):
        return "(" + f" {kind} ".join(render(n) for n in node[1]) + ")"
    if kind == "NOT":
        return f"NOT ({render(node[1])})"
    if kind == "ISNULL":
        return f"{node[1]} IS {'NOT ' if node[2] else ''}NULL"
    if kind == "CMP":
        return f"{node[1]} {node[2]} {literal(node[3])}"
    if kind == "IN":
        values = ", ".join(literal(v) for v in node[2])
        return f"{node[1]} {'NOT ' if node[3] else ''}IN ({values})"
    return f"{node[1]} {'NOT ' if node[3] else ''}LIKE {literal(node[2])}"


INTS = st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 3, -7, 2**62])
FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.5, 2.25])
TEXTS = st.text(max_size=6) | st.sampled_from(["home/c.png", "", "it's/ok.jpg"])
PATTERN = st.lists(
    st.sampled_from(["%", "_", "\\%", "\\_", "trips/", "a", ".jpg", "'", "202", "/"]),
    max_size=5,
).map("".join)
OPS = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])


def predicates() -> st.SearchStrategy[tuple]:
    return st.one_of(
        st.tuples(st.just("CMP"), st.sampled_from(["n", "image_id"]), OPS, INTS),
        st.tuples(st.just("CMP"), st.just("x"), OPS, FLOATS),
        st.tuples(st.just("CMP"), st.just("s"), OPS, TEXTS),
        st.tuples(st.just("CMP"), st.just("b"), st.sampled_from(["=", "!="]), st.booleans()),
        st.tuples(
            st.just("IN"), st.just("n"), st.lists(INTS, min_size=1, max_size=4), st.booleans()
        ),
        st.tuples(
            st.just("IN"), st.just("s"), st.lists(TEXTS, min_size=1, max_size=4), st.booleans()
        ),
        st.tuples(st.just("LIKE"), st.just("s"), PATTERN, st.booleans()),
        st.tuples(st.just("ISNULL"), st.sampled_from(["n", "x", "s", "b"]), st.booleans()),
    )


EXPRESSIONS = st.recursive(
    predicates(),
    lambda inner: st.one_of(
        st.tuples(st.sampled_from(["AND", "OR"]), st.lists(inner, min_size=2, max_size=4)),
        st.tuples(st.just("NOT"), inner),
    ),
    max_leaves=12,
)


@FUZZ
@given(EXPRESSIONS, st.booleans())
def test_generated_expressions_equal_the_python_reference(node: tuple, dictionary: bool) -> None:
    """A valid expression keeps exactly the rows the reference evaluator says are TRUE
    (unknown and FALSE both drop a row), on a plain and a dictionary-encoded text column."""
    text = render(node)
    want = [row["image_id"] for row in ROWS if evaluate(node, row) is True]
    got = allowed_ids(DICT_TABLE if dictionary else TABLE, text).tolist()
    assert got == want, text


def mangle(text: str, cut: int, insert: str) -> str:
    at = cut % (len(text) + 1)
    return text[:at] + insert + text[at:]


@FUZZ
@given(
    st.one_of(
        st.text(max_size=60),
        st.tuples(
            EXPRESSIONS.map(render),
            st.integers(0, 200),
            st.sampled_from(["(", ")", "'", '"', "NOT ", " AND", "LIKE", "9" * 40, "1e999", ","]),
        ).map(lambda t: mangle(*t)),
    )
)
def test_any_text_filters_or_raises_one_config_error(text: str) -> None:
    """Whatever the text, the result is an id array or a ConfigError naming the problem
    (never an OverflowError, RecursionError, pyarrow or other exception)."""
    try:
        ids = allowed_ids(TABLE, text)
    except ConfigError as err:
        message = str(err)
    else:
        assert set(ids.tolist()) <= {row["image_id"] for row in ROWS}
        return
    assert message.startswith("bad filter expression (")
    assert "columns: image_id, n, x, s, b" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image_id = 99999999999999999999999", "integer 99999999999999999999999 is out of range"),
        ("n IN (1, -99999999999999999999)", "is out of range: numbers are 64-bit"),
        ("x > 1e999", "number 1e999 is too large for a 64-bit float"),
        ("n = " + "9" * 5000, "(5000 characters) is out of range"),
        ("(" * 500 + "n = 1" + ")" * 500, f"nested more than {MAX_DEPTH} levels deep"),
        ("NOT " * 500 + "n = 1", f"nested more than {MAX_DEPTH} levels deep"),
        ("n LIKE 'x'", "column 'n' is int64: LIKE takes a text column"),
        ("s LIKE 3", "expected a 'quoted pattern' after LIKE"),
    ],
)
def test_huge_numbers_and_deep_nesting_are_refused(text: str, message: str) -> None:
    """The red team's inputs: a huge integer, 500 nested parentheses or NOTs, and LIKE
    misuse each give the one ConfigError, saying why."""
    with pytest.raises(ConfigError) as err:
        allowed_ids(TABLE, text)
    assert message in str(err.value)


def test_long_chains_are_flat_and_bounded() -> None:
    """A chain of MAX_PREDICATES ORs is one flat node (no recursion limit); one more is
    refused, pointing at IN (pyarrow's evaluator crashes the process on 10^4 terms)."""
    text = " OR ".join(f"n = {i}" for i in range(MAX_PREDICATES))
    assert allowed_ids(TABLE, text).tolist() == [1, 4, 6]
    with pytest.raises(ConfigError, match=f"more than {MAX_PREDICATES} comparisons"):
        allowed_ids(TABLE, text + " OR n = -1")
    assert allowed_ids(TABLE, "(" * MAX_DEPTH + "n = 3" + ")" * MAX_DEPTH).tolist() == [1, 6]
