"""Statement routing: from a SQLAlchemy statement and its parameters to a :class:`Route`.

Pure logic, no I/O.  The router reads the statement's tables and the shard-key
predicates of its WHERE clause (``key = v``, ``key IN (...)``, ``BETWEEN``,
``<``/``<=``/``>``/``>=``, combined with AND/OR) and asks each table group's
strategy which shards can hold matching rows.

The structural analysis of a statement is cached by SQLAlchemy's own statement
cache key (which the ORM computes anyway, and memoizes on the statement), so a
repeated query shape costs a dictionary lookup plus the hash of its key values.
The most common read, ``select(Model).where(Model.key == value)`` and nothing
else, skips even that lookup: its route is kept per key column (see
``_column_equals_value``).
"""

from __future__ import annotations

import datetime
import decimal
import functools
import itertools
import math
import re
import struct
from collections import Counter
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapper, RelationshipProperty, aliased, configure_mappers
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql import elements, lambdas, operators, selectable, visitors
from sqlalchemy.sql import util as sql_util
from sqlalchemy.sql.dml import Delete, Insert, Update, UpdateBase
from sqlalchemy.sql.elements import BindParameter, ClauseElement, ColumnElement

from ._config import PRIMARY, ClusterConfig, GroupConfig
from ._hashing import _murmur3_32, _pack_int64
from ._pgtypes import unwrap
from ._strategies import HashStrategy, ListStrategy, RangeStrategy, Strategy
from ._colocation import _derived_select, colocation_problem, compound_selects, dml_extra_froms
from ._scatter import compound_keyword, exists_column, orm_windows_problem
from .errors import CrossShardWriteError, RoutingError, ScatterRefused, ShardKeyError

__all__ = ["Route", "Router", "TableRoute"]


@dataclass(frozen=True)
class TableRoute:
    """How one table is placed: its group, key columns and strategy (``None`` for reference tables)."""

    table: str
    group: str | None
    key_columns: tuple[str, ...]
    strategy: Strategy | None

    @property
    def is_reference(self) -> bool:
        return self.group is None


@dataclass(frozen=True)
class Route:
    """Where a statement runs.

    ``shards`` are the shard names in a stable order; ``kind`` is ``direct``
    (one shard), ``multi`` (some) or ``all``; ``role`` is ``primary`` or
    ``replica``; ``reason`` says why, in words; ``split`` maps a shard to the
    parameter values it should receive when an ``IN`` list or a multi-row
    insert was split by owner.  ``keys`` says how the shard key chose the
    shards: ``"one"`` (``key = value``: all rows in one bucket or slice),
    ``"many"`` (several values, ranges, or a scope's key), or ``""`` (not by
    the bucket map: a named shard, every shard, an insert's rows).  ``anywhere``: the
    statement reads only reference tables, so any one shard answers it.
    """

    shards: tuple[str, ...]
    kind: str
    role: str
    reason: str
    is_write: bool = False
    tables: tuple[str, ...] = ()
    split: Mapping[str, Any] | None = field(default=None, compare=False)
    merge: str | None = None
    keys: str = ""
    anywhere: bool = False  # reference tables only (or no table): any one shard answers
    # The router (so the map) that chose the shards by key: what a write's check of the
    # shard's ownership must compare with (a newer map may have arrived since).
    router: Any = field(default=None, compare=False, repr=False)
    # The one shard of a read of one shard that is not one of reference rows alone (such a
    # read may run on any shard); None for any other route.
    read_shard: str | None = field(init=False, default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.shards) == 1 and not self.is_write and not self.anywhere:
            object.__setattr__(self, "read_shard", self.shards[0])

    @property
    def is_scatter(self) -> bool:
        """Whether the statement runs on more than one shard."""
        return len(self.shards) > 1

    def __str__(self) -> str:
        out = f"{self.kind} {','.join(self.shards)} ({self.role}): {self.reason}"
        return out + (f"; merge: {self.merge}" if self.merge else "")


# ---------------------------------------------------------------------------
# Predicate plan: a tree built once per statement shape, evaluated per execution.
#   ("and", [nodes]) | ("or", [nodes]) | ("eq", group, col_index, bind_index)
#   ("in", group, col_index, bind_index) | ("range", group, col_index, lo, hi, lo_incl, hi_incl, coercer)
# bind indexes point into the statement cache key's ``bindparams`` list (or,
# for uncacheable statements, into the plan's own list of BindParameter objects).
# A node of None means "no constraint".
# ---------------------------------------------------------------------------

_RANGE_OPS = {
    operators.lt: (None, False, True),  # key < v:  high=v exclusive
    operators.le: (None, True, True),
    operators.gt: (False, None, False),  # key > v:  low=v exclusive
    operators.ge: (True, None, False),
}
_FLIP = {operators.lt: operators.gt, operators.le: operators.ge,
         operators.gt: operators.lt, operators.ge: operators.le, operators.eq: operators.eq}


@dataclass
class _Plan:
    tables: tuple[str, ...]
    groups: dict[str, list[str]]          # group -> its tables in the statement
    references: tuple[str, ...]
    predicate: Any
    binds: list[BindParameter[Any]]       # only used when the statement is uncacheable
    textual: bool = False
    # A write inside a WITH (``WITH x AS (UPDATE ... RETURNING ...) SELECT ...``): what it is.
    dml_cte: str | None = None
    # Its key predicates are ANDed with SQL text SQLAlchemy renders without parentheses
    # (see _bare_text): they do not decide the shards.
    bare_text: bool = False
    colocation: str | None = None         # why the statement cannot run shard by shard
    # Why it cannot run on several shards, though it can on one: a derived table
    # with LIMIT (or GROUP BY, DISTINCT) whose own WHERE decides the route.
    one_shard_only: str | None = None
    # Why its rows from several shards cannot be merged, though one shard's are exact: a
    # window function an ORM entity loads (see orm_windows_problem).
    entity_window: str | None = None
    # (group, bind index, coercer) when ``key = :value`` alone pins the statement
    # to one shard; the routes of such a plan depend only on that shard, so they
    # are kept here (shard -> Route) and a repeated read costs one hash.
    single_key: tuple[str, int, Any] | None = None
    routes: dict[str, Route] = field(default_factory=dict)
    # The indexes (as for binds) of the anonymous bound values (``key == 5``) the route is
    # decided by: an execution's parameters may give one by the name SQLAlchemy compiles
    # it to, ``id_1`` (see _refuse_overridden_key).  (Anonymous or not is the shape's.)
    anonymous_binds: tuple[int, ...] = ()


def derived_select(item: Any) -> Any:
    """The SELECT of a derived table (a subquery in FROM, or an alias of one, as
    ``Query.count()`` makes), or ``None`` if ``item`` is something else (a table,
    CTE, UNION, function...)."""
    while isinstance(item, selectable.Alias) and isinstance(item.element, selectable.Subquery):
        item = item.element
    if isinstance(item, selectable.Subquery) and isinstance(item.element, selectable.Select):
        return item.element
    return None


