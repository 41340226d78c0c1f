"""``ShardedSession``: a SQLAlchemy Session that routes every statement to its shard.

Built on :mod:`sqlalchemy.ext.horizontal_shard`: objects carry their shard as
the identity token (so equal primary keys on different shards never collide,
and lazy loads stay on their object's shard), and the unit of work asks the
session which connection each object belongs to.  What this module adds is
the routing itself: shard keys read from objects and from WHERE clauses, IN
lists split by owner, reference tables kept in step on every shard, and
refusal of writes that would silently land on the wrong shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import inspect as _pyinspect
import logging
import numbers
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, NoReturn

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Integer,
    Numeric,
    Table,
    Text,
    all_,
    and_,
    any_,
    cast,
    event,
    false,
    func,
    inspect,
    not_,
    or_,
    true,
    util,
)
from sqlalchemy import text as sa_text
from sqlalchemy import exc as sa_exc
from sqlalchemy import bindparam
from sqlalchemy import insert as sa_insert
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from concurrent.futures import FIRST_EXCEPTION, wait
from itertools import count as _counter

from psycopg.pq import TransactionStatus

from sqlalchemy.engine import Connection, CursorResult, Result, TwoPhaseTransaction
from sqlalchemy.engine.result import FrozenResult, IteratorResult, SimpleResultMetaData
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.orm import Mapper, ORMExecuteState, RelationshipProperty, Session, bulk_persistence, persistence
from sqlalchemy.orm import exc as orm_exc
from sqlalchemy.orm import loading
from sqlalchemy.orm.base import NEVER_SET, NO_VALUE, PASSIVE_OFF
from sqlalchemy.orm.context import FromStatement, QueryContext
from sqlalchemy.orm.interfaces import MANYTOONE
from sqlalchemy.orm.session import (
    SessionTransaction,
    SessionTransactionOrigin,
    SessionTransactionState,
)
from sqlalchemy.sql import coercions, lambdas, roles, selectable, visitors
from sqlalchemy.sql import util as sql_util
from sqlalchemy.sql.ddl import sort_tables_and_constraints
from sqlalchemy.sql.dml import Delete, Insert, Update, UpdateBase
from sqlalchemy.sql.elements import BindParameter, TextClause
from sqlalchemy.sql.functions import FunctionElement

from ._cluster import _LIVE, Cluster
from ._colocation import compound_selects, reference_rows_problem
from ._config import CONSISTENCY_MODES, PRIMARY, REPLICA
from ._replicas import WAL_POSITION_SQL, format_lsn, format_token, parse_lsn, parse_token, replay_target
from ._routing import (Route, Router, TableRoute, _to_int, _to_str, coercer_for, column_named,
                       data_modifying_ctes, derived_select, read_coercer, unwrap_statement,
                       with_statement_params)
from ._scatter import (CANCEL_GRACE, compound_keyword, compound_parts, describe_local_derived,
                       function_names, merge_rows, plan_scatter, send_cancel, shut_down_socket, text_comparison)
from ._scope import NO_SCOPE, RoutingScope, current_scope, lag_limit_problem, scope, switch_problem
from ._scope import _current as _scope_var
from ._slices import SLICE_BASE
from ._strategies import HashStrategy
from .errors import (
    CommitError,
    ConfigurationError,
    CrossShardWriteError,
    NoShardForKey,
    NotOwned,
    RoutingError,
    ScatterError,
    ScatterRefused,
    ShardKeyError,
    ShardUnavailable,
    ShardkitError,
    first_line,
)

__all__ = ["ShardedSession", "run_transaction"]

log = logging.getLogger("shardkit.session")

# A session given a Connection of one of the cluster's nodes (bind=, binds=, or joined by
# bind_arguments={"bind": ...}): SQLAlchemy's "join an external transaction" recipe.
_EXTERNAL_TRANSACTION = (
    "ShardedSession {what}: it cannot join an external transaction (SQLAlchemy's recipe for "
    "tests that undo what each test committed, Session(bind=connection, "
    "join_transaction_mode=...)); it opens its own connection to each shard's node as its "
    "transaction needs one, its commit() commits them, and read-your-writes then sends later "
    "reads to replicas, which never see rows an outer transaction left uncommitted. Give it "
    "cluster= only, and have each test remove the rows it committed (TRUNCATE its tables on "
    "every shard's primary after it), or end its session with rollback() when the code under "
    "test does not commit (README: Testing)")

# horizontal_shard.ShardedSession's own arguments, which the cluster replaces.
_HORIZONTAL_SHARD_ARGS = ("shards", "shard_chooser", "identity_chooser", "execute_chooser",
                          "id_chooser", "query_chooser")


class ShardedSession(horizontal_shard.ShardedSession):
    """A :class:`~sqlalchemy.orm.Session` over a :class:`~shardkit.Cluster`.

    Use it through a sessionmaker::

        Session = sessionmaker(class_=ShardedSession, cluster=cluster)

    Execution options understood per statement (``stmt.execution_options(...)``
    or ``session.execute(stmt, execution_options={...})``):

    ``shardkit_shard``
        run on this shard, whatever the statement says.
    ``shardkit_all_shards``
        allow a key-less UPDATE/DELETE (or a textual statement) to run on every shard.

    :func:`shardkit.scope` sets the same defaults for a block of code.
    """

    # The session-wide execution options of SQLAlchemy 2.1 (Session(execution_options=...));
    # none before 2.1.
    execution_options: Any = util.EMPTY_DICT
    # Unless the constructor is given others (a session is made per request: what it
    # need not set, it does not).
    consistency: str | None = None
    strict = False
    # During a flush (with a catalog): where the objects it writes were loaded from.
    _sk_placements: list[tuple[Any, Any, str, Any]] | None = None
    # The shard this transaction reads reference rows from (the first one it used).
    _sk_ref_shard: str | None = None
    # During a flush: shard -> the connection it writes that shard's objects with.
    _sk_flush_conns: dict[str, Any] | None = None
    # During a flush: (identity key, old primary key) of each reference row it updated or
    # deleted through an object (the session's other objects of it are expired after).
    _sk_ref_written: list[tuple[Any, Any]] | None = None
    # In delete() and merge(): what they load decides a write (see _read_target).
    _sk_for_write = False
    # The map (its Router) in use when the identity map was last empty (with a catalog).
    _sk_map_router: Router | None = None
    # Inside commit(): the outermost transaction's commit() is then SQLAlchemy's own.
    _sk_committing = False
    # Transactions this session committed (run_transaction does not retry after one).
    _sk_commits = 0
    _sk_autocommitted = False  # a transaction ended without COMMIT had written in autocommit

    def __init_subclass__(cls, **kw: Any) -> None:
        # A subclass's default is checked once, as the constructor checks the argument
        # (a property computing it is the subclass's own affair).
        super().__init_subclass__(**kw)
        default = cls.__dict__.get("consistency")
        if isinstance(default, str) and default not in CONSISTENCY_MODES:
            raise sa_exc.ArgumentError(
                f"{cls.__name__}.consistency must be one of {', '.join(CONSISTENCY_MODES)} "
                f"(or None, the cluster's), not {default!r}")

    def __init__(self, cluster: Cluster | None = None, *, consistency_token: str | None = None,
                 consistency: str | None = None, strict: bool | None = None, **kwargs: Any) -> None:
        if not isinstance(cluster, Cluster):
            raise sa_exc.ArgumentError(
                "ShardedSession needs cluster=shardkit.Cluster.from_config(...); got "
                f"{type(cluster).__name__}"
            )
        # horizontal_shard.ShardedSession.__init__ wants chooser callables and
        # installs its own serial execute hook; we provide the choosers as
        # methods and install our routing hook instead.
        try:
            # (query_cls= as horizontal_shard takes it: ShardedQuery unless given another.)
            kwargs.setdefault("query_cls", horizontal_shard.ShardedQuery)
            Session.__init__(self, **kwargs)
        except TypeError:
            foreign = [k for k in _HORIZONTAL_SHARD_ARGS if k in kwargs]
            if not foreign:
                raise
            raise sa_exc.ArgumentError(
                f"ShardedSession does not take horizontal_shard's {', '.join(k + '=' for k in foreign)}: "
                "the cluster (shardkit.Cluster.from_config(...), passed as cluster=) has the shards' "
                "engines, and routes each statement by its shard key (groups in the config); name a "
                "shard per statement with set_shard_id(...), bind_arguments={'shard_id': ...} or "
                "shardkit.scope(shard=...) (README: \"Coming from horizontal_shard\")") from None
        if self.bind is not None or kwargs.get("binds"):
            given = [self.bind, *(kwargs.get("binds") or {}).values()]
            if any(isinstance(b, Connection) for b in given):
                raise sa_exc.ArgumentError(_EXTERNAL_TRANSACTION.format(
                    what="was given a Connection (bind=/binds=)"))
            raise sa_exc.ArgumentError(
                "ShardedSession takes its engines from the cluster; do not pass "
                f"{'bind' if self.bind is not None else 'binds'}="
            )
        self.cluster = cluster
        if consistency is not None:
            if consistency not in CONSISTENCY_MODES:
                raise sa_exc.ArgumentError(
                    f"consistency must be one of {', '.join(CONSISTENCY_MODES)}, not {consistency!r}")
            self.consistency = consistency
        if strict is not None:
            # Refuse any query that would need more than one shard (or not, whatever the
            # class's default: strict=False is given, not left out).
            if problem := switch_problem("strict", strict):
                raise sa_exc.ArgumentError(problem)
            self.strict = strict
        # Shards the current transaction wrote to: their reads go to the primary.
        self._sk_written: set[str] = set()
        # shard -> WAL position this session's reads must see (read-your-writes).
        self._sk_tokens: dict[str, int] = {}
        # shard -> the highest position of _sk_tokens known to be one of its primary's own
        # (this session's commits read it there, or the primary was seen past it).
        self._sk_token_checked: dict[str, int] = {}
        self._sk_commit_conns: dict[str, Any] = {}
        # shard -> the replica this transaction reads it from (_ON_PRIMARY: its primary).
        self._sk_replica: dict[str, int] = {}
        # During a flush: the objects whose reference rows were already copied to (or
        # deleted from) every shard, at their INSERT, UPDATE or DELETE.
        self._sk_ref_copied: set[Any] = set()
        if cluster.catalog is not None:
            # The map in use when the identity map was last empty: objects held
            # since may have been loaded by an older map (see _refuse_moved_load).  (The
            # config file's map, version None, never changes.)
            self._sk_map_router = cluster.router
        if consistency_token is not None:
            self.require_token(consistency_token)

    def expunge_all(self) -> None:
        Session.expunge_all(self)  # (close() too; horizontal_shard's is Session's)
        cluster = self.cluster
        if cluster.catalog is not None:
            self._sk_map_router = cluster.router

    def bind_shard(self, shard_id: str, bind: Any) -> None:
        """Refused: the cluster has the shards' engines (horizontal_shard's method)."""
        raise sa_exc.ArgumentError(
            f"ShardedSession.bind_shard({shard_id!r}, ...) is horizontal_shard's: shardkit takes "
            "the shards and their engines from the cluster (the shards of its config); "
            "use cluster.engine(shard) for an engine of one")

    # -- choosers (the hooks horizontal_shard defines) ------------------------------

    def _choose_shard_for_instance(self, mapper: Any, instance: Any, clause: Any = None,
                                   **kw: Any) -> str:
        if instance is None:
            if clause is not None:
                route = self.cluster.router.route(clause)
                if len(route.shards) == 1:
                    return route.shards[0]
            shard = current_scope().shard
            if shard is not None:
                return shard
            if self._flushing and mapper is not None:
                shard = self._association_shard(mapper)
                if shard is not None:
                    return shard
            raise RoutingError(
                ("session.connection() needs a shard" if mapper is None else
                 f"cannot choose a shard for {mapper} without an instance or a keyed clause")
                + "; pass bind_arguments={'shard_id': ...}, call session.connection_for_shard(name), "
                "or run it inside shardkit.scope(shard=...)"
            )
        shard = shard_of_instance(self.cluster, mapper, instance)
        if self.cluster.router.table_route(mapper).is_reference:
            # A new reference row whose key this session holds (deleted and added again
            # in one flush) is written where the old one is, so the flush turns the pair
            # into one UPDATE there instead of inserting a copy that is still present.
            mapper = inspect(instance).mapper
            pk = mapper.primary_key_from_instance(instance)
            if None not in pk:
                for s in self.cluster.shard_names:
                    if mapper.identity_key_from_primary_key(pk, identity_token=s) in self.identity_map:
                        return s
            # (The row is written on the first shard and copied to the others: see
            # connection_callable.)  The new object is the one this transaction's reads
            # of its row return, as on one database, so it is keyed on the shard they
            # ask: the one taken already, or the first, which they ask from now on.
            if self._sk_ref_shard is not None:
                return self._sk_ref_shard
            if self._flushing:
                self._sk_ref_shard = shard
        return shard

    def _association_shard(self, mapper: Any) -> str | None:
        """During a flush, the shard for the rows of many-to-many (``secondary=``) tables,
        which SQLAlchemy writes on one connection asked for by the relationship's target
        ``mapper`` alone: the shard that owns the changed rows by the secondary table's
        shard key (``tag.members.append(member)`` writes the row of a table keyed by
        member_id on the member's shard, not the tag's), or, for a table not so placed,
        the shard of the objects whose collections changed.  A reference table's rows
        are written here and copied to the other shards after the flush
        (``_replicate_reference_pairs``).  Raises RoutingError when they are on several
        shards."""
        shards: set[str] = set()
        touched: set[str] = set()
        names: set[str] = set()
        router = self.cluster.router
        for st in (*self._new, *(inspect(o) for o in self.dirty), *self._deleted):
            token = st.key[2] if st.key is not None else st.identity_token
            if token is None:
                try:
                    token = shard_of_instance(self.cluster, st.mapper, st.obj())
                except ShardkitError:
                    continue
            touched.add(token)
            rels = [r for r in st.mapper.relationships if r.secondary is not None
                    and not r.viewonly and (r.mapper.isa(mapper) or st.mapper.isa(mapper))]
            for r in rels:
                if st not in self._deleted and not st.attrs[r.key].history.has_changes():
                    continue
                try:
                    tr = router.table_route(r.secondary)
                except RoutingError:
                    tr = None
                if tr is not None and tr.is_reference:
                    continue
                rows = (_association_rows(st, r) if tr is not None and tr.strategy is not None
                        else None)
                # (The rows are keyed by column key, the shard key configured by name: a
                # Column("member_id", key="mid") is row["mid"].)
                keys = [getattr(column_named(r.secondary.c, c), "key", c)
                        for c in tr.key_columns] if rows else ()  # type: ignore[union-attr]
                for row in rows or ():
                    key = tuple(row.get(k) for k in keys)
                    try:
                        shards.add(router.shard_for(r.secondary, key[0] if len(key) == 1 else key))
                    except ShardkitError:
                        shards.add(token)
                if rows is None:
                    shards.add(token)
                names.add(f"{st.mapper.class_.__name__}.{r.key}")
        if len(shards) > 1:
            raise RoutingError(
                f"this flush changes many-to-many collections ({', '.join(sorted(names))}) whose "
                f"rows are on shards {', '.join(sorted(shards))}; SQLAlchemy writes a secondary "
                "table's rows on one connection, so shardkit writes them for one shard per flush: "
                "flush after each shard's changes (session.flush())")
        if shards:
            return shards.pop()
        # No association row changes: any shard this flush writes (nothing runs there).
        return min(touched) if touched else None

    def _identity_lookup(self, mapper: Any, primary_key_identity: Any, identity_token: Any = None,
                         passive: Any = PASSIVE_OFF, lazy_loaded_from: Any = None,
                         execution_options: Any = util.EMPTY_DICT, bind_arguments: Any = None,
                         **kw: Any) -> Any:
        # horizontal_shard's own drops ``passive``: a look-up that may not emit SQL (the
        # old parent a backref removes an object from, PASSIVE_NO_FETCH) then refreshed an
        # expired object, which a plain Session leaves expired (and unread).
        if identity_token is not None:
            return Session._identity_lookup(self, mapper, primary_key_identity, identity_token,
                                            passive, lazy_loaded_from, **kw)
        for shard in self.identity_chooser(mapper, primary_key_identity, lazy_loaded_from=lazy_loaded_from,
                                           execution_options=execution_options,
                                           bind_arguments=dict(bind_arguments) if bind_arguments else {}):
            obj = Session._identity_lookup(self, mapper, primary_key_identity, shard,
                                           passive, lazy_loaded_from, **kw)
            if obj is not None:
                return obj
        return None

    def _identity_shards(self, mapper: Any, primary_key: Any, *, lazy_loaded_from: Any = None,
                         **kw: Any) -> Iterable[str]:
        if lazy_loaded_from is not None and (token := _shard_of_state(lazy_loaded_from)) and _follows_object(
                self.cluster.router, mapper, lazy_loaded_from.mapper):
            return [token]
        sc = current_scope()
        if sc.shard is not None:
            return [sc.shard]
        shard = self._shard_from_identity(mapper, primary_key, held=True)
        if shard is None and sc.key is not None:
            # Inside scope(key=...): the object get() would load, the one of the scope key's
            # shard, not one of another shard the session happens to hold.
            try:
                if self.cluster.router.table_route(mapper).strategy is not None:
                    shard = self.cluster.router.shard_for(mapper, sc.key)
            except ShardkitError:
                pass
        return [shard] if shard is not None else list(self.cluster.shard_names)

    def _shard_from_identity(self, mapper: Any, primary_key: Any, placed: bool = False,
                             held: bool = False) -> str | None:
        """The shard of a primary key, when the primary key contains the whole shard key:
        where get() finds its row, or with ``placed``, where a flush of an object of that
        identity puts it (they differ for a float in an unscaled numeric key).  With
        ``held``: where get() finds its row, unless this session holds the object of that
        identity on the shard its flush put it on, and not on the first (an object given a
        float for such a key is on the shard of the 15 digits stored, and one database's
        identity map returns it)."""
        plan = _pk_plan_for(self.cluster.router, mapper)
        if plan is False:
            return None
        positions, coercers, strategy, placing = plan
        if placed:
            coercers = placing
        elif held and placing is not coercers:
            shard = self._shard_from_identity(mapper, primary_key)
            other = self._shard_from_identity(mapper, primary_key, placed=True)
            if shard is None or other is None or other == shard or not self.identity_map:
                return shard
            ident = list(_pk_values(mapper, primary_key))
            if mapper.identity_key_from_primary_key(ident, shard) not in self.identity_map and \
                    mapper.identity_key_from_primary_key(ident, other) in self.identity_map:
                return other
            return shard
        if len(positions) == 1 and not isinstance(primary_key, (tuple, list, dict)):
            # get(Model, value) of a one-column shard key: what the general steps below
            # come to for a scalar (it is the whole primary key).
            if positions[0] or primary_key is None:
                return None
            co = coercers[0]
            return strategy.shard_for_key(co(primary_key) if co else primary_key)
        ident = _pk_values(mapper, primary_key)
        if len(ident) <= max(positions):
            return None
        values = []
        for pos, co in zip(positions, coercers):
            v = ident[pos]
            if v is None:
                return None
            values.append(co(v) if co else v)
        return strategy.shard_for_key(values[0] if len(values) == 1 else tuple(values))

    def _merge(self, state: Any, state_dict: Any, *, load: bool, **kw: Any) -> Any:
        # merge(obj, load=False) of an object given its key by make_transient_to_detached()
        # (no shard in it) keys the merged copy with that key as it is: a second object
        # for the row, beside the one the session holds or loads.  The object's shard key
        # (or its primary key, when that contains the shard key) names its shard; the
        # caller's object is left as it was.
        key = state.key
        if load:
            # merge() loads the row to compare the given object with: the changes it
            # finds are what the flush writes, so the row is read where the write goes
            # (a replica's older copy would hide changes, or turn an UPDATE into an INSERT).
            # A primary key without the shard key may be unique only per shard: the row
            # is the one on the shard the object's own key names, where its flush writes
            # it, when that shard has one (by primary key alone, get() refuses an id found
            # on several shards).  Otherwise, as by primary key: a row of that id on
            # another shard is one whose key the merge would change (the flush refuses it).
            with self._loading_for_write():
                shard = found = None
                # (A transient object's key is read from it: a primary key that holds the
                # shard key is looked up on its shard by get() alone, and one not complete
                # finds no row to look up.)
                pk = key[1] if key else state.mapper._identity_key_from_state(state)[1]
                if (key is None or key[2] is None) and state.session_id != self.hash_key and not any(
                        v is None or v is NO_VALUE or v is NEVER_SET for v in pk):
                    by_pk = self._shard_from_identity(state.mapper, pk, held=True)
                    own = by_pk if by_pk is not None else _own_key_shard(self.cluster, state)
                    named = _named_shard(kw.get("options"), None, None)
                    if named is not None and own is not None and named != own:
                        # Not found there, it would be INSERTed where its key puts it, over
                        # the row it has there (a duplicate key error at the flush).
                        raise RoutingError(
                            f"merge() of a {state.mapper.class_.__name__} whose shard key puts it on "
                            f"{own}, with options naming shard {named}: its row is read, and written, "
                            f"on {own}; drop the set_shard_id option (merge() finds the shard by the "
                            "object's key)")
                    if by_pk is None:
                        shard = own
                        # (held until the merge has found it in the identity map)
                        found = None if shard is None else self.get(
                            state.mapper.class_, pk, identity_token=shard, options=kw.get("options"))
                    elif named is None:
                        # Its primary key names the shard its flush writes it on: the row is
                        # looked for there, not where the session's execution options or a
                        # scope name a shard for statements (merge()'s own options may).
                        shard = found = by_pk
                elif key is not None and key[2] is not None and state.session_id != self.hash_key:
                    _refuse_stale_token(self, state, loading=True)
                return self._merge_on(shard if found is not None else None, state, state_dict, load, kw)
        shard = None
        if key is not None and state.session_id != self.hash_key:
            if key[2] is None:
                shard = _own_key_shard(self.cluster, state) or self._shard_from_identity(state.mapper, key[1])
            else:
                # (The merged copy is attached empty: the given object is the one to check.)
                _refuse_stale_token(self, state)
        return self._merge_on(shard, state, state_dict, load, kw)

    def _merge_on(self, shard: str | None, state: Any, state_dict: Any, load: bool, kw: Any) -> Any:
        """Session._merge() with ``state`` keyed on ``shard`` meanwhile (None: as it is);
        the caller's object is left as it was."""
        if shard is None:
            return super()._merge(state, state_dict, load=load, **kw)
        key, token = state.key, state.identity_token
        if key is None:
            state.identity_token = shard
        else:
            state.key = (key[0], key[1], shard)
        try:
            return super()._merge(state, state_dict, load=load, **kw)
        finally:
            state.identity_token = token
            if key is not None:
                state.key = key

    def _delete_impl(self, state: Any, obj: Any, head: bool) -> None:
        # delete() (and delete_all()) load the collections the delete cascades to: those
        # rows are about to be deleted, so they are read as the flush's own loads are.
        with self._loading_for_write():
            return super()._delete_impl(state, obj, head)

    @contextlib.contextmanager
    def _loading_for_write(self) -> Iterator[None]:
        """Inside: what the ORM loads decides a write, and is read from the primary (see
        _read_target)."""
        if self._sk_for_write or not self.cluster.has_replicas:
            yield
            return
        self._sk_for_write = True
        try:
            yield
        finally:
            self._sk_for_write = False

    def _get_impl(self, entity: Any, primary_key_identity: Any, db_load_fn: Any, *,
                  options: Any = None, populate_existing: Any = None, with_for_update: Any = None,
                  identity_token: Any = None, execution_options: Any = util.EMPTY_DICT,
                  bind_arguments: Any = None, **kw: Any) -> Any:
        # Session.get(), get_one() and the legacy Query.get() all come here.  Naming the
        # shard up front lets the load skip statement analysis, but not the entity's check
        # (unless the caller named the shard: then it asked for that shard's rows).
        # (SQLAlchemy's own arguments, with its defaults, are named: no look-ups in kw.)
        if identity_token is None and (options or execution_options or bind_arguments
                                       or self.execution_options):  # (else no shard named)
            # A shard the caller named another way (as horizontal_shard reads them) is the
            # one the object is looked up and loaded under, whatever its key says.
            given = execution_options
            if self.execution_options:  # the session's own (SQLAlchemy 2.1), under the call's
                given = _with_session_options(self.execution_options, None, given)
            if options or given or bind_arguments:  # (none of them: no shard named)
                identity_token = _named_shard(options, given, bind_arguments)
        # (_scope_var.get(): current_scope(), without the call.)
        if identity_token is None and _scope_var.get().shard is None:
            # A mapped class's (or mapper's) mapper, its entity_problem and where the shard
            # key sits in its primary key, by the entity, worked out once per router (a new
            # map brings a new router).  (Kept while the mapper's polymorphic mappers, which
            # entity_problem checks too, are the same: SQLAlchemy makes them anew when a
            # subclass is mapped.)
            router = self.cluster.router
            try:
                plan = router.get_plans.get(entity)
            except TypeError:  # (not hashable: inspect() says what it is)
                plan = None
            if plan is None or plan[0]._with_polymorphic_mappers is not plan[2]:
                insp = inspect(entity)
                mapper = insp.mapper
                problem = router.entity_problem(insp)
                scalar = _scalar_key_plan(router, mapper) if problem is None else None
                # (No kept load for an aliased class, with_polymorphic(): SQLAlchemy's get()
                # refuses those.)
                plan = (mapper, problem, mapper._with_polymorphic_mappers, scalar,
                        _get_load(mapper, scalar) if insp.is_mapper else None)
                if insp.is_mapper:
                    router.get_plans[entity] = plan
            mapper, problem, _, scalar, load = plan
            if problem is not None:
                raise ScatterRefused(f"cannot load {problem}",
                                     construct="statement not colocated on the shard key")
            if scalar is not None and type(primary_key_identity) is scalar[0]:
                # get(Model, value) of a one-column shard key that is the primary key, the
                # value of its column's Python type (an int for an integer key): what
                # _shard_from_identity comes to (its coercer gives such a value back).
                identity_token = scalar[1].shard_for_key(primary_key_identity)
                if (load is not None and db_load_fn is _LOAD_ON_PK and not options and not execution_options
                        and bind_arguments is None and not populate_existing and with_for_update is None
                        and not self.execution_options):
                    # A get() with nothing but the key (and the primary key that one column):
                    # SQLAlchemy's identity look-up, then its load by primary key, whose
                    # statement (the same each time) is made once per mapper (see _get_load).
                    instance = self._identity_lookup(mapper, [primary_key_identity],
                                                     identity_token=identity_token)
                    if instance is not None:
                        return instance if isinstance(instance, mapper.class_) else None
                    eo = _LOAD_OPTIONS.get(identity_token) or _load_options(identity_token)
                    return self.execute(load[0], params={load[1]: primary_key_identity},
                                        execution_options=eo,
                                        bind_arguments=None).unique().scalars().one_or_none()
            else:
                # (populate_existing and with_for_update read the database, as one database
                # does, whatever the identity map holds.)
                identity_token = self._shard_from_identity(
                    mapper, primary_key_identity,
                    held=not populate_existing and with_for_update is None)
            if identity_token is None:
                if current_scope().key is None:
                    _refuse_held_on_several_shards(self, mapper, primary_key_identity)
                with _one_shard_per_identity(entity, primary_key_identity):
                    return super()._get_impl(entity, primary_key_identity, db_load_fn,
                                             options=options, populate_existing=populate_existing,
                                             with_for_update=with_for_update,
                                             execution_options=execution_options,
                                             bind_arguments=bind_arguments, **kw)
        return super()._get_impl(entity, primary_key_identity, db_load_fn, options=options,
                                 populate_existing=populate_existing, with_for_update=with_for_update,
                                 identity_token=identity_token, execution_options=execution_options,
                                 bind_arguments=bind_arguments, **kw)

    def _execute_shards(self, orm_context: ORMExecuteState) -> Iterable[str]:
        # Only reached through horizontal_shard's own machinery; statements
        # normally route in execute().
        return self.cluster.explain(orm_context.statement, orm_context.parameters).shards

    def _choose_shard_and_assign(self, mapper: Any, instance: Any, **kw: Any) -> Any:
        # horizontal_shard keeps the first shard it chose for a pending object in
        # its identity token; an object made transient again (make_transient, a
        # rolled-back flush) and given a new key would then be inserted on the
        # old shard.  Until an object is persistent its shard follows its key.
        state = inspect(instance) if instance is not None else None
        if state is not None and state.key and state.key[2] is not None:
            return state.key[2]
        shard = self._choose_shard_for_instance(mapper, instance, **kw)
        if state is not None:
            state.identity_token = shard
        return shard

    def connection_callable(self, mapper: Any = None, instance: Any = None,
                            shard_id: str | None = None, **kw: Any) -> Any:
        """The connection the unit of work writes an object with: the session's own for
        that shard, in the current transaction (a savepoint included)."""
        if shard_id is None:
            shard_id = self._choose_shard_and_assign(mapper, instance)
            if instance is not None and self.cluster.config.reference_tables \
                    and shard_id != self.cluster.shard_names[0] and _is_reference(self.cluster.router, mapper):
                # A reference row is written on the first shard, then copied to the others
                # in their order (_replicate_reference_rows), wherever the object was read
                # from, as a statement writing every copy runs: two writers of a row then
                # lock its copies in one order, and cannot each hold one the other waits
                # for, which no one database would see (a deadlock no server detects).
                shard_id = self.cluster.shard_names[0]
        conns = self._sk_flush_conns
        if conns is not None and (conn := conns.get(shard_id)) is not None:
            return conn  # (the flush's transaction does not change during the flush)
        # horizontal_shard asks the outermost transaction, which skips an open
        # begin_nested(): the flush would then write outside the savepoint.
        conn = self.connection(bind_arguments={"mapper": mapper, "shard_id": shard_id})
        if conns is not None:
            conns[shard_id] = conn
        return conn

    # horizontal_shard calls its choosers through the instance. As methods of the
    # class they create no reference cycle; bound methods stored on the instance
    # would, and every closed session would then wait for the cyclic garbage
    # collector instead of being freed at once.
    shard_chooser = _choose_shard_for_instance
    identity_chooser = _identity_shards
    execute_chooser = _execute_shards

    # -- binds ----------------------------------------------------------------------

    def get_bind(self, mapper: Any = None, *, shard_id: str | None = None,
                 instance: Any = None, clause: Any = None, shardkit_role: str | None = None,
                 shardkit_replica: int = 0, shardkit_stream: bool = False,
                 shardkit_engine: Any = None, **kw: Any) -> Any:
        # Every statement and connection of the session comes here, on every shard.
        if shardkit_engine is not None:
            return shardkit_engine  # a replica read's, chosen by _plain_read (its checks made)
        if self.cluster._map_misfit is not None:
            self.cluster.refuse_misfit()
        if shard_id is None:
            shard_id = self._choose_shard_and_assign(mapper, instance=instance, clause=clause)
        try:
            known = shard_id in self.cluster.router.shard_set
        except TypeError:  # (a list, say: not hashable)
            known = False
        if not known:
            raise RoutingError(
                f"unknown shard {shard_id!r}; shards: {', '.join(self.cluster.shard_names)}"
            )
        role = shardkit_role or PRIMARY
        if role == PRIMARY:
            self._refuse_primary_down(shard_id)
        elif shardkit_stream:
            return self.cluster.streaming_engine(shard_id, shardkit_replica)
        return self.cluster.engine(shard_id, role, shardkit_replica)

    def _refuse_primary_down(self, shard_id: str) -> None:
        """get_bind()'s check of a statement about to run on ``shard_id``'s primary."""
        try:
            _fail_fast_if_primary_down(self.cluster, shard_id)
        except ShardUnavailable:
            if not self._invalidate_held(shard_id):
                # Nothing ran there in this transaction, and this statement does not
                # run: the shard's reads keep using its replicas.
                self._sk_written.discard(shard_id)
            raise

    # -- consistency ------------------------------------------------------------------

    def consistency_token(self) -> str:
        """This session's read-your-writes position, as a short string.

        Pass it to another session (``ShardedSession(..., consistency_token=t)``
        or :meth:`require_token`), e.g. through a cookie or a background job, so
        that session's reads see this one's committed writes.
        """
        return format_token(self._sk_tokens)

    def require_token(self, token: str) -> None:
        """Make this session's reads see at least the writes recorded in ``token``.

        An empty string (no token yet: a missing cookie) asks for nothing, as
        ``ShardedSession(consistency_token="")`` does."""
        if token == "":
            return
        for shard, lsn in parse_token(token).items():
            if shard in self.cluster.router.shard_set and lsn > self._sk_tokens.get(shard, 0):
                self._sk_tokens[shard] = lsn

    def _read_target(self, shard: str, statement: Any, execution_options: Any,
                     sc: RoutingScope | None = None, exclude: frozenset[int] = frozenset(),
                     deadline: float | None = None) -> int | None:
        """The replica index a read on ``shard`` should use, or None for the primary.

        ``sc``: the scope in force, if the caller has it already; ``exclude``: replicas
        this read already failed on; ``deadline``: when a read of several shards stops
        waiting for replicas to reach the session's position (time.monotonic(); it waits
        wait_for_token once in all, not per shard)."""
        cluster = self.cluster
        settings = cluster.replica_settings
        if sc is None:
            sc = current_scope()
        if sc is NO_SCOPE and not execution_options and not getattr(statement, "_execution_options", None):
            # Most reads: no options, no scope; the session's and the cluster's settings.
            role = consistency = None
            max_s, max_b = settings.max_lag_seconds, settings.max_lag_bytes
        else:
            role, consistency, max_s, max_b = _read_options(_options(statement, execution_options))
            if role is None and consistency is None:
                # The scope's role is a default: a statement's own consistency overrides it
                # (shardkit_consistency="strong" inside scope(role="replica") reads the primary).
                role = sc.role
            if max_s is None:
                max_s = sc.max_lag_seconds if sc.max_lag_seconds is not None else settings.max_lag_seconds
            if max_b is None:
                max_b = sc.max_lag_bytes if sc.max_lag_bytes is not None else settings.max_lag_bytes
        if shard in self._sk_written:
            return None
        if self.twophase:
            # Every connection of a two-phase session's transaction is prepared at
            # commit; a replica can neither hold a two-phase transaction (its engine is
            # in autocommit) nor PREPARE one (it is in recovery).
            if role == REPLICA:
                raise RoutingError(
                    f"shard {shard}: a twophase=True session reads from the primaries; "
                    "a read forced to a replica cannot join its two-phase transaction "
                    "(read replicas from a session without twophase)")
            return self._on_primary(shard)
        pinned = self._sk_replica.get(shard)
        if self._flushing or self._sk_for_write:
            # What the ORM loads to decide a write (a collection whose rows a deleted
            # object's flush or cascade removes, the row merge() compares with): read
            # where the write goes, not from a replica that may not have replayed rows
            # the write must cover.
            return self._on_primary(shard)
        if (role == PRIMARY or getattr(statement, "_for_update_arg", None) is not None
                or (role is None and self.in_nested_transaction())):
            # (SQLAlchemy opens a SAVEPOINT on every connection used inside
            # begin_nested(); an autocommit replica connection cannot hold one.
            # Forced to a replica, the read gets a transaction there: see
            # _transactional_read.)
            return self._on_primary(shard)
        if role is None and pinned == _ON_PRIMARY:
            return None
        if not cluster.replica_count(shard):
            return None
        consistency = consistency or sc.consistency or self.consistency or settings.consistency
        if consistency == "strong" and role != REPLICA:
            return self._on_primary(shard)
        min_lsn = self._sk_tokens.get(shard) if consistency == "read_your_writes" else None
        floor = published = cluster.moved_lsn.get(shard)
        if floor:
            verdict = cluster._floor_verdicts.get(shard)
            if (verdict is not None and verdict[0] == floor and verdict[2] is not None
                    and verdict[1] == cluster.map_version):
                # Past the primary's position (another server's): the primary's own
                # position when that was found stands in for it (see _floor_beyond_primary).
                floor = verdict[2]
        if floor and floor > (min_lsn or 0):
            # Buckets moved here: a replica serves once it has replayed the switch,
            # so moved rows never seem to vanish (whatever the consistency mode).
            min_lsn = floor
        else:
            floor = None  # (the session's own position is the one to reach, if any)
        selector = cluster.selector
        ok, behind = selector.eligible(shard, max_lag_seconds=max_s, max_lag_bytes=max_b,
                                       min_lsn=min_lsn, exclude=exclude)
        # A transaction reads each shard from one node: a later read (a lazy load)
        # must never see an older state than an earlier one, which moving to
        # another replica could.  So it keeps its replica while that stays usable,
        # and then reads the primary, which has everything any replica showed.
        # Reads forced to replicas move to another replica instead (they accept
        # its staleness; they never run on the primary).
        if pinned is not None and pinned != _ON_PRIMARY:
            if any(r.index == pinned for r in ok):
                return pinned
            if role != REPLICA and (ok or behind or settings.when_no_replica != "raise"):
                return self._on_primary(shard)
            # (Every replica out under when_no_replica = "raise": raised below, as for a
            # transaction that had not read the shard yet.)
        # A forced read that moved to another replica does not take the transaction
        # with it: the next plain read finds the pin unusable and reads the primary.
        repin = pinned is None
        if ok:
            chosen = selector.pick(shard, ok).index
            if repin:
                self._sk_replica[shard] = chosen
            return chosen
        if behind and min_lsn is not None:
            # The monitor's last sample predates our write; ask the replica itself.
            best = max(behind, key=lambda r: r.wal_lsn or 0)
            if deadline is None:
                # (Also the bound of the choice made again below, with a corrected position:
                # a read waits wait_for_token once in all.)
                deadline = time.monotonic() + settings.wait_for_token
            wait = max(0.0, deadline - time.monotonic())
            if selector.probe_reached(shard, best, min_lsn, wait):
                if repin:
                    self._sk_replica[shard] = best.index
                return best.index
            if floor and floor == published and self._floor_beyond_primary(shard, floor):
                return self._read_target(shard, statement, execution_options, sc, exclude, deadline)
            if self._token_beyond_primary(shard):
                # The token's position was another server's: choose again with the
                # primary's own (replicas that have replayed it have every write there).
                return self._read_target(shard, statement, execution_options, sc, exclude, deadline)
            if role != REPLICA:
                # Healthy replicas a moment behind this session's own writes: the
                # primary has them ("raise" is for replicas that are out).
                return self._on_primary(shard)
        if role == REPLICA or settings.when_no_replica == "raise":
            raise ShardUnavailable(
                f"shard {shard}: no replica can serve this read ({_why_not(cluster, shard, max_s, max_b, min_lsn, bool(floor), exclude)})"
                + ("; reads were forced to replicas" if role == REPLICA else
                   "; [replicas] when_no_replica = 'raise'"),
                shard=shard,
            )
        return self._on_primary(shard)

    def _token_beyond_primary(self, shard: str) -> bool:
        """After no replica reached this session's position for ``shard``: if that position
        came from a token (not from this session's commits there) and is past the primary's
        current WAL position, it is not a position of this primary (a token of another
        cluster with the same shard names, one made before a failover to a server that
        lacked the last writes, or before a restore): no replica would ever reach it, and
        every session handed this session's token would inherit it.  It becomes the
        primary's current position, which covers every write the primary has (True).
        One query to the primary per position, only when the replicas fall short of it."""
        want = self._sk_tokens.get(shard)
        if want is None or want <= self._sk_token_checked.get(shard, -1):
            return False
        monitor = self.cluster.selector.monitor
        if not monitor.answers(monitor.shards[shard].primary):
            return False  # (down or hung) asked again once it answers
        self._sk_token_checked[shard] = want  # one question per position, answered or not
        try:
            text = _primary_position(self.cluster, shard)
        except Exception as e:  # noqa: BLE001 - the position stands: reads use the primary
            log.debug("could not check %s's position against its primary: %s", shard, str(e))
            return False
        now = parse_lsn(text)
        if want <= now:
            return False
        now = replay_target(now)
        log.warning("a consistency token asks shard %s for WAL position %s, past its primary's "
                    "(%s): it is another server's position (another cluster, or one from before "
                    "a failover or a restore); the primary's is used instead",
                    shard, format_lsn(want), format_lsn(now))
        self._sk_tokens[shard] = self._sk_token_checked[shard] = now
        return True

    def _floor_beyond_primary(self, shard: str, floor: int) -> bool:
        """After no replica reached ``floor``, the WAL position after the latest move to
        ``shard`` (Cluster.moved_lsn, as the catalog has it): whether it is past the
        primary's current position, so not this server's (the shard's server was replaced
        since, by a restore or an upgrade to a new server) and no replica would ever reach
        it.  Then the primary's position now stands in for it (True: choose again), with a
        warning: it is past every switch of the map in use (the switch is made before the
        map is published), and it is found again when the map changes (the catalog keeps
        the highest position per shard, so a later move's would not show).  One query to
        the primary per floor and map version, and process."""
        cluster = self.cluster
        version = cluster.map_version
        known = cluster._floor_verdicts.get(shard)
        if known is not None and known[0] == floor and (known[2] is None or known[1] == version):
            return False  # the primary had reached it (replicas are just behind), or done
        monitor = cluster.selector.monitor
        if not monitor.answers(monitor.shards[shard].primary):
            return False  # down or hung
        try:
            now = parse_lsn(_primary_position(cluster, shard))
        except Exception as e:  # noqa: BLE001 - the floor stands: reads use the primary
            log.debug("could not check %s's move floor against its primary: %s", shard, str(e))
            return False
        # (The floor is published after the primary's commit at it: a primary of the same
        # history is at it or past it.)
        if floor <= now:
            cluster._floor_verdicts[shard] = (floor, version, None)
            return False
        cluster._floor_verdicts[shard] = (floor, version, now)
        if known is None or known[0] != floor:
            log.warning("the latest move of buckets to shard %s ended at WAL position %s (the catalog "
                        "says), past its primary's (%s): the shard's server was replaced since (restored "
                        "or upgraded to a new server); its replicas serve reads once they have replayed "
                        "the primary's position instead, taken again at each change of the map",
                        shard, format_lsn(floor), format_lsn(now))
        return True

    def _on_primary(self, shard: str) -> None:
        """This read runs on the primary, and so does the rest of the transaction's (see
        :meth:`_read_target`).  Returns None, :meth:`_read_target`'s "the primary"."""
        self._sk_replica[shard] = _ON_PRIMARY

    def _invalidate_held(self, shard: str) -> bool:
        """The primary of ``shard`` is down: mark the transaction's connection to it (if
        any) invalid, so that close() and rollback() let it go quietly (and release the
        other shards' connections) and the transaction cannot commit without it.
        False if the transaction holds no connection to it."""
        trans = self.get_transaction()
        entry = getattr(trans, "_connections", {}).get(self.cluster.primary(shard)) if trans else None
        if entry is not None and not entry[0].invalidated:
            try:
                entry[0].invalidate()
            except Exception:  # noqa: BLE001 - it is gone already
                pass
        return entry is not None

    def _forget_connection(self, shard: str, index: int | None) -> None:
        """Drop a failed connection (a replica's, or with ``index=None`` the primary's) from
        the transaction, so the next statement for that shard starts afresh."""
        trans = self.get_transaction()
        if trans is None:
            return
        if index is None:
            engines = [self.cluster.primary(shard)]
        else:
            engines = [self.cluster.engine(shard, REPLICA, index), self.cluster.streaming_engine(shard, index)]
        # SessionTransaction keeps each connection under its engine and itself, and so
        # does each savepoint (begin_nested()) open on it: a savepoint still holding it
        # would fail to end.  There is no public API to let go of one that died under a read.
        levels = []
        t = self._transaction
        while t is not None:
            levels.append(t)
            t = t._parent
        for engine in engines:
            dead = None
            for level in levels:
                conns = getattr(level, "_connections", None)
                entry = conns.pop(engine, None) if conns is not None else None
                if entry is not None:
                    conns.pop(entry[0], None)
                    dead = entry[0]
            if dead is not None:
                try:
                    dead.invalidate()
                    dead.close()
                except Exception:  # noqa: BLE001 - it is already broken
                    pass

    def execute(self, statement: Any, params: Any = None, *,
                execution_options: Any = util.EMPTY_DICT, bind_arguments: Any = None,
                **kw: Any) -> Any:
        """Execute a statement on the shard(s) that its shard key, options or scope select.

        Same arguments as :meth:`sqlalchemy.orm.Session.execute`.
        """
        if self.execution_options:
            # The session's own (SQLAlchemy 2.1): they route as the statement's would, under
            # the statement's and this call's, as SQLAlchemy merges them.
            execution_options = _with_session_options(self.execution_options, statement,
                                                      execution_options)
        # What routing records for the transaction (shards written, replica pins, the
        # reference shard) is recorded before the statement begins it; if the statement
        # fails first (a primary that is down, autobegin=False), no transaction end would
        # clear it and it would steer the next transaction.
        fresh = self._transaction is None
        try:
            routed = None
            if (type(statement) is _Select and not bind_arguments and not kw
                    and not statement._execution_options):
                if not execution_options:
                    if bind_arguments is None:
                        out = self._plain_read(statement, params)
                        if out is not _GENERAL:
                            if type(out) is not Route:
                                return out
                            # Routed already (as _route_statement would): routing it again
                            # would take a second turn of the shards that reads of reference
                            # rows take in turn.
                            routed = out
                elif len(execution_options) == 1:
                    # get()'s load (or get_one()'s, Query.get()'s): the shard is in its load
                    # options, named by the object's identity.
                    # What the general path does (the shard named by the load options, read
                    # on its primary, or with replicas on a plain read's replica if one
                    # serves: _replica_read), without analysing the statement.
                    lo = execution_options.get("_sa_orm_load_options")
                    if (lo is not None and (shard := lo._identity_token) is not None
                            and lo._refresh_state is None and lo._lazy_loaded_from is None
                            and self._short_path_open(statement, params)):
                        # Load options holding nothing but the shard (get() with no options
                        # of its own): the shard's, made once, with the ORM's autoflush off
                        # (_short_path_open found nothing to flush), as a plain read's.
                        eo = execution_options if len(lo.__dict__) > 1 else None
                        router = self.cluster.router
                        if shard in router.unreplicated:  # (a shard, without replicas)
                            return self._primary_read(shard, statement, params, eo)
                        if shard in router.shard_set:
                            # On a shard with replicas: a plain read's replica, if one serves.
                            out = self._replica_read(shard, statement, params, eo)
                            if out is not _GENERAL:
                                return out
            return self._sk_execute(statement, params, execution_options, bind_arguments, kw, routed)
        except BaseException:
            if fresh and self._transaction is None:
                _forget_transaction(self)
            raise

    def _sk_execute(self, statement: Any, params: Any, execution_options: Any, bind_arguments: Any,
                    kw: Any, routed: Route | None) -> Any:
        if not isinstance(statement, roles.StatementRole):
            statement = coercions.expect(roles.StatementRole, statement)
        if isinstance(statement, (lambdas.StatementLambdaElement, lambdas.NullLambdaStatement)):
            # Routed, planned and merged as the statement it builds, with this call's values.
            statement = statement._resolved
        if execution_options or getattr(statement, "_execution_options", None):
            # Checked whatever the statement and its shards: a bad one is refused before it
            # runs on a shard without replicas, as on one with them.
            _checked_options(_options(statement, execution_options))
        if (self.autoflush and not self._flushing
                and isinstance(statement, (selectable.Select, selectable.CompoundSelect))
                and (self._new or self._deleted or self.identity_map.check_modified())
                and _autoflushes(statement, execution_options)):
            # Flush before choosing the node: the flush decides which shards this
            # transaction has written, and those must be read from their primary;
            # and a cross-shard read's threads do not flush.
            self._autoflush()
        if params and isinstance(params, list) and isinstance(statement, Update):
            mapper = _orm_bulk_update_of(statement, execution_options)
            if mapper is not None:
                return _orm_bulk_update(
                    self, mapper, params, synchronize=_bulk_synchronize(statement, execution_options),
                    autoflush=_option("autoflush", statement, execution_options) is not False)
        sc = current_scope()
        route = routed if routed is not None else _route_statement(
            self, statement, params, execution_options, bind_arguments, sc)
        locks = getattr(statement, "_for_update_arg", None) is not None
        if locks:
            route = _locked_reference_rows_on_first(self.cluster, statement, params, route)
        if route.anywhere and not route.is_write and self._sk_ref_shard is None:
            # Reference rows, which any shard has: the shards take turns between
            # transactions, but within one every such read asks the same shard (the
            # router is given it), so a later read never sees an older state (another
            # shard's replica may be further behind) than an earlier one.
            self._sk_ref_shard = route.shards[0]
        if route.is_write or locks:
            # Rows written or locked: the rest of the transaction reads them on the primary.
            self._sk_written.update(route.shards)
        if (isinstance(statement, Insert) and params
                and statement._propagate_attrs.get("compile_state_plugin") == "orm"):
            return _orm_bulk_insert(self, statement, params, route, execution_options)
        if len(route.shards) == 1:
            shard = route.shards[0]
            if route.anywhere and not route.is_write:
                # Marks the loads that follow from these rows (a subqueryload inherits the
                # options): they are not pinned to the shard this one happened to use.
                execution_options = util.immutabledict(execution_options).union(_REFERENCE_READ)
            if route.is_write or not self.cluster.has_replicas:
                eo, ba = _single(shard, PRIMARY, execution_options, bind_arguments, not route.is_write)
                result = Session.execute(self, statement, params, execution_options=eo,
                                         bind_arguments=ba, **kw)
                if route.is_write and route.keys and self.cluster.catalog is not None:
                    _check_still_owner(self, shard, statement, result, one_key=route.keys == "one",
                                       router=route.router)
                return result
            return self._read_on(shard, statement, params, execution_options, bind_arguments, kw, sc)
        return _run_on_shards(self, statement, params, execution_options, bind_arguments, route)

    def _execute_internal(self, statement: Any, params: Any = None, *, _add_event: Any = None,
                          **kw: Any) -> Any:
        # Every execution of the session, routed already (each shard's, for a statement run
        # on several).  The application's do_orm_execute listeners run inside it, after the
        # routing: what they change is checked once they have run (SQLAlchemy's _add_event
        # runs after them); without listeners nothing more is done.
        if self.dispatch.do_orm_execute and kw.get("_parent_execute_state") is None:
            then = _add_event

            def after_listeners(state: ORMExecuteState) -> Any:
                _check_listener_changes(self, statement, state)
                return then(state) if then is not None else None
            _add_event = after_listeners
        return super()._execute_internal(statement, params, _add_event=_add_event, **kw)

    def _plain_read(self, statement: Any, params: Any) -> Any:
        """The most common read in fewer steps: a SELECT with no execution options, outside
        any scope, with nothing to flush, routed by its key to one shard and read from a
        usable replica (or the primary of a shard without replicas).  Anything else goes
        to execute()'s general path, which routes it the same way (every condition here
        is one that path checks): this returns ``_GENERAL``, or the statement's route
        once it has one (the general path uses it rather than routing again)."""
        if not self._short_path_open(statement, params):
            return _GENERAL
        cluster = self.cluster
        route = cluster.router.route(statement, params, anywhere=self._sk_ref_shard)
        shard = route.read_shard  # (one shard, not a write, not reference rows alone)
        if shard is None:
            return route
        if not cluster._replica_counts[shard]:
            # (The general path reads its primary without asking the health monitor,
            # which cluster.selector would start.)  Nothing to flush (checked above).
            return self._primary_read(shard, statement, params)
        out = self._replica_read(shard, statement, params)
        return route if out is _GENERAL else out

    def _replica_read(self, shard: str, statement: Any, params: Any, execution_options: Any = None) -> Any:
        """A short path's read (_plain_read, get()'s load in execute()) on ``shard``, a shard
        with replicas, from the replica the general path would choose when the choice is
        plain (no write to the shard in this transaction, no bucket moved to it, a usable
        replica for the session's consistency, the transaction's pin kept); ``_GENERAL``
        when it is not, for the general path to decide.  ``execution_options``: as for
        _primary_read."""
        cluster = self.cluster
        if shard in self._sk_written or cluster.moved_lsn.get(shard):
            return _GENERAL
        settings = cluster.config.replicas
        consistency = self.consistency or settings.consistency
        if consistency == "strong":
            return _GENERAL
        pinned = self._sk_replica.get(shard)
        selector = cluster._selector or cluster.selector
        ok, _ = selector.eligible(
            shard, max_lag_seconds=settings.max_lag_seconds, max_lag_bytes=settings.max_lag_bytes,
            min_lsn=self._sk_tokens.get(shard) if consistency == "read_your_writes" else None)
        if pinned is None:
            if not ok:
                return _GENERAL
            index = self._sk_replica[shard] = (ok[0] if len(ok) == 1 else selector.pick(shard, ok)).index
        elif any(r.index == pinned for r in ok):
            index = pinned
        else:
            return _GENERAL
        ba = {"shard_id": shard, "shardkit_role": REPLICA, "shardkit_replica": index}
        engine = cluster._engines.get((shard, REPLICA, index))
        try:
            if engine is None or cluster._map_misfit is not None or self.dispatch.do_orm_execute:
                return Session.execute(self, statement, params,
                                       execution_options=execution_options or _load_options(shard),
                                       bind_arguments=ba)
            # What Session.execute() and get_bind() would do, one call each the shorter:
            # the node is chosen (its engine made), and no do_orm_execute listener is
            # there for _execute_internal() to check after; nor is there anything for the
            # ORM's autoflush to flush (as checked above).
            ba["shardkit_engine"] = engine
            return _session_execute_internal(
                self, statement, params, bind_arguments=ba,
                execution_options=execution_options or _PLAIN_LOAD_OPTIONS.get(shard)
                or _load_options(shard, autoflush=False))
        except (ShardUnavailable, sa_exc.DBAPIError) as e:
            if not self._replica_read_failed(shard, index, e):
                raise
            self._unpin_failed(shard, index, pinned is None)
            log.warning("read on %s/r%d failed, retrying elsewhere: %s", shard, index, str(e))
            return self._read_on(shard, statement, params, execution_options or util.EMPTY_DICT,
                                 None, {}, NO_SCOPE, {index})

    def _short_path_open(self, statement: Any, params: Any) -> bool:
        """Whether a SELECT may take a short path (_plain_read, get()'s load in execute()): no
        scope, nothing to flush, no savepoint or two-phase transaction, no FOR UPDATE,
        no shard named by an option, one parameter set at most.  The general path
        checks the same things one by one."""
        # (identity_map.check_modified() and in_nested_transaction(), without the calls.)
        if (self.twophase or _scope_var.get() is not NO_SCOPE
                or (params is not None and type(params) is not dict)
                or statement._for_update_arg is not None
                or self._new or self._deleted or self.identity_map._modified
                or self._nested_transaction is not None or self._flushing or self._sk_for_write):
            return False
        for opt in statement._with_options:
            if isinstance(opt, horizontal_shard.set_shard_id):
                return False
        return True

    def _primary_read(self, shard: str, statement: Any, params: Any,
                      execution_options: Any = None) -> Any:
        """A short path's read (_plain_read, get()'s load in execute()) on the primary of
        ``shard``, a shard without replicas, as the general path would make it.
        ``execution_options``: get()'s (its load options); None for a plain SELECT (or get()'s
        load with no options but the shard), which gets the shard's load options, without the
        ORM's autoflush (nothing to flush: see _short_path_open) unless a do_orm_execute
        listener runs (one may add objects)."""
        cluster = self.cluster
        if cluster._map_misfit is not None or self.dispatch.do_orm_execute:
            return Session.execute(self, statement, params,
                                   execution_options=execution_options or _load_options(shard),
                                   bind_arguments={"shard_id": shard, "shardkit_role": PRIMARY})
        # What Session.execute(), _execute_internal() and get_bind() would do, three calls
        # the shorter (as _plain_read's replica read): get_bind()'s checks are made here (the
        # misfit above, the shard by the caller), with no do_orm_execute listener for
        # _execute_internal() to check after.
        if cluster._monitor is not None:  # (without one, nothing to refuse)
            self._refuse_primary_down(shard)
        engine = cluster._engines.get((shard, PRIMARY, 0)) or cluster.engine(shard, PRIMARY, 0)
        if execution_options is None:
            execution_options = _PLAIN_LOAD_OPTIONS.get(shard) or _load_options(shard, autoflush=False)
        return _session_execute_internal(
            self, statement, params, execution_options=execution_options,
            bind_arguments={"shard_id": shard, "shardkit_role": PRIMARY, "shardkit_engine": engine})

    def _read_on(self, shard: str, statement: Any, params: Any, execution_options: Any,
                 bind_arguments: Any, kw: Mapping[str, Any], sc: RoutingScope,
                 tried: set[int] | None = None) -> Any:
        """Run a read on the freshest-enough node of ``shard``, retrying elsewhere if a replica
        dies (``tried``: replicas this read already failed on)."""
        tried = set(tried or ())
        first_read = shard not in self._sk_replica
        while True:
            index = self._read_target(shard, statement, execution_options, sc, frozenset(tried))
            if index is None:
                eo, ba = _single(shard, PRIMARY, execution_options, bind_arguments, True)
                return Session.execute(self, statement, params, execution_options=eo,
                                       bind_arguments=ba, **kw)
            eo, ba = _single(shard, REPLICA, execution_options, bind_arguments, True)
            ba["shardkit_replica"] = index
            stream = self._transactional_read(statement, execution_options)
            if stream:
                ba["shardkit_stream"] = True
            try:
                return Session.execute(self, statement, params, execution_options=eo,
                                       bind_arguments=ba, **kw)
            except (ShardUnavailable, sa_exc.DBAPIError) as e:
                # Replica connections are in autocommit (a streamed read's transaction
                # has returned no rows yet), so no snapshot is lost by running the
                # read again elsewhere.
                if not self._replica_read_failed(shard, index, e, stream):
                    raise
                tried.add(index)
                self._unpin_failed(shard, index, first_read)
                log.warning("read on %s/r%d failed, retrying elsewhere: %s", shard, index, str(e))

    def _unpin_failed(self, shard: str, index: int, first_read: bool) -> None:
        """A read failed on replica ``index``.  If it was the transaction's first read of
        ``shard``, nothing was read from that replica yet: another may take its place."""
        if first_read and self._sk_replica.get(shard) == index:
            del self._sk_replica[shard]

    def _transactional_read(self, statement: Any, execution_options: Any) -> bool:
        """Whether a replica read needs a transaction on the replica: to stream through a
        server-side cursor, or to hold the SAVEPOINT of a begin_nested() it runs in."""
        return _streams(statement, execution_options) or self.in_nested_transaction()

    def _replica_read_failed(self, shard: str, index: int, error: BaseException,
                             stream: bool = False) -> bool:
        """Handle a read that failed on a replica; True if it is safe and useful to retry it
        elsewhere: the replica died (it is banned) or cancelled the read because replaying
        the primary's WAL conflicted with it (it is skipped for this read).  ``stream``: the
        read ran in a transaction (a server-side cursor), which the failure aborted."""
        if isinstance(error, ShardUnavailable):
            # The driver's first line, as a failed stream's ban says it (_translate_errors).
            why = first_line(error.cause if error.cause is not None else error)
            self.cluster.selector.monitor.ban(shard, index, f"read failed: {why}"[:200])
            self._forget_connection(shard, index)
            return True
        if getattr(getattr(error, "orig", None), "sqlstate", None) != _RECOVERY_CONFLICT:
            return False
        if stream:
            self._forget_connection(shard, index)
        return True

    def scalars(self, statement: Any, params: Any = None, *,
                execution_options: Any = util.EMPTY_DICT, bind_arguments: Any = None,
                **kw: Any) -> Any:
        return self.execute(statement, params, execution_options=execution_options,
                            bind_arguments=bind_arguments, **kw).scalars()

    def scalar(self, statement: Any, params: Any = None, *,
               execution_options: Any = util.EMPTY_DICT, bind_arguments: Any = None,
               **kw: Any) -> Any:
        return self.execute(statement, params, execution_options=execution_options,
                            bind_arguments=bind_arguments, **kw).scalar()

    # -- legacy bulk methods -------------------------------------------------------------
    # horizontal_shard does not support them (they raise NotImplementedError); here
    # they are the 2.0-style bulk statements, which split rows by shard.

    def bulk_insert_mappings(self, mapper: Any, mappings: Iterable[Mapping[str, Any]],
                             return_defaults: bool = False, render_nulls: bool = False) -> None:
        """Insert rows given as dicts of attribute values, each on the shard that owns it.

        Same as ``session.execute(insert(Model), mappings)``.  ``return_defaults``
        is not supported (use ``add_all()`` to get generated values back).
        """
        if return_defaults:
            raise RoutingError("bulk_insert_mappings(return_defaults=True) is not supported by "
                               "ShardedSession; add the objects with session.add_all()")
        rows = [dict(m) for m in mappings]
        if rows:
            # (A None leaves the column to its default unless render_nulls, as in SQLAlchemy.)
            # (Without a flush first, as SQLAlchemy's legacy bulk methods.)
            self.execute(sa_insert(inspect(mapper).mapper), rows,
                         execution_options={"render_nulls": True, "autoflush": False} if render_nulls
                         else _NO_AUTOFLUSH)

    def bulk_update_mappings(self, mapper: Any, mappings: Iterable[Mapping[str, Any]]) -> None:
        """Update rows by primary key, given as dicts of attribute values, each on its shard.

        Same as ``session.execute(update(Model), mappings)``: every dict carries the
        primary key and the shard key.
        """
        rows = [dict(m) for m in mappings]
        if rows:
            _orm_bulk_update(self, inspect(mapper).mapper, rows, autoflush=False)

    def bulk_save_objects(self, objects: Iterable[Any], return_defaults: bool = False,
                          update_changed_only: bool = True, preserve_order: bool = True) -> None:
        """Insert new objects and update persistent ones, in bulk, each on its shard.

        As in SQLAlchemy, the objects are not attached to the session and get no
        generated values back.  ``return_defaults`` is not supported.
        """
        if return_defaults:
            raise RoutingError("bulk_save_objects(return_defaults=True) is not supported by "
                               "ShardedSession; add the objects with session.add_all()")
        batches: list[tuple[Any, bool, list[dict[str, Any]]]] = []
        # mapper -> the attributes an update row always carries: primary and shard key
        identifying: dict[Any, list[str]] = {}
        for obj in objects:
            state = inspect(obj)
            mapper = state.mapper
            is_insert = state.key is None
            if is_insert:
                row = {p.key: state.dict[p.key] for p in mapper.column_attrs if p.key in state.dict}
            else:
                keys = identifying.get(mapper)
                if keys is None:
                    key_columns = self.cluster.router.table_route(mapper).key_columns
                    keys = identifying[mapper] = [
                        p.key for p in mapper.column_attrs
                        if p.columns[0] in mapper.primary_key or p.columns[0].name in key_columns
                        or p.columns[0] is mapper.version_id_col]
                row = {k: getattr(obj, k) for k in keys}
                _refuse_bulk_key_move(self.cluster, mapper, state, obj)
                for p in mapper.column_attrs:
                    if p.key in state.dict and p.key not in row and (
                            not update_changed_only or state.attrs[p.key].history.has_changes()):
                        row[p.key] = state.dict[p.key]
            if batches and batches[-1][0] is mapper and batches[-1][1] == is_insert:
                batches[-1][2].append(row)
            else:
                batches.append((mapper, is_insert, [row]))
        if not preserve_order:
            batches.sort(key=lambda b: (id(b[0]), b[1]))
        for mapper, is_insert, rows in batches:
            if is_insert:
                try:
                    self.bulk_insert_mappings(mapper, rows)
                except ShardKeyError as e:
                    e.add_note(
                        "(bulk_save_objects() runs no mapper listeners, as in SQLAlchemy: a key a "
                        "before_insert listener would set is not set; nor does it make a key from "
                        "the column's default or a parent relationship before the shard is chosen. "
                        "Set the key on each object, or session.add_all() them)")
                    raise
            else:
                # (Each object's row is the one of its primary key on its shard, whose
                # key it may change: see _refuse_bulk_key_move.)
                _orm_bulk_update(self, mapper, rows, key_names_row=False, autoflush=False)

    def commit(self) -> None:
        """Commit every shard's transaction, one after another (see :class:`CommitError`).

        A commit that fails on one shard after another shard committed raises
        :class:`~shardkit.CommitError` naming the shards that committed, the one that
        failed and the ones rolled back; the session keeps read-your-writes for the
        shards that committed.  A commit that fails before any shard committed raises
        the original error, as a plain Session does.  A shard the transaction only read
        from whose connection is lost at its COMMIT does not fail the commit (nothing was
        written there): that connection is discarded with a warning and the other shards
        commit, as a replica's connection is.

        With ``twophase=True``, a commit that fails once every shard has prepared is
        finished: each shard's prepared transaction is committed (on a new connection
        where the session's has failed), and commit() returns.  A shard that cannot be
        reached keeps its transaction prepared: :class:`~shardkit.CommitError` then names
        it and its transaction id (commit it with ``COMMIT PREPARED`` when it is back)."""
        start = next(_COMMIT_SEQ)
        outer, self._sk_committing = self._sk_committing, True
        try:
            Session.commit(self)
        except CommitError:
            raise
        except Exception as e:
            trans = self.get_transaction()
            if trans is not None and trans._state is SessionTransactionState.COMMITTED:
                # Every shard committed; an after_commit listener raised: its error, as a
                # plain Session gives it (no shard failed, nothing is left to finish).
                raise
            if self.twophase:
                if _finish_twophase(self, e):
                    return
                prepare_error = e.__context__
                if (isinstance(e, sa_exc.DBAPIError) and isinstance(prepare_error, sa_exc.DBAPIError)
                        and getattr(e.orig, "sqlstate", None) == "42704"):
                    # A shard's PREPARE TRANSACTION failed (a deferred constraint, prepared
                    # transactions disabled): psycopg takes it as prepared, so SQLAlchemy's
                    # rollback sent ROLLBACK PREPARED, which failed ("prepared transaction
                    # ... does not exist").  The PREPARE's error is the one that says why.
                    raise prepare_error from None
                raise
            lost = _finish_past_lost_readers(self, e)
            if lost is None:
                return
            error = _partial_commit(self, start, lost)
            if error is None:
                if lost is e:
                    raise
                raise lost from e
            raise error from lost
        finally:
            self._sk_committing = outer

    def begin(self, nested: bool = False) -> SessionTransaction:
        """:meth:`Session.begin`; the transaction it begins commits as :meth:`commit` does
        when ``with session.begin():`` (or ``sessionmaker.begin()``) ends.  (One begun
        by the session's first statement ends by commit() anyway: nothing to do there,
        on every read.)"""
        if not nested and self._transaction is None:
            return _ShardedTransaction(self, SessionTransactionOrigin.BEGIN)
        trans = super().begin(nested)
        if nested:
            # The shards written before the savepoint (see _savepoint_rolled_back).
            trans._sk_written_before = frozenset(self._sk_written)  # type: ignore[attr-defined]
        return trans

    def connection_for_shard(self, shard: str) -> Any:
        """The session's connection to ``shard``'s primary (joining the session's transaction).

        shardkit cannot see what runs on it, so it assumes a write: for the rest of
        the transaction the session reads ``shard`` from its primary, and the
        commit records the shard's position for read-your-writes.
        """
        return self.connection(bind_arguments={"shard_id": shard})

    def flush(self, objects: Any = None) -> None:
        """Flush as :meth:`sqlalchemy.orm.Session.flush` does.

        With a catalog, an object loaded from a shard that has since given its
        bucket away (a move) is not written there: an UPDATE or DELETE of it that
        matches no row raises :class:`~shardkit.NotOwned` (nothing is written),
        not :class:`~sqlalchemy.orm.exc.StaleDataError` or a lost DELETE.
        """
        if self._flushing:  # a flush inside a flush: SQLAlchemy refuses it
            super().flush(objects)
            return
        # (Session.flush()'s _is_clean(), without the calls: an autoflush, before every
        # query, mostly finds nothing to flush, and Session.flush() then returns at once.)
        if not (self._new or self._deleted or self.identity_map._modified):
            return
        named = current_scope().shard
        if named is not None and named not in self.cluster.router.shard_set:
            # (Objects with their key are written on its shard, whatever the scope names:
            # the typo would never be reported.)
            raise RoutingError(f"unknown shard {named!r} (named by scope(shard=...)); shards: "
                               f"{', '.join(self.cluster.shard_names)}")
        self._sk_flush_conns = {}
        try:
            if self.cluster.catalog is None:
                super().flush(objects)
            else:
                # Taken before: a failed flush expires what it tried to write.
                self._sk_placements = _placements(self)
                _SHORT_WRITE.set(False)
                try:
                    super().flush(objects)
                except orm_exc.StaleDataError as e:
                    _SHORT_WRITE.set(False)
                    _refuse_misplaced(self, self._sk_placements, e)
                    raise
                finally:
                    self._sk_placements = None
        except sa_exc.DBAPIError as e:
            if self.cluster.config.reference_tables:
                _note_reference_write_failed_first(self, e)
            raise
        finally:
            self._sk_flush_conns = None
            written, self._sk_ref_written = self._sk_ref_written, None
        if written:  # (set by _replicate_reference_rows: a flush writing no reference row skips it)
            _expire_other_reference_objects(self, written)

    def connection(self, bind_arguments: Any = None, execution_options: Any = None) -> Any:
        """As :meth:`sqlalchemy.orm.Session.connection`, for the shard named by
        ``bind_arguments={"shard_id": ...}`` (or by the mapper, instance or scope).

        shardkit cannot see what runs on a connection to a primary, so it assumes a
        write, as :meth:`connection_for_shard` does.
        """
        conn = Session.connection(self, bind_arguments=bind_arguments, execution_options=execution_options)
        shard = _primary_shard(conn)
        if shard is not None:
            self._sk_written.add(shard)
        return conn


