r"""Metadata filters for search: ``--where "camera = 'CAM_FRONT' AND width >= 1024"`` (the
CLI), ``where=`` (the API), the filter field (the page).

A small SQL-like grammar, tokenised and parsed here (no ``eval``, no SQL engine) into a
pyarrow compute expression, which is evaluated once per search over the run's metadata
table (``images.parquet``'s live rows for an unlabelled run; ``image_id`` alone for a
labelled one) into an allow-list of image ids. The backends then search only those
images (see :class:`~retrieval.index.base.Backend`).

Grammar (keywords case-insensitive, column names exact)::

    expr       := term (OR term)*
    term       := factor (AND factor)*
    factor     := NOT factor | '(' expr ')' | predicate
    predicate  := column op literal
                | column [NOT] IN '(' literal (',' literal)* ')'
                | column [NOT] LIKE 'pattern'
                | column IS [NOT] NULL
    op         := = | == | != | <> | < | <= | > | >=
    column     := name | "quoted name"
    literal    := number | 'string' ('' inside is a quote) | TRUE | FALSE

Comparisons follow SQL's three-valued logic: a null value matches no comparison (test it
with ``IS NULL``). A string is compared with text columns only, a number with numeric
ones, ``TRUE``/``FALSE`` with boolean ones; a date or timestamp column takes a string
that pyarrow can cast (``'2024-05-01'``). ``LIKE`` (text columns) is SQL's: ``%`` matches
any run of characters, ``_`` exactly one, ``\%`` and ``\_`` the characters themselves;
case-sensitive, and the whole value must match (``path LIKE 'trips/2023/%'``).

Numbers are 64-bit (integers within ±2^63, finite floats), nesting (parentheses and
``NOT``) is at most :data:`MAX_DEPTH` deep and an expression holds at most
:data:`MAX_PREDICATES` comparisons: anything else is refused with the same one
error as a syntax mistake, never an overflow or a recursion error. ``AND`` / ``OR``
chains of any length are flat lists, not nested nodes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc

KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "LIKE", "NULL", "TRUE", "FALSE"}
MAX_DEPTH = 64
"""Deepest nesting of parentheses and ``NOT`` an expression may have."""
MAX_PREDICATES = 1000
"""Most comparisons one expression may hold (pyarrow's evaluator crashes the process on
some 10^4-term chains; a long list of values is one ``IN (...)``)."""
INT64 = (-(2**63), 2**63 - 1)
OPERATORS = {"=": "==", "==": "==", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">"}
OPERATORS[">="] = ">="
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>'(?:[^']|'')*')
  | (?P<quoted>"(?:[^"]|"")+")
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<op><=|>=|<>|!=|==|=|<|>)
  | (?P<punct>[(),])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str  # number, string, name, keyword, op, punct, end
    value: Any
    at: int  # character position in the expression


@dataclass(frozen=True)
class Compare:
    column: str
    op: str  # == != < <= > >=
    value: Any
    at: int


@dataclass(frozen=True)
class InList:
    column: str
    values: tuple[Any, ...]
    negated: bool
    at: int


@dataclass(frozen=True)
class Like:
    column: str
    pattern: str
    negated: bool
    at: int


@dataclass(frozen=True)
class IsNull:
    column: str
    negated: bool
    at: int


@dataclass(frozen=True)
class BoolOp:
    op: str  # AND, OR
    operands: tuple[Node, ...]  # two or more, flat: a long chain is one node


@dataclass(frozen=True)
class Not:
    operand: Node


Node = Compare | InList | Like | IsNull | BoolOp | Not


def bad(text: str, at: int, why: str) -> ConfigError:
    """The one error a filter raises: the expression, where (``at``: its position, -1
    for none) and why; :func:`compile_where` adds the columns."""
    where = f"{text}\n  {' ' * at}^" if 0 <= at <= len(text) else text
    return ConfigError(f"bad filter expression ({why}):\n  {where}")


def with_columns(err: ConfigError, columns: list[str]) -> ConfigError:
    return ConfigError(f"{err}\ncolumns: {', '.join(columns)}")


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None or match.lastgroup is None:
            at = len(text) - len(text[pos:].lstrip())
            raise bad(text, at, f"unexpected character {text[at]!r}")
        kind, raw = match.lastgroup, match.group(match.lastgroup)
        at = match.start(kind)
        if kind == "number":
            tokens.append(Token("number", _number(text, raw, at), at))
        elif kind == "string":
            tokens.append(Token("string", raw[1:-1].replace("''", "'"), at))
        elif kind == "quoted":
            tokens.append(Token("name", raw[1:-1].replace('""', '"'), at))
        elif kind == "name" and raw.upper() in KEYWORDS:
            tokens.append(Token("keyword", raw.upper(), at))
        else:
            tokens.append(Token(kind, raw, at))
        pos = match.end()
    tokens.append(Token("end", None, len(text)))
    return tokens


def _number(text: str, raw: str, at: int) -> int | float:
    """A number token's value: an int within int64, else a finite float (else refused)."""
    if re.fullmatch(r"[-+]?\d+", raw):
        digits = raw.lstrip("+-").lstrip("0")
        value = int(raw) if len(digits) <= 19 else None  # int() of 4300+ digits raises
        if value is not None and INT64[0] <= value <= INT64[1]:
            return value
        raise bad(text, at, f"integer {_short(raw)} is out of range: numbers are 64-bit")
    number = float(raw)
    if not math.isfinite(number):
        raise bad(text, at, f"number {_short(raw)} is too large for a 64-bit float")
    return number