class Router:
    """Routes statements and keys for one cluster configuration."""

    def __init__(self, config: ClusterConfig, like: Router | None = None,
                 foreign_buckets: Mapping[str, frozenset[int]] | None = None,
                 map_version: int | None = None) -> None:
        """``like``: the router this one replaces (a new map): it keeps what that one learnt
        of the tables' key types.  ``foreign_buckets``: per shard, the units (buckets,
        slices) whose rows it holds without owning them while they move; they belong to
        the map (a state of the catalog), so a statement filters by the router that
        routed it, never by a newer state.  ``map_version``: the catalog's version of
        this map (None for the config file's map)."""
        self.config = config
        self.map_version = map_version
        self.foreign_buckets: Mapping[str, frozenset[int]] = foreign_buckets or {}
        self.shard_names: tuple[str, ...] = config.shard_names
        self.shard_set = frozenset(self.shard_names)
        # The shards without replicas (their reads run on the primary).
        self.unreplicated = frozenset(s.name for s in config.shards if not s.replicas)
        self.tables: dict[str, TableRoute] = {}
        self.groups: dict[str, GroupConfig] = {g.name: g for g in config.groups}
        for g in config.groups:
            for t, cols in g.tables.items():
                self.tables[t] = TableRoute(t, g.name, cols, g.strategy)
        for t in config.reference_tables:
            self.tables[t] = TableRoute(t, None, (), None)
        # The groups whose strategy puts each key value on one shard (not a custom
        # function, which shardkit cannot see into): see the scatter's count(DISTINCT key).
        self.disjoint_groups = frozenset(g.name for g in config.groups
                                         if isinstance(g.strategy, (HashStrategy, RangeStrategy, ListStrategy)))
        self._plans: dict[Any, _Plan] = {}
        self._plans_lock = threading.Lock()
        # Cache key -> data_modifying_with() of statements of that shape.
        self._dml_ctes: dict[Any, str | None] = {}
        # (id of the Table, key column name, the ORM entity selected or None) -> (group,
        # coercer, routes by shard, a weak reference to the Table, the group's strategy,
        # for a hash group whose key is an int, its (bucket map, bucket count), and for a
        # key whose coercer depends on the parameter's type (_through_bind_type: a
        # non-integer numeric key), the class of the parameter's type the entry was made
        # for, else None) of the plan shared by every SELECT that _column_equals_value
        # accepts on that column (with a parameter of that type).  By entity: an entity's
        # load may be refused (entities_problem) where its columns' is not.  Weakly: an
        # application may build its table() objects per read, and the router must not
        # keep them alive.
        self._key_columns: dict[tuple[int, str, Any], tuple[str, Any, dict[str, Route], Any, Any, Any, Any]] = {}
        # The same entries for select(Model).where(Model.key == value), by (id of the
        # column, id of the entity's table) of the statement -> (that column, that table,
        # the entry, [what _cache_key_form() gave, or None until a statement gives it]):
        # found from the statement alone (see route()).
        self._entity_entries: dict[tuple[int, int], tuple[Any, Any, tuple[Any, ...], list[Any]]] = {}
        # Per key column, a function to its Python type (see _key_coercers), by table
        # name (learnt from MetaData).
        self._coercers: dict[str, tuple[Any, ...]] = {} if like is None else like._coercers
        self._rr = itertools.count()
        self._next_turn = 0  # (what _rr gives next, as far as any_shard last saw)
        # mapper -> its table's route and shard key attributes (see the session's
        # shard_of_instance)
        self.instance_keys: dict[Any, Any] = {}
        # table (or mapper) -> the name of a shard key column of its table with an
        # onupdate=, or None (see key_onupdate)
        self._key_onupdates: dict[Any, str | None] = {}
        # mapper -> table_route(mapper)
        self._mapper_routes: dict[Any, TableRoute] = {}
        # mapper -> where the shard key sits in its primary key (see ShardedSession.get)
        self.pk_plans: dict[Any, Any] = {}
        # entity given to get() -> (its mapper, its entity_problem, the mapper's polymorphic
        # mappers then, its scalar key plan, its kept load: (the statement, its parameter's
        # name) or None) (see ShardedSession._get_impl and _get_load)
        self.get_plans: dict[Any, tuple[Any, str | None, Any, Any, Any]] = {}
        # relationship (or (parent, related) mappers) -> whether the related rows are on the
        # object's shard (see relationship_colocated and the session's _follows_object)
        self.lazy_pins: dict[Any, bool] = {}
        # mapper -> its writable relationships through a reference secondary table (see
        # the session's _replicate_reference_pairs)
        self.reference_pairs: dict[Any, tuple[Any, ...]] = {}
        # mapper -> why its entities cannot be loaded shard by shard (see mapper_problem)
        self._mapper_problems: dict[Any, str | None] = {}
        self._problems_lock = threading.RLock()
        self._problems_pending: set[Any] = set()   # (only the thread holding the lock adds)
        # mapper -> why its class hierarchy's tables cannot hold its objects (see hierarchy_problem)
        self._hierarchy_problems: dict[Any, str | None] = {}
        # (check, statement cache key) -> what a cross-shard read's check found (see _per_shape)
        self.scatter_checks: dict[Any, Any] = {}
        # (shard, table) -> the units this map gives the shard (see Cluster.units_of)
        self.units: dict[tuple[str, str], Any] = {}

    def _after_fork(self) -> None:
        """In a forked child: a lock a parent's thread held at the fork stays held for
        ever, and the checks it had in progress never finish here; start both again."""
        self._plans_lock = threading.Lock()
        self._problems_lock = threading.RLock()
        self._problems_pending = set()

    # -- keys ----------------------------------------------------------------

    def table_route(self, table: Any) -> TableRoute:
        """The placement of a table given by name, Table, ORM class or mapper."""
        if isinstance(table, Mapper):
            # (A flush asks for each object's; mappers live as long as the application.)
            try:
                return self._mapper_routes[table]
            except KeyError:
                self._mapper_routes[table] = found = self._table_route(table)
                return found
        return self._table_route(table)

    def _table_route(self, table: Any) -> TableRoute:
        name = _table_name(table)
        try:
            return self.tables[name]
        except KeyError:
            pass
        short = name.rsplit(".", 1)[-1]
        if short in self.tables:
            return self.tables[short]
        raise RoutingError(self._not_in_map(table, name), table=name)

    def _given_table_route(self, table: Any) -> TableRoute:
        """:meth:`table_route` of a table an application names (``shard_for``): a name
        not configured is answered with the names that are."""
        try:
            return self.table_route(table)
        except RoutingError as e:
            if not isinstance(table, str):
                raise
            known = sorted(self.tables)
            listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
            raise RoutingError(
                f"{e}, or name a configured table (by its table name, a model's __tablename__, not "
                f"its class name; or pass the model): {listed or 'none are configured'}",
                table=e.table) from None

    def _not_in_map(self, table: Any, name: str) -> str:
        """Why ``table`` (whose name is ``name``) has no route, and what to pass instead."""
        column = table.__clause_element__() if hasattr(table, "__clause_element__") else table
        owner = getattr(column, "table", None) if isinstance(column, elements.ColumnClause) else None
        if owner is not None:
            # A column (Order.user_id, users.c.id): its name is not a table's.
            return (f"{table} is a column, not a table: pass its model or Table, or the name of "
                    f"its table ({_table_name(owner)!r})")
        return (f"table {name!r} is not in the shard map; add it to a [groups.*] tables entry "
                "or to reference_tables")

    def shard_for(self, table: Any, key: Any) -> str:
        """The shard that owns ``key`` in ``table`` (a composite key is a tuple)."""
        tr = self._given_table_route(table)
        if tr.strategy is None:
            raise RoutingError(
                f"{tr.table!r} is a reference table: it lives on every shard "
                f"({', '.join(self.shard_names)})",
                table=tr.table,
            )
        _check_arity(tr, key)
        key = self._coerced(tr, key, table)
        try:
            return tr.strategy.shard_for_key(key)
        except (ShardKeyError, RoutingError) as e:
            if e.table is None:
                e.table = tr.table
            raise

    def bucket_for(self, table: Any, key: Any) -> int | None:
        """The hash bucket of ``key`` (``None`` for tables not sharded by hash)."""
        tr = self._given_table_route(table)
        if isinstance(tr.strategy, HashStrategy):
            _check_arity(tr, key)
            return tr.strategy.bucket_for_key(self._coerced(tr, key, table))
        return None

    def know_tables(self, tables: Iterable[Any]) -> None:
        """Learn the column types of configured tables (from your models' MetaData), so
        a key given by table name is brought to its column's type as one given with the
        Table or model is (a uuid's string form, for one)."""
        # A table is matched by its configured name: ``archive.users`` is not the
        # configured ``users`` when the MetaData also holds ``users`` itself.  A table of
        # another schema stands for a configured unqualified name only when no table is
        # named exactly so, and when all such tables agree on the key's types.
        exact: dict[str, Any] = {}
        by_short: dict[str, list[Any]] = {}
        for t in tables:
            full = _table_name(t)
            if full in self.tables:
                exact[full] = t
            elif getattr(t, "name", None) in self.tables:
                by_short.setdefault(t.name, []).append(t)
        for name, t in exact.items():
            coercers = self._key_coercers(self.tables[name], t)
            if coercers is not None:
                self._coercers[name] = coercers
        for name, ts in by_short.items():
            if name in exact:
                continue
            found = {self._key_coercers(self.tables[name], t) for t in ts} - {None}
            if len(found) == 1:
                self._coercers[name] = found.pop()

    def _key_coercers(self, tr: TableRoute, table: Any) -> tuple[Any, ...] | None:
        """Per key column of ``tr``, the function that brings a value to the column's
        Python type (or None), read from ``table`` (a Table, model or mapper) when it
        has the columns, else from what :meth:`know_tables` learnt."""
        t = None
        if not isinstance(table, str):
            for attr in ("__table__", "local_table"):  # a model, a mapper
                t = getattr(table, attr, None)
                if t is not None:
                    break
            else:
                t = table
        if isinstance(t, selectable.Alias):
            t = t.element
        columns = getattr(t, "c", None)
        if columns is None:
            return self._coercers.get(tr.table)
        # By name: a key column is configured by its name, which a Column(..., key="...")
        # does not share with its key in table.c (a table() may leave it out).
        keys = [column_named(columns, c) for c in tr.key_columns]
        if any(k is None for k in keys):
            return self._coercers.get(tr.table)
        # Not cached by Table: an application may build table() objects per request.
        return tuple(self._column_coercer(tr, i, col.type) for i, col in enumerate(keys))

    def _column_coercer(self, tr: TableRoute, index: int, type_: Any) -> Any:
        """The coercer of key column ``index`` of ``tr`` given as a column of type ``type_``;
        a column of no type (``table("users", column("id"))``) is read in the type that
        :meth:`know_tables` learnt for it, as a key given by the table's name is."""
        if isinstance(type_, sqltypes.NullType):
            learned = self._coercers.get(tr.table)
            return learned[index] if learned else None
        return coercer_for(type_)

    def _coerced(self, tr: TableRoute, key: Any, table: Any, coercers: Any = None) -> Any:
        """``key`` in its columns' Python types (an ORM flush and a keyed read hash those);
        ``coercers``: other ones than its columns' (a comparison's: read_coercer)."""
        if coercers is None:
            coercers = self._key_coercers(tr, table)
        if not coercers or not any(coercers):
            return key
        part = 0
        try:
            if len(coercers) == 1:
                return coercers[0](key) if coercers[0] and not _is_unresolved(key) else key
            out = []
            for part, (co, v) in enumerate(zip(coercers, key)):
                out.append(co(v) if co and not _is_unresolved(v) else v)
            return tuple(out)
        except ShardKeyError as e:
            if e.table is None:
                # The message names the value's type; say which column's key it is.
                e.table = tr.table
                e.message = f"{tr.table}.{tr.key_columns[part]}: {e.message}"
            raise

    def any_shard(self) -> str:
        """A shard for a statement that may run anywhere (reference tables, no tables)."""
        turn = next(self._rr)
        self._next_turn = turn + 1
        return self.shard_names[turn % len(self.shard_names)]

    def next_any_shard(self) -> str:
        """The shard :meth:`any_shard` gives next (unless another thread takes that turn
        first), without taking the turn: what ``Cluster.explain`` reports."""
        return self.shard_names[self._next_turn % len(self.shard_names)]

    # -- statements ------------------------------------------------------------

    def _known_key_route(self, shape: tuple[Any, BindParameter[Any], Any, Any, Any],
                         raw: Any, statement: Any) -> Route | None:
        """The route of a SELECT of ``shape`` (what :func:`_column_equals_value` made of
        it) from the entry its column has, or None.  ``raw``: its selected columns."""
        entry = self._key_columns.get(shape[4])
        if entry is None or entry[3]() is not shape[3] or (
                entry[6] is not None and type(shape[1].type) is not entry[6]):
            return None  # (another parameter type than the entry's may be read otherwise)
        known = self._entry_route(entry, shape[1].value)
        if known is not None:
            # The statement's column and entity objects have no entry of their own: the
            # mapper made them anew since the entry was made (SQLAlchemy makes an
            # entity's anew once the mappers are configured, which the first query does,
            # after a statement built before it was routed).  The next statements built
            # from them find the entry by them.
            self._remember_entity(shape, raw, entry, statement)
        return known

    def _remember_entity(self, shape: tuple[Any, BindParameter[Any], Any, Any, Any], raw: Any,
                         entry: tuple[Any, ...], statement: Any) -> None:
        """Keep ``entry`` by the column and entity objects of a SELECT of one entity (its
        ``shape`` and selected columns ``raw``), which the mapper gives every such statement."""
        if shape[2] is not None and len(raw) == 1:
            entities = self._entity_entries
            if len(entities) >= _KEY_COLUMNS_MAX:
                entities.clear()
            entities[(id(shape[0]), id(raw[0]))] = (shape[0], raw[0], entry, [_cache_key_form(statement)])

    def _entry_route(self, entry: tuple[Any, ...], v: Any) -> Route | None:
        """The route of key value ``v`` by a _key_columns ``entry``, or None when the value
        needs the general path (route())."""
        if type(v) is int and entry[5] is not None:
            # A hash group's int key: bucket_for()'s int case, inline.
            bucket_map, count = entry[5]
            try:
                return entry[2].get(bucket_map[_murmur3_32(_pack_int64(v)) % count])
            except struct.error:
                return None  # past int64: the general path says what is wrong
        if v is None or isinstance(v, ClauseElement):
            return None
        co = entry[1]
        try:
            shard = entry[4].shard_for_key(v if co is None else co(v))
        except RoutingError:
            shard = self._shard(entry[0], v, co)  # raises, naming the table
        return entry[2].get(shard)

    def route(
        self,
        statement: Any,
        params: Any = None,
        *,
        role: str | None = None,
        all_shards: bool = False,
        keyless_to: str | None = None,
        anywhere: str | None = None,
        key_moves: bool = True,
    ) -> Route:
        """Decide where ``statement`` runs.  Raises :class:`RoutingError` when it cannot.

        ``params`` are the execution parameters (a dict, or a list of dicts for
        an executemany).  ``all_shards`` permits a key-less UPDATE/DELETE to run on
        every shard.  ``keyless_to``: the shard for an INSERT's rows that carry no
        shard key (``scope(shard=...)``); rows with a key still go where it belongs.
        ``anywhere``: the shard for a read that any shard can answer (reference tables),
        and for a statement whose keys contradict each other (no shard holds its rows),
        instead of the next in turn (a session's transaction reads them from one shard).
        ``key_moves=False``: an UPDATE's SET of the shard key is left for the caller to
        check against the shards the statement finally runs on (inside
        ``scope(key=...)`` a key-less one runs on the scope key's shard, not on every shard).
        """
        if type(statement) in _WRAPPERS:
            statement = unwrap_statement(statement)
        shape = None
        if role is None and not params and type(statement) is selectable.Select:
            # SELECT ... FROM t WHERE t.key = :value and nothing else: routed by the
            # column's entry, without SQLAlchemy's cache key (see _column_equals_value).
            criterion = _key_criterion(statement)
            if criterion is not None:
                col, b, raw = criterion
                # select(Model).where(Model.key == value): the mapper gives every such
                # statement the same column and table objects, which find the entry.
                hit = self._entity_entries.get((id(col), id(raw[0]))) if len(raw) == 1 else None
                if hit is not None and hit[0] is col and hit[1] is raw[0] and (
                        hit[2][6] is None or type(b.type) is hit[2][6]):
                    known = self._entry_route(hit[2], b.value)
                    if known is not None:
                        form = hit[3]
                        if form[0] is not None:
                            _give_cache_key(statement, form[0], b)
                        else:
                            # (The first statement of the form, which SQLAlchemy compiled,
                            # is no longer of it: see _cache_key_form.)
                            form[0] = _cache_key_form(statement)
                        return known
                shape = _column_equals_value(criterion)
                if shape is not None:
                    known = self._known_key_route(shape, raw, statement)
                    if known is not None:
                        return known
        if getattr(statement, "_params", None):
            # Statement.params(): SQLAlchemy 2.1 keeps those values beside the
            # statement's bind parameters; the call's own parameters win over them.
            params = with_statement_params(statement, params)
        plan, binds = self._plan_for(statement)
        if params and plan.anonymous_binds:
            _refuse_overridden_key(plan, binds, params, statement)
        if plan.dml_cte:
            raise CrossShardWriteError(
                f"statement has a data-modifying WITH ({plan.dml_cte}): shardkit routes a "
                "statement by its outer query and would run that write where the query goes "
                "(one shard for a reference table, every shard for a key-less write, a shard "
                "that does not own an inserted row). Run the INSERT/UPDATE/DELETE ... RETURNING "
                "as its own statement and use its rows (the only way to write a reference table, "
                "whose write goes to every shard), or name the shard where it belongs "
                "(execution_options(shardkit_shard=...) or shardkit.scope(shard=...)): it then "
                "runs on that shard's primary",
                table=plan.tables[0] if plan.tables else None, statement=statement)
        single = plan.single_key
        if shape is not None and single is not None:
            # The plan of every statement of that shape on this column: a single key.
            key_columns = self._key_columns
            if len(key_columns) >= _KEY_COLUMNS_MAX:
                # Tables built per read (table(), a Table per tenant) each leave an
                # entry: they start again, as the plans do.
                key_columns.clear()
                self._entity_entries.clear()
            strategy = self.groups[single[0]].strategy
            entry = key_columns[shape[4]] = (
                single[0], single[2], plan.routes, weakref.ref(shape[3]), strategy,
                (strategy.bucket_map, strategy.bucket_count)
                if type(strategy) is HashStrategy and single[2] in (None, _to_int) else None,
                type(shape[1].type) if _bind_type_matters(shape[0].type) else None)
            self._remember_entity(shape, statement._raw_columns, entry, statement)
        if single is not None and role is None and not isinstance(params, (list, tuple)):
            g, bi, co = single
            b = binds[bi]
            if params is not None and isinstance(params, Mapping) and b.key in params:
                v = params[b.key]
            else:
                v = b.callable() if b.callable is not None else b.value
            if not _is_unresolved(v):
                known = plan.routes.get(self._shard(g, v, co))
                if known is not None:
                    if isinstance(statement, Update) and key_moves:
                        self._refuse_key_move(statement, params, known)
                    return known
        is_write = isinstance(statement, UpdateBase)
        if plan.textual:
            raise RoutingError(
                "cannot route a textual SQL statement: it names no tables shardkit can see; "
                "name a shard with execution_options(shardkit_shard='s0') or scope(shard='s0') "
                "(a scope's key= does not place SQL text, which says no table whose key it is: "
                "cluster.shard_for(Model, key) names the key's shard), or run it everywhere "
                "with execution_options(shardkit_all_shards=True)",
                statement=statement,
            )
        chosen_role = PRIMARY if is_write else (role or PRIMARY)
        if plan.colocation:
            raise ScatterRefused(
                f"{plan.colocation}; shardkit runs a statement on each shard over that shard's "
                "rows, which would quietly give a different answer than one database. Join and "
                "correlate sharded tables on the shard key, run the parts separately, or name "
                "a shard with execution_options(shardkit_shard=...)" + (
                    ". (Query.count() counts its query as such a subquery: across shards, count "
                    "the merged rows, len(query.all()), or select func.count(distinct(column)))"
                    if _counts_a_subquery(statement) else ""),
                construct="statement not colocated on the shard key", statement=statement)

        if is_write and plan.groups and self._writes_reference(statement):
            raise CrossShardWriteError(
                f"{type(statement).__name__.upper()} of reference table {_table_name(statement.table)} "
                f"reads sharded table(s) {', '.join(t for ts in plan.groups.values() for t in ts)}: "
                "each shard would compute it over its own rows and the copies would diverge. "
                "Compute the values first and write them as plain values",
                table=_table_name(statement.table), statement=statement)
        if isinstance(statement, Insert):
            return self._route_insert(statement, params, plan, chosen_role, keyless_to)

        if not plan.groups:
            tables = plan.tables
            if is_write and plan.references:
                return Route(self.shard_names, "all", PRIMARY,
                             f"write to reference table(s) {', '.join(plan.references)} "
                             "goes to every shard", True, tables, router=self)
            shard = anywhere if anywhere in self.shard_set and not is_write else self.any_shard()
            what = f"reference table(s) {', '.join(plan.references)}" if plan.references else "no tables"
            return Route((shard,), "direct", chosen_role, f"{what}: any shard", is_write, tables,
                         anywhere=True, router=self)

        if len(plan.groups) > 1 and isinstance(statement, selectable.CompoundSelect):
            # A UNION of SELECTs from different groups: each part reads its own tables, so
            # each shard answers every part over its own rows and the results concatenate,
            # as for a UNION within one group (the scatter merge then decides, or refuses,
            # as for that).  A part that joins groups must still be pinned to one shard by
            # its keys (rows it pins to one shard are on no other).  A part the merge cannot
            # read (a textual SELECT) is left to its refusal.
            for part in compound_selects(statement):
                if isinstance(part, selectable.Select):
                    self.route(part, params, role=role)
            names = ", ".join(sorted(plan.groups))
            return Route(self.shard_names, "all", chosen_role,
                         f"{compound_keyword(statement)} of SELECTs from groups {names}: every shard",
                         False, plan.tables, router=self)
        per_group, splits = self._evaluate(plan, binds, params)
        shards: frozenset[str] | None = None
        reasons = []
        for g, gtables in plan.groups.items():
            s = per_group.get(g)
            if s is None:
                reasons.append(f"no {'/'.join(gtables)} shard key in WHERE" + (
                    " (its key is ANDed with text() holding an OR, not in parentheses)" if plan.bare_text else ""))
            else:
                reasons.append(f"{'/'.join(gtables)} key -> {','.join(sorted(s)) or 'no shard'}")
            if len(plan.groups) > 1:
                if s is None or len(s) != 1 or (shards is not None and s != shards):
                    names = ", ".join(sorted(plan.groups))
                    raise ScatterRefused(
                        f"statement joins tables of groups {names}, which are not colocated, and "
                        "their keys do not pin them to one shard; query each group separately "
                        "or colocate the tables in one group",
                        construct="join of non-colocated tables",
                        statement=statement,
                    )
            shards = s if shards is None else shards & s

        if shards is None:
            if (plan.one_shard_only or plan.entity_window) and len(self.shard_names) > 1:
                self._refuse_one_shard_only(plan, statement, self.shard_names)
            if is_write and not all_shards and plan.bare_text:
                raise CrossShardWriteError(
                    f"{type(statement).__name__.lower()} of {', '.join(plan.tables)} ANDs its shard "
                    "key with SQL text holding an OR (text() or literal_column()), which SQLAlchemy "
                    "renders without parentheses, so the OR applies to the whole WHERE and matches "
                    "rows of every shard; the key cannot decide the shard. Wrap the "
                    "text in parentheses, sqlalchemy.sql.expression.Grouping(text(...)), or pass "
                    "execution_options(shardkit_all_shards=True) to run it on all shards",
                    table=plan.tables[0] if plan.tables else None,
                    statement=statement,
                )
            if is_write and not all_shards:
                raise CrossShardWriteError(
                    f"{type(statement).__name__.lower()} of {', '.join(plan.tables)} has no shard "
                    "key in its WHERE clause and would touch every shard; add the key, or pass "
                    "execution_options(shardkit_all_shards=True) to run it on all shards",
                    table=plan.tables[0] if plan.tables else None,
                    statement=statement,
                )
            route = Route(self.shard_names, "all", chosen_role, "; ".join(reasons), is_write,
                          plan.tables, router=self)
            if isinstance(statement, Update) and key_moves:
                self._refuse_key_move(statement, params, route)
            return route
        ordered = tuple(s for s in self.shard_names if s in shards)
        if not ordered:
            # Contradictory predicates (key = 1 AND key = 2 on different shards):
            # no shard can hold a row; one shard gives the right empty answer.
            ordered = (anywhere if anywhere in self.shard_set else self.any_shard(),)
        if (plan.one_shard_only or plan.entity_window) and len(ordered) > 1:
            self._refuse_one_shard_only(plan, statement, ordered)
        split = None
        if splits and len(ordered) > 1:
            split = {s: {key: vals for key, per_shard in splits.items()
                         if (vals := per_shard.get(s)) is not None}
                     for s in ordered}
        kind = "direct" if len(ordered) == 1 else (
            "all" if len(ordered) == len(self.shard_names) else "multi")
        # "one": all rows in one bucket or slice; an executemany names a key per set.
        one = single is not None and not isinstance(params, (list, tuple))
        route = Route(ordered, kind, chosen_role, "; ".join(reasons), is_write, plan.tables, split,
                      keys="one" if one else "many", router=self)
        if isinstance(statement, Update) and key_moves:
            self._refuse_key_move(statement, params, route)
        if one and role is None and len(ordered) == 1:
            plan.routes[ordered[0]] = route
        return route

    def key_onupdate(self, table: Any, tr: TableRoute | None = None) -> str | None:
        """The name of a shard key column of ``table`` (or of a mapper's own table) that has
        an ``onupdate=``, which gives a row a new key at each UPDATE that does not set it, on
        the shard the row is on; else None.  Kept per table (or mapper)."""
        try:
            return self._key_onupdates[table]
        except KeyError:
            pass
        found = None
        try:
            tr = tr or self.table_route(table)
        except RoutingError:
            tr = None
        columns = getattr(getattr(table, "local_table", table), "c", None)
        if tr is not None and tr.strategy is not None and columns is not None:
            # (By name: a key column is configured by the database's name, which a
            # Column(..., key="...") does not share with its key in table.c.)
            found = next((col.name for col in columns
                          if col.name in tr.key_columns and col.onupdate is not None), None)
        if isinstance(table, (Table, Mapper)):
            # Kept for a Table or mapper only: an application may build its table()s
            # and aliases per statement, which the router must not keep alive.
            self._key_onupdates[table] = found
        return found

    def _refuse_key_onupdate(self, tr: TableRoute, stmt: Update) -> None:
        """Refuse an UPDATE that leaves a shard key column with an ``onupdate=`` unset: the
        column's onupdate would give each row a new key there, on the row's shard, whatever
        shard that key belongs on (a value shardkit does not know before the UPDATE)."""
        name = self.key_onupdate(stmt.table, tr)
        if name is not None:
            raise CrossShardWriteError(
                f"update of {tr.table} leaves shard key column {name} to its onupdate=, which "
                "would give the rows a new key on the shards they are on, owned by whichever "
                "shard it names; set the key in the UPDATE (values("
                f"{name}=...), its current value), or remove onupdate= from the shard key column",
                table=tr.table, statement=stmt)

    def _refuse_one_shard_only(self, plan: _Plan, statement: Any, shards: Sequence[str]) -> None:
        if plan.entity_window and not plan.one_shard_only:
            raise ScatterRefused(
                f"{plan.entity_window}, or load the objects without it (defer() it, or leave "
                f"out its with_expression()); the statement runs on shards {', '.join(shards)}",
                construct="window function",
                statement=statement)
        raise ScatterRefused(
            f"{plan.one_shard_only}, and the statement runs on shards {', '.join(shards)}; "
            "shardkit runs a statement on each shard over that shard's rows, which would quietly "
            "give a different answer than one database. Pin the derived table to one shard with "
            "its key, or name a shard with execution_options(shardkit_shard=...)",
            construct="statement not colocated on the shard key", statement=statement)

    def _writes_reference(self, statement: Any) -> bool:
        tr = self.tables.get(_table_name(statement.table))
        return tr is not None and tr.is_reference

    def _refuse_key_move(self, stmt: Update, params: Any, route: Route, per_set: bool = True) -> None:
        """Refuse an UPDATE whose SET gives the shard key a value owned by another shard:
        the row would stay where it is, under a key it does not own.  ``per_set=False``:
        an executemany's every set runs on ``route``'s shards (a shard the caller's scope
        chose), not on the shards of its own key."""
        tr = self.tables.get(_table_name(stmt.table))
        if tr is None or tr.strategy is None:
            return
        table = stmt.table
        sets = {_set_name(table, k): v for k, v in (stmt._values or {}).items()}
        if isinstance(params, (list, tuple)) and params and isinstance(params[0], Mapping):
            # An executemany: SQLAlchemy takes the SET of an UPDATE without values() from
            # the parameters, and each set gives its own values(key=bindparam(...)): each
            # set is checked as a single one is, on the shards its own key names.
            if any(c in sets or any(_set_name(table, k) == c for p in params for k in p)
                   for c in tr.key_columns):
                for p in params:
                    if per_set:
                        self.route(stmt, p, all_shards=True)
                    else:
                        self._refuse_key_move(stmt, p, route)
            else:
                self._refuse_key_onupdate(tr, stmt)
            return
        if isinstance(params, Mapping):
            # Parameters of an UPDATE without values() become its SET clause.
            sets.update({_set_name(table, k): v for k, v in params.items()})
        touched = [c for c in tr.key_columns if c in sets]
        if not touched:
            self._refuse_key_onupdate(tr, stmt)
            return
        pmap = params if isinstance(params, Mapping) else _EMPTY

        def value(v: Any) -> Any:
            if isinstance(v, BindParameter) and v.key in pmap:
                return pmap[v.key]  # values(id=bindparam("new")), given at execution
            return _literal(v)

        values = [value(sets[c]) if c in sets else None for c in tr.key_columns]
        if len(touched) < len(tr.key_columns) or any(_is_unresolved(v) for v in values):
            raise CrossShardWriteError(
                f"update of {tr.table} sets shard key column(s) {', '.join(touched)} to a value "
                "shardkit cannot evaluate (an expression, NULL, or part of a composite key); "
                "the row could end up on a shard that does not own it. Set every shard key "
                "column to a plain value, or delete and re-insert the row",
                table=tr.table, statement=stmt,
            )
        target = self._shard_for_row(tr, dict(zip(tr.key_columns, values)), stmt.table)
        if set(route.shards) != {target}:
            raise CrossShardWriteError(
                f"update of {tr.table} sets its shard key to {values[0] if len(values) == 1 else tuple(values)!r}, "
                f"owned by shard {target}, on rows of {', '.join(route.shards)}; shardkit does not "
                "move rows inside a statement (it could not be atomic). Delete and re-insert "
                "the rows, or keep the key",
                table=tr.table, statement=stmt,
            )

    def refuse_named_write(self, stmt: Insert | Update, params: Any, shard: str) -> None:
        """Refuse a write the caller sent to ``shard`` by name (``shardkit_shard=``,
        ``bind_arguments={"shard_id": ...}``, ``set_shard_id``, ``Query.set_shard``) that
        would leave a row there under a shard key ``shard`` does not own: an INSERT's row
        whose key another shard owns (or no shard takes), an UPDATE's SET of the key (an
        upsert's ``ON CONFLICT DO UPDATE SET`` included) to another shard's key.  Rows
        without a key, an ``INSERT ... SELECT``, reference tables and tables not in the map
        are left alone: they run on ``shard`` as named."""
        tr = self.tables.get(_table_name(stmt.table))
        if tr is None or tr.strategy is None:
            return
        if getattr(stmt, "_params", None):
            params = with_statement_params(stmt, params)
        if isinstance(stmt, Update):
            self._refuse_key_move(stmt, params, Route((shard,), "direct", PRIMARY, "shard named by the caller",
                                                      True, (tr.table,), router=self), per_set=False)
        elif stmt._select_names is None and getattr(stmt, "select", None) is None:
            self._route_insert(stmt, params, None, PRIMARY, shard, named=True)

    # -- inserts ---------------------------------------------------------------

    def _route_insert(self, stmt: Insert, params: Any, plan: _Plan | None, role: str,
                      keyless_to: str | None = None, named: bool = False) -> Route:
        """The route of an INSERT.  ``keyless_to``: the shard of rows without a key; with
        ``named``, the shard the caller named, which every row with a key must belong to
        (refused with CrossShardWriteError otherwise)."""
        table = stmt.table
        tname = _table_name(table)
        tr = self.table_route(tname)
        if tr.is_reference:
            return Route(self.shard_names, "all", PRIMARY,
                         f"insert into reference table {tname} goes to every shard", True, (tname,),
                         router=self)
        if stmt._select_names is not None or getattr(stmt, "select", None) is not None:
            raise CrossShardWriteError(
                f"INSERT ... SELECT into sharded table {tname} cannot be routed row by row; "
                "run it per shard with execution_options(shardkit_shard=...)",
                table=tname, statement=stmt,
            )
        cols = tr.key_columns
        rows: list[Mapping[Any, Any]]
        if stmt._multi_values:
            rows = [dict(zip(stmt.table.c.keys(), r)) if isinstance(r, (list, tuple)) else r
                    for mv in stmt._multi_values for r in mv]
            pmap = params if isinstance(params, Mapping) else _EMPTY
            rows = [{_set_name(table, k): _bound(v, pmap) for k, v in r.items()} for r in rows]
            return self._route_rows(tname, tr, rows, None, stmt, keyless_to, pmap, named)
        # An ORM insert's parameters are keyed by attribute name, which may not be the column's.
        names = _attribute_columns(stmt)
        values = dict(stmt._values or {})

        def row_of(p: Mapping[Any, Any]) -> dict[str, Any]:
            row = {_set_name(table, k): _bound(v, p) for k, v in values.items()}
            row.update({(names.get(k) or _set_name(table, k)) if isinstance(k, str) else _col_name(k): v
                        for k, v in p.items()})
            return row

        if isinstance(params, (list, tuple)) and params and not isinstance(params[0], (str, bytes)):
            rows = [row_of(p) for p in params]
            return self._route_rows(tname, tr, rows, list(params), stmt, keyless_to, named=named)
        pmap = params if isinstance(params, Mapping) else _EMPTY
        row = row_of(pmap)
        # As for the rows of an executemany (and an ORM flush): a NULL is no key, also as
        # one part of a composite key, whatever a custom function would answer for it.
        # A SQL expression (func.lower('EU'), text(...)) is no key either: the database
        # computes it at the INSERT, after the shard is chosen.
        missing = [c for c in cols if c not in row or _is_unresolved(row[c])]
        if missing:
            if keyless_to is not None:
                self._refuse_upsert_key_move(stmt, tr, row, pmap, keyless_to)
                return Route((keyless_to,), "direct", PRIMARY,
                             f"insert into {tname}: no key, the scope's shard {keyless_to}", True,
                             (tname,), router=self)
            raise ShardKeyError(f"insert into {tname} {_no_key(row, missing)}",
                                table=tname, statement=stmt)
        shard = self._shard_for_row(tr, row, table)
        if named and shard != keyless_to:
            self._refuse_named_row(tr, row, shard, keyless_to, stmt)
        self._refuse_upsert_key_move(stmt, tr, row, pmap, shard)
        return Route((shard,), "direct", PRIMARY, f"insert into {tname}: key -> {shard}", True,
                     (tname,), router=self)

    def _refuse_named_row(self, tr: TableRoute, row: Mapping[str, Any], owner: str, named: str | None,
                          stmt: Any, i: int | None = None) -> None:
        key = tuple(row[c] for c in tr.key_columns)
        raise CrossShardWriteError(
            f"insert into {tr.table} on shard {named} (named by the caller) has "
            f"{'a row' if i is None else f'row {i}'} whose shard key {', '.join(tr.key_columns)} = "
            f"{key[0] if len(key) == 1 else key!r} is owned by shard {owner}: written on {named}, no "
            "read by key would find it there. Insert it without naming a shard (shardkit writes "
            f"each row on its key's shard), name shard {owner} for it, or leave its key out",
            table=tr.table, statement=stmt)

    def _refuse_upsert_key_move(self, stmt: Insert, tr: TableRoute, row: Mapping[str, Any],
                                params: Mapping[str, Any], home: str | None = None) -> None:
        """Refuse ``ON CONFLICT DO UPDATE SET key = ...`` to a key another shard owns: the
        existing row would stay where it is, under a key it does not own.  ``home``: the
        shard the INSERT runs on (the row's key's owner, or for a row without a key the
        shard named or the scope's)."""
        post = getattr(stmt, "_post_values_clause", None)
        sets = getattr(post, "update_values_to_set", None)
        if not sets:
            return
        new = dict(row)
        touched = False
        for k, v in (sets.items() if isinstance(sets, Mapping) else sets):  # a list in SQLAlchemy 2.0
            name = _set_name(stmt.table, k)
            if name not in tr.key_columns:
                continue
            if isinstance(v, elements.ColumnClause) and v.name == name and \
                    getattr(v.table, "name", None) == "excluded":
                continue  # SET key = excluded.key: the inserted row's own key
            touched = True
            new[name] = _bound(v, params)
        if not touched:
            return
        values = [new.get(c) for c in tr.key_columns]
        if any(_is_unresolved(v) for v in values) or \
                (home or self._shard_for_row(tr, row, stmt.table)) != self._shard_for_row(tr, new, stmt.table):
            raise CrossShardWriteError(
                f"upsert into {tr.table} sets its shard key in ON CONFLICT DO UPDATE to a value "
                "another shard owns (or one shardkit cannot evaluate); the existing row would stay "
                "where it is under a key it does not own. Keep the key (or set it to excluded's)",
                table=tr.table, statement=stmt)

    def _route_rows(self, tname: str, tr: TableRoute, rows: Sequence[Mapping[str, Any]],
                    params: list[Any] | None, stmt: Any, keyless_to: str | None = None,
                    values: Mapping[str, Any] | None = None, named: bool = False) -> Route:
        """The route of an INSERT of several ``rows``: an executemany's (``params``, one per
        row) or a multi-row VALUES' (bound by ``values``).  A row without its key goes to
        the scope's shard ``keyless_to``, as a single row does; a keyed one's upsert may not
        move its key to another shard."""
        by_shard: dict[str, list[Any]] = {}
        for i, row in enumerate(rows):
            missing = [c for c in tr.key_columns if c not in row or _is_unresolved(row[c])]
            if missing and keyless_to is not None:
                self._refuse_upsert_key_move(stmt, tr, row, params[i] if params is not None else values or _EMPTY,
                                             keyless_to)
                by_shard.setdefault(keyless_to, []).append(params[i] if params is not None else i)
                continue
            if missing:
                raise ShardKeyError(f"row {i} of insert into {tname} {_no_key(row, missing)}",
                                    table=tname, statement=stmt)
            shard = self._shard_for_row(tr, row, stmt.table)
            if named and shard != keyless_to:
                self._refuse_named_row(tr, row, shard, keyless_to, stmt, i)
            self._refuse_upsert_key_move(stmt, tr, row, params[i] if params is not None else values or _EMPTY,
                                         shard)
            by_shard.setdefault(shard, []).append(params[i] if params is not None else i)
        ordered = tuple(s for s in self.shard_names if s in by_shard)
        if params is not None and len(ordered) > 1 \
                and stmt._propagate_attrs.get("compile_state_plugin") != "orm":
            # (The ORM's bulk INSERT runs each set of columns on its own.)
            # (Keys that name no column are ignored by SQLAlchemy: they do not count.)
            names = {c.key for c in stmt.table.c} | {c.name for c in stmt.table.c}

            def given(p: Mapping[Any, Any]) -> set[str]:
                return {n for n in map(_col_name, p) if n in names}

            first = given(params[0])
            odd = next((i for i, p in enumerate(params) if given(p) != first), None)
            if odd is not None:
                # SQLAlchemy takes an executemany's columns from its first parameter set
                # (a later set's extra keys are not inserted); split by shard, another
                # row would come first on some shard and decide that shard's columns.
                raise CrossShardWriteError(
                    f"rows of the executemany insert into {tname} give different columns "
                    f"(row 0: {sorted(first)}, row {odd}: "
                    f"{sorted(given(params[odd]))}); split across shards {', '.join(ordered)}, "
                    "each shard's first row would decide which values are inserted there: give "
                    "every row the same keys (None for a value left out)",
                    table=tname, statement=stmt,
                )
        if params is None and len(ordered) > 1:
            orm_returning = bool(stmt._returning) and \
                stmt._propagate_attrs.get("compile_state_plugin") == "orm"
            raise CrossShardWriteError(
                f"multi-row VALUES insert into {tname} spans shards {', '.join(ordered)}; " + (
                    # (An ORM bulk INSERT ... RETURNING, split by shard, is refused too.)
                    "shardkit cannot return ORM objects of an INSERT split by shard: add the "
                    "objects with session.add_all() (the flush writes each on its shard and "
                    "they carry their generated values), or insert each shard's rows in a "
                    "statement of their own" if orm_returning else
                    "pass the rows as a list of parameter dicts (session.execute(insert(T), "
                    "[{...}, ...])) so shardkit can split them by shard"),
                table=tname, statement=stmt,
            )
        kind = "direct" if len(ordered) == 1 else "multi"
        return Route(ordered, kind, PRIMARY,
                     f"insert of {len(rows)} row(s) into {tname} -> {', '.join(ordered)}",
                     True, (tname,), by_shard if params is not None else None, router=self)

    def _shard_for_row(self, tr: TableRoute, row: Mapping[str, Any], table: Any = None,
                       coercers: Any = None) -> str:
        """The owner of a row given as {column name: value}; ``table``: its Table, for the
        key columns' types; ``coercers``: see :meth:`_coerced`."""
        assert tr.strategy is not None
        key = (row[tr.key_columns[0]] if len(tr.key_columns) == 1
               else tuple(row[c] for c in tr.key_columns))
        try:
            return tr.strategy.shard_for_key(
                self._coerced(tr, key, table if table is not None else tr.table, coercers))
        except RoutingError as e:
            if e.table is None:
                e.table = tr.table
            raise

    # -- analysis ----------------------------------------------------------------

    def data_modifying_with(self, statement: Any) -> str | None:
        """What a data-modifying WITH of ``statement`` writes (``"DELETE of t in 'x'"``),
        or None: a SELECT holding one writes, wherever it runs.  Asked of every read sent
        to a named shard, which need not be routed (its tables need not be in the map):
        known per statement shape, by SQLAlchemy's cache key (memoized on the statement,
        and the compiler needs it anyway)."""
        if type(statement) in _WRAPPERS:
            statement = unwrap_statement(statement)
        ck = statement._generate_cache_key() if hasattr(statement, "_generate_cache_key") else None
        if ck is None:
            return _dml_cte(statement)
        try:
            return self._dml_ctes[ck.key]
        except KeyError:
            pass
        plan = self._plans.get(ck.key)
        found = plan.dml_cte if plan is not None else _dml_cte(statement)
        with self._plans_lock:
            if len(self._dml_ctes) > 5000:
                self._dml_ctes.clear()
            self._dml_ctes[ck.key] = found
        return found

    def _plan_for(self, statement: Any) -> tuple[_Plan, Sequence[BindParameter[Any]]]:
        # Analyse once per statement shape, keyed by SQLAlchemy's cache key: it is
        # memoized on the statement, and the compiler needs it anyway, so a routed
        # statement costs a dictionary lookup and the evaluation of its keys.
        ck = statement._generate_cache_key() if hasattr(statement, "_generate_cache_key") else None
        if ck is None:
            # Uncacheable: a plain SELECT/UPDATE/DELETE whose WHERE compares
            # columns with parameters is analysed directly, in a few microseconds.
            tables = _simple_tables(statement)
            if tables is not None:
                plan = self._analyze(statement, None, tables)
                if plan is not None:
                    return plan, plan.binds
        if ck is not None:
            plan = self._plans.get(ck.key)
            if plan is None:
                plan = self._analyze(statement, ck.bindparams, None)
                with self._plans_lock:
                    if len(self._plans) > 5000:
                        self._plans.clear()
                    self._plans[ck.key] = plan
            return plan, ck.bindparams
        plan = self._analyze(statement, None, None)
        return plan, plan.binds

    def _analyze(self, statement: Any, ck_binds: Sequence[BindParameter[Any]] | None,
                 fast_tables: list[Any] | None) -> Any:
        """Build the plan; with ``fast_tables`` return ``None`` if the WHERE is not simple."""
        if fast_tables is None:
            if isinstance(statement, elements.TextClause) or not isinstance(
                statement, (selectable.Select, selectable.CompoundSelect, UpdateBase)
            ):
                return _Plan((), {}, (), None, [], textual=isinstance(
                    statement, (elements.TextClause, selectable.TextualSelect)))
            found = sql_util.find_tables(statement, include_aliases=True, include_crud=True,
                                         include_joins=False)
            if isinstance(statement, (Update, Delete)):
                # UPDATE ... FROM / DELETE ... USING: tables named only by columns.
                found.extend(dml_extra_froms(statement))
        else:
            found = fast_tables
        dml_cte = None
        if fast_tables is None:
            # (The fast path takes no statement with a WITH: see _simple_tables.)
            dml_cte = _dml_cte(statement)
        names: list[str] = []
        for t in found:
            if isinstance(t, selectable.Alias):
                t = t.element
            if isinstance(t, selectable.TableClause):
                n = t.fullname
                if n not in names:
                    names.append(n)
        if not names and fast_tables is None and _text_from(statement):
            # select_from(text("orders")), a text().columns() subquery: the tables are in SQL
            # text shardkit cannot read, like a text() statement's (not a read of no
            # tables, which any shard answers).
            return _Plan((), {}, (), None, [], textual=True)
        groups: dict[str, list[str]] = {}
        refs: list[str] = []
        for n in names:
            tr = self.table_route(n)
            if tr.group is None:
                refs.append(tr.table)
            else:
                groups.setdefault(tr.group, []).append(tr.table)

        binds: list[BindParameter[Any]] = []
        index: dict[int, int] = {}
        if ck_binds is not None:
            index = {id(b): i for i, b in enumerate(ck_binds)}
        strict = fast_tables is not None
        found_set = set(found) if strict else set()

        uses: list[Counter[str]] = []
        bare_text: list[bool] = []

        def bind_uses() -> Counter[str]:
            if not uses:
                uses.append(Counter(e.key for e in visitors.iterate(statement)
                                    if isinstance(e, BindParameter)))
            return uses[0]

        anonymous_binds: list[int] = []

        def bind_ref(b: BindParameter[Any]) -> int | None:
            if ck_binds is not None:
                i = index.get(id(b))
            else:
                binds.append(b)
                i = len(binds) - 1
            if i is not None and _ANON_KEY.fullmatch(b.key):
                anonymous_binds.append(i)
            return i

        def key_of(col: Any) -> tuple[str, int, Any] | None:
            if not isinstance(col, ColumnElement):
                return None
            table = getattr(col, "table", None)
            if table is None or not isinstance(table, selectable.FromClause):
                return None
            if isinstance(table, selectable.FromClauseAlias):  # an alias, a TABLESAMPLE
                table = table.element
            if not isinstance(table, selectable.TableClause):
                return None
            tr = self.tables.get(table.fullname) or self.tables.get(table.name)
            if tr is None or tr.group is None:
                return None
            try:
                ci = tr.key_columns.index(col.name)
            except ValueError:
                return None
            return tr.group, ci, self._column_coercer(tr, ci, col.type)

        def visit(expr: Any) -> Any:
            if isinstance(expr, elements.Grouping):
                return visit(expr.element)
            if isinstance(expr, elements.BooleanClauseList):
                kids = [visit(c) for c in expr.clauses]
                if expr.operator is operators.and_:
                    kids = _and_terms(kids)
                    if kids and any(_bare_text(c) for c in expr.clauses):
                        bare_text.append(True)
                        return None
                    return ("and", kids) if kids else None
                if expr.operator is operators.or_:
                    return ("or", kids)
                return None
            if not isinstance(expr, elements.BinaryExpression):
                if strict:
                    raise _NotSimple
                return None
            op, left, right = expr.operator, expr.left, expr.right
            if strict:
                for side in (left, right):
                    if isinstance(side, elements.ColumnClause):
                        # A column of a table not in the FROM list is an implicit FROM.
                        if side.table is None or side.table not in found_set:
                            raise _NotSimple
                    elif not isinstance(side, (BindParameter, elements.ClauseList,
                                               elements.ExpressionClauseList)):
                        raise _NotSimple
            k = key_of(left)
            if k is None and op in _FLIP:
                k, left, right, op = key_of(right), right, left, _FLIP[op]
            if k is None:
                return None
            group, ci, co = k
            if isinstance(right, BindParameter):
                co = _through_bind_type(right.type, left.type, co)
            if op is operators.eq and isinstance(right, BindParameter):
                r = bind_ref(right)
                return None if r is None else ("eq", group, ci, r, co)
            if op is operators.in_op and isinstance(right, BindParameter) and right.expanding:
                r = bind_ref(right)
                # A shard's share of the list is given to every use of the parameter:
                # split it only if the key's IN is its one use.
                return None if r is None else ("in", group, ci, r, co, bind_uses()[right.key] == 1)
            if op is operators.between_op and hasattr(right, "clauses"):
                lo, hi = list(right.clauses)
                if isinstance(lo, BindParameter) and isinstance(hi, BindParameter):
                    if type(lo.type) is type(hi.type):
                        co = _through_bind_type(lo.type, left.type, co)
                    rl, rh = bind_ref(lo), bind_ref(hi)
                    if rl is None or rh is None:
                        return None
                    if expr.modifiers.get("symmetric"):
                        return ("symmetric", group, ci, rl, rh, co)
                    return ("range", group, ci, rl, rh, True, True, co)
                return None
            if op in _RANGE_OPS and isinstance(right, BindParameter):
                r = bind_ref(right)
                if r is None:
                    return None
                lo_incl, hi_incl, is_high = _RANGE_OPS[op]
                if is_high:
                    return ("range", group, ci, None, r, True, bool(hi_incl), co)
                return ("range", group, ci, r, None, bool(lo_incl), True, co)
            return None

        where = getattr(statement, "_where_criteria", ())
        if not where and isinstance(statement, selectable.Select) and not statement._from_obj \
                and len(statement._raw_columns) == 1:
            # SELECT EXISTS (SELECT ... WHERE key = :k): the key inside decides.
            inner = exists_column(statement._raw_columns[0])
            if inner is not None:
                where = inner._where_criteria
        outer = statement
        chain: list[Any] = []  # the derived tables' SELECTs gone through, outermost first
        while not where and isinstance(outer, selectable.Select) and not outer._setup_joins:
            # SELECT count(*) FROM (SELECT ... WHERE key = :k) AS anon (Query.count() and the
            # like): every row comes from the derived table, so its WHERE decides.
            froms = outer._from_obj or outer.columns_clause_froms
            if len(froms) != 1:
                break
            inner = derived_select(froms[0])
            if inner is None:
                break
            outer = inner
            chain.append(inner)
            where = outer._where_criteria
        try:
            if not where:
                pred = None
            elif len(where) == 1:
                pred = visit(where[0])
            else:
                kids = _and_terms([visit(w) for w in where])
                if kids and any(_bare_text(w) for w in where):
                    bare_text.append(True)
                    kids = []
                pred = ("and", kids) if kids else None
        except _NotSimple:
            return None
        colocation = one_shard_only = entity_window = None
        if fast_tables is None and groups:
            concrete = _concrete_union_problem(statement)
            colocation = concrete or colocation_problem(statement, self._placement,
                                                        local_groups=self.disjoint_groups)
            if colocation is not None and concrete is None and self._declared_colocated_load(statement):
                colocation = None
            if colocation is not None and concrete is None and chain and pred is not None \
                    and colocation_problem(statement, self._placement, one_shard=chain,
                                           local_groups=self.disjoint_groups) is None:
                # SELECT count(*) FROM (SELECT ... WHERE key = :k LIMIT n): every row of the
                # derived table is on the shards its key names; on one, it is exact.  (Only
                # its LIMIT, GROUP BY... are: anything else that reads sharded rows, a join
                # or subquery of the outer query, is still checked.)
                colocation, one_shard_only = None, colocation
            if colocation is None and isinstance(statement, selectable.Select):
                colocation = self.entities_problem(statement)
            if colocation is None:
                colocation = self.criteria_problem(getattr(statement, "_with_options", ()))
            if colocation is None and one_shard_only is None:
                entity_window = orm_windows_problem(statement, self._placement,
                                                    self.disjoint_groups)
        single = None
        if colocation is None and len(groups) == 1 and not isinstance(statement, Insert):
            node = pred
            if node is not None and node[0] == "and" and len(node[1]) == 1:
                node = node[1][0]
            if node is not None and node[0] == "eq" and self._arity(node[1]) == 1:
                single = (node[1], node[3], node[4])
        return _Plan(tuple(names), groups, tuple(refs), pred, binds, colocation=colocation,
                     one_shard_only=one_shard_only, entity_window=entity_window, dml_cte=dml_cte,
                     single_key=single, bare_text=bool(bare_text),
                     anonymous_binds=tuple(anonymous_binds))

    def entities_problem(self, statement: Any) -> str | None:
        """Why the entities an ORM SELECT loads in its own rows cannot be loaded shard by
        shard (see :meth:`mapper_problem`), or None: those it selects (with the subclasses
        it loads with them), those its joined eager loads bring, and the expressions of its
        ``with_expression()`` options."""
        for rc in statement._raw_columns:
            # An entity (its table, alias or join), whose column_properties load
            # with it; a column names its entity too, but loads alone.
            entity = rc._annotations.get("parententity") if isinstance(
                rc, selectable.FromClause) else None
            if entity is not None:
                problem = self.entity_problem(entity)
                if problem is not None:
                    return problem
        try:
            return self._loader_options_problem(statement)
        except AttributeError:  # loader option internals of another SQLAlchemy version
            return None

    def criteria_problem(self, options: Iterable[Any]) -> str | None:
        """Why the ``with_loader_criteria()`` among an ORM statement's ``options`` cannot run
        shard by shard, or None: the ORM adds each criterion to every FROM of its entity (and
        to the loads that follow), so it is checked as that entity's WHERE (an uncorrelated
        subquery over another group's rows would read only each shard's part of them)."""
        for opt in options:
            if not getattr(opt, "_is_criteria_option", False):
                continue
            try:
                for m in opt._all_mappers():
                    table = m.local_table
                    if not self._placement(table.fullname):
                        continue  # not sharded: nothing of it differs between shards
                    found = colocation_problem(select(m).where(opt._resolve_where_criteria(m)),
                                               self._placement)
                    if found is not None:
                        return f"the with_loader_criteria() of {m.class_.__name__}: {found}"
            except AttributeError:  # loader option internals of another SQLAlchemy version
                return None
        return None

    def _loader_options_problem(self, statement: Any) -> str | None:
        """The entities_problem() of the statement's joined eager loads and with_expression()."""
        for opt in getattr(statement, "_with_options", ()):
            for el in getattr(opt, "context", ()):
                entities = [e for e in el.path.path if getattr(e, "is_mapper", False)
                            or getattr(e, "is_aliased_class", False)]
                if not entities:
                    continue
                strategy = dict(el.strategy or ())
                lazy = strategy.get("lazy")
                if lazy in ("joined", "subquery") and not getattr(el, "is_token_strategy", False) \
                        and len(entities) >= 2:
                    problem = self.related_problem(entities[-2].mapper, el.path.path[-2],
                                                   entities[-1].mapper, lazy)
                    if problem is not None:
                        return problem
                if lazy == "joined" and not getattr(el, "is_token_strategy", False):
                    # joinedload() / contains_eager(): the related entity, in the same rows.
                    problem = self.entity_problem(entities[-1])
                elif strategy.get("query_expression") and el._extra_criteria:
                    found = colocation_problem(select(entities[-1].entity).add_columns(
                        *el._extra_criteria), self._placement)
                    problem = None if found is None else (
                        f"the with_expression() of {el.path[-1]}: {found}")
                else:
                    continue
                if problem is not None:
                    return problem
        return None

    def entity_problem(self, entity: Any) -> str | None:
        """:meth:`mapper_problem` for an entity (a mapper or an ``aliased()`` /
        ``with_polymorphic()`` one) and the subclasses loaded in the same rows."""
        mapper = entity.mapper
        wp = entity.with_polymorphic_mappers if getattr(entity, "is_aliased_class", False) \
            else mapper._with_polymorphic_mappers
        for m in (mapper, *wp):
            problem = self.mapper_problem(m)
            if problem is not None:
                return problem
        return None

    def related_problem(self, parent: Any, prop: Any, target: Any, lazy: str) -> str | None:
        """Why ``parent``'s relationship ``prop`` to ``target`` (mappers) cannot be loaded by
        a join (``lazy='joined'``) or a subquery of the parent's statement
        (``lazy='subquery'``), or None: those run on each shard the parent's rows come
        from, and relate them to that shard's rows of ``target`` alone, which are all of
        them only for a relationship joined on the shard key or to a reference table
        (see :meth:`relationship_colocated`).  (selectinload() and lazy loads read the
        related rows where they are.)"""
        if self.relationship_colocated(prop):
            return None
        t, p = self.table_route(target), self.table_route(parent)
        how = "joinedload()" if lazy == "joined" else "subqueryload()"
        what = (f"{t.table} (group {t.group}) with {p.table} "
                f"({f'group {p.group}' if p.group is not None else 'a reference table'})"
                if t.group not in (None, p.group) else f"{t.table} related to {p.table} by a "
                "join that does not tie them by the shard key (another column, an OR, or a "
                "secondary table not keyed so)")
        # selectinload() reads the related rows by the parents' keys alone (every shard
        # that has them) unless SQLAlchemy must join the parents back in (an OR, say),
        # which each shard would do over its own rows, as here.
        strategy = prop._get_strategy((("lazy", "selectin"),))
        instead = ("with selectinload(), which reads every shard that has them, or lazily"
                   if getattr(strategy, "omit_join", True) else
                   "lazily, which reads every shard that has them (selectinload() joins "
                   f"{p.table} back in for this join, and is refused the same way)")
        return (f"{how} of {parent.class_.__name__}.{prop.key} reads {what}: each shard would "
                f"relate its own rows only; load it {instead}")

    def relationship_colocated(self, rel: Any) -> bool:
        """Whether every row the relationship ``rel`` relates to an object lives on that
        object's shard: every table it reaches (the target's, a ``secondary`` one) is a
        reference table, or of the parent's group and tied to the parent by equal shard
        keys in the AND-ed conditions of the relationship's join (``users.id =
        orders.user_id``).  Not so for another group's rows, nor for the same group's
        joined on another column (a user's referrer), by an OR of conditions, or through a
        secondary table that is not tied so (a reference table of pairs).  A parent table
        the map does not name: True (what the object's shard says).

        ``relationship(..., info={"shardkit_colocated": True})`` says so for a
        relationship of one group whose join does not show it but whose rows the
        application keeps together (``tasks.project_id = projects.id``, both keyed by
        tenant_id, a task always in its project's tenant); shardkit then loads it from
        the object's shard as it would a join on the key, and cannot check it."""
        known = self.lazy_pins.get(rel)
        if known is None:
            known = self._relationship_colocated(rel)
            if not known and rel.info.get("shardkit_colocated"):
                try:
                    same_group = self.table_route(rel.mapper).group == self.table_route(rel.parent).group
                except RoutingError:
                    same_group = False
                if not same_group:
                    raise RoutingError(
                        f"{rel.parent.class_.__name__}.{rel.key} has info shardkit_colocated, but "
                        "it relates tables of different groups, whose rows are placed by "
                        "different keys; remove the flag, or put the tables in one group")
                known = True
            self.lazy_pins[rel] = known
        return known

    def _declared_colocated_load(self, statement: Any) -> bool:
        """Whether ``statement`` is the ORM's load of a relationship declared
        ``info={"shardkit_colocated": True}`` (on a path of colocated relationships) whose
        only join is that relationship's own: a ``selectinload()`` SQLAlchemy reads by
        joining the parents back in (the join does not use the parent's primary key alone,
        ``sales.shop_id = shops.id``, the shops' primary key being ``(region, id)``).  The join is the
        one the flag vouches for, as for a lazy load of the relationship; each shard joins
        its own parents to their rows.  (Analysed once per statement shape.)"""
        path = getattr(getattr(statement, "_compile_options", None), "_current_path", None)
        props = [p for p in getattr(path, "path", ()) if isinstance(p, RelationshipProperty)]
        if not props or not props[-1].info.get("shardkit_colocated"):
            return False
        joins = getattr(statement, "_setup_joins", ())
        # (one join, through the relationship: join(parent_alias.rel.of_type(target)))
        if len(joins) != 1 or getattr(joins[0][1] if joins[0][1] is not None else joins[0][0],
                                      "property", None) is not props[-1]:
            return False
        return all(self.relationship_colocated(p) for p in props)

    def _relationship_colocated(self, rel: Any) -> bool:
        try:
            p = self.table_route(rel.parent)
        except RoutingError:
            return True
        reached = [*rel.mapper.tables, *([rel.secondary] if rel.secondary is not None else [])]
        groups = set()
        for table in reached:
            try:
                groups.add(self.table_route(table).group)
            except RoutingError:
                pass
        groups.discard(None)
        if not groups:
            return True  # reference rows: on every shard
        if groups != {p.group}:
            return False  # another group's rows (or a reference object's sharded ones)
        # The same group: the join the relationship makes must tie the parent to every
        # table it reaches by the shard key, as in any statement run shard by shard.
        try:
            stmt = select(rel.parent).join(rel.class_attribute.of_type(aliased(rel.mapper)))
            return colocation_problem(stmt, self._placement) is None
        except Exception:  # noqa: BLE001 - a join the ORM cannot build: read where the rows are
            return False

    def hierarchy_problem(self, mapper: Any) -> str | None:
        """Why objects of ``mapper`` cannot be stored shard by shard, or None: with
        joined-table inheritance an object is one row in each table of its class
        hierarchy, written by one flush on one shard and read back with a join on the
        primary key, so those tables must be placed alike: all in one group (or all
        reference tables)."""
        try:
            return self._hierarchy_problems[mapper]
        except KeyError:
            pass
        placed: dict[str, str | None] = {}
        for t in mapper.tables:
            try:
                tr = self.table_route(t)
            except RoutingError:
                continue  # a table the map does not know is refused where it is used
            placed[tr.table] = tr.group
        problem = None
        if len(set(placed.values())) > 1:
            where = ", ".join(f"{t} ({'a reference table' if g is None else f'group {g}'})"
                              for t, g in placed.items())
            name = mapper.class_.__name__
            problem = (f"{name} is stored in tables placed by different groups: {where}; each "
                       f"{name} is one row in each of them, written on one shard, so the groups "
                       "would look for them on different shards. Put the tables of its class "
                       "hierarchy in one group, keyed on the primary key column that joins them")
        self._hierarchy_problems[mapper] = problem
        return problem

    def mapper_problem(self, mapper: Any) -> str | None:
        """Why the entities of ``mapper`` cannot be loaded shard by shard, or None: a
        ``column_property`` whose expression reads a sharded table not colocated with
        the entity's on the shard key (a count of another group's rows, say) would give
        each shard's share of the answer, whether it loads with the row or, deferred,
        on first access (by the object's shard); only one that never loads
        (``deferred=True, raiseload=True``) is harmless.  A relationship loaded by
        default in the same rows (``lazy='joined'``) brings its entity's problem."""
        try:
            return self._mapper_problems[mapper]
        except KeyError:
            pass
        # Worked out by one thread at a time: while it is, another must not take the
        # None that ends a cycle of joined loads for the answer (and keep a plan by it).
        with self._problems_lock:
            if mapper in self._mapper_problems:
                return self._mapper_problems[mapper]
            if mapper in self._problems_pending:
                return None  # (a cycle of joined loads ends here)
            self._problems_pending.add(mapper)
            try:
                problem = self._mapper_problem(mapper)
            finally:
                self._problems_pending.discard(mapper)
            self._mapper_problems[mapper] = problem
            return problem

    def _mapper_problem(self, mapper: Any) -> str | None:
        from sqlalchemy.schema import Column

        problem = self.hierarchy_problem(mapper)
        for prop in mapper.column_attrs if problem is None else ():
            if (prop.deferred and prop.raiseload) or all(isinstance(c, Column) for c in prop.columns):
                continue
            found = colocation_problem(select(mapper).add_columns(prop.expression), self._placement)
            if found is not None:
                problem = (f"{mapper.class_.__name__}.{prop.key} (a column_property of each "
                           f"{mapper.class_.__name__}): {found}; remove it, or make it "
                           "column_property(..., deferred=True, raiseload=True) and compute the "
                           "value with a query of its own")
                break
        if problem is None:
            for rel in mapper.relationships:
                if rel.lazy in ("joined", False, "subquery"):  # loaded with it, by default
                    problem = self.related_problem(mapper, rel, rel.mapper, rel.lazy or "joined")
                    if problem is not None:
                        break
                if rel.lazy in ("joined", False):  # loaded in the same rows, by default
                    found = self.entity_problem(rel.mapper)
                    if found is not None:
                        problem = (f"{found} (each {mapper.class_.__name__} loads it, by "
                                   f"{mapper.class_.__name__}.{rel.key}'s lazy='joined')")
                        break
        return problem

    def _placement(self, name: str) -> tuple[str, tuple[str, ...]] | None:
        """The group and key columns of the table of full name ``name`` (None: a reference
        table, or one not configured).  As :meth:`table_route` finds it: a table of another
        schema not configured by its qualified name by its short name, but one configured
        (a reference table ``archive.users``) never as a namesake (a sharded ``users``)."""
        tr = self.tables.get(name)
        if tr is None and "." in name:
            tr = self.tables.get(name.rsplit(".", 1)[-1])
        if tr is None or tr.group is None:
            return None
        return tr.group, tr.key_columns

    def _evaluate(self, plan: _Plan, binds: Sequence[BindParameter[Any]], params: Any
                  ) -> tuple[dict[str, frozenset[str]], dict[str, dict[str, list[Any]]]]:
        """Per group, the shards that can match; plus IN lists split per shard (bind key -> shard -> values)."""
        splits: dict[str, dict[str, list[Any]]] = {}
        if isinstance(params, (list, tuple)) and params and isinstance(params[0], Mapping):
            # executemany: each parameter set names its own keys; the statement runs
            # where any of them can match (a bind's default must not decide).
            out: dict[str, frozenset[str]] = {}
            for i, p in enumerate(params):
                one = self._ev(plan.predicate, False, binds, p, {})
                if i == 0:
                    out = one
                else:
                    out = {g: out[g] | s for g, s in one.items() if g in out}
            return out, splits
        pmap = params if isinstance(params, Mapping) else _EMPTY
        out = self._ev(plan.predicate, True, binds, pmap, splits)
        return out, splits

    def _value(self, binds: Sequence[BindParameter[Any]], pmap: Mapping[str, Any], i: int) -> Any:
        b = binds[i]
        if b.key in pmap:
            return pmap[b.key]
        if b.callable is not None:
            return b.callable()
        return b.value

    def _shard(self, g: str, key: Any, co: Any = None) -> str:
        try:
            if co is not None:
                key = co(key)
            return self.groups[g].strategy.shard_for_key(key)
        except RoutingError as e:
            if e.table is None:
                e.table = "/".join(self.groups[g].tables)
            raise

    def _arity(self, g: str) -> int:
        return len(next(iter(self.groups[g].tables.values())))

    def _ev(self, node: Any, top: bool, binds: Sequence[BindParameter[Any]],
            pmap: Mapping[str, Any], splits: dict[str, dict[str, list[Any]]]
            ) -> dict[str, frozenset[str]]:
        if node is None:
            return {}
        kind = node[0]
        if kind == "eq":
            _, g, ci, bi, co = node
            if self._arity(g) != 1:
                return {}
            v = self._value(binds, pmap, bi)
            if _is_unresolved(v):
                return {}
            return {g: frozenset((self._shard(g, v, co),))}
        if kind == "in":
            _, g, ci, bi, co, splittable = node
            if self._arity(g) != 1:
                return {}
            vals = self._value(binds, pmap, bi)
            if _is_unresolved(vals) or not isinstance(vals, (list, tuple, set, frozenset)):
                return {}
            per: dict[str, list[Any]] = {}
            for v in vals:
                if v is not None:  # NULL is IN nothing
                    per.setdefault(self._shard(g, v, co), []).append(v)
            if top and splittable:
                splits[binds[bi].key] = per
            return {g: frozenset(per)}
        if kind == "symmetric":
            # BETWEEN SYMMETRIC: the bounds in either order.
            _, g, ci, lo, hi, co = node
            lv, hv = self._value(binds, pmap, lo), self._value(binds, pmap, hi)
            if _is_unresolved(lv) or _is_unresolved(hv):
                return {}
            try:
                if hv < lv:
                    lo, hi = hi, lo
            except TypeError:
                return {}
            return self._ev(("range", g, ci, lo, hi, True, True, co), top, binds, pmap, splits)
        if kind == "range":
            _, g, ci, lo, hi, lo_incl, hi_incl, co = node
            if self._arity(g) != 1:
                return {}
            lv = self._value(binds, pmap, lo) if lo is not None else None
            hv = self._value(binds, pmap, hi) if hi is not None else None
            if co is not None:
                lv, hv = _range_bound(co, lv, False), _range_bound(co, hv, True)
            s = self.groups[g].strategy.shards_for_interval(
                lv, hv, low_inclusive=lo_incl, high_inclusive=hi_incl)
            return {} if s is None else {g: s}
        if kind == "and":
            out: dict[str, frozenset[str]] = {}
            composite: dict[str, dict[int, Any]] = {}
            for child in node[1]:
                if child[0] == "eq" and self._arity(child[1]) > 1:
                    v = self._value(binds, pmap, child[3])
                    if not _is_unresolved(v):
                        co = child[4]
                        composite.setdefault(child[1], {})[child[2]] = co(v) if co else v
                    continue
                for g, sh in self._ev(child, top, binds, pmap, splits).items():
                    out[g] = sh if g not in out else out[g] & sh
            for g, cols in composite.items():
                n = self._arity(g)
                if len(cols) == n:
                    sh = frozenset((self._shard(g, tuple(cols[i] for i in range(n))),))
                    out[g] = sh if g not in out else out[g] & sh
            return out
        if kind == "or":
            results = [self._ev(child, False, binds, pmap, splits) for child in node[1]]
            if not results:
                return {}
            common = set(results[0])
            for r in results[1:]:
                common &= set(r)
            return {g: frozenset().union(*(r[g] for r in results)) for g in common}
        return {}


