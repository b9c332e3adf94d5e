"""A TCP proxy that can stop answering or drop its connections on demand: a hung or flapping server.

Tests put it in front of a real Redis to see the bot survive a store that hangs or goes away mid-job.
"""

from __future__ import annotations

import asyncio
import contextlib
from enum import StrEnum

CHUNK = 64 * 1024


class ProxyMode(StrEnum):
    FORWARD = "forward"  # pass bytes both ways
    HANG = "hang"  # accept and read, never answer: what a stuck server looks like from outside
    REFUSE = "refuse"  # close every connection, new ones at once: a server that went away


class TcpProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to `target`; `mode` can change at any time."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._mode = ProxyMode.FORWARD
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._resumed = asyncio.Event()
        self._resumed.set()

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    def set_mode(self, mode: ProxyMode) -> None:
        self._mode = mode
        if mode is ProxyMode.HANG:
            self._resumed.clear()
            return
        if mode is ProxyMode.REFUSE:
            for writer in list(self._writers):
                writer.close()
        self._resumed.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._mode is ProxyMode.REFUSE:
            client_writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers.update((client_writer, upstream_writer))
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer)
            )
        finally:
            for writer in (client_writer, upstream_writer):
                self._writers.discard(writer)
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                # While hanging, bytes are held here, so neither side hears anything until it resumes.
                await self._resumed.wait()
                if self._mode is ProxyMode.REFUSE:
                    break
                writer.write(data)
                await writer.drain()
        writer.close()
