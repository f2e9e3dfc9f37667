"""Small networking helpers shared by the worker group's rendezvous, the tests and the benchmarks."""

from __future__ import annotations

import random
import socket

__all__ = ["find_free_port"]

# Ports handed out here: above Ray's worker ports (10002-19999 by default) and below both Serve's
# direct-ingress ports (30000-31000) and the kernel's ephemeral range (Linux: 32768-60999), from which
# every bind to port 0 and every outgoing connection takes its port. A port from the ephemeral range
# can be taken by any of the many sockets a starting Ray cluster opens in the seconds between being
# found free and being bound (seen: HAProxy failing to bind the service's port).
PORT_RANGE = (20000, 30000)


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port in `PORT_RANGE` that is free on ``host`` right now (bound once, then released)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:  # in use: another
                continue
            return port
    raise RuntimeError(f"no free TCP port on {host} in {PORT_RANGE[0]}..{PORT_RANGE[1] - 1}")