_EMPTY: Mapping[str, Any] = {}

# An anonymous bound value's key (``%(4349 id)s``): SQLAlchemy compiles it as ``id_1``.
_ANON_KEY = re.compile(r"%\(\d+ (.+)\)s")
_COMPILED_NAME = re.compile(r"(.+)_(\d+)")


def _refuse_overridden_key(plan: _Plan, binds: Sequence[BindParameter[Any]], params: Any,
                           statement: Any) -> None:
    """Refuse parameters that give a value the route was decided by (an anonymous one, as
    ``key == 5`` makes) by the name SQLAlchemy compiles it to (``{"id_1": 7}``): SQLAlchemy
    runs the statement with that value, while the route followed the statement's own.
    (The names differ between statements of one shape: ``key == k`` in a lambda_stmt is
    named after ``k``.)"""
    stems = {a.group(1) for i in plan.anonymous_binds if (a := _ANON_KEY.fullmatch(binds[i].key))}
    sets = params if isinstance(params, (list, tuple)) else (params,)
    names = {k for p in sets if isinstance(p, Mapping) for k in p}
    suspects = [(k, m) for k in names if isinstance(k, str) and k[-1:].isdigit()
                and (m := _COMPILED_NAME.fullmatch(k)) is not None and m.group(1) in stems]
    if not suspects:
        return
    # SQLAlchemy names the statement's anonymous values of one stem <stem>_1 .. <stem>_n,
    # and ignores a parameter no value of the statement has (a column named id_2 set by an
    # UPDATE's parameters, say).
    keys = [e.key for e in visitors.iterate(statement) if isinstance(e, BindParameter)]
    anonymous = [a.group(1) for key in keys if (a := _ANON_KEY.fullmatch(key)) is not None]
    for k, m in suspects:
        if k not in keys and int(m.group(2)) <= anonymous.count(m.group(1)):
            raise RoutingError(
                f"parameter {k!r} names a value of the statement by the name SQLAlchemy "
                "compiles it to, which overrides the value it was built with; shardkit "
                "routes by the shard key's values it can read, which would not be the one "
                f"that runs. Give the key with bindparam({k!r}) (or build the statement "
                "with the value)", statement=statement)