def _check_listener_changes(session: ShardedSession, routed: Any, state: ORMExecuteState) -> None:
    """Refuse what the application's do_orm_execute listeners changed after shardkit routed
    ``routed``: shardkit's execution options (the statement's shards are chosen already),
    a lock (FOR UPDATE) added to a read routed to a replica, and with_loader_criteria()
    that cannot run shard by shard (see Router.criteria_problem)."""
    named = sorted(k for k in state._update_execution_options if k.startswith("shardkit_"))
    if named:
        raise RoutingError(
            f"a do_orm_execute listener set {', '.join(named)}: shardkit has routed the "
            "statement before the listeners run, so this would be ignored; set it on the "
            "statement (stmt.execution_options(...)), in session.execute(..., "
            "execution_options={...}), or with shardkit.scope(...)", statement=routed)
    statement = state.statement
    if (statement is not routed and getattr(statement, "_for_update_arg", None) is not None
            and getattr(routed, "_for_update_arg", None) is None
            and state.bind_arguments.get("shardkit_role") == REPLICA):
        # A replica cannot lock rows (PostgreSQL refuses FOR UPDATE in recovery).
        raise RoutingError(
            f"a do_orm_execute listener added FOR UPDATE/FOR SHARE to a read that shardkit had "
            f"routed to a replica of shard {state.bind_arguments.get('shard_id')}, which cannot "
            "lock rows: shardkit routes the statement before the listeners run. Lock on the "
            "statement itself (select(...).with_for_update(), read on the primary), or read it "
            "on the primary: execution_options(shardkit_role='primary') or "
            "shardkit.scope(role='primary')", statement=routed)
    options = getattr(statement, "_with_options", ())
    if statement is routed or not options:
        return
    before = {id(o) for o in getattr(routed, "_with_options", ())}
    added = [o for o in options if id(o) not in before and getattr(o, "_is_criteria_option", False)]
    problem = added and session.cluster.router.criteria_problem(added)
    if problem:
        raise ScatterRefused(
            f"{problem} (added by a do_orm_execute listener); shardkit runs a statement on each "
            "shard over that shard's rows, which would quietly give a different answer than one "
            "database. Correlate the criteria on the shard key, or read the other group's "
            "values first and pass them as a list (tenant_id IN [...])",
            construct="statement not colocated on the shard key", statement=routed)


# The execution options that name a shard (shardkit's, Query.set_shard()'s, SQLAlchemy's
# identity token), in the order a get() reads them.
_SHARD_NAMES = ("shardkit_shard", "_sa_shard_id", "identity_token")


def _with_session_options(session_wide: Any, statement: Any, given: Any) -> Any:
    """A session's execution options under the statement's own and those ``given`` to the
    call, as Session._execute_internal merges them.  The options that name a shard are one
    option: a statement or call naming its shard by any of them overrides the session's."""
    # (For an eager load, the options of the statement it loads for, the session's under
    # them already, are the load's own, as per statement.)
    own = _own_options(statement, given)
    base = {k: v for k, v in session_wide.items() if k not in own} if own else session_wide
    if any(opts and any(opts.get(n) is not None for n in _SHARD_NAMES) for opts in (own, given)):
        base = {k: v for k, v in base.items() if k not in _SHARD_NAMES}
    return util.immutabledict(base).union(given) if given else util.immutabledict(base)


