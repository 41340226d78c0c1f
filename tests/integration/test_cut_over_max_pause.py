"""The cut-over's --max-pause bound: the writes of a batch's
buckets are paused for at most max_pause (plus a few ms), whichever of the cut-over's
statements is slow.

statement_timeout and lock_timeout bound each statement on its own; the README says each
statement of the cut-over runs under "what is left" of max_pause, so a slow statement that
comes after another slow one must get only what the first left, not a whole max_pause anew.

One module-scoped dev cluster (2 shards, 8 buckets, no replicas); each test makes fresh
databases of its own.  Moves drain s0 onto s1, in-process.
"""

from __future__ import annotations

import threading
import time

import pytest
from test_move_fidelity import World
from test_moves_dba_settings import assert_drained, before_cut_over, drain, fill
from test_moves_dba_settings import dev, world  # noqa: F401 - the same fixtures

from shardkit import rebalance

pytestmark = pytest.mark.integration


def _slow_once_on_the_target(w: World, delete_s: float, insert_s: float) -> None:
    """On the target (s1), the first DELETE and the first INSERT statement on accounts that
    run under a statement_timeout (only the cut-over's do: the mover's other sessions set it
    to 0) are slow: a slow server, say.  Sequences, not rows: a cut-over that gives up rolls
    back, and must not get them slow again.  (Made right before the cut-over: the mover
    rightly refuses to begin a move with such a trigger; it stands for a slow server.)"""
    w.sql("s1", f"""
        CREATE SEQUENCE slow_delete; CREATE SEQUENCE slow_insert;
        CREATE FUNCTION slow_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('statement_timeout') <> '0' THEN
                IF TG_OP = 'DELETE' THEN
                    IF nextval('slow_delete') = 1 THEN PERFORM pg_sleep({delete_s}); END IF;
                ELSIF nextval('slow_insert') = 1 THEN
                    PERFORM pg_sleep({insert_s});
                END IF;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER slow_once BEFORE INSERT OR DELETE ON accounts
            FOR EACH STATEMENT EXECUTE FUNCTION slow_once();
        ALTER TABLE accounts ENABLE ALWAYS TRIGGER slow_once;
    """)


def test_two_slow_statements_in_one_cut_over_do_not_pause_writes_for_twice_max_pause(world):
    """The cut-over must apply a change logged after the catch-up.  On the target, its DELETE
    takes 0.6 s and its INSERT would take 3 s.  With max_pause 1 s, the INSERT may run for
    what the DELETE left (0.4 s): the cut-over gives up about 1 s after it began, not 1.6 s
    (a statement_timeout of what was left when the target's transaction began, 1 s, for
    the INSERT alone).  A writer of a moving bucket that came during the pause waits no
    longer than that; the move then finishes with every write."""
    w = world()
    moving = fill(w)
    mover = rebalance.Mover(w.cluster, grace=0, max_pause=1.0, progress=lambda line: None)
    waited: list[float] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            time.sleep(0.15)
            with w.conn("s0") as c:
                t0 = time.monotonic()
                c.execute("UPDATE accounts SET name = 'during' WHERE tenant = %s", (moving[0],))
                c.commit()
                waited.append(time.monotonic() - t0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads: list[threading.Thread] = []

    def hook() -> None:
        # A change the cut-over must apply on the target (logged after the catch-up).
        w.sql("s0", "UPDATE accounts SET name = 'before-switch' WHERE tenant = %s", (moving[1],))
        _slow_once_on_the_target(w, 0.6, 3.0)
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        threads.append(t)

    before_cut_over(mover, hook)
    drain(w, mover)
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert w.sql("s1", "SELECT last_value FROM slow_insert")[0][0] >= 1, "the slow INSERT never ran"
    # One cut-over gave up (the slow statements ran once), the next one switched.
    assert mover.longest_pause < 1.0 + 0.3, (
        f"the writes of the moving buckets were paused {mover.longest_pause:.2f} s with max_pause 1 s")
    assert waited and waited[0] < 1.0 + 0.3, waited
    w.sql("s1", "DROP TRIGGER slow_once ON accounts")
    assert_drained(w, 40, {moving[0]: "during", moving[1]: "before-switch"})