def _counts_a_subquery(statement: Any) -> bool:
    """Whether ``statement`` is ``SELECT count(...) FROM (subquery)``, as Query.count() makes."""
    if not isinstance(statement, selectable.Select) or len(statement._raw_columns) != 1:
        return False
    froms = statement.get_final_froms()
    col = statement._raw_columns[0]
    col = getattr(col, "element", col)  # under its label
    return (len(froms) == 1 and getattr(col, "name", None) == "count"
            and isinstance(froms[0], (selectable.Subquery, selectable.Alias))
            and isinstance(_derived_select(froms[0]), selectable.SelectBase))


def _and_terms(kids: list[Any]) -> list[Any]:
    """The terms of an AND of ``kids`` (analysed predicates, ``None`` for those that name no
    key), nested ANDs flattened: the parts of a composite key are combined within one AND
    node, and ``where(a == 1).where(and_(b == 2, ...))`` names the whole key."""
    out: list[Any] = []
    for k in kids:
        if k is None:
            continue
        if k[0] == "and":
            out.extend(k[1])
        else:
            out.append(k)
    return out


# A quoted string or identifier (skipped whole), a parenthesis, or the word OR.
_OR_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|[()]|\bor\b", re.IGNORECASE)


def _bare_or(sql: str) -> bool:
    """Whether SQL text has an OR outside its own parentheses and quotes (``(a OR b)``
    and ``name = 'x or y'`` bound theirs)."""
    depth = 0
    for m in _OR_TOKENS.finditer(sql):
        t = m.group()
        if t == "(":
            depth += 1
        elif t == ")":
            depth -= 1
        elif depth <= 0 and t.lower() == "or":
            return True
    return False


