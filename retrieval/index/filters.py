"""Metadata filters for search: ``--where "camera = 'CAM_FRONT' AND width >= 1024"``.

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
                | column IS [NOT] NULL
    op         := = | == | != | <> | < | <= | > | >=
    column     := name | "quoted name"
    literal    := number | 'string' ('' inside is a quote) | TRUE | FALSE

Comparisons follow SQL's three-valued logic: a null value matches no comparison (test it
with ``IS NULL``). A string is compared with text columns only, a number with numeric
ones, ``TRUE``/``FALSE`` with boolean ones; a date or timestamp column takes a string
that pyarrow can cast (``'2024-05-01'``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc

KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "TRUE", "FALSE"}
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
class IsNull:
    column: str
    negated: bool
    at: int


@dataclass(frozen=True)
class BoolOp:
    op: str  # AND, OR
    left: Node
    right: Node


@dataclass(frozen=True)
class Not:
    operand: Node


Node = Compare | InList | IsNull | BoolOp | Not


def bad(text: str, at: int, why: str) -> ConfigError:
    """The one error a filter raises: the expression, where (``at``: its position, -1
    for none) and why; :func:`compile_where` adds the columns."""
    where = f"{text}\n  {' ' * at}^" if 0 <= at <= len(text) else text
    return ConfigError(f"bad --where expression ({why}):\n  {where}")


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
            number = float(raw)
            value: Any = int(raw) if re.fullmatch(r"[-+]?\d+", raw) else number
            tokens.append(Token("number", value, at))
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


class Parser:
    """Recursive descent over :func:`tokenize`'s tokens into a :data:`Node` tree."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

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
        node = self.term()
        while self.accept("keyword", "OR"):
            node = BoolOp("OR", node, self.term())
        return node

    def term(self) -> Node:
        node = self.factor()
        while self.accept("keyword", "AND"):
            node = BoolOp("AND", node, self.factor())
        return node

    def factor(self) -> Node:
        if self.accept("keyword", "NOT"):
            return Not(self.factor())
        if self.accept("punct", "("):
            node = self.expr()
            if not self.accept("punct", ")"):
                raise self.fail("')'")
            return node
        return self.predicate()

    def predicate(self) -> Node:
        token = self.peek
        if token.kind != "name":
            raise self.fail("a column name")
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
        if self.accept("keyword", "IN"):
            if not self.accept("punct", "("):
                raise self.fail("'(' after IN")
            values = [self.literal()]
            while self.accept("punct", ","):
                values.append(self.literal())
            if not self.accept("punct", ")"):
                raise self.fail("',' or ')'")
            return InList(column, tuple(values), negated, token.at)
        raise self.fail("a comparison (= != < <= > >=), IN or IS after the column")

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
            left, right = self.compile(node.left), self.compile(node.right)
            return left & right if node.op == "AND" else left | right
        if isinstance(node, Not):
            return ~self.compile(node.operand)
        field = self.field(node.column, node.at)
        column = pc.field(node.column)
        if isinstance(node, IsNull):
            return ~column.is_null() if node.negated else column.is_null()
        if isinstance(node, InList):
            import pyarrow as pa

            values = [self.value(field, v, node.at) for v in node.values]
            value_type = field.type.value_type if pa.types.is_dictionary(field.type) else None
            array = pa.array(values, type=value_type) if value_type else pa.array(values)
            found = column.isin(array)
            # SQL: NULL IN (...) and NULL NOT IN (...) are both unknown (no match)
            return (~found & column.is_valid()) if node.negated else found
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
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        reason = str(err).splitlines()[0]
        error = bad(where, -1, f"pyarrow cannot evaluate it: {reason}")
        raise with_columns(error, metadata.column_names) from None
    ids = kept.column("image_id").to_numpy(zero_copy_only=False)
    return np.unique(ids.astype(np.int64))
