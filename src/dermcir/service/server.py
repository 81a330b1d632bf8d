"""Running the app with uvicorn on a socket bound first, so the real address can be printed (or used by tests) before
requests arrive, and port 0 picks a free port. On a loopback address only loopback host names are answered."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

import uvicorn
from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp

log = logging.getLogger(__name__)


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket; ``port=0`` picks a free one. Raises ``OSError`` if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(host: str, bound: str | None = None, extra: Sequence[str] = ()) -> list[str] | None:
    """The ``Host`` header names answered by a server asked to listen on ``host`` and bound to the address ``bound``
    (default: ``host``); ``None`` means any.

    A service can be reached from a web page the user visits, by DNS rebinding: the page's own name is made to point
    at the service's address. Its requests then carry that name in ``Host``, and are refused.

    - On a loopback address: the loopback names, ``host`` itself (e.g. a name that /etc/hosts maps to 127.0.1.1)
      and ``extra`` (a reverse proxy that passes its clients' ``Host`` on) are answered.
    - On any other address the names clients use cannot be known here: with ``extra`` (``--allowed-host``) only
      those names and the address listened on are answered (for a wildcard address, 0.0.0.0 or ``::``, which
      listens on loopback too: that address and the loopback names); without it, any name.
    """
    address = bound or host
    if _is_loopback(address):
        return list(dict.fromkeys([*_LOOPBACK_NAMES, _as_host_name(host), *extra]))
    if not extra:
        return None
    if _is_wildcard(address):
        # every address of this machine, loopback included: its own names (`curl localhost`, a container's health
        # check) and the address the start-up line prints, which a rebinding page cannot make its origin
        own = [*_LOOPBACK_NAMES, _as_host_name(address)]
    else:
        own = [_as_host_name(name) for name in (host, address) if name]
    return list(dict.fromkeys([*own, *extra]))


def _is_loopback(address: str) -> bool:
    try:
        return address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name, not an address: nothing known about where it listens
        return False


def _as_host_name(name: str) -> str:
    """How a ``Host`` header writes the name: an IPv6 address in brackets."""
    return f"[{name}]" if ":" in name else name


def _is_wildcard(name: str) -> bool:
    """Whether ``name`` is the address for "every address of this machine" (0.0.0.0, ::) or empty."""
    try:
        return not name or ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False


def _guarded(app: ASGIApp, host: str, sock: socket.socket, extra: Sequence[str]) -> ASGIApp:
    """``app`` behind the Host check that the address it is bound to calls for (decided from the socket, so that a
    name such as ``--host myhost`` that resolves to loopback is checked too)."""
    bound = sock.getsockname()[0]
    hosts = allowed_hosts(host, bound, extra)
    if not _is_loopback(bound):
        log.warning("listening on %s (%s): reachable from other machines, with no authentication", host, bound)
    if hosts is None:
        log.warning("any Host name is answered; --allowed-host NAME (repeatable) answers only the names clients use, "
                    "which stops DNS rebinding")
        return app
    return TrustedHostMiddleware(app, allowed_hosts=hosts)


def _limit_concurrency(max_connections: int | None) -> int | None:
    """uvicorn's ``limit_concurrency`` for at most ``max_connections`` open connections (None: no bound), a request
    beyond them answered 503 (plain text, from uvicorn). uvicorn counts the arriving connection itself, so its limit
    is one more (``1`` refused every request).

    Not a defence on its own: uvicorn also counts connections that have sent nothing yet, and has no timeout for a
    first request's headers, so a client holding that many idle connections shuts everyone else out. Hence no bound
    by default; a reverse proxy in front (nginx, Caddy) is the place to limit connections per client.
    """
    return None if max_connections is None else max_connections + 1


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, on_ready: Callable[[str], None] | None = None,
    allowed_host_names: Sequence[str] = (), max_connections: int | None = None,
) -> None:
    """Serve until interrupted; ``on_ready(url)`` is called once the socket is bound. ``allowed_host_names``: the
    ``Host`` names answered besides the address's own (see :func:`allowed_hosts`). ``max_connections``: see
    :func:`_limit_concurrency`."""
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(_guarded(app, host, sock, allowed_host_names), log_level="info",
                                           access_log=False, limit_concurrency=_limit_concurrency(max_connections)))
    if on_ready:
        on_ready(address(sock))
    server.run(sockets=[sock])


class BackgroundServer:
    """The app served from a thread (tests, notebooks): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 allowed_host_names: Sequence[str] = (), max_connections: int | None = None) -> None:
        self._sock = bind(host, port)
        self.url = address(self._sock)
        self._server = uvicorn.Server(uvicorn.Config(_guarded(app, host, self._sock, allowed_host_names),
                                                     log_level="warning", access_log=False,
                                                     limit_concurrency=_limit_concurrency(max_connections)))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
