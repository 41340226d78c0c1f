"""Which BEFORE row triggers firing after shardkit's guard may set a row's key (a move
refuses those tables: the guard would log the row under its old key)."""

from __future__ import annotations

import pytest

from shardkit.rebalance import _trigger_may_set

KEYS = ["id", "tenant"]


@pytest.mark.parametrize("source, may", [
    ("BEGIN IF NEW.id IS NULL THEN NEW.id := nextval('ids'); END IF; RETURN NEW; END", True),
    ('BEGIN\n  new."tenant" = 5;\n  RETURN NEW;\nEND', True),
    ("BEGIN SELECT max(x) INTO NEW.id FROM t; RETURN NEW; END", True),
    ("BEGIN SELECT * INTO STRICT NEW FROM t WHERE t.k = NEW.k; RETURN NEW; END", True),
    ("BEGIN NEW := jsonb_populate_record(NEW, '{}'); RETURN NEW; END", True),
    ("BEGIN RETURN jsonb_populate_record(NEW, '{}'); END", True),
    # other columns, comparisons, comments and strings: not the key
    ("BEGIN NEW.updated_at := now(); RETURN NEW; END", False),
    ("BEGIN IF NEW.id = OLD.id THEN NEW.touched = now(); END IF; RETURN NEW; END", False),
    ("BEGIN NEW.identifier := 'x'; RETURN NEW; END", False),
    ("BEGIN -- NEW.id := 1;\n RETURN NEW; END", False),
    ("BEGIN /* NEW.id := 1; */ RETURN NEW; END", False),
    ("BEGIN RAISE NOTICE 'NEW.id := 1'; RETURN NEW; END", False),
    ("BEGIN IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; RETURN NEW; END", False),
    ("BEGIN RETURN NULL; END", False),
])
def test_plpgsql_functions_are_read(source, may):
    assert _trigger_may_set("plpgsql", source, [], KEYS) is may


def test_builtin_functions_change_the_columns_their_arguments_name():
    assert _trigger_may_set("internal", "tsvector_update_trigger", [b"tsv", b"pg_catalog.english", b"body"], KEYS) is False
    assert _trigger_may_set("c", "moddatetime", [b"ID"], KEYS) is True


def test_functions_in_other_languages_may_set_anything():
    assert _trigger_may_set("plpython3u", "TD['new']['x'] = 1", [], KEYS) is True
