"""Loopback helpers shared by the tests that start servers or Ray nodes."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nothing listens on now: bound, then closed.

    Servers started with it may still race another process for it; the tests that use it start
    their server at once. Fixed defaults (Ray's dashboard on 8265) collide with other Ray
    instances on a shared CI machine, so every port a test opens comes from here.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
