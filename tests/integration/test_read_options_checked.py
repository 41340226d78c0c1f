"""A read's replica options (shardkit_role, shardkit_consistency, shardkit_max_lag_*) are
checked on every statement that gives them, whether or not its shards have replicas:
a typo must not pass in development (no replicas) and fail once replicas are added.
On the shared local cluster, its own tables."""

from __future__ import annotations

import copy

import pytest
from own_tables import cluster_with_tables
from sqlalchemy import BigInteger, String, select, text
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "read_opts_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    v: Mapped[str] = mapped_column(String(20))


CONFIG = {"groups": {"notes": {"tables": {Note.__tablename__: "id"}}}}


@pytest.fixture(scope="module", params=["with replicas", "without replicas"])
def maker(request, shardkit_dev_cluster):
    dev = copy.deepcopy(shardkit_dev_cluster.config_dict())
    if request.param == "without replicas":
        for s in dev["shards"]:
            s["replicas"] = []
    with cluster_with_tables(_Dev(dev), CONFIG, Base.metadata) as c:
        assert c.has_replicas == (request.param == "with replicas")
        m = sessionmaker(class_=shardkit.ShardedSession, cluster=c)
        with m() as s:
            s.add_all([Note(id=k, v=f"v{k}") for k in range(6)])
            s.commit()
        yield m


class _Dev:
    def __init__(self, config):
        self._config = config

    def config_dict(self):
        return self._config


BAD = [
    ({"shardkit_role": "leader"}, "shardkit_role='leader' is not valid"),
    ({"shardkit_consistency": "bogus"}, "shardkit_consistency='bogus' is not valid"),
    ({"shardkit_max_lag_seconds": -5}, "shardkit_max_lag_seconds"),
    ({"shardkit_max_lag_bytes": "lots"}, "shardkit_max_lag_bytes"),
]
STATEMENTS = {
    "by key": lambda s, eo: s.execute(select(Note).where(Note.id == 3), execution_options=eo).all(),
    "by key, on the statement": lambda s, eo: s.execute(
        select(Note).where(Note.id == 3).execution_options(**eo)).all(),
    "across shards": lambda s, eo: s.execute(select(Note).order_by(Note.id), execution_options=eo).all(),
    "get": lambda s, eo: s.get(Note, 3, execution_options=eo),
    "text on a named shard": lambda s, eo: s.execute(
        text("SELECT 1"), execution_options={**eo, "shardkit_shard": s.cluster.shard_names[0]}).all(),
}


@pytest.mark.parametrize("what", sorted(STATEMENTS))
@pytest.mark.parametrize("options,says", BAD, ids=[next(iter(o)) for o, _ in BAD])
def test_a_bad_read_option_is_refused_whatever_the_replicas(maker, what, options, says):
    with maker() as s:
        with pytest.raises(ArgumentError, match=says):
            STATEMENTS[what](s, options)


@pytest.mark.parametrize("what", sorted(STATEMENTS))
def test_good_read_options_run_whatever_the_replicas(maker, what):
    good = {"shardkit_role": "primary", "shardkit_consistency": "strong",
            "shardkit_max_lag_seconds": 0.5, "shardkit_max_lag_bytes": 0}
    with maker() as s:
        assert STATEMENTS[what](s, good) is not None
