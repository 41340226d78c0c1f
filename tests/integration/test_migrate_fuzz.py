"""A seeded random driver for `shardkit migrate`: random upgrades and downgrades
(head, base, +1, -2, a named revision), with failures injected on random shards (a
revision whose SQL fails where a marker row says so, or a table lock held by another
session against a short lock_timeout), with and without --canary, with --parallel 1..3,
in --json and as text.  After every step the report (per shard and overall), the exit
status, `current` and `check` must equal the true state, read directly from every shard
(its alembic_version and its tables and columns); a final `upgrade head` converges all."""

from __future__ import annotations

import json
import random
import re

import psycopg
import pytest
import test_migrate_failures

pytestmark = pytest.mark.integration

# The same fixtures as test_migrate_failures's: 3 shards, and each test's own databases.
dev = test_migrate_failures.dev
world = test_migrate_failures.world

#: The chain: revision -> (upgrade, downgrade, {table: columns} it leaves).
CHAIN = ["r1", "r2", "r3", "r4", "r5"]
STEPS = {
    "r1": ("op.create_table('t1', sa.Column('id', sa.BigInteger, primary_key=True))", "op.drop_table('t1')"),
    "r2": ("op.add_column('t1', sa.Column('x', sa.Integer))", "op.drop_column('t1', 'x')"),
    "r3": ("op.create_table('t2', sa.Column('id', sa.BigInteger, primary_key=True), sa.Column('y', sa.Text))\n"
           "op.create_index('t2_y', 't2', ['y'])", "op.drop_table('t2')"),
    "r4": ("op.add_column('t2', sa.Column('z', sa.Integer, server_default='0'))", "op.drop_column('t2', 'z')"),
    # Data only: shards at r4 and r5 differ in their revision alone.
    "r5": ("op.execute('SELECT 1')", "op.execute('SELECT 1')"),
}
SCHEMA_AT = [{}, {"t1": ["id"]}, {"t1": ["id", "x"]}, {"t1": ["id", "x"], "t2": ["id", "y"]},
             {"t1": ["id", "x"], "t2": ["id", "y", "z"]}, {"t1": ["id", "x"], "t2": ["id", "y", "z"]}]

#: Run after each revision's own DDL (so that its rollback is what the report must show):
#: fails where fuzz_marker holds (revision, direction); reading fuzz_marker waits at most
#: lock_timeout for a lock another session holds on it.
INJECT = ("op.execute(\"SET LOCAL lock_timeout = '300ms'\")\n"
          "op.execute(\"DO $$ BEGIN IF EXISTS (SELECT 1 FROM fuzz_marker WHERE rev = '{rev}' AND dir = '{dir}') "
          "THEN RAISE EXCEPTION 'injected failure of {rev} {dir}'; END IF; END $$\")")


def _chain(w) -> None:
    for i, rev in enumerate(CHAIN):
        up, down = STEPS[rev]
        w.rev(rev, CHAIN[i - 1] if i else None, up + "\n" + INJECT.format(rev=rev, dir="up"),
              down + "\n" + INJECT.format(rev=rev, dir="down"))
    for i in range(3):
        # The same (unreplicated, uncompared) table on every shard: only its rows differ.
        w.sql(i, "CREATE TABLE fuzz_marker (rev text, dir text)")


def _level(rev: str | None) -> int:
    return 0 if rev is None else CHAIN.index(rev) + 1


def _rev(level: int) -> str | None:
    return CHAIN[level - 1] if level else None


def _truth(w) -> tuple[list[str | None], list[dict]]:
    revs, schemas = [], []
    for i in range(3):
        v = w.sql(i, "SELECT version_num FROM alembic_version") if w.has_table(i, "alembic_version") else []
        assert len(v) <= 1, v
        revs.append(v[0][0] if v else None)
        cols: dict[str, list[str]] = {}
        for t, c in w.sql(i, "SELECT c.table_name, c.column_name FROM information_schema.columns c "
                             "WHERE c.table_schema = current_schema() AND c.table_name IN ('t1', 't2') "
                             "ORDER BY c.table_name, c.ordinal_position"):
            cols.setdefault(t, []).append(c)
        schemas.append(cols)
    return revs, schemas


def _expected(levels: list[int], verb: str, target: int, fail: dict[int, set], shards: list[int],
              canary: int | None) -> tuple[list[int], list[bool]]:
    """Where each shard ends and whether it succeeds: each revision commits on its own,
    one that fails rolls back; an upgrade to a revision behind is a no-op, a downgrade to
    one ahead fails untouched."""
    after, ok = list(levels), [True] * 3

    def one(i: int) -> None:
        c = levels[i]
        if verb == "upgrade" and target < c:
            return   # Alembic: the target is an ancestor, nothing to do
        if verb == "downgrade" and target > c:
            ok[i] = False   # Alembic: not a valid downgrade target
            return
        steps = range(c + 1, target + 1) if verb == "upgrade" else range(c, target, -1)
        for lv in steps:
            if (CHAIN[lv - 1], verb) in fail[i]:
                ok[i] = False
                return
            after[i] = lv if verb == "upgrade" else lv - 1

    if canary is not None:
        one(canary)
        if not ok[canary]:
            for i in shards:
                if i != canary:
                    ok[i] = False
            return after, ok
    for i in shards:
        if i != canary:
            one(i)
    return after, ok