def _bare_text(clause: Any) -> bool:
    """Whether SQL text (``text()``, ``literal_column()``) with an ``OR`` in it sits in the
    condition ``clause`` outside parentheses: SQLAlchemy renders it as written, so ``key = 5
    AND a OR b`` is ``(key = 5 AND a) OR b``, and the key ANDed beside it bounds nothing.
    (OR is the only operator that binds less tightly than AND: text without it, such as
    ``text("deleted_at IS NULL")``, leaves the key deciding.)"""
    stack = [clause]
    while stack:
        e = stack.pop()
        if isinstance(e, elements.TextClause) and _bare_or(e.text):
            return True
        if isinstance(e, elements.ColumnClause) and e.is_literal and _bare_or(e.name):
            return True
        # (Inside parentheses, a subquery, a function's arguments, CAST(... AS ...) or
        # CASE WHEN ... THEN ... END, an OR binds there.)
        if not isinstance(e, (elements.Grouping, selectable.SelectBase, selectable.FromClause,
                              elements.Cast, elements.Case)):
            stack.extend(e.get_children())
    return False


def _text_from(statement: Any) -> bool:
    """Whether a statement reads FROM SQL text, at any depth: ``select_from(text(...))``,
    or ``text(...).columns(...)`` (a TextualSelect) as a derived table or CTE."""
    for e in visitors.iterate(statement):
        if isinstance(e, selectable.TextualSelect):
            return True
        if isinstance(e, selectable.Select) and any(
                isinstance(f, elements.TextClause) for f in e.get_final_froms()):
            return True
    return False


