"""Running the reference entitlement service: uvicorn with an HTTP protocol that can drop a connection.

ASGI has no way for an app to close its client's connection without an
answer, and uvicorn writes the status line as soon as a response starts. So
the service runs uvicorn's httptools protocol with one addition: every request
scope carries the extension :data:`~issuer_service.app.DROP_EXTENSION`,
an awaitable ``drop()`` that aborts the TCP connection (the client sees it
closed with no response) and returns once the server has noticed. No proxy
hop is needed, so the fault costs nothing when it is off.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from issuer_service.app import DROP_EXTENSION
from issuer_service.errors import ConfigError

GRACEFUL_SHUTDOWN_S = 5  # requests still running (an injected hang) are cancelled after this
KEEP_ALIVE_S = 30
LISTEN_BACKLOG = 256
DROP_WAIT_S = 5.0


class DroppableHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the ASGI extension that closes the connection without an answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._closed: asyncio.Future[None] | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {DROP_EXTENSION: {"drop": self._drop}}

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    async def _drop(self) -> None:
        """Abort the connection (no response at all) and wait until the protocol has seen it go."""
        if self.transport.is_closing():
            return
        self._closed = self.loop.create_future()
        self.transport.abort()
        await asyncio.wait_for(self._closed, DROP_WAIT_S)  # connection_lost is called soon after abort()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port); ConfigError when it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} cannot be resolved ({exc.strerror})") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}); is another service using the port?"
        ) from None
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def build_server(app: Any, *, log_config: dict[str, Any] | None = None, access_log: bool = True) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the droppable protocol (run it with ``server.run(sockets=[bind(...)])``)."""
    config = uvicorn.Config(
        app,
        http=DroppableHttpToolsProtocol,
        loop="auto",  # uvloop when installed
        lifespan="off",
        ws="none",
        log_config=log_config,
        access_log=access_log,
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
    )
    return uvicorn.Server(config)
