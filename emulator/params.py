"""Stripe's form encoding: parsing nested parameters and validating them.

The SDK sends ``metadata[refund_id]=x``, ``expand[0]=latest_charge`` and
``payment_method_data[card][number]=...``; curl users send ``expand[]=x``.
``parse_form`` turns all of these into plain dicts and lists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from .errors import param_error

_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART_RE = re.compile(r"\[([^\[\]]*)\]")

_APPEND = object()  # marks ``[]``


def parse_form(raw: str) -> dict[str, Any]:
    """Parse an urlencoded body or query string into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        match = _KEY_RE.match(key)
        if match is None:
            raise param_error(f"Invalid parameter name: {key}", code="parameter_unknown", param=key)
        parts: list[Any] = [match.group(1)]
        parts.extend(p if p != "" else _APPEND for p in _PART_RE.findall(match.group(2)))
        _assign(root, parts, value, key)
    return _listify(root)


def _assign(node: dict[str, Any], parts: list[Any], value: str, key: str) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part is _APPEND:
            # ``a[]=x``: append, keyed by position so ``_listify`` makes a list.
            part = str(len(node))
        if last:
            if isinstance(node.get(part), dict):
                raise param_error(f"Invalid hash: {key}", param=key)
            node[part] = value
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            if child == "":
                # ``metadata=`` followed by ``metadata[x]=y``: the hash wins.
                child = node[part] = {}
            else:
                raise param_error(f"Invalid hash: {key}", param=key)
        node = child


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {k: _listify(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


class Params:
    """Typed access to one request's parameters, refusing unknown ones like Stripe."""

    def __init__(self, raw: dict[str, Any], allowed: Iterable[str]) -> None:
        self.raw = raw
        allowed_set = set(allowed) | {"expand"}
        for name in raw:
            if name not in allowed_set:
                raise param_error(
                    f"Received unknown parameter: {name}", code="parameter_unknown", param=name
                )

    def has(self, name: str) -> bool:
        return name in self.raw and self.raw[name] != ""

    def string(self, name: str, *, required: bool = False, max_length: int = 5000) -> str | None:
        value = self.raw.get(name)
        if value is None or value == "":
            if required:
                raise param_error(
                    f"Missing required param: {name}.", code="parameter_missing", param=name
                )
            return None
        if not isinstance(value, str):
            raise param_error(f"Invalid string: {value!r}", param=name)
        if len(value) > max_length:
            raise param_error(
                f"Invalid string: {value[:20]}...; must be at most {max_length} characters",
                param=name,
            )
        return value

    def integer(
        self, name: str, *, required: bool = False, minimum: int | None = None
    ) -> int | None:
        value = self.raw.get(name)
        if value is None or value == "":
            if required:
                raise param_error(
                    f"Missing required param: {name}.", code="parameter_missing", param=name
                )
            return None
        if not isinstance(value, str) or not re.fullmatch(r"-?\d+", value.strip()):
            raise param_error(
                f"Invalid integer: {value}", code="parameter_invalid_integer", param=name
            )
        number = int(value)
        if minimum is not None and number < minimum:
            word = "positive integer" if minimum == 1 else f"integer: must be at least {minimum}"
            raise param_error(f"Invalid {word}", code="parameter_invalid_integer", param=name)
        if number > 99_999_999_999:
            raise param_error(
                f"Invalid integer: {value}", code="parameter_invalid_integer", param=name
            )
        return number

    def boolean(self, name: str, *, default: bool = False) -> bool:
        value = self.raw.get(name)
        if value is None or value == "":
            return default
        if value in ("true", "false"):
            return value == "true"
        raise param_error(f"Invalid boolean: {value}", param=name)

    def enum(self, name: str, choices: list[str], *, default: str | None = None) -> str | None:
        value = self.string(name)
        if value is None:
            return default
        if value not in choices:
            if len(choices) > 1:
                listed = ", ".join(choices[:-1]) + ", or " + choices[-1]
            else:
                listed = choices[0]
            raise param_error(f"Invalid {name}: must be one of {listed}", param=name)
        return value

    def currency(self, name: str = "currency", *, required: bool = False) -> str | None:
        value = self.string(name, required=required)
        if value is None:
            return None
        if not re.fullmatch(r"[A-Za-z]{3}", value):
            raise param_error(
                f"Invalid currency: {value}. Stripe currently supports these currencies: usd, eur, "
                "...",
                param=name,
            )
        return value.lower()

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self.raw.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, dict):
            raise param_error(f"Invalid hash: {name}", param=name)
        return value

    def metadata(self, name: str = "metadata") -> dict[str, str] | None:
        """The metadata hash; ``{}`` when sent empty (which unsets all keys)."""
        if name not in self.raw:
            return None
        value = self.raw[name]
        if value == "":
            return {}
        if not isinstance(value, dict):
            raise param_error("Invalid hash", param=name)
        if len(value) > 50:
            raise param_error("Metadata can have at most 50 keys.", param=name)
        for key, item in value.items():
            if not isinstance(item, str):
                raise param_error(
                    f"Invalid value for metadata key {key}: must be a string",
                    param=f"{name}[{key}]",
                )
            if len(key) > 40:
                raise param_error(
                    f"Metadata keys can have up to 40 characters; {key!r} has {len(key)}",
                    param=f"{name}[{key}]",
                )
            if len(item) > 500:
                raise param_error(
                    "Metadata values can have up to 500 characters, but you passed in a value "
                    "that is "
                    f"{len(item)} characters. Invalid value: {item[:40]}...",
                    param=f"{name}[{key}]",
                )
        return dict(value)

    def expand(self) -> list[str]:
        value = self.raw.get("expand")
        if value is None or value == "":
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise param_error("Invalid array", param="expand")


def merge_metadata(current: dict[str, str], update: dict[str, str]) -> dict[str, str]:
    """Stripe's metadata update: ``{}`` clears, an empty value removes a key."""
    if not update:
        return {}
    merged = dict(current)
    for key, value in update.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged
