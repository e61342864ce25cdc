"""``curate review --serve``: one review server per run folder, on a socket bound here.

The server holds ``RUN/review/.server.lock`` for its whole life, so a second server on the
same run is refused with the first one's pid and address (two pages deciding on one queue
would undo each other's work); decisions themselves take the run lock for each write only,
so ``curate review --sample`` and stages can still run between keystrokes. Bound to loopback
by default; bound anywhere else, the URL carries a random token that every request must show.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from curate.core.errors import CurateError
from curate.core.folder import RunFolder, exclusive_file_lock
from curate.review.app import LOOPBACK_HOSTS, create_app
from curate.review.data import ReviewData


class ReviewServerBusy(CurateError):
    """Another review server works on this run folder, or the address is taken."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_lock_path(run: RunFolder) -> Path:
    return run.path / "review" / ".server.lock"


@contextmanager
def server_lock(run: RunFolder) -> Iterator[int]:
    """Hold the run's review-server lock (a second holder gets ReviewServerBusy)."""

    def busy(holder: str) -> ReviewServerBusy:
        return ReviewServerBusy(
            f"a review server already works on {run.path} ({holder}): open that one, or "
            "stop it first"
        )

    with exclusive_file_lock(server_lock_path(run), busy) as fd:
        yield fd


@dataclass
class Server:
    """A bound review server: ``url`` to open, ``run()`` to serve until stopped."""

    data: ReviewData
    url: str
    sock: socket.socket
    app: object
    _uvicorn: object = field(default=None, repr=False)

    def _server(self):
        import uvicorn

        if self._uvicorn is None:
            config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
            self._uvicorn = uvicorn.Server(config)
        return self._uvicorn

    def run(self) -> None:
        """Serve until Ctrl-C (or ``stop``)."""
        self._server().run(sockets=[self.sock])

    def start_thread(self) -> threading.Thread:
        """Serve in a background thread (tests); returns once the server accepts requests."""
        server = self._server()
        thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            threading.Event().wait(0.02)
        return thread

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True


@contextmanager
def open_server(
    run: RunFolder, host: str = "127.0.0.1", port: int = 8765, lock_wait_s: float = 2.0
) -> Iterator[Server]:
    """Lock the run for review, read it, bind ``host:port`` (0: a free port) and build the app.

    Loopback: no token, and only loopback Host names are accepted (a page elsewhere cannot
    reach the app through DNS rebinding). Elsewhere: a random token in the URL."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:  # pragma: no cover - both are dependencies of curate
        raise CurateError(f"curate review --serve needs starlette and uvicorn: {e}") from None
    with server_lock(run) as fd:
        data = ReviewData(run)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ReviewServerBusy(
                f"cannot listen on {host}:{port} ({e.strerror}): pick another with --port"
            ) from None
        sock.listen(128)
        port = sock.getsockname()[1]
        loopback = is_loopback(host)
        token = None if loopback else secrets.token_urlsafe(24)
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
        os.pwrite(fd, f"pid {os.getpid()}: http://{shown}:{port}/".encode(), 0)
        app = create_app(
            data,
            token=token,
            hosts=LOOPBACK_HOSTS if loopback else None,
            lock_wait_s=lock_wait_s,
        )
        try:
            yield Server(data, url, sock, app)
        finally:
            sock.close()
