"""The ports ``ldm up`` gives SeaweedFS: free, distinct with their gRPC twins, and out
of the range the kernel draws outgoing connections' local ports from."""

from __future__ import annotations

import socket

from flows import local_stack
from flows.local_stack import _ephemeral_low, weed_ports


def test_seaweedfs_ports_and_their_twins_are_free_distinct_and_below_the_ephemeral_range():
    low = _ephemeral_low()
    for _ in range(20):
        ports = weed_ports(5)
        every = ports + [p + 10_000 for p in ports]
        assert len(set(every)) == 10
        assert max(every) < low  # an outgoing connection cannot take one before weed binds
        for port in every:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_chosen(monkeypatch):
    """The draw lands on a port another process listens on, then on a free one."""
    free = weed_ports(2)
    with socket.socket() as held:
        held.bind(("127.0.0.1", free[0]))
        held.listen()
        draws = iter([free[0], free[1]])

        class Draws:
            def randint(self, low, high):
                return next(draws)

        monkeypatch.setattr(local_stack.random, "SystemRandom", Draws)
        assert local_stack.weed_ports(1) == [free[1]]
