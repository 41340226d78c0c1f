"""Online rebalancing as an operator on a live cluster runs it: a split at the edge of
the key column's type, stale plans, `rebalance status` and `abort` output, `verify`."""

from __future__ import annotations

import json

import inproc_cli
import psycopg
import pytest
from shardkit import rebalance
from shardkit._rebalance_plan import plan_from_dict
from shardkit.errors import RebalanceError
from shardkit.verify import verify
from test_range_list_e2e import Event, Store, _where, world  # noqa: F401 (world: a fixture)

pytestmark = pytest.mark.integration

BIGINT_MAX = 2**63 - 1


def _cli(cfg, *args):
    """`shardkit rebalance ARGS --config CFG`, run in this process (tests/inproc_cli.py: its
    exit status, stdout and stderr as a process's, without ~0.6 s of imports a call)."""
    return inproc_cli.run(["rebalance", *args, "--config", str(cfg)])


def _clear(dev):
    for shard in dev.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as c:
            c.execute("DELETE FROM rl_items; DELETE FROM rl_events; DELETE FROM rl_stores")


def test_a_split_beyond_the_key_columns_type_is_refused_and_writes_go_on(world):
    """rl_events.id is a bigint.  A split at 2**63 names no key the column can hold; it was
    planned, applied and reported "done", and the shards' copy of the slices then held a
    bound that the guard casts to bigint on each write of the group: every insert there
    failed with "out of range for type bigint", for good (an abort keeps a split).  Now
    `plan` and `apply` refuse it, naming the column; the max of the type splits fine."""
    dev, cluster, cfg, Session = world
    for verb in ("plan", "apply"):
        r = _cli(cfg, verb, "--split", f"events:{BIGINT_MAX + 1}", "--to", "s0",
                 *(("--grace", "0.1") if verb == "apply" else ()))
        assert r.returncode == 2, (verb, r.stdout, r.stderr)
        assert "rl_events.id" in r.stderr and "bigint" in r.stderr, r.stderr
    r = _cli(cfg, "apply", "--split", f"events:{-(2**63) - 1}", "--lower", "--to", "s1", "--grace", "0.1")
    assert r.returncode == 2 and "beyond the range" in r.stderr, r.stderr
    try:
        with Session() as s:
            s.add_all([Event(id=5), Event(id=2500), Event(id=BIGINT_MAX), Event(id=-(2**63))])
            s.commit()
        # The type's own extremes are keys: a split at the max moves just that key's row.
        r = _cli(cfg, "apply", "--split", f"events:{BIGINT_MAX}", "--to", "s0", "--grace", "0.1")
        assert r.returncode == 0, r.stderr
        cluster.refresh_map()
        assert cluster.shard_for(Event, BIGINT_MAX) == "s0" and cluster.shard_for(Event, 2500) == "s2"
        with Session() as s:
            s.add(Event(id=BIGINT_MAX - 1))
            s.commit()
            assert s.get(Event, BIGINT_MAX) is not None
        assert _where(dev, "SELECT id FROM rl_events WHERE id > 4611686018427387904")["s0"] == [(BIGINT_MAX,)]
        assert verify(cluster).ok
    finally:
        _clear(dev)


def test_the_drain_note_does_not_send_the_operator_to_move_a_list_default(world):
    """s2 holds the default of list group stores.  `plan --drain s2`'s note listed that
    slice among those to "move with --split GROUP:KEY or --move-value GROUP:VALUE", but no
    command moves a list group's default (a plan moving it is refused): the operator
    was sent after a move that does not exist.  The note says the default stays."""
    dev, cluster, cfg, Session = world
    r = _cli(cfg, "plan", "--drain", "s2")
    assert r.returncode == 0, r.stderr
    note = r.stderr
    assert note.startswith("note: --drain moves hash buckets only; still on s2 after it:"), note
    assert "values not listed elsewhere (default)" not in note, note
    assert "the default of group stores" in note and "a list group's default cannot move" in note, note
    assert "s2 stays in the config while it holds the default of stores" in note, note
    # What the note still sends to --split: the range slice s2 holds, which can move.
    assert "(events: [" in note, note


def test_a_stored_plan_whose_new_slice_number_another_groups_split_took_is_refused_as_stale(world, tmp_path):
    """Two plans stored in the morning from one catalog state, for two groups: a split of
    events and a value of stores carved out of its default.  Each numbers its new slice
    with the next free number, the same one.  Once the first is applied, the second is
    stale (that number is now a slice of events): it was refused with "which another group
    already uses: plan with every group's slices", which an operator of the CLI, whose
    plans always hold every group's slices, cannot act on.  It says the plan is stale and
    to make a new one; the new one moves the value."""
    dev, cluster, cfg, Session = world
    with Session() as s:
        s.add_all(Store(id=i, region=["zz", "yy"][i % 2]) for i in range(1, 41))
        s.commit()
    try:
        a, b = tmp_path / "a.json", tmp_path / "b.json"
        assert _cli(cfg, "plan", "--split", "events:1200", "--to", "s0", "--out", str(a)).returncode == 0
        assert _cli(cfg, "plan", "--move-value", "stores:zz", "--to", "s0", "--out", str(b)).returncode == 0
        new_a = {s["id"] for s in json.loads(a.read_text())["split"]} - {s["id"] for s in json.loads(a.read_text())["old"]}
        new_b = {s["id"] for s in json.loads(b.read_text())["split"]} - {s["id"] for s in json.loads(b.read_text())["old"]}
        assert new_a == new_b  # (the clash this is about)
        r = _cli(cfg, "apply", "--plan", str(a), "--grace", "0.1")
        assert r.returncode == 0, r.stderr
        for verb in ("plan", "apply"):
            r = _cli(cfg, verb, "--plan", str(b), *(("--grace", "0.1") if verb == "apply" else ()))
            assert r.returncode == 2, (verb, r.stdout, r.stderr)
            assert "make a new plan" in r.stderr and "another group already uses" not in r.stderr, r.stderr
            assert f"slice {min(new_b)}" in r.stderr and "events" in r.stderr, r.stderr
        # The API alike (Mover.start checks the plan under the catalog's lock).
        with pytest.raises(RebalanceError, match=f"the plan is stale: it numbers its new slice {min(new_b)}, "
                                                 f"which is now slice {min(new_b)} of group events"):
            rebalance.Mover(cluster).start(plan_from_dict(json.loads(b.read_text())))
        assert "the plan is stale" in r.stderr, r.stderr
        r = _cli(cfg, "apply", "--move-value", "stores:zz", "--to", "s0", "--grace", "0.1")
        assert r.returncode == 0, r.stderr
        cluster.refresh_map()
        assert cluster.shard_for(Store, "zz") == "s0" and cluster.shard_for(Store, "yy") == "s2"
        placed = _where(dev, "SELECT id, region FROM rl_stores")
        assert sorted(placed["s0"]) == [(i, "zz") for i in range(2, 41, 2)]
        assert sorted(placed["s2"]) == [(i, "yy") for i in range(1, 41, 2)]
        assert verify(cluster).ok
    finally:
        _clear(dev)
