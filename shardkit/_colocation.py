"""Is a statement answered correctly by running it on each shard over that shard's rows?

Running a statement per shard is exact only when every row it combines lives
on one shard: every occurrence of a sharded table in it (a table, an alias, a
derived table) must be tied to the others by equal shard keys (a join or a
correlation on the key), because rows with equal keys are on the same shard.
Otherwise a per-shard run quietly misses combinations:

* a join of two tables of one group on a column other than the key
  (``orders JOIN users ON users.age = orders.amount``);
* a subquery that is not correlated on the key
  (``score = (SELECT max(score) FROM users)``, ``id IN (SELECT ... LIMIT 5)``),
  which each shard would compute over its own rows;
* a derived table (subquery or CTE in FROM) with LIMIT, OFFSET, DISTINCT,
  GROUP BY or aggregates over a sharded table, unless it groups (DISTINCT: compares)
  by the shard key of a hash, range or list group: then every group is on one shard.

:func:`colocation_problem` names the first such construct, or returns None.
Reference tables are on every shard and never a problem.  Tables of
*different* groups are the router's concern (it refuses them unless their keys
pin one shard).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy.sql import elements, functions, operators, selectable
from sqlalchemy.sql import util as sql_util
from sqlalchemy.sql.base import _from_objects
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.dml import Delete, Update

# a table's full name (Table.fullname) -> (group, key column names), or None for reference /
# unknown tables; the resolver, not its caller, falls back to the short name of a table of
# another schema that is not configured (as the router routes it): a reference table of
# another schema is no sharded namesake's instance
Resolver = Callable[[str], "tuple[str, tuple[str, ...]] | None"]


class _Instance:
    """One occurrence of a sharded table (or of a derived table over one) in a FROM list."""

    def __init__(self, frm: Any, group: str, keys: dict[Any, int], n_keys: int, label: str,
                 by_name: bool = False) -> None:
        self.frm = frm
        self.group = group
        self.keys = keys          # column key/name in frm.c -> key position
        # A table's (or its alias's) keys are its key columns' database names, as configured:
        # a Column("tenant_id", key="tid") is in frm.c as "tid", and another column may have
        # "tenant_id" for its key.  A derived table's are the keys of its columns in frm.c.
        self.by_name = by_name
        self.n_keys = n_keys
        self.label = label
        # (a derived table's) key columns that carry the key of an outer join's optional
        # side inside it: NULL for rows of every shard, so grouping by one is not local
        self.optional: set[Any] = set()


def colocation_problem(statement: Any, resolve: Resolver, one_shard: Iterable[Any] = (),
                       local_groups: frozenset[str] = frozenset()) -> str | None:
    """Why ``statement`` cannot run shard by shard, or None if it can.

    ``one_shard``: SELECTs of derived tables in its FROM whose rows are known to be on
    one shard (their WHERE pins them), over which LIMIT, GROUP BY, DISTINCT and
    aggregates are exact; everything else about them and the statement is checked.
    ``local_groups``: the groups whose strategy places each key value on one shard (hash,
    range, list): a derived table over them grouped (or made DISTINCT) by their shard key
    is computed whole on each shard (see :func:`_shard_local`)."""
    if isinstance(statement, selectable.CompoundSelect):
        for s in compound_selects(statement):
            problem = colocation_problem(s, resolve, local_groups=local_groups)
            if problem:
                return problem
        return None
    if isinstance(statement, (selectable.Select, Update, Delete)):
        return _check(_without_loader_options(statement), [], resolve,
                      one_shard=frozenset(map(id, one_shard)), local=local_groups)
    return None


def ungrouped(s: Any) -> Any:
    """A compound's member without the grouping SQLAlchemy wraps a nested compound in."""
    while isinstance(s, selectable.SelectStatementGrouping):
        s = s.element
    return s


def compound_selects(stmt: selectable.CompoundSelect) -> list[Any]:
    """The SELECTs of a UNION/INTERSECT/EXCEPT, nested compounds opened up, in order."""
    out: list[Any] = []
    for s in map(ungrouped, stmt.selects):
        out.extend(compound_selects(s) if isinstance(s, selectable.CompoundSelect) else [s])
    return out