def _named_shard(options: Any, execution_options: Any, bind_arguments: Any) -> str | None:
    """The shard a get() names: ``set_shard_id(...)`` among its options,
    ``bind_arguments={"shard_id": ...}``, or the ``shardkit_shard``, ``_sa_shard_id``
    (``Query.set_shard()``) or ``identity_token`` execution option; None if none does."""
    for opt in options or ():
        if isinstance(opt, horizontal_shard.set_shard_id):
            return opt.shard_id  # type: ignore[no-any-return]
    if bind_arguments and bind_arguments.get("shard_id") is not None:
        return bind_arguments["shard_id"]  # type: ignore[no-any-return]
    if execution_options:
        for name in _SHARD_NAMES:
            if execution_options.get(name) is not None:
                return execution_options[name]  # type: ignore[no-any-return]
    return None


# SQLAlchemy's load by primary key (Session.get()'s, Query.get()'s); 2.0 names it without _.
_LOAD_ON_PK = getattr(loading, "_load_on_pk_identity", None) or loading.load_on_pk_identity


class _Built(Exception):
    """_get_load(): the statement SQLAlchemy's load by primary key was about to run."""


class _StatementOnly(Session):
    """The session _get_load() asks for a get(): it keeps the statement the load would run,
    and its parameters, rather than run them."""

    def execute(self, statement: Any, params: Any = None, *, execution_options: Any = None,
                bind_arguments: Any = None, **kw: Any) -> Any:
        raise _Built(statement, params, execution_options, bind_arguments)


def _get_load(mapper: Any, scalar: Any) -> tuple[Any, str] | None:
    """For get() of a one-column primary key that is the shard key (``scalar``): the
    statement SQLAlchemy's load by primary key (_LOAD_ON_PK) runs for a get() with no
    options, as SQLAlchemy builds it (a session that keeps what it is asked to run is asked
    for a get()), and the name of its parameter; None if that load is not the simple one
    expected.

    SQLAlchemy builds that statement anew on every get(), and works out its cache key
    again; one statement, kept, has its cache key worked out once."""
    if scalar is None or len(mapper.primary_key) != 1 or mapper.always_refresh:
        return None
    try:
        _StatementOnly().get(mapper, scalar[0]())  # (0 or "": a value of the key's type)
    except _Built as built:
        statement, params, execution_options, bind_arguments = built.args
    except Exception:  # (a load of another shape: get() takes SQLAlchemy's own way)
        return None
    else:
        return None
    if (type(statement) is not _Select or not isinstance(params, dict) or len(params) != 1
            or bind_arguments or set(execution_options) != {"_sa_orm_load_options"}
            or execution_options["_sa_orm_load_options"] is not QueryContext.default_load_options):
        return None
    (name,) = params
    return statement, name


@contextlib.contextmanager
def _one_shard_per_identity(entity: Any, ident: Any) -> Iterator[None]:
    """A get() by a primary key without the shard key, which found the key on several shards."""
    try:
        yield
    except sa_exc.MultipleResultsFound:
        raise _on_several_shards(entity, ident) from None


def _refuse_held_on_several_shards(session: ShardedSession, mapper: Any, ident: Any) -> None:
    """get() by a primary key without the shard key, which the session holds from several
    shards (read by a query, or left by a get() that found it on both): horizontal_shard's
    identity lookup would give the first shard's object.  (Reference rows, the same on
    every shard, are not refused.)"""
    try:
        if session.cluster.router.table_route(mapper).strategy is None:
            return
    except RoutingError:
        return
    pk = _pk_values(mapper, ident)
    held = [s for s in session.cluster.shard_names
            if mapper.identity_key_from_primary_key(pk, identity_token=s) in session.identity_map]
    if len(held) > 1:
        raise _on_several_shards(mapper.class_, ident, held)


def _pk_values(mapper: Any, primary_key: Any) -> Sequence[Any]:
    """A primary key as get() takes it (a value, a tuple or list, or a dict keyed by
    attribute name), as the sequence of its columns' values."""
    if isinstance(primary_key, (tuple, list)):
        return primary_key
    if isinstance(primary_key, dict):
        # session.get(Model, {"region": ..., "id": ...}): keyed by attribute name.
        return tuple(primary_key.get(mapper.get_property_by_column(c).key) for c in mapper.primary_key)
    return (primary_key,)


def _on_several_shards(entity: Any, ident: Any, shards: Sequence[str] = ()) -> RoutingError:
    """The refusal of a get() by a primary key that rows (or objects held) of several
    shards have."""
    name = getattr(entity, "__name__", None) or getattr(getattr(entity, "class_", None), "__name__", entity)
    held = f" (this session holds it from {', '.join(shards)})" if shards else ""
    return RoutingError(
        f"{name} with primary key {ident!r} exists on more than one shard{held} (its primary "
        "key does not contain the shard key, and is unique only per shard); name the shard: "
        "session.get(..., identity_token='s0') or shardkit.scope(shard='s0')")


def _pk_plan(router: Router, mapper: Any) -> Any:
    """Where the shard key sits inside the primary key of ``mapper``, or False."""
    try:
        tr = router.table_route(mapper)
    except RoutingError:
        return False
    if tr.strategy is None:
        return False
    pk_names = [c.name for c in mapper.primary_key]
    if not all(c in pk_names for c in tr.key_columns):
        return False
    table = mapper.local_table
    positions = tuple(pk_names.index(c) for c in tr.key_columns)
    placing = tuple(coercer_for(column_named(table.c, c).type) for c in tr.key_columns)
    # (get() compares the key: a float with an unscaled numeric key as a float8.)
    coercers = tuple(read_coercer(co) for co in placing)
    # (The same tuple when they agree: ShardedSession._shard_from_identity's ``held`` asks.)
    return positions, coercers if coercers != placing else placing, tr.strategy, placing


def _pk_plan_for(router: Router, mapper: Any) -> Any:
    """:func:`_pk_plan` of ``mapper``, kept in ``router.pk_plans``."""
    plan = router.pk_plans.get(mapper)
    if plan is None:
        plan = router.pk_plans[mapper] = _pk_plan(router, mapper)
    return plan


def _scalar_key_plan(router: Router, mapper: Any) -> tuple[type, Any] | None:
    """For get() (see ShardedSession._get_impl): when the shard key of ``mapper`` is one
    column, the first of its primary key, and its coercer gives a value of the column's
    Python type back as it is, (that type, the key's strategy); else None."""
    plan = _pk_plan_for(router, mapper)
    if plan is False or plan[0] != (0,):
        return None
    co = plan[1][0]
    # (a varchar(n) key's coercer cuts a value's excess blanks, which only a write needs)
    exact = {_to_int: int, _to_str: str}.get(co) or getattr(co, "reads_as", None)
    return None if exact is None else (exact, plan[2])


def shard_of_instance(cluster: Cluster, mapper: Any, instance: Any) -> str:
    """The shard an ORM instance belongs to, from its own key or its parent's."""
    state = inspect(instance)
    mapper = state.mapper
    router = cluster.router
    try:
        tr, keys = router.instance_keys[mapper]
    except KeyError:
        tr, keys = _instance_keys(router, mapper)
    if tr.strategy is None:
        # Reference rows are written to one shard by the flush and copied to
        # the others after it (see _replicate_reference_rows).
        return cluster.shard_names[0]
    values = []
    for attr, col, co in keys:
        v = state.dict.get(attr)
        if v is None:
            v = _key_from_reference_parent(cluster, mapper, state, col.name)
        if v is None:
            parent_shard = _shard_from_parent(cluster, mapper, state, col.name)
            if parent_shard is not None:
                return parent_shard
            # (A default is for a new row: an object with an identity whose key is not
            # loaded, as merge(load=False) may be given, has its row's key, not a new one.)
            v = _python_default(col) if state.key is None else None
            if v is None:
                raise ShardKeyError(
                    f"{type(instance).__name__} has no value for shard key {tr.table}.{col.name}; set "
                    f"{attr} (or its parent relationship) before flushing, or give the column "
                    "a Python default of no arguments (default=uuid.uuid4): a value made at the "
                    "INSERT (a serial, identity or server default, a SQL expression, a default "
                    "that takes the execution context) comes after the shard is chosen"
                    + ("; so does a key set by a before_insert listener, which runs after the "
                       "shard is chosen: set it in a before_flush listener instead"
                       if state.key is None and mapper.dispatch.before_insert else ""),
                    table=tr.table,
                )
            # The key a Python-side default makes (default=uuid.uuid4): made now, as the
            # caller would have, so the row goes where that key belongs.
            setattr(instance, attr, v)
        values.append(co(v) if co else v)
    key = values[0] if len(values) == 1 else tuple(values)
    try:
        return tr.strategy.shard_for_key(key)
    except RoutingError as e:
        if e.table is None:
            e.table = tr.table
        raise


def _instance_keys(router: Any, mapper: Any) -> tuple[Any, tuple[tuple[str, Any, Any], ...]]:
    """``mapper``'s table route and, per shard key column, (the attribute that holds it,
    the column, its coercer), kept in ``router.instance_keys``; raises RoutingError for a
    mapper whose objects cannot be placed (not kept: the error is made each time)."""
    problem = router.hierarchy_problem(mapper)
    if problem is not None:
        raise RoutingError(problem, table=mapper.local_table.name)
    tr = router.table_route(mapper)
    table = mapper.local_table
    keys = []
    for cname in tr.key_columns:
        col = column_named(table.c, cname)
        keys.append((mapper.get_property_by_column(col).key, col, coercer_for(col.type)))
    router.instance_keys[mapper] = found = (tr, tuple(keys))
    return found


def _python_default(column: Any) -> Any:
    """The value ``column``'s Python-side INSERT default makes, when it needs no execution
    context (a scalar, or a callable of no arguments such as ``uuid.uuid4``), else None."""
    d = column.default
    if d is None or d.for_update or d.is_sequence:
        # (A Sequence, Sequence("ids") beside the type, is the database's, as a serial.)
        return None
    if d.is_scalar:
        return d.arg
    # SQLAlchemy wraps a callable of no arguments in one that takes (and ignores) the
    # execution context (2.1 keeps the callable as _fn, 2.0 as the wrapper's __wrapped__);
    # one that takes the context is kept as given.
    fn = getattr(d, "_fn", None) or getattr(d.arg, "__wrapped__", None)
    if d.is_callable and fn is not None and d.arg is not fn:
        return fn()
    # 2.0 keeps no __wrapped__ for a callable without __name__ (functools.partial, an object
    # with __call__): its wrapper, which ignores the context, is known by its own name.
    if d.is_callable and getattr(d.arg, "__qualname__", "").startswith(
            "CallableColumnDefault._maybe_wrap_callable."):
        return d.arg(None)
    return None


def _own_key_shard(cluster: Cluster, state: Any) -> str | None:
    """The shard of a sharded table's object by its key (or its parent's), or None (a
    reference table, or not placeable: where the object goes, its flush says)."""
    try:
        if cluster.router.table_route(state.mapper).strategy is None:
            return None
        return shard_of_instance(cluster, state.mapper, state.obj())
    except ShardkitError:
        return None


def _shard_from_parent(cluster: Cluster, mapper: Any, state: Any, column: str) -> str | None:
    # A new child whose key column is filled from its parent during the flush
    # (order.user = user) follows the parent's shard.
    for rel in mapper.relationships:
        if rel.direction is not MANYTOONE:
            continue
        if column not in {c.name for c in rel.local_columns}:
            continue
        parent = state.dict.get(rel.key)
        if parent is None or _is_reference(cluster.router, inspect(parent).mapper):
            continue
        return _shard_of_related(cluster, parent)
    return None


def _key_from_reference_parent(cluster: Cluster, mapper: Any, state: Any, column: str) -> Any:
    """The value a many-to-one relationship to a reference row will copy into the key
    column ``column`` at flush (shop.region = eu_region): a reference row is on every
    shard, so the key routes by that value, not by where the row was read."""
    for rel in mapper.relationships:
        if rel.direction is not MANYTOONE:
            continue
        parent = state.dict.get(rel.key)
        if parent is None:
            continue
        pmapper = inspect(parent).mapper
        if not _is_reference(cluster.router, pmapper):
            continue
        for local, remote in rel.local_remote_pairs:
            if local.name == column:
                try:
                    return pmapper._get_state_attr_by_column(
                        inspect(parent), inspect(parent).dict, remote)
                except Exception:  # noqa: BLE001 - not loaded: the flush fills it in
                    return None
    return None


def _shard_of_related(cluster: Cluster, obj: Any) -> str:
    """The shard of an object a relationship points to: where it is, or (pending) where its key goes."""
    state = inspect(obj)
    if state.key is not None:
        return state.key[2]
    shard = shard_of_instance(cluster, state.mapper, obj)
    state.identity_token = shard
    return shard


_REFERENCE_READ = util.immutabledict({"shardkit_reference_read": True})

# SQLAlchemy's ORM bulk UPDATE (BulkORMUpdate in 2.0, _BulkORMUpdate since 2.1): its
# synchronization of the session's objects after a bulk UPDATE by primary key.
_BulkORMUpdate: Any = getattr(bulk_persistence, "_BulkORMUpdate", None) or getattr(
    bulk_persistence, "BulkORMUpdate")


def _locked_reference_rows_on_first(cluster: Cluster, statement: Any, params: Any,
                                    route: Route) -> Route:
    """The route of a locking read (FOR UPDATE / FOR SHARE): reference rows are locked on
    one shard for every session, the first (where session.get() looks first, and where an
    UPDATE/DELETE statement of every copy, and an object's flush, begins), so that two
    sessions locking a row exclude each other as on one database.  The shard a transaction
    reads them from otherwise takes turns between transactions, and an object's refresh
    reads the shard it was read from."""
    first = cluster.shard_names[0]
    if route.shards == (first,):
        return route
    if not route.anywhere:
        if len(route.shards) != 1:
            return route
        try:  # a shard named for it (an object's refresh): does it read reference rows alone?
            if not cluster.router.route(statement, params).anywhere:
                return route
        except ShardkitError:
            return route
    return dataclasses.replace(route, shards=(first,))


def _is_reference(router: Any, mapper: Any) -> bool:
    try:
        return bool(router.table_route(mapper).is_reference)
    except RoutingError:
        return False


def _from_reference(statement: Any, execution_options: Any) -> bool:
    """Whether a load follows from reference rows (read from any one shard): the
    identity_token or bind arguments it inherited from that read are not a pin."""
    if execution_options and execution_options.get("shardkit_reference_read"):
        return True
    own = getattr(statement, "_execution_options", None)
    return bool(own and own.get("shardkit_reference_read"))


def _explicit_shard(statement: Any, execution_options: Any, bind_arguments: Any,
                    sc: RoutingScope, router: Any = None) -> str | None:
    """A shard named by the caller, or implied by the object a load is for."""
    for opt in getattr(statement, "_with_options", ()):
        if isinstance(opt, horizontal_shard.set_shard_id):
            return opt.shard_id
    if bind_arguments and bind_arguments.get("shard_id") is not None:
        if not (bind_arguments.get("shardkit_role") and _from_reference(statement, execution_options)):
            return bind_arguments["shard_id"]
    lazy_reference = False
    # The call's execution options, then the statement's own (eager loaders such
    # as subqueryload copy their parent load's options onto their statement).
    for opts in (execution_options, getattr(statement, "_execution_options", None)):
        if not opts:
            continue
        # Loads the ORM issues for one object (get, refresh, lazy and deferred
        # loads), and a shard's part of a load, carry the shard in their load options.
        lo = opts.get("_sa_orm_load_options")
        if lo is not None:
            lazy_from = lo._lazy_loaded_from
            if lazy_from is not None and router is not None and _is_reference(router, lazy_from.mapper):
                # What a reference row (read from any one shard) relates to: the
                # statement is routed by what it says (the sharded rows of a
                # collection live on every shard).
                lazy_reference = True
            elif lo._identity_token is not None and not (
                    lo._refresh_state is None and _from_reference(statement, execution_options)):
                return lo._identity_token
            elif lazy_from is not None and (token := _shard_of_state(lazy_from)) is not None and (
                    router is None or _lazy_load_follows(router, statement, lazy_from)):
                return token
        uo = opts.get("_sa_orm_update_options")
        if uo is not None and uo._identity_token is not None:
            return uo._identity_token
        # identity_token: the shard loaded objects are said to come from (SQLAlchemy's option);
        # not a pin when it was inherited from a read of reference rows (a subqueryload).
        # (Not `or`: a falsy name, 0 or "", would be dropped, and the read run on every shard.)
        shard = opts.get("shardkit_shard")
        if shard is None:
            shard = opts.get("_sa_shard_id")
        if shard is None and opts.get("identity_token") is not None and not lazy_reference \
                and not _from_reference(statement, execution_options):
            shard = opts["identity_token"]
        if shard is not None:
            return shard
    return sc.shard


def _shard_of_state(state: Any) -> str | None:
    """The shard of an object a lazy load is for: its identity key's (an object attached by
    merge(load=False) or make_transient_to_detached() has no identity_token, only the
    key), or while it is pending the one chosen for it."""
    key = state.key
    return key[2] if key is not None else state.identity_token


def _post_load_route(router: Any, route: Route, statement: Any, execution_options: Any) -> Route:
    """``route``, or for a selectinload() (or selectin_polymorphic) that no shard key routes
    (it would read every shard), the shard of the objects it loads for when every
    relationship on its path from the top-level statement's entity is colocated (the
    shard that statement read them on).  It selects by their primary keys, which may be
    unique per shard only: on every shard it would find every shard's rows of those
    keys, and the ORM would give them all to each object of the key, whatever its shard."""
    if len(route.shards) < 2 or route.keys or route.is_write or not execution_options:
        return route
    ctx = execution_options.get("sa_top_level_orm_context")
    shard = getattr(ctx, "identity_token", None)
    if shard is None or ctx.execution_options.get("shardkit_reference_read"):
        return route
    path = getattr(getattr(statement, "_compile_options", None), "_current_path", None)
    for prop in getattr(path, "path", ()):
        if isinstance(prop, RelationshipProperty) and not router.relationship_colocated(prop):
            return route
    return dataclasses.replace(route, shards=(shard,), kind="direct", split=None,
                               reason="the shard of the objects it loads for")


def _follows_object(router: Any, target: Any, parent: Any) -> bool:
    """Whether the rows of ``target`` (a mapper) that an object of ``parent`` relates to
    live on that object's shard, so that a lazy load of them runs there (and an object
    whose bucket moved since it was loaded refuses it, see ``_refuse_moved_load``):
    every relationship from ``parent`` to ``target`` is colocated
    (:meth:`Router.relationship_colocated`).  Other related rows (another group's, or
    the same group's joined on another column, as a user's referrer) may be on any
    shard: their load is routed by its statement."""
    if target is None:
        return True
    key = (parent, target)
    known = router.lazy_pins.get(key)
    if known is None:
        rels = [r for r in parent.relationships
                if r.mapper is target or target.isa(r.mapper) or r.mapper.isa(target)]
        if rels:
            known = all(router.relationship_colocated(r) for r in rels)
        else:  # (a load the ORM makes for no relationship of the parent: as before)
            known = True
        router.lazy_pins[key] = known
    return known


def _lazy_load_follows(router: Any, statement: Any, lazy_from: Any) -> bool:
    """Whether a lazy load's rows are on the shard of the object it loads for: by the
    relationship it loads (the ORM names it in the statement's path), else by every
    relationship between the two classes (:func:`_follows_object`)."""
    path = getattr(getattr(statement, "_compile_options", None), "_current_path", None)
    prop = getattr(path, "prop", None)
    if isinstance(prop, RelationshipProperty) and lazy_from.mapper.isa(prop.parent):
        return router.relationship_colocated(prop)
    return _follows_object(router, _loaded_mapper(statement), lazy_from.mapper)


def _loaded_mapper(statement: Any) -> Any:
    """The mapper of the entity an ORM SELECT loads (None for anything else)."""
    subject = getattr(statement, "_propagate_attrs", {}).get("plugin_subject")
    return getattr(subject, "mapper", None)


def _loads_for_object(statement: Any, execution_options: Any) -> bool:
    """Whether an ORM SELECT loads attributes of one object already in the session (a
    refresh, an expired or deferred attribute) or what it relates to (a lazy load)."""
    if not isinstance(statement, (selectable.Select, FromStatement)):
        return False
    for opts in (execution_options, getattr(statement, "_execution_options", None)):
        lo = opts.get("_sa_orm_load_options") if opts else None
        if lo is not None and (lo._refresh_state is not None or lo._lazy_loaded_from is not None):
            return True
    return False


_ROLES = (PRIMARY, REPLICA)
# ShardedSession._plain_read: not that read (and not routed); execute() takes its general path.
_GENERAL: Final = object()
_Select = selectable.Select
# In ShardedSession._sk_replica: the transaction reads this shard on its primary.
_ON_PRIMARY: Final = -1
# What a hot standby raises when it cancels a query that conflicts with replay
# ("canceling statement due to conflict with recovery").
_RECOVERY_CONFLICT = "40001"
# A consistency token no replica reaches: the shard's reads use the primary.
_UNKNOWN_POSITION: Final = 2**64 - 1


def _bad_option(name: str, value: Any, allowed: Iterable[str]) -> None:
    raise sa_exc.ArgumentError(
        f"execution option {name}={value!r} is not valid; use one of "
        f"{', '.join(repr(a) for a in allowed)}")


def _read_options(opt: Callable[[str], Any]) -> tuple[Any, Any, Any, Any]:
    """A read's replica options (role, consistency, max lag seconds, max lag bytes; None
    where not given) from ``opt`` (see _options), checked: ArgumentError for a bad one."""
    role = opt("shardkit_role")
    if role is not None and role not in _ROLES:
        _bad_option("shardkit_role", role, _ROLES)
    consistency = opt("shardkit_consistency")
    if consistency is not None and consistency not in CONSISTENCY_MODES:
        _bad_option("shardkit_consistency", consistency, CONSISTENCY_MODES)
    max_s = opt("shardkit_max_lag_seconds")
    if max_s is not None and (problem := lag_limit_problem("max_lag_seconds", max_s)):
        raise sa_exc.ArgumentError(f"execution option shardkit_{problem}")
    max_b = opt("shardkit_max_lag_bytes")
    if max_b is not None and (problem := lag_limit_problem("max_lag_bytes", max_b)):
        raise sa_exc.ArgumentError(f"execution option shardkit_{problem}")
    return role, consistency, max_s, max_b


def _checked_options(opt: Callable[[str], Any]) -> tuple[Any, Any, Any, Any]:
    """:func:`_read_options`, and the cross-shard options checked too, for every statement
    that has options: one that runs on a single shard today (its key, its scope) scatters
    tomorrow, and a bad value should not wait for that day.  (Once per statement, where it
    enters execution or explain(): not again per shard read.)"""
    out = _read_options(opt)
    strict, partial, every, timeout = (opt("shardkit_strict"), opt("shardkit_partial_results"),
                                       opt("shardkit_all_shards"), opt("shardkit_timeout"))
    if strict is None and partial is None and every is None and timeout is None:
        return out
    for name, value in zip(_SWITCHES, (strict, partial, every)):
        if value is not None and value is not True and value is not False:
            _bad_switch(name, value)
    if timeout is not None and _bad_timeout(timeout):
        raise sa_exc.ArgumentError(_timeout_message("execution option shardkit_timeout", timeout))
    return out


_SWITCHES: Final = ("shardkit_strict", "shardkit_partial_results", "shardkit_all_shards")


def _bad_timeout(timeout: Any) -> bool:
    """Whether ``timeout`` is not a scatter's per-shard timeout: a number above 0 (0 is not
    "no limit", as statement_timeout's is; a negative or NaN one would fail every shard at
    once as if none had answered)."""
    return (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
            or not 0 < timeout <= threading.TIMEOUT_MAX)


def _timeout_message(source: str, timeout: Any) -> str:
    return (f"{source}={timeout!r} is not valid: give the seconds each shard may take "
            "(an int or float above 0), or None for no limit")


def _option(name: str, statement: Any, execution_options: Any) -> Any:
    if execution_options and name in execution_options:
        return execution_options[name]
    stmt_opts = getattr(statement, "_execution_options", None)
    return stmt_opts.get(name) if stmt_opts else None


def _flag(name: str, statement: Any, execution_options: Any) -> bool:
    """A True/False execution option (False when not given); ArgumentError for another value:
    ``shardkit_all_shards="false"`` (a string from a setting, say) would be true."""
    value = _option(name, statement, execution_options)
    if value is None or value is False:
        return False
    if value is True:
        return True
    _bad_switch(name, value)


def _bad_switch(name: str, value: Any) -> NoReturn:
    raise sa_exc.ArgumentError(f"execution option {name}={value!r} is not valid; use True or False")


def _own_options(statement: Any, execution_options: Any) -> Any:
    """The statement's own execution options; for an eager load run for a statement
    (selectinload: ``sa_top_level_orm_context`` among ``execution_options``), under
    that statement's and its call's (its role, consistency, yield_per, shard apply to
    the load too, as the ORM applies them)."""
    own = getattr(statement, "_execution_options", None)
    ctx = execution_options.get("sa_top_level_orm_context") if execution_options else None
    if ctx is not None:
        top = ctx.query._execution_options.merge_with(ctx.execution_options)
        own = top.merge_with(own) if own else top
    return own


def _options(statement: Any, execution_options: Any) -> Callable[[str], Any]:
    """``name -> value`` over the execution options, then the statement's own (as :func:`_option`)."""
    stmt_opts = _own_options(statement, execution_options)
    if not execution_options:
        return stmt_opts.get if stmt_opts else _NO_OPTIONS.get
    if not stmt_opts:
        return execution_options.get
    return {**stmt_opts, **execution_options}.get


_NO_OPTIONS: Mapping[str, Any] = util.immutabledict()
_NO_AUTOFLUSH: Mapping[str, Any] = util.immutabledict({"autoflush": False})


def _autoflushes(statement: Any, execution_options: Any) -> bool:
    """Whether the ORM would autoflush before this statement (``autoflush=False`` as an
    execution option or through ``Query.autoflush(False)`` says no).  By the statement's
    and the call's options only: the ORM autoflushes before an eager load (selectinload)
    whatever the statement it loads for said (a short-path read's autoflush=False too)."""
    lo = _option("_sa_orm_load_options", statement, execution_options)
    return _option("autoflush", statement, execution_options) is not False and (lo is None or lo._autoflush)


def _streams(statement: Any, execution_options: Any) -> bool:
    """Whether a read fetches through a server-side cursor (``yield_per``, ``stream_results``,
    legacy ``Query.yield_per``)."""
    if not execution_options and not getattr(statement, "_execution_options", None):
        return False
    opt = _options(statement, execution_options)
    lo = opt("_sa_orm_load_options")
    return bool(opt("stream_results") or opt("yield_per") or (lo is not None and lo._yield_per))


def _route_statement(session: ShardedSession, statement: Any, params: Any,
                     execution_options: Any, bind_arguments: Any, sc: RoutingScope) -> Route:
    """Where a statement executed through the session runs, in scope ``sc``."""
    cluster = session.cluster
    if _option("shard_id", statement, execution_options) is not None:
        # Neither SQLAlchemy's horizontal_shard nor shardkit reads it: the statement would
        # run where its key (or every shard) says, not on the shard the caller meant.
        raise sa_exc.ArgumentError(
            "execution option shard_id= is not read (not by shardkit, nor by SQLAlchemy's "
            "horizontal_shard): name the shard with execution_options(shardkit_shard=...), "
            "bind_arguments={'shard_id': ...}, .options(set_shard_id(...)) or Query.set_shard(...)")
    shard = _explicit_shard(statement, execution_options, bind_arguments, sc, cluster.router)
    if shard is not None and (not isinstance(shard, str) or shard not in cluster.router.shard_set):
        # (Not str: a list would be a TypeError of the set.)
        # (Before the INSERT inside scope(shard=...) below, which routes keyed rows by key
        # and would otherwise never say that the scope names no shard.)
        raise RoutingError(
            f"unknown shard {shard!r}; shards: {', '.join(cluster.shard_names)}",
            statement=statement,
        )
    scoped_update = False
    if shard is not None and shard == sc.shard and isinstance(statement, UpdateBase) \
            and _explicit_shard(statement, execution_options, bind_arguments, NO_SCOPE, cluster.router) is None:
        # The shard comes from scope(shard=...) alone.
        if _writes_reference_table(cluster, statement):
            # A reference table is the same on every shard: the write still goes to all
            # of them (as an ORM flush's does).
            shard = None
        elif isinstance(statement, Insert):
            # An INSERT whose rows carry their shard key writes each row where its key
            # belongs, as the ORM's flush writes an object: on the scope's shard, a row of
            # another shard's key would be one that no read by key finds.  (Rows without
            # a key, and INSERT ... SELECT, run on the scope's shard.)
            try:
                return cluster.router.route(statement, params, keyless_to=shard)
            except CrossShardWriteError:
                if getattr(statement, "select", None) is None:
                    raise  # rows of several shards in one VALUES, or an upsert moving its key
            except (ShardKeyError, NoShardForKey):
                # A row whose key no shard can take (a value of another type, a key no
                # range or list value holds): refused as outside a scope, not the whole
                # statement run on the scope's shard with the other rows' keys ignored.
                raise
            except RoutingError:
                pass
        elif isinstance(statement, Update):
            # Likewise an UPDATE that sets the shard key: to another shard's key, the row
            # would stay on the scope's shard under a key that no read by key finds there
            # (refused, as outside a scope).
            scoped_update = True
    if shard is not None:
        if sc.shard is None and _loads_for_object(statement, execution_options):
            # A lazy, deferred or expired attribute's load, a refresh: the object's shard
            # is implied, not named by the caller, and the entity's check still holds.
            problem = cluster.router.entities_problem(statement)
            if problem is not None:
                raise ScatterRefused(f"cannot load {problem}", construct="statement not "
                                     "colocated on the shard key", statement=statement)
        if cluster.catalog is not None:
            _refuse_moved_load(session, shard, statement, execution_options)
        # A SELECT whose WITH inserts, updates or deletes writes: on the primary (a
        # replica refuses it), and the shard counts as written (reads and token after it).
        # (select(Model).from_statement(stmt) reads as the statement it wraps.)
        inner = unwrap_statement(statement)
        dml_cte = isinstance(inner, (selectable.Select, selectable.CompoundSelect)) and \
            cluster.router.data_modifying_with(inner)
        if dml_cte and shard == sc.shard and _explicit_shard(
                statement, execution_options, bind_arguments, NO_SCOPE, cluster.router) is None:
            # Named by scope(shard=...) alone, where a reference table's write goes to every
            # shard: one in a WITH would change the scope shard's copy alone.
            ref = next((e.element.table.fullname for e in data_modifying_ctes(inner)
                        if _writes_reference_table(cluster, e.element)), None)
            if ref is not None:
                raise CrossShardWriteError(
                    f"statement has a data-modifying WITH ({dml_cte}) that writes reference table "
                    f"{ref}: inside scope(shard={shard!r}) it would change that shard's copy alone "
                    "(a reference table's write goes to every shard). Run the INSERT/UPDATE/DELETE "
                    "... RETURNING as its own statement and use its rows",
                    table=ref, statement=statement)
        is_read = isinstance(inner, (selectable.Select, selectable.CompoundSelect)) and \
            getattr(inner, "_for_update_arg", None) is None and not dml_cte
        if not is_read and isinstance(inner, (TextClause, selectable.TextualSelect)) and \
                _option("shardkit_role", statement, execution_options) == REPLICA:
            # SQL text may write, so it runs on the primary as a write, unless the caller
            # forces it to a replica (which refuses a write): then it is a read there.
            is_read = True
        route = _NAMED.get((shard, is_read))
        if route is None:
            route = _NAMED.setdefault((shard, is_read), Route(
                (shard,), "direct", PRIMARY, "shard named by the caller", not is_read))
        if scoped_update:
            cluster.router._refuse_key_move(statement, params, route, per_set=False)
        elif not is_read and isinstance(inner, (Insert, Update)) and (shard != sc.shard or _explicit_shard(
                statement, execution_options, bind_arguments, NO_SCOPE, cluster.router) is not None):
            # A write the caller sent to this shard by name runs there, but it may not leave
            # a row there under a key another shard owns (no read by key would find it): an
            # INSERT's row with another shard's key, an UPDATE (or an upsert's DO UPDATE)
            # setting the key to one, is refused, as inside scope(shard=...).  (Rows without
            # a key, INSERT ... SELECT and reference tables run there as named.)
            cluster.router.refuse_named_write(inner, params, shard)
        return route
    asked_all = _flag("shardkit_all_shards", statement, execution_options)
    all_shards = asked_all or sc.all_shards
    if all_shards and not isinstance(statement, (selectable.Select, selectable.CompoundSelect,
                                                 Insert, Update, Delete)):
        # Textual or other statements the router cannot read: run everywhere, as writes.
        if _option("shardkit_role", statement, execution_options) == REPLICA:
            raise RoutingError(
                "SQL text run on every shard (shardkit_all_shards=True) runs on their primaries, as a "
                "write (shardkit cannot tell that it only reads), so shardkit_role='replica' cannot "
                "apply to it: write the query with select() (read on every shard's replicas and "
                "merged), or name one shard (shardkit_shard=...) to read the text on its replica",
                statement=statement)
        return Route(cluster.shard_names, "all", PRIMARY, "shardkit_all_shards=True", True)
    if sc.key is None or asked_all:
        # (The statement's shardkit_all_shards=True inside scope(key=...): every shard,
        # as asked; a scope's all_shards= only permits, its key still decides.)
        route = cluster.router.route(statement, params, all_shards=all_shards,
                                     anywhere=session._sk_ref_shard)
        return route if asked_all else _post_load_route(cluster.router, route, statement, execution_options)
    # A statement with no key of its own runs where the scope's key lives (a
    # key-less UPDATE or DELETE included); one with its own keys is routed by them.
    # (Not the eager load of objects read on another shard: it runs on theirs.)
    # (An UPDATE's SET of the shard key is checked against the shards it runs on: a key-less
    # one runs on the scope key's shard alone.)
    is_update = isinstance(statement, Update)
    route = cluster.router.route(statement, params, all_shards=True, anywhere=session._sk_ref_shard,
                                 key_moves=not is_update)
    pinned = _post_load_route(cluster.router, route, statement, execution_options)
    if pinned is not route:
        return pinned
    if route.kind == "all" and not route.keys and not _writes_reference_table(cluster, statement):
        keyed = _keyed_parts(cluster, statement, params)
        if keyed and all(keyed):
            # A UNION whose every part names its key: routed by them (every shard; the
            # rows a part's keys name are on no other).
            return route
        if keyed and any(keyed):
            raise ScatterRefused(
                f"inside scope(key={sc.key!r}) this {compound_keyword(unwrap_statement(statement))} "
                "mixes SELECTs that name their shard key (routed by it) with SELECTs that do not "
                "(which run on the scope key's shard): no one set of shards answers both; run "
                "the parts separately, or give every part its key",
                construct="scope key with a compound of keyed and key-less parts", statement=statement)
        narrowed = _route_by_scope_key(cluster, route, sc.key, statement)
        if narrowed is not route:
            if is_update:
                cluster.router._refuse_key_move(statement, params, narrowed, per_set=False)
            return narrowed
    if route.is_write and route.kind == "all" and not route.keys and not all_shards:
        return cluster.router.route(statement, params)  # refused as it is outside the scope
    if is_update:
        cluster.router._refuse_key_move(statement, params, route, per_set=bool(route.keys))
    return route


def _keyed_parts(cluster: Cluster, statement: Any, params: Any) -> list[bool] | None:
    """For a compound SELECT, whether each of its SELECTs is routed by a shard key of its
    own (None for anything else)."""
    inner = unwrap_statement(statement)
    if not isinstance(inner, selectable.CompoundSelect):
        return None
    return [bool(cluster.router.route(part, params, all_shards=True).keys)
            for part in compound_selects(inner) if isinstance(part, selectable.Select)]


# SQLSTATE classes of a statement the database cannot run at all: 42 syntax error or access
# rule violation, 0A feature not supported, 22 data exception.
_STATEMENT_REFUSED = frozenset({"42", "0A", "22"})


def _refuse_values_made_per_shard(session: ShardedSession, statement: Any, params: Any,
                                  shards: Sequence[str], reference: bool | None = None) -> None:
    """Refuse a write of a reference table on several ``shards`` that leaves a column to a
    value each shard would make (``reference``: whether it writes one, if known)."""
    if reference is None:
        reference = len(shards) > 1 and _writes_reference_table(session.cluster, statement)
    if reference:
        made = _values_made_per_shard(statement, params)
        if made is not None:
            raise CrossShardWriteError(
                f"{type(statement).__name__.upper()} of reference table {statement.table.fullname} "
                f"runs on every shard, and {made} would be made by each shard's run on its own: "
                "the copies would differ. Give that column's value in the statement, or add the "
                "objects with session.add() (the flush writes one shard and copies the row to "
                "the others)", table=statement.table.fullname, statement=statement)


