"""Composite shard keys and custom strategies through the whole stack: a key that lives in
one place for the router, the SQL functions and verify, whatever its column type, however
the WHERE clause nests its parts, refused with a NULL part by every write path; and groups
that cannot move named as such by the planner.

Each test works in fresh databases on the shared cluster's servers (dropped afterwards)."""

from __future__ import annotations

import itertools
import uuid

import psycopg
import pytest
from sqlalchemy import CHAR, BigInteger, ForeignKey, String, and_, insert, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from shardkit import cli, rebalance
from shardkit.devcluster import to_toml
from shardkit.verify import verify

pytestmark = pytest.mark.integration

BUCKETS = 64
_names = itertools.count()


def legacy_shard(key):
    """The custom strategy of the tests' ``legacy`` group."""
    return "s0" if key < 100 else "s1"


class Base(DeclarativeBase):
    pass


class Acct(Base):
    """A hash group keyed by a char(n) column; its lines follow it."""
    __tablename__ = "csr_accts"
    code: Mapped[str] = mapped_column(CHAR(6), primary_key=True)
    lines: Mapped[list["Line"]] = relationship(back_populates="acct")


class Line(Base):
    __tablename__ = "csr_lines"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(CHAR(6), ForeignKey("csr_accts.code"))
    acct: Mapped[Acct] = relationship(back_populates="lines")


class Seat(Base):
    """A composite hash key with a char(n) part."""
    __tablename__ = "csr_seats"
    venue: Mapped[str] = mapped_column(CHAR(4), primary_key=True)
    num: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String, default="free")


GROUPS = {"groups": {"accts": {"tables": {"csr_accts": "code", "csr_lines": "code"}},
                     "seats": {"tables": {"csr_seats": ["venue", "num"]}}}}


