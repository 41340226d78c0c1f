"""Routing of compounds whose SELECTs read tables of different groups, with no server."""

import pytest
from sqlalchemy import Integer, column, except_, intersect, select, text, union_all

from models import Customer, Event, User, offline_cluster

SHARDS = ["s0", "s1", "s2"]


@pytest.fixture(scope="module")
def cluster():
    return offline_cluster(SHARDS)


def test_the_route_names_the_compounds_own_keyword(cluster):
    """The reason (shown by explain() and strict mode's refusal) said UNION for any compound."""
    for make, keyword in ((intersect, "INTERSECT"), (except_, "EXCEPT"), (union_all, "UNION ALL")):
        r = cluster.explain(make(select(User.id), select(Event.id)))
        assert r.kind == "all" and r.reason.startswith(f"{keyword} of SELECTs from groups events, users"), r
        if keyword != "UNION ALL":
            assert r.merge.startswith(f"refused: {keyword} across shards"), r


def test_a_textual_part_is_left_to_the_merges_refusal(cluster):
    """As in a compound of one group's SELECTs: the merge cannot read the part (before: the
    part's own routing raised, suggesting shardkit_all_shards=True)."""
    textual = text("SELECT 1").columns(column("id", Integer))
    for stmt in (union_all(select(User.id), select(Event.id), textual),
                 union_all(select(User.id), select(Customer.id), textual)):
        merge = cluster.explain(stmt).merge
        assert merge.startswith("refused: part 3 of the UNION ALL is a TextualSelect"), merge
