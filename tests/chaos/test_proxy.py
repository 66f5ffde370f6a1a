"""The delaying TCP proxy in front of a real Redis: transparent at 0 ms, adds its delay to every exchange, cuts
connections on demand, and closes a client's connection when nothing listens upstream."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from chaos.proxy import DelayProxy
from tests.support.procs import RedisServer


def command(sock: socket.socket, *args: str) -> bytes:
    """One RESP command; the raw reply line."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    sock.sendall(payload.encode())
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        reply += chunk
    return reply


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[DelayProxy]:
    p = DelayProxy(redis_server.port).start()
    yield p
    p.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_transparent_then_delayed(proxy: DelayProxy) -> None:
    with connect(proxy.port) as s:
        assert command(s, "SET", "chaos:k", "v1") == b"+OK\r\n"
        t0 = time.perf_counter()
        reply = command(s, "GET", "chaos:k")
        if reply == b"$2\r\n":  # the value came in a later segment
            reply += s.recv(16)
        assert reply == b"$2\r\nv1\r\n"
        fast = time.perf_counter() - t0
        proxy.set_delay(200)
        t0 = time.perf_counter()
        assert command(s, "PING") == b"+PONG\r\n"
        slow = time.perf_counter() - t0
    # both directions are delayed: a round trip takes at least twice the delay
    assert slow >= 0.39, slow
    assert fast < slow
    assert proxy.stats.accepted == 1 and proxy.stats.bytes_up > 0 and proxy.stats.bytes_down > 0
    with pytest.raises(ValueError, match="delay_ms"):
        proxy.set_delay(-1)


def test_cut_closes_open_connections_and_new_ones_work(proxy: DelayProxy) -> None:
    with connect(proxy.port) as s:
        assert command(s, "PING") == b"+PONG\r\n"
        proxy.cut()
        s.settimeout(5)
        with pytest.raises((ConnectionError, OSError)):
            for _ in range(3):  # the close may need a round trip to show
                command(s, "PING")
                time.sleep(0.1)
    with connect(proxy.port) as s2:
        assert command(s2, "PING") == b"+PONG\r\n"


def test_upstream_down_closes_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # nothing listens once the probe closes
    p = DelayProxy(dead_port).start()
    try:
        with connect(p.port) as s:
            s.settimeout(5)
            assert s.recv(16) == b""  # closed by the proxy, no answer
        assert p.stats.upstream_failures == 1
    finally:
        p.stop()
