"""The HTTP client that sends refund events to subscribers' endpoints (an adapter).

What a webhook sender owes the network it runs in:
- the address is checked when connecting, after the name is resolved, and the
  connection goes to that checked address (a name that resolves elsewhere on the next
  lookup cannot slip past): no link-local or cloud metadata address, ever;
- redirects are never followed (a 3xx is a failed attempt that says where it pointed);
- the whole attempt (connect, TLS, request, answer) is bounded by one timeout;
- only the first ``RESPONSE_BODY_MAX`` bytes of an answer are read.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from shared.domain.outbound_events import RESPONSE_BODY_MAX, forbidden_address

USER_AGENT = "refund-service-webhooks/1"


@dataclass(frozen=True)
class Answer:
    """What one attempt got: an HTTP status and the start of the body, or an error."""

    status: int | None
    body: str | None
    error: str | None
    seconds: float

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class RefusedAddress(Exception):
    pass


def post(url: str, body: bytes, headers: Mapping[str, str], *, timeout: float) -> Answer:
    """One request on a connection of its own."""
    with Sender(url) as sender:
        return sender.post(body, headers, timeout=timeout)


class Sender:
    """Requests to one endpoint's URL over one keep-alive connection (a delivery task's
    batch): the connect, its address check and TLS are paid once, not per event. Each
    request is still bounded by its own ``timeout``; after any error the connection is
    dropped and the next request opens a new one."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or ""
        self._secure = parts.scheme == "https"
        self._port = parts.port or (443 if self._secure else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._connection: http.client.HTTPConnection | None = None

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(OSError):
                self._connection.close()
            self._connection = None

    def post(self, body: bytes, headers: Mapping[str, str], *, timeout: float) -> Answer:
        started = time.monotonic()
        deadline = started + timeout
        try:
            status, text, error = self._post_once(body, headers, deadline=deadline)
        except RefusedAddress as exc:
            status, text, error = None, None, str(exc)
        except TimeoutError:
            status, text, error = None, None, f"no answer within {timeout:g}s"
        except ssl.SSLError as exc:
            status, text, error = None, None, f"TLS error: {exc.reason or exc}"
        except socket.gaierror as exc:
            status, text, error = None, None, f"cannot resolve the host: {exc.strerror or exc}"
        except ConnectionRefusedError:
            status, text, error = None, None, "connection refused"
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline:
                status, text, error = None, None, f"no answer within {timeout:g}s"
            else:
                status, text, error = None, None, f"{type(exc).__name__}: {exc}"[:300]
        if error is not None and status is None:
            self.close()
        return Answer(status=status, body=text, error=error, seconds=time.monotonic() - started)

    def _post_once(
        self, body: bytes, headers: Mapping[str, str], *, deadline: float
    ) -> tuple[int, str, str | None]:
        if self._connection is not None and self._connection.sock is not None:
            try:
                return self._exchange(self._connection, body, headers, deadline=deadline)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The receiver closed the idle connection as the request went out (its
                # keep-alive ran out): nothing was answered, so send it on a new one.
                self.close()
        self.close()
        self._connection = self._open(deadline=deadline)
        return self._exchange(self._connection, body, headers, deadline=deadline)

    def _open(self, *, deadline: float) -> http.client.HTTPConnection:
        sock = _connect(self._host, self._port, deadline=deadline)
        if self._secure:
            with _watchdog(sock, deadline):
                sock = ssl.create_default_context().wrap_socket(
                    sock, server_hostname=self._host)
        connection = http.client.HTTPConnection(self._host, self._port)
        connection.sock = sock  # already connected, to the address checked above
        return connection

    def _exchange(
        self, connection: http.client.HTTPConnection, body: bytes,
        headers: Mapping[str, str], *, deadline: float,
    ) -> tuple[int, str, str | None]:
        sock = connection.sock
        assert sock is not None
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        with _watchdog(sock, deadline):
            connection.request(
                "POST", self._target, body=body,
                headers={"User-Agent": USER_AGENT, "Content-Type": "application/json",
                         **headers},
            )
            response = connection.getresponse()
            text = response.read(RESPONSE_BODY_MAX).decode("utf-8", errors="replace")
            if not response.isclosed():
                # An answer longer than what is kept: the rest would be read as the
                # next answer, so this connection ends here.
                response.close()
                self.close()
        error = None
        if 300 <= response.status < 400:
            location = (response.getheader("Location") or "")[:200]
            error = f"redirect to {location!r} not followed"
        elif not 200 <= response.status < 300:
            error = f"HTTP {response.status}"
        return response.status, text, error


class _Watchdog:
    """Bounds each armed block by its deadline: closing the socket then ends whatever read
    or write is waiting (a receiver dripping its answer byte by byte included). One
    thread for the process, looking every ``TICK`` seconds, instead of a timer thread per
    request: starting a thread cost a request more than the rest of its sending
    (make bench). A socket timeout set to what is left bounds the common cases exactly;
    this bounds the rest within a tick."""

    TICK = 0.05

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, socket.socket]] = {}
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def bound(self, sock: socket.socket, deadline: float) -> Iterator[None]:
        key = id(sock)
        with self._lock:
            self._armed[key] = (deadline, sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="webhook-watchdog",
                                                daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._armed.pop(key, None)

    def _watch(self) -> None:
        while True:
            time.sleep(self.TICK)
            now = time.monotonic()
            with self._lock:
                late = [key for key, (deadline, _) in self._armed.items() if deadline <= now]
                socks = [self._armed.pop(key)[1] for key in late]
            for sock in socks:
                _shut(sock)


_watchdog = _Watchdog().bound


#: Name lookups run here, so that one the resolver never answers costs an attempt its
#: timeout, not a worker thread for as long as the resolver takes.
_resolvers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-dns")


def _resolve(host: str, port: int, *, deadline: float) -> list[Any]:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:  # an address: nothing to look up
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    lookup = _resolvers.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return lookup.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        lookup.cancel()
        raise TimeoutError(f"no address for {host} in time") from None


def _connect(host: str, port: int, *, deadline: float) -> socket.socket:
    """A TCP connection to the first address of ``host`` that may be used."""
    infos = _resolve(host, port, deadline=deadline)
    addresses = [info for info in infos if not forbidden_address(str(info[4][0]))]
    if infos and not addresses:
        raise RefusedAddress(
            f"refused: {host} resolves to a link-local or cloud metadata address"
        )
    last: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        # http.client writes the headers and the body apart: without this, on a kept-alive
        # connection the body waits for the receiver's delayed ACK of the headers (40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last or OSError(f"no address for {host}")


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
