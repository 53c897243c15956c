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
from collections.abc import Mapping
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
    started = time.monotonic()
    deadline = started + timeout
    try:
        status, text, error = _post(url, body, headers, deadline=deadline)
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
    return Answer(status=status, body=text, error=error, seconds=time.monotonic() - started)


def _post(
    url: str, body: bytes, headers: Mapping[str, str], *, deadline: float
) -> tuple[int, str, str | None]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    sock = _connect(host, port, deadline=deadline)
    # One timer bounds everything after the connect: closing the socket ends whatever
    # read or write is waiting (a receiver dripping its answer byte by byte included).
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, args=(sock,))
    watchdog.daemon = True
    watchdog.start()
    connection: http.client.HTTPConnection | None = None
    response: http.client.HTTPResponse | None = None
    try:
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            watchdog.args = (sock,)
        connection = http.client.HTTPConnection(host, port)
        connection.sock = sock  # already connected, to the address checked above
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request(
            "POST", target, body=body,
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json", **headers},
        )
        response = connection.getresponse()
        text = response.read(RESPONSE_BODY_MAX).decode("utf-8", errors="replace")
        error = None
        if 300 <= response.status < 400:
            location = (response.getheader("Location") or "")[:200]
            error = f"redirect to {location!r} not followed"
        elif not 200 <= response.status < 300:
            error = f"HTTP {response.status}"
        return response.status, text, error
    finally:
        watchdog.cancel()
        # The answer holds its own reference to the socket: close both, or the
        # connection stays open until the garbage collector finds it.
        for closable in (response, connection, sock):
            if closable is not None:
                with contextlib.suppress(OSError):
                    closable.close()


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
