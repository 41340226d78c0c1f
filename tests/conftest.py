import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import module_seconds  # noqa: E402


def pytest_collection_modifyitems(session, config, items):
    """The slowest modules first (module_seconds.py says why); a module's own tests keep their order."""
    seconds = module_seconds.load()
    module = {id(item): item.nodeid.split("::", 1)[0] for item in items}
    items.sort(key=lambda item: -seconds.get(module[id(item)], 0.0))
