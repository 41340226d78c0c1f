"""Scatter / gather / merge: cross-shard SELECTs that return what one database would.

Planning is pure: :func:`plan_scatter` turns a ``Select`` into the statement
each shard runs plus a :class:`MergePlan`, or raises
:class:`~shardkit.errors.ScatterRefused` naming the construct it cannot merge
exactly.  :func:`merge_rows` applies the plan to the per-shard row streams.

* ``ORDER BY``: each shard sorts; a streaming k-way merge (``heapq.merge``)
  interleaves the sorted streams, honouring direction and NULLS FIRST/LAST
  (PostgreSQL's default: NULLS LAST ascending, NULLS FIRST descending).  The
  sort keys travel as hidden trailing columns and are dropped afterwards.
* ``LIMIT n OFFSET m``: each shard returns at most ``n + m`` rows; the offset and
  limit apply after the merge.
* ``count``/``sum``/``min``/``max``: partials per shard, combined; ``avg`` is
  rebuilt from per-shard ``sum`` and ``count`` with PostgreSQL's own numeric
  division scale, so the digits match.
* ``count(DISTINCT key)`` of a one-column hash, range or list shard key: each key value
  lives on one shard, so the shards' distinct counts are disjoint and are added up.
* ``GROUP BY``: partials per group per shard, combined by group key; ``HAVING``
  is evaluated after the merge; ``ORDER BY``/``LIMIT`` then apply to the groups.
* ``DISTINCT``: distinct per shard, de-duplicated again across shards.
* ``coalesce(aggregate, constant)``: the aggregate merged, then coalesced.
* ``UNION ALL`` / ``UNION`` of SELECTs that filter and project sharded rows: each shard
  runs the whole compound; its rows merge as a plain SELECT's (UNION as DISTINCT).
* A subquery or CTE in FROM grouped (or DISTINCT) by the shard key of a hash, range or
  list group: each group is on one shard, so each shard computes it whole and it merges
  as a table would (the colocation check admits it: ``_colocation._shard_local``).
"""

from __future__ import annotations

import datetime
import decimal
import functools
import heapq
import ipaddress
import itertools
import logging
import os
import re
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import cast, func, schema
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import DOUBLE_PRECISION
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.sql import elements, functions, operators, selectable, traversals, visitors
from sqlalchemy.sql.elements import BindParameter, ColumnElement, Label, UnaryExpression

from ._colocation import Resolver, _froms, _instances, _optional_sides, _plain, _table_of, _without_loader_options
from ._colocation import colocation_problem
from ._pgtypes import unwrap
from ._colocation import compound_selects as compound_parts
from ._colocation import distinct_on
from ._colocation import shard_local_derived
from ._colocation import ungrouped
from .errors import ScatterRefused

__all__ = ["MergePlan", "merge_rows", "pg_numeric_div", "plan_scatter"]

_MERGEABLE_AGGS = {"count", "sum", "min", "max", "avg"}
_OTHER_AGGS = {
    "aggregate_strings",
    "array_agg", "string_agg", "bool_and", "bool_or", "every", "stddev", "stddev_pop",
    "stddev_samp", "variance", "var_pop", "var_samp", "json_agg", "jsonb_agg",
    "percentile_cont", "percentile_disc", "mode", "bit_and", "bit_or", "json_object_agg",
    "jsonb_object_agg", "xmlagg", "corr", "covar_pop", "covar_samp", "regr_slope",
    "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_sxx", "regr_sxy",
    "regr_syy", "bit_xor", "range_agg", "range_intersect_agg", "any_value", "json_agg_strict",
    "jsonb_agg_strict", "json_object_agg_strict", "json_object_agg_unique",
    "json_object_agg_unique_strict", "jsonb_object_agg_strict", "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict", "json_arrayagg", "json_objectagg", "rank", "dense_rank",
    "percent_rank", "cume_dist",
}


@dataclass(frozen=True)
class SortKey:
    """One ORDER BY term: where its value sits in a shard row, and how it sorts."""

    position: int
    descending: bool
    nulls_first: bool

    def describe(self, name: str) -> str:
        return f"{name} {'DESC' if self.descending else 'ASC'} NULLS {'FIRST' if self.nulls_first else 'LAST'}"


@dataclass(frozen=True)
class OutputColumn:
    """How one visible column of the merged result is produced from shard rows.

    ``kind`` is ``value`` (a group key or plain column at ``positions[0]``),
    ``count``/``sum``/``min``/``max`` (combine ``positions[0]``) or ``avg``
    (``positions`` = (sum, count)).  ``coalesce``: the column is ``coalesce(<that
    aggregate>, <constants>)``, and ``positions[-1]`` holds each shard's own value of it
    (its fallback when the merged aggregate is NULL).
    """

    kind: str
    positions: tuple[int, ...]
    float4: bool = False    # a sum of real: rounded to real, as PostgreSQL's sum(real) returns
    coalesce: bool = False
    distinct_key: bool = False  # count(DISTINCT shard key): the shards' counts, added up

    def describe(self) -> str:
        name = "count(DISTINCT shard key)" if self.distinct_key else self.kind
        return f"coalesce({name})" if self.coalesce else name


@dataclass
class MergePlan:
    """How shard results combine into the single result a caller sees."""

    kind: str                              # concat | ordered | aggregate | group | any
    visible: int                           # number of columns the caller asked for
    sort_keys: tuple[SortKey, ...] = ()
    limit: int | None = None
    offset: int = 0
    distinct: bool = False
    outputs: tuple[OutputColumn, ...] = ()
    group_positions: tuple[int, ...] = ()
    having: Callable[[Sequence[Any]], bool] | None = None
    description: str = ""
    order_terms: tuple[Any, ...] = ()      # group merges: (evaluator, descending, nulls_first)
    n_outputs: int = 0
    # (position, equality only, use): shard-row values of expressions SQLAlchemy gives no
    # type (age(), a function of the application's), which the merge compares or adds:
    # their Python values are checked as they come (see _value_problem).
    checks: tuple[tuple[int, bool, str], ...] = ()
    statement: Any = None                  # the caller's (named by a refusal while merging)
    # The database's collation when it does not order text by code point (set by the
    # session): text values of the checked expressions are then refused for ordering.
    text_collation: str = ""
    # (position, position, what): shard-row columns that must hold the same SQL type name
    # (coalesce(aggregate, constant) must not change the aggregate's type).
    same_types: tuple[tuple[int, int, str], ...] = ()
    # (collation, use): collations named (with .collate() or on a column's type) by what
    # the merge compares for equality (GROUP BY, DISTINCT, UNION): under a nondeterministic
    # one, values Python tells apart are equal ('a' and 'A'); the session asks the database.
    collations: tuple[tuple[str, str], ...] = ()
    # Grouped by this one-column shard key (of a hash, range or list group placing every
    # grouped row): each group is whole on one shard, which computes every aggregate of it
    # (string_agg(), a CREATE AGGREGATE of the application's, ...); the merge concatenates.
    whole_groups: str = ""

    def __str__(self) -> str:
        return self.description


class _SameSQL(traversals.TraversalComparatorStrategy):
    """``ClauseElement.compare()`` without comparing the ORM entity an expression was
    built from (its ``_propagate_attrs``): SQLAlchemy compares those entities as clause
    elements, and raises ``AttributeError`` when they differ (``func.lower(Customer.name)``
    against ``func.max(Order.qty)``, or an ``aliased(Customer)``'s).  The columns inside
    the expressions still tell tables and aliases apart."""

    def visit_propagate_attrs(self, attrname: Any, left_parent: Any, left: Any,
                              right_parent: Any, right: Any, **kw: Any) -> Any:
        return None


def _same(a: Any, b: Any) -> bool:
    """Whether two SQL expressions are the same, as ``a.compare(b)`` says, also when
    they come from different ORM entities (which make ``compare()`` raise)."""
    try:
        return bool(a.compare(b))
    except AttributeError:
        return bool(_SameSQL().compare(a, b))


def _order_modifiers(clause: Any) -> tuple[Any, bool, bool | None]:
    """An ORDER BY term without its modifiers: (expression, descending, nulls_first or
    None for the default)."""
    descending = False
    nulls_first: bool | None = None
    expr = clause
    while True:
        if isinstance(expr, elements._label_reference):  # order_by("name") / order_by(label[.desc()])
            expr = expr.element
        elif isinstance(expr, UnaryExpression) and expr.modifier in (
            operators.desc_op, operators.asc_op, operators.nulls_first_op, operators.nulls_last_op,
        ):
            if expr.modifier is operators.desc_op:
                descending = True
            elif expr.modifier is operators.nulls_first_op:
                nulls_first = True
            elif expr.modifier is operators.nulls_last_op:
                nulls_first = False
            expr = expr.element
        else:
            return expr, descending, nulls_first


def _by_name(expr: Any, stmt: Any, group_by: bool = False) -> Any:
    """``expr``, or for a label or column named by a string (``order_by("n")``,
    ``group_by("n")``) the select list's label or the column it names, resolved as
    SQLAlchemy renders it and PostgreSQL reads it."""
    if not isinstance(expr, elements._textual_label_reference):
        return expr
    if not isinstance(stmt, selectable.Select):
        return expr
    # The names SQLAlchemy's compiler resolves it by (the select list's labels and
    # columns, then the FROM's columns): the compile state's _label_resolve_dict.
    with_cols, only_froms, _ = _label_resolve_dict(stmt)
    found = with_cols.get(expr.element)
    if group_by and isinstance(found, Label) and expr.element in only_froms:
        # A label is rendered by its name, and in GROUP BY PostgreSQL reads a name that is
        # also a column of the FROM as that column (in ORDER BY, as the label).
        found = only_froms[expr.element]
    return expr if found is None else found   # (None: SQLAlchemy refuses to render it)


def _label_resolve_dict(stmt: selectable.Select[Any]) -> Any:
    """SQLAlchemy's (select-list-then-FROM names, FROM names, select-list names) for
    ``stmt``, from the compile state its compiler uses: for an ORM statement the ORM's
    (which joins relationships; Core's SelectState cannot), its eager loads left out
    (a LIMIT'ed statement would be wrapped in a derived table whose columns it names).
    Made once per statement, whatever the number of its terms named by a string."""
    found = _RESOLVE_DICTS.get(stmt)
    if found is None:
        if stmt._propagate_attrs.get("compile_state_plugin") == "orm":
            from sqlalchemy.orm import lazyload

            state = _without_loader_options(stmt).options(lazyload("*"))
            found = state._compile_state_factory(state, state._default_compiler())._label_resolve_dict
        else:
            found = selectable.SelectState(stmt, None)._label_resolve_dict
        _RESOLVE_DICTS[stmt] = found
    return found


_RESOLVE_DICTS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _unwrap_order(clause: Any, stmt: Any = None) -> tuple[ColumnElement[Any], bool, bool | None]:
    """(expression, descending, nulls_first or None for the default); ``stmt``: the SELECT
    whose select list an ORDER BY names by string resolves in."""
    expr, descending, nulls_first = _order_modifiers(clause)
    if stmt is not None:
        expr = _by_name(expr, stmt)
    _refuse_sql_text(expr, "ORDER BY", "order")
    if isinstance(expr, Label):
        expr = expr.element
    if isinstance(expr, elements.Tuple):
        raise ScatterRefused(
            f"ORDER BY a row value ({expr}) across shards is not merged; order by its columns",
            construct="ORDER BY a row value")
    _refuse_unmergeable_type(expr, "ORDER BY")
    return expr, descending, nulls_first


def _refuse_sql_text(expr: Any, clause: str, verb: str) -> None:
    """Refuse ``expr`` of ``clause`` (ORDER BY, GROUP BY) if it names a label by a string
    or is SQL text: the merge cannot read it."""
    if isinstance(expr, elements._textual_label_reference):  # order_by("name")
        raise ScatterRefused(
            f"{clause} {expr.element!r} names a label by text; across shards shardkit needs the "
            f"expression itself ({verb}_by(Model.column) or {verb}_by(label_object))",
            construct=f"{clause} by label name")
    if isinstance(expr, Label):
        expr = expr.element
    if isinstance(expr, elements.TextClause) or _is_literal_sql(expr):
        raise ScatterRefused(
            f"{clause} {str(expr)!r} is SQL text (an output position, a name or an expression "
            f"shardkit cannot read); {verb} by the column or expression itself",
            construct=f"{clause} text")


def _is_literal_sql(expr: Any) -> bool:
    """``literal_column("1")`` / ``literal_column("*")``: SQL text posing as a column."""
    return isinstance(expr, elements.ColumnClause) and bool(getattr(expr, "is_literal", False)) \
        and getattr(expr, "table", None) is None