def _without_loader_options(statement: Any) -> Any:
    """The statement as written: eager loads (joinedload ...) make the ORM wrap it in
    joins and derived tables of its own, which follow relationships and are per shard
    by design; shardkit merges the entities they load, not their rows.  So do the
    mapping's own (``relationship(..., lazy="joined")``) when the statement has LIMIT,
    OFFSET, DISTINCT or GROUP BY (the ORM then puts it in a derived table): those are
    left out too, by ``lazyload("*")``."""
    options = getattr(statement, "_with_options", ())
    nests = isinstance(statement, selectable.Select) and (
        statement._limit_clause is not None or statement._offset_clause is not None
        or statement._fetch_clause is not None or bool(statement._distinct)
        or bool(statement._group_by_clauses)) and \
        statement._propagate_attrs.get("compile_state_plugin") == "orm"
    if not options and not nests:
        return statement
    from sqlalchemy.orm import lazyload
    from sqlalchemy.orm.strategy_options import _AbstractLoad

    kept = tuple(o for o in options if not isinstance(o, _AbstractLoad))
    if len(kept) == len(options) and not nests:
        return statement
    copy = statement._generate()
    copy._with_options = kept
    return copy.options(lazyload("*")) if nests else copy


def _plain(x: Any) -> Any:
    """The element without ORM annotations (ORM statements mix annotated and plain copies)."""
    return x._deannotate() if hasattr(x, "_deannotate") else x


def _table_of(frm: Any) -> Any:
    # (FromClauseAlias: an alias, and a TABLESAMPLE, whose rows are the table's own.)
    return frm.element if isinstance(frm, selectable.FromClauseAlias) and isinstance(
        frm.element, selectable.TableClause) else frm


def _name(frm: Any) -> str:
    """What a message calls a FROM: its name, or for an unnamed alias (``aliased(User)``,
    ``.subquery()``) not SQLAlchemy's placeholder for the name it will have in SQL."""
    name = getattr(frm, "name", None)
    if isinstance(name, elements._anonymous_label):
        table = _table_of(frm)
        if table is not frm and isinstance(table, selectable.TableClause):
            return f"an alias of {table.name}"
        description = getattr(frm, "description", None)
        if not description or isinstance(description, elements._anonymous_label) \
                or str(description).startswith("Anonymous alias"):
            return "a subquery"
        return description
    return name or str(frm)


def _froms(stmt: Any) -> list[Any]:
    if isinstance(stmt, (Update, Delete)):
        return [stmt.table, *dml_extra_froms(stmt)]
    return list(stmt.get_final_froms())


def dml_extra_froms(statement: Any) -> list[Any]:
    """The tables an UPDATE/DELETE names only through columns in its WHERE or SET (rendered
    as UPDATE ... FROM / DELETE ... USING), as SQLAlchemy's compiler finds them."""
    seen = set(statement.table._cloned_set)
    out = []
    values = getattr(statement, "_values", None) or {}
    for crit in (*statement._where_criteria, *getattr(statement, "_extra_froms", ()), *values.values()):
        for item in _from_objects(crit) if isinstance(crit, ClauseElement) else ():
            if not seen.intersection(item._cloned_set):
                out.append(item)
            seen.update(item._cloned_set)
    return out


def _instances(froms: list[Any], resolve: Resolver, outer: list[_Instance],
               one_shard: frozenset[int] = frozenset(),
               local: frozenset[str] = frozenset()) -> tuple[list[_Instance], str | None]:
    out: list[_Instance] = []
    for f in froms:
        for frm in sql_util.surface_selectables(f):
            frm = _plain(frm)
            table = _table_of(frm)
            if isinstance(table, selectable.TableClause):
                placed = resolve(table.fullname)
                if placed is not None:
                    group, keys = placed
                    out.append(_Instance(frm, group, {k: i for i, k in enumerate(keys)}, len(keys),
                                         _name(frm), by_name=True))
            elif isinstance(frm, selectable.AliasedReturnsRows) and isinstance(
                    _derived_select(frm), (selectable.Select, selectable.CompoundSelect)):
                derived, problem = _derived(frm, resolve, outer, one_shard, local)
                if problem:
                    return out, problem
                out.extend(derived)
    return out, None


def _derived_select(frm: Any) -> Any:
    """The SELECT under a derived table, through aliases of aliases (``subquery().alias()``)."""
    inner = frm.element
    while isinstance(inner, selectable.AliasedReturnsRows):
        inner = inner.element
    return inner


