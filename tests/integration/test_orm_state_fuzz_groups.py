"""A second stateful fuzzer of the ORM unit of work (after test_orm_state_fuzz.py,
whose approach it copies): the same random ORM operations on a plain ``Session`` over ONE
unsharded database (``osf9_oracle``) and on a ``ShardedSession`` over a 3-shard cluster,
checked after every step, over what that module's model does not have:

- a hash group keyed by TWO columns ``(org, code)``: ``Project``, its ``Task`` collection
  (joined-table inheritance: ``Bug(Task)``), its ``Member`` collection, and a many-to-many
  ``Task.members`` through ``osf9_task_members``, a ``secondary`` table of the same group;
- a list group (``region``, with a default shard): ``Shop`` and its ``Sale`` collection,
  joined on ``shop_id`` alone and declared ``info={"shardkit_colocated": True}``;
- a range group (with a gap): ``Event`` and ``Alert(Event)``, single-table inheritance;
- operations: add / change / delete / orphan, link / unlink members, flush, commit,
  rollback, savepoints, expire / refresh, ``merge()`` of detached graphs, ``expunge``,
  ``make_transient`` (re-added: a duplicate key on both sides) and
  ``make_transient_to_detached`` (re-added: an UPDATE), ``get`` with ``with_for_update`` and
  ``populate_existing``, polymorphic selects and ``with_polymorphic``; any of them inside
  ``shardkit.scope(key=...)`` on the sharded side (the ``set_scope`` step).

A documented refusal (a shardkit error on the sharded side) is counted by reason; both
sides are then rolled back.  ``SHARDKIT_ORM_FUZZ2_RUNS`` / ``_STEPS`` / ``_SEED`` (default
5 x 60, seed 11; ``SHARDKIT_FUZZ_SCALE`` multiplies the runs: tests/fuzz_size.py).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest
from fuzz_size import fuzz_size
from orm_fuzz_driver import FuzzBase, Side, fuzz_env, rule_registry, run_fuzz, spread_keys, st, table_rows
from sqlalchemy import Column, ForeignKeyConstraint, Integer, String, Table, inspect, select, text, tuple_
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    make_transient,
    make_transient_to_detached,
    mapped_column,
    relationship,
    selectinload,
    with_polymorphic,
)

import shardkit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:New instance .* conflicts with persistent instance"),
]

RUNS = fuzz_size("SHARDKIT_ORM_FUZZ2_RUNS", 5)
STEPS = int(os.environ.get("SHARDKIT_ORM_FUZZ2_STEPS", "60"))
SEED = int(os.environ.get("SHARDKIT_ORM_FUZZ2_SEED", "11"))

RULES, rule = rule_registry()


class B9(DeclarativeBase):
    pass


task_members = Table(
    "osf9_task_members", B9.metadata,
    Column("org", Integer, primary_key=True), Column("code", Integer, primary_key=True),
    Column("n", Integer, primary_key=True), Column("mid", Integer, primary_key=True),
    ForeignKeyConstraint(["org", "code", "n"], ["osf9_tasks.org", "osf9_tasks.code", "osf9_tasks.n"],
                         ondelete="CASCADE"),
    ForeignKeyConstraint(["org", "code", "mid"], ["osf9_members.org", "osf9_members.code", "osf9_members.mid"],
                         ondelete="CASCADE"),
)


class Project(B9):
    __tablename__ = "osf9_projects"
    org: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    code: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(20))
    tasks: Mapped[list[Task]] = relationship(back_populates="project", cascade="all, delete-orphan",
                                             order_by="Task.n")
    members: Mapped[list[Member]] = relationship(back_populates="project", cascade="all, delete-orphan",
                                                 order_by="Member.mid")


class Task(B9):
    __tablename__ = "osf9_tasks"
    org: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(10))
    title: Mapped[str | None] = mapped_column(String(20))
    project: Mapped[Project] = relationship(back_populates="tasks")
    members: Mapped[list[Member]] = relationship(secondary=task_members, back_populates="tasks",
                                                 order_by="Member.mid")
    __table_args__ = (ForeignKeyConstraint(["org", "code"], ["osf9_projects.org", "osf9_projects.code"]),)
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "task"}


class Bug(Task):
    __tablename__ = "osf9_bugs"
    org: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True)
    severity: Mapped[int] = mapped_column(Integer, default=1)
    __table_args__ = (ForeignKeyConstraint(["org", "code", "n"],
                                           ["osf9_tasks.org", "osf9_tasks.code", "osf9_tasks.n"],
                                           ondelete="CASCADE"),)
    __mapper_args__ = {"polymorphic_identity": "bug"}


class Member(B9):
    __tablename__ = "osf9_members"
    org: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[int] = mapped_column(Integer, primary_key=True)
    mid: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))
    project: Mapped[Project] = relationship(back_populates="members")
    tasks: Mapped[list[Task]] = relationship(secondary=task_members, back_populates="members",
                                             order_by="Task.n")
    __table_args__ = (ForeignKeyConstraint(["org", "code"], ["osf9_projects.org", "osf9_projects.code"]),)


class Shop(B9):
    __tablename__ = "osf9_shops"
    region: Mapped[str] = mapped_column(String(4), primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))
    sales: Mapped[list[Sale]] = relationship(
        primaryjoin="foreign(Sale.shop_id) == Shop.id", back_populates="shop",
        cascade="all, delete-orphan", order_by="Sale.id", info={"shardkit_colocated": True})


class Sale(B9):
    __tablename__ = "osf9_sales"
    region: Mapped[str] = mapped_column(String(4), primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    shop_id: Mapped[int] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(Integer, default=0)
    shop: Mapped[Shop] = relationship(primaryjoin="foreign(Sale.shop_id) == Shop.id",
                                      back_populates="sales", info={"shardkit_colocated": True})


class Event(B9):
    __tablename__ = "osf9_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(10))
    payload: Mapped[str | None] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "event"}


class Alert(Event):
    level: Mapped[int | None] = mapped_column(Integer, default=3)
    __mapper_args__ = {"polymorphic_identity": "alert"}


KEYCOLS = {"osf9_projects": ("org", "code"), "osf9_tasks": ("org", "code"), "osf9_bugs": ("org", "code"),
           "osf9_members": ("org", "code"), "osf9_task_members": ("org", "code"),
           "osf9_shops": ("region",), "osf9_sales": ("region",), "osf9_events": ("id",)}
CONFIG = {
    "groups": {
        "c9": {"strategy": "hash", "tables": {t: ["org", "code"] for t, c in KEYCOLS.items() if len(c) == 2}},
        "l9": {"strategy": "list", "tables": {"osf9_shops": "region", "osf9_sales": "region"},
               "values": {"s0": ["eu"], "s1": ["us"], "s2": ["ap"]}, "default": "s0"},
        "r9": {"strategy": "range", "tables": {"osf9_events": "id"},
               "ranges": [{"to": 100, "shard": "s0"}, {"from": 100, "to": 200, "shard": "s1"},
                          {"from": 300, "shard": "s2"}]},
    },
}
TABLES = [t.name for t in B9.metadata.sorted_tables]
REGIONS = ("eu", "us", "ap", "sa")
EKEYS = (5, 99, 100, 150, 199, 300, 900, 5, 150, 900, 250)   # 250: in the range gap (a ShardKeyError)


def lkey(obj: Any) -> tuple[str, Any]:
    st_ = inspect(obj)
    ident = st_.identity
    d = st_.dict
    if isinstance(obj, Project):
        return ("P", tuple(ident) if ident else (d.get("org"), d.get("code")))
    if isinstance(obj, Task):
        return ("T", ident[2] if ident else d.get("n"))
    if isinstance(obj, Member):
        return ("M", ident[2] if ident else d.get("mid"))
    if isinstance(obj, Shop):
        return ("S", ident[1] if ident else d.get("id"))
    if isinstance(obj, Sale):
        return ("X", ident[1] if ident else d.get("id"))
    return ("E", ident[0] if ident else d.get("id"))


class Fuzz(FuzzBase):
    rules = RULES
    metadata = B9.metadata
    tables = TABLES
    lkey = staticmethod(lkey)
    with_class = True
    op_in_error_stats = True
    log_rollback_failures = False
    # (same(): FuzzBase's, whose tolerance of a deleted object's relationship loaded on one
    # side only was seen here with sale.shop once in ~30 runs and not again with that seed.)

    # ------------------------------------------------------------------ rules

    @rule(3, i=st.integers(0, 8), title=st.sampled_from(["a", "b"]))
    def add_project(self, i: int, title: str) -> None:
        k = self.env["pkeys"][i]

        def op(side: Side) -> None:
            p = Project(org=k[0], code=k[1], title=title)
            side.s.add(p)
            side.reg.setdefault(("P", k), p)
        self.both(f"add_project({k})", op)

    @rule(4, i=st.integers(0, 99), bug=st.booleans(), sev=st.none() | st.integers(1, 4), with_member=st.booleans())
    def add_task(self, i: int, bug: bool, sev: int | None, with_member: bool) -> None:
        k = self.pick("P", i)
        if k is None:
            return
        n = self.new_id()

        def op(side: Side) -> None:
            t = (Bug(n=n, title="t") if sev is None else Bug(n=n, title="t", severity=sev)) if bug else Task(n=n)
            p = side.reg["P", k]
            p.tasks.append(t)
            side.reg["T", n] = t
            if with_member and p.members:   # (a many-to-many row in the same flush)
                t.members.append(p.members[-1])
        self.both(f"add_task({n} {'bug' if bug else 'task'} to {k}{', with a member' if with_member else ''})", op)

    @rule(4, i=st.integers(0, 99))
    def add_member(self, i: int) -> None:
        k = self.pick("P", i)
        if k is None:
            return
        mid = self.new_id()

        def op(side: Side) -> None:
            m = Member(mid=mid, name="m")
            side.reg["P", k].members.append(m)
            side.reg["M", mid] = m
        self.both(f"add_member({mid} to {k})", op)

    @rule(5, i=st.integers(0, 99), j=st.integers(0, 99), from_member=st.booleans())
    def link(self, i: int, j: int, from_member: bool) -> None:
        t = self.pick("T", i)
        if t is None:
            return
        pt = self.plain.reg["T", t]
        proj = inspect(pt).identity[:2] if inspect(pt).identity else (pt.org, pt.code)
        ms = [k for k in self.keys("M") if (lambda m: (inspect(m).identity[:2] if inspect(m).identity
                                                       else (m.org, m.code)))(self.plain.reg["M", k]) == proj]
        if not ms or None in proj:
            return
        m = ms[j % len(ms)]

        def op(side: Side) -> None:
            to, mo = side.reg["T", t], side.reg["M", m]
            if from_member:
                if to not in mo.tasks:
                    mo.tasks.append(to)
            elif mo not in to.members:
                to.members.append(mo)
        self.both(f"link task {t} member {m}", op)

    @rule(2, i=st.integers(0, 99))
    def unlink(self, i: int) -> None:
        t = self.pick("T", i)
        if t is None:
            return

        def op(side: Side) -> None:
            to = side.reg["T", t]
            if to.members:
                to.members.pop(0)
        self.both(f"unlink task {t}", op)

    @rule(2, r=st.sampled_from(REGIONS))
    def add_shop(self, r: str) -> None:
        sid = self.new_id()

        def op(side: Side) -> None:
            s = Shop(region=r, id=sid, name="s")
            side.s.add(s)
            side.reg["S", sid] = s
        self.both(f"add_shop({r}, {sid})", op)

    @rule(3, i=st.integers(0, 99), amount=st.none() | st.integers(1, 9))
    def add_sale(self, i: int, amount: int | None) -> None:
        k = self.pick("S", i)
        if k is None:
            return
        xid = self.new_id()

        def op(side: Side) -> None:
            shop = side.reg["S", k]
            x = Sale(region=shop.region, id=xid) if amount is None else Sale(region=shop.region, id=xid, amount=amount)
            shop.sales.append(x)
            side.reg["X", xid] = x
        self.both(f"add_sale({xid} to shop {k})", op)

    @rule(3, i=st.integers(0, len(EKEYS) - 1), alert=st.booleans())
    def add_event(self, i: int, alert: bool) -> None:
        k = EKEYS[i]

        def op(side: Side) -> None:
            e = Alert(id=k, payload="p") if alert else Event(id=k, payload="p")
            side.s.add(e)
            side.reg.setdefault(("E", k), e)
        self.both(f"add_event({k}, {'alert' if alert else 'event'})", op)

    @rule(4, kind=st.sampled_from("PTMSXE"), i=st.integers(0, 99), v=st.integers(0, 3))
    def set_attr(self, kind: str, i: int, v: int) -> None:
        k = self.pick(kind, i)
        if k is None:
            return
        obj = self.plain.reg[kind, k]
        attr, val = {"P": ("title", f"p{v}"), "T": ("severity", v) if isinstance(obj, Bug) else ("title", f"t{v}"),
                     "M": ("name", f"m{v}"), "S": ("name", f"s{v}"), "X": ("amount", v),
                     "E": ("level", v) if isinstance(obj, Alert) else ("payload", f"e{v}")}[kind]

        def op(side: Side) -> None:
            setattr(side.reg[kind, k], attr, val)
        self.both(f"set {kind}{k}.{attr} = {val!r}", op)

    @rule(2, kind=st.sampled_from("PTMSXE"), i=st.integers(0, 99))
    def delete(self, kind: str, i: int) -> None:
        k = self.pick(kind, i)
        if k is None:
            return

        def op(side: Side) -> None:
            o = side.reg[kind, k]
            if inspect(o).pending:
                side.s.expunge(o)
            elif inspect(o).persistent:
                side.s.delete(o)
        self.both(f"delete {kind}{k}", op)

    @rule(1, i=st.integers(0, 99), which=st.sampled_from("TX"))
    def orphan(self, i: int, which: str) -> None:
        k = self.pick(which, i)
        if k is None:
            return

        def op(side: Side) -> None:
            o = side.reg[which, k]
            if which == "T":
                if o.project is not None:
                    o.project.tasks.remove(o)
            elif o.shop is not None:
                o.shop.sales.remove(o)
        self.both(f"orphan {which}{k}", op)

    @rule(7, what=st.sampled_from(["flush", "commit", "commit", "rollback", "begin_nested", "nested_commit",
                                "nested_rollback", "expire_all", "close"]))
    def session_op(self, what: str) -> None:
        self.run_session_op(what)

    @rule(2, kind=st.sampled_from("PTMSXE"), i=st.integers(0, 99), refresh=st.booleans(), attrs=st.booleans())
    def expire_or_refresh(self, kind: str, i: int, refresh: bool, attrs: bool) -> None:
        k = self.pick(kind, i)
        if k is None:
            return
        names = {"P": ["title", "tasks"], "T": ["title", "members"], "M": ["name", "tasks"],
                 "S": ["name", "sales"], "X": ["amount", "shop"], "E": ["payload"]}[kind] if attrs else None

        def op(side: Side) -> None:
            o = side.reg[kind, k]
            if not inspect(o).persistent:
                return
            (side.s.refresh if refresh else side.s.expire)(o, names)
        self.both(f"{'refresh' if refresh else 'expire'} {kind}{k} {names}", op)

    @rule(2, i=st.integers(0, 8), title=st.sampled_from(["g1", "g2"]), add=st.booleans(), bug=st.booleans())
    def merge_graph(self, i: int, title: str, add: bool, bug: bool) -> None:
        k = self.env["pkeys"][i]
        n = self.new_id()

        def op(side: Side) -> None:
            with side.maker() as other:
                p = other.get(Project, k, options=[selectinload(Project.tasks), selectinload(Project.members)])
                if p is None:
                    p = Project(org=k[0], code=k[1], tasks=[], members=[])
                else:
                    for t in p.tasks:
                        t.members   # noqa: B018 - loaded, to merge the many-to-many too
                    other.expunge_all()
            p.title = title
            if p.tasks:
                p.tasks[0].title = title
            if add:
                p.tasks.append(Bug(n=n, severity=2) if bug else Task(n=n, title="new"))
            side.reg["P", k] = side.s.merge(p)
        self.both(f"merge project {k} ({title}, add {add})", op)

    @rule(1, i=st.integers(0, len(EKEYS) - 1), alert=st.booleans())
    def merge_event(self, i: int, alert: bool) -> None:
        k = EKEYS[i]

        def op(side: Side) -> None:
            e = (Alert if alert else Event)(id=k, payload="merged")
            side.reg["E", k] = side.s.merge(e)
        self.both(f"merge event {k}", op)

    @rule(4, kind=st.sampled_from("PTMSXE"), i=st.integers(0, 99),
          how=st.sampled_from(["expunge", "transient", "to_detached", "to_detached"]))
    def detach(self, kind: str, i: int, how: str) -> None:
        k = self.pick(kind, i)
        if k is None:
            return

        def op(side: Side) -> None:
            o = side.reg[kind, k]
            st_ = inspect(o)
            if not st_.persistent:
                return
            # (make_transient_to_detached needs the key loaded)
            pk_attrs = {st_.mapper.get_property_by_column(c).key for c in st_.mapper.primary_key}
            if how != "expunge" and pk_attrs & st_.unloaded:
                return
            side.s.expunge(o)
            if how == "expunge":
                return
            make_transient(o)
            if how == "to_detached":
                make_transient_to_detached(o)
                if kind == "P":
                    o.title = "det"
            side.s.add(o)
            side.reg[kind, k] = o
        self.both(f"{how} {kind}{k}", op)

    @rule(4, kind=st.sampled_from("PTMSXE"), i=st.integers(0, 99), lock=st.booleans(), populate=st.booleans())
    def get(self, kind: str, i: int, lock: bool, populate: bool) -> None:
        rows = self.env["committed_keys"](kind)
        if not rows:
            return
        pk = rows[i % len(rows)]
        cls = {"P": Project, "T": Task, "M": Member, "S": Shop, "X": Sale, "E": Event}[kind]

        def op(side: Side) -> None:
            o = side.s.get(cls, pk, with_for_update=lock or None, populate_existing=populate)
            if o is not None:
                side.reg[lkey(o)] = o
        self.both(f"get {cls.__name__} {pk} lock={lock} populate={populate}", op)

    @rule(3, q=st.integers(0, 9), i=st.integers(0, 8), populate=st.booleans())
    def query(self, q: int, i: int, populate: bool) -> None:
        org, code = self.env["pkeys"][i]
        wp = with_polymorphic(Task, [Bug])
        stmt = [
            select(Task).order_by(Task.n),
            select(wp).where(wp.org == org, wp.code == code).order_by(wp.n),
            select(Bug).where(Bug.severity > 1).order_by(Bug.n),
            select(Project).options(selectinload(Project.tasks), selectinload(Project.members))
            .order_by(Project.org, Project.code),
            select(Member).where(Member.org == org, Member.code == code).options(selectinload(Member.tasks))
            .order_by(Member.mid),
            select(Event).order_by(Event.id),
            select(Alert).where(Alert.level >= 2).order_by(Alert.id),
            select(Shop).where(Shop.region == REGIONS[i % 4]).options(selectinload(Shop.sales)).order_by(Shop.id),
            select(Sale).order_by(Sale.id),
            select(wp).order_by(wp.n),
        ][q]
        if populate:
            stmt = stmt.execution_options(populate_existing=True)
        plain_stmt = stmt
        if self.scope_key is not None:
            # inside scope(key=...) a key-less select reads the scope key's shard only (README,
            # "Routing rules"): the plain session is asked for the rows of that shard's keys
            cl = self.env["cluster"]
            try:
                with shardkit.scope(key=self.scope_key):
                    shards = cl.explain(stmt).shards
            except shardkit.ShardkitError:
                shards = None   # (refused when it runs, too)
            if shards is not None and len(shards) == 1 and len(cl.explain(stmt).shards) > 1:
                (shard,) = shards
                ent = [Task, wp, Bug, Project, None, Event, Alert, None, Sale, wp][q]
                if ent is Sale:
                    cond = Sale.region.in_([r for r in REGIONS if cl.shard_for(Shop, r) == shard])
                elif ent in (Event, Alert):
                    cond = ent.id.in_([e for e in EKEYS[:-1] if cl.shard_for(Event, e) == shard])
                else:
                    cond = tuple_(ent.org, ent.code).in_(
                        [k for k in self.env["pkeys"] if cl.shard_for(Project, k) == shard])
                plain_stmt = stmt.where(cond)
                self.stats["scoped key-less select compared with that shard's keys"] += 1

        def op(side: Side) -> None:
            got = side.s.scalars(plain_stmt if side is self.plain else stmt).all()
            for o in got:
                side.reg[lkey(o)] = o
            side.last = [lkey(o) for o in got]
        self.both_same_result(f"query {q} {i} populate={populate}", op)

    @rule(2, which=st.sampled_from("NPSE"), i=st.integers(0, 99))
    def set_scope(self, which: str, i: int) -> None:
        self.scope_key = {"N": None, "P": self.env["pkeys"][i % 9], "S": REGIONS[i % 4],
                          "E": EKEYS[i % (len(EKEYS) - 1)]}[which]
        self.log.append(f"scope key = {self.scope_key!r}")


def _committed(oracle: Any, cluster: shardkit.Cluster) -> Any:
    def read() -> tuple[dict, dict]:
        plain = table_rows(oracle, TABLES)
        union: dict[str, list] = {t: [] for t in TABLES}
        for s in cluster.shard_names:
            with cluster.primary(s).connect() as c:
                for t in TABLES:
                    for r in c.execute(text(f"SELECT * FROM {t}")).mappings():
                        kc = KEYCOLS[t]
                        key = tuple(r[x] for x in kc) if len(kc) > 1 else r[kc[0]]
                        owner = cluster.shard_for(t, key)
                        assert owner == s, f"{t} row {dict(r)} on {s}, owned by {owner}"
                        union[t].append(tuple(r.values()))
        return plain, {t: sorted(v) for t, v in union.items()}
    return read


def _three_shards(cluster: shardkit.Cluster) -> None:
    assert list(cluster.shard_names) == ["s0", "s1", "s2"]


@pytest.fixture(scope="module")
def env(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    with fuzz_env(dev, CONFIG, B9.metadata, "osf9_oracle", _committed, _three_shards) as e:
        oracle = e["oracle"]
        # three (org, code) keys on each shard, two orgs
        pkeys = spread_keys(e["cluster"], Project, 3, lambda code: (1 + code % 2, code))
        pks = {"P": "org, code", "T": "org, code, n", "M": "org, code, mid", "S": "region, id", "X": "region, id",
               "E": "id"}
        tabs = {"P": "osf9_projects", "T": "osf9_tasks", "M": "osf9_members", "S": "osf9_shops", "X": "osf9_sales",
                "E": "osf9_events"}

        def committed_keys(kind: str) -> list[Any]:
            with oracle.connect() as c:
                rows = [tuple(r) for r in c.execute(text(f"SELECT {pks[kind]} FROM {tabs[kind]} ORDER BY {pks[kind]}"))]
            return [r[0] if len(r) == 1 else r for r in rows]

        yield {**e, "pkeys": pkeys, "committed_keys": committed_keys}


def test_orm_unit_of_work_matches_one_database_more_models(env):
    stats = run_fuzz(Fuzz, env, RUNS, STEPS, SEED, bool(os.environ.get("SHARDKIT_ORM_FUZZ2_MINIMISE")), "ORM fuzz 2")
    assert stats["steps"] >= RUNS * STEPS // 2   # (at least half the drawn steps ran an operation)


def _truncate(env: Any) -> None:
    for eng in [env["oracle"], *env["primaries"].values()]:
        with eng.begin() as c:
            c.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))


@pytest.mark.parametrize("key", [None, "eu", (1, 2)])
@pytest.mark.parametrize("regions", [("us",), REGIONS])
def test_selectinload_of_a_declared_colocated_relationship_joining_parents_back(env, key, regions):
    """A case from the fuzzer: ``Shop.sales`` joins on ``sales.shop_id = shops.id`` and says
    ``info={"shardkit_colocated": True}`` (README, routing table: it "then loads from the
    object's shard").  Its lazy load did; its ``selectinload()`` was refused with
    ``ScatterRefused`` ("an alias of osf9_shops, osf9_sales ... not joined on the shard
    key"): the join does not use the shops' whole primary key ``(region, id)``, so SQLAlchemy
    joins the parents back in, and the router checked that join as any statement's.  Now
    the ORM's load of a declared-colocated relationship whose only join is that
    relationship's own is not refused (each shard joins its own parents to their rows), in
    and out of ``scope(key=...)``."""
    _truncate(env)
    for maker in (env["Plain"], env["Sharded"]):
        with maker() as s:
            for n, r in enumerate(REGIONS):
                s.add(Shop(region=r, id=n, name=r, sales=[Sale(region=r, id=10 + n), Sale(region=r, id=20 + n)]))
            s.commit()
    got = {}
    for maker in (env["Plain"], env["Sharded"]):
        with maker() as s, (shardkit.scope(key=key) if key is not None and maker is env["Sharded"]
                            else contextlib.nullcontext()):
            shops = s.scalars(select(Shop).where(Shop.region.in_(regions)).options(selectinload(Shop.sales))
                              .order_by(Shop.id)).all()
            got[maker is env["Sharded"]] = [(x.id, [y.id for y in x.sales]) for x in shops]
            assert all("sales" in inspect(x).dict for x in shops)
    assert got[True] == got[False]
    assert len(got[False]) == len(regions)