# Types whose Python values do not order, add or compare as PostgreSQL's do.
_UNMERGEABLE_TYPES: tuple[tuple[type, str], ...] = (
    (sqltypes.Interval, "interval"), (postgresql.MONEY, "money"), (sqltypes.JSON, "json"),
    (sqltypes.ARRAY, "array"), (postgresql.HSTORE, "hstore"), (postgresql.INET, "inet"),
    (postgresql.CIDR, "cidr"), (postgresql.TSVECTOR, "tsvector"),
    (postgresql.CITEXT, "citext (compared without case)"),
)
# ... of which these do not even compare for equality as PostgreSQL does (group keys,
# DISTINCT rows): not hashable, or equal in Python and not in PostgreSQL or the other way
# round (interval '1 year' = '360 days', psycopg reads 365 days; timetz 12:00+00 and
# 13:00+01 are the same instant for Python; citext 'a' = 'A').
_UNHASHABLE = ("json", "array", "hstore", "interval", "time with time zone", "citext")


_PG_DIALECT = PGDialect()


def _pg_type(t: Any) -> Any:
    """The type PostgreSQL gets for ``t``: its ``with_variant(..., "postgresql")`` if it
    has one (``Text().with_variant(CITEXT(), "postgresql")``), else ``t``'s own
    implementation (SQLAlchemy memoizes it per type object); for a ``postgresql.DOMAIN``,
    :func:`_domain_base`."""
    try:
        t = t.dialect_impl(_PG_DIALECT)
    except Exception:  # noqa: BLE001 - a type that cannot say: judged as declared
        return t
    return _domain_base(t) if isinstance(t, postgresql.DOMAIN) else t


def _sql_type(t: Any) -> Any:
    """``t``, or for a ``postgresql.DOMAIN`` :func:`_domain_base` (the checks that read a
    column's declared type, without its variants)."""
    return _domain_base(t) if isinstance(t, postgresql.DOMAIN) else t


# Per domain type object, as _routing's _domain_coercer is.
@functools.lru_cache(maxsize=256)
def _domain_base(t: Any) -> Any:
    """The type of a ``postgresql.DOMAIN``'s values, through domains over domains: PostgreSQL
    orders, compares and aggregates them as its base type's, and drivers read them as those
    (SQLAlchemy gives a domain no result processing, so a TypeDecorator inside one counts as
    the type it stores).  A collation a domain sets (the outermost one that sets one) is the
    values' collation: the base type is returned as a copy carrying it."""
    _, t, collation = unwrap(t)
    if collation and isinstance(t, sqltypes.String):
        t = t.copy()
        t.collation = collation
    return t


def _unmergeable_type(expr: Any) -> str | None:
    """The name of ``expr``'s type when Python cannot compare or add its values as
    PostgreSQL does, else None (unknown types pass: they are compared as they come)."""
    inner, collation = _unlabelled(expr)
    if collation is not None and collation.upper() not in ("C", "POSIX"):
        return f"text under collation {collation}"
    t = getattr(expr, "type", None)
    if t is None:
        return None
    if (name := _text_function_collation(inner, t)) is not None:
        return f"text under collation {name}"
    found = _type_problem(t)
    if found is None and (pg := _pg_type(t)) is not t:
        found = _type_problem(pg)
    return found


def _type_problem(t: Any) -> str | None:
    """:func:`_unmergeable_type` of a type."""
    if isinstance(t, (sqltypes.Interval, postgresql.INTERVAL)):
        # (SQLAlchemy's Interval is a TypeDecorator; postgresql.INTERVAL, what reflection
        # and autogenerate give, is not one of its subclasses)
        return "interval"
    if isinstance(t, sqltypes.TypeDecorator):
        # Python sees what process_result_value made of the stored values, which need
        # not order or add as those do.
        return f"{type(t).__name__} (a TypeDecorator)"
    if isinstance(t, sqltypes.Enum):
        return ("enum (ordered by declaration, not by name)" if t.native_enum
                else "enum (stored as names, which Python does not compare as the enum's members)")
    collation = getattr(t, "collation", None)
    if isinstance(t, sqltypes.String) and collation and collation.upper() not in ("C", "POSIX"):
        return f"text under collation {collation}"
    if isinstance(t, (sqltypes.CHAR, sqltypes.NCHAR)):
        return "char(n) (compared without its trailing blanks)"
    if isinstance(t, sqltypes.Time) and t.timezone:
        return "time with time zone (equal instants ordered by zone)"
    if isinstance(t, sqltypes.Numeric) and not isinstance(t, sqltypes.Float) and not t.asdecimal:
        return "numeric returned as float (asdecimal=False)"
    for cls, name in _UNMERGEABLE_TYPES:
        if isinstance(t, cls):
            return name
    if "RANGE" in type(t).__name__.upper():
        return "range"
    return None


def _unlabelled(expr: Any) -> tuple[Any, str | None]:
    """``expr`` without its labels and parentheses, and the collation a ``COLLATE``
    applied to it names (None without one)."""
    inner = expr
    while isinstance(inner, (Label, elements.Grouping)):
        inner = inner.element
    if isinstance(inner, elements.BinaryExpression) and inner.operator is operators.collate:
        return inner, inner.right.collation
    return inner, None


def _database_collated(expr: Any) -> bool:
    """Whether ``expr`` is text the database compares by its default collation (no
    ``COLLATE`` on the expression, no collation on its type)."""
    inner, collate = _unlabelled(expr)
    if collate is not None:
        return False
    t = _sql_type(getattr(expr, "type", None))
    if isinstance(t, sqltypes.NullType) and isinstance(inner, functions.FunctionElement) and \
            inner.name.lower() in _TEXT_FUNCTIONS:
        # func.lower(name) and the like carry no type: text if their argument is.
        return any(_database_collated(a) for a in inner.clauses)
    return isinstance(t, sqltypes.String) and not isinstance(t, sqltypes.Enum) \
        and not getattr(t, "collation", None)


# Functions that return text of their text argument (SQLAlchemy gives them no type).
_TEXT_FUNCTIONS = frozenset({
    "lower", "upper", "initcap", "trim", "ltrim", "rtrim", "btrim", "substr", "substring",
    "replace", "left", "right", "lpad", "rpad", "reverse", "translate", "concat", "concat_ws",
    "format", "unaccent", "regexp_replace", "split_part", "repeat", "overlay", "normalize",
})


def text_comparison(stmt: Any) -> str | None:
    """Where merging ``stmt``'s rows compares text in Python (by code point): an ORDER BY
    key, min()/max() or a HAVING comparison over text the database collates; else None."""
    if isinstance(stmt, selectable.CompoundSelect):
        parts = compound_parts(stmt)
        names = [_output_name(c) for c in parts[0].selected_columns]
        for clause in stmt._order_by_clauses:
            try:
                pos = _compound_order(clause, names, "compound")[0]
            except ScatterRefused:
                continue   # (refused when planned)
            if any(_database_collated(list(p.selected_columns)[pos]) for p in parts
                   if len(p.selected_columns) > pos):
                return f"ORDER BY {names[pos]}"
        return None
    for clause in stmt._order_by_clauses:
        expr = _unwrap_order(clause, stmt)[0]
        if _database_collated(expr):
            return f"ORDER BY {expr}"
    stack = [*stmt._raw_columns, *stmt._having_criteria, *stmt._order_by_clauses]
    having = set(map(id, stmt._having_criteria))
    while stack:
        e = stack.pop()
        if isinstance(e, functions.FunctionElement) and e.name.lower() in ("min", "max") and \
                any(_database_collated(a) for a in e.clauses):
            return f"{e.name}() over text"
        if isinstance(e, elements.BinaryExpression) and e.operator in _CMP and id(e) in having and \
                _compares_database_collated(e.left, e.right):
            return "a HAVING comparison of text"
        if isinstance(e, elements.BooleanClauseList) and id(e) in having:
            having.update(map(id, e.clauses))
        if isinstance(e, (selectable.SelectBase, selectable.ScalarSelect)):
            continue
        if not isinstance(e, functions.FunctionElement) and isinstance(e, selectable.FromClause):
            continue
        stack.extend(e.get_children())
    return None


def _compares_database_collated(left: Any, right: Any) -> bool:
    """Whether a comparison of ``left`` and ``right`` compares text under the database's
    collation: a side is text under it, and is not a parameter compared with text of a
    collation of its own (PostgreSQL takes that one: ``max(col) > 'a'``, where col's type,
    such as a domain, does not give the parameter its collation)."""
    for side, other in ((left, right), (right, left)):
        if _database_collated(side) and not (isinstance(side, BindParameter) and _own_collation(other)):
            return True
    return False


def _own_collation(expr: Any) -> bool:
    """Whether ``expr`` is text with a collation of its own (``COLLATE``, or its type's)."""
    if _unlabelled(expr)[1] is not None:
        return True
    t = _sql_type(getattr(expr, "type", None))
    return isinstance(t, sqltypes.String) and bool(getattr(t, "collation", None))


def _named_collation(expr: Any) -> str | None:
    """The collation ``expr`` is compared under when it names one (``.collate()``, or the
    collation of its type) other than C and POSIX, else None."""
    inner, name = _unlabelled(expr)
    if name is None:
        t = getattr(expr, "type", None)
        if (name := _text_function_collation(inner, t)) is not None:
            return name
        t = None if t is None else _pg_type(t)
        name = getattr(t, "collation", None) if isinstance(t, sqltypes.String) else None
    return name if name and name.upper() not in ("C", "POSIX") else None


def _text_function_collation(inner: Any, t: Any) -> str | None:
    """For ``lower(name)`` and the like (text functions SQLAlchemy gives no type): the
    collation other than C/POSIX an argument is compared under (the function's result
    keeps it), else None."""
    if isinstance(t, sqltypes.NullType) and isinstance(inner, functions.FunctionElement) and \
            inner.name.lower() in _TEXT_FUNCTIONS:
        for a in inner.clauses:
            if (name := _named_collation(a)) is not None:
                return name
    return None


def _refuse_unhashable(expr: Any, use: str) -> None:
    """Group keys and DISTINCT rows are compared by hashing their Python values."""
    name = _unmergeable_type(expr)
    if name is not None and name.split(" (")[0] in _UNHASHABLE:
        _refuse_type(name, use)


def _refuse_unmergeable_type(expr: Any, use: str) -> None:
    name = _unmergeable_type(expr)
    if name is not None:
        _refuse_type(name, use)


def _refuse_type(name: str, use: str) -> None:
    raise ScatterRefused(
        f"{use} over a value of type {name} across shards: shardkit merges shards' values in "
        "Python, which does not order, compare or combine this type as PostgreSQL does; add the "
        "shard key, or cast it to a type that does (text under C, numeric, ...)",
        construct=f"{use} over {name.split(' ')[0]}")


def _untyped(expr: Any) -> bool:
    """Whether SQLAlchemy knows nothing of ``expr``'s SQL type (``func.age(...)``, a function
    of the application's, a user-defined type): the type checks cannot see what it returns."""
    t = getattr(expr, "type", None)
    return t is None or isinstance(t, (sqltypes.NullType, sqltypes.UserDefinedType))


_IP_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network,
             ipaddress.IPv6Network)   # (the Interface types are Address subclasses)


def _value_problem(v: Any, equality: bool) -> str | None:
    """The SQL type of Python value ``v`` when Python does not compare (``equality``: for
    equality only) or add it as PostgreSQL compares or adds that type, else None."""
    if isinstance(v, datetime.timedelta):
        return "interval"   # psycopg reads a year as 365 days, PostgreSQL compares it as 360
    if isinstance(v, datetime.time) and v.tzinfo is not None:
        return "time with time zone"
    if isinstance(v, (dict, list)):
        return "json or array"
    if equality:
        return None
    if isinstance(v, _IP_TYPES):
        return "inet"
    if type(v).__module__.startswith("psycopg") and "Range" in type(v).__name__:
        return "range"
    return None


def _checked(stream: Iterable[Sequence[Any]], checks: Sequence[tuple[int, bool, str]],
             statement: Any, text_collation: str = "") -> Iterator[Sequence[Any]]:
    """``stream``'s rows, refusing the merge at the first value ``checks`` name whose Python
    value does not compare or add as PostgreSQL's does (text too, for ordering, when the
    database's ``text_collation`` does not order it by code point)."""
    for row in stream:
        for pos, equality, use in checks:
            v = row[pos]
            if v is None:
                continue
            name = _value_problem(v, equality)
            if name is None and text_collation and not equality and isinstance(v, str):
                name = f"text under the database's collation {text_collation}"
            if name is not None:
                try:
                    _refuse_type(name, use)
                except ScatterRefused as e:
                    e.statement = statement
                    raise
        yield row


def _same_types(stream: Iterable[Sequence[Any]], pairs: Sequence[tuple[int, int, str]],
                statement: Any) -> Iterator[Sequence[Any]]:
    """``stream``'s rows, refusing the merge if a pair of SQL type names differs."""
    for row in stream:
        for a, b, what in pairs:
            if row[a] != row[b]:
                raise ScatterRefused(
                    f"{what} is of type {row[b]}, its aggregate of type {row[a]}: the merged "
                    "aggregate would have to be converted as PostgreSQL converts it; give the "
                    "constant in the aggregate's type (cast it), or select the aggregate alone",
                    construct="coalesce() changing the aggregate's type", statement=statement)
        yield row