def _derived(frm: Any, resolve: Resolver, outer: list[_Instance],
             one_shard: frozenset[int] = frozenset(),
             local: frozenset[str] = frozenset()) -> tuple[list[_Instance], str | None]:
    """A subquery or CTE in FROM: exact per shard if its own rows are, and it only filters
    (or its rows are on one shard: ``one_shard`` holds its SELECT), or it groups by the
    shard key of groups in ``local`` (:func:`_shard_local`)."""
    inner = _derived_select(frm)
    selects = compound_selects(inner) if isinstance(inner, selectable.CompoundSelect) else [inner]
    derived: list[_Instance] = []
    for sel in selects:
        problem = _check(sel, [], resolve, one_shard=one_shard, local=local)
        if problem:
            return [], problem
        sel_froms = _froms(sel)
        inner_instances, problem = _instances(sel_froms, resolve, [], one_shard, local)
        if problem:
            return [], problem
        if not inner_instances:
            continue
        label = _name(frm)
        what = ("a subquery" if label == "a subquery" else f"the derived table {label!r}") + \
            f" over {', '.join(sorted({i.label for i in inner_instances}))}"
        if isinstance(inner, selectable.CompoundSelect) and len(selects) > 1:
            # (A "compound" of one SELECT, as polymorphic_union() makes for a concrete
            # class without subclasses, is that SELECT.)
            return [], f"{what} is a UNION/INTERSECT/EXCEPT, which each shard would compute over its own rows"
        # Grouped (or DISTINCT) by the shard key: each group lives whole on one shard.
        shard_local = id(sel) not in one_shard and _shard_local(sel, sel_froms, inner_instances, local)
        for attr, construct in () if id(sel) in one_shard else (
                ("_limit_clause", "LIMIT"), ("_offset_clause", "OFFSET"), ("_fetch_clause", "FETCH"),
                *(() if shard_local else (
                    ("_group_by_clauses", "GROUP BY"), ("_distinct", "DISTINCT"),
                    ("_having_criteria", "HAVING")))):
            v = getattr(sel, attr, None)
            if v is None or v is False or (isinstance(v, (tuple, list)) and not v):
                continue
            return [], f"{what} has {construct}, which each shard would apply to its own rows only"
        if id(sel) not in one_shard and any(
                isinstance(e, elements.Over) if shard_local else _is_aggregate_or_window(e)
                for c in sel._raw_columns for e in _walk([c])):
            return [], f"{what} computes an aggregate or window function over each shard's rows only"
        # The derived table's columns that carry a key of its sharded tables; one
        # instance per group (the inner ones of a group are tied on the key already).
        by_group: dict[str, _Instance] = {}
        optional = _optional_sides(sel_froms)
        for inst in inner_instances:
            d = by_group.setdefault(inst.group, _Instance(frm, inst.group, {}, inst.n_keys, _name(frm)))
            for col in frm.c:
                for base in col.proxy_set:
                    if _plain(getattr(base, "table", None)) is inst.frm and \
                            getattr(base, "name", None) in inst.keys:
                        d.keys.setdefault(col.key, inst.keys[base.name])
                        if id(inst.frm) in optional or base.name in inst.optional:
                            d.optional.add(col.key)
        derived.extend(by_group.values())
    return derived, None


def _key_position(inst: _Instance, col: Any) -> int | None:
    """The position in ``inst``'s shard key of its column ``col``, or None."""
    if inst.by_name:
        return inst.keys.get(getattr(col, "name", None))
    pos = inst.keys.get(getattr(col, "key", None))
    return inst.keys.get(getattr(col, "name", None)) if pos is None else pos


