"""Rows to text and back, for caches outside the process (Redis, Memcached).

aiocache's default serializers lose types (JSON) or execute what they read (pickle), so the
adapter stores its own tagged JSON: every value asyncpg returns for common column types —
timestamps, dates, intervals, numerics, UUIDs, bytea, inet/cidr, arrays and json/jsonb
decoded by a codec — comes back as the same Python value. A nested mapping is always wrapped
in a one-key tag object, so user data can never be mistaken for a tag.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

Row = dict[str, Any]

_FORMAT = 1


def _enc(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {"$m": {str(k): _enc(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    # datetime before date: a datetime is a date.
    if isinstance(value, dt.datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$d": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$t": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$td": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, Decimal):
        return {"$dec": str(value)}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return {"$ipi": str(value)}
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return {"$ipn": str(value)}
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return {"$ipa": str(value)}
    raise TypeError(
        f"cannot store a value of type {type(value).__name__} in a shared cache: "
        "cast the column to text or json in the query (warm_query= / lookup_query=), or use the in-memory cache"
    )


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$m": lambda v: {k: _dec(x) for k, x in v.items()},
    "$dt": dt.datetime.fromisoformat,
    "$d": dt.date.fromisoformat,
    "$t": dt.time.fromisoformat,
    "$td": lambda v: dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "$dec": Decimal,
    "$uuid": uuid.UUID,
    "$b": lambda v: base64.b64decode(v),
    "$ipi": ipaddress.ip_interface,
    "$ipn": ipaddress.ip_network,
    "$ipa": ipaddress.ip_address,
}


def _dec(value: Any) -> Any:
    if isinstance(value, list):
        return [_dec(v) for v in value]
    if isinstance(value, dict):
        ((tag, payload),) = value.items()
        return _DECODERS[tag](payload)
    return value


def encode(row: Row | None, expires_at: float) -> str:
    """An entry: the row (None for a cached absence) and its wall-clock expiry."""
    body = None if row is None else {k: _enc(v) for k, v in row.items()}
    return json.dumps([_FORMAT, expires_at, body], separators=(",", ":"))


def decode(text: str | bytes) -> tuple[Row | None, float]:
    fmt, expires_at, body = json.loads(text)
    if fmt != _FORMAT:
        raise ValueError(f"unknown cache entry format {fmt!r}")
    row = None if body is None else {k: _dec(v) for k, v in body.items()}
    return row, float(expires_at)
