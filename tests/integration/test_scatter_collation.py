"""Cross-shard reads on databases whose default collation does not order text by code
point (here ICU's root locale): the merge compares text in Python, by code point, so
an ORDER BY, min()/max() or HAVING comparison over such text is refused; with
``.collate("C")`` it is exact, and reads that compare no text are unaffected."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import BigInteger, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit
from shardkit._config import conninfo

pytestmark = pytest.mark.integration

NAMES = ["b", "B", "a", "A", "é", "e", "Z", "z", "a-b", "ab"]


class Base(DeclarativeBase):
    pass


class Word(Base):
    __tablename__ = "coll_words"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))


@pytest.fixture(scope="module")
def icu(shardkit_module_cluster_factory):
    dev = shardkit_module_cluster_factory(shards=2, replicas=1)
    cfg = {**dev.config_dict(), "groups": {"w": {"tables": {"coll_words": "id"}}},
           "replicas": {"consistency": "eventual", "max_lag_seconds": 60}}
    for shard in cfg["shards"]:
        node = dev.shard(shard["name"]).primary
        with node.connect() as c:
            c.execute("CREATE DATABASE coll_icu LOCALE_PROVIDER icu ICU_LOCALE 'und' "
                      "LOCALE 'C' TEMPLATE template0")
        shard["primary"] = shard["primary"].rsplit("/", 1)[0] + "/coll_icu"
        shard["replicas"] = [u.rsplit("/", 1)[0] + "/coll_icu" for u in shard["replicas"]]
    cluster = shardkit.Cluster.from_config(cfg)
    for s in cluster.shard_names:
        Base.metadata.create_all(cluster.primary(s))
    Session = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
    with Session() as s:
        s.add_all(Word(id=i, name=n) for i, n in enumerate(NAMES))
        s.commit()
    assert {cluster.shard_for(Word, i) for i in range(len(NAMES))} == set(cluster.shard_names)
    for s in dev.shards:
        s.replicas[0].wait_caught_up()
    cluster.dev = dev  # type: ignore[attr-defined]
    cluster.cfg = cfg  # type: ignore[attr-defined]
    yield cluster, Session
    cluster.dispose()


@pytest.mark.parametrize("stmt", [
    select(Word.name).order_by(Word.name),
    select(Word.name).order_by(Word.name.desc()).limit(3),
    select(Word).order_by(func.lower(Word.name)),
    select(func.min(Word.name)),
    select(Word.id % 2, func.max(Word.name)).group_by(Word.id % 2),
    select(Word.name, func.count()).group_by(Word.name).having(Word.name > "a"),
], ids=["order", "order-desc-limit", "order-expression", "min", "group-max", "having"])
def test_text_compared_under_a_linguistic_collation_is_refused(icu, stmt):
    cluster, Session = icu
    with Session() as s, pytest.raises(shardkit.ScatterRefused, match="collation") as ei:
        s.execute(stmt).all()
    assert ei.value.construct == "text under the database's collation"
    assert "und" in str(ei.value) and "collate('C')" in str(ei.value)


@pytest.mark.parametrize("stmt", [
    # Functions SQLAlchemy gives no type, which return text here: the statement cannot
    # tell, so the values are checked as the merge reads them.
    select(Word.id).order_by(func.to_char(Word.id, "FM0"), Word.id),
    select(func.max(func.concat_ws("", Word.name))),   # concat_ws is known; to_char is not
    select(func.min(func.to_char(Word.id + 10, "FM00"))),
], ids=["order-untyped", "max-known-text-function", "min-untyped"])
def test_untyped_text_under_a_linguistic_collation_is_refused(icu, stmt):
    cluster, Session = icu
    with Session() as s, pytest.raises(shardkit.ScatterRefused, match="collation"):
        s.execute(stmt).all()


def test_untyped_values_that_are_not_text_are_merged_under_a_linguistic_collation(icu):
    cluster, Session = icu
    with Session() as s:
        got = s.scalars(select(Word.id).order_by(func.abs(Word.id - 4), Word.id)).all()
        assert got == sorted(range(len(NAMES)), key=lambda i: (abs(i - 4), i))
        assert s.scalar(select(func.max(func.abs(Word.id - 4)))) == 5


def test_text_under_collate_c_is_exact(icu):
    cluster, Session = icu
    with Session() as s:
        got = s.scalars(select(Word.name).order_by(Word.name.collate("C"))).all()
        low = s.scalar(select(func.min(Word.name.collate("C"))))
    assert got == sorted(NAMES) and low == min(NAMES)
    # What one such database answers without COLLATE "C": not code-point order, which is
    # why the merge refuses it.
    with psycopg.connect(conninfo(cluster.config.shard("s0").primary)) as c:
        c.execute("CREATE TEMP TABLE t (name text)")
        c.cursor().executemany("INSERT INTO t VALUES (%s)", [(n,) for n in NAMES])
        linguistic = [r[0] for r in c.execute("SELECT name FROM t ORDER BY name")]
    assert linguistic != sorted(NAMES)


def test_reads_that_compare_no_text_are_unaffected(icu):
    cluster, Session = icu
    with Session() as s:
        assert s.scalars(select(Word.id).order_by(Word.id.desc()).limit(3)).all() == [9, 8, 7]
        assert sorted(s.scalars(select(Word.name).distinct()).all()) == sorted(set(NAMES))
        assert s.scalar(select(func.count()).select_from(Word)) == len(NAMES)
        counts = dict(s.execute(select(Word.name, func.count()).group_by(Word.name)).all())
    assert counts == {n: 1 for n in NAMES}


def test_a_shard_whose_primary_is_down_is_asked_on_its_replica(icu):
    """A process that has not asked yet, with s0's primary stopped: the replicas serve the
    read, and the database's collation is learnt from s0's replica (refused, not failed)."""
    cluster, _ = icu
    fresh = shardkit.Cluster.from_config(cluster.cfg)
    primary = cluster.dev.shard("s0").primary
    primary.stop()
    try:
        Session = sessionmaker(class_=shardkit.ShardedSession, cluster=fresh)
        with Session() as s:
            assert sorted(s.scalars(select(Word.name))) == sorted(NAMES)
            with pytest.raises(shardkit.ScatterRefused, match="collation"):
                s.scalars(select(Word.name).order_by(Word.name)).all()
    finally:
        fresh.dispose()
        primary.start()
