"""A delaying TCP proxy on loopback (asyncio, in its own thread): what the services see as "Redis" in the chaos
runs, so that Redis can be slowed without touching it.

Every chunk read from either side is forwarded after `delay_ms` (set at any time with `set_delay`; order within
a connection is kept). `cut()` closes every open connection (what a killed upstream looks like to the clients
that have no reconnect of their own); new connections keep being accepted and are refused upstream when nothing
listens there (the client sees the connection closed)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field


@dataclass
class ProxyStats:
    """Connections accepted, connections whose upstream connect failed, bytes forwarded each way."""

    accepted: int = 0
    upstream_failures: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class DelayProxy:
    """Listen on `host:port` (0: a free port, see `.port` after `start`), forward to `upstream_host:upstream_port`."""

    upstream_port: int
    upstream_host: str = "127.0.0.1"
    host: str = "127.0.0.1"
    port: int = 0
    delay_ms: float = 0.0
    stats: ProxyStats = field(default_factory=ProxyStats)

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- control (any thread) -----------------------------------------------------------------------------------

    def start(self) -> DelayProxy:
        """Start listening (returns once the port is bound)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._accept, self.host, self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name=f"delay-proxy-{self.upstream_port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def set_delay(self, delay_ms: float) -> None:
        """Delay every forwarded chunk by `delay_ms` from now on (0: none)."""
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.delay_ms = float(delay_ms)

    def cut(self) -> None:
        """Close every open connection now."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._close_all)

    def stop(self) -> None:
        """Close the listener and every connection, end the thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            self._close_all()
            loop.call_later(0.05, loop.stop)

        loop.call_soon_threadsafe(shutdown)
        if self._thread is not None:
            self._thread.join(5)

    @property
    def open_connections(self) -> int:
        return len(self._writers) // 2

    # -- the event loop's side ----------------------------------------------------------------------------------

    def _close_all(self) -> None:
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            self.stats.upstream_failures += 1
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer, "bytes_up"), self._pipe(up_reader, writer, "bytes_down"))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        """Forward `reader` to `writer`, each chunk `delay_ms` after it was read (a queue keeps their order while
        later chunks are already being read, so a delay adds latency without capping throughput)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
                setattr(self.stats, counter, getattr(self.stats, counter) + len(chunk))

        sender = asyncio.create_task(send())
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((loop.time() + self.delay_ms / 1000, chunk))
                if not chunk:
                    break
            await sender
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            writer.close()
