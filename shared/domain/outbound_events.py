"""Refund events out (SPEC 13), the rules with no I/O: event types, the event body,
endpoint secrets and which URLs an endpoint may have.

An event is made by the database (the outbox trigger of migration 0014) from a status
change; this module turns the stored row into the body subscribers receive.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import socket
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from shared.domain.models import RefundStatus

ALL_EVENTS = "*"
CREATED = "refund.created"
SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks prefix, not a secret
SECRET_BYTES = 32
URL_MAX = 2048
DESCRIPTION_MAX = 500
#: Cut of a receiver's answer kept with each attempt.
RESPONSE_BODY_MAX = 1024

#: Where no endpoint may point, anywhere: link-local addresses, which include the cloud
#: metadata services (169.254.169.254, fd00:ec2::254 on AWS' IPv6).
FORBIDDEN_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
)
#: Names of metadata services that resolve to such addresses inside a cloud.
FORBIDDEN_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
     "instance-data.ec2.internal"}
)


def event_type_for(status: str) -> str:
    return f"refund.{status}"


def event_types() -> list[str]:
    """Every type an endpoint may subscribe to: ``refund.created`` and one per status."""
    return [CREATED, *(event_type_for(status) for status in RefundStatus)]


def new_secret() -> str:
    """``whsec_`` + base64 of random bytes: the Standard Webhooks secret format."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def subscribes(events: Iterable[str], event_type: str) -> bool:
    chosen = set(events)
    return ALL_EVENTS in chosen or event_type in chosen


class UnsafeUrl(ValueError):
    """A URL an endpoint may not have; the message says why, for the field ``url``."""


def forbidden_address(address: str) -> bool:
    """True for an address no delivery may connect to."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in FORBIDDEN_NETWORKS)


def literal_address(host: str) -> str | None:
    """The IP address a host names by itself, in any spelling a resolver accepts
    (``169.254.169.254``, ``2852039166``, ``0xa9fea9fe``, ``[fe80::1]``), else None."""
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return None


def check_endpoint_url(url: str, *, production: bool) -> str:
    """The URL as given, if an endpoint may have it; else ``UnsafeUrl`` saying why."""
    if len(url) > URL_MAX:
        raise UnsafeUrl(f"must be at most {URL_MAX} characters")
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise UnsafeUrl("must be an absolute URL of printable ASCII without spaces")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise UnsafeUrl("is not a valid URL") from exc
    schemes = ("https",) if production else ("https", "http")
    if parts.scheme not in schemes:
        raise UnsafeUrl("must start with https://" if production
                        else "must start with https:// or http://")
    if not host:
        raise UnsafeUrl("must name a host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl("must not carry a user name or password; the signature authenticates")
    if parts.fragment:
        raise UnsafeUrl("must not have a #fragment")
    address = literal_address(host)
    if address is not None and forbidden_address(address):
        raise UnsafeUrl("must not point at a link-local or cloud metadata address")
    if host.rstrip(".").lower() in FORBIDDEN_HOSTS:
        raise UnsafeUrl("must not point at a cloud metadata service")
    return url


def refund_shape(row: Mapping[str, Any]) -> dict[str, Any]:
    """The GET shape of a refund (without ``events``) from the row the trigger copied."""
    return {
        "refund_id": row["id"],
        "payment_id": row["payment_id"],
        "charge_id": row.get("charge_id"),
        "amount_cents": row["amount"],
        "status": row["status"],
        "stripe_refund_id": row.get("stripe_refund_id") or "",
        "currency": row["currency"],
        "reason": row.get("reason"),
        "failure_reason": row.get("failure_reason"),
        "initiated_by": row["initiated_by"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "attempts": row.get("attempts", 0),
    }


def event_body(
    *,
    event_id: str,
    event_type: str,
    occurred_at: datetime,
    refund_row: Mapping[str, Any],
    previous_status: str | None,
    sequence: int,
) -> str:
    """The JSON text sent (and signed): the same for every attempt of an event."""
    body = {
        "id": event_id,
        "type": event_type,
        "timestamp": _iso(occurred_at),
        "data": {
            "refund": refund_shape(refund_row),
            "previous_status": previous_status,
            "sequence": sequence,
        },
    }
    return json.dumps(body, separators=(",", ":"))


def _iso(value: datetime | str) -> str:
    """RFC 3339 in UTC with a Z, as the API writes times."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
