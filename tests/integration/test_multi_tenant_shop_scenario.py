"""A new team's day with shardkit, from the README alone: a multi-tenant shop (tenants hashed
by tenant_id, users/orders/order_items colocated with composite keys and foreign keys, a
reference table of countries, events ranged by date), its schema made with the Alembic
environment of `migrations/` through `shardkit migrate upgrade`, a catalog, writers keeping
a ledger, read-your-writes reads on replicas, a cross-shard report, `status --json`, a shard
added and filled online while the writers write, `verify`, a second migration (a column
with a default and an index) with `migrate check`, and a replica stopped mid-day."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from datetime import date
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import (
    BigInteger,
    Date,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    Numeric,
    String,
    Text,
    column,
    desc,
    func,
    select,
    table,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import shardkit
from inproc_cli import run
from waiting import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHARDKIT = str(Path(sys.executable).parent / "shardkit")
TODAY, YESTERDAY = date(2026, 12, 5), date(2026, 12, 4)
TENANTS = list(range(1, 41))
COUNTRIES = {"de": "Germany", "fr": "France", "us": "United States", "jp": "Japan"}


class Base(DeclarativeBase):
    pass


class Country(Base):
    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class Tenant(Base):
    __tablename__ = "tenants"
    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text)
    country_code: Mapped[str] = mapped_column(ForeignKey("countries.code"))
    country = relationship(Country)


class User(Base):
    __tablename__ = "users"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.tenant_id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(Text)


class Order(Base):
    __tablename__ = "orders"
    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text, default="new")
    items = relationship("OrderItem", back_populates="order", cascade="all, delete-orphan")
    __table_args__ = (ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"]),)


class OrderItem(Base):
    __tablename__ = "order_items"
    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    order_id: Mapped[int] = mapped_column(BigInteger)
    sku: Mapped[str] = mapped_column(Text)
    qty: Mapped[int] = mapped_column(Integer)
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    order = relationship(Order, back_populates="items")
    __table_args__ = (ForeignKeyConstraint(["tenant_id", "order_id"], ["orders.tenant_id", "orders.id"]),)


class Event(Base):
    __tablename__ = "events"
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(Text)


REV1 = '''"""shop schema"""
from alembic import op
import sqlalchemy as sa

revision = "a1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.install_shardkit_sql()
    op.create_table("countries", sa.Column("code", sa.String(2), primary_key=True),
                    sa.Column("name", sa.Text, nullable=False))
    op.create_table("tenants", sa.Column("tenant_id", sa.BigInteger, primary_key=True, autoincrement=False),
                    sa.Column("name", sa.Text, nullable=False),
                    sa.Column("country_code", sa.String(2), sa.ForeignKey("countries.code"), nullable=False))
    op.create_table("users", sa.Column("tenant_id", sa.BigInteger, sa.ForeignKey("tenants.tenant_id"), primary_key=True),
                    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
                    sa.Column("email", sa.Text, nullable=False))
    op.create_table("orders", sa.Column("tenant_id", sa.BigInteger, primary_key=True),
                    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
                    sa.Column("user_id", sa.BigInteger, nullable=False),
                    sa.Column("status", sa.Text, nullable=False),
                    sa.ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"]))
    op.create_table("order_items", sa.Column("tenant_id", sa.BigInteger, primary_key=True),
                    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
                    sa.Column("order_id", sa.BigInteger, nullable=False),
                    sa.Column("sku", sa.Text, nullable=False),
                    sa.Column("qty", sa.Integer, nullable=False),
                    sa.Column("price", sa.Numeric(10, 2), nullable=False),
                    sa.ForeignKeyConstraint(["tenant_id", "order_id"], ["orders.tenant_id", "orders.id"]))
    op.create_table("events", sa.Column("day", sa.Date, primary_key=True),
                    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
                    sa.Column("tenant_id", sa.BigInteger, nullable=False),
                    sa.Column("kind", sa.Text, nullable=False))
    op.install_shardkit_guard()


def downgrade():
    for t in ("events", "order_items", "orders", "users", "tenants", "countries"):
        op.drop_table(t)
    op.uninstall_shardkit_sql()
'''

REV2 = '''"""orders.channel"""
from alembic import op
import sqlalchemy as sa

revision = "a2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("SET lock_timeout = '5s'")
    op.add_column("orders", sa.Column("channel", sa.Text, nullable=False, server_default="web"))
    op.create_index("orders_tenant_channel", "orders", ["tenant_id", "channel"])


def downgrade():
    op.drop_index("orders_tenant_channel", "orders")
    op.drop_column("orders", "channel")
'''


def shards_toml(dev, n: int) -> str:
    out = []
    for s in dev.shards[:n]:
        reps = ", ".join(f'"{r.url}"' for r in s.replicas)
        out.append(f'[[shards]]\nname = "{s.name}"\nprimary = "{s.primary.url}"\nreplicas = [{reps}]\n')
    return "\n".join(out)


def config_toml(dev, n: int, catalog_url: str) -> str:
    return f'''name = "shop"
bucket_count = 64
reference_tables = ["countries"]

{shards_toml(dev, n)}
[groups.tenants]
strategy = "hash"
tables = {{ tenants = "tenant_id", users = "tenant_id", orders = "tenant_id", order_items = "tenant_id" }}

[groups.events]
strategy = "range"
tables = {{ events = "day" }}
ranges = [
  {{ to = 2026-12-05, shard = "s0" }},
  {{ from = 2026-12-05, shard = "s1" }},
]

[replicas]
consistency = "read_your_writes"
wait_for_token = 2.0

[catalog]
url = "{catalog_url}"
'''


def copy_reference(dev, source: str, target: str, table_name: str) -> None:
    """The README's step: the new shard gets the reference tables' rows."""
    dump = subprocess.run(["pg_dump", "--data-only", f"--table={table_name}",
                           dev.shard(source).primary.url.replace("+psycopg", "")],
                          capture_output=True, text=True, check=True).stdout
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", dev.shard(target).primary.url.replace("+psycopg", "")],
                   input=dump, capture_output=True, text=True, check=True)


def cli(project: Path, *args: str, check: bool = True,
        console_script: bool = False) -> subprocess.CompletedProcess[str]:
    """``shardkit ARGS`` in the project's directory: in this process (``tests/inproc_cli.py``:
    what the command does and says, without an interpreter's start-up), or with
    ``console_script`` as the installed ``shardkit`` command the README tells to run."""
    if console_script:
        r = subprocess.run([SHARDKIT, *args], cwd=project, capture_output=True, text=True, timeout=180)
    else:
        with contextlib.chdir(project):
            r = run(args)
    if check:
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    return r


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: dict[int, Decimal] = defaultdict(Decimal)   # tenant -> sum(qty * price)
        self.orders: dict[tuple[int, int], int] = {}               # (tenant, order) -> items
        self.events: Counter = Counter()                            # day -> events
        self.ryw_misses: list[tuple[int, int]] = []
        self.tokens: list[str] = []                                # every commit's consistency token
        self.errors: list[BaseException] = []
        self.ops = 0


class Writers:
    """Threads writing orders (with items) and events through run_transaction; each
    commit is then read back in a new session given the commit's token."""

    def __init__(self, Session, ledger: Ledger, phase: int, n: int = 3) -> None:
        self.Session, self.ledger, self.phase, self.n = Session, ledger, phase, n
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._guarded, args=(i,), daemon=True) for i in range(n)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _guarded(self, me: int) -> None:
        try:
            self._run(me)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.ledger.errors.append(e)

    def _run(self, me: int) -> None:
        rnd = random.Random(me * 100 + self.phase)
        mine = [t for t in TENANTS if t % self.n == me]
        seq = 0
        while not self.stop.is_set():
            seq += 1
            tenant = rnd.choice(mine)
            oid = self.phase * 10_000_000 + me * 1_000_000 + seq
            items = [(oid * 10 + k, f"sku{rnd.randrange(50)}", rnd.randrange(1, 4),
                      Decimal(rnd.randrange(100, 10000)) / 100) for k in range(rnd.randrange(1, 4))]
            day = TODAY if seq % 2 else YESTERDAY
            tokens = []

            def work(s, tenant=tenant, oid=oid, items=items, day=day):
                o = Order(tenant_id=tenant, id=oid, user_id=tenant * 100 + oid % 3, status="paid")
                o.items = [OrderItem(id=i, sku=sku, qty=q, price=p) for i, sku, q, p in items]
                s.add(o)
                s.add(Event(day=day, id=oid, tenant_id=tenant, kind="order"))

            shardkit.run_transaction(self.Session, work, retries=3, on_commit=tokens.append)
            with self.ledger.lock:
                self.ledger.ops += 1
                self.ledger.totals[tenant] += sum(q * p for _, _, q, p in items)
                self.ledger.orders[(tenant, oid)] = len(items)
                self.ledger.events[day] += 1
                self.ledger.tokens.append(tokens[0])
            with self.Session(consistency_token=tokens[0]) as s:
                got = s.get(Order, (tenant, oid))
                if got is None or len(got.items) != len(items):
                    with self.ledger.lock:
                        self.ledger.ryw_misses.append((tenant, oid))