def _shard_local(sel: Any, froms: list[Any], instances: list[_Instance], local: frozenset[str]) -> bool:
    """Whether derived table SELECT ``sel`` (its sharded tables tied on the key already)
    computes each of its rows from rows of one shard, so that its GROUP BY, HAVING,
    aggregates and DISTINCT give on each shard the rows one database gives for that shard's
    keys: its ``GROUP BY`` names the shard key columns of every group it reads directly
    (a group then holds rows of one key value, which the group's hash, range or list
    strategy places on one shard), and its ``DISTINCT`` (``DISTINCT ON``) keeps the key
    among the columns (expressions) it compares.  Not for a group of ``local``'s
    complement (a custom strategy), a key on the optional side of an outer join (its
    NULLs group rows of every shard) or a key column declared with a collation (a
    nondeterministic one groups keys of several shards); LIMIT, OFFSET and window
    functions are refused by the caller all the same."""
    if not local or not instances or not isinstance(sel, selectable.Select) \
            or any(i.group not in local for i in instances):
        return False
    optional = _optional_sides(froms)

    def covers(exprs: Iterable[Any]) -> bool:
        """Whether ``exprs`` name, as plain columns, every key column of an instance of
        each group read."""
        named: dict[int, set[int]] = {}
        for e in exprs:
            while True:
                if type(e) is elements.ClauseList and len(e.clauses) == 1:
                    e = e.clauses[0]
                elif isinstance(e, elements.Label):
                    e = e.element
                else:
                    break
            for c in e.clauses if isinstance(e, elements.Tuple) else (e,):
                c = _plain(c)
                t = getattr(c, "table", None)
                if not isinstance(c, elements.ColumnClause) or t is None:
                    continue
                collation = getattr(getattr(c, "type", None), "collation", None)
                if collation is not None and collation not in ("C", "POSIX"):
                    continue
                t = _plain(t)
                for inst in instances:
                    if inst.frm is t and id(t) not in optional:
                        pos = _key_position(inst, c)
                        if pos is not None and c.key not in inst.optional and c.name not in inst.optional:
                            named.setdefault(id(inst), set()).add(pos)
        return all(any(len(named.get(id(i), ())) == i.n_keys for i in instances if i.group == g)
                   for g in {i.group for i in instances})

    grouped = bool(sel._group_by_clauses)
    if grouped and not covers(sel._group_by_clauses):
        return False
    if not grouped and (sel._having_criteria or any(
            _is_aggregate_or_window(e) for c in sel._raw_columns for e in _walk([c]))):
        return False  # one row (group) of each shard's rows
    if sel._distinct:
        on = distinct_on(sel)
        if not covers(on or sel.selected_columns):
            return False
    return grouped or bool(sel._distinct)


def _optional_sides(froms: list[Any]) -> set[int]:
    """ids of the FROM elements on the optional side of an outer join among ``froms``."""
    optional: set[int] = set()
    for f in froms:
        for j in sql_util.surface_selectables(f):
            if isinstance(j, selectable.Join) and (j.isouter or j.full):
                for side in (j.left, j.right) if j.full else (j.right,):
                    optional.update(id(_plain(x)) for x in sql_util.surface_selectables(side))
    return optional


def shard_local_derived(statement: Any, resolve: Resolver, local: frozenset[str]) -> list[str]:
    """What explain() says of the derived tables in ``statement``'s FROM that
    :func:`_shard_local` lets each shard compute whole (its own FROM, not nested deeper)."""
    out: list[str] = []
    if not isinstance(statement, selectable.Select) or not local:
        return out
    for f in _froms(_without_loader_options(statement)):
        for frm in sql_util.surface_selectables(f):
            frm = _plain(frm)
            if not isinstance(frm, selectable.AliasedReturnsRows):
                continue
            sel = _derived_select(frm)
            if not isinstance(sel, selectable.Select):
                continue
            froms = _froms(sel)
            instances, problem = _instances(froms, resolve, [], local=local)
            if problem is None and _shard_local(sel, froms, instances, local):
                label = _name(frm)
                out.append("a subquery" if label == "a subquery" else f"the derived table {label!r}")
    return out


_AGGREGATES = frozenset({
    "count", "sum", "min", "max", "avg", "array_agg", "string_agg", "bool_and", "bool_or", "every",
    "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg", "stddev", "stddev_pop",
    "stddev_samp", "variance", "var_pop", "var_samp", "percentile_cont", "percentile_disc", "mode",
    "bit_and", "bit_or", "bit_xor", "xmlagg", "range_agg", "range_intersect_agg", "any_value",
    "aggregate_strings", "corr", "covar_pop", "covar_samp", "regr_avgx", "regr_avgy",
    "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy",
    "json_agg_strict", "jsonb_agg_strict", "json_object_agg_strict", "jsonb_object_agg_strict",
    "json_object_agg_unique", "jsonb_object_agg_unique", "json_object_agg_unique_strict",
    "jsonb_object_agg_unique_strict", "json_arrayagg", "json_objectagg", "rank", "dense_rank",
    "percent_rank", "cume_dist", "grouping",
})


def _is_aggregate_or_window(e: Any) -> bool:
    return isinstance(e, elements.Over) or (
        isinstance(e, functions.FunctionElement) and getattr(e, "name", "").lower() in _AGGREGATES)


def _walk(clauses: Iterable[Any]) -> Iterable[Any]:
    """Every element under ``clauses``, not descending into nested SELECTs (yielded, not entered)."""
    stack = list(clauses)
    while stack:
        e = stack.pop()
        yield e
        if isinstance(e, (selectable.Select, selectable.CompoundSelect)):
            continue
        if isinstance(e, selectable.FromClause) and not isinstance(
                e, (selectable.Join, functions.FunctionElement)):
            continue  # a table's columns hold nothing nested (a function call's arguments do)
        stack.extend(e.get_children())