def _check_state(w, expect_levels: list[int], rnd: random.Random | None = None) -> list[str | None]:
    """The true state is ``expect_levels``, and `current` and `check` (as JSON, and as
    text when ``rnd`` says so) say what it is; with ``rnd``, sometimes a hand-made index
    on one shard first: schema drift at equal revisions too."""
    revs, schemas = _truth(w)
    assert [_level(r) for r in revs] == expect_levels, (revs, expect_levels)
    for i in range(3):
        assert schemas[i] == SCHEMA_AT[expect_levels[i]], (i, schemas[i], expect_levels[i])
    text_mode = rnd is not None and rnd.random() < 0.4
    cur = w.cli("migrate", "current", *([] if text_mode else ["--json"]))
    if text_mode:
        assert cur.returncode == 0 and cur.stdout.splitlines() == [
            f"s{i}: {revs[i] or '(base: no migration applied)'}" for i in range(3)], cur.stdout
    else:
        assert cur.returncode == 0 and json.loads(cur.stdout) == {f"s{i}": revs[i] for i in range(3)}, cur.stdout
    with_t1 = [i for i in range(3) if expect_levels[i]]
    hotfix = rnd.choice(with_t1) if rnd is not None and with_t1 and rnd.random() < 0.3 else None
    if hotfix is not None:   # t1 exists on that shard: an index made by hand
        w.sql(hotfix, "CREATE INDEX fuzz_hotfix ON t1 (id)")
    try:
        chk = w.cli("migrate", "check", "--json")
        report = json.loads(chk.stdout)
        agree = len(set(revs)) == 1
        assert report["revision_drift"] is (not agree), report
        assert report["revisions"] == {f"s{i}": revs[i] for i in range(3)}, report
        if hotfix is None:
            same_schema = len({json.dumps(SCHEMA_AT[lv]) for lv in expect_levels}) == 1
            assert bool(report["schema_differences"]) is (not same_schema), report
        elif all(expect_levels):   # (where t1 is missing on some, that is what is named)
            assert any("fuzz_hotfix" in d for d in report["schema_differences"]), report
        else:
            assert report["schema_differences"], report
        drift = not agree or hotfix is not None
        assert report["ok"] is not drift and chk.returncode == (1 if drift else 0), (chk.returncode, report)
        if text_mode:
            t = w.cli("migrate", "check")
            lines = t.stdout.splitlines()
            assert t.returncode == chk.returncode, t.stdout + t.stderr
            assert lines[:3] == [f"s{i}: {revs[i] or '(base)'}" for i in range(3)], t.stdout
            assert ("DRIFT: shards are at different revisions" in lines) is (not agree), t.stdout
            assert any(ln.startswith("DRIFT: ") for ln in lines) is drift, t.stdout
            assert (lines[-1] == "no drift: every shard has the same revision and schema") is (not drift), t.stdout
    finally:
        if hotfix is not None:
            w.sql(hotfix, "DROP INDEX fuzz_hotfix")
    return revs


SEQUENCES = 2
STEPS_PER_SEQUENCE = 4


