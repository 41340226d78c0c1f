"""ScatterError's advice: partial results for shards that were out of reach, not for a
statement (or a value of it) the database refused on some shards, where the fix is the
statement's (an IN list split by shard sent 2**31 for an integer key to one shard only)."""

from __future__ import annotations

import psycopg
from sqlalchemy.exc import DBAPIError, OperationalError

from shardkit.errors import ScatterError


def _dbapi(orig: Exception) -> DBAPIError:
    return DBAPIError.instance("SELECT ...", {}, orig, psycopg.Error)


def test_a_refused_value_is_not_answered_with_partial_results():
    e = ScatterError({"s1": _dbapi(psycopg.errors.NumericValueOutOfRange("integer out of range"))})
    assert "shardkit_partial_results" not in str(e), str(e)
    assert "refused the statement or one of its values" in str(e), str(e)


def test_shards_out_of_reach_still_point_at_partial_results():
    lost = OperationalError("SELECT ...", {}, psycopg.OperationalError("connection refused"))
    e = ScatterError({"s1": lost, "s2": _dbapi(psycopg.errors.NumericValueOutOfRange("out of range"))})
    assert "shardkit_partial_results=True" in str(e), str(e)
    assert "shardkit_partial_results=True" in str(ScatterError({"s0": TimeoutError("slow")}))