def _short(raw: str) -> str:
    return raw if len(raw) <= 30 else f"{raw[:12]}...{raw[-6:]} ({len(raw)} characters)"


class Parser:
    """Recursive descent over :func:`tokenize`'s tokens into a :data:`Node` tree."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0
        self.predicates = 0

    @property
    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def accept(self, kind: str, value: Any = None) -> bool:
        token = self.peek
        if token.kind == kind and (value is None or token.value == value):
            self.i += 1
            return True
        return False

    def fail(self, expected: str) -> ConfigError:
        token = self.peek
        found = "the end" if token.kind == "end" else repr(str(token.value))
        if token.kind == "string":
            found = f"'{token.value}'"
        return bad(self.text, token.at, f"expected {expected}, found {found}")

    def parse(self) -> Node:
        if self.peek.kind == "end":
            raise bad(self.text, 0, "empty expression")
        node = self.expr()
        if self.peek.kind != "end":
            raise self.fail("AND, OR or the end")
        return node

    def expr(self) -> Node:
        terms = [self.term()]
        while self.accept("keyword", "OR"):
            terms.append(self.term())
        return terms[0] if len(terms) == 1 else BoolOp("OR", tuple(terms))

    def term(self) -> Node:
        factors = [self.factor()]
        while self.accept("keyword", "AND"):
            factors.append(self.factor())
        return factors[0] if len(factors) == 1 else BoolOp("AND", tuple(factors))

    def factor(self) -> Node:
        token = self.peek
        if (token.kind, token.value) in (("keyword", "NOT"), ("punct", "(")):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise bad(
                    self.text,
                    token.at,
                    f"nested more than {MAX_DEPTH} levels deep (parentheses and NOT): "
                    f"write it flatter, e.g. a IN (1, 2) for a = 1 OR a = 2",
                )
            try:
                return self.nested()
            finally:
                self.depth -= 1
        return self.predicate()

    def nested(self) -> Node:
        if self.accept("keyword", "NOT"):
            return Not(self.factor())
        self.take()  # "("
        node = self.expr()
        if not self.accept("punct", ")"):
            raise self.fail("')'")
        return node

    def predicate(self) -> Node:
        token = self.peek
        if token.kind != "name":
            raise self.fail("a column name")
        self.predicates += 1
        if self.predicates > MAX_PREDICATES:
            raise bad(
                self.text,
                token.at,
                f"more than {MAX_PREDICATES} comparisons: list many values in one "
                f"column IN (...) instead",
            )
        self.i += 1
        column = str(token.value)
        if self.peek.kind == "op":
            op = OPERATORS[self.take().value]
            return Compare(column, op, self.literal(), token.at)
        if self.accept("keyword", "IS"):
            negated = self.accept("keyword", "NOT")
            if not self.accept("keyword", "NULL"):
                raise self.fail("NULL")
            return IsNull(column, negated, token.at)
        negated = self.accept("keyword", "NOT")
        if self.accept("keyword", "LIKE"):
            pattern = self.peek
            if pattern.kind != "string":
                raise self.fail("a 'quoted pattern' after LIKE")
            self.i += 1
            return Like(column, str(pattern.value), negated, token.at)
        if self.accept("keyword", "IN"):
            if not self.accept("punct", "("):
                raise self.fail("'(' after IN")
            values = [self.literal()]
            while self.accept("punct", ","):
                values.append(self.literal())
            if not self.accept("punct", ")"):
                raise self.fail("',' or ')'")
            return InList(column, tuple(values), negated, token.at)
        raise self.fail("a comparison (= != < <= > >=), IN, LIKE or IS after the column")

    def literal(self) -> Any:
        token = self.peek
        if token.kind in ("number", "string"):
            self.i += 1
            return token.value
        if token.kind == "keyword" and token.value in ("TRUE", "FALSE"):
            self.i += 1
            return token.value == "TRUE"
        if token.kind == "keyword" and token.value == "NULL":
            raise bad(self.text, token.at, "compare with NULL by IS NULL / IS NOT NULL")
        raise self.fail("a number, a 'quoted string', TRUE or FALSE")


def parse(text: str) -> Node:
    """The expression's syntax tree (columns not yet checked)."""
    return Parser(text).parse()