class _NotSimple(Exception):
    """The statement leaves the fast path."""


def _simple_tables(statement: Any) -> list[Any] | None:
    """The tables of a statement simple enough for the fast path, else ``None``.

    Simple: a SELECT of whole tables or table columns, FROM/JOIN of plain tables,
    or an UPDATE/DELETE of a table with no extra FROMs.  Anything else (functions,
    subqueries, CTEs, aliases) takes the general, cached path.
    """
    if getattr(statement, "_independent_ctes", None):
        return None  # .add_cte(): the general path reads the WITH
    if isinstance(statement, selectable.Select):
        if (statement._setup_joins or statement._from_obj or statement._having_criteria
                or statement._group_by_clauses or statement._order_by_clauses):
            return None
        tables = []
        for rc in statement._raw_columns:
            if isinstance(rc, selectable.TableClause):
                tables.append(rc)
            elif isinstance(rc, elements.ColumnClause) and isinstance(rc.table, selectable.TableClause):
                tables.append(rc.table)
            else:
                return None
        if len({id(t) for t in tables}) > 1:
            return None  # an implicit cross join: the general path checks colocation
        return tables
    if isinstance(statement, (Update, Delete)):
        if statement._extra_froms if hasattr(statement, "_extra_froms") else False:
            return None
        if statement._returning or getattr(statement, "_values", None) and any(
            isinstance(v, ClauseElement) and not isinstance(v, BindParameter)
            for v in (statement._values or {}).values()
        ):
            return None
        return [statement.table]
    return None


