"""What each test module costs, so the slowest start first.

pytest-xdist (``--dist loadfile``) hands whole modules to its workers in the order
they were collected (``--no-loadscope-reorder`` in pyproject.toml keeps that order);
``conftest.py`` collects the modules in descending order of the seconds recorded in
``module_seconds.txt``, so that no long module starts last and keeps one worker busy
after the others have finished.  A module missing from the file counts as a short one.
The numbers only order the modules; a stale file makes the suite slower, never wrong.

Refresh the file from a full run's durations::

    pytest -p no:cacheprovider --durations=0 | python tests/module_seconds.py > tests/module_seconds.txt
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

FILE = Path(__file__).with_name("module_seconds.txt")
_LINE = re.compile(r"\s*([\d.]+)s (?:setup|call|teardown)\s+(\S+?\.py)::")


def load() -> dict[str, float]:
    """module path (as in node ids, e.g. ``tests/unit/test_x.py``) -> seconds."""
    try:
        text = FILE.read_text()
    except FileNotFoundError:
        return {}
    seconds = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            value, path = line.split()
            seconds[path] = float(value)
    return seconds


def main() -> None:
    total: Counter[str] = Counter()
    for line in sys.stdin:
        m = _LINE.match(line)
        if m:
            total[m.group(2)] += float(m.group(1))
    print("# seconds per test module (setup + call + teardown), from tests/module_seconds.py")
    for path, seconds in sorted(total.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{seconds:.1f} {path}")


if __name__ == "__main__":
    main()