@pytest.mark.parametrize("seed", range(SEQUENCES))
def test_random_upgrades_and_downgrades_report_the_true_state(world, seed):
    rnd = random.Random(seed * 7919 + 8)
    w = world(shards=3)
    _chain(w)
    levels = [0, 0, 0]
    log = []
    for step in range(STEPS_PER_SEQUENCE):
        verb = rnd.choice(["upgrade", "upgrade", "downgrade"])
        kind = rnd.choice(["head", "base", "rel", "named", "named"])
        agree = len(set(levels)) == 1
        if kind == "head":
            arg, target = ("head", 5) if verb == "upgrade" else ("base", 0)
        elif kind == "base":
            arg, target = ("base", 0) if verb == "downgrade" else ("head", 5)
        elif kind == "rel":
            arg = "+1" if verb == "upgrade" else "-2"
            target = levels[0] + (1 if verb == "upgrade" else -2)
        else:
            target = rnd.randrange(1, 6) if verb == "upgrade" else rnd.randrange(0, 5)
            arg = _rev(target) or "base"
        fail: dict[int, set] = {i: set() for i in range(3)}
        locked = None
        for i in range(3):
            w.sql(i, "DELETE FROM fuzz_marker")
            if rnd.random() < 0.3:
                rev = rnd.choice(CHAIN)
                w.sql(i, "INSERT INTO fuzz_marker VALUES (%s, %s)", (rev, "down" if verb == "downgrade" else "up"))
                fail[i].add((rev, verb))
        if rnd.random() < 0.2:
            locked = rnd.randrange(3)
            fail[locked] |= {(r, verb) for r in CHAIN}
        canary = rnd.choice([None, None, 0, 1, 2])
        parallel = rnd.randint(1, 3)
        as_json = rnd.random() < 0.6
        args = ["migrate", verb, arg, "--parallel", str(parallel)]
        args += ["--canary", f"s{canary}"] if canary is not None else []
        args += ["--json"] if as_json else []
        what = f"seed {seed} step {step}: {' '.join(args)} at {levels} fail={fail} locked={locked}"
        log.append(what)
        holder = None
        if locked is not None:
            holder = psycopg.connect(w.dsn(locked))
            holder.execute("LOCK TABLE fuzz_marker IN ACCESS EXCLUSIVE MODE")
        try:
            r = w.cli(*args)
        finally:
            if holder is not None:
                holder.rollback()
                holder.close()
        out = r.stdout + r.stderr
        if kind == "rel" and not agree:
            # Refused before any shard is touched.
            assert r.returncode == 2 and "different revisions" in r.stderr, (what, out)
            _check_state(w, levels, rnd)
            continue
        if kind == "rel" and not 0 <= target <= 5:
            # Alembic cannot count that far on any shard: every shard fails, untouched.
            expect_after, expect_ok = list(levels), [False] * 3
        else:
            expect_after, expect_ok = _expected(levels, verb, target, fail, [0, 1, 2], canary)
        revs = _check_state(w, expect_after, rnd)
        all_ok = all(expect_ok)
        assert r.returncode == (0 if all_ok else 1), (what, out)
        if as_json:
            rep = json.loads(r.stdout)
            assert rep["ok"] is all_ok and ("error" in rep) is (not all_ok), (what, rep)
            by = {s["shard"]: s for s in rep["shards"]}
            assert sorted(by) == ["s0", "s1", "s2"], (what, rep)
            for i in range(3):
                s = by[f"s{i}"]
                assert s["ok"] is expect_ok[i], (what, i, s)
                assert s["revision_before"] == _rev(levels[i]), (what, i, s)
                assert s["revision_after"] == revs[i], (what, i, s)
                assert (s["error"] is None) is expect_ok[i], (what, i, s)
        else:
            if all_ok:
                assert r.stdout.splitlines()[-1] == f"{verb} {arg}: all 3 shards ok", (what, out)
            for i in range(3):
                # A shard that ran prints "sN: ok in ..." or "sN: FAILED in ...".
                ran = [ln for ln in r.stdout.splitlines() if re.match(rf"s{i}: (ok|FAILED) in ", ln)]
                if expect_ok[i]:
                    assert len(ran) == 1 and ran[0].startswith(f"s{i}: ok"), (what, out)
                else:
                    assert not any(ln.startswith(f"s{i}: ok") for ln in ran), (what, out)
            if not all_ok:
                m = re.search(r"Shards now: (.*?)(?:$|\n)", r.stderr)
                assert m, (what, out)
                states = dict(p.split(" at ", 1) for p in m.group(1).rstrip(".").split(", "))
                assert states == {f"s{i}": revs[i] or "base" for i in range(3)}, (what, out)
                failed = [f"s{i}" for i in range(3) if not expect_ok[i]]
                named = re.search(r"failed on (?:canary shard )?([\w, ]+?):", r.stderr)
                assert named and set(named.group(1).split(", ")) <= set(failed), (what, out)
        levels = expect_after
    for i in range(3):
        w.sql(i, "DELETE FROM fuzz_marker")
    r = w.cli("migrate", "upgrade", "head", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], (log, r.stdout + r.stderr)
    assert _check_state(w, [5, 5, 5]) == ["r5"] * 3
    if seed:
        return   # (what follows starts from r5 on every shard whatever the seed: one seed runs it)
    # Drift in the revision alone (r5 changes no schema): one shard's downgrade to r4 fails.
    stuck = rnd.randrange(3)
    w.sql(stuck, "INSERT INTO fuzz_marker VALUES ('r5', 'down')")
    r = w.cli("migrate", "downgrade", "r4", "--json")
    assert r.returncode == 1 and [s["ok"] for s in json.loads(r.stdout)["shards"]] == [
        i != stuck for i in range(3)], r.stdout
    _check_state(w, [5 if i == stuck else 4 for i in range(3)])
    w.sql(stuck, "DELETE FROM fuzz_marker")
    assert w.cli("migrate", "upgrade", "head").returncode == 0
    _check_state(w, [5, 5, 5])
