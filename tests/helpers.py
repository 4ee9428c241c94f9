"""Helpers shared by the tests (pytest puts this folder on sys.path: `from helpers import ...`)."""

import socket


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on (servers in tests bind
    127.0.0.1 only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