def _until_written(ledger: Ledger, more: int, what: str) -> None:
    """Wait until the writers have committed ``more`` more orders (or one failed)."""
    with ledger.lock:
        target = ledger.ops + more
    wait_for(lambda: ledger.ops >= target or bool(ledger.errors), 60, what)


def report_top_tenants(Session, limit: int = 5):
    total = func.sum(OrderItem.qty * OrderItem.price).label("total")
    stmt = (select(Tenant.tenant_id, Tenant.name, total)
            .join(Order, Order.tenant_id == Tenant.tenant_id)
            .join(OrderItem, (OrderItem.tenant_id == Order.tenant_id) & (OrderItem.order_id == Order.id))
            .group_by(Tenant.tenant_id, Tenant.name)
            .order_by(desc(total), Tenant.tenant_id)
            .limit(limit))
    with Session() as s:
        return [tuple(r) for r in s.execute(stmt)]


def report_by_country(Session):
    total = func.sum(OrderItem.qty * OrderItem.price).label("total")
    stmt = (select(Country.code, total)
            .select_from(Tenant)
            .join(Country, Country.code == Tenant.country_code)
            .join(Order, Order.tenant_id == Tenant.tenant_id)
            .join(OrderItem, (OrderItem.tenant_id == Order.tenant_id) & (OrderItem.order_id == Order.id))
            .group_by(Country.code)
            .order_by(Country.code))
    with Session() as s:
        return dict(tuple(r) for r in s.execute(stmt))