def _values_made_per_shard(statement: Any, params: Any) -> str | None:
    """For an INSERT or UPDATE of a reference table run on every shard: a column the
    statement leaves to a value each run makes anew (a serial or identity, a server
    default that calls a function such as now(), a Python default or onupdate that is
    not a constant), described; None if every such column is given."""
    if not isinstance(statement, (Insert, Update)):
        return None
    table = statement.table
    given: set[str] = {getattr(k, "key", k) for k in (statement._values or {})}
    for mv in getattr(statement, "_multi_values", None) or ():
        for row in mv:
            if isinstance(row, Mapping):
                given.update(getattr(k, "key", k) for k in row)
            else:  # positional: the table's first columns
                given.update(c.key for c in list(table.columns)[:len(row)])
    if getattr(statement, "select", None) is not None:
        given.update(statement._select_names or ())
    rows = params if isinstance(params, Sequence) and not isinstance(params, str) else [params]
    given.update(k for r in rows if isinstance(r, Mapping) for k in r)
    if statement._propagate_attrs.get("compile_state_plugin") == "orm":
        mapper = statement._propagate_attrs["plugin_subject"].mapper
        given.update(p.columns[0].key for p in mapper.column_attrs if p.key in given)
    for c in table.columns:
        if c.key in given or c.name in given:
            continue
        if isinstance(statement, Update):
            if c.onupdate is not None and not c.onupdate.is_scalar:
                return f"column {c.name}'s onupdate"
            continue
        if c.default is not None and not c.default.is_scalar:
            return f"column {c.name}'s default"
        # (A lightweight table(), a TableClause, has neither, and declares no defaults:
        # nothing to see, as for a Table that does not declare the database's serial.)
        if c is getattr(table, "autoincrement_column", None) or getattr(c, "identity", None) is not None:
            return f"column {c.name} (a serial or identity)"
        sd = c.server_default
        if sd is not None and getattr(sd, "arg", None) is not None and not isinstance(sd.arg, str) and (
                "(" in str(sd.arg) if isinstance(sd.arg, TextClause) else any(
                    isinstance(e, FunctionElement) for e in visitors.iterate(sd.arg))):
            return f"column {c.name}'s server default ({sd.arg})"
    return None


def _writes_reference_table(cluster: Cluster, statement: Any) -> bool:
    table = getattr(statement, "table", None) if isinstance(statement, UpdateBase) else None
    if table is None:
        return False
    try:
        return cluster.router.table_route(table).is_reference
    except RoutingError:
        return False


def _refuse_moved_load(session: ShardedSession, shard: str, statement: Any, execution_options: Any) -> None:
    """Refuse a refresh or lazy load for an object loaded from ``shard`` before its bucket
    moved away: the shard's leftover copy (until the move's clean-up) is out of date."""
    lo = _options(statement, execution_options)("_sa_orm_load_options")
    state = None if lo is None else lo._refresh_state or lo._lazy_loaded_from
    if state is None or state.key is None or len(state.key) < 3 or state.key[2] != shard:
        return
    guarded, key = _shard_key_of(session, state)
    if not guarded:
        return
    owner = _current_owner(session, state.mapper, state.key[1], key, shard)
    if owner is None and key is None:
        owner = _owner_since_map_changed(session, state, shard, lo._refresh_state is state)
    if owner is not None and owner != shard:
        raise _moved_object_error(state.mapper, state.key[1], shard, owner, session.cluster,
                                  "this session's copy of it is out of date", key)


def _owner_since_map_changed(session: ShardedSession, state: Any, shard: str, refresh: bool) -> str | None:
    """The shard owning the row of ``state`` (loaded from ``shard``; an expired object
    whose primary key does not hold the shard key, so neither tells its bucket), asked of
    the shards by primary key, when the map changed since the session's objects were
    loaded (else, and when no shard has the row, None).  Without it, its refresh would
    read ``shard``'s leftover copy (out of date after the switch) or, after the clean-up,
    report the row deleted.  ``refresh``: the object's own refresh (not a lazy load from
    it): no row anywhere is ObjectDeletedError, as the refresh would say (``shard`` may
    still have a leftover copy).  Asked once per object and map version."""
    version = session.cluster.map_version
    old = session._sk_map_router
    if session._flushing or old is None or version == old.map_version \
            or current_scope().shard is not None or state.info.get("shardkit_located") == version:
        return None
    mapper = state.mapper
    tr = session.cluster.router.table_route(mapper)
    keys = tr.key_columns
    # Across shards (leftovers left out), whatever a strict session or a scope's key would
    # do to the application's own reads: this one is the object's.
    strict, session.strict = session.strict, False
    try:
        with session.no_autoflush, scope(key=None, strict=False):
            rows = session.execute(_shard_key_by_pk(mapper, tr, state.key[1])).all()
    finally:
        session.strict = strict
    if not rows and refresh:
        raise orm_exc.ObjectDeletedError(state)
    if len(rows) > 1:
        # Primary keys unique per shard: the object's row is one the older map placed on
        # ``shard``.  Two such (one moved away, and ``shard`` gave its id to a row of its
        # own since) cannot be told apart without the object's shard key.
        rows = [r for r in rows if _placed_on(old, mapper, r[0] if len(keys) == 1 else tuple(r), shard)]
        if len(rows) > 1 and any(_current_owner(session, mapper, state.key[1], r[0] if len(keys) == 1
                                                else tuple(r), shard) != shard for r in rows):
            raise NotOwned(
                f"{mapper.class_.__name__} {state.key[1]} was loaded from shard {shard} before the map "
                f"changed (version {version} now) and its shard key is not loaded: several shards "
                f"have a row of that primary key that {shard} held then (one has moved since), so "
                "which one it is cannot be told: retry the transaction with freshly loaded objects "
                "(shardkit.run_transaction does), or expunge the object and load it again by its "
                "shard key", shard=shard, table=mapper.local_table.name)
    if len(rows) != 1:
        return None
    owner = _current_owner(session, mapper, state.key[1], rows[0][0] if len(keys) == 1 else tuple(rows[0]),
                           shard)
    if owner == shard:
        state.info["shardkit_located"] = version  # (its row is where it was loaded from)
    return owner


def _shard_key_by_pk(mapper: Any, tr: TableRoute, ident: Any) -> Any:
    """SELECT of the shard key columns of the row of primary key ``ident`` (of ``mapper``,
    whose table route is ``tr``)."""
    keys = [mapper.get_property_by_column(column_named(mapper.local_table.c, c)).class_attribute
            for c in tr.key_columns]
    return sa_select(*keys).where(*(mapper.get_property_by_column(c).class_attribute == v
                                    for c, v in zip(mapper.primary_key, ident)))


def _placed_on(router: Router, mapper: Any, key: Any, shard: str) -> bool:
    """Whether ``router``'s map places shard key ``key`` on ``shard`` (True when it cannot
    say)."""
    try:
        return router.shard_for(mapper, key) == shard
    except ShardkitError:
        return True


# (shard, is_read) -> the Route of a statement for a shard named by the caller.
_NAMED: dict[tuple[str, bool], Route] = {}


def _single(shard: str, role: str, execution_options: Any, bind_arguments: Any,
            select: bool = False) -> tuple[Any, dict[str, Any]]:
    ba = dict(bind_arguments) if bind_arguments else {}
    ba["shard_id"] = shard
    ba["shardkit_role"] = role
    # identity_token makes loaded objects carry their shard in their identity key.
    if execution_options:
        lo = execution_options.get("_sa_orm_load_options")
        if (select and lo is not None and lo._identity_token == shard
                and execution_options.get("identity_token", shard) == shard):
            # A load for one object (get, refresh) names its shard in its load options already.
            eo = execution_options
        elif select:
            eo = util.immutabledict(execution_options).union({"identity_token": shard})
        else:
            # UPDATE/INSERT ... RETURNING an entity builds its objects from the load
            # options, which the ORM fills from identity_token for a SELECT only.
            eo = util.immutabledict(execution_options).union({
                "identity_token": shard,
                "_sa_orm_load_options": (lo or QueryContext.default_load_options) + {"_identity_token": shard}})
    elif select:
        eo = _load_options(shard)
    else:
        eo = _TOKEN_OPTIONS.get(shard)
        if eo is None:
            eo = _TOKEN_OPTIONS.setdefault(shard, util.immutabledict({
                "identity_token": shard,
                "_sa_orm_load_options": QueryContext.default_load_options + {"_identity_token": shard}}))
    return eo, ba


_session_execute_internal = Session._execute_internal

# shard -> the execution options of a write: identity_token=shard, and the same as load
# options (for the objects of a RETURNING).
_TOKEN_OPTIONS: dict[str, Any] = {}
# shard -> the same for a SELECT, as the ORM's load options.
_LOAD_OPTIONS: dict[str, Any] = {}
# The same, without the ORM's autoflush (ShardedSession._plain_read).
_PLAIN_LOAD_OPTIONS: dict[str, Any] = {}


def _load_options(shard: str, autoflush: bool = True) -> Any:
    """The execution options of a SELECT on ``shard`` with no options of its own.  The ORM
    turns identity_token into its load options on every execution; a SELECT gets them made
    already (the same options, built once per shard).  ``autoflush=False``: for a session
    known to have nothing to flush.  (With autoflush, the load options SQLAlchemy's load by
    primary key makes for get(): the shard as the identity token, nothing else.)"""
    cache = _LOAD_OPTIONS if autoflush else _PLAIN_LOAD_OPTIONS
    eo = cache.get(shard)
    if eo is None:
        eo = cache.setdefault(shard, util.immutabledict({
            "_sa_orm_load_options": QueryContext.default_load_options + (
                {"_identity_token": shard} if autoflush else {"_identity_token": shard, "_autoflush": False})}))
    return eo


def _refuse_inheritance(mapper: Any, verb: str) -> None:
    """ShardedSession runs ORM bulk writes as Core statements on each shard's table: not
    for a class spread over several tables or told apart by a discriminator column."""
    if mapper.inherits is not None or mapper.polymorphic_on is not None:
        raise RoutingError(
            f"ORM bulk {verb} of {mapper.class_.__name__}, a class in an inheritance hierarchy, "
            "is not supported by ShardedSession (its rows span tables or need a discriminator); "
            "use session.add_all() and a flush instead")


def _refuse_orm_bulk_insert(statement: Any) -> Any:
    """The mapper of an ORM bulk INSERT (rows given as parameters), refused as
    :func:`_orm_bulk_insert` refuses it before it runs (``Cluster.explain`` too)."""
    if statement._returning:
        raise RoutingError(
            "ORM bulk INSERT ... RETURNING (rows given as parameters, a list or one dict, "
            "which SQLAlchemy runs as a bulk INSERT) is not supported by ShardedSession; add "
            "the objects with session.add_all(), give one row's values in the statement "
            "(insert(Model).values(...).returning(...)), insert without returning(), or, to "
            "get columns back, insert into the table (insert(Model.__table__).returning("
            "Model.__table__.c.id, sort_by_parameter_order=True), keyed by column names), "
            "whose rows are split by shard and come back in the order of the rows given",
            statement=statement,
        )
    mapper = statement._propagate_attrs["plugin_subject"].mapper
    _refuse_inheritance(mapper, "INSERT")
    return mapper


def _orm_bulk_insert(session: ShardedSession, statement: Any, params: Any, route: Route,
                     execution_options: Any = None) -> Result[Any]:
    """``session.execute(insert(Model), [{...}, ...])``, split by shard.

    SQLAlchemy's ORM bulk insert does not support per-instance sharding, so the
    rows go through Core on each shard's connection in the session's
    transaction, keyed by column instead of attribute name.
    """
    mapper = _refuse_orm_bulk_insert(statement)
    table = mapper.local_table
    rows = params if isinstance(params, list) else [params]
    by_shard: dict[str, list[Any]]
    if route.split is not None:
        by_shard = {sh: list(v) for sh, v in route.split.items()}
    else:
        by_shard = {sh: rows for sh in route.shards}
    # Each row's columns as SQLAlchemy's bulk insert makes them: keyed by column, a None
    # left to the column's default (unless render_nulls=True), the first version of a
    # versioned class; names of the statement's own bind parameters kept.
    render_nulls = bool(_option("render_nulls", statement, execution_options))
    bound = [b.key for b in statement._get_embedded_bindparams() if b.key in rows[0]]
    core_by_shard = {}
    for sh, part in by_shard.items():
        # A composite attribute's value (and in 2.1 a hybrid's with a bulk_dml setter) into
        # its columns first, on copies, as SQLAlchemy's bulk insert does: else dropped.
        part = [dict(r) for r in part]
        _expand_bulk_attrs(mapper, part)
        core_by_shard[sh] = [c[2] for c in persistence._collect_insert_commands(
            table, ((None, r, mapper, None) for r in part), bulk=True, render_nulls=render_nulls,
            include_bulk_keys=bound)]
    _refuse_values_made_per_shard(session, statement, [r for p in core_by_shard.values() for r in p],
                                  list(by_shard))
    result = None
    if session.autoflush and _option("autoflush", statement, execution_options) is not False:
        session._autoflush()
    stmt = table.insert()
    if getattr(statement, "_post_values_clause", None) is not None:
        # ON CONFLICT ... (postgresql.insert(Model).on_conflict_do_update(...)): kept.
        stmt = pg_insert(table)
        stmt._post_values_clause = statement._post_values_clause
    if statement._values:
        stmt = stmt.values(dict(statement._values))
    for shard, core in core_by_shard.items():
        conn = session.connection(bind_arguments={"shard_id": shard})
        # One executemany per set of columns given, as SQLAlchemy's bulk insert does.
        for core_rows in _by_columns(core):
            result = conn.execute(stmt, core_rows)
    assert result is not None
    # executemany reports no reliable rowcount; every row was inserted (a reference
    # table's on every shard: once, as on one database) or the statement raised.  With
    # ON CONFLICT a row may be skipped (DO NOTHING, DO UPDATE ... WHERE): unknown, as
    # SQLAlchemy reports an executemany's rowcount.
    result.rowcount = -1 if getattr(stmt, "_post_values_clause", None) is not None else len(rows)  # type: ignore[misc]
    return result


# SQLAlchemy 2.1's name of 2.0's bulk_persistence._expand_composites.
_expand_bulk_attrs = getattr(bulk_persistence, "_expand_other_attrs", None) or \
    bulk_persistence._expand_composites