def _agg_name(expr: Any) -> str | None:
    if isinstance(expr, Label):
        expr = expr.element
    if isinstance(expr, elements.FunctionFilter):   # count(*) FILTER (WHERE ...)
        expr = expr.func
    if isinstance(expr, elements.WithinGroup):      # percentile_cont(0.5) WITHIN GROUP (...)
        expr = expr.element
    if isinstance(expr, functions.FunctionElement):
        name = expr.name.lower()
        if name in _MERGEABLE_AGGS or name in _OTHER_AGGS:
            return name
    return None


def _coalesced_aggregate(col: Any) -> Any | None:
    """The aggregate ``agg`` of a select-list column ``coalesce(agg, <constants>)`` (labelled
    or not), else None.  Constants: bound values, literals, NULL and casts of them."""
    inner = col.element if isinstance(col, Label) else col
    if not (isinstance(inner, functions.FunctionElement) and inner.name.lower() == "coalesce"):
        return None
    args = list(inner.clauses)
    if len(args) < 2 or _agg_name(args[0]) is None:
        return None
    if not all(_is_constant(a) for a in args[1:]):
        return None
    return args[0]


def _is_constant(expr: Any) -> bool:
    """Whether ``expr`` is a constant (bound values, literals, NULL and casts of them): the
    same value on every shard and for every row."""
    constant = (BindParameter, elements.Null, elements.True_, elements.False_, elements.Cast,
                elements.TypeCoerce, elements.Grouping, Label)
    return all(isinstance(e, constant) for e in visitors.iterate(expr))


def function_names(expr: Any) -> set[str]:
    """Names of the functions called in ``expr`` (outside subqueries) that are not among the
    aggregates the merge knows; in SQL text too (``literal_column("my_agg(x)")``)."""
    out = set()
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, elements.Over) and isinstance(e.element, functions.FunctionElement):
            # The window function runs over its partition, an aggregate as any other.
            stack.extend(e.element.get_children())
            stack.extend(c for c in (e.partition_by, e.order_by) if c is not None)
            continue
        if isinstance(e, functions.FunctionElement):  # (a FromClause too: check it first)
            name = e.name.lower()
            if name not in _MERGEABLE_AGGS and name not in _OTHER_AGGS:
                out.add(name)
        elif isinstance(e, (selectable.SelectBase, selectable.ScalarSelect, selectable.FromClause)):
            continue
        elif (sql := _sql_text(e)) is not None:
            out.update(n for n in _text_calls(_code(sql)) if n not in _MERGEABLE_AGGS and n not in _OTHER_AGGS)
        stack.extend(e.get_children())
    return out


# A function call in SQL text: a name and its opening parenthesis.
_TEXT_CALL = re.compile(r"([A-Za-z_][A-Za-z_0-9$]*)\s*\(")
_TEXT_SELECT = re.compile(r"\bselect\b", re.IGNORECASE)
# A string constant in SQL text ('' inside it is a quote): its words are data, not SQL.
_TEXT_STRING = re.compile(r"'(?:[^']|'')*'")
_TEXT_OVER = re.compile(r"\bover\s*\(", re.IGNORECASE)


def _sql_text(e: Any) -> str | None:
    """The SQL of ``text()`` or ``literal_column()``, else None."""
    if isinstance(e, elements.TextClause):
        return e.text
    if isinstance(e, elements.ColumnClause) and e.is_literal:
        return e.name
    return None


def _code(sql: str) -> str:
    """SQL text with its string constants blanked, to look for what it does."""
    return _TEXT_STRING.sub("''", sql)


def _text_calls(code: str) -> set[str]:
    """The names of the functions SQL text (see :func:`_code`) calls (lowercased)."""
    return {n.lower() for n in _TEXT_CALL.findall(code)}


# In SQL text: FROM or JOIN, and a name after it (maybe schema-qualified).
_TEXT_FROM = re.compile(r"\b(?:from|join)\s*", re.IGNORECASE)
_TEXT_NAME = re.compile(r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)(?:\s*\.\s*(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*))*\s*')


def _reads_a_table(sql: str) -> bool:
    """Whether SQL text (its string constants blanked) holds a subquery that may read a
    table: SELECT, and FROM or JOIN naming something other than a function call alone
    (``(SELECT true FROM pg_sleep(1))`` reads none; ``FROM f(x), t`` does: a list after
    the call, even an ORDER BY's, counts as one, to be safe)."""
    if not _TEXT_SELECT.search(sql):
        return False
    for m in _TEXT_FROM.finditer(sql):
        name = _TEXT_NAME.match(sql, m.end())
        start = m.end() if name is None else name.end()
        if not sql.startswith("(", start):
            if name is None:
                continue  # substring(x FROM 2)
            return True  # a table (or, to be safe, extract(year FROM col))
        # A function's call, or (VALUES ...) / (SELECT ...) (a FROM inside says what it
        # reads): then no list.
        depth = 0
        for i, ch in enumerate(sql[start:]):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                rest = sql[start + i + 1:]
                break
        else:
            return True  # unbalanced: cannot tell
        depth = 0
        for ch in rest:
            depth += (ch == "(") - (ch == ")")
            if depth < 0:
                break  # the end of the subquery
            if depth == 0 and ch == ",":
                return True
    return False


def _refuse_computing_text(stmt: Any) -> None:
    """SQL text is opaque to the merge and to the colocation check: refuse text that holds a
    subquery (anywhere in ``stmt``: each shard would run it over its own rows) or, in the
    select list, ORDER BY or HAVING, calls an aggregate the merge knows (each shard's row
    would be returned side by side). Other names called are asked of the database like
    the functions of ``func`` (:func:`function_names`)."""
    for e in visitors.iterate(stmt):
        sql = _sql_text(e)
        if sql is not None and _reads_a_table(_code(sql)):
            raise ScatterRefused(
                f"SQL text {sql!r} holds a subquery that reads a table, which each shard would run "
                "over its own rows only, and shardkit cannot read SQL text to check it; write it "
                "with SQLAlchemy (select(...), exists(...)), add the shard key, or name a shard",
                construct="subquery in SQL text")
    stack = [*stmt._raw_columns, *stmt._order_by_clauses, *stmt._having_criteria]
    while stack:
        e = stack.pop()
        if isinstance(e, (selectable.SelectBase, selectable.ScalarSelect)) or (
                isinstance(e, selectable.FromClause) and not isinstance(e, functions.FunctionElement)):
            continue
        sql = _sql_text(e)
        code = _code(sql) if sql is not None else ""
        known = sorted(n for n in _text_calls(code) if n in _MERGEABLE_AGGS or n in _OTHER_AGGS)
        if known or _TEXT_OVER.search(code):
            what = f"{known[0]}()" if known else "a window function"
            raise ScatterRefused(
                f"SQL text {sql!r} computes {what}, which shardkit cannot merge from SQL text (each "
                f"shard would return its own); write it with func ({'func.' + known[0] + '(...)' if known else 'func.f(...).over(...)'}) "
                "so that the merge can combine or refuse it, or add the shard key",
                construct=f"{what} in SQL text")
        stack.extend(e.get_children())


def _contains_aggregate(expr: Any) -> str | None:
    """An aggregate over the statement's own rows inside ``expr`` (not one inside a subquery,
    which aggregates the subquery's rows: a correlated ``(SELECT count(*) ...)`` per row)."""
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, (selectable.SelectBase, selectable.ScalarSelect)):
            continue
        if isinstance(e, elements.Over):
            # sum(x) OVER (...) keeps the rows; what it is partitioned or ordered by may hold one.
            stack.extend(c for c in (e.partition_by, e.order_by) if c is not None)
            continue
        if isinstance(e, functions.FunctionElement) and (
            e.name.lower() in _MERGEABLE_AGGS or e.name.lower() in _OTHER_AGGS
        ):
            return e.name.lower()
        stack.extend(e.get_children())
    return None


def exists_column(col: Any) -> selectable.Select[Any] | None:
    """The subquery of an ``EXISTS (...)`` column (labelled or not), else None."""
    if isinstance(col, Label):
        col = col.element
    if isinstance(col, selectable.Exists):
        inner = col.element
        while isinstance(inner, (selectable.ScalarSelect, elements.Grouping)):
            inner = inner.element
        if isinstance(inner, selectable.Select):
            return inner
    return None


def _literal(value: Any, params: Mapping[str, Any]) -> int | None:
    """A LIMIT/OFFSET's value: a bound parameter's is the one given at execution
    (``params``), as the database reads it, else its own."""
    if value is None:
        return None
    if isinstance(value, BindParameter):
        if value.key in params:
            value = params[value.key]
            if value is None:
                return None   # LIMIT NULL / OFFSET NULL: none, as PostgreSQL reads them
        else:
            value = value.effective_value
    elif hasattr(value, "_limit_offset_value"):
        value = value._limit_offset_value
    elif hasattr(value, "value"):
        value = value.value
    if not isinstance(value, int):
        raise ScatterRefused(
            f"LIMIT/OFFSET {value!r} is not a literal integer; across shards the limit must be known "
            "when the query is planned",
            construct="non-literal LIMIT/OFFSET",
        )
    return value


def plan_scatter(stmt: Any, params: Mapping[str, Any] | None = None,
                 placement: Resolver | None = None,
                 disjoint_groups: frozenset[str] = frozenset()) -> tuple[Any, MergePlan]:
    """The statement each shard runs and the plan that merges their rows; ``params``: the
    execution's parameters (HAVING may compare with one).  ``placement``: the group and
    key columns of each sharded table (as for :func:`colocation_problem`), and
    ``disjoint_groups``: the groups whose strategy places each key value on one shard
    (hash, range, list); with them ``count(DISTINCT key)`` is merged, without them refused."""
    if not isinstance(stmt, (selectable.Select, selectable.CompoundSelect)):
        raise ScatterRefused(f"cannot merge {type(stmt).__name__} results across shards",
                             construct=type(stmt).__name__, statement=stmt)
    try:
        if isinstance(stmt, selectable.CompoundSelect):
            shard_stmt, plan = _plan_compound(stmt, params if isinstance(params, Mapping) else {})
        else:
            try:
                shard_stmt, plan = _plan(stmt, params if isinstance(params, Mapping) else {},
                                         placement, disjoint_groups)
            except _WholeGroups as w:
                shard_stmt, plan = _plan_whole_groups(stmt, params if isinstance(params, Mapping) else {},
                                                      w.key)
        plan.statement = stmt
        if plan.checks:
            plan.description += ("; the values of expressions without a SQL type are checked as "
                                 "they are merged")
        return shard_stmt, plan
    except ScatterRefused as e:
        if e.statement is None:
            e.statement = stmt
        raise


def describe_local_derived(stmt: Any, placement: Resolver, disjoint_groups: frozenset[str]) -> str:
    """For explain(): what the merge description adds about the derived tables in ``stmt``'s
    FROM that each shard computes whole (grouped by the shard key), or "".  (Not asked at
    execution: finding a statement's FROM compiles it.)"""
    local = shard_local_derived(stmt, placement, disjoint_groups)
    return (f"; {', '.join(local)} groups (or is DISTINCT) by the shard key: each shard "
            "computes it whole") if local else ""


def _refuse_bundle(col: Any) -> None:
    """Refuse an ORM ``Bundle`` in an aggregate query across shards: the merge combines the
    shards' partials column by column, and a Bundle is one result column made of several."""
    bundle = getattr(col, "_annotations", {}).get("bundle")
    if bundle is not None:
        raise ScatterRefused(
            f"Bundle {bundle.name!r} in a query with GROUP BY or aggregates across shards is "
            "not merged (the merge combines each shard's partial aggregates column by column, "
            "and a Bundle is one result column of several); select its columns themselves "
            "(select(Model.name, func.count())), or add the shard key to WHERE to read one "
            "shard", construct="Bundle with aggregates")


def _is_entity(col: Any) -> bool:
    ann = getattr(col, "_annotations", {})
    return "parententity" in ann and isinstance(col, selectable.FromClause)


# -- UNION ALL / UNION ---------------------------------------------------------------------------


def compound_keyword(stmt: selectable.CompoundSelect) -> str:
    """``UNION ALL``, ``UNION``, ``INTERSECT``, ... of a compound SELECT."""
    kw = stmt.keyword
    return str(getattr(kw, "value", kw)).upper()


def _has_page(stmt: Any) -> bool:
    """Whether ``stmt`` has LIMIT, OFFSET or FETCH."""
    return stmt._limit_clause is not None or stmt._offset_clause is not None or \
        stmt._fetch_clause is not None