def tenant_country(t: int) -> str:
    return sorted(COUNTRIES)[t % len(COUNTRIES)]


def expected_top(ledger: Ledger, limit: int = 5):
    return sorted(((t, f"tenant {t}", v) for t, v in ledger.totals.items()),
                  key=lambda r: (-r[2], r[0]))[:limit]


def expected_by_country(ledger: Ledger):
    out: dict[str, Decimal] = defaultdict(Decimal)
    for t, v in ledger.totals.items():
        out[tenant_country(t)] += v
    return dict(sorted(out.items()))


def after_the_writers(Session, ledger: Ledger):
    """Sessions whose reads see every commit of the ledger's writers (their tokens): a new
    session holds none, and may read a replica that has not replayed the last ones yet."""
    def session():
        s = Session()
        for token in ledger.tokens:
            s.require_token(token)
        return s
    return session


def check_against_ledger(Session, ledger: Ledger) -> None:
    assert not ledger.errors, ledger.errors
    Session = after_the_writers(Session, ledger)
    assert ledger.ryw_misses == []
    assert report_top_tenants(Session) == expected_top(ledger)
    assert report_by_country(Session) == expected_by_country(ledger)
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(Order)) == len(ledger.orders)
        assert s.scalar(select(func.count()).select_from(OrderItem)) == sum(ledger.orders.values())
        days = dict(tuple(r) for r in s.execute(select(Event.day, func.count()).group_by(Event.day)))
        assert days == dict(ledger.events)


