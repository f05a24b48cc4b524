"""Free local ports (standard library only, so the root-run image script can use it with the system Python)."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def cluster_ports(n: int) -> list[int]:
    """n ports whose cluster bus ports (port + 10000) are free too (a node dies if its bus port is unusable)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 40000)
        if port not in ports and port_is_free(port) and port_is_free(port + 10000):
            ports.append(port)
    return ports
