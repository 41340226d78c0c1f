"""How long the seeded fuzzers run.

Each fuzzer draws its cases from a fixed seed, so every run replays the same cases.
Its size (runs, statements, episodes, seconds) has a default that keeps the suite
short and an environment variable of its own that sets it exactly;
``SHARDKIT_FUZZ_SCALE`` multiplies every default, for a deeper run going further
down each seed's sequence::

    SHARDKIT_FUZZ_SCALE=4 pytest tests/integration -k fuzz
"""

from __future__ import annotations

import os


def _scale() -> float:
    raw = os.environ.get("SHARDKIT_FUZZ_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = 0.0
    if not scale > 0:
        raise ValueError(f"SHARDKIT_FUZZ_SCALE={raw!r}: give a number above 0 (1 is the default size)")
    return scale


SCALE = _scale()


def fuzz_size(variable: str, default: int) -> int:
    """``$variable`` if it is set, else ``default`` times ``SHARDKIT_FUZZ_SCALE`` (at least 1)."""
    if variable in os.environ:
        return int(os.environ[variable])
    return max(1, round(default * SCALE))


def fuzz_seconds(variable: str, default: float) -> float:
    """``$variable`` (seconds) if it is set, else ``default`` times ``SHARDKIT_FUZZ_SCALE``."""
    if variable in os.environ:
        return float(os.environ[variable])
    return default * SCALE