@pytest.fixture(scope="module")
def day(shardkit_module_cluster_factory, tmp_path_factory):
    """The shop's project directory (migrations/ copied from this repository, as the README
    says, with the first revision), a catalog, and what the day's steps hand on."""
    dev = shardkit_module_cluster_factory(shards=3, replicas=1, bucket_count=64)
    project = tmp_path_factory.mktemp("shop")
    shutil.copytree(ROOT / "migrations", project / "migrations")
    (project / "migrations" / "versions" / "a1_shop.py").write_text(REV1)
    catalog_url = dev.create_catalog()
    (project / "shardkit.toml").write_text(config_toml(dev, 2, catalog_url))
    state = {"dev": dev, "project": project, "catalog_url": catalog_url, "ledger": Ledger()}
    yield state
    if state.get("cluster") is not None:
        state["cluster"].dispose()


def _open(state) -> None:
    if state.get("cluster") is not None:
        state["cluster"].dispose()
    state["cluster"] = cluster = shardkit.Cluster.from_config(state["project"] / "shardkit.toml",
                                                              metadata=Base.metadata)
    state["Session"] = sessionmaker(class_=shardkit.ShardedSession, cluster=cluster)


def test_morning_schema_catalog_and_first_writers(day):
    project = day["project"]
    cli(project, "migrate", "upgrade", console_script=True)   # the team's first command, as installed
    cli(project, "rebalance", "init")
    assert json.loads(cli(project, "migrate", "current", "--json").stdout) == {"s0": "a1", "s1": "a1"}
    _open(day)
    cluster, Session, ledger = day["cluster"], day["Session"], day["ledger"]
    with Session() as s:
        s.add_all(Country(code=c, name=n) for c, n in COUNTRIES.items())
        s.commit()
    with Session() as s:
        for t in TENANTS:
            s.add(Tenant(tenant_id=t, name=f"tenant {t}", country_code=tenant_country(t)))
            s.add_all(User(tenant_id=t, id=t * 100 + k, email=f"u{k}@t{t}.example") for k in range(3))
        s.commit()
    # The SQL hash the migration installed agrees with the router.
    for t in (7, 8):
        with cluster.primary("s0").connect() as c:
            assert c.execute(text("SELECT shardkit.bucket(CAST(:t AS bigint), 64)"), {"t": t}).scalar() \
                == cluster.bucket_for(Tenant, t)
    with Writers(Session, ledger, phase=1):
        _until_written(ledger, 12, "the first writers' commits")
        st = json.loads(cli(project, "status", "--json").stdout)
    assert st["ready"] and st["map_version"] is not None and st["catalog_error"] is None
    check_against_ledger(Session, ledger)
    assert cli(project, "verify", check=False).returncode == 0