def _page_description(limit: int | None, offset: int) -> str:
    """How a LIMIT/OFFSET is applied across shards, for a plan's description."""
    if limit is None and not offset:
        return ""
    return (f"; each shard returns {limit + offset if limit is not None else 'all'} rows, "
            f"then offset {offset} limit {limit} after the merge")


def _refuse_compound_nesting(stmt: selectable.CompoundSelect, distinct: bool, top: bool = True
                             ) -> None:
    """Each shard may run the compound only if its rows over all shards are the shards'
    rows put together: UNION ALL and UNION, not INTERSECT or EXCEPT (a row of one part on
    one shard, of the other part on another); inside a UNION ALL, no UNION (its
    duplicates across shards would stay) and no LIMIT/OFFSET on a nested compound."""
    kw = compound_keyword(stmt)
    if kw not in ("UNION ALL", "UNION"):
        raise ScatterRefused(
            f"{kw} across shards is not merged: a row of one part may be on one shard and the "
            "matching row of the other part on another, which no shard sees together; run the "
            "parts separately and combine them in Python, or add the shard key",
            construct=f"compound select {kw}")
    if not top:
        if _has_page(stmt):
            raise ScatterRefused(
                f"a nested {kw} with LIMIT/OFFSET would be cut on each shard over its own rows "
                "only; put the LIMIT on the outer query, or add the shard key",
                construct=f"nested {kw} with LIMIT")
        if kw == "UNION" and not distinct:
            raise ScatterRefused(
                "a UNION inside a UNION ALL removes duplicates on each shard only (the same "
                "row on two shards would be returned twice); make the outer one a UNION, the "
                "inner one a UNION ALL, or add the shard key",
                construct="UNION inside UNION ALL")
    for s in map(ungrouped, stmt.selects):
        if isinstance(s, selectable.CompoundSelect):
            _refuse_compound_nesting(s, distinct, top=False)


def _refuse_part(part: Any, i: int, keyword: str, distinct: bool) -> None:
    """A part of a UNION ALL / UNION that each shard runs must return, over all shards, the
    rows one database returns for it: filters and projections of the shard's rows, nothing
    computed over them (aggregates, LIMIT, window functions; DISTINCT under UNION ALL)."""
    where = f"part {i} of the {keyword}"
    if not isinstance(part, selectable.Select):
        raise ScatterRefused(f"{where} is a {type(part).__name__}, which shardkit cannot read",
                             construct=f"{keyword} of {type(part).__name__}")
    if not (part._from_obj or part.columns_clause_froms or part.get_final_froms()):
        raise ScatterRefused(
            f"{where} has no FROM clause: every shard would return its rows; select them once "
            "outside the cross-shard query",
            construct=f"{keyword} part without FROM")
    if _has_page(part):
        raise ScatterRefused(
            f"{where} has LIMIT/OFFSET, which each shard would apply to its own rows only; put "
            "the LIMIT on the whole compound, or add the shard key",
            construct=f"{keyword} part with LIMIT")
    if part._group_by_clauses or part._having_criteria or any(
            _contains_aggregate(c) for c in (*part._raw_columns, *part._order_by_clauses)):
        raise ScatterRefused(
            f"{where} groups or aggregates, which each shard would do over its own rows only; "
            "run that part on its own (its aggregates are merged), or add the shard key",
            construct=f"{keyword} part with aggregates")
    for e in (*part._raw_columns, *part._order_by_clauses):
        if any(isinstance(x, elements.Over) for x in visitors.iterate(e)):
            raise ScatterRefused(
                f"{where} has a window function (OVER), which each shard would compute over its "
                "own rows only; add the shard key", construct="window function")
    if distinct_on(part):
        raise ScatterRefused(f"DISTINCT ON in {where} is not merged exactly across shards",
                             construct="DISTINCT ON")
    if not distinct and (part._distinct or any(_is_distinct_column(c) for c in part._raw_columns)):
        raise ScatterRefused(
            f"{where} is SELECT DISTINCT: each shard would remove its own duplicates only, and a "
            "row on two shards would be returned twice; make the compound a UNION, or add the "
            "shard key", construct=f"{keyword} part with DISTINCT")
    for c in part._raw_columns:
        if _is_literal_sql(c) and str(c).strip().endswith("*"):
            raise ScatterRefused(
                f"SELECT * in {where}: shardkit needs to know the columns to merge them; select "
                "the table or its columns", construct="SELECT *")


def _output_name(col: Any) -> str | None:
    """The name a compound's result column has in SQL (its first part's), if shardkit knows it."""
    if isinstance(col, Label) or (isinstance(col, elements.ColumnClause) and not col.is_literal):
        name = col.name
        return None if isinstance(name, elements._anonymous_label) else name
    return None


def _compound_order(clause: Any, names: Sequence[str | None], keyword: str
                    ) -> tuple[int, bool, bool | None]:
    """(result column position, descending, nulls_first or None) of an ORDER BY term of a
    compound, which PostgreSQL resolves by the result's column names."""
    expr, descending, nulls_first = _order_modifiers(clause)
    name = expr.element if isinstance(expr, elements._textual_label_reference) else \
        _output_name(expr)
    found = [i for i, n in enumerate(names) if n is not None and n == name]
    if name is None or len(found) != 1:
        raise ScatterRefused(
            f"ORDER BY {expr} of a {keyword} must name exactly one of its result columns "
            f"({', '.join(n for n in names if n) or 'none named'}), as PostgreSQL resolves it; "
            "order by the column (or its label) itself",
            construct=f"ORDER BY of {keyword} not on a result column")
    return found[0], descending, nulls_first


def _compound_columns(parts: Sequence[Any], keyword: str) -> list[list[Any]]:
    """Per result column, the expression each part selects there."""
    per_part = [list(p.selected_columns) for p in parts]
    if len({len(c) for c in per_part}) != 1:
        raise ScatterRefused(f"the parts of the {keyword} select different numbers of columns",
                             construct=f"{keyword} of different widths")
    return [list(cols) for cols in zip(*per_part)]


def _plan_compound(stmt: selectable.CompoundSelect, params: Mapping[str, Any]) -> tuple[Any, MergePlan]:
    """UNION ALL / UNION whose parts each filter and project the shards' rows: each shard
    runs the whole compound; the rows are concatenated (UNION: de-duplicated again across
    shards, as DISTINCT is), ORDER BY merged and LIMIT/OFFSET applied as for one SELECT."""
    keyword = compound_keyword(stmt)
    distinct = keyword == "UNION"
    _refuse_compound_nesting(stmt, distinct)
    parts = compound_parts(stmt)
    for i, part in enumerate(parts, 1):
        _refuse_part(part, i, keyword, distinct)
        if isinstance(part, selectable.Select):
            _refuse_computing_text(part)
    columns = _compound_columns(parts, keyword)
    visible = len(columns)
    names = [_output_name(c) for c in parts[0].selected_columns]
    limit = _literal(stmt._limit_clause, params)
    offset = _literal(stmt._offset_clause, params) or 0
    if stmt._fetch_clause is not None:
        raise ScatterRefused("FETCH FIRST across shards is not merged; use .limit()",
                             construct="FETCH FIRST")
    checks: list[tuple[int, bool, str]] = []
    collations: list[tuple[str, str]] = []
    if distinct:
        for pos, cols in enumerate(columns):
            for c in cols:
                _refuse_unhashable(c, "UNION")
                if (name := _named_collation(c)) is not None:
                    collations.append((name, "UNION"))
            if any(_untyped(c) for c in cols):
                checks.append((pos, True, "UNION"))
    keys: list[SortKey] = []
    for clause in stmt._order_by_clauses:
        pos, desc, nf = _compound_order(clause, names, keyword)
        for c in columns[pos]:
            _refuse_unmergeable_type(c, "ORDER BY")
        if any(_untyped(c) for c in columns[pos]):
            checks.append((pos, False, "ORDER BY"))
        keys.append(SortKey(pos, desc, desc if nf is None else nf))
    shard_stmt = stmt
    if limit is not None:
        shard_stmt = shard_stmt.limit(limit + offset)
    if offset:
        shard_stmt = shard_stmt.offset(None)
    desc = f"{keyword} of {len(parts)} SELECTs, run whole on each shard; " + (
        "ordered merge on " + ", ".join(k.describe(str(names[k.position])) for k in keys)
        if keys else "concatenation")
    if distinct:
        desc += ", de-duplicated across shards"
    desc += _page_description(limit, offset)
    return shard_stmt, MergePlan("ordered" if keys else "concat", visible, tuple(keys), limit,
                                 offset, distinct, description=desc, checks=tuple(checks),
                                 collations=tuple(collations))