def data_modifying_ctes(statement: Any) -> Iterator[selectable.CTE]:
    """The WITH parts of ``statement`` that insert, update or delete."""
    return (e for e in visitors.iterate(statement)
            if isinstance(e, selectable.CTE) and isinstance(e.element, UpdateBase))


def _dml_cte(statement: Any) -> str | None:
    """The first data-modifying WITH of ``statement`` (``"DELETE of t in 'x'"``), or None."""
    return next((f"{type(e.element).__name__.upper()} of {_table_name(e.element.table)} in {e.name!r}"
                 for e in data_modifying_ctes(statement)), None)


def unwrap_statement(statement: Any) -> Any:
    """The statement whose SQL decides the route: a ``lambda_stmt`` resolved with its current
    values, the statement inside ``select(Model).from_statement(...)``."""
    while True:
        if isinstance(statement, (lambdas.StatementLambdaElement, lambdas.NullLambdaStatement)):
            # Resolved with this call's closure values (SQLAlchemy keeps no public handle).
            statement = statement._resolved
        elif isinstance(statement, FromStatement):
            statement = statement.element
        else:
            return statement


_WRAPPERS = frozenset({lambdas.StatementLambdaElement, lambdas.NullLambdaStatement,
                       lambdas.LinkedLambdaElement, FromStatement})


def _check_arity(tr: TableRoute, key: Any) -> None:
    """Refuse a key with another number of parts than ``tr``'s shard key has columns."""
    n = len(tr.key_columns)
    if n > 1 and (not isinstance(key, tuple) or len(key) != n):
        raise ShardKeyError(
            f"{tr.table} has a composite shard key {tr.key_columns}; pass a tuple of {n} values",
            table=tr.table, key=key)
    if n == 1 and isinstance(key, tuple):
        raise ShardKeyError(
            f"the shard key of {tr.table} is one column ({tr.key_columns[0]}); pass one value, not {len(key)}",
            table=tr.table, key=key)


# What a SELECT built as select(Model or columns).where(column == value) holds in
# its __dict__ (SQLAlchemy's generative methods set attributes there only when the
# statement uses them; the last three are memoized, the cache key among them).
# A select(...).where(column == value) and nothing else holds these attributes (see
# _key_criterion), and may hold what routing or SQLAlchemy left in it: the memo of its
# cache key, its dialect options, made empty when read.
_KEYED_SELECT = frozenset({"_propagate_attrs", "_raw_columns", "_label_style", "_where_criteria"})
_FORM_EXTRAS = frozenset({"_generate_cache_key", "_memoized_keys", "dialect_options"})
_KEY_SELECT_ATTRS = _KEYED_SELECT | _FORM_EXTRAS
# At most this many entries in Router._key_columns (then they start again, as the plans do).
_KEY_COLUMNS_MAX = 1000


def _key_criterion(statement: selectable.Select[Any]) -> tuple[Any, BindParameter[Any], Any] | None:
    """``(column, bind, selected columns)`` if ``statement`` is a SELECT of columns or
    entities with the single criterion ``column = value`` and nothing else (no join,
    option, limit, order, grouping, further criteria, parameters of its own, a value
    given at execution); ``None`` for anything else."""
    d = statement.__dict__
    if not d.keys() <= _KEY_SELECT_ATTRS:
        return None
    where = d.get("_where_criteria")
    if where is None or len(where) != 1:
        return None
    c = where[0]
    if type(c) is not elements.BinaryExpression or c.operator is not operators.eq:
        return None
    b = c.right
    if type(b) is not BindParameter or b.callable is not None or b.expanding:
        return None
    raw = d.get("_raw_columns")
    if not raw:
        return None  # select().where(...): SQLAlchemy's ORM refuses a SELECT of no columns
    return c.left, b, raw


_MEMO = frozenset({"_generate_cache_key"})
_new_tuple = tuple.__new__
# The attribute by which SQLAlchemy's cache key tells an anonymous parameter, whose name it
# leaves out (2.1: the key's anon-map key, else None; 2.0: a flag).  Not the type of the
# key: bindparam(another_parameter.key) has an anonymous label's text for a name, which
# is in its cache key.
_BIND_ANON = "_anon_map_key" if hasattr(BindParameter, "_anon_map_key") else "_key_is_anon"


def _cache_key_form(statement: Any) -> tuple[Any, ...] | None:
    """For a SELECT of one entity by its key column (``select(Model).where(Model.key ==
    value)``, nothing else): what every statement of that form shares, its SQLAlchemy
    cache key included (see :func:`_give_cache_key`); None for anything else, or when
    SQLAlchemy does not keep a statement's cache key as this expects.  (Not a statement
    SQLAlchemy's ORM has compiled: compiling the first of a form changes its compile
    options, after its cache key was worked out, which the statement then holds.)"""
    d = statement.__dict__
    if d.keys() - _FORM_EXTRAS != _KEYED_SELECT or d.get("dialect_options"):
        return None
    c = d["_where_criteria"][0]
    b = c.right
    if (c.modifiers or not getattr(b, _BIND_ANON) or b.literal_execute
            or b.callable is not None or b.expanding):
        return None
    ck = statement._generate_cache_key()
    if (ck is None or len(ck.bindparams) != 1 or ck.bindparams[0] is not b
            or d.get("_generate_cache_key") is None or statement._memoized_keys != _MEMO
            or any(x is not None for x in ck[2:])):
        return None
    return (ck.key, d["_label_style"], d["_propagate_attrs"], c.negate, c.type, b.type, type(ck),
            tuple(ck[2:]))


def _give_cache_key(statement: Any, form: tuple[Any, ...], b: BindParameter[Any]) -> None:
    """Give ``statement``, a SELECT that route() found by its entity and key column (bind
    ``b``: see _key_criterion), the SQLAlchemy cache key of the first statement of its
    form (:func:`_cache_key_form`) with its own bind parameter, as SQLAlchemy keeps one
    when it works it out: executing the statement then does not traverse it again.
    Only for a statement of exactly that form: what _key_criterion and the entry's look-up
    left open (the label style, the ORM plugin's attributes, the comparison's and the
    parameter's types, an anonymous parameter (its key's name is not in the cache key) not
    rendered literally) checked here."""
    d = statement.__dict__
    if (len(d) == 4 and b.type is form[5] and getattr(b, _BIND_ANON) and not b.literal_execute
            and d.get("_label_style") is form[1]):
        c = d["_where_criteria"][0]
        pa = d.get("_propagate_attrs")
        if c.negate is form[3] and c.type is form[4] and not c.modifiers and (pa is form[2] or pa == form[2]):
            ck = _new_tuple(form[6], (form[0], [b], *form[7]))
            # (Named memoized first: a statement another thread derives from this one in
            # between then leaves the memo out, rather than run this one's SQL.)
            statement._memoized_keys = _MEMO
            d["_generate_cache_key"] = lambda: ck


def _column_equals_value(criterion: tuple[Any, BindParameter[Any], Any]) -> tuple[Any, BindParameter[Any], Any, Any, Any] | None:
    """``(column, bind, entity, table, entry key)`` if the SELECT of ``criterion`` (what
    _key_criterion found) selects one table's entity or columns, by a column of that
    table: its route depends only on the column, the value and the ORM entity it loads
    (None for columns or a Core table; an entity's load may be refused, see
    Router.entities_problem), so the router keeps it per column and entity (the entry
    key: Router._key_columns) and skips the plan lookup by SQLAlchemy's cache key, whose
    hash costs more than the rest of the route.  ``None`` for anything else, which takes
    the general path."""
    col, b, raw = criterion
    if not isinstance(col, elements.ColumnClause):
        return None
    table = col.table
    if not isinstance(table, selectable.TableClause):
        return None
    entity = None  # the ORM entity loaded (its load may be refused where its columns' is not)
    for rc in raw:
        if isinstance(rc, elements.ColumnClause):
            if rc.table is not table:
                return None
        elif not isinstance(rc, selectable.TableClause) or rc._deannotate() is not table:
            return None
        else:
            e = rc._annotations.get("parententity")
            if e is not None:
                if entity is not None and e is not entity:
                    return None
                entity = e
    return col, b, entity, table, (id(table), col.name, entity)


def _concrete_union_problem(statement: Any) -> str | None:
    """For a SELECT of a concrete-inheritance base: the refusal of the UNION of its
    classes' tables (``polymorphic_union``) that the ORM reads it from, in the words
    of the mapping rather than of the derived table SQLAlchemy names."""
    if not isinstance(statement, selectable.Select):
        return None
    for rc in statement._raw_columns:
        entity = rc._annotations.get("parententity") if isinstance(rc, selectable.FromClause) else None
        if entity is None:
            continue
        if not entity.mapper.configured:
            configure_mappers()  # (a ConcreteBase sets its UNION up then)
        wp = entity.mapper.with_polymorphic
        union = wp[1] if wp else None
        while isinstance(union, selectable.AliasedReturnsRows):
            union = union.element
        if isinstance(union, selectable.CompoundSelect) and len(compound_selects(union)) > 1:
            name = entity.mapper.class_.__name__
            return (f"{name} is read through a UNION of its concrete classes' tables "
                    "(polymorphic_union), which each shard would compute over its own rows; "
                    f"query the concrete classes of {name} without subclasses one by one")
    return None


def _range_bound(co: Any, v: Any, high: bool) -> Any:
    """A range bound ``v`` (the high one if ``high``) of a key column whose coercer is ``co``,
    widened to every value the database may compare the key with: SQLAlchemy sends a value
    typed by the column cast to it (``%(k_1)s::INTEGER``, ``bindparam("hi")`` compared with
    the key), which PostgreSQL rounds (``99.5`` is ``100``, so ``key <= 99.5`` holds 100), and
    a value of its own type (``literal(99.5)``) as it is; a TypeDecorator sends what its
    ``process_bind_param`` makes.  So the interval holds both forms: a non-integral number
    for an integer key reaches its floor (low) or ceiling (high), another bound the lower
    (low) or higher (high) of the value and its coerced form."""
    if _is_unresolved(v):
        return v
    try:
        c = co(v)
    except ShardKeyError:
        if isinstance(v, (float, decimal.Decimal)) and co is _to_int:
            try:
                return math.ceil(v) if high else math.floor(v)
            except (ValueError, OverflowError, ArithmeticError):
                return v  # NaN, an infinity: the strategy says what it can
        return v
    if type(v) is datetime.datetime and v.tzinfo is None and type(c) is datetime.date:
        # A naive datetime for a date key (also through a TypeDecorator's
        # process_bind_param): a literal is sent as a timestamp (the key compared at its
        # midnight: k < '2024-01-01 06:00' holds 2024-01-01), one typed by the column as
        # ::DATE (k < '2024-01-01' does not): the day past (before) its date bounds both
        # readings, whichever the operator; past Python's last date, no high bound.
        try:
            return max(c, v.date() + _ONE_DAY) if high else min(c, v.date() - _ONE_DAY)
        except OverflowError:
            return None if high else min(c, v.date())
    try:
        if c is v or c == v:
            return v
        return max(c, v) if high else min(c, v)
    except (TypeError, ArithmeticError):
        return c  # another type than the value's: the database compares with that one


def _is_unresolved(v: Any) -> bool:
    return v is None or isinstance(v, ClauseElement)


def _no_key(row: Mapping[str, Any], missing: Sequence[str]) -> str:
    """Why an inserted ``row`` has no shard key (its ``missing`` columns), and what to do."""
    computed = [c for c in missing if isinstance(row.get(c), ClauseElement)]
    if computed:
        return (f"gives shard key column(s) {computed} as a SQL expression, which the database "
                "computes at the INSERT, after the shard is chosen; pass the key's value "
                "itself (it decides the shard)")
    return f"has no value for shard key column(s) {list(missing)}; set the key (it decides the shard)"


