"""The statement generator the random fuzzers of writes share (test_dml_fuzz,
test_dml_fuzz_composite_keys): values, WHERE clauses, execution options, new and existing
rows, and the UPDATE / DELETE / INSERT statements of a group's parent table.  A module's
``Gen`` subclasses ``GenBase`` with its ``leaf()`` predicates, its ``_statement()`` mix, its
``_setvalues()``, ``_preload()`` and ``_new_row()``, and ``_stmt()``, which makes its ``Stmt``.

A group (``g``) has ``name``, ``parent`` and ``child`` (models), ``keys``, ``extra`` and
``odd`` (values); the same seed must give the same statements, so every draw from the
generators happens in one fixed order."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, not_, or_, select, update


class GenBase:
    same_shape_share = 0.3      # how often a statement repeats the last one's shape
    extra_below = 0.9           # key(): a kept key below 0.75, an extra one below this, else an odd one
    max_new_rows = 5            # _new_rows(): 1 to this many rows
    executemany_orm_returning = True   # _insert(): RETURNING of an ORM executemany INSERT

    def __init__(self, env: Any, rng: random.Random) -> None:
        self.env = env
        self.rng = rng                          # the statement's shape
        self.vrng = random.Random(rng.random())  # the values in it
        self.drng = random.Random(rng.random())  # whether to repeat a shape
        self.last: Any = None

    # -- hooks --------------------------------------------------------------
    def key_columns(self, g: Any) -> tuple[str, ...]:
        return ("k",)

    def leaf(self, g: Any, T: Any, params: dict[str, Any]) -> tuple[Any, str]:
        raise NotImplementedError

    def _statement(self) -> Any:
        raise NotImplementedError

    def _stmt(self, what: str, g: Any, stmt: Any, params: Any = None, orm: bool = False, returning: bool = False,
              executemany: bool = False, preload: list[int] | None = None, all_shards: bool = False) -> Any:
        raise NotImplementedError

    def _new_row(self, g: Any, rid: int) -> dict[str, Any]:
        raise NotImplementedError

    def _setvalues(self, g: Any, T: Any) -> tuple[dict[str, Any], str]:
        raise NotImplementedError

    def _preload(self, g: Any) -> list[int]:
        raise NotImplementedError

    # -- values ---------------------------------------------------------
    def key(self, g: Any) -> Any:
        r = self.vrng.random()
        if r < 0.75:
            return self.vrng.choice(g.keys)
        if r < self.extra_below:
            return self.vrng.choice(g.extra)
        return self.vrng.choice(g.odd)

    def plain_key(self, g: Any) -> Any:
        return self.vrng.choice(g.keys + g.extra)

    def bind(self, params: dict[str, Any], value: Any, **kw: Any) -> Any:
        name = f"p{len(params)}"
        params[name] = value
        return bindparam(name, **kw)

    # -- WHERE -----------------------------------------------------------
    def where(self, g: Any, T: Any, depth: int, params: dict[str, Any]) -> tuple[Any, str]:
        rng = self.rng
        if depth > 0 and rng.random() < 0.35:
            op = rng.choice(["and", "or", "not"])
            if op == "not":
                w, d = self.where(g, T, depth - 1, params)
                return not_(w), f"NOT({d})"
            parts = [self.where(g, T, depth - 1, params) for _ in range(rng.randint(2, 3))]
            fn = and_ if op == "and" else or_
            return fn(*(p[0] for p in parts)), f" {op.upper()} ".join(f"({p[1]})" for p in parts)
        return self.leaf(g, T, params)

    # -- statements ------------------------------------------------------
    def statement(self) -> Any:
        """A new statement, or now and then the last one's shape again with other values
        (what the router keeps per statement shape must not hold values)."""
        if self.last is not None and self.drng.random() < self.same_shape_share:
            after = self.rng.getstate()
            self.rng.setstate(self.last)
            st = self._statement()
            self.rng.setstate(after)
            st.what = "(same shape) " + st.what
            return st
        self.last = self.rng.getstate()
        return self._statement()

    def _options(self, stmt: Any, orm: bool) -> tuple[Any, str, bool]:
        """Now and then ``shardkit_all_shards``, and an ORM statement's
        ``synchronize_session``: (the statement, its description, whether all shards)."""
        what = ""
        opts: dict[str, Any] = {}
        all_shards = self.rng.random() < 0.3
        if all_shards:
            opts["shardkit_all_shards"] = True
            what += " all_shards"
        if orm:
            sync = self.rng.choice(["auto", False, "fetch", "evaluate"])
            if sync != "auto":
                opts["synchronize_session"] = sync
            what += f" sync={sync}"
        return (stmt.execution_options(**opts) if opts else stmt), what, all_shards

    def _set_other(self, T: Any, r: float) -> tuple[dict[str, Any], str]:
        """A SET of other columns than the key (``r``: the draw that chose it)."""
        if r < 0.6:
            return {"v": T.v + 1}, "SET v=v+1"
        n = self.rng.randrange(50)
        return {"v": n, "t": "u"}, f"SET v={n}, t='u'"

    def _key_attrs(self, g: Any, T: Any) -> list[Any]:
        return [getattr(T, c) for c in self.key_columns(g)]

    def _update(self, g: Any) -> Any:
        orm = self.rng.random() < 0.5
        T = g.parent if orm else g.parent.__table__.c
        params: dict[str, Any] = {}
        w, d = self.where(g, T, 2, params)
        values, sd = self._setvalues(g, T)
        stmt = update(g.parent if orm else g.parent.__table__).where(w).values(**values)
        ret = self.rng.random() < 0.4
        if ret:
            stmt = stmt.returning(T.rid, *self._key_attrs(g, T), T.v)
        stmt, od, al = self._options(stmt, orm)
        return self._stmt(f"{'ORM' if orm else 'Core'} UPDATE {g.name} {sd} WHERE {d}{od}{' RETURNING' if ret else ''}",
                          g, stmt, params or None, orm, ret, preload=self._preload(g) if orm else [], all_shards=al)

    def _delete(self, g: Any) -> Any:
        orm = self.rng.random() < 0.5
        T = g.parent if orm else g.parent.__table__.c
        params: dict[str, Any] = {}
        w, d = self.where(g, T, 2, params)
        stmt = delete(g.parent if orm else g.parent.__table__).where(w)
        ret = self.rng.random() < 0.4
        if ret:
            stmt = stmt.returning(T.rid, *self._key_attrs(g, T), T.v)
        stmt, od, al = self._options(stmt, orm)
        return self._stmt(f"{'ORM' if orm else 'Core'} DELETE {g.name} WHERE {d}{od}{' RETURNING' if ret else ''}",
                          g, stmt, params or None, orm, ret, preload=self._preload(g) if orm else [], all_shards=al)

    # -- rows to insert ----------------------------------------------------
    def _existing_row(self, g: Any) -> dict[str, Any] | None:
        """The rid and key of a row of ``g`` with a key (on the one database), or None."""
        t = g.parent.__table__
        kc = self.key_columns(g)
        with self.env.oracle.connect() as c:
            rows = c.execute(select(t.c.rid, *(t.c[k] for k in kc)).where(t.c[kc[0]].is_not(None))
                             .order_by(t.c.rid)).all()
        if not rows:
            return None
        return dict(self.vrng.choice(rows)._mapping)

    def _new_rows(self, g: Any, existing: bool) -> list[dict[str, Any]]:
        """1 to ``max_new_rows`` rows, new (``_new_row()``) or, if ``existing``, now and then
        an existing row's rid and key."""
        rows: list[dict[str, Any]] = []
        used: set[int] = set()
        for _ in range(self.rng.randint(1, self.max_new_rows)):
            if existing and self.rng.random() < 0.5:
                row = self._existing_row(g)
                if row is not None and row["rid"] not in used:
                    used.add(row["rid"])
                    rows.append({**row, "v": self.vrng.randrange(90, 99), "t": "ins"})
                    continue
            self.env.next_rid[0] += 1
            rid = self.env.next_rid[0]
            used.add(rid)
            rows.append(self._new_row(g, rid))
        return rows

    def _insert_rows(self, g: Any, existing: bool) -> list[dict[str, Any]]:
        return self._new_rows(g, existing)

    def _insert(self, g: Any) -> Any:
        rows = self._insert_rows(g, existing=False)
        orm = self.rng.random() < 0.5
        table = g.parent.__table__
        T = g.parent if orm else table.c
        shape = self.rng.choice(["values", "many", "one"])
        ret = self.rng.random() < 0.4 and (self.executemany_orm_returning or not (orm and shape == "many"))
        target = g.parent if orm else table
        if shape == "one":
            rows = rows[:1]
            stmt, params = insert(target).values(**rows[0]), None
        elif shape == "values":
            stmt, params = insert(target).values(rows), None
        else:
            stmt, params = insert(target), rows
        if ret:
            stmt = stmt.returning(T.rid, *self._key_attrs(g, T), T.v,
                                  sort_by_parameter_order=shape == "many" and self.rng.random() < 0.5)
        stmt, od, al = self._options(stmt, False)
        return self._stmt(f"{'ORM' if orm else 'Core'} INSERT {g.name} {shape} {rows!r}{od}{' RETURNING' if ret else ''}",
                          g, stmt, params, orm, ret, executemany=shape == "many", all_shards=al)

    def _on_conflict(self, ins: Any, otherwise: Callable[[], tuple[Any, str]]) -> tuple[Any, str]:
        """An upsert's ``ON CONFLICT (rid)``: DO NOTHING, DO UPDATE of ``v``, or ``otherwise()``."""
        r = self.rng.random()
        if r < 0.4:
            return ins.on_conflict_do_nothing(index_elements=["rid"]), "DO NOTHING"
        if r < 0.8:
            return (ins.on_conflict_do_update(index_elements=["rid"], set_={"v": ins.excluded.v + 100, "t": "up"}),
                    "DO UPDATE v")
        return otherwise()