def _plan(stmt: selectable.Select[Any], params: Mapping[str, Any],
          placement: Resolver | None = None,
          disjoint_groups: frozenset[str] = frozenset()) -> tuple[Any, MergePlan]:
    columns = list(stmt._raw_columns)
    _refuse_computing_text(stmt)
    # The cheap answers first: for an ORM statement get_final_froms() compiles it.
    if not (stmt._from_obj or stmt.columns_clause_froms or stmt.get_final_froms()):
        # SELECT EXISTS (...): each shard answers one row for its own rows.
        if all(exists_column(c) is not None for c in columns) and not stmt._where_criteria:
            for c in columns:
                _refuse_per_shard_exists(exists_column(c))
            return stmt, MergePlan("any", len(columns),
                                   description="EXISTS: true if it is true on any shard")
        raise ScatterRefused(
            "a SELECT without FROM over subqueries of sharded tables runs its subqueries on each "
            "shard separately and cannot be merged (EXISTS alone can); select from the table "
            "itself, or add the shard key",
            construct="SELECT without FROM over subqueries")
    # A Core table in the select list is one result column per table column; an ORM entity
    # is one (the object).
    visible = sum(len(c.c) if isinstance(c, selectable.FromClause) and not _is_entity(c) else 1
                  for c in columns)
    limit = _literal(stmt._limit_clause, params)
    offset = _literal(stmt._offset_clause, params) or 0
    if stmt._fetch_clause is not None:
        raise ScatterRefused("FETCH FIRST across shards is not merged; use .limit()",
                             construct="FETCH FIRST")
    if distinct_on(stmt):
        raise ScatterRefused("DISTINCT ON across shards is not merged exactly",
                             construct="DISTINCT ON")
    # Other SQLAlchemy 2.1 syntax extensions (select().ext(...)).
    for attr in getattr(stmt, "_position_map", {}).values():
        ext = getattr(stmt, attr, None)
        if ext is not None:
            raise ScatterRefused(f"{type(ext).__name__} across shards is not merged exactly",
                                 construct=type(ext).__name__)
    windows = [e for part in (*columns, *stmt._order_by_clauses, *stmt._having_criteria)
               for e in visitors.iterate(part) if isinstance(e, elements.Over)]
    window_keys = [_window_key(w, stmt, placement, disjoint_groups) for w in windows]
    order = [_unwrap_order(c, stmt) for c in stmt._order_by_clauses]
    # select(distinct(col)) renders SELECT DISTINCT col, like select(col).distinct().
    distinct = bool(stmt._distinct) or any(_is_distinct_column(c) for c in columns)
    # group_by(func.f(x)) is stored as a one-element ClauseList around the labelled function.
    group_by = [g.clauses[0] if type(g) is elements.ClauseList and len(g.clauses) == 1 else g
                for g in stmt._group_by_clauses]
    # GROUP BY (a, b) groups by a and b.
    group_by = [_by_name(c, stmt, group_by=True) for g in group_by
                for c in (g.clauses if isinstance(g, elements.Tuple) else (g,))]
    for c in columns:
        if _is_literal_sql(c) and str(c).strip().endswith("*"):
            raise ScatterRefused(
                "SELECT * across shards: shardkit needs to know the columns to merge them; "
                "select the table or its columns", construct="SELECT *")
    for g in group_by:
        _refuse_sql_text(g, "GROUP BY", "group")
        g_inner = g.element if isinstance(g, Label) else g
        if isinstance(g_inner, functions.FunctionElement) and g_inner.name.lower() in (
                "rollup", "cube", "grouping sets", "grouping_sets"):
            sql = g_inner.name.upper().replace("_", " ")
            raise ScatterRefused(
                f"GROUP BY {sql} across shards is not merged; group by the "
                "columns and add the subtotals in Python", construct=f"GROUP BY {sql}")
        _refuse_unhashable(g, "GROUP BY")
    collations = [(name, "GROUP BY") for g in group_by if (name := _named_collation(g)) is not None]
    # Under a nondeterministic collation 'a' and 'A', placed on two shards, are one
    # partition for the database.
    collations += [(name, "window function") for k in window_keys
                   if (name := _named_collation(k)) is not None]
    if distinct:
        for c in columns:
            _refuse_unhashable(c, "DISTINCT")
        for c in stmt.selected_columns:   # (a table's columns one by one)
            if (name := _named_collation(c)) is not None:
                collations.append((name, "DISTINCT"))
    # coalesce(agg, constant): merged as agg, then coalesced.
    coalesced = [_coalesced_aggregate(c) for c in columns]
    aggs = [_agg_name(c) if inner is None else _agg_name(inner)
            for c, inner in zip(columns, coalesced)]
    nested = [(_contains_aggregate(c), c) for c, a in zip(columns, aggs) if a is None]
    if windows and (group_by or any(aggs) or any(name for name, _ in nested)):
        raise ScatterRefused(
            "a window function in a query with GROUP BY or aggregates across shards is not "
            "merged (each shard would compute it over its own groups); select the rows or groups "
            "and compute it in Python, or add the shard key to WHERE to read one shard",
            construct="window function with aggregates")
    whole_key: list[Any] = []

    def whole_groups() -> None:
        """Raise _WholeGroups if GROUP BY holds a one-column shard key that keeps each
        group whole on one shard (then any aggregate is exact per group); else return, and
        the caller refuses as before."""
        if not whole_key:
            whole_key.append(_whole_group_key(group_by, stmt, placement, disjoint_groups)
                             if group_by else None)
        if whole_key[0] is not None:
            raise _WholeGroups(whole_key[0])

    for name, _c in nested:
        if name is not None:
            whole_groups()
            _refuse_bundle(_c)
            raise ScatterRefused(
                f"an expression over {name}() in the select list cannot be merged from per-shard "
                f"partials; select {name}(...) itself and compute the expression in Python",
                construct=f"expression over {name}()",
            )
    for a in aggs:
        if a is not None and a not in _MERGEABLE_AGGS:
            whole_groups()
            raise ScatterRefused(
                f"{a}() across shards cannot be merged from per-shard partials; add the shard key "
                "or compute it from the rows (grouped by the one-column shard key of a hash, "
                "range or list group, it is computed whole on each shard)",
                construct=f"{a}()",
            )
    def refuse_distinct(expr: Any) -> bool:
        """Refuse an aggregate over DISTINCT values, unless it is count(DISTINCT shard key)
        (then True)."""
        try:
            key = _refuse_distinct_aggregate(expr, stmt, placement, disjoint_groups)
        except ScatterRefused:
            whole_groups()
            raise
        if key is None:
            return False
        # Under a nondeterministic collation 'a' and 'A', placed on two shards, are one
        # value for the database.
        if (name := _named_collation(key)) is not None and (name, "count(DISTINCT)") not in collations:
            collations.append((name, "count(DISTINCT)"))
        return True

    for c in columns:
        refuse_distinct(c)

    if not group_by and not any(aggs):
        if stmt._having_criteria:
            raise ScatterRefused("HAVING without GROUP BY or aggregates", construct="HAVING")
        if distinct and any(_is_entity(c) for c in columns):
            raise ScatterRefused(
                "DISTINCT over ORM entities across shards is not merged; select columns",
                construct="DISTINCT entity",
            )
        if distinct and order:
            # PostgreSQL refuses this; the hidden sort columns would make each shard accept it.
            plain = [_unwrap_column(c) for c in columns]
            for expr, _, _ in order:
                if not any(_same(expr, c) for c in plain):
                    raise ScatterRefused(
                        f"for SELECT DISTINCT, ORDER BY expressions must appear in select list "
                        f"({expr})",
                        construct="DISTINCT with ORDER BY not in select list",
                    )
        for expr, _, _ in order:
            name = _contains_aggregate(expr)
            if name is not None:
                # ORDER BY count(*) makes the query an aggregate (one row), which the shards'
                # rows side by side are not.
                raise ScatterRefused(
                    f"ORDER BY {name}() in a query without GROUP BY or aggregates in its select "
                    "list: one database returns one row, each shard would return its own; "
                    "select the aggregate", construct="aggregate in ORDER BY without GROUP BY")
        checks = _distinct_checks(columns) if distinct else []
        shard_stmt, keys, desc = _sorted_page(stmt, order, visible, limit, offset, checks)
        kind = "ordered" if order else "concat"
        if distinct:
            desc += ", de-duplicated across shards"
        desc += _page_description(limit, offset)
        return shard_stmt, MergePlan(kind, visible, tuple(keys), limit, offset,
                                     distinct, description=desc, checks=tuple(checks),
                                     collations=tuple(collations))

    # Aggregates, with or without GROUP BY.
    if distinct:
        raise ScatterRefused("DISTINCT together with aggregates across shards is not merged",
                             construct="DISTINCT with aggregates")
    for c in columns:
        if _is_entity(c):
            name = getattr(c._annotations.get("parententity"), "class_", None)
            name = getattr(name, "__name__", "an entity")
            raise ScatterRefused(
                f"ORM entities in an aggregate query across shards ({name} beside aggregates or "
                "GROUP BY) are not merged; select its columns instead (the primary key and those "
                "you need, also in GROUP BY) and load the objects by key afterwards "
                "(session.get(), or an IN of the keys), or add the shard key",
                construct="entity with GROUP BY")
    # The caller's own columns come first, unused by the merge, so the result's column
    # names are exactly those one database would give; the partials follow.
    shard_cols: list[Any] = list(columns)
    outputs: list[OutputColumn] = []
    group_positions: list[int] = []
    checks: list[tuple[int, bool, str]] = []

    def add(col: Any) -> int:
        shard_cols.append(col.label(f"_sk_c{len(shard_cols)}"))
        return len(shard_cols) - 1

    def partial(expr: Any) -> OutputColumn:
        inner = expr.element if isinstance(expr, Label) else expr
        distinct_key = refuse_distinct(inner)
        # agg(...) FILTER (WHERE c): partials of the rows where c holds, merged as agg's.
        filt = inner if isinstance(inner, elements.FunctionFilter) else None
        if filt is not None:
            inner = filt.func

        def filtered(agg: Any) -> Any:
            return agg if filt is None else agg.filter(filt.criterion)

        name = inner.name.lower()
        args = list(inner.clauses)
        if name in ("min", "max", "sum", "avg"):
            for arg in args:
                _refuse_unmergeable_type(arg, f"{name}()")
            # A result type given to the aggregate itself (type_=...): SQLAlchemy converts
            # each shard's partial with it before the merge combines them (avg's partials,
            # sum and count, do not carry it at all).  Float is exact only over float values.
            declared = _unmergeable_type(inner)
            if declared is None and name in ("sum", "avg") and isinstance(inner.type, sqltypes.Float) \
                    and not all(isinstance(_sql_type(getattr(a, "type", None)), sqltypes.Float) for a in args):
                declared = "numeric values converted to float"
            if declared is not None:
                raise ScatterRefused(
                    f"{name}() declared with type_={type(inner.type).__name__} ({declared}): "
                    "SQLAlchemy would convert each shard's partial before the merge combines "
                    f"them; leave out type_= and convert the merged value in Python, or add the "
                    "shard key", construct=f"{name}() with a declared result type")
        untyped = name in ("min", "max", "sum", "avg") and any(_untyped(a) for a in args)
        real = len(args) == 1 and _is_float4(args[0])
        if name == "avg":
            # PostgreSQL averages real in double precision: so do the partial sums.
            total = func.sum(cast(args[0], DOUBLE_PRECISION)) if real else func.sum(*args)
            out = OutputColumn("avg", (add(filtered(total)), add(filtered(func.count(*args)))))
        else:
            # (count(DISTINCT shard key): each shard's own count, added up as counts are.)
            out = OutputColumn(name, (add(filtered(inner)),), float4=real and name == "sum",
                               distinct_key=distinct_key)
        if untyped:
            checks.append((out.positions[0], False, f"{name}()"))
        return out

    def group_index(expr: Any) -> int | None:
        target = expr.element if isinstance(expr, Label) else expr
        for i, g in enumerate(group_by):
            g2 = g.element if isinstance(g, Label) else g
            if _same(target, g2):
                return i
        return None

    group_pos_for: dict[int, int] = {}
    for g_i, g in enumerate(group_by):
        pos = add(g.element if isinstance(g, Label) else g)
        group_positions.append(pos)
        group_pos_for[g_i] = pos
        if _untyped(g):
            checks.append((pos, True, "GROUP BY"))
    same_types: list[tuple[int, int, str]] = []
    for i, (c, a, inner) in enumerate(zip(columns, aggs, coalesced)):
        if inner is not None:
            # Each shard's own coalesce(partial, constant), at the caller's column i, is the
            # value where the merged aggregate is NULL (then NULL on every shard); elsewhere
            # the merged aggregate is, if coalesce keeps its type (checked as rows come).
            out = partial(inner)
            outputs.append(OutputColumn(out.kind, out.positions + (i,), out.float4, coalesce=True,
                                        distinct_key=out.distinct_key))
            typed = c.element if isinstance(c, Label) else c
            same_types.append((add(cast(func.pg_typeof(inner), sqltypes.Text)),
                               add(cast(func.pg_typeof(typed), sqltypes.Text)), str(typed)))
            continue
        if a is not None:
            outputs.append(partial(c))
            continue
        gi = group_index(c)
        if gi is None and (_is_constant(c) or _grouped_by_primary_key(c, group_by)):
            # SELECT 'x', count(*): every shard's row holds it at the caller's position.
            # So does a column of a table whose primary key is grouped by (one value per
            # group, which PostgreSQL lets the select list name ungrouped).
            outputs.append(OutputColumn("value", (i,)))
            continue
        if gi is None:
            _refuse_bundle(c)
            if function_names(c):
                # An aggregate of the application's (CREATE AGGREGATE), maybe: each shard
                # computes it for its whole groups (anything else, the database judges).
                whole_groups()
            raise ScatterRefused(
                f"column {c} is neither in GROUP BY nor an aggregate", construct="ungrouped column")
        outputs.append(OutputColumn("value", (group_pos_for[gi],)))

    # HAVING and ORDER BY work on merged values: compile them into evaluators.
    def term(expr: Any) -> Callable[[Sequence[Any], Sequence[Any]], Any]:
        """A function of (merged visible row, merged extras) for an aggregate or group expression."""
        for i, c in enumerate(columns):
            c2 = c.element if isinstance(c, Label) else c
            e2 = expr.element if isinstance(expr, Label) else expr
            if _same(e2, c2):
                if outputs[i].kind == "value" and _untyped(c2):
                    # a group key compared by order, not only for equality
                    checks.append((outputs[i].positions[0], False, "HAVING/ORDER BY"))
                return lambda row, extra, i=i: row[i]
        if _agg_name(expr) is not None:
            if _agg_name(expr) not in _MERGEABLE_AGGS:
                whole_groups()
                raise ScatterRefused(f"{_agg_name(expr)}() in HAVING/ORDER BY cannot be merged",
                                     construct=f"{_agg_name(expr)}()")
            extras.append(partial(expr))
            j = len(extras) - 1
            return lambda row, extra, j=j: extra[j]
        gi = group_index(expr)
        if gi is not None:
            pos = group_pos_for[gi]
            extras.append(OutputColumn("value", (pos,)))
            if _untyped(expr):
                checks.append((pos, False, "HAVING/ORDER BY"))
            j = len(extras) - 1
            return lambda row, extra, j=j: extra[j]
        if (text := _under_c_collation(expr)) is not None:
            # name COLLATE "C" (what the README tells a non-C database to write) that is not
            # itself selected or grouped by: the same values as name, ordered by code point,
            # as the merge compares text.
            return term(text)
        if _grouped_by_primary_key(expr, group_by):
            # A column of a table whose primary key is grouped by: one value per group.
            extras.append(OutputColumn("value", (add(expr),)))
            j = len(extras) - 1
            return lambda row, extra, j=j: extra[j]
        if _contains_aggregate(expr) is not None or function_names(expr):
            # An expression over aggregates, or one of the application's: exact per group.
            whole_groups()
        raise ScatterRefused(f"{expr} in HAVING/ORDER BY is neither an aggregate nor a group key",
                             construct="HAVING/ORDER BY expression")

    extras: list[OutputColumn] = []
    having_fn = None
    if stmt._having_criteria:
        having_fn = _compile_predicate(elements.and_(*stmt._having_criteria), term, params)
    order_terms = [(term(expr), desc, desc if nf is None else nf) for expr, desc, nf in order]

    shard_stmt = stmt.with_only_columns(*shard_cols)
    shard_stmt = shard_stmt.order_by(None).limit(None).offset(None)
    shard_stmt._having_criteria = ()  # HAVING is evaluated after the merge
    kind = "group" if group_by else "aggregate"
    desc = (f"{'group-by merge on ' + str(len(group_by)) + ' key(s)' if group_by else 'aggregate merge'}"
            f" of {', '.join(o.describe() for o in outputs)}"
            + ("; HAVING after the merge" if having_fn else "")
            + ("; ORDER BY after the merge" if order else "")
            + (f"; offset {offset} limit {limit} after the merge" if limit is not None or offset else ""))
    plan = MergePlan(kind, visible, (), limit, offset, False, tuple(outputs + extras),
                     tuple(group_positions), having_fn, desc, order_terms=tuple(order_terms),
                     n_outputs=len(outputs), checks=tuple(checks), same_types=tuple(same_types),
                     collations=tuple(collations))
    return shard_stmt, plan


