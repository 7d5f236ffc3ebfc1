"""Running the app with uvicorn on a socket fcclass binds itself (a port in use is a clear error, and ``--port 0``
picks a free one), the model loading while the server already answers /healthz and /readyz, and a graceful stop on
SIGTERM or Ctrl-C: no new connections, requests in flight answered, exit status 0."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
from typing import Any, Callable, Iterator

import uvicorn

from fcclass.errors import FcclassError
from fcclass.serve.model import Service


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port), or an FcclassError saying why not and what to do."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FcclassError(f"--host {host}: not an address or a name this machine can resolve ({e.strerror}). "
                           "Use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface).") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise FcclassError(f"Port {port} on {host} is already in use (another server is listening there). Stop it, or "
                               f"choose another port with --port (--port 0 picks a free one).") from None
        if e.errno == errno.EACCES:
            raise FcclassError(f"Not allowed to listen on port {port} of {host} (ports below 1024 need root). Choose a port "
                               "above 1024 with --port.") from None
        raise FcclassError(f"Cannot listen on {host}:{port}: {e.strerror}.") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def run(app: Any, service: Service, sock: socket.socket, ready: Callable[[Service], None], grace_s: float) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT; the model loads meanwhile (``ready`` is called when it is
    loaded, or failed to, in which case the server stops). Returns after in-flight requests are answered (at most
    ``grace_s`` seconds); raises the loading error if there was one."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=grace_s)
    server = _Server(config)

    def loaded(s: Service) -> None:
        if s.error is not None:
            server.should_exit = True
        if not server.should_exit:  # stopped while loading: not "ready" after all
            ready(s)

    service.start(loaded)
    try:
        server.run(sockets=[sock])
    finally:
        service.loaded.wait()  # stopped while loading: let that end, so that no thread is left printing as Python exits
        service.close()
        sock.close()
    if service.error is not None:
        raise service.error


class _Server(uvicorn.Server):
    """uvicorn's Server, except that a signal stops it and nothing more: uvicorn re-raises the signal after its
    graceful shutdown (so the process dies of it, exit status 143 or 130); fcclass exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop(sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