def _kind(dtype: pa.DataType) -> str:
    import pyarrow as pa

    if pa.types.is_dictionary(dtype):
        return _kind(dtype.value_type)
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "text"
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return "number"
    if pa.types.is_boolean(dtype):
        return "boolean"
    return "other"


def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return "text" if isinstance(value, str) else "number"


class _Compiler:
    def __init__(self, text: str, schema: pa.Schema) -> None:
        self.text, self.schema = text, schema
        self.columns = list(schema.names)

    def field(self, column: str, at: int) -> pa.Field:
        if column not in self.columns:
            hint = did_you_mean(column, self.columns)
            raise bad(self.text, at, f"unknown column {column!r}.{hint}")
        return self.schema.field(column)

    def value(self, field: pa.Field, value: Any, at: int) -> Any:
        """``value`` as a scalar comparable with ``field``, else a clear error."""
        import pyarrow as pa

        want, got = _kind(field.type), _value_kind(value)
        if want == got:
            return value
        if want == "other" and got == "text":  # dates, timestamps: pyarrow's cast
            try:
                return pa.scalar(value).cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
        shown = f"'{value}'" if got == "text" else str(value).upper() if got == "boolean" else value
        raise bad(
            self.text,
            at,
            f"column {field.name!r} is {field.type}, compared with {got} {shown}",
        )

    def compile(self, node: Node) -> pc.Expression:
        import pyarrow.compute as pc

        if isinstance(node, BoolOp):
            return _balanced([self.compile(n) for n in node.operands], node.op)
        if isinstance(node, Not):
            return ~self.compile(node.operand)
        field = self.field(node.column, node.at)
        column = pc.field(node.column)
        if isinstance(node, Like):
            import pyarrow as pa

            if _kind(field.type) != "text":
                raise bad(
                    self.text,
                    node.at,
                    f"column {field.name!r} is {field.type}: LIKE takes a text column",
                )
            if pa.types.is_dictionary(field.type):  # match_like has no dictionary kernel
                column = column.cast(field.type.value_type)
            found = pc.match_like(column, node.pattern)
            return ~found if node.negated else found
        if isinstance(node, IsNull):
            return ~column.is_null() if node.negated else column.is_null()
        if isinstance(node, InList):
            import pyarrow as pa

            values = [self.value(field, v, node.at) for v in node.values]
            value_type = field.type.value_type if pa.types.is_dictionary(field.type) else None
            array = pa.array(values, type=value_type) if value_type else pa.array(values)
            # SQL: NULL IN (...) is unknown (null), so NOT (NULL IN ...) is no match either
            found = pc.if_else(column.is_null(), pa.scalar(None, pa.bool_()), column.isin(array))
            return ~found if node.negated else found
        value = self.value(field, node.value, node.at)
        ops = {
            "==": column.__eq__,
            "!=": column.__ne__,
            "<": column.__lt__,
            "<=": column.__le__,
            ">": column.__gt__,
            ">=": column.__ge__,
        }
        return ops[node.op](value)


def _balanced(parts: list[pc.Expression], op: str) -> pc.Expression:
    """``parts`` joined by ``op`` as a balanced tree (depth log2 n, not n)."""
    while len(parts) > 1:
        pairs = [
            (a & b if op == "AND" else a | b) for a, b in zip(parts[::2], parts[1::2], strict=False)
        ]
        parts = pairs + parts[len(pairs) * 2 :]
    return parts[0]


def compile_where(text: str, schema: pa.Schema) -> pc.Expression:
    """``text`` as a pyarrow expression over ``schema``'s columns.

    Raises:
        ConfigError: bad syntax, an unknown column or a value of the wrong type; the
            message shows where and lists the columns.
    """
    compiler = _Compiler(text, schema)
    try:
        return compiler.compile(parse(text))
    except ConfigError as err:
        raise with_columns(err, compiler.columns) from None


def allowed_ids(metadata: pa.Table, where: str) -> np.ndarray:
    """Ids (ascending, int64) of the rows of ``metadata`` (with an ``image_id`` column)
    matching ``where``; evaluated once, by pyarrow."""
    import pyarrow as pa

    expression = compile_where(where, metadata.schema)
    try:
        kept = metadata.filter(expression)
    except (pa.ArrowException, OverflowError, ValueError) as err:
        reason = str(err).splitlines()[0]
        error = bad(where, -1, f"pyarrow cannot evaluate it: {reason}")
        raise with_columns(error, metadata.column_names) from None
    ids = kept.column("image_id").to_numpy(zero_copy_only=False)
    return np.unique(ids.astype(np.int64))