def _distinct_checks(columns: Sequence[Any]) -> list[tuple[int, bool, str]]:
    """The merge's checks of the values of the select list's expressions without a SQL type,
    compared for equality by DISTINCT: ``(result position, True, "DISTINCT")``."""
    checks: list[tuple[int, bool, str]] = []
    pos = 0
    for c in columns:
        if isinstance(c, selectable.FromClause) and not _is_entity(c) \
                and not isinstance(c, ColumnElement):   # (a function is a FromClause too)
            pos += len(c.c)
            continue
        if _untyped(c):
            checks.append((pos, True, "DISTINCT"))
        pos += 1
    return checks


def _sorted_page(stmt: Any, order: Sequence[tuple[Any, bool, bool | None]], visible: int,
                 limit: int | None, offset: int, checks: list[tuple[int, bool, str]]
                 ) -> tuple[Any, list[SortKey], str]:
    """``stmt`` as each shard runs it for a merge of its rows as they are: its ORDER BY terms
    as hidden columns after the ``visible`` ones (an untyped one checked as merged: added to
    ``checks``) and LIMIT + OFFSET rows from the first; with the merge's sort keys and its
    description ("ordered merge on ..." or "concatenation")."""
    shard_stmt = stmt
    keys = []
    if order:
        shard_stmt = shard_stmt.add_columns(*[expr.label(f"_sk_o{i}")
                                              for i, (expr, _, _) in enumerate(order)])
        for i, (expr, desc, nf) in enumerate(order):
            keys.append(SortKey(visible + i, desc, desc if nf is None else nf))
            if _untyped(expr):
                checks.append((visible + i, False, "ORDER BY"))
    if limit is not None:
        shard_stmt = shard_stmt.limit(limit + offset)
    if offset:
        shard_stmt = shard_stmt.offset(None)
    how = ("ordered merge on " + ", ".join(k.describe(str(e)) for k, (e, _, _) in zip(keys, order))
           if order else "concatenation")
    return shard_stmt, keys, how


class _WholeGroups(Exception):
    """Raised while planning a grouped read that cannot be merged from per-shard partials,
    whose GROUP BY holds ``key`` (see :func:`_whole_group_key`): planned whole per shard."""

    def __init__(self, key: Any) -> None:
        super().__init__(str(key))
        self.key = key


def _whole_group_key(group_by: Sequence[Any], stmt: Any, placement: Resolver | None,
                     disjoint_groups: frozenset[str]) -> Any | None:
    """The GROUP BY term that is the one-column shard key of a hash, range or list group
    placing every row the query groups (the conditions of :func:`_distinct_key`, as for
    count(DISTINCT key) and windows partitioned by the key), or None.  Then each group's
    rows are all on one shard (during a move, on the shard that owns them), and each shard
    computes its groups whole, as one database does."""
    for g in group_by:
        c = g
        while isinstance(c, (Label, elements.Grouping)):
            c = c.element
        col = _plain(c)
        if isinstance(col, elements.ColumnClause) and not col.is_literal and col.table is not None \
                and _distinct_key(col, stmt, placement, disjoint_groups) is None:
            return col
    return None


def _not_null(key: Any, stmt: Any) -> bool:
    """Whether ``stmt`` groups no row whose shard key ``key`` is NULL: the column is NOT
    NULL (a primary key's part), or WHERE / HAVING requires a value (``key IS NOT NULL``,
    a comparison or IN, AND-ed with the rest)."""
    if getattr(key, "nullable", True) is False or getattr(key, "primary_key", False):
        return True
    stack = [*stmt._where_criteria, *stmt._having_criteria]
    while stack:
        e = stack.pop()
        while isinstance(e, elements.Grouping):
            e = e.element
        if isinstance(e, elements.BooleanClauseList) and e.operator is operators.and_:
            stack.extend(e.clauses)
            continue
        if not isinstance(e, elements.BinaryExpression):
            continue
        left, right, op = _plain(e.left), e.right, e.operator
        if not (isinstance(left, elements.ColumnClause) and _same(left, key)):
            continue
        if op is operators.is_not and isinstance(right, elements.Null):
            return True
        if op in (operators.eq, operators.ne, operators.lt, operators.le, operators.gt,
                  operators.ge, operators.in_op) and not isinstance(right, elements.Null):
            return True
    return False


def _plan_whole_groups(stmt: selectable.Select[Any], params: Mapping[str, Any],
                       key: Any) -> tuple[Any, MergePlan]:
    """Plan a read grouped by shard key ``key`` (see :func:`_whole_group_key`): each shard
    runs it as written (GROUP BY, every aggregate, HAVING on its whole groups), with its
    ORDER BY terms as extra columns and LIMIT + OFFSET rows; the merge concatenates the
    shards' groups (in ORDER BY order), removes DISTINCT rows repeated across shards when
    the key is not selected, and keeps the page."""
    columns = list(stmt._raw_columns)
    where = f"{key.table.name}.{key.name}" if getattr(key.table, "name", None) else str(key)
    if not _not_null(key, stmt):
        # Each shard's NULL-key rows would make a NULL group of their own, where one database
        # makes one.  (shardkit places no NULL key; SQL outside it may write one.)
        raise ScatterRefused(
            f"grouped by the shard key {where}, which is not declared NOT NULL: rows with a NULL "
            "key (shardkit never writes one, but SQL outside it may; verify reports them) on "
            "several shards would make one NULL group per shard where one database makes one; "
            f"add .where({key.name} IS NOT NULL) (then each group is whole on one shard), "
            "declare the column NOT NULL, or add the shard key to WHERE to read one shard",
            construct="GROUP BY a nullable shard key")
    visible = sum(len(c.c) if isinstance(c, selectable.FromClause) and not _is_entity(c) else 1
                  for c in columns)
    limit = _literal(stmt._limit_clause, params)
    offset = _literal(stmt._offset_clause, params) or 0
    order = [_unwrap_order(c, stmt) for c in stmt._order_by_clauses]
    distinct = bool(stmt._distinct) or any(_is_distinct_column(c) for c in columns)
    plain = [_plain(_unwrap_column(c)) for c in columns]
    # With the key selected, no two shards return the same row.
    dedupe = distinct and not any(isinstance(c, ColumnElement) and _same(c, key) for c in plain)
    if distinct:
        if any(_is_entity(c) for c in columns):
            raise ScatterRefused(
                "DISTINCT over ORM entities across shards is not merged; select columns",
                construct="DISTINCT entity")
        for expr, _, _ in order:
            # PostgreSQL refuses this; the hidden sort columns would make each shard accept it.
            if not any(_same(expr, c) for c in plain):
                raise ScatterRefused(
                    f"for SELECT DISTINCT, ORDER BY expressions must appear in select list ({expr})",
                    construct="DISTINCT with ORDER BY not in select list")
    checks = _distinct_checks(columns) if dedupe else []
    # Under a nondeterministic collation 'a' and 'A', placed on two shards, are one group
    # for the database (as for the group-by merge; asked of the database at execution).
    collations = [(name, "GROUP BY")] if (name := _named_collation(key)) is not None else []
    if dedupe:
        collations += [(name, "DISTINCT") for c in stmt.selected_columns
                       if (name := _named_collation(c)) is not None]
    shard_stmt, keys, how = _sorted_page(stmt, order, visible, limit, offset, checks)
    desc = (f"grouped by the shard key {where}: each shard computes its groups whole "
            f"(every aggregate, HAVING), merged by {how}")
    if dedupe:
        desc += ", de-duplicated across shards"
    desc += _page_description(limit, offset)
    return shard_stmt, MergePlan("ordered" if order else "concat", visible, tuple(keys), limit, offset,
                                 dedupe, description=desc, checks=tuple(checks),
                                 collations=tuple(collations), whole_groups=where)


def _under_c_collation(expr: Any) -> Any | None:
    """``x`` of ``x COLLATE "C"`` (or ``"POSIX"``) where ``x`` is text, else None."""
    inner = expr.element if isinstance(expr, Label) else expr
    if not (isinstance(inner, elements.BinaryExpression) and inner.operator is operators.collate
            and inner.right.collation.upper() in ("C", "POSIX")):
        return None
    left = inner.left
    t = _sql_type(getattr(left, "type", None))
    is_text = isinstance(t, sqltypes.String) and not isinstance(t, sqltypes.Enum)
    return left if is_text or _database_collated(left) else None


def _grouped_by_primary_key(col: Any, group_by: Sequence[Any]) -> bool:
    """Whether select-list column ``col`` is a column of a table (or of an alias of one)
    whose whole primary key is among the GROUP BY terms: PostgreSQL accepts it ungrouped
    (functionally dependent: one value per group)."""
    inner = _plain(col.element if isinstance(col, Label) else col)
    if not isinstance(inner, elements.ColumnClause) or inner.is_literal or inner.table is None:
        return False
    frm = inner.table
    if not isinstance(_table_of(frm), schema.Table):
        return False
    pk = list(frm.primary_key)
    grouped = [_plain(g.element if isinstance(g, Label) else g) for g in group_by]
    return bool(pk) and all(any(k is g for g in grouped) for k in pk)


def _refuse_per_shard_exists(inner: Any) -> None:
    """EXISTS (SELECT ...) is true on one database iff it is true on some shard, unless the
    subquery's rows depend on other shards' rows: an OFFSET, groups (with HAVING) or
    aggregates over each shard's rows only."""
    construct = ("OFFSET" if inner._offset_clause is not None else
                 "GROUP BY" if inner._group_by_clauses else
                 "HAVING" if inner._having_criteria else
                 "an aggregate" if any(_contains_aggregate(c) for c in inner._raw_columns) else None)
    if construct is not None:
        raise ScatterRefused(
            f"EXISTS over a subquery with {construct}: each shard would answer over its own rows "
            "only, and 'true on some shard' is not the answer of one database; add the shard key "
            "or count the rows instead", construct=f"EXISTS with {construct}")


def _refuse_distinct_aggregate(expr: Any, stmt: Any = None, placement: Resolver | None = None,
                               disjoint_groups: frozenset[str] = frozenset()) -> Any:
    """count/sum/avg(DISTINCT x): a value may occur on several shards, so partials do not add
    up; except count(DISTINCT key) of a one-column shard key (see :func:`_distinct_key`),
    whose column is returned (None for any other aggregate)."""
    name = _agg_name(expr)
    if name not in ("count", "sum", "avg") or not _has_distinct(expr):
        return None
    col = _distinct_argument(expr)
    if name != "count":
        # sum/avg of distinct key values would add up too, but summing keys is no report
        # anyone runs; kept refused rather than merged by a path nobody tests.
        raise ScatterRefused(
            f"{name}(DISTINCT ...) across shards cannot be merged from per-shard partials (a value "
            "may occur on several shards); select the distinct values and add them up in "
            "Python, or add the shard key to WHERE to read one shard",
            construct=f"{name}(DISTINCT)")
    if col is None:
        # lower(key) of two keys on two shards may be one value.
        problem = ("it counts an expression or SQL text, not a column, and a value of it may "
                   "occur on several shards")
    else:
        problem = _distinct_key(col, stmt, placement, disjoint_groups)
        if problem is None:
            return col
    raise ScatterRefused(
        f"count(DISTINCT ...) across shards cannot be merged from per-shard partials ({problem}); "
        "it is merged only over the one-column shard key of a hash, range or list group "
        "(count(DISTINCT orders.tenant_id)), its table inner-joined on the key; otherwise "
        "select the distinct values (select(x).distinct()) and count them in Python, or add "
        "the shard key to WHERE to read one shard",
        construct="count(DISTINCT)",
    )


def _distinct_argument(expr: Any) -> Any:
    """The column ``x`` of ``count(DISTINCT x)`` (spelt ``distinct(x)``, ``x.distinct()`` or
    ``func.distinct(x)``; labels and ORM annotations taken off), or None for anything else
    (an expression, several arguments, SQL text)."""
    if isinstance(expr, Label):
        expr = expr.element
    if isinstance(expr, elements.FunctionFilter):   # FILTER (WHERE ...) keeps it exact
        expr = expr.func
    args = list(expr.clauses) if isinstance(expr, functions.FunctionElement) else []
    if len(args) != 1:
        return None
    arg = args[0]
    if isinstance(arg, UnaryExpression) and arg.operator is operators.distinct_op \
            and arg.modifier is None:
        col = arg.element
    elif isinstance(arg, functions.FunctionElement) and arg.name.lower() == "distinct" \
            and len(arg.clauses) == 1:
        col = list(arg.clauses)[0]
    else:
        return None
    while isinstance(col, (Label, elements.Grouping)):
        col = col.element
    col = _plain(col)
    if not isinstance(col, elements.ColumnClause) or col.is_literal or col.table is None:
        return None
    return col


