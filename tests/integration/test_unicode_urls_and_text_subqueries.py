"""URL checks, SQL-text subquery refusals, ORM bulk INSERT of composite attributes and
revision imports: what must not be refused, and what must be "as SQLAlchemy does".

- The config's URL check took any non-printable character (``str.isprintable``) for the
  newline of a secret file: a password with an ideographic space (what a Japanese IME
  types), a no-break space or a zero-width non-joiner (written inside Persian words) was
  refused as "a control character", though libpq sends it as it is.
- The scatter refusal of a subquery in SQL text matched the word SELECT anywhere in the
  text, also inside a quoted string (``text("kind <> 'select'")``), and a known aggregate's
  name inside one (``literal_column("'max(1)'")``).
- The ORM bulk INSERT split by shard builds rows with SQLAlchemy's own
  ``_collect_insert_commands`` but skipped the step SQLAlchemy's bulk insert takes first,
  expanding composite attributes into their columns: the values were dropped, the row
  stored NULLs, with no error.
"""

from __future__ import annotations

import dataclasses

import pytest
from own_tables import cluster_with_tables, truncate_everywhere
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, func, insert, literal_column, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, composite, mapped_column, sessionmaker

import shardkit
from shardkit import ScatterRefused
from shardkit._config import load_config
from shardkit._scatter import plan_scatter
from shardkit.errors import ConfigurationError


def _config(url: str) -> dict:
    return {"shards": [{"name": "s0", "primary": url}],
            "groups": {"g": {"strategy": "hash", "tables": {"t": "id"}}}}


# -- the URL check and non-ASCII passwords ------------------------------------------------


@pytest.mark.parametrize("password", ["パス\u3000ワード", "a\u00a0b", "می\u200cخواهم"],
                         ids=["ideographic space", "no-break space", "zero-width non-joiner"])
def test_a_password_with_a_unicode_space_or_joiner_is_taken(password):
    """Not control characters: libpq sends them (UTF-8) as they are, and SCRAM's SASLprep
    maps them the same way on both ends."""
    cfg = load_config(_config(f"postgresql+psycopg://app:{password}@db0:5432/shop"))
    assert cfg.shards[0].primary.password == password


@pytest.mark.parametrize("bad", ["\n", "\t", "\r", "\x00", "\x7f", "\x85"])
def test_a_control_character_in_a_url_is_still_refused(bad):
    with pytest.raises(ConfigurationError, match="control character") as e:
        load_config(_config(f"postgresql+psycopg://app:pw{bad}x@db0:5432/shop"))
    assert "pw" not in str(e.value)


def test_a_url_ending_in_a_newline_is_still_refused():
    with pytest.raises(ConfigurationError, match="control character"):
        load_config(_config("postgresql+psycopg://app:pw@db0:5432/shop\n"))


# -- SQL text in a cross-shard read -------------------------------------------------------

md = MetaData()
t = Table("t", md, Column("id", Integer, primary_key=True), Column("kind", String), Column("a", Integer))


@pytest.mark.parametrize("stmt", [
    select(t.c.id).where(text("kind <> 'select'")),
    select(t.c.id, literal_column("'Please select a plan'").label("hint")),
    select(t.c.id).where(text("kind = 'it''s a select'")),
    select(t.c.id, literal_column("'max(1)'").label("note")),
], ids=["where", "select list", "doubled quote", "aggregate name in a string"])
def test_the_word_select_in_a_quoted_string_is_not_a_subquery(stmt):
    plan_scatter(stmt)   # a plain filter / a constant: each shard's rows merge as they are


@pytest.mark.parametrize("stmt", [
    select(t.c.id).where(text("a > (SELECT avg(a) FROM t)")),
    select(t.c.id).where(text("kind = 'x' AND a IN (select a FROM t)")),
    select(literal_column("max(a)")).select_from(t),
], ids=["subquery", "subquery after a string", "aggregate"])
def test_sql_text_that_computes_is_still_refused(stmt):
    with pytest.raises(ScatterRefused):
        plan_scatter(stmt)