def test_a_new_shard_whose_reference_tables_are_empty_gets_no_buckets(day):
    """The new shard's schema comes from the migrations; the reference table's rows do not.
    Filling it then left the moved tenants without their country there (the copy does not
    check foreign keys), and the report by country silently lost their orders."""
    dev, project = day["dev"], day["project"]
    (project / "shardkit.toml").write_text(config_toml(dev, 3, day["catalog_url"]))
    cli(project, "migrate", "upgrade")
    cli(project, "rebalance", "init")
    r = cli(project, "rebalance", "apply", "--add", "s2", check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "reference table countries on s2 differs from s0's (0 rows, 4 on s0)" in r.stderr, r.stderr
    assert "pg_dump --data-only --table=countries" in r.stderr
    assert cli(project, "rebalance", "status", "--json").stdout.strip() in ("[]", "")
    with psycopg.connect(dev.shard("s2").primary.dsn) as c:
        assert c.execute("SELECT count(*) FROM tenants").fetchone() == (0,)


def test_midday_the_new_shard_is_filled_while_writers_write(day):
    dev, project, ledger = day["dev"], day["project"], day["ledger"]
    copy_reference(dev, "s0", "s2", "countries")
    assert cli(project, "migrate", "check", check=False).returncode == 0
    _open(day)      # every process restarted with the config naming s2
    Session = day["Session"]
    cli(project, "rebalance", "plan", "--add", "s2", "--out", str(project / "plan.json"))
    with Writers(Session, ledger, phase=2):
        cli(project, "rebalance", "apply", "--plan", str(project / "plan.json"), "--grace", "0.2")
    check_against_ledger(Session, ledger)
    v = cli(project, "verify", check=False)
    assert v.returncode == 0, v.stdout + v.stderr
    with psycopg.connect(dev.shard("s2").primary.dsn) as c:
        assert c.execute("SELECT count(*) FROM tenants").fetchone()[0] > 0
    with Session() as s:
        for _ in range(3):
            assert {c.code for c in s.scalars(select(Country))} == set(COUNTRIES)
            s.commit()


def test_afternoon_a_migration_while_writers_write_and_a_replica_stops(day):
    dev, project, ledger, Session = day["dev"], day["project"], day["ledger"], day["Session"]
    (project / "migrations" / "versions" / "a2_channel.py").write_text(REV2)
    replica = dev.shard("s1").replicas[0]
    try:
        with Writers(Session, ledger, phase=3):
            cli(project, "migrate", "upgrade")
            replica.stop()
            _until_written(ledger, 12, "commits while s1's replica is down")
            st = json.loads(cli(project, "status", "--json").stdout)
        chk = cli(project, "migrate", "check", "--json", check=False)
        assert chk.returncode == 0, chk.stdout + chk.stderr
        assert json.loads(chk.stdout)["revisions"] == {"s0": "a2", "s1": "a2", "s2": "a2"}
        assert st["ready"]
        down = [n for sh in st["shards"] for n in sh["nodes"] if not n["up"]]
        assert [(n["shard"], n["role"]) for n in down] == [("s1", "replica")]
        check_against_ledger(Session, ledger)
        orders = table("orders", column("tenant_id"), column("channel"))
        with after_the_writers(Session, ledger)() as s:
            assert s.scalar(select(func.count()).select_from(orders)
                            .where(orders.c.channel == "web")) == len(ledger.orders)
    finally:
        replica.start()


def test_evening_reports(day):
    from sqlalchemy.orm import joinedload, selectinload
    cluster, Session, ledger = day["cluster"], day["Session"], day["ledger"]
    assert cluster.explain(select(Event).where(Event.day == TODAY)).shards == ("s1",)
    assert cluster.explain(select(Event).where(Event.day < TODAY)).shards == ("s0",)
    total = func.sum(OrderItem.qty * OrderItem.price).label("total")
    base = (select(Order.tenant_id, total)
            .join(OrderItem, (OrderItem.tenant_id == Order.tenant_id) & (OrderItem.order_id == Order.id))
            .group_by(Order.tenant_id))
    exp = sorted(((t, v) for t, v in ledger.totals.items()), key=lambda r: (-r[1], r[0]))
    with after_the_writers(Session, ledger)() as s:
        got = [tuple(r) for r in s.execute(base.order_by(desc(total), Order.tenant_id).offset(5).limit(5))]
        assert got == exp[5:10]
        cut = exp[10][1]
        got = [tuple(r) for r in s.execute(base.having(total > cut).order_by(Order.tenant_id))]
        assert got == sorted(r for r in exp if r[1] > cut)
        # The distinct values (count(DISTINCT tenant_id) of the shard key is merged too):
        assert len(s.scalars(select(Order.tenant_id).distinct()).all()) == len(ledger.totals)
        avg = s.scalar(select(func.avg(OrderItem.price * OrderItem.qty)))
        assert round(avg, 6) == round(sum(ledger.totals.values()) / sum(ledger.orders.values()), 6)
        ts = s.scalars(select(Tenant).options(selectinload(Tenant.country)).order_by(Tenant.tenant_id)).all()
        assert [(t.tenant_id, t.country.code) for t in ts] == [(t, tenant_country(t)) for t in TENANTS]
        ts = s.scalars(select(Tenant).options(joinedload(Tenant.country)).order_by(Tenant.tenant_id)).all()
        assert [(t.tenant_id, t.country.code) for t in ts] == [(t, tenant_country(t)) for t in TENANTS]
        rows = s.execute(select(Event.day, func.count()).where(Event.day.between(YESTERDAY, TODAY))
                         .group_by(Event.day).order_by(Event.day)).all()
        assert dict(rows) == dict(ledger.events)