def _distinct_key(col: Any, stmt: Any, placement: Resolver | None,
                  disjoint_groups: frozenset[str]) -> str | None:
    """Why adding up the shards' ``count(DISTINCT col)`` is not one database's count, or None.

    None when ``col`` is the one-column shard key of a table in ``stmt``'s FROM whose group
    places each key value on one shard (hash, range, list; during a move, each shard's
    rows of buckets or slices it does not own are left out), and every other sharded table
    in FROM is of that group and tied to it on the key (the colocation check): then each
    row a shard's query combines carries a key value of that shard's own, the shards'
    sets of distinct values are disjoint, and their counts add up, also per group of
    GROUP BY (whatever else it groups by)."""
    if placement is None or stmt is None:
        return "a value may occur on several shards"
    frm = _plain(col.table)
    table = _table_of(frm)
    if not isinstance(table, selectable.TableClause):
        return (f"{col} is a column of a subquery, not of a sharded table, and a value of it "
                "may occur on several shards")
    placed = placement(table.fullname)
    if placed is None or col.name not in placed[1]:
        return f"{col} is not a shard key, and a value may occur on several shards"
    group, keys = placed
    if len(keys) != 1:
        return (f"{col} is part of the composite shard key ({', '.join(keys)}) of group {group}: "
                "a value of it may occur on several shards")
    if group not in disjoint_groups:
        return (f"group {group}'s strategy is not hash, range or list, and shardkit cannot tell "
                "whether a key value is on one shard")
    problem = colocation_problem(stmt, placement, local_groups=disjoint_groups)
    if problem is not None:
        return problem
    froms = _froms(stmt)
    instances, problem = _instances(froms, placement, [], local=disjoint_groups)
    if problem is not None:
        return problem
    if not any(i.frm is frm for i in instances):
        return f"{col} is not a column of a table in the query's FROM"
    others = sorted({i.group for i in instances} - {group})
    if others:
        return f"the query reads tables of groups {', '.join(others)} besides {group}"
    if id(frm) in _optional_sides(froms):
        # Probably exact (its NULLs are not counted), but kept out: the argument above is
        # about the rows of the key's table, which an outer join pads.
        return (f"{col} is on the optional side of an outer join; use the key of "
                "the table on the other side, or join inner")
    return None


def _windows_of(expr: Any) -> Iterator[elements.Over]:
    """The window functions in ``expr`` computed over its statement's rows (not those of a
    subquery in it, which run over the subquery's rows)."""
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, (selectable.SelectBase, selectable.ScalarSelect)):
            continue
        if isinstance(e, elements.Over):
            yield e
        stack.extend(e.get_children())


def orm_windows_problem(stmt: Any, placement: Resolver | None,
                        disjoint_groups: frozenset[str]) -> str | None:
    """Why an ORM ``SELECT`` of entities cannot be merged across shards because of a window
    function the ORM adds to what it selects, or None: a ``column_property()``, a
    ``query_expression()``'s default or a ``with_expression()`` such as ``count(*) OVER ()``,
    which each shard would compute over its own rows only (those of the entities a joined
    eager load brings too).  Such a window partitioned by the one-column shard key is exact,
    as in a select list (:func:`_window_key`); the statement's own select list, ORDER BY and
    HAVING are the merge plan's to judge.  (Builds the ORM's statement: ask once per
    statement shape.)"""
    if not isinstance(stmt, selectable.Select) or \
            stmt._propagate_attrs.get("compile_state_plugin") != "orm":
        return None
    if not stmt._with_options and not any(_is_entity(c) for c in stmt._raw_columns):
        return None
    try:
        built = stmt._compile_state_factory(stmt, stmt._default_compiler()).statement
    except Exception:   # noqa: BLE001 - its execution raises its own error
        return None
    own = [w for part in (*stmt._raw_columns, *stmt._order_by_clauses, *stmt._having_criteria)
           for w in _windows_of(part)]
    # The ORM puts a statement with LIMIT (and a joined eager load of a collection) in a
    # derived table of its own: its select list is computed on each shard too.
    selects, seen = [built], set()
    while selects:
        sel = selects.pop()
        if id(sel) in seen:
            continue
        seen.add(id(sel))
        for frm in sel._from_obj:
            for e in visitors.iterate(frm):
                if isinstance(e, selectable.Subquery) and isinstance(e.element, selectable.Select):
                    selects.append(e.element)
        for col in sel._raw_columns:
            for w in _windows_of(col):
                if any(_same(w, o) for o in own):
                    continue
                try:
                    _window_key(w, sel, placement, disjoint_groups)
                except ScatterRefused as e:
                    return (f"an ORM entity loads {w} (a column_property(), query_expression() or "
                            f"with_expression() of it): {e}")
    return None


def _window_key(over: elements.Over, stmt: Any, placement: Resolver | None,
                disjoint_groups: frozenset[str]) -> Any:
    """The shard key column a window function of a cross-shard query is partitioned by, or
    ScatterRefused.  Partitioned by the one-column key of a hash, range or list group (the
    conditions of :func:`_distinct_key`: every row of a partition on one shard), each shard
    computes each of its partitions whole, over the rows WHERE leaves (a moving bucket's
    rows only on its owner), as one database does."""
    problem = "it has no PARTITION BY"
    for c in (over.partition_by.clauses if over.partition_by is not None else ()):
        while isinstance(c, (Label, elements.Grouping)):
            c = c.element
        col = _plain(c)
        if not isinstance(col, elements.ColumnClause) or col.is_literal or col.table is None:
            problem = f"it is partitioned by {c}, not by a column"
            continue
        why = _distinct_key(col, stmt, placement, disjoint_groups)
        if why is None:
            return col
        problem = why
    raise ScatterRefused(
        f"a window function (OVER) runs on each shard over that shard's rows only, and "
        f"{over} is not partitioned by a shard key that keeps each partition on one shard "
        f"({problem}); partition it by the one-column shard key of a hash, range or list "
        "group (PARTITION BY the key, then anything else), compute it from the merged rows, "
        "or add the shard key to WHERE to read one shard",
        construct="window function",
    )


def _is_distinct_column(col: Any) -> bool:
    if isinstance(col, Label):
        col = col.element
    return (isinstance(col, UnaryExpression) and col.operator is operators.distinct_op) or (
        isinstance(col, functions.FunctionElement) and col.name.lower() == "distinct")


def _unwrap_column(col: Any) -> Any:
    """A select-list column without its label or column-level DISTINCT."""
    if isinstance(col, Label):
        col = col.element
    if isinstance(col, UnaryExpression) and col.operator is operators.distinct_op:
        col = col.element
    elif isinstance(col, functions.FunctionElement) and col.name.lower() == "distinct":
        args = list(col.clauses)
        if len(args) == 1:
            col = args[0]
    return col


def _has_distinct(expr: Any) -> bool:
    """Whether aggregate ``expr`` is over DISTINCT values: ``count(x.distinct())``,
    ``count(distinct(x))``, and the spellings PostgreSQL reads the same way:
    ``func.count(func.distinct(x))`` (``count(distinct(x))``) and SQL text starting with
    DISTINCT (``func.count(literal_column("DISTINCT x"))``)."""
    if isinstance(expr, Label):
        expr = expr.element
    if isinstance(expr, elements.FunctionFilter):
        expr = expr.func
    stack = list(expr.clauses) if isinstance(expr, functions.FunctionElement) else [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, (selectable.SelectBase, selectable.ScalarSelect)):
            continue
        if isinstance(e, UnaryExpression) and e.operator is operators.distinct_op:
            return True
        if isinstance(e, functions.FunctionElement) and e.name.lower() == "distinct":
            return True
        sql = e.text if isinstance(e, elements.TextClause) else \
            e.name if isinstance(e, elements.ColumnClause) and e.is_literal else None
        if sql is not None and sql.lstrip()[:9].lower().rstrip("( \t\n") == "distinct":
            return True
        stack.extend(e.get_children())
    return False


def _is_nan(v: Any) -> bool:
    return isinstance(v, (float, decimal.Decimal)) and v != v


def _lt(a: Any, b: Any) -> bool:
    """``a < b`` in PostgreSQL's order, where NaN (numeric, float) is above every other value."""
    if _is_nan(b):
        return not _is_nan(a)
    if _is_nan(a):
        return False
    return a < b


def _eq(a: Any, b: Any) -> bool:
    return a == b or (_is_nan(a) and _is_nan(b))


def _promote_date(v: Any, other: Any) -> Any:
    """A date compared with a timestamp is midnight of that day, as PostgreSQL casts it."""
    if isinstance(other, datetime.datetime) and isinstance(v, datetime.date) \
            and not isinstance(v, datetime.datetime):
        return datetime.datetime.combine(v, datetime.time(), tzinfo=other.tzinfo)
    return v


_CMP = {
    operators.eq: _eq, operators.ne: lambda a, b: not _eq(a, b),
    operators.lt: _lt, operators.le: lambda a, b: not _lt(b, a),
    operators.gt: lambda a, b: _lt(b, a), operators.ge: lambda a, b: not _lt(a, b),
}

# NaN != NaN in Python (and hashes by identity), but groups and DISTINCT treat NaNs as one value.
_NAN = object()


def _hashable(values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(_NAN if _is_nan(v) else v for v in values)


# Sums of numeric partials are exact at any length (the default context keeps 28 digits);
# with no traps, Infinity + -Infinity is NaN, as in PostgreSQL.
_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN,
                         traps=[])


def _compile_predicate(expr: Any, term: Callable[[Any], Any], params: Mapping[str, Any]
                       ) -> Callable[[Sequence[Any], Sequence[Any]], Any]:
    """A Python evaluator for a HAVING clause (comparisons, AND, OR, NOT; SQL NULL semantics);
    ``params``: the execution's parameters, for bound values given at execution."""
    if isinstance(expr, elements.Grouping):
        return _compile_predicate(expr.element, term, params)
    if isinstance(expr, elements.BooleanClauseList):
        parts = [_compile_predicate(c, term, params) for c in expr.clauses]
        if expr.operator is operators.and_:
            def and_(row: Any, extra: Any) -> Any:
                vals = [p(row, extra) for p in parts]
                if any(v is False for v in vals):
                    return False
                return None if any(v is None for v in vals) else True
            return and_
        if expr.operator is operators.or_:
            def or_(row: Any, extra: Any) -> Any:
                vals = [p(row, extra) for p in parts]
                if any(v is True for v in vals):
                    return True
                return None if any(v is None for v in vals) else False
            return or_
    if isinstance(expr, UnaryExpression) and expr.operator is operators.inv:
        inner = _compile_predicate(expr.element, term, params)
        return lambda row, extra: None if (v := inner(row, extra)) is None else not v
    if isinstance(expr, elements.BinaryExpression) and expr.operator in _CMP:
        op = _CMP[expr.operator]
        for side in (expr.left, expr.right):
            # A group key (or a column of a grouped primary key's table) compared in Python:
            # as for ORDER BY, only types whose Python values compare as PostgreSQL's do.
            if not isinstance(side, (BindParameter, elements.Null)):
                _refuse_unmergeable_type(side, "HAVING")
        left = _operand(expr.left, term, params)
        right = _operand(expr.right, term, params)

        def cmp(row: Any, extra: Any) -> Any:
            a, b = left(row, extra), right(row, extra)
            if a is None or b is None:
                return None
            if type(a) is not type(b):
                a, b = _promote_date(a, b), _promote_date(b, a)
                # numeric and integers compared with float8 are cast to float8 (Python
                # compares an int with a float exactly: 2^62 + 1 > 2.0**62).
                if isinstance(a, float) and isinstance(b, (decimal.Decimal, int)) \
                        and not isinstance(b, bool):
                    b = float(b)
                elif isinstance(b, float) and isinstance(a, (decimal.Decimal, int)) \
                        and not isinstance(a, bool):
                    a = float(a)
            try:
                return op(a, b)
            except TypeError:
                raise ScatterRefused(
                    f"HAVING {expr} compares a {type(a).__name__} with a {type(b).__name__}, which "
                    "PostgreSQL would convert and Python cannot; give the value in the column's "
                    "type (a date for a date, ...)", construct="HAVING comparison of different types"
                ) from None
        return cmp
    raise ScatterRefused(
        f"HAVING {expr} cannot be evaluated after the merge (supported: comparisons of "
        "aggregates or group keys with values, AND, OR, NOT)",
        construct="HAVING expression",
    )


def _operand(expr: Any, term: Callable[[Any], Any], params: Mapping[str, Any]
             ) -> Callable[[Sequence[Any], Sequence[Any]], Any]:
    if isinstance(expr, BindParameter):
        v = params[expr.key] if expr.key in params else expr.effective_value
        return lambda row, extra: v
    if isinstance(expr, elements.Null):
        return lambda row, extra: None
    if isinstance(expr, elements.Grouping):
        return _operand(expr.element, term, params)
    return term(expr)


