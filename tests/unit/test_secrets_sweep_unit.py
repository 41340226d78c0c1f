"""Passwords never appear in errors or in the repr of what an application may log:
URLs whose password holds an unencoded '@', and secrets given in a URL's query string."""

from __future__ import annotations

import pytest

import shardkit
from shardkit import ConfigurationError, cli, load_config, mask_url
from shardkit.catalog import Catalog

PW = "Qm7-Secret-v2Lx"


def cfg(primary: str, **extra):
    return {"bucket_count": 16, "groups": {"users": {"tables": {"users": "id"}}},
            "shards": [{"name": "s0", "primary": primary},
                       {"name": "s1", "primary": "postgresql+psycopg://app@db1.example/shop"}], **extra}


@pytest.mark.parametrize("password", ["Qm7@Tk4w/Zr8Lx", "Qm7@Tk4w?Zr8Lx", "Qm7@Tk4w/Zr8@Lx"])
def test_a_password_with_an_unencoded_at_is_refused_without_showing_its_tail(password, tmp_path, capsys,
                                                                              monkeypatch):
    """`app:${DB_PASSWORD}@host/db` with a generated password holding '@' and '/' (or '?'):
    SQLAlchemy reads the password's tail as the host and database name, which every message
    showing the URL (and the driver's "failed to resolve host ...") would print."""
    raw = "postgresql+psycopg://app:${DB_PASSWORD}@db0.example:5432/shop"
    with pytest.raises(ConfigurationError, match="unencoded '@'") as ei:
        load_config(cfg(raw), env={"DB_PASSWORD": password})
    tails = ("Tk4w", "Zr8")
    assert not [t for t in tails if t in str(ei.value)], str(ei.value)
    masked = mask_url(raw.replace("${DB_PASSWORD}", password))
    assert not [t for t in tails if t in masked], masked
    path = tmp_path / "shardkit.toml"
    path.write_text(f'[[shards]]\nname = "s0"\nprimary = "{raw}"\n'
                    '[groups.users]\ntables = { users = "id" }\n')
    monkeypatch.setenv("DB_PASSWORD", password)
    rc = cli.main(["route", "users", "1", "--config", str(path)])
    out = capsys.readouterr()
    assert rc == 2 and not [t for t in tails if t in out.out + out.err], out
    # A user name with an '@' (user@server) is read as SQLAlchemy reads it, and still loads.
    c = load_config(cfg(f"postgresql+psycopg://admin@srv:{PW}@db0.example/shop"))
    assert c.shards[0].primary.username == "admin@srv" and c.shards[0].primary.password == PW


def test_a_query_string_password_is_hidden_in_the_repr_of_node_urls():
    """`?password=` is the URL's password: repr(cluster.node_url(...)) and the config's URLs
    hide it as they hide `user:password@`, and the driver still gets it."""
    c = shardkit.Cluster.from_config(cfg(f"postgresql+psycopg://app@db0.example/shop?password={PW}"))
    url = c.node_url("s0")
    assert PW not in repr(url) and PW not in str(url) and PW not in repr(c.config.shards[0].primary)
    assert url.password == PW and "password" not in url.query
    c.dispose()


def test_catalog_and_migration_engines_hide_query_string_secrets():
    """The catalog's engine and the engine migrations run on keep `?password=` and
    `?sslpassword=` out of their repr (as the cluster's node engines do)."""
    from shardkit import migrate

    query = f"?password={PW}&sslpassword={PW}x"
    catalog = Catalog(f"postgresql+psycopg://app@cat.example/catalog{query}")
    assert PW not in repr(catalog.engine) and PW not in repr(catalog.engine.url), repr(catalog.engine)
    catalog.dispose()
    c = shardkit.Cluster.from_config(cfg(f"postgresql+psycopg://app@db0.example/shop{query}"))
    engine = migrate._engine(c, "s0")
    assert PW not in repr(engine) and PW not in repr(engine.url), repr(engine)
    engine.dispose()
    c.dispose()