# -- the ORM bulk INSERT and composite attributes -----------------------------------------


@dataclasses.dataclass
class Point:
    x: int | None
    y: int | None


class Base(DeclarativeBase):
    metadata = MetaData()


class Shape(Base):
    __tablename__ = "t5b_shapes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    x1: Mapped[int | None] = mapped_column(Integer)
    y1: Mapped[int | None] = mapped_column(Integer)
    start: Mapped[Point] = composite("x1", "y1")


@pytest.fixture(scope="module")
def shapes(shardkit_dev_cluster):
    cfg = {"groups": {"shapes": {"strategy": "hash", "tables": {"t5b_shapes": "id"}}}}
    with cluster_with_tables(shardkit_dev_cluster, cfg, Base.metadata) as cluster:
        yield cluster


@pytest.mark.integration
@pytest.mark.parametrize("how", ["execute", "bulk_insert_mappings"])
def test_orm_bulk_insert_stores_a_composite_attributes_columns(shapes, how):
    """SQLAlchemy's bulk insert expands a composite into its columns
    (bulk_persistence._expand_composites) before it collects the rows."""
    truncate_everywhere(shapes, "t5b_shapes")
    rows = [{"id": i, "start": Point(i, 10 * i)} for i in range(1, 9)]
    with sessionmaker(class_=shardkit.ShardedSession, cluster=shapes, consistency="strong")() as s:
        if how == "execute":
            s.execute(insert(Shape), rows)
        else:
            s.bulk_insert_mappings(Shape, rows)
        s.commit()
    with sessionmaker(class_=shardkit.ShardedSession, cluster=shapes, consistency="strong")() as s:
        got = s.execute(select(Shape.id, Shape.x1, Shape.y1).order_by(Shape.id)).all()
        assert s.execute(select(func.count()).select_from(Shape)).scalar() == 8
    assert [tuple(r) for r in got] == [(i, i, 10 * i) for i in range(1, 9)]


# -- migrate: the revision files' pre-check loads them as each shard's Alembic does ----------


def test_a_revision_importing_the_projects_package_from_the_current_directory_loads(tmp_path, monkeypatch):
    """Each shard's Alembic runs as `python -m alembic` in the current directory, which is
    first on its sys.path; the `shardkit` console script's sys.path does not hold it.  A
    revision file importing the project's package (as autogenerate writes `import
    myapp.types` for a custom type) loads for Alembic, and was refused by the pre-check as
    "a revision script does not load", so no migration could run."""
    import subprocess
    import sys

    from shardkit.migrate import _existing_ini

    (tmp_path / "t5b_proj_pkg").mkdir()
    (tmp_path / "t5b_proj_pkg" / "__init__.py").write_text("")
    versions = tmp_path / "migrations" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "migrations" / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s\n")
    (tmp_path / "migrations" / "env.py").write_text("")
    (versions / "a1.py").write_text("import t5b_proj_pkg\nrevision = 'a1'\ndown_revision = None\n\n"
                                    "def upgrade():\n    pass\n\ndef downgrade():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    # Alembic itself, as shardkit starts it for a shard, loads the revision:
    r = subprocess.run([sys.executable, "-m", "alembic", "-c", "migrations/alembic.ini", "heads"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "a1 (head)" in r.stdout, r.stdout + r.stderr
    assert _existing_ini("migrations/alembic.ini").name == "alembic.ini"
    assert str(tmp_path) not in sys.path   # (left as it was)
    # A revision whose import fails for Alembic too is still named before any shard runs.
    (versions / "a2.py").write_text("import no_such_module_t5b\nrevision = 'a2'\ndown_revision = 'a1'\n")
    with pytest.raises(ConfigurationError, match="does not load"):
        _existing_ini("migrations/alembic.ini")