# ---------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------


class _Key:
    """A sort key with SQL NULL placement and per-term direction."""

    __slots__ = ("values", "keys")

    def __init__(self, values: Sequence[Any], keys: Sequence[tuple[bool, bool]]) -> None:
        self.values = values
        self.keys = keys

    def __lt__(self, other: _Key) -> bool:
        for a, b, (desc, nulls_first) in zip(self.values, other.values, self.keys):
            if a is None or b is None:
                if a is None and b is None:
                    continue
                # NULL placement is absolute (not flipped by DESC).
                return (a is None) == nulls_first
            if _eq(a, b):
                continue
            return _lt(b, a) if desc else _lt(a, b)
        return False


def _sort_key_fn(keys: Sequence[SortKey]) -> Callable[[Sequence[Any]], _Key]:
    spec = [(k.descending, k.nulls_first) for k in keys]
    positions = [k.position for k in keys]
    return lambda row: _Key([row[p] for p in positions], spec)


def merge_rows(plan: MergePlan, streams: Sequence[Iterable[Sequence[Any]]]) -> Iterator[tuple[Any, ...]]:
    """Combine per-shard row streams according to ``plan``; yields visible rows."""
    if plan.checks:
        streams = [_checked(s, plan.checks, plan.statement, plan.text_collation) for s in streams]
    if plan.same_types:
        streams = [_same_types(s, plan.same_types, plan.statement) for s in streams]
    if plan.kind == "any":
        rows = [tuple(r) for stream in streams for r in stream]
        if not rows:
            return iter(())
        return iter([tuple(any(r[i] for r in rows) for i in range(plan.visible))])
    if plan.kind in ("concat", "ordered"):
        if plan.kind == "ordered":
            merged: Iterable[Sequence[Any]] = heapq.merge(*streams, key=_sort_key_fn(plan.sort_keys))
        else:
            merged = itertools.chain.from_iterable(streams)
        rows: Iterable[tuple[Any, ...]] = (tuple(r[: plan.visible]) for r in merged)
        if plan.distinct:
            rows = _dedupe(rows)
        stop = None if plan.limit is None else plan.offset + plan.limit
        return itertools.islice(rows, plan.offset, stop)
    return iter(_merge_groups(plan, streams))


def _dedupe(rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    seen: set[tuple[Any, ...]] = set()
    for r in rows:
        k = _hashable(r)
        if k not in seen:
            seen.add(k)
            yield r


def _combine(kind: str, acc: Any, v: Any) -> Any:
    if kind == "count":
        return (acc or 0) + (v or 0)
    if v is None:
        return acc
    if acc is None:
        return v
    if kind == "sum":
        if isinstance(acc, decimal.Decimal):
            return _EXACT.add(acc, v)
        return acc + v
    if kind == "min":
        return v if _lt(v, acc) else acc
    if kind == "max":
        return v if _lt(acc, v) else acc
    raise AssertionError(kind)


def _merge_groups(plan: MergePlan, streams: Sequence[Iterable[Sequence[Any]]]) -> list[tuple[Any, ...]]:
    outputs = plan.outputs
    groups: dict[tuple[Any, ...], list[Any]] = {}
    n_slots = sum(len(o.positions) for o in outputs)
    for stream in streams:
        for row in stream:
            gkey = _hashable(row[p] for p in plan.group_positions)
            acc = groups.get(gkey)
            if acc is None:
                acc = groups[gkey] = [None] * n_slots
            slot = 0
            for o in outputs:
                if o.kind == "value":
                    acc[slot] = row[o.positions[0]]
                    slot += 1
                elif o.kind == "avg":
                    acc[slot] = _combine("sum", acc[slot], row[o.positions[0]])
                    acc[slot + 1] = _combine("count", acc[slot + 1], row[o.positions[1]])
                    slot += 2
                else:
                    acc[slot] = _combine(o.kind, acc[slot], row[o.positions[0]])
                    slot += 1
                if o.coalesce:
                    acc[slot] = row[o.positions[-1]]
                    slot += 1
    if plan.kind == "aggregate" and not groups:
        # No shard returned a row (cannot happen for an ungrouped aggregate, but be exact).
        groups[()] = [None] * n_slots
    n_out = plan.n_outputs
    results: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []
    for acc in groups.values():
        vals: list[Any] = []
        slot = 0
        for o in outputs:
            if o.kind == "avg":
                s, c = acc[slot], acc[slot + 1]
                vals.append(None if not c else pg_avg(s, c))
                slot += 2
            else:
                v = acc[slot]
                if o.kind == "count" and v is None:
                    v = 0
                elif o.float4 and v is not None:
                    v = _to_float4(v)
                vals.append(v)
                slot += 1
            if o.coalesce:
                if vals[-1] is None:
                    vals[-1] = acc[slot]
                slot += 1
        results.append((tuple(vals[:n_out]), tuple(vals[n_out:])))
    having = plan.having
    if having is not None:
        results = [r for r in results if having(r[0], r[1]) is True]
    order_terms = plan.order_terms
    if order_terms:
        spec = [(desc, nf) for _, desc, nf in order_terms]
        results.sort(key=lambda r: _Key([t(r[0], r[1]) for t, _, _ in order_terms], spec))
    out = [r[0] for r in results]
    stop = None if plan.limit is None else plan.offset + plan.limit
    return out[plan.offset:stop]


def _is_float4(expr: Any) -> bool:
    t = _sql_type(getattr(expr, "type", None))
    return isinstance(t, sqltypes.REAL) or (
        isinstance(t, sqltypes.Float) and not isinstance(t, sqltypes.Double)
        and t.precision is not None and t.precision <= 24)


def _to_float4(v: Any) -> Any:
    """``v`` rounded to single precision, as the shortest decimal that reads back as that
    float4 (what PostgreSQL prints, and psycopg reads)."""
    if not isinstance(v, float) or v != v or v in (float("inf"), float("-inf")):
        return v
    packed = struct.pack("<f", v)
    for digits in range(1, 10):
        candidate = float(f"{v:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return struct.unpack("<f", packed)[0]


def pg_avg(total: Any, count: int) -> Any:
    """``avg`` rebuilt from a sum and a count, as PostgreSQL computes it."""
    if isinstance(total, float):
        return total / count
    if isinstance(total, int):
        total = decimal.Decimal(total)
    if not total.is_finite():
        return total  # NaN, or +-Infinity divided by a positive count
    return pg_numeric_div(total, decimal.Decimal(count))


def _nbase_weight_first(d: decimal.Decimal) -> tuple[int, int]:
    """PostgreSQL numeric's (weight, first digit) in base 10000 for a non-zero value."""
    sign, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    # Integer part and fraction as a string of decimal digits, aligned on 4-digit groups.
    s = "".join(map(str, digits)).lstrip("0")
    if not s:
        return 0, 0
    # Position of the first significant digit relative to the decimal point.
    point = len(digits) + exp  # digits before the decimal point (may be <= 0)
    first_sig_index = len(digits) - len("".join(map(str, digits)).lstrip("0"))
    pos = point - first_sig_index  # number of integer digits from the first significant digit
    # weight w: the NBASE digit holding the first significant digit covers
    # 10^(4w) .. 10^(4w+3); pos - 1 is its decimal exponent.
    e10 = pos - 1
    weight = e10 // 4
    # The first NBASE digit's value: the decimal digits of that group.
    group_low = weight * 4
    value = d.copy_abs().scaleb(-group_low)
    first = int(value) % 10000
    return weight, first


def pg_numeric_div(a: decimal.Decimal, b: decimal.Decimal) -> decimal.Decimal:
    """``a / b`` with the result scale PostgreSQL's ``numeric_div`` chooses (select_div_scale)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 2000
        if a == 0:
            w1, f1 = 0, 0
        else:
            w1, f1 = _nbase_weight_first(a)
        w2, f2 = _nbase_weight_first(b)
        qweight = w1 - w2
        if f1 <= f2:
            qweight -= 1
        dscale1 = max(0, -int(a.as_tuple().exponent))
        dscale2 = max(0, -int(b.as_tuple().exponent))
        rscale = 16 - qweight * 4
        rscale = max(rscale, dscale1, dscale2, 0)
        rscale = min(rscale, 1000)
        q = a / b
        return q.quantize(decimal.Decimal(1).scaleb(-rscale), rounding=decimal.ROUND_HALF_UP)


# -- a shard that does not answer in time --------------------------------------------------------

#: Seconds a shard's query may keep running after ``shardkit_timeout`` while its cancel
#: requests go unanswered, before :func:`shut_down_socket` ends the wait.
CANCEL_GRACE: float = 1.0

# The psycopg connections whose socket shut_down_socket shut down.
_shut_down: weakref.WeakSet[Any] = weakref.WeakSet()


_cancel_checked = False


def _check_cancel() -> None:
    """Warn, once, when a cancel request stalls the whole process: psycopg's C
    implementation (``psycopg[c]``, ``psycopg[binary]``) calls libpq's ``PQcancel``, which
    libpq before 17 must use, without releasing the GIL, so every thread waits while a
    server that does not answer (frozen, its host gone) holds the request."""
    global _cancel_checked
    _cancel_checked = True
    from psycopg import pq

    if pq.__impl__ != "python" and pq.version() < 170000:
        logging.getLogger("shardkit.session").warning(
            "psycopg's %s implementation runs on libpq %s, older than 17: its cancel requests hold "
            "the GIL, so one sent to a server that does not answer (frozen, or its host gone) stalls "
            "every thread of this process until the server answers or the connection attempt fails; "
            "use libpq 17 or later (psycopg[binary] >= 3.2.3 bundles it) or psycopg's python "
            "implementation (PSYCOPG_IMPL=python)", pq.__impl__, pq.version())


def send_cancel(dbapi_connection: Any, timeout: float) -> threading.Thread:
    """Ask the server to cancel the query running on a psycopg connection, from a thread
    of its own (returned, started): the cancel request is a connection to the server,
    and libpq's ``PQcancel`` waits for the server to answer it, without a time limit,
    so a frozen server (SIGSTOP, a paused VM, a host gone from the network) would hold
    the caller for as long as it stays so.  With psycopg's ``cancel_safe()`` (libpq 17)
    the thread gives up after ``timeout`` seconds; without it, it ends when the server
    answers or goes."""

    if not _cancel_checked:
        _check_cancel()

    def cancel() -> None:
        try:
            safe = getattr(dbapi_connection, "cancel_safe", None)
            if safe is not None:
                safe(timeout=timeout)
            else:
                dbapi_connection.cancel()
        except Exception:  # noqa: BLE001 - the caller reports the shard; the socket may be cut
            pass

    thread = threading.Thread(target=cancel, name="shardkit-cancel", daemon=True)
    thread.start()
    return thread


def shut_down_here(context: Any) -> bool:
    """In a ``handle_error`` hook: whether the connection that failed is one whose socket
    :func:`shut_down_socket` shut down (the failure is then shardkit's doing, not the
    server's)."""
    conn = context.connection
    if conn is None or conn.closed or conn.invalidated:
        return False
    return conn.connection.dbapi_connection in _shut_down


def shut_down_socket(dbapi_connection: Any) -> bool:
    """Shut down the socket of a psycopg connection another thread is waiting on (both
    directions); True if it was shut down.

    For a query the cancel request cannot stop: PgBouncer drops the cancels of a client
    it has queued for a server connection (pgbouncer#1222), so the query would wait for
    PgBouncer's ``query_wait_timeout``.  The waiting thread then fails at once ("server
    closed the connection unexpectedly") and its connection is broken: the caller must
    see that it is never used again.  Closing the connection instead is not an option:
    psycopg's ``close()`` from another thread frees the libpq connection under the
    waiting thread and does not wake it.  The file descriptor is duplicated, and the
    socket shut down through the duplicate, so that it is never closed here under libpq,
    and a descriptor number libpq closed meanwhile (and another connection reused) is
    never touched: the connection is checked to be open after the duplicate is made.
    The connection is marked (:func:`shut_down_here`) before its socket is shut down, so
    that the waiting thread's error handlers know the server did not fail.
    """
    pgconn = getattr(dbapi_connection, "pgconn", None)
    if pgconn is None:
        return False
    try:
        fd = pgconn.socket
        dup = os.dup(fd)
    except Exception:  # noqa: BLE001 - the connection is gone already: nothing to shut down
        return False
    sock = None
    try:
        # Not open any more: libpq may have dropped it between reading the descriptor and
        # duplicating it, and the duplicate may be some other socket.
        if not dbapi_connection.closed:
            sock = socket.socket(fileno=dup)
    except Exception:  # noqa: BLE001 - not a socket: leave it alone
        pass
    if sock is None:
        os.close(dup)
        return False
    with sock:  # closes the duplicate only
        _shut_down.add(dbapi_connection)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected any more: its thread is failing already
            _shut_down.discard(dbapi_connection)
            return False
    return True