def _by_columns(rows: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by the set of columns they give (an executemany needs one set)."""
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(frozenset(r), []).append(r)
    return list(groups.values())


# The parameter of a bulk update row's current version (mappers with a version_id_col).
_OLD_VERSION = "_shardkit_old_version"


def _orm_bulk_update_of(statement: Update, execution_options: Any) -> Any:
    """The mapper of an ORM bulk UPDATE by primary key (``update(Model)`` given a list of
    parameter sets), run by :func:`_orm_bulk_update`; None for another UPDATE (Core, or
    ``dml_strategy='core_only'``: an executemany routed by its keys).  Such a list with a
    WHERE clause or values() is refused."""
    if statement._propagate_attrs.get("compile_state_plugin") != "orm" \
            or _option("dml_strategy", statement, execution_options) == "core_only":
        return None
    mapper = statement._propagate_attrs["plugin_subject"].mapper
    if statement.whereclause is None and not statement._values:
        return mapper
    # SQLAlchemy runs these rows through its bulk UPDATE by primary key, on one
    # connection (NotImplementedError for a sharded session, whatever the route).
    raise RoutingError(
        f"ORM bulk UPDATE of {mapper.class_.__name__} (a list of parameter sets) with a "
        "WHERE clause or values() is not supported by ShardedSession; pass rows that "
        "carry the primary key and shard key to update(Model) alone, or run the statement "
        "as Core executemany, split by each row's key: "
        "execution_options={'dml_strategy': 'core_only'}", statement=statement)


def _bulk_synchronize(statement: Any, execution_options: Any) -> bool:
    """Whether an ORM bulk UPDATE by primary key updates the session's objects, as
    SQLAlchemy decides from ``synchronize_session`` ('auto' and 'evaluate' do)."""
    sync: Any = "auto"
    for opts in (execution_options, getattr(statement, "_execution_options", None)):
        if opts and "synchronize_session" in opts:
            sync = opts["synchronize_session"]
            break
    if sync == "fetch":
        raise sa_exc.InvalidRequestError(
            "The 'fetch' synchronization strategy is not available for 'bulk' ORM updates "
            "(i.e. multiple parameter sets)")
    return sync in ("auto", "evaluate")


def _bulk_update_rows(session: Any, router: Router, mapper: Any, rows: list[Any],
                      key_names_row: bool = True) -> tuple[
        Any, Any, list[Any], Any, dict[str, list[dict[str, Any]]], dict[str, list[Any]]]:
    """Where an ORM bulk UPDATE by primary key sends each row (see :func:`_orm_bulk_update`,
    and its ``key_names_row``), refused as it is refused before it runs: (table route,
    table, primary key columns, version column, Core rows by shard, the caller's rows by
    shard).  Needs no database: ``Cluster.explain`` routes such a statement with it too
    (``session``: its cluster)."""
    _refuse_inheritance(mapper, "UPDATE")
    tr = router.table_route(mapper)
    table = mapper.local_table
    attr_to_col = {prop.key: prop.columns[0].key for prop in mapper.column_attrs}
    pk_cols = list(mapper.primary_key)
    pk_attrs = [mapper.get_property_by_column(c).key for c in pk_cols]
    key_cols = [column_named(table.c, c) for c in tr.key_columns]
    key_attrs = [mapper.get_property_by_column(c).key for c in key_cols]
    # The Core rows are keyed by the columns' keys, which a Column(name, key="...") does
    # not share with the name the route knows the key column by.
    renamed = [(c.name, c.key) for c in key_cols if c.name != c.key]
    # Optimistic concurrency (version_id_col): the UPDATE matches the version the row
    # gives and sets the next one.
    vcol = mapper.version_id_col
    version_attr = None if vcol is None else mapper.get_property_by_column(vcol).key
    # A key column the UPDATE's WHERE compares (one of the primary key's, or any with
    # key_names_row) is read as a comparison reads it: a float with an unscaled numeric
    # key in float8, not by the 15 digits a written float is stored as (read_coercer).
    reads = None
    if tr.strategy is not None:
        placing = router._key_coercers(tr, table)
        if placing:
            read = tuple(read_coercer(co) if key_names_row or any(c is p for p in pk_cols) else co
                         for co, c in zip(placing, key_cols))
            reads = read if read != tuple(placing) else None
    by_shard: dict[str, list[dict[str, Any]]] = {}
    given: dict[str, list[Any]] = {}  # the same rows as the caller gave them (attribute names)
    for i, row in enumerate(rows):
        missing = [a for a in (*pk_attrs, *key_attrs) if row.get(a) is None]
        if missing:
            raise ShardKeyError(
                f"row {i} of the bulk update of {tr.table} has no value for {', '.join(dict.fromkeys(missing))}; "
                "a bulk UPDATE by primary key needs the primary key and the shard key in every row",
                table=tr.table)
        core = {attr_to_col.get(k, k): v for k, v in row.items()}
        if version_attr is not None:
            if row.get(version_attr) is None:
                raise sa_exc.InvalidRequestError(
                    f"row {i} of the bulk update of {tr.table} has no value for {version_attr}, "
                    f"the version id of {mapper.class_.__name__}: a bulk UPDATE by primary key of a "
                    "versioned class names the version each row has")
            old = core.pop(vcol.key)
            core[_OLD_VERSION] = old
            row = dict(row)
            if mapper.version_id_generator is not False:
                core[vcol.key] = row[version_attr] = mapper.version_id_generator(old)
            else:
                del row[version_attr]  # the server sets it
        if tr.strategy is None:
            shards = session.cluster.shard_names
        else:
            shards = [router._shard_for_row(tr, {**core, **{n: core[k] for n, k in renamed}} if renamed
                                            else core, table, reads)]
        for shard in shards:
            by_shard.setdefault(shard, []).append(core)
            given.setdefault(shard, []).append(row)
    if tr.strategy is None:  # a reference table: every shard runs the UPDATE of every row
        _refuse_values_made_per_shard(session, table.update(), next(iter(by_shard.values()), []),
                                      list(by_shard))
    return tr, table, pk_cols, vcol, by_shard, given


def _orm_bulk_update(session: ShardedSession, mapper: Any, rows: list[Any],
                     synchronize: bool = False, key_names_row: bool = True,
                     autoflush: bool = True) -> Result[Any]:
    """ORM bulk UPDATE by primary key (``session.execute(update(Model), [{...}, ...])``),
    split by shard.

    Each row names its primary key and shard key; it is updated on the shard
    that owns that key, through Core on the session's connection there.  With
    ``synchronize`` (``session.execute()``'s default, as in SQLAlchemy) the objects
    the session holds for those rows, on that shard, take the new values; the legacy
    bulk methods leave them as they are, as SQLAlchemy's do.  A row that
    matches nothing (a wrong key, or a row on another shard) raises
    :class:`~sqlalchemy.orm.exc.StaleDataError`, as SQLAlchemy's bulk update does;
    so does a row of a mapper with a ``version_id_col`` whose version is not the
    row's (the UPDATE gives the row the next version, as SQLAlchemy's does).
    ``autoflush=False``: no autoflush first (the execution option autoflush=False, and
    the legacy bulk methods, which SQLAlchemy runs without one).
    ``key_names_row=False``: each row's shard key is a new one for a row of that primary
    key on the key's shard (bulk_save_objects(), of objects loaded from that shard), not
    part of what the UPDATE matches.
    """
    router = session.cluster.router
    tr, table, pk_cols, vcol, by_shard, given = _bulk_update_rows(session, router, mapper, rows, key_names_row)
    pk_names = {c.key for c in pk_cols}
    # The shard key's columns outside the primary key match too: a primary key may be
    # unique per shard only, and the row of that id on the key's shard may be another
    # key's (by primary key alone, its UPDATE would change that row, key and all).
    key_where = [] if tr.strategy is None or not key_names_row else [
        c for c in (column_named(table.c, k) for k in tr.key_columns) if c.key not in pk_names]
    total = 0
    result = None
    if session.autoflush and autoflush:
        session._autoflush()
    for shard, part in by_shard.items():
        conn = session.connection(bind_arguments={"shard_id": shard})
        session._sk_written.add(shard)
        for group in _by_columns(part):
            sets = [c for c in group[0] if c not in pk_names and c != _OLD_VERSION]
            if not sets:
                continue
            where = [c == bindparam(f"_pk_{c.key}") for c in (*pk_cols, *key_where)]
            if vcol is not None:
                where.append(vcol == bindparam(_OLD_VERSION))
            stmt = table.update().where(*where).values({c: bindparam(c) for c in sets})
            params = [{**{c: r[c] for c in sets}, **{f"_pk_{k}": r[k] for k in pk_names},
                       **{f"_pk_{c.key}": r[c.key] for c in key_where},
                       **({_OLD_VERSION: r[_OLD_VERSION]} if vcol is not None else {})}
                      for r in group]
            result = conn.execute(stmt, params)
            matched = result.rowcount
            if matched != len(params):
                if session.cluster.catalog is not None and tr.strategy is not None:
                    # The rows may have moved to another shard since this process's map.
                    _check_still_owner(session, shard, stmt, result, router=router)
                raise orm_exc.StaleDataError(
                    f"UPDATE of {tr.table} on shard {shard} expected to update {len(params)} "
                    f"row(s); {matched} matched (a primary key that does not exist there, or "
                    "a shard key that is not the row's"
                    + (", or a version id that is not the row's)" if vcol is not None else ")"))
            total += matched
        if synchronize:
            # SQLAlchemy's own synchronization of a bulk UPDATE by primary key, for the
            # objects of this shard (their identity token).
            _BulkORMUpdate._do_post_synchronize_bulk_evaluate(
                session, given[shard], None,
                _BulkORMUpdate.default_update_options + {"_subject_mapper": mapper,
                                                        "_identity_token": shard})
    if result is None:
        raise RoutingError(f"bulk update of {tr.table} sets no column besides the primary key")
    if tr.strategy is None:
        total //= max(1, len(session.cluster.shard_names))
    result.rowcount = total  # type: ignore[misc]
    return result


# Fails, aborting the shard's transaction as the guard's refusal does, when the
# shard has given up a unit (bucket or slice) that this process's map gives it,
# or (range and list groups) has a slice the map does not know: a split since.
# (A cast of a message to integer is how plain SQL raises an error.)
_NOT_OWNED_MARK = "shardkit: not owned: "
_GONE = "(SELECT min(u) FROM unnest(%(units)s::integer[]) AS u " \
        "WHERE NOT EXISTS (SELECT 1 FROM shardkit.owned_buckets o WHERE o.bucket = u))"
_STILL_OWNER_SQL = f"SELECT ('{_NOT_OWNED_MARK}' || {_GONE})::integer"
_STILL_OWNER_SLICES_SQL = (
    f"SELECT ('{_NOT_OWNED_MARK}' || coalesce({_GONE}, (SELECT min(s.id) FROM shardkit.slices s "
    "WHERE s.grp = %(group)s AND s.id <> ALL(%(known)s::integer[]))))::integer")


def _check_still_owner(session: ShardedSession, shard: str, statement: Any, result: Any, *,
                       one_key: bool = False, router: Router | None = None) -> None:
    """Refuse (:class:`NotOwned`) a keyed UPDATE/DELETE that ``shard`` ran by a stale map.

    The guard's triggers see only the rows a statement touches: on a shard that
    has given a bucket away and deleted its rows, a stale process's UPDATE or
    DELETE of a key there matches nothing and would report success while the
    row lives on elsewhere.  So after such a statement (for ``key = value``:
    only when it matched no rows, since all of a key's rows share one bucket),
    the shard confirms that this process's map is right about it: the map of
    ``router``, the one that routed the statement (default: the one in use).  Not
    the one in use by the time the statement has run: a new map arriving in between
    no longer gives the shard the moved bucket, so the shard would be right about
    everything it is asked and a write that changed nothing would be acknowledged.
    """
    if not isinstance(statement, (Update, Delete)):
        return
    if one_key and (getattr(result, "rowcount", None) or 0) > 0:
        return
    _SHORT_WRITE.set(False)  # checked here; a flush need not look again
    cluster = session.cluster
    known = cluster.units_of(shard, statement.table, router)
    if known is None:
        return
    units, group, slices = known
    sql, params = (_STILL_OWNER_SQL, {"units": list(units)}) if group is None else \
        (_STILL_OWNER_SLICES_SQL, {"units": list(units), "group": group, "known": list(slices)})
    _ask_shard(session, shard, sql, params, statement, "may have missed rows that live on another shard now",
               router)


# Fails as _STILL_OWNER_SQL does when the shard owns a bucket (or slice) this process
# still takes for a copy it holds during a move: the move has switched since.
_NOT_FOREIGN_SQL = (
    f"SELECT ('{_NOT_OWNED_MARK}' || (SELECT min(u) FROM unnest(%(units)s::integer[]) AS u "
    "WHERE EXISTS (SELECT 1 FROM shardkit.owned_buckets o WHERE o.bucket = u)))::integer")


def _ask_shard(session: ShardedSession, shard: str, sql: str, params: Mapping[str, Any],
               statement: Any, consequence: str, router: Router | None) -> None:
    """Run one of the checks above on ``shard``'s primary in the session's transaction;
    :class:`NotOwned` if the shard disagrees with the map of ``router`` (the one that
    routed the statement; default: the one in use)."""
    cluster = session.cluster
    version = (router or cluster.router).map_version
    conn = Session.connection(session, bind_arguments={"shard_id": shard, "shardkit_role": PRIMARY})
    if not cluster.guard_installed(shard, conn):
        return
    try:
        conn.exec_driver_sql(sql, params)
    except sa_exc.DataError as e:
        found = re.search(re.escape(_NOT_OWNED_MARK) + r"(\d+)", str(e.orig))
        if found is None:
            raise
        bucket = int(found.group(1))
        reload = cluster.map_stale()
        unit = "slice" if bucket >= SLICE_BASE else "bucket"
        raise NotOwned(
            f"shard {shard} disagrees with this process's map (version {version}) "
            f"about {unit} {bucket}, so this {type(statement).__name__.lower()} {consequence}; "
            f"nothing was written (the shard's transaction is aborted) and {reload}: retry the "
            "transaction (shardkit.run_transaction reloads the map and retries it)",
            shard=shard, bucket=bucket, table=statement.table.name, statement=statement,
            map_version=version,
        ) from e


# Set (in this thread) when an UPDATE or DELETE on a primary matched fewer rows than it
# was given: the flush then checks that the objects it wrote are where the map says.
_SHORT_WRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("shardkit_short_write", default=False)


def _note_short_write(cursor: Any, context: Any, given: int) -> None:
    """After a statement ran on a primary of a cluster with a catalog (``_watch_primary``)."""
    if context is not None and (context.isupdate or context.isdelete) and cursor.rowcount < given:
        _SHORT_WRITE.set(True)


# The connections (of a cluster with a catalog whose primaries run in autocommit) on which
# a statement wrote, so committed as it ran: run_transaction must not run the function
# again after a NotOwned (see _record_autocommitted).  Weak: a Connection lives for one
# transaction of a session.
_AUTOCOMMITTED: weakref.WeakSet[Any] = weakref.WeakSet()
# Command tags of statements that write nothing (a text() statement's kind is not known).
_READ_TAGS = ("SELECT", "SHOW", "SET", "RESET", "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT",
              "RELEASE", "DECLARE", "FETCH", "CLOSE", "LISTEN", "DISCARD")


def _note_autocommitted_write(cursor: Any, context: Any, given: int) -> None:
    """_note_short_write, on a primary whose connections run in autocommit: a statement
    that wrote rows (or one shardkit cannot tell, such as DDL) has committed them."""
    _note_short_write(cursor, context, given)
    if context is None:
        return
    if context.isinsert or context.isupdate or context.isdelete:
        if cursor.rowcount == 0:
            return  # matched no row: nothing committed
    elif not context.is_text and not context.isddl:
        return  # a compiled SELECT
    elif (cursor.statusmessage or "").startswith(_READ_TAGS):
        return
    _AUTOCOMMITTED.add(context.root_connection)


def _shard_key_of(session: ShardedSession, state: Any) -> tuple[bool, Any]:
    """(guarded, key): whether persistent object ``state`` is in a group the ownership
    guard covers, and its shard key's value in the database (``None`` when unknown)."""
    cluster = session.cluster
    mapper = state.mapper
    try:
        tr = cluster.router.table_route(mapper)
    except RoutingError:
        return False, None
    if tr.strategy is None or cluster.units_of(state.key[2], mapper) is None:
        return False, None
    values = []
    for col in tr.key_columns:
        attr = mapper.get_property_by_column(column_named(mapper.local_table.c, col)).key
        # The value the row has in the database (before a pending change).
        value = state.committed_state.get(attr, state.dict.get(attr))
        if value is None or value is NO_VALUE:
            return True, None
        values.append(value)
    return True, values[0] if len(values) == 1 else tuple(values)


def _current_owner(session: ShardedSession, mapper: Any, ident: Any, key: Any,
                   loaded_from: str | None = None) -> str | None:
    """The shard the map places an object (its primary key, its shard key if known) on now;
    ``loaded_from`` when either reading of a float in an unscaled numeric key places it there."""
    # (Placed as its flush placed it: an object given a float for an unscaled numeric key
    # is on the shard of the value stored, which a comparison with the float may not find.)
    owner = session._shard_from_identity(mapper, ident, placed=True)
    if owner is None and key is not None:
        owner = session.cluster.router.shard_for(mapper, key)
    if owner is not None and loaded_from is not None and owner != loaded_from \
            and _read_owner(session, mapper, ident, key) == loaded_from:
        # A float loaded (Numeric(asdecimal=False)) from a row stored with more than 15
        # digits is on the shard of the float as it is, not of its 15 digits.
        return loaded_from
    return owner


def _read_owner(session: ShardedSession, mapper: Any, ident: Any, key: Any) -> str | None:
    """The shard of an object's key read as a comparison reads it (read_coercer), when that
    differs from the reading of a written key (a float in an unscaled numeric key); else None."""
    router = session.cluster.router
    plan = _pk_plan_for(router, mapper)
    if plan is not False:
        return None if plan[1] is plan[3] else session._shard_from_identity(mapper, ident)
    if key is None:
        return None
    try:
        tr, keys = router.instance_keys[mapper]
    except KeyError:
        try:
            tr, keys = _instance_keys(router, mapper)
        except ShardkitError:
            return None
    placing = [co for _, _, co in keys]
    reads = [read_coercer(co) for co in placing]
    if reads == placing or tr.strategy is None:
        return None
    try:
        return tr.strategy.shard_for_key(router._coerced(tr, key, None, reads))
    except ShardkitError:
        return None


def _placements(session: ShardedSession) -> list[tuple[Any, Any, str, Any]]:
    """(mapper, identity, shard loaded from, shard key) of each persistent object the
    next flush may update or delete, in groups the ownership guard covers.  Taken before
    the flush: a failed flush expires what it tried to write."""
    out = []
    for obj in (*session.deleted, *session.dirty):
        state = inspect(obj)
        if state.key is None or len(state.key) < 3 or state.key[2] is None:
            continue
        guarded, key = _shard_key_of(session, state)
        if guarded:
            out.append((state.mapper, state.key[1], state.key[2], key))
    return out


def _moved_object_error(mapper: Any, ident: Any, loaded_from: str, owner: str, cluster: Cluster,
                        what: str, key: Any = None) -> NotOwned:
    """``key``: the object's shard key, when known (its bucket or slice is then the error's)."""
    unit = None
    if key is not None:
        try:
            unit = cluster.router.table_route(mapper).strategy.unit_for_key(key)
        except (ShardkitError, AttributeError):
            pass
    return NotOwned(
        f"{mapper.class_.__name__} {ident} was loaded from shard {loaded_from}, which no longer "
        f"owns it (it lives on {owner} now, map version {cluster.map_version}); {what}: retry "
        "the transaction with freshly loaded objects (shardkit.run_transaction does), or "
        "expunge the object and load it again",
        shard=loaded_from, table=mapper.local_table.name, bucket=unit)


def _refuse_misplaced(session: ShardedSession, placements: list[tuple[Any, Any, str, Any]],
                      cause: BaseException | None) -> None:
    """Raise NotOwned if a written object's bucket has moved since it was loaded (after
    reloading the map: this process may not follow the catalog).  ``cause``: the flush's
    StaleDataError, which stands (with a note) when the catalog cannot be read and the map
    in use does not place any of the objects elsewhere: a row another process deleted or
    changed is not a catalog outage.  Without one (a DELETE that matched nothing, which
    SQLAlchemy only warns of), the catalog's error propagates: the DELETE may have missed
    a row that lives on another shard now."""
    cluster = session.cluster
    unread: Exception | None = None
    try:
        cluster.refresh_map()
    except (ShardUnavailable, sa_exc.SQLAlchemyError) as e:
        if cause is None:
            raise
        unread = e
    for mapper, ident, loaded_from, key in placements:
        owner = _current_owner(session, mapper, ident, key, loaded_from)
        if owner is None or owner == loaded_from:
            continue
        err = _moved_object_error(mapper, ident, loaded_from, owner, cluster, "nothing was written", key)
        if cause is not None:
            raise err from cause
        raise err
    if unread is not None:
        cause.add_note(f"(shardkit could not reload the map to check whether an object written "
                       f"here has moved to another shard: {first_line(unread)})")


def _after_flush(session: Any, flush_context: Any) -> None:
    # Inside the flush: raising here rolls its writes back.  (A DELETE that matched
    # nothing is only a warning to SQLAlchemy.)
    placements = session._sk_placements
    if placements and _SHORT_WRITE.get():
        _SHORT_WRITE.set(False)
        _refuse_misplaced(session, placements, None)


def _route_by_scope_key(cluster: Cluster, route: Route, key: Any, statement: Any = None) -> Route:
    router = cluster.router
    firsts: dict[str, str] = {}  # group -> its first table in the statement
    for t in route.tables:
        group = router.table_route(t).group
        if group is not None:
            firsts.setdefault(group, t)
    if not firsts:
        return route
    # The key is read in the type of the statement's key column (a uuid's string form as
    # the uuid, a string for an integer column refused), as a key in the statement is:
    # the table's name alone knows no type unless the cluster was given metadata=.
    given: dict[str, Any] = {}
    # (Not when the cluster's metadata= gave those types by table name: a key-less
    # statement inside a scope is the hot path, and walking it costs more than routing it.)
    if statement is not None and not all(router._coercers.get(t) for t in firsts.values()):
        unwrapped = unwrap_statement(statement)
        if isinstance(unwrapped, (selectable.Select, selectable.CompoundSelect, UpdateBase)):
            for t in sql_util.find_tables(unwrapped, include_aliases=True, include_crud=True):
                if isinstance(t, selectable.Alias):
                    t = t.element
                if isinstance(t, selectable.TableClause):
                    try:
                        given.setdefault(router.table_route(t).table, t)
                    except RoutingError:
                        continue
    owners = {t: router.shard_for(given.get(t, t), key) for t in firsts.values()}
    if len(set(owners.values())) > 1:
        # A UNION of parts of different groups: the key lives on one shard per group, and
        # the statement runs whole on each shard it runs on.
        raise ScatterRefused(
            f"inside scope(key={key!r}) this statement, which has no shard key of its own, would "
            "run on the scope key's shard, but its tables are in groups where the key lives on "
            f"different shards ({', '.join(f'{t}: {s}' for t, s in owners.items())}); run the "
            "parts separately inside the scope, give them their keys, or name a shard",
            construct="scope key over groups on different shards", statement=statement)
    shard = next(iter(owners.values()))
    return Route((shard,), "direct", route.role, f"scope key {key!r} -> {shard}",
                 route.is_write, route.tables, keys="many", router=router)


class ScatterResult(IteratorResult):  # type: ignore[type-arg]
    """The merged result of a cross-shard read.

    ``missing_shards`` maps each shard that failed to its error when the caller
    accepted partial results (``shardkit_partial_results=True``); it is empty
    when every shard answered.
    """

    missing_shards: dict[str, BaseException]
    # The shards' own results (server-side cursors when streamed): closed with this one.
    _shard_results: Sequence[Any] = ()
    # The ORM's "call unique()" marker of a joined collection load (the unique filter state
    # it gave the shards' results), while the caller has not called unique() itself.
    _orm_unique: Any = None

    def freeze(self) -> Any:
        """As on one database, with ``missing_shards`` kept by the frozen result and each
        result it makes.  The rows of one entity with a joined collection freeze as they
        are, as one database's do (the frozen result's reader calls unique()), not refused
        for want of a unique() that applies when they are read."""
        state = self._unique_filter_state
        if state is not None and state is self._orm_unique and self._attributes.get("is_single_entity"):
            self._unique_filter_state = None
            try:
                return _FrozenScatter(self)
            finally:
                self._unique_filter_state = state
        return _FrozenScatter(self)

    # scalars() and mappings() (also Session.scalars()) are the result read another way:
    # they say which shards are missing too.
    def scalars(self, index: Any = 0) -> Any:
        result = super().scalars(index)
        result.missing_shards = self.missing_shards
        return result

    def mappings(self) -> Any:
        result = super().mappings()
        result.missing_shards = self.missing_shards
        return result

    def _soft_close(self, hard: bool = False, **kw: Any) -> None:
        super()._soft_close(hard=hard, **kw)
        # Nothing reads them any more: close() (or leaving a with block) closes each
        # shard's cursor at once, as one database's result does, not at the transaction's end.
        for r in self._shard_results:
            r.close()


class _FrozenScatter(FrozenResult):  # type: ignore[type-arg]
    """A frozen :class:`ScatterResult`: its results (and ``with_new_rows()``'s, which
    ``merge_frozen_result()`` makes) say which shards are missing."""

    missing_shards: dict[str, BaseException]

    def __init__(self, result: ScatterResult) -> None:
        super().__init__(result)
        self.missing_shards = result.missing_shards

    def with_new_rows(self, tuple_data: Any) -> Any:
        frozen = _FrozenScatter.__new__(_FrozenScatter)
        frozen.__dict__.update(super().with_new_rows(tuple_data).__dict__)
        frozen.missing_shards = self.missing_shards
        return frozen

    def __call__(self) -> Any:
        result = ScatterResult(self.metadata, iter(self.data))
        result._attributes = self._attributes
        result._source_supports_scalars = self._source_supports_scalars
        result.missing_shards = self.missing_shards
        return result


def _without_foreign_rows(cluster: Cluster, shard: str, statement: Any, route: Route,
                          foreign: frozenset[int] | None = None) -> Any:
    """``statement`` restricted to the buckets ``shard`` owns, while a move is in progress.

    During a move the target holds copies of rows it does not own yet, and the
    source keeps rows it no longer owns until clean-up; a cross-shard
    statement must not see (or touch) them twice: rows of foreign buckets (hash
    groups) or slices (range and list groups) are left out.  Outside moves this
    returns ``statement`` unchanged.  ``foreign``: the units to leave out (default:
    those of the router that routed it), as a caller that checks them later read them.
    """
    router = route.router or cluster.router  # the map that routed it, and its moves' state
    if foreign is None:
        foreign = router.foreign_buckets.get(shard)
    if not foreign:
        return statement
    if not route.tables and not isinstance(statement, Insert):
        raise ScatterRefused(
            f"shard {shard} holds rows of buckets it does not own while they move, and this "
            "textual statement names no tables shardkit can filter, so it could see them twice; "
            "write it with select()/table(), run it per shard, or wait for the move to finish",
            construct="textual statement across shards during a move", statement=statement)
    # Only the tables of what moves: hash tables if buckets do, a group's tables if its slices do.
    foreign_slices = [s for s in router.config.slices if s.id in foreign]
    sliced = {s.group for s in foreign_slices}
    foreign_buckets = sorted(b for b in foreign if b < SLICE_BASE)
    moving = {t: tr for t, tr in router.tables.items() if len(tr.key_columns) == 1 and (
        (isinstance(tr.strategy, HashStrategy) and foreign_buckets) or tr.group in sliced)}
    if not moving or not any(t in moving for t in route.tables):
        return statement

    def moving_name(table: Any) -> str | None:
        """The configured name of ``table`` if it moves: as the router finds it, by its
        ``schema.name``, else by its name alone."""
        for n in (table.fullname, table.name):
            if n in router.tables:
                return n if n in moving else None
        return None

    def exposed_keys(sel: Any) -> list[tuple[Any, str]]:
        """The columns of derived table ``sel`` that are a moving table's shard key
        (through any depth of subqueries), with that table."""
        out = []
        for c in sel.c:
            for base in c.proxy_set:
                table = getattr(base, "table", None)
                if isinstance(table, selectable.Alias):
                    table = table.element
                if isinstance(table, Table) and (n := moving_name(table)) is not None and \
                        base.name == moving[n].key_columns[0]:
                    out.append((c, n))
                    break
        return out

    def condition(sel: Any, tr: TableRoute) -> Any:
        # (By name: a Column(name, key=...) is in .c by its key; an alias's columns keep both.)
        return condition_on(column_named(sel.c, tr.key_columns[0]), tr)

    def condition_on(column: Any, tr: TableRoute) -> Any:
        """The rows whose key ``column`` is in buckets or slices the shard owns (a NULL
        key passes: it is the missing side of an outer join)."""
        # Arrays, not IN lists: an IN list is an "expanding" parameter, which an
        # executemany (a list of parameter sets) cannot carry.
        if isinstance(tr.strategy, HashStrategy):
            return or_(column.is_(None), func.shardkit.bucket(column, cluster.config.bucket_count)
                       != all_(bindparam(None, foreign_buckets, type_=ARRAY(Integer))))
        inside = []
        for sl in foreign_slices:
            if sl.group != tr.group:
                continue
            # Compared as the guard compares them: strings by their text in code point
            # order (the router's order), integers as bigint (a bound may not fit the column).
            bounds_are_str = any(isinstance(x, str) for x in (sl.lower, sl.upper, *sl.values))
            key = cast(column, Text).collate("C") if bounds_are_str else \
                cast(column, BigInteger if isinstance(column.type, Integer) else Numeric)
            if sl.values:
                inside.append(key == any_(bindparam(None, list(sl.values), type_=ARRAY(key.type))))
            elif not sl.default:  # a default never moves; its values are carved out first
                bounds = ([key >= sl.lower] if sl.lower is not None else []) + \
                    ([key < sl.upper] if sl.upper is not None else [])
                inside.append(and_(true(), *bounds))
        return or_(column.is_(None), not_(or_(false(), *inside)))

    def has_moving(element: Any) -> bool:
        return any(isinstance(e, Table) and moving_name(e) is not None for e in visitors.iterate(element))

    def filtered(stmt: Any) -> Any:
        """``stmt`` (a SELECT) with every moving table of its FROM clause restricted, each as
        the statement names it (an alias included), and derived tables (subqueries) filtered
        inside; a FROM item that holds a moving table shardkit cannot see into is refused."""
        conditions = []
        swaps: dict[Any, Any] = {}
        for sel in _from_items(stmt):
            base = getattr(sel, "element", sel)
            if isinstance(base, Table):
                if (n := moving_name(base)) is not None:
                    conditions.append(condition(sel, moving[n]))
            elif (inner := derived_select(sel)) is not None:
                if not has_moving(inner):
                    continue
                # A derived table's row carries the shard keys of the moving rows it comes
                # from (colocated: they are equal), so those columns filter it as a
                # table's own would: in WHERE, whatever side of an outer join it is on.
                exposed = [condition_on(c, moving[t]) for c, t in exposed_keys(sel)]
                if exposed:
                    conditions.extend(exposed)
                elif "parententity" not in sel._annotations:
                    # No key column outside: leave the rows out inside the derived table.
                    swaps[sel] = filtered(inner).subquery(sel.name)
                else:
                    # An ORM entity's subquery (aliased(Model, subquery)) cannot be swapped.
                    raise ScatterRefused(
                        f"a move of buckets is in progress and shard {shard} holds rows it does "
                        f"not own; the derived table {sel.name} does not select a moving table's "
                        "shard key, where shardkit could leave those rows out; select the key "
                        "in it, or run it after the move", construct="cross-shard statement "
                        "during a move", statement=statement)
            elif has_moving(sel):
                raise ScatterRefused(
                    f"a move of buckets is in progress and shard {shard} holds rows it does not "
                    "own; this cross-shard statement reads a moving table through a CTE, UNION "
                    "or other construct where shardkit cannot leave those rows out; run it "
                    "after the move, or per shard",
                    construct="cross-shard statement during a move", statement=statement)
        if swaps:
            def swap(element: Any, **kw: Any) -> Any:
                if element in swaps:
                    return swaps[element]
                table = getattr(element, "table", None)
                if table is not None and table in swaps:
                    return swaps[table].c[element.key]
                return None
            stmt = visitors.replacement_traverse(stmt, {}, swap)
        return stmt.where(*conditions) if conditions else stmt

    if isinstance(statement, (Update, Delete)):
        n = moving_name(statement.table) if hasattr(statement.table, "fullname") else None
        tr = moving.get(n) if n is not None else None
        if tr is not None:
            return statement.where(condition(statement.table, tr))
    elif isinstance(statement, selectable.Select):
        out = filtered(statement)
        if out is not statement:
            return out
    raise ScatterRefused(
        f"a move of buckets is in progress and shard {shard} holds rows it does not own; this "
        "cross-shard statement does not name a moving table in its FROM clause where shardkit can "
        "leave those rows out (a subquery, CTE or UNION); run it after the move, or per shard",
        construct="cross-shard statement during a move", statement=statement)


def _from_items(stmt: Any) -> Iterator[Any]:
    """The tables, aliases and subqueries in ``stmt``'s FROM clause (joins opened up), as
    the statement itself holds them.

    For an ORM statement, SQLAlchemy computes the FROM clause at compile time and adds
    what eager loaders join, under aliases made anew for each compilation (and with
    LIMIT, wraps the entity query in a subquery): conditions on those would name
    objects the executed statement does not have.  So the FROM clause is taken without
    LIMIT, and of what it holds only the tables and the items the statement itself
    refers to are kept (a condition on an entity's table lands inside SQLAlchemy's
    wrapping subquery, where the LIMIT is)."""
    orm = stmt._propagate_attrs.get("compile_state_plugin") == "orm"
    view = stmt.limit(None).offset(None) if orm and (stmt._limit_clause is not None or
                                                    stmt._offset_clause is not None) else stmt
    own: set[Any] | None = None
    if orm:
        own = set()
        for e in visitors.iterate(stmt):
            own.add(e)
            t = getattr(e, "table", None)
            if t is not None:
                own.add(t)
    for f in view.get_final_froms():
        for sel in sql_util.surface_selectables(f):
            if isinstance(sel, (selectable.Join, selectable.FromGrouping)):
                continue
            if own is None or isinstance(sel, Table) or sel in own:
                yield sel


def _with_bind_values(statement: Any, values: Mapping[str, Any]) -> Any:
    """A copy of ``statement`` whose parameters named in ``values`` have those values:
    a split IN list gives each shard its own values.

    Not ``params()``: SQLAlchemy 2.1 keeps those values beside the statement, and a
    cached compilation executes with the bound values instead; nor in-place
    ``cloned_traverse``, which leaves ORM-annotated criteria shared.  New bind
    parameters under the same keys keep the statement's cache key, so the
    compiled form is still reused.
    """

    def replace(element: Any, **kw: Any) -> Any:
        if isinstance(element, BindParameter) and element.key in values:
            return element._with_value(values[element.key], maintain_key=True, required=False)
        return None

    return visitors.replacement_traverse(statement, {}, replace)


def _learn_names(cluster: Cluster, shard: str, known: dict[str, bool], names: Iterable[str],
                 answer_sql: str, held: Any = None) -> bool:
    """Add to ``known`` what the database says of the ``names`` it lacks (``answer_sql``: a
    boolean expression of the name ``n``); False if no node of ``shard`` answers.
    ``held``: see :func:`_ask_any_node`."""
    unknown = sorted(n for n in set(names) if n not in known)
    if not unknown:
        return True
    found = _ask_any_node(cluster, shard, sa_text(
        f"{OWN_QUERY}SELECT n, {answer_sql} FROM unnest(CAST(:names AS text[])) AS n"), {"names": unknown}, held)
    if found is None:
        return False
    known.update(dict(found))
    return True


def _refuse_unknown_aggregates(cluster: Cluster, statement: Any, shard: str, held: Any = None) -> None:
    """Refuse aggregates the merge does not know (a CREATE AGGREGATE of the application's,
    an extension's): taken for plain functions, each shard's one row would be returned side
    by side.  Which names are aggregates is asked of the database once per name."""
    if not isinstance(statement, (selectable.Select, selectable.CompoundSelect)):
        return
    names = _per_shape(cluster.router, statement, _function_names)
    kinds = cluster.function_kinds
    if not _learn_names(cluster, shard, kinds, names,
                        "coalesce((SELECT bool_or(prokind IN ('a', 'w')) FROM pg_proc "
                        "WHERE proname = n), false)", held):
        return  # no node of the shard answers: the read itself will say so
    for n in sorted(names):
        if kinds.get(n):
            raise ScatterRefused(
                f"{n}() is an aggregate shardkit does not know how to merge from per-shard "
                "partials; add the shard key, or compute it from the rows",
                construct=f"{n}()", statement=statement)


# What the questions shardkit asks a shard's database while it serves a statement (its
# collation, what a function name is) start with, so that a listener counting an
# application's statements (the demo's) can tell them apart.
OWN_QUERY = "/* shardkit */ "


def _ask_any_node(cluster: Cluster, shard: str, query: Any, params: Any = None,
                  held: Any = None) -> list[Any] | None:
    """``query``'s rows from the primary of ``shard``, or one of its replicas while the
    primary is down (a question about the database, which they share); None if none answers.

    ``held``: a connection to a node of ``shard`` that the asking session's transaction
    holds (see :func:`_question_node`), asked first: a second checkout from that node's pool
    would wait for a connection forever (its pool's timeout) when the sessions holding them
    all ask at once (a pool of one: every time)."""
    if held is not None:
        try:
            return list(held.execute(query, params or {}).all())
        except (ShardUnavailable, sa_exc.DBAPIError) as e:
            if not isinstance(e, ShardUnavailable) and not e.connection_invalidated:
                # The transaction failed already (not the node): the session holds that
                # node's connection, so a second one would wait for it; the read itself
                # says what is wrong.
                return None
            # That node is gone: asked as before, and the read itself says so.
    engines = [cluster.primary(shard)] + [cluster.engine(shard, REPLICA, i)
                                          for i in range(cluster.replica_count(shard))]
    for engine in engines:
        try:
            with engine.connect() as conn:
                return list(conn.execute(query, params or {}).all())
        except (ShardUnavailable, sa_exc.OperationalError):
            continue
    return None


def _text_collation(cluster: Cluster, shard: str, held: Any = None) -> str | None:
    """The default collation of ``shard``'s database if it does not order text by code
    point, "" if it does, None if no node answers.  Asked once per shard."""
    collation = cluster.text_collations.get(shard)
    if collation is None:
        # The locale's name: datlocale (PostgreSQL 17), daticulocale (15, 16), datcollate.
        found = _ask_any_node(cluster, shard, sa_text(
            f"{OWN_QUERY}SELECT 'a' < 'B', coalesce(j->>'datlocale', j->>'daticulocale', j->>'datcollate') "
            "FROM (SELECT to_jsonb(d) AS j FROM pg_database d WHERE datname = current_database()) AS x"),
            held=held)
        if found is None:
            return None  # no node of the shard answers: the read itself will say so
        linguistic, name = found[0]
        collation = cluster.text_collations[shard] = "" if not linguistic else str(name)
    return collation


# Per cluster: collation name -> whether it is deterministic (asked of the database once).
_DETERMINISTIC: weakref.WeakKeyDictionary[Cluster, dict[str, bool]] = weakref.WeakKeyDictionary()


def _refuse_nondeterministic_collations(cluster: Cluster, plan: Any, shard: str,
                                        statement: Any, held: Any = None) -> None:
    """GROUP BY, DISTINCT and UNION merge the shards' values by Python equality, which is
    PostgreSQL's only under a deterministic collation: under a nondeterministic one (a
    case-insensitive ICU collation) 'a' and 'A' are one value, and the merge would return
    both.  Whether each collation named is deterministic is asked of the database once."""
    known = _DETERMINISTIC.setdefault(cluster, {})
    if not _learn_names(cluster, shard, known, {name for name, _ in plan.collations},
                        "coalesce((SELECT bool_and(collisdeterministic) FROM pg_collation "
                        "WHERE collname = n), true)", held):
        return  # no node of the shard answers: the read itself will say so
    for name, use in plan.collations:
        if known.get(name) is False:
            raise ScatterRefused(
                f"{use} over text under the nondeterministic collation {name}: values that "
                "collation holds equal ('a' and 'A' under a case-insensitive one) differ for "
                "shardkit's merge, which would return each shard's spelling; group by a "
                "normalised value (lower(...)), compare under a deterministic collation "
                "(.collate('C')), or add the shard key",
                construct=f"{use} over a nondeterministic collation", statement=statement)


def _refuse_collated_text(cluster: Cluster, statement: Any, shard: str, held: Any = None) -> None:
    """The merge compares text by code point, which is PostgreSQL's order only under the
    C (or C.UTF-8, POSIX) collation: under any other, refuse instead of merging the shards'
    sorted streams out of order.  The database's default collation is asked once."""
    use = _per_shape(cluster.router, statement, _text_comparison)
    if use is None:
        return
    collation = _text_collation(cluster, shard, held)
    if collation:
        raise ScatterRefused(
            f"{use}: the database orders text by its collation ({collation}), shardkit's merge of "
            "the shards' rows by code point, which would mix up the order; add .collate('C') to "
            "the expression (or the column's type), or add the shard key",
            construct="text under the database's collation", statement=statement)


def _split_part(statement: Any, params: Any, part: Mapping[str, Any]) -> tuple[Any, Any]:
    """(statement, params) for one shard's share of split IN lists: values given as
    parameters (by the call, or with ``Statement.params()``) would override the
    statement's own, so they are replaced there too."""
    stmt = _with_bind_values(statement, part)
    if params is None or isinstance(params, Mapping):
        named = {k: v for k, v in part.items()
                 if (params is not None and k in params) or k in (getattr(statement, "_params", None) or ())}
        if named:
            params = {**(params or {}), **named}
    return stmt, params


def _run_on_shards(session: ShardedSession, statement: Any, params: Any, execution_options: Any,
                   bind_arguments: Any, route: Route) -> Result[Any]:
    if not route.is_write:
        return _scatter_read(session, statement, params, execution_options, bind_arguments, route)
    if route.router is None:  # one state of the moves for every shard
        route = dataclasses.replace(route, router=session.cluster.router)
    reference = len(route.shards) > 1 and _writes_reference_table(session.cluster, statement)
    _refuse_values_made_per_shard(session, statement, params, route.shards, reference)
    results = []
    steps: list[tuple[str, Any]] = [(shard, None if route.split is None else route.split.get(shard))
                                    for shard in route.shards]
    in_runs = not reference and _returns_in_order_despite_skips(statement, params, route)
    if in_runs:
        # An upsert may skip rows (ON CONFLICT DO NOTHING, DO UPDATE ... WHERE), so a
        # shard's RETURNING rows cannot be matched to its parameter sets by position:
        # each run of consecutive sets owned by one shard is its own statement there,
        # and the runs' rows, each in its sets' order, follow one another as the sets do.
        steps = _runs_by_shard(params, route)
    for shard, part in steps:
        # Read once: the rows left out and the check that they still are copies must
        # agree (the catalog's state may change in between).
        foreign = route.router.foreign_buckets.get(shard, frozenset())
        stmt = statement if isinstance(statement, Insert) else \
            _without_foreign_rows(session.cluster, shard, statement, route, foreign)
        p = params
        if route.split is not None:
            if isinstance(statement, Insert) and isinstance(part, list):
                p = part
            elif part:
                stmt, p = _split_part(stmt, params, part)
        eo, ba = _single(shard, PRIMARY, execution_options, bind_arguments)
        if foreign and stmt is not statement and session.cluster.catalog is not None:
            # Rows of these buckets are left out here as copies a move holds; if the
            # move has switched since this process heard of it, they are the rows.
            _ask_shard(session, shard, _NOT_FOREIGN_SQL, {"units": sorted(foreign)}, statement,
                       "would have left out rows this shard owns now", route.router)
        try:
            results.append(Session.execute(session, stmt, p, execution_options=eo, bind_arguments=ba))
        except sa_exc.DBAPIError as e:
            if results and reference:
                _note_reference_copy_failed(session, e, shard, statement.table,
                                            list(route.shards[:len(results)]))
            elif reference:
                e.add_note(f"(on shard {shard}, the first of the shards a write of reference "
                           f"table {statement.table} runs on: nothing was written)")
            raise
        if route.keys and session.cluster.catalog is not None:
            _check_still_owner(session, shard, statement, results[-1], one_key=route.keys == "one",
                               router=route.router)
    if reference:
        # Every shard holds a copy of a reference table, and the write changed each copy
        # alike: its result is one copy's, as on one database (not the copies' row counts
        # added up, nor each RETURNING row once per shard).  The copy this transaction
        # reads reference rows from, so that RETURNING(Model) objects are those its reads
        # return.
        if session._sk_ref_shard not in route.shards:
            session._sk_ref_shard = route.shards[0]
        keep = route.shards.index(session._sk_ref_shard)
        for i, r in enumerate(results):
            if i != keep:
                r.close()
        return results[keep]
    # ORM results of UPDATE/DELETE ... RETURNING are not cursor results: they have rows.
    if not any(getattr(r, "returns_rows", True) for r in results):
        counts = [getattr(r, "rowcount", 0) or 0 for r in results]
        first = results[0]
        if (isinstance(statement, Insert) and isinstance(params, list) and route.split is not None
                and len(results) > 1 and all(isinstance(r, CursorResult) for r in results)):
            # The primary keys of every shard's rows, in the order of the parameter sets
            # (the first shard's alone would drop the others' rows).
            first.context.inserted_primary_key_rows = _by_parameter_order(
                [r.inserted_primary_key_rows for r in results],
                [route.split[sh] for sh in route.shards], params)
        for r in results[1:]:
            r.close()
        # The caller sees one result for the statement; its rowcount is the sum
        # over shards, or -1 (unknown, as an executemany INSERT's is) if a shard's is.
        first.rowcount = -1 if any(c < 0 for c in counts) else sum(counts)  # type: ignore[misc]
        return first
    if len(results) == 1:
        return results[0]
    # The merged result has a rowcount, as one database's result has (merge() sets none
    # when the statement's count is unknown, and frozen rows carry none): the shards'
    # summed, or -1 (unknown) if a shard ran an executemany, whose RETURNING leaves the
    # cursor's count to its last batch (unless preserve_rowcount= kept the count).
    counts = [-1 if r.context.executemany and not r.context._has_rowcount else r.rowcount
              for r in results] if all(isinstance(r, CursorResult) for r in results) else None
    if (not in_runs and isinstance(statement, Insert) and statement._sort_by_parameter_order
            and isinstance(params, list) and route.split is not None):
        out = _in_parameter_order(results, [route.split[sh] for sh in route.shards], params)
    elif in_runs:
        # A run of one set runs as one statement, a run of several as an executemany whose
        # RETURNING carries a sentinel column SQLAlchemy sorts by and leaves out: each
        # result's rows are read by its own metadata (merge() reads them all by the first's,
        # adding or dropping a column).
        frozen = [r.freeze() for r in results]
        out = frozen[0].with_new_rows([row for f in frozen for row in f.data])()
    else:
        out = results[0].merge(*results[1:])
    if counts is not None:
        out.rowcount = -1 if any(c < 0 for c in counts) else sum(counts)  # type: ignore[attr-defined]
    return out


def _returns_in_order_despite_skips(statement: Any, params: Any, route: Route) -> bool:
    """Whether an executemany INSERT split by shard must return its RETURNING rows in the
    order of its parameter sets (``sort_by_parameter_order=True``) while a set may insert
    no row (an ``ON CONFLICT`` clause)."""
    return (isinstance(statement, Insert) and statement._sort_by_parameter_order
            and getattr(statement, "_post_values_clause", None) is not None
            and isinstance(params, list) and route.split is not None and len(route.shards) > 1)


def _runs_by_shard(params: list[Any], route: Route) -> list[tuple[str, list[Any]]]:
    """``params`` (an executemany split by ``route``) cut into runs of consecutive
    parameter sets of one shard, in their order: (shard, sets)."""
    owner: dict[int, list[str]] = {}
    for shard in route.shards:
        for p in route.split[shard]:  # type: ignore[index]
            owner.setdefault(id(p), []).append(shard)
    runs: list[tuple[str, list[Any]]] = []
    for p in params:
        shard = owner[id(p)].pop(0)
        if runs and runs[-1][0] == shard:
            runs[-1][1].append(p)
        else:
            runs.append((shard, [p]))
    return runs


def _in_parameter_order(results: list[Any], parts: list[list[Any]], params: list[Any]) -> Result[Any]:
    """The RETURNING rows of an executemany INSERT split by shard, in the order of its
    parameter sets (``returning(..., sort_by_parameter_order=True)``)."""
    frozen = [r.freeze() for r in results]
    out = frozen[0].with_new_rows([])
    out.data = _by_parameter_order([f.data for f in frozen], parts, params)
    return out()


def _by_parameter_order(rows: list[Any], parts: list[list[Any]], params: list[Any]) -> list[Any]:
    """Each shard's rows (in the order of its part of ``params``, the parameter sets it
    was given) interleaved in the order of ``params``."""
    at: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        at.setdefault(id(p), []).append(i)
    placed: list[tuple[int, Any]] = []
    for data, part in zip(rows, parts):
        if len(data) != len(part) or any(not at.get(id(p)) for p in part):
            # (SQLAlchemy refuses a count that differs with the sort): shard by shard.
            return [d for ds in rows for d in ds]
        placed.extend((at[id(p)].pop(0), d) for p, d in zip(part, data))
    return [d for _, d in sorted(placed, key=lambda x: x[0])]


def _per_shape(router: Any, statement: Any, check: Callable[[Any, Any], Any]) -> Any:
    """``check(statement, router)``, kept per statement shape (SQLAlchemy's cache key): what
    a cross-shard read's checks find depends on the statement's shape, not its values."""
    ck = statement._generate_cache_key() if hasattr(statement, "_generate_cache_key") else None
    if ck is None:
        return check(statement, router)
    cache = router.scatter_checks
    key = (check, ck.key)
    found = cache.get(key, _UNCHECKED)
    if found is _UNCHECKED:
        found = check(statement, router)
        if len(cache) > 5000:
            cache.clear()
        cache[key] = found
    return found


_UNCHECKED = object()


def _reference_rows(statement: Any, router: Any) -> str | None:
    # (It compiles ORM statements.)
    if isinstance(statement, selectable.CompoundSelect):
        # Each shard runs every part: a part over reference rows returns them once per shard.
        keyword = compound_keyword(statement)
        for i, part in enumerate(compound_parts(statement), 1):
            problem = reference_rows_problem(part, router._placement)
            if problem:
                return f"part {i} of its {keyword} would repeat reference rows: {problem}"
        return None
    return reference_rows_problem(statement, router._placement)


def _function_names(statement: Any, router: Any) -> frozenset[str]:
    if isinstance(statement, selectable.CompoundSelect):
        return frozenset(n for part in compound_parts(statement)
                         if isinstance(part, selectable.Select)
                         for n in _function_names(part, router))
    return frozenset(n for c in (*statement._raw_columns, *statement._order_by_clauses,
                                 *statement._having_criteria) for n in function_names(c))


def _text_comparison(statement: Any, router: Any) -> str | None:
    return text_comparison(statement)


def refuse_strict_scatter(statement: Any, execution_options: Any, sc: RoutingScope,
                          session_strict: bool, route: Route) -> None:
    """Refuse a read on several shards in strict mode (the statement's option, the scope's or
    the session's).  Needs no database: ``Cluster.explain`` makes it too (without a session)."""
    if _flag("shardkit_strict", statement, execution_options) or sc.strict or session_strict:
        raise ScatterRefused(
            f"strict mode: this query would run on shards {', '.join(route.shards)} ({route.reason}); "
            "add the shard key or name a shard",
            construct="scatter in strict mode", statement=statement,
        )


def refuse_scatter_rows(router: Router, statement: Any, route: Route) -> None:
    """Refuse a read on several shards whose rows the shards would repeat (rows of reference
    tables), before planning its merge.  Needs no database: ``Cluster.explain`` makes it too."""
    own = getattr(statement, "_execution_options", None) or {}
    if own.get("shardkit_reference_read") and any(
            isinstance(k, tuple) and k[:1] == ("orig_query",) for k in own):
        raise ScatterRefused(
            "subqueryload of sharded rows from reference rows runs on every shard, and the "
            "merge cannot keep SQLAlchemy's order of the collection's rows; use selectinload "
            "(or a lazy load) for this relationship", construct="subqueryload from reference rows",
            statement=statement)
    problem = _per_shape(router, statement, _reference_rows)
    if problem:
        raise ScatterRefused(
            f"this query runs on shards {', '.join(route.shards)} and {problem}; select from "
            "the sharded table, add the shard key, or name a shard",
            construct="reference table rows across shards", statement=statement)


def plan_scatter_read(statement: Any, params: Any, router: Router | None = None) -> tuple[Any, Any]:
    """:func:`plan_scatter` for a read with the call's parameters (over the statement's own),
    with ``router``'s placement of the tables (count(DISTINCT shard key) needs it)."""
    placement, disjoint = (None, frozenset()) if router is None else (router._placement, router.disjoint_groups)
    return plan_scatter(
        statement, with_statement_params(statement, params) if getattr(statement, "_params", None) else params,
        placement, disjoint)


def refuse_scatter_page(statement: Any, plan: Any, execution_options: Any = None) -> None:
    """Refuse a page (LIMIT/OFFSET) read on several shards whose rows outside the merged page
    would be locked or refreshed.  Needs no database: ``Cluster.explain`` makes it too (with
    the statement's own execution options)."""
    if plan.limit is not None or plan.offset:
        # Each shard reads LIMIT + OFFSET rows and the merge keeps the page: the rows it
        # drops must have had no effect.
        lo = _option("_sa_orm_load_options", statement, execution_options)
        effect = ("FOR UPDATE" if getattr(statement, "_for_update_arg", None) is not None else
                  "populate_existing" if _option("populate_existing", statement, execution_options)
                  or getattr(lo, "_populate_existing", False) else None)
        if effect:
            raise ScatterRefused(
                f"{effect} with LIMIT/OFFSET across shards: each shard reads a page of its own "
                f"and the merge keeps one, so rows outside it would be {'locked' if effect == 'FOR UPDATE' else 'refreshed (losing pending changes)'} "
                "too; select the page's keys first, then lock or refresh those rows by key",
                construct=f"{effect} with LIMIT", statement=statement)


class _NewSession:
    """What routing reads of a session, for a statement run first in a new one: its cluster,
    no strict mode, and no shard chosen yet for reference rows (the next in turn, not taken)."""

    strict = False

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._sk_ref_shard = cluster.router.next_any_shard()


def explain_route(cluster: Cluster, statement: Any, params: Any, all_shards: bool) -> Route:
    """The route :meth:`Cluster.explain` reports: the one execution takes in a new session,
    in the scope in force, with the statement's own execution options (and
    ``shardkit_all_shards`` if ``all_shards``), refused as execution refuses it before it
    asks a database.  It runs nothing, and takes no turn of the shards."""
    # As Session.execute() takes it: a string (SQL not in text()) or None is an ArgumentError,
    # not a route of a statement "of no tables" (any shard, a read) whatever the SQL says.
    statement = coercions.expect(roles.StatementRole, statement)
    if isinstance(statement, (lambdas.StatementLambdaElement, lambdas.NullLambdaStatement)):
        # Routed, planned and merged as the statement it builds (as execute() does).
        statement = statement._resolved
    if problem := switch_problem("all_shards", all_shards):
        raise sa_exc.ArgumentError(problem)
    sc = current_scope()
    options = _ALL_SHARDS if all_shards else util.EMPTY_DICT
    session = _NewSession(cluster)
    if params and isinstance(params, list) and isinstance(statement, Update):
        mapper = _orm_bulk_update_of(statement, options)
        if mapper is not None:
            # An ORM bulk UPDATE by primary key: each row on its shard key's shard, as
            # execution sends it (whatever the scope or shardkit_all_shards).
            _bulk_synchronize(statement, None)
            tr, _, _, _, by_shard, _ = _bulk_update_rows(session, cluster.router, mapper, params)
            shards = tuple(s for s in cluster.shard_names if s in by_shard)
            kind = "direct" if len(shards) == 1 else "all" if len(shards) == len(cluster.shard_names) else "multi"
            return Route(shards, kind, PRIMARY, "ORM bulk UPDATE by primary key: each row on its "
                         "shard key's shard", True, (tr.table,), router=cluster.router)
    route = _route_statement(session, statement, params, options, None, sc)  # type: ignore[arg-type]
    if getattr(statement, "_for_update_arg", None) is not None:
        route = _locked_reference_rows_on_first(cluster, statement, params, route)
    if (route.is_write and params and isinstance(statement, Insert)
            and statement._propagate_attrs.get("compile_state_plugin") == "orm"):
        _refuse_orm_bulk_insert(statement)  # (as execution's _orm_bulk_insert)
    if route.is_write:
        # A reference table's write leaving a value each shard would make: refused as it runs.
        _refuse_values_made_per_shard(session, statement, params, route.shards)  # type: ignore[arg-type]
    if not route.is_write and route.role == PRIMARY and _replica_preferred(cluster, statement, options, sc, route):
        route = dataclasses.replace(route, role=REPLICA)
    if route.is_scatter and not route.is_write:
        refuse_strict_scatter(statement, options, sc, False, route)
        refuse_scatter_rows(cluster.router, statement, route)
        try:
            plan = plan_scatter_read(statement, params, route.router or cluster.router)[1]
        except ScatterRefused as e:
            merge = f"refused: {e}"
        else:
            refuse_scatter_page(statement, plan)
            merge = plan.description
            if plan.kind != "any" and isinstance(statement, selectable.Select):
                router = route.router or cluster.router
                merge += describe_local_derived(statement, router._placement, router.disjoint_groups)
        route = dataclasses.replace(route, merge=merge)
    return route


_ALL_SHARDS: Mapping[str, Any] = util.immutabledict({"shardkit_all_shards": True})


def _replica_preferred(cluster: Cluster, statement: Any, options: Any, sc: RoutingScope,
                       route: Route) -> bool:
    """Whether a new session sends a read on ``route``'s shards to their replicas (a fresh
    enough one, when it runs; else the primary): as ShardedSession._read_target decides
    before it looks at the replicas' state.  Not ``FOR UPDATE``, nor forced to the primary by
    the statement or the scope, nor under ``strong`` consistency unless forced to a
    replica; every shard of the route has a replica."""
    role, consistency, _, _ = _checked_options(_options(statement, options))
    if role is None and consistency is None:
        role = sc.role
    if role == PRIMARY or getattr(statement, "_for_update_arg", None) is not None:
        return False
    if not route.shards or not all(cluster.replica_count(s) for s in route.shards):
        return False
    consistency = consistency or sc.consistency or cluster.replica_settings.consistency
    return consistency != "strong" or role == REPLICA


def _question_node(session: ShardedSession, shards: Sequence[str]) -> tuple[str, Any]:
    """(shard, connection or None): where a cross-shard read on ``shards`` asks the database
    what its checks need to know (once per name or shard): a shard to which the session's
    transaction holds a connection (its primary's first), and that connection; else the
    first shard, on a connection of its own."""
    trans = session.get_transaction()
    conns = getattr(trans, "_connections", None) if trans is not None else None
    if conns:
        engines = session.cluster._engines
        held: dict[str, Any] = {}
        for shard in shards:
            for i in range(-1, session.cluster.replica_count(shard)):
                eng = engines.get((shard, PRIMARY, 0) if i < 0 else (shard, REPLICA, i))
                entry = conns.get(eng) if eng is not None else None
                if entry is None or entry[0].invalidated:
                    continue  # (an invalidated connection is back in its pool)
                if not _failed_transaction(entry[0]):
                    return shard, entry[0]
                if i < 0:
                    held[shard] = entry[0]
        # An error aborted the transaction on the connections it holds: a shard whose
        # primary it does not hold asks on a connection of its own (a second one of a
        # pool the session holds one of would wait for the session, with a pool of one
        # until the pool's timeout); else the read itself says what is wrong.
        for shard in shards:
            if shard not in held:
                return shard, None
        return shards[0], held[shards[0]]
    return shards[0], None


def _decides_scatter(error: BaseException | None, replica: int | None) -> bool:
    """Whether a shard's ``error`` fails a cross-shard read (without partial results)
    whatever the other shards answer: not a replica's that its shard is read again on
    another node for (the replica died, or a recovery conflict cancelled the read: see
    _replica_read_failed; a replica's statement_timeout or error of its own does decide),
    nor the database refusing the statement itself, which every shard may refuse
    alike (its own error is raised then, see _scatter_read), nor a transaction an earlier
    error aborted (each shard where it is aborted fails at once: the error names them all)."""
    if error is None:
        return False
    if replica is not None and (isinstance(error, ShardUnavailable) or getattr(
            getattr(error, "orig", None), "sqlstate", None) == _RECOVERY_CONFLICT):
        return False
    if isinstance(error, sa_exc.DBAPIError) and not isinstance(error, ShardUnavailable) \
            and not error.connection_invalidated:
        state = getattr(error.orig, "sqlstate", None)
        return not (state and (state[:2] in _STATEMENT_REFUSED or state == "25P02"))
    return True


def _failed_transaction(conn: Any) -> bool:
    """Whether an error aborted the transaction of ``conn`` (a SQLAlchemy Connection)."""
    try:
        return conn.connection.dbapi_connection.info.transaction_status == TransactionStatus.INERROR
    except Exception:  # noqa: BLE001 - not a live psycopg connection: not known to have failed
        return False


def _scatter_read(session: ShardedSession, statement: Any, params: Any, execution_options: Any,
                  bind_arguments: Any, route: Route) -> Result[Any]:
    """Run a read on several shards at once and merge the rows exactly."""
    sc = current_scope()
    refuse_strict_scatter(statement, execution_options, sc, session.strict, route)
    refuse_scatter_rows(session.cluster.router, statement, route)
    shard_stmt, plan = plan_scatter_read(statement, params, route.router or session.cluster.router)
    refuse_scatter_page(statement, plan, execution_options)
    # The checks that ask the database (once per name or cluster): explain() cannot make them.
    ask, held = _question_node(session, route.shards)
    if not plan.whole_groups:   # (grouped by the shard key: each shard computes them whole)
        _refuse_unknown_aggregates(session.cluster, statement, ask, held)
    if plan.collations:
        _refuse_nondeterministic_collations(session.cluster, plan, ask, statement, held)
    if plan.kind in ("ordered", "aggregate", "group"):
        _refuse_collated_text(session.cluster, statement, ask, held)
        if any(not equality for _, equality, _ in plan.checks):
            # Expressions with no SQL type ordered or compared: text among their values is
            # refused as it comes, if the database does not order text by code point.
            plan.text_collation = _text_collation(session.cluster, ask, held) or ""
    partial_ok = _flag("shardkit_partial_results", statement, execution_options)
    timeout = _option("shardkit_timeout", statement, execution_options)
    cluster = session.cluster
    source = "execution option shardkit_timeout"
    if timeout is None:
        timeout, source = cluster.scatter_timeout, "cluster.scatter_timeout"
    if timeout is not None and _bad_timeout(timeout):
        # Refused before any shard runs it.
        raise sa_exc.ArgumentError(_timeout_message(source, timeout))

    # Choose each shard's node and check out its connection here, in one fixed
    # order (the config's, in which a write on several shards takes them too):
    # concurrent scatters and writes then never wait on each other's pools in a
    # cycle, so a burst of them cannot deadlock.
    tasks = []
    failures: dict[str, BaseException] = {}
    first_reads: dict[str, bool] = {}
    if route.router is None:  # one state of the moves for every shard
        route = dataclasses.replace(route, router=cluster.router)
    names = route.router.shard_names
    # The shards' waits for replicas to reach the session's position share one wait_for_token.
    deadline = time.monotonic() + cluster.replica_settings.wait_for_token
    prepared: dict[str, tuple[Any, Any]] = {}
    tried: dict[str, set[int]] = {}   # per shard: the replicas that failed this read

    def checkout(shard: str, tried: set[int]) -> None:
        """Choose ``shard``'s node (not a replica of ``tried``) and check out its connection:
        a task for the shard's threads, or the shard's failure."""
        stmt, shard_params = prepared[shard]
        while True:
            index = None
            try:
                index = session._read_target(shard, statement, execution_options, sc, frozenset(tried),
                                             deadline) if cluster.has_replicas else None
                role = PRIMARY if index is None else REPLICA
                eo, ba = _single(shard, role, execution_options, bind_arguments)
                # Any flush already ran in this thread; the shard threads must not flush.
                eo = eo.union({"autoflush": False})
                if index is not None:
                    ba["shardkit_replica"] = index
                    if session._transactional_read(statement, execution_options):
                        ba["shardkit_stream"] = True
                conn = Session.connection(session, bind_arguments=ba)
            except ShardUnavailable as e:
                # A replica that refused the connection is banned: choose again.
                # Otherwise no node of this shard can serve the read.
                if index is not None and session._replica_read_failed(shard, index, e):
                    tried.add(index)
                    session._unpin_failed(shard, index, first_reads[shard])
                    continue
                failures[shard] = e
                return
            tasks.append((shard, index, stmt, eo, ba, conn, shard_params))
            return

    for shard in sorted(route.shards, key=lambda s: (names.index(s), s) if s in names else (len(names), s)):
        stmt = _without_foreign_rows(cluster, shard, shard_stmt, route)
        shard_params = params
        if route.split is not None and route.split.get(shard):
            stmt, shard_params = _split_part(stmt, params, route.split[shard])
        prepared[shard] = (stmt, shard_params)
        first_reads[shard] = shard not in session._sk_replica
        tried[shard] = set()
        checkout(shard, tried[shard])
        if failures and not partial_ok:
            # The read fails whatever the other shards answer: run it on none of them.
            raise ScatterError(failures)

    def run(task: Any) -> Any:
        shard, index, stmt, eo, ba, conn, shard_params = task
        return Session.execute(session, stmt, shard_params, execution_options=eo, bind_arguments=ba)

    def gather(batch: list[Any]) -> tuple[dict[Any, Any], set[Any], bool, set[Any]]:
        """Run ``batch``'s tasks on the scatter threads until they end or the deadline
        passes: (futures, those not done in time, whether a failure decided the read,
        those whose connection was closed)."""
        # Each shard's execution runs with a copy of the caller's context: do_orm_execute
        # hooks that read request state from contextvars (with_loader_criteria for
        # tenants, soft deletes) filter every shard's rows as they filter a one-shard read.
        # (Submitted through the cluster: a dispose() meanwhile must not fail the read after
        # some shards' queries started on the session's connections.)
        futures = {cluster.scatter_submit(contextvars.copy_context().run, run, t): t for t in batch}
        # Ctrl-C (KeyboardInterrupt) or another exception raised in this thread while it
        # waits: the queries still running are cancelled as past a deadline, and the
        # exception raised once they have stopped, as psycopg does on one connection (left
        # running, they would hold the session's connections and the scatter threads).
        interrupted: BaseException | None = None
        # Without partial results, a shard's failure decides the read (a ScatterError, whatever
        # the others answer): the queries still running are cancelled then, as past a deadline,
        # not waited for (a slow or blocked shard would hold the caller, the session's
        # connections and the servers for nothing).
        failed_fast = False
        try:
            if partial_ok or len(futures) < 2:
                not_done = wait(futures, timeout=None if end is None else max(0.0, end - time.monotonic()))[1]
            else:
                not_done = set(futures)
                while not_done:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    done, not_done = wait(not_done, timeout=left, return_when=FIRST_EXCEPTION)
                    if not done:
                        break
                    if not_done and any(_decides_scatter(f.exception(), futures[f][1]) for f in done):
                        failed_fast = True
                        break
        except BaseException as e:
            interrupted = e
            not_done = {f for f in futures if not f.done()}
        # Past the deadline: a query still queued (every scatter thread busy) never starts;
        # one running is cancelled on its server, again until it stops (a cancel that
        # reaches the server before the query does is lost).  One the cancels have not
        # stopped within CANCEL_GRACE (PgBouncer ignores them while the query waits in its
        # queue for a server connection) has its connection's socket shut down.
        running = {f for f in not_done if not f.cancel()}
        give_up = time.monotonic() + CANCEL_GRACE
        cut: set[Any] = set()
        # Each cancel request is sent from a thread of its own: one to a server that does
        # not answer (frozen, or its host gone) would otherwise hold this loop past give_up.
        cancels: dict[Any, Any] = {}
        while running:
            for f in running:
                if f in cut:
                    continue
                try:
                    dbapi_conn = futures[f][5].connection.dbapi_connection
                    if time.monotonic() < give_up:
                        # The shard's thread then fails with QueryCanceled.
                        if f not in cancels or not cancels[f].is_alive():
                            cancels[f] = send_cancel(dbapi_conn, CANCEL_GRACE)
                    elif shut_down_socket(dbapi_conn):
                        cut.add(f)  # its thread fails at once: the connection is lost
                except Exception:  # noqa: BLE001 - the failure below reports the shard
                    pass
            running = wait(running, timeout=0.2)[1]
        # A cancel request still on its way cancels whatever runs on the connection when it
        # arrives: the session's next statement there, or another session's once the
        # connection is back in the pool.  Each is waited for (the query it was sent for has
        # ended: it finds the connection idle, and is ignored); one still unanswered by
        # give_up (a server that does not answer) costs the connection.
        stray = set()
        for f, thread in cancels.items():
            thread.join(max(0.0, give_up - time.monotonic()))
            if thread.is_alive():
                stray.add(f)
        for f in cut | stray:
            # Every thread is done: the connections whose socket is shut down are never used
            # again (a query that ended just before has left its connection looking fine).
            shard, index, conn = futures[f][0], futures[f][1], futures[f][5]
            try:
                if not conn.invalidated:
                    conn.invalidate()
            except Exception:  # noqa: BLE001 - it is invalid either way
                pass
            if index is not None:
                # A replica's (autocommit) connection: the session's next read there starts
                # afresh, as it would after a cancel.
                session._forget_connection(shard, index)
        if interrupted is not None:
            for f in futures:
                if not f.cancelled() and f.exception() is None:
                    try:
                        f.result().close()
                    except Exception:  # noqa: BLE001 - its connection may be shut down
                        pass
            for r in results.values():
                r.close()
            raise interrupted
        return futures, not_done, failed_fast, cut

    results: dict[str, Any] = {}

    def collect(futures: dict[Any, Any], not_done: set[Any], failed_fast: bool,
                cut: set[Any]) -> list[str]:
        """Each shard's result or failure, from a gather(); the shards to read again on
        another node (their replica died under the read or cancelled it)."""
        again = []
        for f, (shard, index, stmt, eo, ba, conn, shard_params) in futures.items():
            if f in not_done:
                if failed_fast:
                    own = None if f.cancelled() or f in cut else f.exception()
                    if own is not None and getattr(getattr(own, "orig", None), "sqlstate", None) != "57014":
                        failures[shard] = own  # it failed by itself (not by the cancel)
                        continue
                    # Stopped because another shard failed: not a failure of its own.
                    if not f.cancelled() and f.exception() is None:
                        try:
                            f.result().close()
                        except Exception:  # noqa: BLE001 - its connection may be shut down
                            pass
                    continue
                # No answer within the timeout, whatever the thread did after it.
                cause = None if f.cancelled() or f in cut else f.exception()
                if not f.cancelled() and f.exception() is None:
                    try:
                        f.result().close()  # finished just after the deadline: not used
                    except Exception:  # noqa: BLE001 - its connection may be shut down
                        pass
                failures[shard] = ShardUnavailable(
                    f"shard {shard}: no answer within {timeout:g} s " + (
                        "(the cancel did not stop it: its connection was closed)" if f in cut
                        else "(query cancelled)"),
                    shard=shard, cause=cause)
                continue
            try:
                results[shard] = f.result()
            except Exception as e:  # noqa: BLE001 - reported per shard below
                if index is not None and isinstance(
                        e, (ShardUnavailable, sa_exc.DBAPIError)) and session._replica_read_failed(
                            shard, index, e, ba.get("shardkit_stream", False)):
                    # A replica died under the read or cancelled it: read that shard
                    # again on another node (autocommit replica reads are safe to retry).
                    session._unpin_failed(shard, index, first_reads[shard])
                    if not partial_ok and (not_done or any(
                            _decides_scatter(g.exception(), futures[g][1]) for g in futures if g not in not_done)):
                        # Unless the read has failed already (past its deadline, or another
                        # shard's failure decided it): not read again for nothing.
                        failures[shard] = e
                        continue
                    if end is not None and time.monotonic() >= end:
                        # Its deadline has passed: it did not answer in time.
                        failures[shard] = ShardUnavailable(
                            f"shard {shard}: no answer within {timeout:g} s (its replica failed: "
                            f"{first_line(e)})", shard=shard, cause=e)
                        continue
                    tried[shard].add(index)
                    again.append(shard)
                    continue
                failures[shard] = e
        return again

    # The deadline counts from here; a shard read again on another node (its replica failed
    # under the read) is read within what is left of it, on the scatter threads as well.
    end = None if timeout is None else time.monotonic() + timeout
    again = collect(*gather(tasks))
    while again and not (failures and not partial_ok):
        start = len(tasks)
        for shard in again:
            checkout(shard, tried[shard])
        again = collect(*gather(tasks[start:])) if not (failures and not partial_ok) else []
    # (A RoutingError: a do_orm_execute listener's change refused in each shard's execution.)
    usage = next((e for e in failures.values() if isinstance(e, sa_exc.InvalidRequestError) or (
        isinstance(e, RoutingError) and not isinstance(e, NotOwned))), None)
    if usage is None and not results and failures:
        # The database refused the statement itself (a column that does not exist, a
        # FOR UPDATE it cannot apply, an operator for the wrong types): every shard ran
        # it and failed with the same SQLSTATE, the connections intact.  The caller gets
        # the error one database gives (ProgrammingError, NotSupportedError, ...), not a
        # ScatterError saying shards failed, as if they were unavailable.  Only for the
        # SQLSTATE classes of a statement that cannot run (syntax or access rule, feature
        # not supported, data exception): a timeout, lock or conflict is a shard failure,
        # which shardkit_partial_results may accept.
        errors = [failures.get(s) for s in route.shards]
        states = {getattr(getattr(e, "orig", None), "sqlstate", None) for e in errors}
        if (all(isinstance(e, sa_exc.DBAPIError) and not isinstance(e, ShardUnavailable)
                and not e.connection_invalidated for e in errors)
                and len(states) == 1 and None not in states
                and next(iter(states))[:2] in _STATEMENT_REFUSED):
            usage = errors[0]
    if usage is not None:
        # SQLAlchemy refused the statement itself (yield_per with a joined collection,
        # ...), the same on every shard: its own error, not a shard failure.
        for r in results.values():
            r.close()
        raise usage
    if failures and partial_ok:
        # A failed statement aborts its transaction on that shard's primary.
        # Commit would then end it with a silent rollback: never with writes
        # in it (those are lost: the whole transaction is rolled back and the
        # caller told), and without any, the shard's connection starts afresh.
        lost = sorted(t[0] for t in tasks
                      if t[0] in failures and t[1] is None and t[0] in session._sk_written)
        if lost:
            for r in results.values():
                r.close()
            session.rollback()
            raise ScatterError({sh: failures[sh] for sh in lost}, note=(
                f"the session had written to {', '.join(lost)} in this transaction, which the "
                "failure aborted there; the whole transaction was rolled back"))
        for shard, index, *_rest in tasks:
            if shard in failures:
                # Start that shard's connection afresh: a failed statement aborted its
                # transaction (the primary's, or a streamed replica read's).
                session._forget_connection(shard, index)
    if failures and not partial_ok:
        for r in results.values():
            r.close()
        raise ScatterError(failures)
    ordered = [results[s] for s in route.shards if s in results]
    if not ordered:
        raise ScatterError(failures)
    first = ordered[0]
    # The metadata's keys, not keys(): an unnamed entity (aliased(Model)) has the key
    # None, which keys() leaves out.
    all_keys = list(first._metadata._keys)
    # A joinedload of a collection gives each parent one row per child: each
    # shard's result folds them (objects of different shards are never equal).
    needs_unique = first._unique_filter_state
    if needs_unique is not None:
        limited = plan.limit is not None or plan.offset
        refusal = None
        if limited and _inner_joined_collection(statement):
            refusal = ("this cross-shard query loads a collection with joinedload(..., innerjoin=True) "
                       "(or relationship(..., lazy='joined', innerjoin=True)) and has LIMIT/OFFSET: "
                       "the inner join drops parents without children after each shard's limit, and "
                       "the merge cannot tell which page one database would return; "
                       "use selectinload, or filter the parents with .has()/.any()",
                       "inner joinedload with LIMIT")
        elif limited and _may_repeat_entities(statement):
            refusal = ("this cross-shard query loads a collection in its own rows (joinedload, "
                       "contains_eager) and has LIMIT/OFFSET "
                       "over a join that can repeat its entities: one database counts the joined rows, "
                       "shardkit's merge would count distinct entities; use selectinload, or drop the "
                       "join's duplicates (an EXISTS instead of the join)",
                       "joinedload with LIMIT over a join")
        if refusal is not None:
            for r in ordered:
                r.close()
            raise ScatterRefused(refusal[0], construct=refusal[1], statement=statement)
        ordered = [_unique_on_visible(r, plan.visible, len(all_keys)) for r in ordered]
    merged = merge_rows(plan, ordered)
    result = ScatterResult(_visible_metadata(first._metadata, plan.visible), merged)
    result._shard_results = ordered
    if getattr(first, "_yield_per", None):
        # partitions() without a size, as on one database: yield_per rows at a time.
        result = result.yield_per(first._yield_per)
    # What legacy Query reads to return entities instead of rows, and SQLAlchemy's
    # rule that a joined collection load is consumed through unique().
    attrs = first._attributes
    if plan.visible < len(all_keys) and "is_single_entity" in attrs:
        # The shards ran the query with sort or aggregate columns added, so the
        # ORM saw several columns; whether the caller's query returns entities
        # is a property of the original statement.
        attrs = attrs.union({"is_single_entity": _is_single_entity(statement, execution_options)})
    result._attributes = attrs
    result._unique_filter_state = result._orm_unique = needs_unique
    result.missing_shards = failures
    if failures:
        log.warning("partial results: shards %s failed: %s", ", ".join(sorted(failures)),
                    "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return result


def _unique_on_visible(result: Any, visible: int, width: int) -> Any:
    """``result.unique()`` as SQLAlchemy applies it to a joined collection load, judged by
    the caller's ``visible`` columns only.  The shard ran the statement with sort columns
    added after them; one database's rows have none, and the ORM folds a parent's rows by
    the entity and the selected columns.  A sort value unequal to itself (a float or
    numeric NaN, a new object in each row) would otherwise keep every child's row of its
    parent, and a LIMIT applied after the merge would count them as parents."""
    result = result.unique()
    if visible >= width:
        return result
    _uniques, strategy = result._unique_strategy

    def key(row: Any) -> Any:
        filtered = strategy(row) if strategy is not None else row
        if isinstance(filtered, Sequence) and not isinstance(filtered, str):
            return tuple(filtered)[:visible]
        return filtered

    return result.unique(key)


def _visible_metadata(shard_md: Any, visible: int) -> SimpleResultMetaData:
    """The metadata of a merged result: a shard result's first ``visible`` columns, found
    by name and, as on one database, by the objects selected (``row._mapping[Model.col]``,
    ``result.scalars(Model.col)``, ``row._mapping[Model]``, a label or table column).
    Each record of a ``SimpleResultMetaData`` (ORM results) and of a
    ``CursorResultMetaData`` (Core) holds its column's index first and its objects
    third; the hidden sort and partial columns past ``visible`` are left out."""
    keys = list(shard_md._keys)[:visible]
    objects: list[dict[int, Any]] = [{} for _ in keys]   # by id(): SQL objects overload ==
    # A name two columns share (select(users.c.id, orders.c.id)): a Core result's record of
    # it has no index, and a lookup by it raises 'Ambiguous column name'; so must the merged
    # result's, not find one of them.
    ambiguous = set(getattr(shard_md, "_ambiguous_keys", None) or ())
    for key, rec in shard_md._keymap.items():
        index = rec[0]
        if index is None and isinstance(key, str):
            ambiguous.add(key)
        if isinstance(index, int) and 0 <= index < visible:
            for o in rec[2] or ():
                if not isinstance(o, (str, int)):   # (the names are the keys)
                    objects[index][id(o)] = o
    # How unique() tells the rows apart, per column: an ORM result's own, by each column's
    # type and entity (an unhashable value, such as a JSON list or an object of a dataclass
    # mapping, by identity; refused under yield_per), as on one database.  SQLAlchemy 2.1
    # makes them when unique() is first applied, 2.0 holds them.  By identity needs the
    # values alive while the result is read: one database's result holds every row of its
    # one chunk, where a merge lets a finished shard's objects go and the next shard's
    # objects could take their id()s.
    unique: dict[str, Any] = {}
    made = getattr(shard_md, "_create_unique_filters", None)
    if made is not None:
        unique["_create_unique_filters"] = lambda result: _kept_alive(list(made(result))[:visible])
    filters = getattr(shard_md, "_unique_filters", None)
    if filters is not None:
        unique["_unique_filters"] = _kept_alive(list(filters)[:visible])
    if ambiguous:
        return _MergedMetaData(keys, extra=[tuple(o.values()) for o in objects],
                               _ambiguous_keys=frozenset(ambiguous), **unique)
    return SimpleResultMetaData(keys, extra=[tuple(o.values()) for o in objects], **unique)


def _kept_alive(filters: Any) -> list[Any]:
    """Unique filters that keep each value they see alive for as long as they are used,
    so that a value told apart by ``id()`` keeps its ``id()``."""
    kept: list[Any] = []
    keep = kept.append

    def alive(f: Any) -> Any:
        if f is None:
            return None

        def filter_(value: Any) -> Any:
            keep(value)
            return f(value)
        return filter_
    return [alive(f) for f in filters]


class _MergedMetaData(SimpleResultMetaData):
    """A merged result's metadata with names two columns share: ``scalars(name)`` and
    ``columns(name)`` raise 'Ambiguous column name' as a Core result does, where
    ``SimpleResultMetaData._reduce`` fails with a TypeError."""

    __slots__ = ()

    def _reduce(self, keys: Any) -> Any:
        for key in keys:
            if isinstance(key, str) and key in self._keymap and self._keymap[key][0] is None:
                self._raise_for_ambiguous_column_name(self._keymap[key])
        return super()._reduce(keys)


def _inner_joined_collection(statement: Any) -> bool:
    """Whether ``statement`` eager-loads a collection with ``joinedload(..., innerjoin=True)``,
    or, by its mapping, with ``relationship(..., lazy="joined", innerjoin=True)`` (of an
    entity it selects) that no loader option of the statement overrides."""
    named: set[Any] = set()     # relationships a loader option says how to load
    wildcard = False            # lazyload("*") and the like: the mapping's defaults are off
    for opt in getattr(statement, "_with_options", ()):
        context = getattr(opt, "context", None)
        if context is None:
            strategy = getattr(opt, "strategy", None)
            wildcard = wildcard or (strategy is not None and ("lazy", "joined") not in strategy)
            continue
        for el in context:
            if (el.local_opts.get("innerjoin") and ("lazy", "joined") in (el.strategy or ())
                    and getattr(getattr(el.path[-2], "property", el.path[-2]), "uselist", False)):
                return True
            if getattr(el, "is_token_strategy", False) and len(el.path.path) <= 2:
                # (Load(Model).lazyload("*"); not one under a relationship's path.)
                wildcard = wildcard or ("lazy", "joined") not in (el.strategy or ())
            named.update(p for p in el.path.path if isinstance(p, RelationshipProperty))
    if wildcard:
        return False
    for desc in getattr(statement, "column_descriptions", ()):
        insp = inspect(desc.get("expr"), raiseerr=False)
        if not (getattr(insp, "is_mapper", False) or getattr(insp, "is_aliased_class", False)):
            continue
        for rel in insp.mapper.relationships:
            if rel.lazy == "joined" and rel.innerjoin and rel.uselist and rel not in named:
                return True
    return False


def _may_repeat_entities(statement: Any) -> bool:
    """Whether ``statement``'s own FROM clause (joins, several FROM items) can give an
    entity more than one row, before any eager load joins."""
    for target, onclause, *_ in getattr(statement, "_setup_joins", ()):
        # A join along a many-to-one relationship gives each row one partner at most.
        prop = getattr(onclause, "property", None) or getattr(target, "property", None)
        if getattr(prop, "direction", None) is not MANYTOONE:
            return True
    froms = list(getattr(statement, "_from_obj", ()))
    for f in froms:
        if isinstance(f, selectable.Join):
            return True
    columns_froms = getattr(statement, "columns_clause_froms", [])
    return len({*froms, *columns_froms}) > 1


def _is_single_entity(statement: Any, execution_options: Any) -> bool:
    """Whether legacy Query returns ``statement``'s rows as bare entities (as SQLAlchemy decides)."""
    lo = execution_options.get("_sa_orm_load_options") if execution_options else None
    if lo is not None and lo._only_return_tuples:
        return False
    cols = getattr(statement, "column_descriptions", None)
    if not cols or len(cols) != 1:
        return False
    insp = inspect(cols[0].get("expr"), raiseerr=False)
    return bool(insp is not None and (getattr(insp, "is_mapper", False)
                                      or getattr(insp, "is_aliased_class", False)))


def _refuse_shard_key_moves(session: Session, flush_context: Any, instances: Any) -> None:
    assert isinstance(session, ShardedSession)
    router = session.cluster.router
    refs: list[Any] | None = None  # changed reference rows' objects
    for obj in session.dirty:
        state = inspect(obj)
        if state.key is None:
            continue
        mapper = state.mapper
        try:
            tr = router.table_route(mapper)
        except RoutingError:
            continue
        if tr.strategy is None:
            if tr.is_reference:
                if refs is None:
                    refs = []
                refs.append(state)
            continue
        old_shard = state.key[2]
        new_shard = None
        # order.user = other_user: the flush copies the parent's key into the shard key
        # column only later (over a value the column was given: the relationship's wins,
        # as SQLAlchemy's flush writes it), so look at the relationship itself.
        by_parent = False
        for rel in mapper.relationships:
            if rel.direction is not MANYTOONE or not any(
                    c.name in tr.key_columns for c in rel.local_columns):
                continue
            added = state.attrs[rel.key].history.added
            if added and added[0] is not None:
                if _is_reference(router, inspect(added[0]).mapper):
                    # A reference row is on every shard: the key value it gives
                    # decides, checked once the flush has copied it
                    # (_refuse_key_change_in_flush).
                    continue
                parent_shard = _shard_of_related(session.cluster, added[0])
                if parent_shard != old_shard:
                    new_shard = parent_shard
                    break
                by_parent = by_parent or (not rel.viewonly and set(tr.key_columns) <= {
                    c.name for c in rel.local_columns})
        if new_shard is None and not by_parent and _key_changed(state, mapper, tr):
            new_shard = shard_of_instance(session.cluster, mapper, obj)
        if new_shard is not None and new_shard != old_shard:
            raise CrossShardWriteError(
                f"changing the shard key of {type(obj).__name__} {state.key[1]} would move it "
                f"from shard {old_shard} to {new_shard}; shardkit does not move rows inside a "
                "flush (it could not be atomic). Delete and re-insert it, or keep the key",
                table=tr.table,
            )
    if refs:
        _refuse_reference_row_changed_twice(session, refs)


def _refuse_bulk_key_move(cluster: Cluster, mapper: Any, state: Any, obj: Any) -> None:
    """bulk_save_objects() of a persistent object whose shard key now names another shard:
    its UPDATE by primary key would run there, on whatever row has that primary key (ids
    unique per shard only), and leave the object's own row as it was.  Refused, as a
    flush refuses the same change (before anything is written)."""
    old_shard = state.key[2]
    if old_shard is None or cluster.router.table_route(mapper).strategy is None:
        return
    new_shard = shard_of_instance(cluster, mapper, obj)
    if new_shard != old_shard:
        raise CrossShardWriteError(
            f"bulk_save_objects(): the shard key of {type(obj).__name__} {state.key[1]} was "
            f"changed so that it would move from shard {old_shard} to {new_shard}; shardkit "
            "does not move rows (nothing was written). Delete and re-insert it, or keep the key",
            table=mapper.local_table.name)


def _key_changed(state: Any, mapper: Any, tr: TableRoute) -> bool:
    """Whether a shard-key column of ``state`` has a pending change."""
    committed = state.committed_state  # (an attribute never set since the load is not in it)
    if not committed:
        return False
    table = mapper.local_table
    for c in tr.key_columns:
        col = column_named(table.c, c)
        if col is not None:
            attr = mapper.get_property_by_column(col).key
            if attr in committed and state.attrs[attr].history.has_changes():
                return True
    return False


def _sharded_flush_target(state: Any, mapper: Any) -> tuple[ShardedSession, Any] | None:
    """``(session, table route)`` of an object a flush writes, for the mapper listeners
    that check its shard key: None outside a ShardedSession and for a table that is not
    sharded by a key (a reference table, one no group names)."""
    session = state.session
    if not isinstance(session, ShardedSession):
        return None
    try:
        tr = session.cluster.router.table_route(mapper)
    except RoutingError:
        return None
    return None if tr.strategy is None else (session, tr)


def _refuse_key_change_in_flush(mapper: Any, connection: Any, target: Any) -> None:
    """Mapper "before_update": the flush itself may set a shard key (removing a child
    from a one-directional collection nulls it; appending it to another parent's
    collection, or pointing it at a reference row, copies a new key in), after
    before_flush looked.  The UPDATE would run on the row's old shard: refuse a key
    that is gone, or that another shard owns, before it is written."""
    state = inspect(target)
    if state.key is None or state.key[2] is None:
        return
    old_shard = state.key[2]
    found = _sharded_flush_target(state, mapper)
    if found is None:
        return
    session, tr = found
    if not _key_changed(state, mapper, tr):
        return
    try:
        new_shard = shard_of_instance(session.cluster, mapper, target)
    except ShardKeyError as e:
        raise ShardKeyError(
            f"this flush would set the shard key of {type(target).__name__} {state.key[1]} to "
            f"NULL on shard {old_shard} (as when it is removed from its parent's collection "
            "without a delete-orphan cascade), leaving a row that belongs to no shard; "
            "delete it, or give it another parent on the same shard", table=tr.table) from e
    if new_shard != old_shard:
        raise CrossShardWriteError(
            f"this flush would change the shard key of {type(target).__name__} {state.key[1]} "
            f"so that it belongs on shard {new_shard}, but it is on {old_shard} (moved to "
            "another parent's collection, or pointed at another reference row); shardkit "
            "does not move rows inside a flush. Delete and re-insert it, or keep the key",
            table=tr.table)


def _refuse_key_changed_after_routing(mapper: Any, connection: Any, target: Any) -> None:
    """Mapper "after_insert" and "after_update": the flush chooses each object's shard
    (its connection) before the application's before_insert / before_update listeners
    run, and shardkit's own before_update check runs before theirs.  A listener that set
    the shard key to another shard's value (normalising it, filling it in from context)
    has had its row written where the router never looks for it: refused, so the flush
    rolls back and nothing is written."""
    state = inspect(target)
    onupdate = False
    # (Every mapper's before_update has shardkit's own check, _refuse_key_change_in_flush:
    # more than that one is the application's.)
    if not (mapper.dispatch.before_insert if state.key is None else len(mapper.dispatch.before_update) > 1):
        # Only the application's before_insert / before_update listeners run between a
        # row's routing (or shardkit's own check of an update) and its write, and a key
        # column's onupdate= at the UPDATE: without them, its key is the one it was routed
        # by (not worked out again per row).
        if state.key is None:
            return
        session = state.session
        if not isinstance(session, ShardedSession) or session.cluster.router.key_onupdate(mapper) is None:
            return
        onupdate = True
    found = _sharded_flush_target(state, mapper)
    if found is None:
        return
    session, tr = found
    if state.key is not None and not onupdate and not _key_changed(state, mapper, tr):
        # (An application's before_update listener left the key: its onupdate= may not.)
        if session.cluster.router.key_onupdate(mapper) is None:
            return
        onupdate = True
    written_on = _primary_shard(connection)
    if written_on is None:
        return
    if onupdate and any(mapper.get_property_by_column(col).key not in state.dict
                        for col in (column_named(mapper.local_table.c, c) for c in tr.key_columns)
                        if col is not None):
        # A SQL onupdate (func.x()): the database made the key, which the flush expired.
        raise CrossShardWriteError(
            f"the UPDATE of {type(target).__name__} {state.key[1]} on shard {written_on} gave its "
            f"shard key a value the database made (the key column's onupdate=), which may "
            "belong on another shard; nothing was written. Remove onupdate= from the shard "
            "key column, or set the key yourself", table=tr.table)
    try:
        belongs = shard_of_instance(session.cluster, mapper, target)
    except ShardKeyError as e:
        raise ShardKeyError(
            f"the shard key of {type(target).__name__} was set to NULL during the flush, after "
            f"its row was routed to shard {written_on} (by a before_insert or before_update "
            "listener?); nothing was written. Set the key before the flush (when the object "
            "is made, or in a before_flush listener)", table=tr.table) from e
    if belongs != written_on:
        verb = "inserted" if state.key is None else "updated"
        raise CrossShardWriteError(
            f"the shard key of {type(target).__name__} was changed during the flush, after its "
            f"row was routed: it was {verb} on shard {written_on} but its key now belongs on "
            f"{belongs} (a before_insert or before_update listener that sets the key runs after "
            "the flush has chosen the shard"
            + (", and so does the key column's onupdate=" if onupdate else "")
            + "); nothing was written. Set the key before the flush "
            "(when the object is made, or in a before_flush listener)"
            + (", and remove onupdate= from the shard key column" if onupdate else ""),
            table=tr.table)


def _flushed_reference(mapper: Any, target: Any) -> tuple[ShardedSession, Any] | None:
    """``(session, state)`` of an object a flush writes in a reference table, for the
    mapper listeners that copy its row to the other shards; None otherwise (at once
    when the cluster has no reference tables)."""
    state = inspect(target)
    session = state.session
    if not isinstance(session, ShardedSession) or not session.cluster.config.reference_tables:
        return None
    return (session, state) if _is_reference(session.cluster.router, mapper) else None


def _copy_new_reference_row(mapper: Any, connection: Any, target: Any) -> None:
    """Mapper "after_insert": a new reference row reaches every shard at once, in the
    flush, so a sharded row inserted later in the same flush (on any shard) can
    reference it by foreign key.  (after_flush then skips it, unless a post_update
    relationship may have changed it after the INSERT.)"""
    found = _flushed_reference(mapper, target)
    if found is None:
        return
    session, state = found
    pk = mapper.primary_key_from_instance(target)
    if None in pk:
        return
    _copy_reference_row(session, connection, mapper, pk, None)
    session._sk_ref_copied.add(state)


def _copy_changed_reference_row(mapper: Any, connection: Any, target: Any) -> None:
    """Mapper "after_update": the changed reference row is copied to the other shards
    at once, in the flush's order of statements, as it runs on the first shard: a row
    given another primary key is updated there by its old key (a foreign key's ON UPDATE
    CASCADE or SET NULL then does on each copy what it did on the first shard; a DELETE of
    the old key and an INSERT of the new one would delete or orphan the rows referencing
    it), and a row another statement of the flush depends on (a child moved to another
    parent before the old parent's DELETE) is there before that statement runs."""
    found = _flushed_reference(mapper, target)
    if found is None:
        return
    session, state = found
    # (SQLAlchemy calls this for every object of the flush's UPDATE step, also one
    # whose only change is a collection: no UPDATE of its row.)
    if not session.is_modified(target, include_collections=False):
        return
    pk = mapper.primary_key_from_instance(target)
    if None in pk:
        return
    # The tables the flush's UPDATE wrote: those of the columns it changed (not a table of
    # the class whose row it left alone, nor the row whose only change is a post_update
    # relationship's, written later: _emit_post_update_statements): an upsert of a copy
    # the first shard did not write would fire the copy's UPDATE triggers there alone.
    tables = {getattr(c, "table", None) for p in mapper.column_attrs
              if state.attrs[p.key].history.has_changes() for c in p.columns}
    if tables:
        _copy_reference_row(session, connection, mapper, pk, _old_primary_key(state, pk), tables)
    session._sk_ref_copied.add(state)


def _delete_reference_copies(mapper: Any, connection: Any, target: Any) -> None:
    """Mapper "after_delete": the deleted reference row is deleted on the other shards
    at once, in the flush's order (the rows of a self-referential table children first,
    as the flush deleted them; after the UPDATEs that moved rows away from it), so that
    each copy's foreign keys see, and their ON DELETE actions do, what the first shard's did."""
    found = _flushed_reference(mapper, target)
    if found is None:
        return
    session, state = found
    if state.key is None:
        return
    cluster = session.cluster
    home = _engine_info(connection).get("shard")
    # (Joined inheritance: the subclass's table first.)
    for table, table_pk in reversed(_reference_table_keys(cluster.router, mapper, state.key[1])):
        _delete_reference_table_row(session, home, table, table_pk)
    session._sk_ref_copied.add(state)


def _delete_reference_table_row(session: ShardedSession, home: Any, table: Any,
                                table_pk: Sequence[Any]) -> None:
    """Delete ``table``'s row of primary key ``table_pk`` on every shard but ``home``."""
    stmt = table.delete().where(*[c == v for c, v in zip(table.primary_key.columns, table_pk)])
    done = [home]
    for shard in session.cluster.shard_names:
        if shard != home:
            try:
                session.connection(bind_arguments={"shard_id": shard}).execute(stmt)
            except sa_exc.DBAPIError as e:
                _note_reference_copy_failed(session, e, shard, table, done)
                raise
            done.append(shard)


def _copy_reference_row(session: ShardedSession, connection: Any, mapper: Any, pk: Sequence[Any],
                        old: Sequence[Any] | None, tables: Any = None) -> None:
    """Copy the row of primary key ``pk`` that the flush wrote through ``connection`` (the
    first shard's) to every other shard: each table of its class (or of ``tables``), the
    base class's first.  With ``old`` (the primary key the row had), each copy is updated
    by its old key."""
    cluster = session.cluster
    home = _engine_info(connection).get("shard")
    keys = _reference_table_keys(cluster.router, mapper, pk)
    olds = dict(_reference_table_keys(cluster.router, mapper, old)) if old is not None else {}
    for table, table_pk in keys:  # (joined inheritance: the base class's table first)
        if tables is not None and table not in tables:
            continue
        if not _copy_reference_table_row(session, connection, home, table, table_pk, olds.get(table)):
            return


def _copy_reference_table_row(session: ShardedSession, connection: Any, home: Any, table: Any,
                              table_pk: Sequence[Any], old_pk: Sequence[Any] | None) -> bool:
    """Copy ``table``'s row of primary key ``table_pk`` from ``connection`` (shard ``home``'s)
    to every other shard (updated there by ``old_pk`` if it had another); False if
    ``home`` has no such row."""
    pk_cols = list(table.primary_key.columns)
    row = connection.execute(sa_select(table).where(
        *[c == v for c, v in zip(pk_cols, table_pk)])).mappings().first()
    if row is None:
        return False
    stmt = _reference_upsert(table).returning(*table.columns)
    moved = None
    if old_pk is not None and tuple(old_pk) != tuple(table_pk):
        moved = table.update().where(*[c == v for c, v in zip(pk_cols, old_pk)]) \
            .values(dict(row)).returning(*table.columns)
    done = [home]
    for shard in session.cluster.shard_names:
        if shard != home:
            conn = session.connection(bind_arguments={"shard_id": shard})
            try:
                # (Its copy may have the new key already: an ON UPDATE CASCADE from
                # the base class's table.)
                copy = None if moved is None else conn.execute(moved).mappings().first()
                if copy is None:
                    copy = conn.execute(stmt, dict(row)).mappings().first()
            except sa_exc.DBAPIError as e:
                _note_reference_copy_failed(session, e, shard, table, done)
                raise
            _refuse_different_copy(table, shard, home, row, copy, stmt)
            done.append(shard)
    return True


_sa_emit_post_update_statements = getattr(persistence, "_emit_post_update_statements", None)


def _row_switched(copied: set[Any], mapper: Any, pk: Sequence[Any]) -> bool:
    """Whether an object of ``copied`` (reference rows a flush's listeners copied) other
    than a deleted one has ``mapper``'s row of primary key ``pk``."""
    base = mapper.base_mapper
    for st in copied:
        obj = st.obj()
        if obj is not None and st.mapper.base_mapper is base and not st.deleted and \
                tuple(st.mapper.primary_key_from_instance(obj)) == tuple(pk):
            return True
    return False


def _post_updates_unseen(mapper: Any) -> bool:
    """Whether ``mapper``'s post_update relationships may have changed its reference rows
    unseen by :func:`_emit_post_update_statements` (a SQLAlchemy without that function)."""
    return _sa_emit_post_update_statements is None and any(r.post_update for r in mapper.relationships)


def _emit_post_update_statements(base_mapper: Any, uowtransaction: Any, mapper: Any, table: Any,
                                 update: Any) -> Any:
    """SQLAlchemy's UPDATEs of a post_update relationship's columns (rows that depend on each
    other), for one table; a reference table's rows they change are copied to the other
    shards at once, as the flush's other statements are (no mapper event tells of these):
    a DELETE later in the flush (whose copies go at once) may depend on them, such as the
    UPDATE that sets a row's reference to NULL before the row it referenced is deleted."""
    session = uowtransaction.session
    if not isinstance(session, ShardedSession) or not session.cluster.config.reference_tables \
            or not _is_reference(session.cluster.router, mapper):
        return _sa_emit_post_update_statements(base_mapper, uowtransaction, mapper, table, update)
    update = list(update)  # (state, state_dict, mapper, connection, params): rows it changes
    result = _sa_emit_post_update_statements(base_mapper, uowtransaction, mapper, table, update)
    router = session.cluster.router
    for state, _dict, sub_mapper, connection, _params in update:
        pk = sub_mapper.primary_key_from_instance(state.obj())
        for ref_table, table_pk in _reference_table_keys(router, sub_mapper, pk):
            if ref_table is table:
                _copy_reference_table_row(session, connection, _engine_info(connection).get("shard"),
                                          table, table_pk, None)
        session._sk_ref_copied.add(state)
    return result


def _refuse_different_copy(table: Any, shard: str, home: Any, row: Any, copy: Any, stmt: Any) -> None:
    """Refuse a copy (``copy``: what writing ``row`` returned on ``shard``) that came out
    other than the first shard's row it was copied from: a trigger (or rule) on the table
    changed or dropped it there, as it wrote it on the first shard.  (A table of primary
    key columns only returns no row for a row the copy had.)  A date or time a trigger gave
    a copy (``updated_at = now()``: each shard's transaction has its own time) is let be, as
    a value written as SQL is computed on each shard."""
    if len(table.primary_key.columns) == len(table.columns):
        return
    cols = [] if copy is None else [c.name for c in table.columns
                                    if not _same_value(row[c.key], copy[c.key])
                                    and not _both_times(row[c.key], copy[c.key])]
    if copy is not None and not cols:
        return
    why = ("the row is not there" if copy is None else f"column {cols[0]} differs"
           if len(cols) == 1 else f"columns {', '.join(cols)} differ")
    raise CrossShardWriteError(
        f"reference table {table.fullname}: the copy of a row this flush wrote on shard "
        f"{home} came out different on shard {shard} ({why}): a trigger or rule on the table "
        "changes the rows written to it, and did so again when the row was copied there. "
        "The flush failed: roll back (in a transaction, nothing of it is committed). Write "
        "this table with statements (session.execute(insert(...)/update(...)) run on every "
        "shard), or let the trigger leave a copied row as written", table=table.fullname,
        statement=stmt)


def _both_times(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are both dates or times (datetime, date, time)."""
    return isinstance(a, _TIMES) and isinstance(b, _TIMES)


_TIMES = (datetime.date, datetime.time)  # (datetime.datetime is a date)


def _same_value(a: Any, b: Any) -> bool:
    """Whether two values read back from two shards' copies of a row are the same, as far
    as Python can tell: NaN is NaN's, and values of a class that cannot compare them
    (equality by identity, or an error) are taken as the same rather than refused."""
    try:
        if a == b:
            return True
    except Exception:  # noqa: BLE001 - a type that cannot compare: not refused for it
        return True
    if a != a and b != b:  # NaN (float or Decimal): equal to nothing, itself included
        return True
    return type(a) is type(b) and type(a).__eq__ is object.__eq__


def _reference_upsert(table: Any) -> Any:
    """INSERT of a reference row that overwrites the copy a shard already has."""
    pk_cols = list(table.primary_key.columns)
    ins = pg_insert(table)
    if len(pk_cols) == len(table.columns):
        return ins.on_conflict_do_nothing()
    return ins.on_conflict_do_update(
        index_elements=pk_cols,
        set_={c.name: ins.excluded[c.name] for c in table.columns if not c.primary_key})


_REFERENCE_COPY_FAILED = (
    "(on shard {shard}, writing its copy of reference table {table} after {done}: it failed "
    "there alone (that copy differs from theirs: a row, a constraint or a column; or that shard "
    "is out of reach); the transaction "
    "fails on every shard: roll back, and compare the copies with `shardkit migrate check`)")


_REFERENCE_COPY_FAILED_AUTOCOMMIT = (
    "(on shard {shard}, writing its copy of reference table {table} after {done}: it failed "
    "there alone (that copy differs from theirs: a row, a constraint or a column; or that shard "
    "is out of reach); the primaries run in autocommit, so the copies written on {done} are "
    "committed and a rollback does not undo them: the copies differ now; repair shard {shard} "
    "(`shardkit migrate check` compares the copies) and write the rows again)")


def _note_reference_copy_failed(session: ShardedSession, error: BaseException, shard: str,
                                table: Any, done: list[Any]) -> None:
    """Say on ``error`` which reference copies a failed copy to ``shard`` leaves behind."""
    autocommit = False
    for name in done:
        try:
            # The session's connection there, held since it wrote the copy.
            autocommit = autocommit or _autocommits(Session.connection(session, bind_arguments={"shard_id": name}))
        except Exception:  # noqa: BLE001 - the copy's own error is the one to raise
            continue
    names = ", ".join(str(name) for name in done)
    error.add_note((_REFERENCE_COPY_FAILED_AUTOCOMMIT if autocommit else _REFERENCE_COPY_FAILED)
                   .format(shard=shard, table=table.fullname, done=names))


def _note_reference_write_failed_first(session: ShardedSession, error: sa_exc.DBAPIError) -> None:
    """A flush's own INSERT, UPDATE or DELETE of a reference row failed: say that it ran on
    the first shard (where the flush writes reference rows before copying them), which
    the error does not."""
    if any("on shard" in note for note in getattr(error, "__notes__", ())):
        return  # (a copy's failure: _note_reference_copy_failed named its shard)
    sql = error.statement or ""
    if not sql.startswith(("INSERT INTO ", "UPDATE ", "DELETE FROM ")):
        return
    # (The table as SQLAlchemy's flush names it: INSERT INTO t, UPDATE t SET, DELETE FROM t.)
    name = sql.split(" ", 3)[1 if sql.startswith("UPDATE") else 2]
    name = ".".join(part.strip('"') for part in name.split("."))
    try:
        if not _is_reference(session.cluster.router, name):
            return
    except Exception:  # noqa: BLE001 - only a note: the flush's own error is what counts
        return
    error.add_note(
        f"(on shard {session.cluster.shard_names[0]}: a flush writes reference table {name}'s "
        "rows on the first shard, then copies them to the others: the flush failed there; "
        "roll back)")


def _replicate_reference_rows(session: Session, flush_context: Any) -> None:
    """Copy reference-table rows written on one shard to every other shard, in the same transaction."""
    assert isinstance(session, ShardedSession)
    cluster = session.cluster
    router = cluster.router
    if not router.config.reference_tables:
        return
    upserts: dict[tuple[Any, str], list[Any]] = {}
    deletes: dict[tuple[Any, str], list[Any]] = {}
    copied, session._sk_ref_copied = session._sk_ref_copied, set()
    written: list[tuple[Any, Any]] = []
    for bucket, objs in ((upserts, list(session.new) + list(session.dirty)),
                         (deletes, list(session.deleted))):
        for obj in objs:
            state = inspect(obj)
            mapper = state.mapper
            new = bucket is upserts and obj in session.new
            if state in copied:
                # Copied by its INSERT, UPDATE or DELETE (_copy_new_reference_row,
                # _copy_changed_reference_row, _delete_reference_copies), or by a
                # post_update relationship's UPDATE (_emit_post_update_statements; on a
                # SQLAlchemy without it, such a row is copied again here, after them).
                if new and not _post_updates_unseen(mapper):
                    continue
            else:
                try:
                    if not router.table_route(mapper).is_reference:
                        continue
                except RoutingError:
                    continue
            # (A change of a collection only, country.tenants.append(t), writes other
            # rows: not this one.)
            if bucket is upserts and not new and \
                    not session.is_modified(obj, include_collections=False):
                continue
            pk = mapper.primary_key_from_instance(obj)
            if bucket is deletes and state not in copied and _row_switched(copied, mapper, pk):
                # Deleted and another object of its key added in the flush: SQLAlchemy made the
                # two one UPDATE (a "row switch"), copied as the added object's: no DELETE.
                written.append((state.key, None))
                continue
            old = _old_primary_key(state, pk) if bucket is upserts and not new else None
            if bucket is deletes or not new:
                if state.key is not None:
                    # The session's other objects of this row (read from other shards)
                    # hold its old values: expired once the flush is done.
                    written.append((state.key, old))
            if state in copied:
                if bucket is deletes or not _post_updates_unseen(mapper):
                    continue
                old = None  # (its copies were given the new key at its UPDATE)
            # (written on the first shard by the flush: see connection_callable)
            home = cluster.shard_names[0]
            for table, table_pk in _reference_table_keys(router, mapper, pk):
                bucket.setdefault((table, home), []).append(table_pk)
            if old is not None:
                # The primary key changed: the copies elsewhere have the old one.
                for table, table_pk in _reference_table_keys(router, mapper, old):
                    deletes.setdefault((table, home), []).append(table_pk)
    if written:
        session._sk_ref_written = (session._sk_ref_written or []) + written
    if not upserts and not deletes:
        return
    # Deletes first: a flush that deletes a row and inserts another with the same key
    # (or changes keys) leaves the new rows, not the old ones.  Tables in the order of
    # their foreign keys (a joined subclass's table after its base's), as the flush
    # wrote them: deletes referencing rows first, upserts referenced rows first.
    if len(deletes) > 1:
        deletes = _in_table_order(deletes, reverse=True)
    if len(upserts) > 1:
        upserts = _in_table_order(upserts)
    for (table, home), pks in deletes.items():
        for pk in pks:
            _delete_reference_table_row(session, home, table, pk)
    for (table, home), pks in upserts.items():
        src = session.connection(bind_arguments={"shard_id": home})
        for pk in pks:
            _copy_reference_table_row(session, src, home, table, pk, None)


def _reference_table_keys(router: Any, mapper: Any, pk: Sequence[Any]) -> list[tuple[Any, tuple[Any, ...]]]:
    """The reference tables a ``mapper`` object with primary key ``pk`` has a row in, each
    with that row's primary key: its own table, or with joined inheritance each table of
    its class hierarchy (its primary key columns hold the object's primary key values),
    in the order of their foreign keys (the base class's table first)."""
    if len(mapper.tables) == 1:
        return [(mapper.local_table, tuple(pk))]
    props = [mapper.get_property_by_column(c) for c in mapper.primary_key]
    out = []
    for table in mapper.tables:
        try:
            if not router.table_route(table).is_reference:
                continue
            index = [props.index(mapper.get_property_by_column(c)) for c in table.primary_key.columns]
        except (RoutingError, orm_exc.UnmappedColumnError, ValueError):
            continue
        out.append((table, tuple(pk[i] for i in index)))
    if len(out) > 1:
        order = _in_table_order({(table, ""): table_pk for table, table_pk in out})
        out = [(table, table_pk) for (table, _), table_pk in order.items()]
    return out


def _in_table_order(rows: dict[tuple[Any, str], list[Any]], reverse: bool = False) -> dict[tuple[Any, str], list[Any]]:
    """``rows`` (by (table, shard)) with the tables in the order of their foreign keys:
    referenced tables first (or last: ``reverse``)."""
    # (sort_tables_and_constraints: tables in a cycle of foreign keys come in some
    # order, without sort_tables' warning.)
    order = [t for t, _ in sort_tables_and_constraints([table for table, _ in rows]) if t is not None]
    if reverse:
        order.reverse()
    rank = {table: i for i, table in enumerate(order)}
    return dict(sorted(rows.items(), key=lambda item: rank[item[0][0]]))


def _objects_of_row(session: ShardedSession, key: tuple[Any, Any, Any]) -> Iterator[tuple[Any, Any]]:
    """``(identity key, object)`` of the session's other objects of the row of identity key
    ``key``: those read from other shards (another identity token), one per shard."""
    imap = session.identity_map
    for token in (*session.cluster.shard_names, None):
        if token != key[2]:
            other_key = (key[0], key[1], token)
            obj = imap.get(other_key)
            if obj is not None:
                yield other_key, obj


def _expire_other_reference_objects(session: ShardedSession, written: list[tuple[Any, Any]]) -> None:
    """After a flush that updated or deleted reference rows through objects (keys
    ``written``, each with its old primary key when the flush changed it): the session's
    other objects of those rows, read from other shards (another identity token: one
    object per shard), still hold the values they were loaded with, and a change made
    through one of them later would write those back over the flush's (a lost update).
    They are expired: their next access reloads the row as written, or, for a row
    deleted (or given another key), raises ObjectDeletedError, as after another
    transaction's DELETE (also at the flush of one changed without loading it first:
    the flush loads its key).  Attributes such an object has itself changed since (a flush of
    some objects only) are kept: the next flush writes them."""
    seen = set()
    for key, old in written:
        for pk in (key[1], old):
            if pk is None:
                continue
            for other_key, obj in _objects_of_row(session, (key[0], pk, key[2])):
                if other_key in seen:
                    continue
                seen.add(other_key)
                state = inspect(obj)
                if not state.persistent:
                    continue
                if state.modified and state.committed_state:
                    keep = set(state.committed_state)
                    names = [a.key for a in state.mapper.attrs if a.key not in keep]
                    if names:
                        session.expire(obj, names)
                else:
                    session.expire(obj)


def _refuse_reference_row_changed_twice(session: ShardedSession, states: list[Any]) -> None:
    """Before a flush: refuse changes of one reference row through two of the session's
    objects of it (read from different shards) that the flush would write over each other:
    a column both change (the second UPDATE would set it to its object's value, the first
    one's change lost), or a change through one and a DELETE through the other."""
    for state in states:
        key = state.key
        for (_, _, token), obj in _objects_of_row(session, key):
            other = inspect(obj)
            name = f"{state.class_.__name__} {_pk_text(key[1])}"
            table = state.mapper.local_table.fullname
            fix = (f"Make the change through one object (session.get({state.class_.__name__}, "
                   f"{_pk_text(key[1])}) returns one; session.expire() the other drops its "
                   "changes); nothing was written")
            if other in session._deleted:
                raise CrossShardWriteError(
                    f"reference row {name} is two objects in this session (read from shards "
                    f"{key[2]} and {token}: a reference row is one object per shard it was read "
                    f"from), changed through the first and deleted through the second: the flush "
                    f"would lose the change. {fix}", table=table)
            if not other.modified:
                continue
            mine, theirs = _changed_columns(state), _changed_columns(other)
            both = sorted(mine & theirs)
            if both:
                raise CrossShardWriteError(
                    f"reference row {name} is two objects in this session (read from shards "
                    f"{key[2]} and {token}: a reference row is one object per shard it was read "
                    f"from), and both change column{'s' if len(both) > 1 else ''} "
                    f"{', '.join(both)}: the flush would write one change over the other. {fix}",
                    table=table)
            if not (mine and theirs):
                continue
            # Both UPDATE the row: the second one's WHERE would miss the row the first
            # wrote (StaleDataError, the flush rolled back) when the first changes its
            # primary key, or the version of a class with a version_id_col.
            keys = sorted((mine | theirs) & {c.name for c in state.mapper.primary_key})
            version = state.mapper.version_id_col
            if keys or version is not None:
                why = (f"one changes its primary key ({', '.join(keys)})" if keys else
                       f"each UPDATE checks and changes its version_id_col {version.name}")
                raise CrossShardWriteError(
                    f"reference row {name} is two objects in this session (read from shards "
                    f"{key[2]} and {token}: a reference row is one object per shard it was read "
                    f"from), both changed, and {why}: the second UPDATE would not find the row "
                    f"the first one wrote. {fix}", table=table)


def _pk_text(pk: tuple[Any, ...]) -> str:
    return repr(pk[0]) if len(pk) == 1 else repr(pk)


def _changed_columns(state: Any) -> set[str]:
    """The names of the columns of its own row that ``state``'s flush would write."""
    out: set[str] = set()
    mapper = state.mapper
    for attr in list(state.committed_state):
        prop = mapper.attrs.get(attr)
        if prop is None:
            continue
        if isinstance(prop, RelationshipProperty):
            if prop.direction is MANYTOONE and state.attrs[attr].history.has_changes():
                out.update(c.name for c in prop.local_columns)
        elif hasattr(prop, "columns") and state.attrs[attr].history.has_changes():
            out.update(c.name for c in prop.columns if getattr(c, "table", None) is not None)
    return out


def _association_rows(state: Any, rel: Any, *, which: str = "both") -> list[dict[str, Any]]:
    """The rows of ``rel``'s secondary table that this flush inserts (``which="added"``)
    or deletes (``"removed"``) for ``state``'s collection, or both, as SQLAlchemy's
    unit of work builds them: {column key: value}."""
    hist = state.attrs[rel.key].history
    session = state.session
    if session is not None and state in session._deleted:
        # A deleted object's rows go (process_deletes): the ones it had, not new ones.
        children = [] if which == "added" else list(hist.non_added())
    elif which == "added":
        children = list(hist.added)
    else:
        children = list(hist.deleted) if which == "removed" else [*hist.added, *hist.deleted]
    out = []
    for child in children:
        if child is None:
            continue
        cstate = inspect(child)
        row: dict[str, Any] = {}
        try:
            for local, remote in rel.synchronize_pairs:
                row[remote.key] = rel.parent._get_state_attr_by_column(
                    state, state.dict, local, passive=PASSIVE_OFF)
            for local, remote in rel.secondary_synchronize_pairs:
                row[remote.key] = rel.mapper._get_state_attr_by_column(
                    cstate, cstate.dict, local, passive=PASSIVE_OFF)
        except Exception:  # noqa: BLE001 - not placeable: the caller falls back
            continue
        out.append(row)
    return out


def _replicate_reference_pairs(session: Session, flush_context: Any) -> None:
    """The rows of a ``secondary=`` reference table that a flush inserted or deleted
    (SQLAlchemy writes them on one shard's connection): the same change on every other
    shard, in the same transaction.  Idempotent per shard: a row already there is not
    inserted again, a row already gone deletes nothing."""
    assert isinstance(session, ShardedSession)
    router = session.cluster.router
    if not router.config.reference_tables:
        return
    added: dict[Any, set[tuple[Any, ...]]] = {}
    removed: dict[Any, set[tuple[Any, ...]]] = {}
    deleted = session.deleted
    for obj in (*session.new, *session.dirty, *deleted):
        st = inspect(obj)
        rels = router.reference_pairs.get(st.mapper)
        if rels is None:
            rels = router.reference_pairs[st.mapper] = tuple(
                r for r in st.mapper.relationships
                if r.secondary is not None and not r.viewonly and _is_reference(router, r.secondary))
        is_deleted = obj in deleted
        for rel in rels:
            if not is_deleted and not st.attrs[rel.key].history.has_changes():
                continue
            for bucket, which in ((added, "added"), (removed, "removed")):
                if which == "added" and is_deleted:
                    continue
                for row in _association_rows(st, rel, which=which):
                    bucket.setdefault(rel.secondary, set()).add(tuple(sorted(row.items())))
    if not added and not removed:
        return
    for shard in session.cluster.shard_names:
        conn = session.connection(bind_arguments={"shard_id": shard})
        for table, rows in removed.items():
            for row in rows:
                conn.execute(table.delete().where(*[table.c[k] == v for k, v in row]))
        for table, rows in added.items():
            for row in rows:
                cond = [table.c[k] == v for k, v in row]
                if conn.execute(sa_select(sa_text("1")).select_from(table).where(*cond)).first() is None:
                    conn.execute(table.insert().values(dict(row)))


def _old_primary_key(state: Any, pk: Sequence[Any]) -> tuple[Any, ...] | None:
    """The primary key ``state`` had before this flush changed it (None if unchanged)."""
    mapper = state.mapper
    old = list(pk)
    changed = False
    for i, col in enumerate(mapper.primary_key):
        hist = state.attrs[mapper.get_property_by_column(col).key].history
        if hist.deleted and hist.deleted[0] is not None and hist.deleted[0] != pk[i]:
            old[i] = hist.deleted[0]
            changed = True
    return tuple(old) if changed else None


def _fail_fast_if_primary_down(cluster: Cluster, shard: str) -> None:
    mon = cluster._monitor
    if mon is None:
        return
    p = mon.shards[shard].primary
    now = time.monotonic()
    # Only a recent observation counts: an old one may predate a restart.
    if p.checked_at and not p.up and now - p.checked_at < 2 * cluster.replica_settings.poll_interval + 0.5:
        raise ShardUnavailable(
            f"shard {shard}: primary {p.name} is down ({p.error}); writes to {shard}, and reads "
            f"that need its primary, cannot run until it is back{_replica_reads(cluster, shard)}",
            shard=shard, node=p.name,
        )
    last = p.checked_at
    if last and mon.running and not p.heard_from(now, mon.stale_after):
        # A poll still waiting: the server accepts TCP but does not answer (its processes
        # stopped, say), and a write sent to it would wait as long, with nothing (neither
        # psycopg nor the kernel, which acknowledges the data) to time it out.  Or the
        # server is only slow, or this process too busy (CPU, the GIL) to have read its
        # answer yet: the write waits for the answer, up to hung_after since the last one,
        # rather than being refused by a primary that answers.
        until = last + mon.hung_after
        if p._asking_since is None:
            # No poll of it is out: the poll thread is late, not the server (this whole
            # process stood still: a long garbage collection, no CPU for it): the poll it
            # sends now decides.
            until = max(until, now + mon.stale_after)
        else:
            # One is out: a process that stood still while it waited may not have read the
            # answer yet.
            until = max(until, now + min(0.5, mon.settings.poll_timeout))
        if mon.wait_for_answer(p, until):
            _fail_fast_if_primary_down(cluster, shard)  # it answered: up, or down
            return
        raise ShardUnavailable(
            f"shard {shard}: primary {p.name} has not answered the health poll for "
            f"{time.monotonic() - last:.1f} s (hung, not refusing connections); writes to "
            f"{shard}, and reads that need its primary, cannot run until it answers"
            f"{_replica_reads(cluster, shard)}",
            shard=shard, node=p.name,
        )


def _replica_reads(cluster: Cluster, shard: str) -> str:
    """The end of a refusal by a primary that is down: whether the shard's reads have
    anywhere else to go (a shard without replicas has none: its reads are refused too)."""
    if cluster.replica_count(shard):
        return " (reads that its replicas may serve still use them)"
    return f" ({shard} has no replicas: its reads cannot run either)"


def _wal_bytes(n: int) -> str:
    """A WAL gap for a message: bytes below a megabyte (a small max_lag_bytes), else MB."""
    return f"{n} bytes" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def _why_not(cluster: Cluster, shard: str, max_s: float, max_b: int, min_lsn: int | None,
             moved: bool = False, exclude: frozenset[int] = frozenset()) -> str:
    """Why no replica of ``shard`` serves a read; ``moved``: ``min_lsn`` is the WAL position
    after the latest move to the shard (Cluster.moved_lsn), not this session's; ``exclude``:
    replicas this read already failed on.  Each reason ReplicaSelector.eligible() has to
    pass a replica over is named (never "no replicas" for a shard that has some)."""
    mon = cluster.selector.monitor
    parts = []
    now = time.monotonic()
    what = ("the latest move of buckets to this shard (it serves them once it has)" if moved
            else "this session's writes")
    for r in mon.shards[shard].replicas:
        lag_b, lag_s = r.lag_bytes, r.lag_seconds
        short = min_lsn is not None and (r.wal_lsn or 0) < min_lsn
        if not r.up and not r.checked_at:
            parts.append(f"{r.name} has not answered its first health poll yet")
        elif not r.up:
            parts.append(f"{r.name} is down ({r.error})")
        elif r.banned(now):
            parts.append(f"{r.name} is banned for {r.banned_until - now:.1f} s ({r.ban_reason})")
        elif r.index in exclude:
            parts.append(f"this read already failed on {r.name}")
        elif r.in_recovery is False:
            parts.append(f"{r.name} is not in recovery (promoted?): it is no replica")
        elif now - r.checked_at > mon.stale_after:
            # (As health() reports it: up no longer, a replica that stopped answering.)
            parts.append(f"{r.name} has not answered the health poll for {now - r.checked_at:.1f} s "
                         "(hung, not refusing connections)")
        elif r.not_following:
            parts.append(f"{r.name} replays past the primary's WAL position: it does not follow it")
        elif lag_b is None:
            parts.append(f"{r.name} has not been measured yet")
        elif lag_s is None:
            parts.append(f"{r.name} is {_wal_bytes(lag_b)} behind, for how long is unknown"
                         + (f", and has not replayed {what} yet ({format_lsn(r.wal_lsn or 0)} < "
                            f"{format_lsn(min_lsn)})" if short else ""))
        elif lag_b > max_b or lag_s > max_s:
            # Which limit (the read's own, its scope's or [replicas]'), and by how much.
            past = [f"max_lag_seconds = {max_s:g}"] if lag_s > max_s else []
            if lag_b > max_b:
                past.append(f"max_lag_bytes = {max_b}")
            parts.append(f"{r.name} is {lag_s:.1f} s and {_wal_bytes(lag_b)} behind, past "
                         + " and ".join(past))
        elif short:
            parts.append(f"{r.name} has not replayed {what} yet "
                         f"({format_lsn(r.wal_lsn or 0)} < {format_lsn(min_lsn)})")
    return "; ".join(parts) or "no replicas"


def _note_flushed_shards(session: Session, flush_context: Any) -> None:
    assert isinstance(session, ShardedSession)
    router = session.cluster.router
    for obj in (*session.new, *session.dirty, *session.deleted):
        state = inspect(obj)
        token = state.key[2] if state.key is not None else state.identity_token
        try:
            is_ref = router.table_route(state.mapper).is_reference
        except RoutingError:
            continue
        if is_ref:
            session._sk_written.update(session.cluster.shard_names)
        elif token is not None:
            session._sk_written.add(token)


def _hold_commit_connections(session: Session) -> None:
    """Before a commit, keep the written shards' connections for reading the WAL position after it."""
    assert isinstance(session, ShardedSession)
    if session.in_nested_transaction():
        return  # releasing a savepoint commits nothing
    _refuse_external_connections(session)
    _refuse_aborted(session)
    session._sk_commit_conns = {}
    if not session.cluster.has_replicas:
        return
    # before_commit runs before the commit's own flush; flush now so the shards
    # it writes are known (the commit's flush then has nothing left to do).
    if session._new or session._deleted or session.dirty:
        session.flush()
    if not session._sk_written:
        return
    for shard in session._sk_written:
        if session.cluster.replica_count(shard):
            # The session already holds this connection; asking for it again
            # checks nothing new out of the pool.
            session._sk_commit_conns[shard] = Session.connection(session, bind_arguments={"shard_id": shard})


# Inside run_transaction's fn: a count of the commits of every ShardedSession in this
# context, so that run_transaction does not run fn again after one of another session (a
# nested run_transaction, an audit session) either.
_COMMITS_IN_FN: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "shardkit_commits_in_fn", default=None)


def _count_commit_in_fn() -> None:
    cell = _COMMITS_IN_FN.get()
    if cell is not None:
        cell[0] += 1


def _record_tokens(session: Session, only: Iterable[str] | None = None) -> None:
    """After a commit, remember each written shard's WAL position (read-your-writes);
    ``only``: the shards that committed, when the commit failed on another."""
    assert isinstance(session, ShardedSession)
    if session.in_nested_transaction():
        # A savepoint was released: its writes are still part of the open
        # transaction (read from the primary) and not committed yet (no token).
        return
    session._sk_commits += 1
    _count_commit_in_fn()
    conns, session._sk_commit_conns = session._sk_commit_conns, {}
    written, session._sk_written = session._sk_written, set()
    late = [shard for shard in written - conns.keys() if session.cluster.replica_count(shard)]
    if late:
        # Written after before_commit held the connections (the application's own
        # before_commit listener, or changes an after_flush_postexec listener made, which
        # the commit flushes again): their connections are still the transaction's.
        entries = getattr(session.get_transaction(), "_connections", None) or {}
        for shard in late:
            entry = entries.get(session.cluster.primary(shard))
            if entry is not None:
                conns[shard] = entry[0]
    if only is not None:
        conns = {shard: conn for shard, conn in conns.items() if shard in only}
    for shard, conn in conns.items():
        _remember_position(session, shard, "commit", conn)


def _remember_position(session: ShardedSession, shard: str, after: str, conn: Any = None) -> None:
    """Remember ``shard``'s WAL position (read-your-writes) after ``after`` committed there:
    read on ``conn``, the session's own committed connection, when given (no second
    checkout, so a full pool cannot deadlock here), else on a connection of its own.
    The insert position is at or after the commit record."""
    text = None
    if conn is not None:
        try:
            text = conn.exec_driver_sql(WAL_POSITION_SQL).scalar()
        except Exception:  # noqa: BLE001
            pass  # it died after its COMMIT: any connection to the primary will do
    if text is None:
        try:
            mon = session.cluster._monitor
            if mon is not None and mon.running and not mon.answers(mon.shards[shard].primary):
                # Hung (stopped, accepting TCP) or down: a query on a pooled connection
                # would wait for ever, holding the session's close() or rollback().
                raise ShardUnavailable("its primary has not answered the health poll lately",
                                       shard=shard)
            text = _primary_position(session.cluster, shard)
        except Exception as e:  # noqa: BLE001
            # Without a position, this session (and any given its token) reads
            # this shard from the primary.
            log.warning("could not read %s's WAL position after %s (%s); its reads go to the "
                        "primary", shard, after, str(e))
            session._sk_tokens[shard] = _UNKNOWN_POSITION
            return
    lsn = replay_target(parse_lsn(text))
    if lsn > session._sk_tokens.get(shard, 0):
        session._sk_tokens[shard] = lsn
    if lsn > session._sk_token_checked.get(shard, -1):
        # Read on the primary itself (see ShardedSession._token_beyond_primary).
        session._sk_token_checked[shard] = lsn


def _primary_position(cluster: Cluster, shard: str) -> str:
    """The WAL position of ``shard``'s primary now, read on a connection of its own."""
    with cluster.primary(shard).connect() as conn:
        return conn.exec_driver_sql(WAL_POSITION_SQL).scalar()

# Commits of primaries' connections, numbered as they start (see ShardedSession.commit).
_COMMIT_SEQ = _counter(1)


def _watch_primary(dialect: Any, short_writes: bool, autocommit: bool = False) -> None:
    """Wrap a primary engine's own dialect so that each COMMIT is numbered on its connection
    (``ShardedSession.commit()`` learns from it which shards committed when a commit fails
    part way) and, with ``short_writes``, an UPDATE or DELETE that matched fewer rows than
    it was given is noted (see ``_SHORT_WRITE``), and with ``autocommit`` too (an engine whose
    connections commit each statement as it runs) a statement that wrote is noted on its
    connection (see ``_AUTOCOMMITTED``).  Rather than the engine's "commit" and
    "after_cursor_execute" events: an engine with a connection-event listener makes every
    statement and transaction on it dispatch all the connection events (about 90 Python
    calls a read), and ``create_engine()`` gives each engine a dialect of its own."""
    do_commit = dialect.do_commit

    def noted_commit(dbapi_connection: Any) -> None:
        # The pool's proxy of the connection: its info is the Connection's.
        dbapi_connection.info["shardkit_commit"] = next(_COMMIT_SEQ)
        do_commit(dbapi_connection)

    dialect.do_commit = noted_commit
    do_prepare_twophase = dialect.do_prepare_twophase

    def prepare_or_let_go(connection: Any, xid: Any) -> None:
        try:
            do_prepare_twophase(connection, xid)
        except Exception:
            # A PREPARE TRANSACTION that fails (a deferred constraint, prepared
            # transactions disabled) rolls the transaction back, yet psycopg takes it as
            # prepared: the rollback would send ROLLBACK PREPARED for a transaction that
            # does not exist (an error hiding this one, from Session.prepare() too) and
            # the pool's reset would fail ("rollback() cannot be used during a two-phase
            # transaction", logged as an ERROR).  Nothing is left on the server: let the
            # connection go (its rollback is then skipped), and raise the PREPARE's error.
            raw = getattr(connection.connection, "dbapi_connection", None)
            info = getattr(raw, "info", None)
            if (raw is not None and not raw.closed and not getattr(raw, "broken", False)
                    and info is not None and info.transaction_status == TransactionStatus.IDLE):
                connection.invalidate()
            raise

    dialect.do_prepare_twophase = prepare_or_let_go
    if not short_writes:
        return
    do_execute, do_executemany = dialect.do_execute, dialect.do_executemany
    do_execute_no_params = dialect.do_execute_no_params

    note = _note_autocommitted_write if autocommit else _note_short_write

    def noted_execute(cursor: Any, statement: Any, parameters: Any, context: Any = None) -> None:
        do_execute(cursor, statement, parameters, context)
        note(cursor, context, 1)

    def noted_executemany(cursor: Any, statement: Any, parameters: Any, context: Any = None) -> None:
        do_executemany(cursor, statement, parameters, context)
        note(cursor, context, len(parameters))

    def noted_execute_no_params(cursor: Any, statement: Any, context: Any = None) -> None:
        do_execute_no_params(cursor, statement, context)
        note(cursor, context, 1)

    dialect.do_execute = noted_execute
    dialect.do_executemany = noted_executemany
    dialect.do_execute_no_params = noted_execute_no_params


class _ShardedTransaction(SessionTransaction):
    """A ShardedSession's outermost transaction: its commit(), which ``with
    session.begin():`` and ``sessionmaker.begin()`` call instead of Session.commit(),
    goes through :meth:`ShardedSession.commit` (a commit that failed part way raises
    CommitError, a two-phase commit whose shards all prepared is finished)."""

    def commit(self, _to_root: bool = False) -> None:
        session = self.session
        if (isinstance(session, ShardedSession) and not session._sk_committing
                and session.get_transaction() is self):
            session.commit()
        else:
            super().commit(_to_root)


def _transaction_connections(session: Session) -> list[Any]:
    """The connections of the session's outermost transaction (SQLAlchemy keeps each
    under its engine and under itself; there is no public API listing them)."""
    trans = session.get_transaction()
    entries = getattr(trans, "_connections", None) if trans is not None else None
    if not entries:
        return []
    seen: dict[int, Any] = {}
    for entry in list(entries.values()):
        seen.setdefault(id(entry[0]), entry[0])
    return list(seen.values())


def _engine_info(conn: Any) -> Mapping[str, Any]:
    """What shardkit records on the engine of ``conn`` (shard, role, node, ...); empty for
    an engine the application bound itself (``bind_arguments={"bind": ...}``)."""
    return getattr(conn.engine, "info", None) or {}


def _primary_shard(conn: Any) -> str | None:
    info = _engine_info(conn)
    return info.get("shard") if info.get("role") == PRIMARY else None


def _node_of(conn: Any, unknown: str = "?") -> str:
    """The node a connection is to (``unknown`` for an engine the application bound itself)."""
    return _engine_info(conn).get("node", unknown)


def _refuse_external_connections(session: Session) -> None:
    """Before a commit: a Connection of one of the cluster's nodes that the application gave
    the session (``bind_arguments={"bind": connection}``) joined its transaction as in
    SQLAlchemy's "join an external transaction" recipe; committing would report (and
    record for read-your-writes) writes the outer transaction may never commit, and the
    session's next transaction would not join it.  Refused: nothing is committed."""
    trans = session.get_transaction()
    entries = getattr(trans, "_connections", None) if trans is not None else None
    for entry in (entries or {}).values():
        # (SessionTransaction's entry: connection, transaction, should_commit, and whether
        # the session connected it itself: False for a Connection it was given.)
        if not entry[3] and _engine_info(entry[0]).get("shard") is not None:
            raise sa_exc.InvalidRequestError(_EXTERNAL_TRANSACTION.format(
                what=f"was given a Connection of {_node_of(entry[0])} (bind_arguments={{'bind': ...}}), "
                     "so nothing was committed (call rollback())"))


def _refuse_aborted(session: Session) -> None:
    """Before a commit: a shard whose transaction an error aborted would roll back at
    COMMIT while the others commit.  On one database the error would have cost the
    whole transaction; refuse to commit any of it instead of silently keeping part."""
    aborted = []
    lost = []
    primaries = []
    for conn in _transaction_connections(session):
        shard = _primary_shard(conn)
        if shard is not None:
            primaries.append(shard)
        if conn.closed:
            continue
        name = shard or _node_of(conn, "a node")
        if conn.invalidated:
            # Its server went away under a statement (a replica that died while a streamed
            # result was being read): that part of the transaction is gone, and SQLAlchemy
            # would refuse its COMMIT after committing the connections before it.
            lost.append(name)
            continue
        if _failed_transaction(conn):
            aborted.append(name)
    if aborted or lost:
        why = []
        if aborted:
            why.append(f"an earlier error in this transaction aborted it on shard(s) "
                       f"{', '.join(sorted(aborted))} (PostgreSQL ignores what follows and rolls "
                       "back at COMMIT, while the other shards would commit)")
        if lost:
            why.append(f"its connection to {', '.join(sorted(lost))} was lost under an earlier "
                       "statement (the transaction there is gone)")
        raise CommitError(
            f"cannot commit: {'; and '.join(why)}; nothing was committed on any shard: call "
            "rollback() and run the transaction again (to go on after an error inside a "
            "transaction, run the failing statement in begin_nested())",
            committed=[], failed=sorted(aborted or lost)[0], not_committed=sorted(primaries))


def _finish_past_lost_readers(session: ShardedSession, error: BaseException) -> BaseException | None:
    """After Session.commit() raised: when it was the COMMIT of a primary's connection
    the transaction only read from that met its server gone, nothing is lost with it: let
    that connection go, commit the connections SQLAlchemy's commit loop did not reach,
    and complete the session's commit (None).  Else the error to report: ``error``, or a
    later COMMIT's.  (A replica's COMMIT never fails so: see _end_replica_transactions.)"""
    trans = session.get_transaction()
    entries = getattr(trans, "_connections", None) if trans is not None else None
    if not entries:
        return error
    while True:
        if not (isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated):
            return error
        lost = [(key, entry) for key, entry in entries.items()
                if entry[2] and entry[0].invalidated]
        if not lost or any(_primary_shard(entry[0]) in session._sk_written for _, entry in lost):
            return error
        for key, entry in lost:
            entries[key] = _not_to_commit(entry)
        names = sorted({_node_of(entry[0]) for _, entry in lost})
        log.warning("the COMMIT of %s, which this transaction only read from, met its connection "
                    "lost (%s); nothing was written there: the other shards commit",
                    ", ".join(names), first_line(error))
        pending = {id(entry[0]): entry for entry in entries.values() if entry[2]}
        try:
            for _conn, conn_trans, *_ in sorted(
                    pending.values(), key=lambda v: _node_of(v[0])):
                if conn_trans.is_active:
                    conn_trans.commit()
        except Exception as e:  # noqa: BLE001 - looked at again above
            error = e
            continue
        _complete_commit(session, entries)
        return None


def _not_to_commit(entry: tuple[Any, ...]) -> tuple[Any, ...]:
    """A SessionTransaction's entry for a connection (connection, transaction,
    should_commit, autoclose) that its commit loop is to leave alone."""
    return (entry[0], entry[1], False, *entry[3:])


def _complete_commit(session: ShardedSession, entries: dict[Any, tuple[Any, ...]]) -> None:
    """Every connection of the session's transaction has committed (or been let go):
    complete the session's commit (events, objects made persistent, connections
    released) without committing anything again."""
    for key, entry in list(entries.items()):
        entries[key] = _not_to_commit(entry)
    Session.commit(session)


def _partial_commit(session: ShardedSession, start: int, error: BaseException) -> CommitError | None:
    """After Session.commit() raised: when some shards committed writes before one failed
    (the commits run one after another), the CommitError that says so, with
    read-your-writes kept for the shards that committed; else None."""
    attempted = []
    lost = []
    written = session._sk_written
    for conn in _transaction_connections(session):
        shard = _primary_shard(conn)
        if shard is None:
            continue
        if conn.invalidated:
            # Its connection died: at its COMMIT (before the commit, _refuse_aborted
            # refuses a lost connection), whose number went with it.  (One the
            # transaction only read was let go by _finish_past_lost_readers.)
            if shard in written:
                lost.append(shard)
            continue
        try:
            seq = conn.info.get("shardkit_commit", 0)
        except Exception:  # noqa: BLE001 - a closed connection: never committed
            continue
        if seq > start:
            attempted.append((seq, shard))
    attempted.sort()
    for shard in lost:
        if session.cluster.replica_count(shard):
            # Its COMMIT may have reached the server before the connection went (README:
            # check its rows before re-applying them): that check, and any session given
            # this one's token, must not read a replica that lacks the commit.  The
            # primary's position now covers it, if it happened (else reads use the primary).
            _remember_position(session, shard, "a COMMIT whose connection was lost")
    if lost:
        # The shards that noted a COMMIT committed; the commit stopped at the lost one.
        done = attempted
        failed = sorted(lost)[0]
    else:
        done = attempted[:-1]
        failed = attempted[-1][1] if attempted else None
    # Shards the transaction only read from committed nothing worth reporting.
    committed = sorted(shard for _, shard in done if shard in written)
    if not committed or failed is None:
        return None
    rest = sorted(written - set(committed) - {failed})
    _record_tokens_or_primary(session, committed)
    first = first_line(error)
    return CommitError(
        f"the commit reached shard(s) {', '.join(committed)} (their writes are committed) "
        f"but failed on shard {failed}"
        + ("" if failed in written else ", which this transaction only read from,")
        + f" ({type(error).__name__}: {first})"
        + (f"; shard(s) {', '.join(rest)} were not committed" if rest else "")
        + (f" (shard {failed}'s connection was lost at its COMMIT: PostgreSQL rolled its "
           "transaction back unless the COMMIT had reached it first, so check whether its "
           "writes are there before re-applying them)" if lost else "")
        + ": a ShardedSession commits each shard in turn, it is not a distributed "
        "transaction (use twophase=True for one); call rollback(), then repair or "
        "re-apply the writes of the shards that did not commit",
        committed=committed, failed=failed,
        not_committed=[failed, *rest] if failed in written else rest, cause=error)


def _record_tokens_or_primary(session: ShardedSession, committed: list[str]) -> None:
    """Read-your-writes for the shards of a partial commit; without their positions, their
    reads use the primary."""
    try:
        _record_tokens(session, only=committed)
    except Exception:  # noqa: BLE001 - reads of those shards then use the primary
        for shard in committed:
            session._sk_tokens[shard] = _UNKNOWN_POSITION


def _finish_twophase(session: ShardedSession, error: BaseException) -> bool:
    """After a two-phase Session.commit() raised: if every shard had prepared (so the
    transaction's outcome is commit), commit what is still prepared and complete the
    session's commit (True); raise CommitError if a shard's transaction stays prepared.
    False if the commit failed before every shard prepared (SQLAlchemy rolled it back)."""
    trans = session.get_transaction()
    entries = getattr(trans, "_connections", None) if trans is not None else None
    if not entries:
        return False
    distinct = list({id(v[0]): v for v in entries.values()}.values())
    if not all(isinstance(t, TwoPhaseTransaction) and t._is_prepared for _, t, *_ in distinct):
        return False
    committed: list[str] = []
    left: dict[str, str] = {}
    failures: dict[str, BaseException] = {}
    for conn, tp, *_ in sorted(distinct, key=lambda v: _primary_shard(v[0]) or ""):
        shard = _primary_shard(conn) or _node_of(conn)
        if tp.is_active:
            # Not reached by SQLAlchemy's commit loop, which stopped at the failure.
            try:
                tp.commit()
                committed.append(shard)
                continue
            except Exception as e:  # noqa: BLE001 - finished on a new connection below
                failures[shard] = e
        # Its COMMIT PREPARED was sent, or failed: the transaction is committed unless
        # it is still prepared (nothing else ends it).
        try:
            with conn.engine.connect() as fresh:
                if tp.xid in fresh.recover_twophase():
                    fresh.commit_prepared(tp.xid, recover=True)
                    log.warning("finished the two-phase commit of %s on a new connection "
                                "(COMMIT PREPARED %s)", shard, tp.xid)
                if session._sk_commit_conns.pop(shard, None) is not None:
                    # Read-your-writes: the position read here, not on the failed connection
                    # (which the commit's own record of positions then leaves alone).
                    session._sk_written.discard(shard)
                    lsn = replay_target(parse_lsn(fresh.exec_driver_sql(
                        WAL_POSITION_SQL).scalar()))
                    session._sk_tokens[shard] = max(lsn, session._sk_tokens.get(shard, 0))
            committed.append(shard)
        except Exception as e:  # noqa: BLE001 - reported below
            failures[shard] = e
            left[shard] = tp.xid
    if not left:
        _complete_commit(session, entries)
        return True
    _record_tokens_or_primary(session, committed)
    failed = sorted(left)[0]
    cause = failures.get(failed, error)
    first = first_line(cause)
    raise CommitError(
        f"the two-phase commit failed after every shard had prepared ({type(cause).__name__}: "
        f"{first}); "
        + (f"shard(s) {', '.join(committed)} committed; " if committed else "")
        + "the transaction is still prepared on "
        + ", ".join(f"shard {sh} as {gid!r}" for sh, gid in sorted(left.items()))
        + ", holding its locks: its outcome is commit, so run COMMIT PREPARED '<id>' there "
        "when the shard answers (pg_prepared_xacts lists it); call rollback() to go on "
        "with this session",
        committed=committed, failed=failed, not_committed=sorted(left), cause=cause,
        prepared=dict(left)) from error


def _token_for_keyed(session: Session, instance: Any) -> None:
    """An object attached with an identity key that names no shard (made with
    make_transient_to_detached()) gets its shard in the key, so session.get() and
    loads of its row find it in the identity map instead of loading a second copy.
    One whose key names a shard its shard key does not place it on is refused (see
    _refuse_stale_token)."""
    state = inspect(instance)
    key = state.key
    if key is None or len(key) < 3:
        return
    assert isinstance(session, ShardedSession)
    if key[2] is not None:
        _refuse_stale_token(session, state)
        return
    try:
        shard = session._choose_shard_for_instance(state.mapper, instance)
    except ShardkitError:
        return  # no shard key yet: its flush says what is missing
    state.key = (key[0], key[1], shard)


def _refuse_stale_token(session: ShardedSession, state: Any, *, loading: bool = False) -> None:
    """Refuse to attach (add(), merge()) a detached object whose identity key names a shard
    its shard key, as in the database (not a pending change, which the flush refuses as a
    move), does not place it on: make_transient() keeps the object's last shard
    (``identity_token``), and make_transient_to_detached() keys it with that shard, not
    the one of the key it was given meanwhile.  Its flush would UPDATE or DELETE the row
    of that primary key on the old shard (another row, when the primary key does not hold
    the shard key).  With a catalog a move also explains such an object (loaded before its
    bucket moved): the guard and the flush refuse its writes as NotOwned, unless the old
    shard has a row of that primary key that it owns (another tenant's, the guard lets its
    write through: refused here, asked of that shard); ``loading`` (merge() loading the
    row to compare) would read the old shard's copy: NotOwned."""
    cluster = session.cluster
    mapper = state.mapper
    router = cluster.router
    try:
        found = router.instance_keys.get(mapper) or _instance_keys(router, mapper)
    except ShardkitError:
        return
    tr, keys = found
    if tr.strategy is None:
        return  # a reference row: any shard's copy
    values = []
    for attr, _, co in keys:
        v = state.committed_state.get(attr, state.dict.get(attr))
        if v is None or v is NO_VALUE:
            return  # not loaded: not known
        values.append(co(v) if co else v)
    try:
        shard = tr.strategy.shard_for_key(values[0] if len(values) == 1 else tuple(values))
    except ShardkitError:
        return
    token = state.key[2]
    if shard != token:
        if cluster.catalog is not None and not _owned_namesake(session, state, tr, token):
            if loading:
                raise _moved_object_error(mapper, state.key[1], token, shard, cluster,
                                          "merge() would compare it with that shard's copy",
                                          values[0] if len(values) == 1 else tuple(values))
            return
        raise RoutingError(
            f"{mapper.class_.__name__} {state.key[1]} is keyed to shard {token} (its identity "
            f"key) but its shard key places it on {shard}: its flush would write the row of "
            f"that primary key on {token}"
            + (f", another row, which {token} owns (or this object was loaded before its bucket "
               f"moved to {shard}: load it again there)" if cluster.catalog is not None else "")
            + ". make_transient() keeps an object's last shard and "
            "make_transient_to_detached() keys it with that one, whatever key it was given "
            "meanwhile (its identity key keeps it: clearing identity_token now changes nothing): "
            "re-key it with make_transient(obj), inspect(obj).identity_token = None, then "
            f"make_transient_to_detached(obj), or load the row from {shard}", table=tr.table)


def _owned_namesake(session: ShardedSession, state: Any, tr: TableRoute, token: str) -> bool:
    """Whether shard ``token`` has a row of ``state``'s primary key whose shard key the map
    places there (a row the ownership guard lets a write through to), asked of its primary
    in the session's transaction.  Only when the primary key does not hold the shard key
    (else such a row would have the object's own key, which the map places elsewhere)."""
    mapper = state.mapper
    if _pk_plan_for(session.cluster.router, mapper) is not False:
        return False
    conn = Session.connection(session, bind_arguments={"shard_id": token, "shardkit_role": PRIMARY})
    for row in conn.execute(_shard_key_by_pk(mapper, tr, state.key[1])):
        try:
            if session.cluster.router.shard_for(mapper, row[0] if len(row) == 1 else tuple(row)) == token:
                return True
        except ShardkitError:
            continue
    return False


def _end_transaction(session: ShardedSession, transaction: Any) -> None:
    """When the outermost transaction ends (commit, rollback or close), its writes stop
    pinning reads to the primaries.  A savepoint ending changes nothing: what the
    transaction wrote before or inside it is still visible only on the primary.
    (A listener of ShardedSession's: its sessions are ShardedSessions.)"""
    if transaction._parent is None:  # (its parent, without the property's call)
        if session._sk_written:
            _record_autocommitted(session, transaction)
        _forget_transaction(session)


def _savepoint_rolled_back(session: ShardedSession, previous_transaction: Any) -> None:
    """A savepoint was rolled back: a shard first written inside it has nothing of this
    transaction's to commit.  It is no longer counted as written (a commit that fails on
    another shard after its COMMIT does not report writes committed there, nor does the
    consistency token name it), but the rest of the transaction still reads it from its
    primary (README: a savepoint's rollback does not end that).  A later write to it
    counts it again.  (A listener of ShardedSession's: its sessions are ShardedSessions.)"""
    before = getattr(previous_transaction, "_sk_written_before", None)
    if before is None or not previous_transaction.nested:
        return
    for shard in session._sk_written - before:
        session._sk_written.discard(shard)
        session._sk_replica[shard] = _ON_PRIMARY


def _record_autocommitted(session: ShardedSession, transaction: Any) -> None:
    """The outermost transaction ends without a COMMIT (a rollback, a close) having
    written: to a primary whose connection was in autocommit (``isolation_level``
    ``AUTOCOMMIT``, for the engine or the connection), each statement committed as it
    ran.  Remember those shards' WAL positions (read-your-writes), as a commit would, and
    that something was committed (run_transaction must not run the function again): a
    statement wrote on an autocommit engine's connection (noted with a catalog, see
    ``_note_autocommitted_write``), or the application put the connection in autocommit
    (what ran on it is not known).
    (The transaction's connections are closed by now, their options kept.)"""
    shards = set()
    for entry in (getattr(transaction, "_connections", None) or {}).values():
        conn = entry[0]
        info = _engine_info(conn)
        if info.get("role") == PRIMARY and info["shard"] in session._sk_written and _autocommits(conn):
            # (On an engine in autocommit, the statements that wrote are noted; on a
            # connection put in autocommit, anything may have.)
            if not info.get("autocommit") or conn in _AUTOCOMMITTED:
                session._sk_autocommitted = True
                _count_commit_in_fn()
            if session.cluster.replica_count(info["shard"]):
                shards.add(info["shard"])
    for shard in sorted(shards):
        _remember_position(session, shard, "writes in autocommit")


def _autocommits(conn: Any) -> bool:
    """Whether ``conn`` (maybe closed) commits each statement as it runs: its engine was
    made in autocommit, or it was given isolation_level AUTOCOMMIT (its options outlive it)."""
    return bool(_engine_info(conn).get("autocommit")) or \
        conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"


def _forget_transaction(session: ShardedSession) -> None:
    """Clear what the session records for its current transaction (not read-your-writes)."""
    if session._sk_written:
        session._sk_written = set()
    if session._sk_commit_conns:
        session._sk_commit_conns = {}
    if session._sk_replica:
        session._sk_replica = {}
    if session._sk_ref_copied:
        session._sk_ref_copied = set()  # a flush that failed before after_flush
    if session._sk_ref_shard is not None:
        session._sk_ref_shard = None


_sa_connections_for_states = getattr(persistence, "_connections_for_states", None)


def _connections_for_states(base_mapper: Any, uowtransaction: Any, states: Any) -> Any:
    """SQLAlchemy's ``persistence._connections_for_states`` (the order in which a flush
    writes a class hierarchy's objects, each with its connection), shard by shard in a
    ShardedSession.

    The unit of work inserts new objects in the order they were added, updates and
    deletes in primary key order, and batches consecutive rows for one connection
    into one statement: objects of alternating shards would be written one statement
    per row.  Here each shard's objects keep that order (the order its database sees,
    and takes row locks in), and the shards come in one order for every flush, the
    cluster's (the config's, in which a statement on several shards takes them too):
    two flushes that each took the shards in the order of their own first object
    could each hold a row on one database that the other waits for on another, a
    deadlock neither database can see (it waits for ever, or for lock_timeout).
    Each object is routed once, as before, and all of them before the flush's
    before_insert/before_update listeners run.
    """
    if not isinstance(uowtransaction.session, ShardedSession):
        return _sa_connections_for_states(base_mapper, uowtransaction, states)
    placed = list(_sa_connections_for_states(base_mapper, uowtransaction, states))
    if len(placed) > 1:
        names = uowtransaction.session.cluster.router.shard_names
        rank: dict[Any, tuple[int, int]] = {}
        for p in placed:
            if p[3] not in rank:
                shard = _engine_info(p[3]).get("shard")
                # (an engine shardkit did not make: after the shards, as first met)
                rank[p[3]] = (names.index(shard), 0) if shard in names else (len(names), len(rank))
        if len(rank) > 1:
            placed.sort(key=lambda p: rank[p[3]])
    return placed


# Every flush looks the function up in its module.  (A SQLAlchemy without it flushes
# as it does: correctly, in more statements.)
if _sa_connections_for_states is not None:
    persistence._connections_for_states = _connections_for_states
if _sa_emit_post_update_statements is not None:
    persistence._emit_post_update_statements = _emit_post_update_statements


def _forget_get_plans(class_: Any) -> None:
    """A class no longer mapped (registry.dispose(), clear_mappers()): get()'s plans, kept
    by class, hold its old mapper and that mapper's load statement (see _get_impl), which
    no change of the polymorphic mappers they check would show; the class mapped again
    (a test suite's mapping per test) has a new mapper, and no mapper until then."""
    for cluster in list(_LIVE):
        cluster.router.get_plans.clear()


# Listening on the class (not on each instance, as horizontal_shard does) keeps
# session construction as cheap as a plain Session's.  Statements are routed in
# execute() rather than in a do_orm_execute hook: a hook makes the ORM prepare
# every statement twice, which costs more than the routing itself.
event.listen(ShardedSession, "before_flush", _refuse_shard_key_moves)
event.listen(ShardedSession, "after_flush", _replicate_reference_rows)
event.listen(ShardedSession, "after_flush", _replicate_reference_pairs)
event.listen(ShardedSession, "after_flush", _note_flushed_shards)
event.listen(ShardedSession, "before_commit", _hold_commit_connections)
event.listen(ShardedSession, "after_commit", _record_tokens)
event.listen(ShardedSession, "after_transaction_end", _end_transaction)
event.listen(ShardedSession, "after_soft_rollback", _savepoint_rolled_back)
event.listen(ShardedSession, "after_flush", _after_flush)
event.listen(ShardedSession, "before_attach", _token_for_keyed)
# On every mapper (it returns at once outside a ShardedSession).
event.listen(Mapper, "before_update", _refuse_key_change_in_flush)
event.listen(Mapper, "after_insert", _copy_new_reference_row)
event.listen(Mapper, "after_update", _copy_changed_reference_row)
event.listen(Mapper, "after_delete", _delete_reference_copies)
event.listen(Mapper, "after_insert", _refuse_key_changed_after_routing)
event.listen(Mapper, "after_update", _refuse_key_changed_after_routing)
# On every class SQLAlchemy stops instrumenting (public InstrumentationEvents; rare).
event.listen(object, "class_uninstrument", _forget_get_plans, propagate=True)


def run_transaction(session_factory: Any, fn: Any, *, retries: int = 1,
                    refresh_timeout: float = 5.0,
                    on_commit: Callable[[str], Any] | None = None) -> Any:
    """Run ``fn(session)`` in a new session and commit; retry if the bucket map was stale.

    When a shard refuses a write because a move has switched its bucket to
    another shard (:class:`~shardkit.NotOwned`), nothing was written: the
    session is rolled back, the cluster's map is reloaded from the catalog
    (waiting up to ``refresh_timeout`` seconds for a version newer than the
    one that routed the refused write to be published: a shard may refuse
    before the catalog has recorded the move; no wait when the map in use
    already gives the refused bucket to another shard, and more wait while the
    newer maps still give it to the shard that refused it) and ``fn`` runs again in a fresh
    session, up to ``retries`` more times.  ``fn`` must therefore be safe to run
    again (do not keep state from a failed attempt).  A ``NotOwned`` after ``fn``
    committed part of its work itself (``session.commit()`` inside it) propagates:
    running it again would repeat what was committed.  So does one after a statement of
    ``fn`` wrote through a primary connection in autocommit (it committed as it ran: with
    the engine in autocommit, a statement that wrote rows; on a connection the application
    put in autocommit, anything, as shardkit cannot see what ran on it), and one after
    another ShardedSession committed while ``fn`` ran (a nested ``run_transaction``, a
    session of its own).  Returns what ``fn`` returned (objects of the session are
    detached by then, and expired unless the sessionmaker has ``expire_on_commit=False``).
    A generator or async function is refused (``TypeError``): calling it runs none of its
    body.

    ``on_commit`` is called with the session's consistency token once the commit
    has succeeded (before the session closes), so that what was committed can be read
    back elsewhere: pass it to a later session (``consistency_token=``), through a
    cookie or a job's arguments.  An error it raises (``NotOwned`` too) propagates;
    the commit stands, and ``fn`` is not run again.

    A key no range or list value of the map in use holds (:class:`~shardkit.NoShardForKey`),
    in a cluster with a catalog: the map is reloaded once, without waiting, and ``fn`` runs
    again (within ``retries``, on the same terms as above) if the catalog had a newer map,
    which may give the key a shard (`shardkit rebalance apply --move-value` or `--split` of
    a key no shard had); else the error propagates.
    """
    if _pyinspect.isgeneratorfunction(fn) or _pyinspect.iscoroutinefunction(fn) or _pyinspect.isasyncgenfunction(fn):
        raise TypeError(_not_runnable(fn))
    _check_run_args(session_factory, fn, retries, refresh_timeout, on_commit)
    cell = _COMMITS_IN_FN.get()
    outermost = _COMMITS_IN_FN.set([0]) if cell is None else None
    try:
        return _run_transaction(session_factory, fn, retries, refresh_timeout, on_commit)
    finally:
        if outermost is not None:
            _COMMITS_IN_FN.reset(outermost)


def _check_run_args(session_factory: Any, fn: Any, retries: Any, refresh_timeout: Any,
                    on_commit: Any) -> None:
    """run_transaction()'s arguments, checked before anything runs: a bad ``retries`` or
    ``refresh_timeout`` would otherwise fail (or loop, a NaN) only at a NotOwned, during a
    move, and a bad ``on_commit`` only after the commit."""
    for name, value in (("session_factory", session_factory), ("fn", fn)):
        if not callable(value):
            raise TypeError(f"run_transaction(session_factory, fn): {name} must be callable "
                            f"(a sessionmaker; a function taking the session), not {value!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"run_transaction(retries=...) must be an int >= 0 (how many more "
                         f"times fn may run after a NotOwned), not {retries!r}")
    if (isinstance(refresh_timeout, bool) or not isinstance(refresh_timeout, numbers.Real)
            or not 0 <= refresh_timeout <= threading.TIMEOUT_MAX):
        raise ValueError(f"run_transaction(refresh_timeout=...) must be a number of seconds "
                         f">= 0 (finite), not {refresh_timeout!r}")
    if on_commit is not None and not callable(on_commit):
        raise TypeError(f"run_transaction(on_commit=...) must be None or a callable taking the "
                        f"consistency token, not {on_commit!r} (it is called after the commit)")


def _refuse_work_in_progress(session: Any) -> None:
    """run_transaction() runs ``fn`` in a new session: one the factory returned with a
    transaction begun or changes pending (a ``scoped_session``'s thread-local session in use,
    a nested ``run_transaction`` of the same registry) would have that work committed with
    ``fn``'s, rolled back and kept out of a retry, and its session closed under its owner.
    Checked before the session is entered, so the owner's work is left as it was."""
    if isinstance(session, Session) and (session.in_transaction() or session.new or session.dirty
                                         or session.deleted):
        raise sa_exc.InvalidRequestError(
            "run_transaction(session_factory, fn) runs fn in a new session, but "
            "session_factory() returned one with work in progress (a transaction begun, or "
            "objects added, changed or deleted), which fn's commit would commit with it and "
            "run_transaction would then close; a scoped_session returns the thread's own "
            "session: pass its sessionmaker (run_transaction(registry.session_factory, fn)), "
            "or commit or roll back that session first (nothing was run)")


def _not_runnable(fn: Any) -> str:
    return (f"run_transaction(session_factory, fn): fn ({getattr(fn, '__qualname__', fn)!r}) is a "
            "generator or async function (or returned a coroutine), whose call runs none of "
            "its body before the commit (its writes would never be made); pass a plain function")


def _committed_in_fn(session: Any, cell: list[int], before: int) -> bool:
    """Whether ``fn`` committed work while it ran (then it is never run again): through its
    session, through a primary connection in autocommit, or through another session (a
    nested run_transaction: the count in ``cell`` moved from ``before``)."""
    return bool(getattr(session, "_sk_commits", 0) or getattr(session, "_sk_autocommitted", False)
                or cell[0] != before)


def _run_transaction(session_factory: Any, fn: Any, retries: int, refresh_timeout: float,
                     on_commit: Callable[[str], Any] | None) -> Any:
    cell = _COMMITS_IN_FN.get()
    assert cell is not None
    attempt = 0
    while True:
        session = session_factory()
        _refuse_work_in_progress(session)
        with session:
            seen = session.cluster.map_version
            before = cell[0]
            try:
                result = fn(session)
                if _pyinspect.iscoroutine(result) or _pyinspect.isasyncgen(result):
                    if _pyinspect.iscoroutine(result):
                        result.close()  # (never to be awaited: no warning saying so)
                    raise TypeError(_not_runnable(fn))
                session.commit()
            except NotOwned as e:
                session.rollback()
                autocommitted = getattr(session, "_sk_autocommitted", False)
                elsewhere = cell[0] != before and not getattr(session, "_sk_commits", 0)
                if attempt >= retries or _committed_in_fn(session, cell, before):
                    # (fn committed part of its work itself: running it again would repeat it.)
                    if elsewhere and not autocommitted and attempt < retries:
                        e.add_note(
                            "(run_transaction did not run the function again: another session "
                            "committed inside it (a nested run_transaction, a session of its "
                            "own), and a retry would commit that work twice)")
                    if autocommitted and attempt < retries:
                        e.add_note(
                            "(run_transaction did not run the function again: a primary "
                            "connection in autocommit had committed its writes before this "
                            "one as they ran, and a retry would apply them twice; refresh "
                            "the map, check them and write what is missing yourself, or give "
                            "run_transaction sessions whose primaries are not in autocommit)")
                    raise
                # Another map may have arrived while fn ran, before the one that moved
                # this bucket: wait for one newer than the map that routed the write.
                stale = max(seen or 0, e.map_version or 0)
                refused = e
            except NoShardForKey:
                # A key no slice of the map in use holds: a newer map may give it a shard
                # (`rebalance apply --move-value/--split` of a new key).  Once, if the
                # catalog has a newer map already; no wait (a key no shard takes stays one).
                session.rollback()
                cluster = session.cluster
                if attempt >= retries or cluster.catalog is None or _committed_in_fn(session, cell, before):
                    raise
                try:
                    version = cluster.refresh_map()
                except (ConfigurationError, ShardUnavailable):
                    version = None  # (the key's own error says more than the catalog's)
                if version in (None, seen):
                    raise
                attempt += 1
                continue
            else:
                # Outside the try: the commit stands, nothing is run again.
                if on_commit is not None:
                    on_commit(session.consistency_token())
                return result
        attempt += 1
        cluster = session.cluster
        if not _moved_off(cluster, refused):
            deadline = time.monotonic() + refresh_timeout
            wait = refresh_timeout
            try:
                while True:
                    cluster.refresh_map(newer_than=stale, timeout=wait)
                    # A map newer than the stale one may still give the refused bucket or
                    # slice to the shard that refused it: a process two versions behind a
                    # split gets the split's version, not yet the switch's.  Wait on.
                    if cluster.map_version in (None, stale) or time.monotonic() >= deadline \
                            or not _still_on_refuser(cluster, refused):
                        break
                    stale = cluster.map_version
                    wait = max(deadline - time.monotonic(), 0.0)
            except ConfigurationError:
                pass  # a map the config file cannot route by: the next attempt is refused, saying so


def _map_owner(cluster: Cluster, refused: NotOwned) -> str | None:
    """The shard the map in use gives the bucket or slice the ownership guard refused
    (None for another refusal, or a unit the map does not know)."""
    unit = refused.bucket
    if unit is None or refused.shard is None or not getattr(refused, "_sk_guard_refusal", False):
        return None
    config = cluster.config
    if unit < SLICE_BASE:
        return config.bucket_map[unit] if 0 <= unit < len(config.bucket_map) else None
    return next((s.shard for s in config.slices if s.id == unit), None)


def _still_on_refuser(cluster: Cluster, refused: NotOwned) -> bool:
    """Whether the map in use still gives the bucket or slice the ownership guard refused
    to the shard that refused it (a retry by it would be refused again)."""
    owner = _map_owner(cluster, refused)
    return owner is not None and owner == refused.shard


def _moved_off(cluster: Cluster, refused: NotOwned) -> bool:
    """Whether a write the ownership guard refused (the shard does not own the bucket)
    needs no newer map to retry: the map in use already gives the bucket or slice to
    another shard.  (A map that arrived between the write's routing and the refusal is
    the map in use when the refusal is reported, so its version alone cannot tell.)
    The session's own checks report the version of the map that routed the statement,
    and may be refused by a shard that owns the bucket: they always wait."""
    owner = _map_owner(cluster, refused)
    return owner is not None and owner != refused.shard
