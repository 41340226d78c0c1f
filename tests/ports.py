"""Free loopback ports for tests that pick their own."""

from __future__ import annotations

import socket


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive loopback ports that are free now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        socks = []
        try:
            for port in range(first, first + n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")