def _conditions(clauses: Iterable[Any]) -> Iterable[Any]:
    """The conditions ``clauses`` hold of, descending only through AND, OR and parentheses."""
    stack = list(clauses)
    while stack:
        e = stack.pop()
        if isinstance(e, elements.Grouping):
            stack.append(e.element)
        elif isinstance(e, elements.BooleanClauseList) and e.operator in (operators.and_, operators.or_):
            stack.extend(e.clauses)
        else:
            yield e


def _equalities(clauses: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
    """``a = b`` column pairs that hold for every row: in AND-ed conditions only."""
    stack = list(clauses)
    while stack:
        e = stack.pop()
        if isinstance(e, elements.Grouping):
            stack.append(e.element)
        elif isinstance(e, elements.BooleanClauseList) and e.operator is operators.and_:
            stack.extend(e.clauses)
        elif isinstance(e, elements.BinaryExpression) and e.operator is operators.eq:
            yield e.left, e.right


def _join_conditions(froms: list[Any]) -> list[Any]:
    out = []
    for f in froms:
        for frm in sql_util.surface_selectables(f):
            if isinstance(frm, selectable.Join) and frm.onclause is not None:
                # Only inner joins tie both sides for every row; an outer join's NULL side
                # has no row to place, so its condition ties it all the same.
                out.append(frm.onclause)
    return out


def _check(stmt: Any, outer: list[_Instance], resolve: Resolver,
           semi: _Instance | None = None, one_shard: frozenset[int] = frozenset(),
           local: frozenset[str] = frozenset()) -> str | None:
    """``semi``: ``stmt`` is the subquery of ``key IN (SELECT ...)``, ``key`` the shard key of
    that outer instance: the subquery is tied to it if it selects its group's key (rows
    with equal keys are on one shard, so each shard answers the IN for its own rows)."""
    # Once: an ORM statement builds its FROM list anew each time it is asked (an
    # eager load's anonymous alias would differ between two calls).
    froms = _froms(stmt)
    own, problem = _instances(froms, resolve, outer, one_shard, local)
    if problem:
        return problem
    # A table of the enclosing query named in a subquery is correlated (SQLAlchemy
    # leaves it out of the subquery's FROM when compiling): the outer occurrence.
    # Unless that would leave it no FROM at all, in which case it correlates nothing.
    outer_froms = {id(o.frm) for o in outer}
    all_froms = [_plain(x) for f in froms for x in sql_util.surface_selectables(f)
                 if not isinstance(x, selectable.Join)]
    if outer and any(id(x) not in outer_froms for x in all_froms):
        own = [i for i in own if id(i.frm) not in outer_froms]
    everyone = own + outer

    def key_of(col: Any) -> tuple[_Instance, int] | None:
        t = getattr(col, "table", None)
        if t is None:
            return None
        t = _plain(t)
        for inst in everyone:
            if inst.frm is t:
                pos = _key_position(inst, col)
                return None if pos is None else (inst, pos)
        return None

    # Union-find over instances; two are tied when every key position is equated.
    parent = {id(i): id(i) for i in everyone}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    links: dict[tuple[int, int], set[int]] = {}
    where = list(getattr(stmt, "_where_criteria", ()))
    joins = _join_conditions(froms)
    for left, right in _equalities([*joins, *where]):
        a, b = key_of(left), key_of(right)
        if a is None or b is None or a[0] is b[0] or a[0].group != b[0].group or a[1] != b[1]:
            continue
        pair = (min(id(a[0]), id(b[0])), max(id(a[0]), id(b[0])))
        links.setdefault(pair, set()).add(a[1])
        if len(links[pair]) == a[0].n_keys:
            parent[find(pair[0])] = find(pair[1])

    if semi is not None and len(stmt._raw_columns) == 1 and all(
            getattr(stmt, attr, None) is None for attr in ("_limit_clause", "_offset_clause", "_fetch_clause")):
        # key IN (SELECT other.key ...): no LIMIT, OFFSET or FETCH (which each shard would
        # apply to its own rows); GROUP BY, HAVING and DISTINCT keep each key's rows whole,
        # and so does DISTINCT ON when the key is one of its expressions (not otherwise: each
        # shard would keep the first of its own rows for each value).
        k = key_of(_plain(stmt._raw_columns[0]))
        if k is not None and k[0] in own and k[0].group == semi.group and k[0].n_keys == 1:
            on = distinct_on(stmt)
            if on and not any(key_of(_plain(e)) == k for e in on):
                return (f"a subquery over {k[0].label} in key IN (SELECT ...) has DISTINCT ON "
                        "other expressions than the shard key, which each shard would apply "
                        "to its own rows only")
            parent[find(id(k[0]))] = find(id(semi))
    if outer:
        roots = {find(id(o)) for o in outer}
        for inst in own:
            if find(id(inst)) not in roots:
                return (f"a subquery over {inst.label} is not correlated with the outer query on the "
                        "shard key, so each shard would compute it over its own rows only")
    else:
        by_group: dict[str, set[int]] = {}
        for inst in own:
            by_group.setdefault(inst.group, set()).add(find(id(inst)))
        for group, roots in by_group.items():
            if len(roots) > 1:
                names = ", ".join(sorted(i.label for i in own if i.group == group))
                return (f"{names} (group {group}) are not joined on the shard key, so rows that "
                        "match may live on different shards")

    # Subqueries in the select list, WHERE, GROUP BY, HAVING, ORDER BY, SET values: each must be
    # correlated on the key with this statement's tables (or hold no sharded table).
    clauses = [*where, *getattr(stmt, "_having_criteria", ()), *getattr(stmt, "_order_by_clauses", ()),
               *getattr(stmt, "_group_by_clauses", ()), *getattr(stmt, "_raw_columns", ()), *joins]
    values = getattr(stmt, "_values", None)
    if values:
        clauses.extend(v for v in values.values() if isinstance(v, elements.ClauseElement))
    # key IN (SELECT ...) of this statement's instances, by the subquery's SELECT: only as a
    # condition under AND/OR, where a NULL is as good as false. Under NOT, IS FALSE, or as a
    # value, a NULL the subquery yields on another shard would decide it (as in NOT IN).
    semis: dict[int, _Instance] = {}
    for e in _conditions([*where, *getattr(stmt, "_having_criteria", ()), *joins]):
        if isinstance(e, elements.BinaryExpression) and e.operator is operators.in_op \
                and isinstance(e.right, selectable.ScalarSelect):
            k = key_of(e.left)
            if k is not None and k[0].n_keys == 1:
                semis[id(e.right.element)] = k[0]
    for e in _walk(clauses):
        nested = compound_selects(e) if isinstance(e, selectable.CompoundSelect) else \
            [e] if isinstance(e, selectable.Select) else []
        for sel in nested:
            problem = _check(sel, everyone, resolve, semis.get(id(sel)), local=local)
            if problem:
                return problem
    return None


def distinct_on(stmt: Any) -> tuple[Any, ...]:
    """The expressions of a SELECT's DISTINCT ON: ``distinct(*exprs)``, or SQLAlchemy 2.1's
    ``ext(postgresql.distinct_on(...))``."""
    on = tuple(getattr(stmt, "_distinct_on", None) or ())
    for attr in getattr(stmt, "_position_map", {}).values():
        on += tuple(getattr(getattr(stmt, attr, None), "_distinct_on", None) or ())
    return on


def reference_rows_problem(statement: Any, resolve: Resolver) -> str | None:
    """Why running ``statement`` on every shard would repeat rows of reference tables, or None.

    Reference tables are on every shard: a statement whose rows come from them
    (its FROM holds no sharded table, or a sharded table only on the optional
    side of an outer join) returns those rows once per shard, whatever the
    sharded tables in its subqueries or joins say.
    """
    if not isinstance(statement, selectable.Select):
        return None
    froms = statement.get_final_froms()
    if not froms:
        return None  # SELECT EXISTS (...) and the like: the merge decides

    def sharded(f: Any) -> bool:
        # A derived table the colocation check finds a problem with is over sharded rows too.
        instances, problem = _instances([f], resolve, [])
        return bool(instances) or problem is not None

    if not any(sharded(f) for f in froms):
        return ("its rows come from reference tables only (sharded tables appear only in "
                "subqueries), so every shard would return them")
    for f in froms:
        for frm in sql_util.surface_selectables(f):
            if isinstance(frm, selectable.Join) and (frm.isouter or frm.full):
                if frm.full or not sharded(frm.left):
                    return ("an outer join keeps rows of reference tables that match no sharded "
                            "row, and every shard would return them")
    return None