def _to_uuid(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return uuid.UUID(v)
        except ValueError:
            raise ShardKeyError(f"{v!r} is not a valid UUID for a uuid shard key", key=v) from None
    return v


def _to_str(v: Any) -> Any:
    if not isinstance(v, str):
        raise ShardKeyError(
            f"text shard key got {v!r} ({type(v).__name__}); pass a str "
            "(it would be placed differently from the stored text)",
            key=v,
        )
    return v


def _to_bpchar(v: Any) -> Any:
    """A ``char(n)`` key: PostgreSQL stores and returns it padded with blanks and compares
    it without them, and shardkit's SQL functions hash it as ``text``, which drops them:
    ``'ab'`` and ``'ab    '`` are one key."""
    return _to_str(v).rstrip(" ")


@functools.lru_cache(maxsize=64)
def _varchar_coercer(length: int) -> Any:
    """A ``varchar(length)`` key: PostgreSQL stores a longer value whose excess characters
    are all blanks cut to ``length`` (no error), and that stored value is what the row's
    bucket, range or list value is computed from (also in the guard's SQL): ``'ab   '`` in a
    ``varchar(4)`` is stored, and placed, as ``'ab  '``.  (A read by the longer value
    matches no stored row wherever it is sent, so the get() fast path may skip this.)"""

    def coerce(v: Any) -> Any:
        if type(v) is not str:
            v = _to_str(v)
        if len(v) > length and not v[length:].strip(" "):
            return v[:length]
        return v

    coerce.reads_as = str  # type: ignore[attr-defined]
    return coerce


def _to_int(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ShardKeyError(
            f"integer shard key got {v!r} ({type(v).__name__}); pass an int "
            "(a string would be placed differently from the stored integer)",
            key=v,
        )
    return v


_ONE_DAY = datetime.timedelta(days=1)


def _to_date(v: Any) -> Any:
    """A ``date`` key given a naive ``datetime``: PostgreSQL compares (and stores) its date
    (SQLAlchemy sends it cast to the column's type, ``::DATE``).  An aware one is left as it
    is (its date depends on the server's TimeZone): refused where it is compared."""
    if type(v) is datetime.datetime and v.tzinfo is None:
        return v.date()
    return v


def _through_bind_type(bind_type: Any, col_type: Any, co: Any) -> Any:
    """The coercer ``co`` of a key column of type ``col_type`` for a value bound as
    ``bind_type``, when PostgreSQL compares the key with the value in that type:

    * a non-integer numeric key compared with parameters SQLAlchemy typed INTEGER: an IN
      list takes its type from its first value (``k.in_([3, Decimal("99.6")])`` is sent as
      ``k IN (3::INTEGER, 99.6::INTEGER)``), so the key is compared with each value cast to
      an integer (100);
    * an unscaled numeric key compared with a float: the comparison is in ``float8``, so
      the float as it is decides, not the 15 digits it is stored as (:func:`read_coercer`).
    """
    # (SQLAlchemy sends a NUMERIC parameter uncast: a float in it is a float8 too, also
    # through a TypeDecorator's process_bind_param.)
    read = read_coercer(co)
    if not isinstance(bind_type, sqltypes.Integer) or not _bind_type_matters(col_type):
        return read
    # An INTEGER parameter is not the column's: no TypeDecorator's process_bind_param runs
    # on it, and the integer PostgreSQL makes of it is compared with the stored key.
    return _integer_cast_coercer(read_coercer(coercer_for(unwrap(col_type)[1])))


def _bind_type_matters(col_type: Any) -> bool:
    """Whether a key column of ``col_type`` is routed by a coercer that depends on the type
    of the parameter it is compared with (:func:`_through_bind_type`): a non-integer
    numeric key."""
    if isinstance(col_type, sqltypes.Integer):
        return False
    base = unwrap(col_type)[1]
    # (Float: not a Numeric in SQLAlchemy 2.1.)
    return isinstance(base, (sqltypes.Numeric, sqltypes.Float)) and not isinstance(base, sqltypes.Integer)


@functools.lru_cache(maxsize=64)
def _integer_cast_coercer(co: Any) -> Any:
    def coerce(v: Any) -> Any:
        if isinstance(v, decimal.Decimal) and v.is_finite():
            # numeric -> integer rounds half away from zero
            v = int(v.to_integral_value(rounding=decimal.ROUND_HALF_UP))
        elif isinstance(v, float) and math.isfinite(v):
            v = int(round(v))  # float8 -> integer rounds half to even (rint), as round() does
        return co(v) if co is not None else v

    return coerce


# Room for any NUMERIC PostgreSQL stores (1000 digits), so that rounding never overflows.
_NUMERIC_CONTEXT = decimal.Context(prec=2000, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


@functools.lru_cache(maxsize=64)
def _numeric_coercer(scale: int) -> Any:
    """A ``NUMERIC(p, scale)`` key: PostgreSQL stores it rounded to ``scale`` digits, half
    away from zero (``99.995`` is stored as ``100.00``), and that stored value is what decides
    the row's range or list value (also in the ownership guard's SQL).  A float, sent as a
    ``float8``, is first read as PostgreSQL reads one (15 significant digits)."""
    exp = decimal.Decimal(1).scaleb(-scale)

    def coerce(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (decimal.Decimal, float, int)) or (
                isinstance(v, int) and scale >= 0):
            return v  # an int is exact at a scale >= 0; another type is refused later
        d = decimal.Decimal(format(v, ".15g")) if isinstance(v, float) else decimal.Decimal(v)
        if not d.is_finite():
            return v  # NaN and infinities: refused or placed by the strategy
        out = d.quantize(exp, rounding=decimal.ROUND_HALF_UP, context=_NUMERIC_CONTEXT)
        return float(out) if isinstance(v, float) else int(out) if isinstance(v, int) else out

    return coerce


def _float_as_numeric(v: Any) -> Any:
    """An unscaled ``NUMERIC`` key given a float: psycopg sends it as a ``float8``, which
    PostgreSQL stores in the column at 15 significant digits (``2.9999999999999996`` is
    stored as ``3``); that value decides where a row written with it goes.  A float compared
    with the column is compared as a ``float8``, where only a stored ``2.9999999999999996``
    is equal: reads take it as it is (:func:`read_coercer`)."""
    if type(v) is float and math.isfinite(v):
        return float(decimal.Decimal(format(v, ".15g")))
    return v


def read_coercer(co: Any) -> Any:
    """The coercer a read's comparison of a key column uses, from the one that places a
    written key (:func:`coercer_for`): they differ for an unscaled numeric key given a float
    (also through a TypeDecorator's ``process_bind_param``: its ``read`` form)."""
    return None if co is _float_as_numeric else getattr(co, "read", co)


# PostgreSQL's epoch: a timestamp before it is rounded half away from zero, down in time.
_PG_EPOCH = datetime.datetime(2000, 1, 1)
_PG_EPOCH_UTC = _PG_EPOCH.replace(tzinfo=datetime.timezone.utc)


@functools.lru_cache(maxsize=8)
def _timestamp_coercer(precision: int) -> Any:
    """A ``TIMESTAMP(precision)`` key: PostgreSQL stores it rounded to ``precision``
    fractional digits of a second (``23:59:59.7`` in a ``timestamp(0)`` is the next day's
    ``00:00:00``), half away from its epoch (2000-01-01), and that stored value is what
    decides the row's range (or bucket).  Another value is left as it is."""
    unit = 10 ** (6 - precision)
    half = unit // 2

    def coerce(v: Any) -> Any:
        if type(v) is not datetime.datetime:
            return v
        r = v.microsecond % unit
        if r == 0:
            return v
        down = v - datetime.timedelta(microseconds=r)
        after_epoch = v >= (_PG_EPOCH if v.tzinfo is None else _PG_EPOCH_UTC)
        if r < half or (r == half and not after_epoch):
            return down
        try:
            return down + datetime.timedelta(microseconds=unit)
        except OverflowError:
            return v  # past Python's datetime range: PostgreSQL's error says what is wrong
    return coerce


def _enum_coercer(type_: Any) -> Any:
    """For an ``Enum`` column: a member (or its stored string) -> the string stored, as
    SQLAlchemy writes it (a Python enum by its name, or by ``values_callable``'s value)."""
    to_db = getattr(type_, "_db_value_for_elem", None)
    if to_db is None:  # pragma: no cover - SQLAlchemy's private API changed
        return None

    def coerce(v: Any) -> Any:
        try:
            out = to_db(v)
        except (LookupError, TypeError):
            raise ShardKeyError(
                f"enum shard key got {v!r} ({type(v).__name__}), which is not one of the column's "
                f"values {list(type_.enums)}", key=v) from None
        if not isinstance(out, str):
            raise ShardKeyError(f"enum shard key got {v!r}, which is not one of the column's values "
                                f"{list(type_.enums)}", key=v)
        return out

    return coerce


_PG_DIALECT: Any = None


# Cached per type object (types compare by identity): an ORM flush asks once per object.
@functools.lru_cache(maxsize=256)
def _decorator_coercer(type_: sqltypes.TypeDecorator[Any]) -> Any:
    """For a ``TypeDecorator`` column: the value it sends to PostgreSQL (its
    ``process_bind_param``), in the Python type of what it stores (its implementation
    type for PostgreSQL): the stored value is what the row's key hashes as."""
    global _PG_DIALECT
    if _PG_DIALECT is None:
        from sqlalchemy.dialects.postgresql.base import PGDialect

        _PG_DIALECT = PGDialect()
    dialect = _PG_DIALECT
    inner = coercer_for(type_.load_dialect_impl(dialect))
    if type(type_).process_bind_param is sqltypes.TypeDecorator.process_bind_param:
        return inner  # no processing of its own: the implementation type's rules

    def processed(v: Any) -> Any:
        try:
            return type_.process_bind_param(v, dialect)
        except Exception as e:
            raise ShardKeyError(
                f"shard key {v!r}: the column type {type(type_).__name__} refused it "
                f"({type(e).__name__}: {e})", key=v) from e

    def coerce(v: Any) -> Any:
        out = processed(v)
        return inner(out) if inner is not None and out is not None else out

    read_inner = read_coercer(inner)
    if read_inner is not inner:
        # A comparison's parameter, processed as a written key is, but compared as it is
        # sent (a float as a float8): see read_coercer.
        def read(v: Any) -> Any:
            out = processed(v)
            return read_inner(out) if read_inner is not None and out is not None else out

        coerce.read = read  # type: ignore[attr-defined]
    return coerce


def coercer_for(type_: Any) -> Any:
    """A function that brings a key value to the canonical Python type of its column.

    A uuid column filtered with its string form, and an integer column filtered
    with an int, must hash exactly like the values the ORM writes.
    """
    if isinstance(type_, sqltypes.TypeDecorator):
        return _decorator_coercer(type_)
    if isinstance(type_, sqltypes.Uuid):
        return _to_uuid
    if isinstance(type_, sqltypes.Enum):
        return _enum_coercer(type_)
    if isinstance(type_, sqltypes.Integer):
        return _to_int
    if isinstance(type_, sqltypes.Numeric) and not isinstance(type_, sqltypes.Float) \
            and type_.scale is not None:
        return _numeric_coercer(type_.scale)
    if isinstance(type_, sqltypes.Numeric) and not isinstance(type_, sqltypes.Float):
        return _float_as_numeric
    if isinstance(type_, sqltypes.DateTime):
        precision = getattr(type_, "precision", None)  # (postgresql.TIMESTAMP's)
        return _timestamp_coercer(precision) if isinstance(precision, int) and 0 <= precision < 6 else None
    if isinstance(type_, sqltypes.Date):
        return _to_date
    if isinstance(type_, (sqltypes.CHAR, sqltypes.NCHAR)):
        return _to_bpchar
    if isinstance(type_, sqltypes.String) and not isinstance(type_, sqltypes.Enum):
        length = type_.length
        # (Not Text(n): PostgreSQL's text has no length, and keeps every blank.)
        return _varchar_coercer(length) if isinstance(length, int) and length > 0 \
            and not isinstance(type_, sqltypes.Text) else _to_str
    if isinstance(type_, postgresql.DOMAIN):
        # (Last: a key column of a type above pays nothing for it.)
        return _domain_coercer(type_)
    return None


# Cached per type object, as _decorator_coercer is.
@functools.lru_cache(maxsize=256)
def _domain_coercer(type_: Any) -> Any:
    """For a column of a PostgreSQL ``DOMAIN``: its base type's rules, through domains over
    domains (the database stores, compares and returns the base type's values).  SQLAlchemy
    gives a domain no bind processing, so a ``TypeDecorator`` inside one is read as the type
    it stores, not through its ``process_bind_param``."""
    return coercer_for(unwrap(type_)[1])


def with_statement_params(statement: Any, params: Any) -> Any:
    """The call's parameters over those set with ``Statement.params()``."""
    sp = statement._params
    if params is None:
        return dict(sp)
    if isinstance(params, Mapping):
        return {**sp, **params}
    if isinstance(params, (list, tuple)) and params and isinstance(params[0], Mapping):
        return [{**sp, **p} for p in params]
    return params


def _attribute_columns(stmt: Any) -> Mapping[str, str]:
    """For an ORM insert: attribute name -> column name, where they differ."""
    if stmt._propagate_attrs.get("compile_state_plugin") != "orm":
        return _EMPTY
    mapper = stmt._propagate_attrs["plugin_subject"].mapper
    return {prop.key: prop.columns[0].name for prop in mapper.column_attrs
            if prop.key != prop.columns[0].name}


def _bound(v: Any, params: Mapping[str, Any]) -> Any:
    """A value given in a statement: a bind parameter's from the call's parameters if named there."""
    if isinstance(v, BindParameter) and v.key in params:
        return params[v.key]
    return _literal(v)


def _literal(v: Any) -> Any:
    if isinstance(v, BindParameter):
        return v.effective_value
    return v


def column_named(columns: Any, name: str) -> Any:
    """The column of ``columns`` (a table's ``.c``) whose database name is ``name``, or None.
    A shard key column is configured by that name, which a ``Column(name, key="...")``
    does not share with its key in ``table.c`` (where ``name`` may even be another
    column's key)."""
    c = columns.get(name)
    if c is not None and getattr(c, "name", None) == name:
        return c
    return next((c for c in columns if getattr(c, "name", None) == name), None)


def _col_name(k: Any) -> str:
    if isinstance(k, str):
        return k
    return getattr(k, "name", None) or getattr(k, "key", str(k))


def _set_name(table: Any, k: Any) -> str:
    """The name of the column that a key of an INSERT's or UPDATE's values or parameters
    sets: a string is a column's key, as SQLAlchemy reads it (``Column("user",
    key="owner")`` is set by ``owner``), else a column (by its name)."""
    if isinstance(k, str):
        c = table.c.get(k)
        return k if c is None else c.name
    return _col_name(k)


def _table_name(table: Any) -> str:
    if isinstance(table, str):
        return table
    t = getattr(table, "__table__", None)
    if t is None:
        # a Mapper
        t = getattr(table, "local_table", None)
    if t is None:
        t = table
    if isinstance(t, selectable.Alias):
        t = t.element
    name = getattr(t, "fullname", None) or getattr(t, "name", None)
    if not isinstance(name, str):
        raise RoutingError(f"{table!r} is not a table, mapped class or table name")
    return name
