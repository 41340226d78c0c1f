"""Cross-shard reads over columns of a ``postgresql.DOMAIN`` type.

A domain's values are its base type's: PostgreSQL orders, groups and aggregates them as
the base type, under the domain's collation if it sets one (else its base type's, through
domains over domains).  The merge's type checks must judge a domain column as that: each
statement over a domain column is exact against one database holding all rows when the
same statement over a plain column of the base type is, and refused, with the same
construct, when that one is (citext, jsonb, text under a named or nondeterministic
collation, text under the database's own non-C collation).

One module-scoped dev cluster (3 shards, no replicas; databases of locale C), on whose
servers this module makes two databases per shard: ``dm_c`` (the dev cluster's C
collation) and ``dm_icu`` (ICU's root locale, where text does not sort by code point),
plus one database of each kind on s0's server holding all rows (the reference).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import REAL, BigInteger, Integer, String, Text, create_engine, func, select, text
from sqlalchemy.dialects.postgresql import CITEXT, DOMAIN, JSONB
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, sessionmaker

import shardkit

pytestmark = pytest.mark.integration

SETUP = ("CREATE EXTENSION IF NOT EXISTS citext",
         "CREATE COLLATION IF NOT EXISTS dm_nocase "
         "(provider = icu, locale = 'und-u-ks-level2', deterministic = false)")

CI = DOMAIN("dm_ci", CITEXT())
JS = DOMAIN("dm_js", JSONB())
WORD = DOMAIN("dm_word", Text())
UND = DOMAIN("dm_und", Text(), collation="und-x-icu")
NOCASE = DOMAIN("dm_nc", Text(), collation="dm_nocase")
CWORD = DOMAIN("dm_cword", Text(), collation="C")
FLOAT4 = DOMAIN("dm_f4", REAL())


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "dm_rows"
    id = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    grp = mapped_column(Integer)
    # (Each inner domain is on a column before the domain over it: created first.)
    ci = mapped_column(CI)
    ci2 = mapped_column(DOMAIN("dm_ci2", CI))
    ci_plain = mapped_column(CITEXT)
    js = mapped_column(JS)
    js2 = mapped_column(DOMAIN("dm_js2", JS))
    js_plain = mapped_column(JSONB)
    word = mapped_column(WORD)
    word2 = mapped_column(DOMAIN("dm_word2", WORD))
    word_plain = mapped_column(Text)
    und = mapped_column(UND)
    und2 = mapped_column(DOMAIN("dm_und2", UND))          # inherits und-x-icu
    und_over = mapped_column(DOMAIN("dm_und_c", UND, collation="C"))   # the outer one counts
    und_plain = mapped_column(String(collation="und-x-icu"))
    nc = mapped_column(NOCASE)
    nc2 = mapped_column(DOMAIN("dm_nc2", NOCASE))
    nc_plain = mapped_column(Text(collation="dm_nocase"))
    cword = mapped_column(CWORD)
    cword2 = mapped_column(DOMAIN("dm_cword2", CWORD))
    cword_plain = mapped_column(Text(collation="C"))
    f4 = mapped_column(FLOAT4)
    f42 = mapped_column(DOMAIN("dm_f42", FLOAT4))
    f4_plain = mapped_column(REAL)


WORDS = ["b", "B", "a", "A", "\u00e9", "e", "Z", "z", "a-b", "ab", "E", "\u00c9"]
# real: rows whose id is a multiple of 4 hold values whose float4 sums are exact in any
# order (sum(real) adds in float4, so the one database's last digits depend on its scan
# order otherwise); avg(real) adds in double precision, where all of these are exact.
FLOATS = [0.5, 0.1, 0.7, 3.3, -2.25, 1 / 3, 0.05, 9.9, 12.125, 2.5e-3, 7.7, 1e3 / 7]
TEXT_COLUMNS = {"ci": "ci_plain", "ci2": "ci_plain", "word": "word_plain", "word2": "word_plain",
                "und": "und_plain", "und2": "und_plain", "und_over": "cword_plain",
                "nc": "nc_plain", "nc2": "nc_plain", "cword": "cword_plain", "cword2": "cword_plain"}
JSON_COLUMNS = {"js": "js_plain", "js2": "js_plain"}
FLOAT_COLUMNS = {"f4": "f4_plain", "f42": "f4_plain"}


def row(i: int) -> dict[str, Any]:
    w = WORDS[i % len(WORDS)]
    doc = {"k": w, "n": i % 3} if i % 4 else [i % 2, w]
    f = FLOATS[i % len(FLOATS)]
    return {"id": i, "grp": i % 3, **{c: w for c in TEXT_COLUMNS}, **{c: w for c in TEXT_COLUMNS.values()},
            # (SQLAlchemy gives a domain no bind processing: its JSON is given as text.)
            **{c: json.dumps(doc) for c in JSON_COLUMNS}, "js_plain": doc, **{c: f for c in (*FLOAT_COLUMNS, "f4_plain")}}


@dataclass
class Db:
    Session: sessionmaker
    reference: Engine


@pytest.fixture(scope="module")
def dbs(shardkit_module_cluster_factory) -> Iterator[dict[str, Db]]:
    dev = shardkit_module_cluster_factory(shards=3, replicas=0)
    kinds = {"c": "TEMPLATE template0",
             "icu": "LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C' TEMPLATE template0"}
    rows = [row(i) for i in range(48)]
    out, clusters, engines = {}, [], []
    for kind, options in kinds.items():
        db = f"dm_{kind}"
        cfg = {**dev.config_dict(), "groups": {"dm": {"tables": {"dm_rows": "id"}}}}
        for shard in cfg["shards"]:
            with dev.shard(shard["name"]).primary.connect(dbname="postgres") as c:
                for name in (db, f"{db}_one") if shard["name"] == "s0" else (db,):
                    c.execute(f"DROP DATABASE IF EXISTS {name}")
                    c.execute(f"CREATE DATABASE {name} {options}")
            shard["primary"] = shard["primary"].rsplit("/", 1)[0] + f"/{db}"
        cluster = shardkit.Cluster.from_config(cfg)
        reference = create_engine(make_url(cluster.config.shard("s0").primary).set(database=f"{db}_one"))
        clusters.append(cluster)
        engines.append(reference)
        for engine in [cluster.primary(s) for s in cluster.shard_names] + [reference]:
            with engine.begin() as c:
                for ddl in SETUP:
                    c.execute(text(ddl))
            Base.metadata.create_all(engine)
        sharded = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)
        for session in (sharded(), Session(reference)):
            with session as s:
                s.add_all(Row(**r) for r in rows)
                s.commit()
        assert len({cluster.shard_for(Row, r["id"]) for r in rows}) == 3
        out[kind] = Db(sharded, reference)
    yield out
    for e in engines:
        e.dispose()
    for cl in clusters:
        cl.dispose()



def exact(v: Any) -> Any:
    """A value with its type and exact digits (1.50 != 1.5, 1 != 1.0 != True)."""
    if isinstance(v, decimal.Decimal):
        return ("numeric", str(v))
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, (dict, list)):
        return (type(v).__name__, repr(v))
    if isinstance(v, (dt.time, dt.datetime)):
        return (type(v).__name__, v.isoformat())
    return (type(v).__name__, v)


def outcome(db: Db, stmt: Any, ordered: bool) -> tuple[str, Any]:
    """("refused", construct) or ("exact", rows): rows the same as the reference database's
    (in order if ``ordered``); anything else fails the test."""
    try:
        with db.Session() as s:
            got = [tuple(map(exact, r)) for r in s.execute(stmt).all()]
    except shardkit.ScatterRefused as e:
        assert e.construct, "ScatterRefused must name the construct"
        return "refused", e.construct
    with Session(db.reference) as s:
        want = [tuple(map(exact, r)) for r in s.execute(stmt).all()]
    msg = f"merged rows differ from one database's: {got} != {want}\n{stmt}"
    if ordered:
        assert got == want, msg
    else:
        assert Counter(got) == Counter(want), msg
    return "exact", None


def domain_like_plain(db: Db, shape: Callable[[Any], Any], domain: str, plain: str,
                      ordered: bool) -> tuple[str, Any]:
    want = outcome(db, shape(getattr(Row, plain)), ordered)
    got = outcome(db, shape(getattr(Row, domain)), ordered)
    assert got == want, f"{domain} (a domain) gave {got}, {plain} (its base type) {want}"
    return got


TEXT_SHAPES = {
    "order": (lambda c: select(Row.id, c).order_by(c, Row.id), True),
    "order-desc-limit": (lambda c: select(c, Row.id).order_by(c.desc(), Row.id.desc()).limit(5), True),
    "order-lower": (lambda c: select(Row.id).order_by(func.lower(c), Row.id), True),
    "min-max": (lambda c: select(func.min(c), func.max(c)), True),
    "group": (lambda c: select(c, func.count()).group_by(c), False),
    "group-order": (lambda c: select(c, func.count()).group_by(c).order_by(c), True),
    "group-having": (lambda c: select(Row.grp, func.count()).group_by(Row.grp)
                     .having(func.max(c) > "a").order_by(Row.grp), True),
    "distinct": (lambda c: select(c).distinct(), False),
    "count-distinct": (lambda c: select(func.count(c.distinct())), True),
    "union": (lambda c: select(c).union(select(c)), False),
}


@pytest.mark.parametrize("kind", ["c", "icu"])
@pytest.mark.parametrize("domain", list(TEXT_COLUMNS))
def test_text_domain_merges_as_its_base_type(dbs, kind, domain):
    """Every shape over the domain column: as over its base type (exact, or refused with
    the same construct); all shapes run, their failures reported together."""
    failures = []
    for shape, (fn, ordered) in TEXT_SHAPES.items():
        try:
            domain_like_plain(dbs[kind], fn, domain, TEXT_COLUMNS[domain], ordered)
        except AssertionError as e:
            failures.append(f"{shape}: {str(e).splitlines()[0][:300]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("shape", ["order", "group", "distinct", "min-max", "union"])
@pytest.mark.parametrize("domain", list(JSON_COLUMNS))
def test_jsonb_domain_is_refused_as_jsonb(dbs, shape, domain):
    fn, ordered = TEXT_SHAPES[shape]
    got = domain_like_plain(dbs["c"], fn, domain, JSON_COLUMNS[domain], ordered)
    assert got[0] == "refused"


@pytest.mark.parametrize("shape", {
    "avg": lambda c: select(func.avg(c), func.count(c)),
    "group-avg": lambda c: select(Row.grp, func.avg(c)).group_by(Row.grp).order_by(Row.grp),
    "sum": lambda c: select(func.sum(c), func.avg(c)).where(Row.id % 4 == 0),
    "order-min-max": lambda c: select(Row.id, c).order_by(c.desc(), Row.id).limit(7),
}.items(), ids=lambda p: p[0])
@pytest.mark.parametrize("domain", list(FLOAT_COLUMNS))
def test_real_domain_aggregates_as_real(dbs, shape, domain):
    got = domain_like_plain(dbs["c"], shape[1], domain, FLOAT_COLUMNS[domain], True)
    assert got == ("exact", None)


def test_what_the_base_types_get(dbs):
    """The plain columns' outcomes the domain tests compare with: refusals where the merge
    would differ (so a domain merged as plain text would be wrong there), exact elsewhere."""
    c, icu = dbs["c"], dbs["icu"]
    order = TEXT_SHAPES["order"][0]
    group = TEXT_SHAPES["group"][0]
    assert outcome(c, order(Row.ci_plain), True) == ("refused", "ORDER BY over citext")
    assert outcome(c, group(Row.ci_plain), False)[0] == "refused"
    assert outcome(c, order(Row.und_plain), True)[0] == "refused"
    # lower() of text under a named collation keeps that collation (PostgreSQL orders
    # lower(und_plain) under und-x-icu): refused as the column itself is.
    assert outcome(c, TEXT_SHAPES["order-lower"][0](Row.und_plain), True) == ("refused", "ORDER BY over text")
    assert outcome(c, TEXT_SHAPES["group"][0](func.lower(Row.nc_plain)), False) == (
        "refused", "GROUP BY over a nondeterministic collation")
    assert outcome(c, group(Row.nc_plain), False) == ("refused", "GROUP BY over a nondeterministic collation")
    assert outcome(icu, order(Row.word_plain), True) == ("refused", "text under the database's collation")
    assert outcome(c, order(Row.word_plain), True) == ("exact", None)
    assert outcome(icu, order(Row.cword_plain), True) == ("exact", None)
    # What the reference database does with these values: not Python's order or equality.
    with Session(icu.reference) as s:
        assert s.scalars(select(Row.word).order_by(Row.word, Row.id)).all() != sorted(
            s.scalars(select(Row.word)).all())
    with Session(c.reference) as s:
        assert s.scalar(select(func.count(Row.nc.distinct()))) < len(set(WORDS))
        assert s.scalar(select(func.count(Row.ci2.distinct()))) < len(set(WORDS))
        assert s.scalars(select(Row.und2).order_by(Row.und2, Row.id)).all() != sorted(
            s.scalars(select(Row.und2)).all())
        assert s.scalars(select(Row.und_over).order_by(Row.und_over, Row.id)).all() == sorted(
            s.scalars(select(Row.und_over)).all())