class Db:
    """A fresh database on each of the shared cluster's shard servers (and, if asked, a
    catalog), with ``config`` (groups) over them."""

    def __init__(self, dev, config: dict, catalog: bool = False, metadata=None) -> None:
        self.dev = dev
        self.name = f"csr{next(_names)}_{uuid.uuid4().hex[:8]}"
        self.servers = dev.shards[:2]
        for s in self.servers:
            with psycopg.connect(s.primary.dsn, autocommit=True) as c:
                c.execute(f"CREATE DATABASE {self.name}")
        self.data = {
            "bucket_count": BUCKETS,
            "shards": [{"name": s.name, "primary": s.primary.url.rsplit("/", 1)[0] + "/" + self.name,
                        "replicas": []} for s in self.servers],
            **config,
        }
        if catalog:
            self.data["catalog"] = {"url": dev.create_catalog(self.name + "_cat")}
        self.cluster = shardkit.Cluster.from_config(self.data, metadata=metadata, follow_map=False)
        if metadata is not None:
            for s in self.cluster.shard_names:
                metadata.create_all(self.cluster.primary(s))

    def write_config(self, path) -> str:
        path.write_text(to_toml(self.data), encoding="utf-8")
        return str(path)

    def sql(self, query: str) -> None:
        for s in self.cluster.shard_names:
            with self.cluster.primary(s).begin() as c:
                c.execute(text(query))

    def close(self) -> None:
        self.cluster.dispose()
        for s in self.servers:
            with psycopg.connect(s.primary.dsn, autocommit=True) as c:
                c.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        with psycopg.connect(self.servers[0].primary.dsn, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {self.name}_cat WITH (FORCE)")


@pytest.fixture
def db(shardkit_dev_cluster):
    made: list[Db] = []

    def make(config: dict, **kw) -> Db:
        d = Db(shardkit_dev_cluster, config, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def _padded_differ(cluster, width: int, keys):
    """Keys whose padded form (as char(n) stores and returns it) hashed, before the fix, to
    another shard than the key itself."""
    return [k for k in keys if shardkit.bucket_for(k.ljust(width), BUCKETS) != shardkit.bucket_for(k, BUCKETS)
            and cluster.config.bucket_map[shardkit.bucket_for(k.ljust(width), BUCKETS)]
            != cluster.config.bucket_map[shardkit.bucket_for(k, BUCKETS)]]


@pytest.mark.parametrize("with_sql", [False, True])
def test_char_keys_live_where_the_database_compares_them(db, with_sql):
    """char(n) stores 'zz' as 'zz    ' and returns it so; PostgreSQL takes the two for one
    value, and shardkit's SQL functions (the guard, the mover, verify's SQL check) hash the
    key as text, without the padding.  The router hashed what it was given: a key read back
    from the database (a row's own code, used in the next query) routed to another shard
    and found nothing, and verify's streaming check (no SQL functions, or any composite
    key) reported correctly placed rows as misplaced."""
    d = db(GROUPS, metadata=Base.metadata)
    cluster = d.cluster
    if with_sql:
        for s in cluster.shard_names:
            with cluster.primary(s).begin() as c:
                shardkit.install_sql(c)
    codes = ["ab", "x", "é", "zz", "q1", "k", "日本", "m-1", "Ωz", "a b"]
    moved = _padded_differ(cluster, 6, codes)
    assert moved, "no key whose padding changes its shard: pick other codes"
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    with Session() as s:
        for i, c in enumerate(codes):
            s.add(Acct(code=c, lines=[Line(id=i)]))
        s.add_all(Seat(venue=c[:4], num=-i) for i, c in enumerate(codes))
        s.commit()
    with Session() as s:
        stored = {a.code for a in s.scalars(select(Acct))}
        assert stored == {c.ljust(6) for c in codes}
        for code in stored:
            # The value as the database returns it routes where the row is.
            assert cluster.shard_for(Acct, code) == cluster.shard_for(Acct, code.rstrip(" "))
            got = s.scalars(select(Acct).where(Acct.code == code)).one()
            assert [ln.id for ln in got.lines] == [codes.index(code.rstrip(" "))]
            assert s.get(Acct, code) is got
        for seat in s.scalars(select(Seat)).all():
            assert s.scalars(select(Seat).where(Seat.venue == seat.venue, Seat.num == seat.num)).one() is seat
    rep = verify(cluster)
    assert rep.ok, rep.render()
    methods = {(t.table, t.method) for t in rep.tables}
    assert ("csr_seats", "python") in methods
    assert ("csr_accts", "sql" if with_sql else "python") in methods
    assert sum(t.rows for t in rep.tables if t.table == "csr_seats") == len(codes)

    # A row really on the wrong shard is still found, padded key and all.
    code = moved[0]
    owner = cluster.shard_for(Acct, code)
    wrong = next(s for s in cluster.shard_names if s != owner)
    with cluster.primary(wrong).begin() as c:
        c.execute(text("INSERT INTO csr_accts VALUES (:c)"), {"c": code})
    rep = verify(cluster)
    bad = {(t.table, t.shard): dict(t.misplaced) for t in rep.tables if t.misplaced}
    assert bad == {("csr_accts", wrong): {owner: 1}}, rep.render()
    assert next(t for t in rep.tables if t.table == "csr_accts" and t.shard == wrong).duplicates == 1


class Pair(Base):
    __tablename__ = "csr_pairs"
    a: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    b: Mapped[str] = mapped_column(String, primary_key=True)
    x: Mapped[int] = mapped_column(default=0)


def test_composite_key_parts_in_nested_ands_route_to_the_owner(db):
    """AND is AND however it nests: `.where(a == 1).where(and_(b == 'x', x >= 0))` names the
    whole composite key.  Its parts were only combined within one AND node, so the UPDATE
    was refused as key-less (CrossShardWriteError) and the SELECT read every shard."""
    d = db({"groups": {"pairs": {"tables": {"csr_pairs": ["a", "b"]}}}}, metadata=Base.metadata)
    cluster = d.cluster
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    keys = [(-7, "ü"), (2**40, "日本"), (0, ""), (5, "a b")]
    with Session() as s:
        s.add_all(Pair(a=a, b=b) for a, b in keys)
        s.commit()
    for a, b in keys:
        owner = cluster.shard_for(Pair, (a, b))
        for stmt in (select(Pair).where(Pair.a == a).where(and_(Pair.b == b, Pair.x >= 0)),
                     select(Pair).where(and_(Pair.x >= 0, and_(Pair.a == a, Pair.x < 10)), Pair.b == b),
                     select(Pair).where(Pair.x >= 0, and_(Pair.b == b, and_(Pair.a == a)))):
            assert cluster.explain(stmt).shards == (owner,), stmt
        with Session() as s:
            n = s.execute(update(Pair).where(Pair.a == a).where(and_(Pair.b == b, Pair.x >= 0))
                          .values(x=Pair.x + 1)).rowcount
            assert n == 1
            s.commit()
    with Session() as s:
        assert sorted(s.scalars(select(Pair.x))) == [1] * len(keys)


def test_plan_names_why_a_configured_group_cannot_move(db, tmp_path, capsys):
    """`rebalance plan --split`/`--move-value` of a custom-strategy group, or of a range or
    list group with a composite key, said the catalog had no such group and told the
    operator to add it to the config and run `rebalance init`, which they had done: the
    group is configured, it just cannot move.  The error now says why."""
    d = db({"groups": {
        "users": {"tables": {"csr_users": "id"}},
        "legacy": {"strategy": "custom", "tables": {"csr_legacy": "k"},
                   "function": "test_composite_custom_keys_stack:legacy_shard"},
        "zones": {"strategy": "range", "tables": {"csr_zones": ["a", "b"]},
                  "ranges": [{"to": [5, 0], "shard": "s0"}, {"from": [5, 0], "shard": "s1"}]},
        "areas": {"strategy": "list", "tables": {"csr_areas": ["r", "n"]},
                  "values": {"s0": [["eu", 1]], "s1": [["us", 1]]}},
    }}, catalog=True)
    d.sql("CREATE TABLE csr_users (id bigint PRIMARY KEY); CREATE TABLE csr_legacy (k bigint PRIMARY KEY); "
          "CREATE TABLE csr_zones (a int, b int, PRIMARY KEY (a, b)); "
          "CREATE TABLE csr_areas (r text, n int, PRIMARY KEY (r, n))")
    rebalance.init(d.cluster)
    cfg = d.write_config(tmp_path / "shardkit.toml")

    def plan(*args):
        rc = cli.main(["rebalance", "plan", *args, "--to", "s1", "--config", cfg])
        return rc, capsys.readouterr().err

    for option, spec, why in (("--split", "legacy:50", "custom strategy"),
                              ("--move-value", "legacy:50", "custom strategy"),
                              ("--split", "zones:5", "composite shard key"),
                              ("--move-value", "areas:eu", "composite shard key")):
        rc, err = plan(option, spec)
        group = spec.split(":")[0]
        assert rc == 2, err
        assert f"group {group}" in err and why in err and "cannot move" in err, err
        assert "after adding one to the config" not in err, err
    rc, err = plan("--split", "nope:5")
    assert rc == 2 and "after adding one to the config" in err, err


def custom_pair_shard(key):
    """A custom strategy that places any key, a NULL one or one with a NULL part too."""
    return "s1" if key is None or None in key or key[0] % 2 else "s0"


class CustomPair(Base):
    __tablename__ = "csr_custom_pairs"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    a: Mapped[int | None] = mapped_column(BigInteger)
    b: Mapped[str | None] = mapped_column(String)


def test_a_null_key_part_is_refused_by_every_write_path_of_a_custom_group(db):
    """A custom function may well answer for a key with a NULL part, but a row with one is
    refused by the ORM's flush and by an executemany (`has no value for shard key`), and
    verify reports it as a row with a NULL shard key.  A single-row Core INSERT handed it
    to the function and wrote it: verify then failed on a row shardkit itself placed."""
    d = db({"groups": {"cp": {"strategy": "custom", "tables": {"csr_custom_pairs": ["a", "b"]},
                              "function": custom_pair_shard}}}, metadata=Base.metadata)
    cluster = d.cluster
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster, consistency="strong")
    attempts = (
        lambda s: s.execute(insert(CustomPair).values(id=1, a=3, b=None)),
        lambda s: s.execute(insert(CustomPair), {"id": 2, "a": None, "b": "é"}),
        lambda s: s.execute(insert(CustomPair), [{"id": 3, "a": 4, "b": None}, {"id": 4, "a": 4, "b": "x"}]),
        lambda s: (s.add(CustomPair(id=5, a=None, b="x")), s.flush()),
    )
    for attempt in attempts:
        with Session() as s:
            with pytest.raises(shardkit.ShardKeyError, match="no value for shard key|has no value"):
                attempt(s)
    with Session() as s:
        s.execute(insert(CustomPair).values(id=6, a=-3, b="日本"))
        s.execute(insert(CustomPair), [{"id": 7, "a": 2, "b": ""}, {"id": 8, "a": 9, "b": "x"}])
        s.commit()
    assert {cluster.shard_for(CustomPair, (-3, "日本")), cluster.shard_for(CustomPair, (2, ""))} == {"s0", "s1"}
    rep = verify(cluster)
    assert rep.ok and sum(t.rows for t in rep.tables) == 3, rep.render()


def test_plan_drain_names_what_stays_on_the_drained_shard(db, tmp_path, capsys):
    """`--drain s1` moves hash buckets alone.  The plan said nothing of the range and list
    slices the catalog gives s1, nor of the groups the config places there that cannot move:
    an operator who drained s1 and then removed it lost those rows.  plan and apply now say
    (on stderr) what stays, and how to move what can move."""
    d = db({"groups": {
        "users": {"tables": {"csr_dusers": "id"}},
        "legacy": {"strategy": "custom", "tables": {"csr_dlegacy": "k"},
                   "function": "test_composite_custom_keys_stack:legacy_shard"},
        "zones": {"strategy": "range", "tables": {"csr_dzones": ["a", "b"]},
                  "ranges": [{"to": [5, 0], "shard": "s0"}, {"from": [5, 0], "shard": "s1"}]},
        "events": {"strategy": "range", "tables": {"csr_devents": "n"},
                   "ranges": [{"to": 100, "shard": "s0"}, {"from": 100, "shard": "s1"}]},
        "stores": {"strategy": "list", "tables": {"csr_dstores": "region"},
                   "values": {"s0": ["eu"], "s1": ["us"]}},
    }}, catalog=True)
    d.sql("CREATE TABLE csr_dusers (id bigint PRIMARY KEY); CREATE TABLE csr_dlegacy (k bigint PRIMARY KEY); "
          "CREATE TABLE csr_dzones (a int, b int, PRIMARY KEY (a, b)); "
          "CREATE TABLE csr_devents (n bigint PRIMARY KEY); CREATE TABLE csr_dstores (region text PRIMARY KEY)")
    rebalance.init(d.cluster)
    cfg = d.write_config(tmp_path / "shardkit.toml")

    assert cli.main(["rebalance", "plan", "--drain", "s1", "--config", cfg]) == 0
    out, err = capsys.readouterr()
    assert "Rebalance plan" in out
    note = err.strip()
    assert note.startswith("note: --drain moves hash buckets only; still on s1"), err
    assert "events: [100, +inf)" in note and "stores: 'us'" in note, note
    assert "events: [-inf, 100)" not in note and "'eu'" not in note, note
    assert "group zones" in note and "composite shard key" in note, note
    assert "group legacy" in note and "custom function" in note, note
    assert "group users" not in note and "--split GROUP:KEY" in note, note
    # s0 keeps slices too: draining it names those, not s1's.
    assert cli.main(["rebalance", "plan", "--drain", "s0", "--config", cfg]) == 0
    err = capsys.readouterr().err
    assert "events: [-inf, 100)" in err and "stores: 'eu'" in err and "[100, +inf)" not in err, err


_REGIONS = {1: "s0", 2: "s1"}


def region_shard(key):
    """A custom strategy that looks its key up, as many do: KeyError for an unknown one."""
    return _REGIONS[key]


def test_verify_reports_rows_a_custom_function_raises_for(db):
    """A custom function that raises for a stored key (a KeyError from its lookup table, not
    NoShardForKey) made verify stop with a traceback, hiding every other table's report.
    Those rows are now reported, with the error's class, and the rest is still checked."""
    d = db({"groups": {"users": {"tables": {"csr_vusers": "id"}},
                       "regions": {"strategy": "custom", "tables": {"csr_vregions": "r"},
                                   "function": "test_composite_custom_keys_stack:region_shard"}}})
    d.sql("CREATE TABLE csr_vusers (id bigint PRIMARY KEY); CREATE TABLE csr_vregions (r int PRIMARY KEY)")
    with d.cluster.primary("s0").begin() as c:
        c.execute(text("INSERT INTO csr_vregions VALUES (1), (3), (4)"))
    rep = verify(d.cluster)
    assert not rep.ok
    by_table = {(t.table, t.shard): t for t in rep.tables}
    assert dict(by_table[("csr_vregions", "s0")].misplaced) == {"(function raised KeyError)": 2}
    assert ("csr_vusers", "s1") in by_table
    assert "2 for whose key the group's custom function raised KeyError" in rep.render()
