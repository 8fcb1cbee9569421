"""The one adapter over aiocache: full key strings, our own encoding, errors that fall through.

The in-process tier lives in the dataset (it is the hot path); this is the shared tier behind
it, used only when the user passes an aiocache cache. Only aiocache's stable instance methods
are used (``multi_get``, ``multi_set``, ``delete``), since aiocache 1.0 changes the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from typing import Any

from ._codec import Row, decode, encode

logger = logging.getLogger("asgi_warmup")

KEY_PREFIX = "asgi_warmup"
_ERROR_LOG_INTERVAL = 10.0


def _identity(value: Any) -> Any:
    return value


class SharedCache:
    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self._last_error_log = -_ERROR_LOG_INTERVAL

    @staticmethod
    def full_key(dataset: str, key: Hashable) -> str:
        # repr keeps 1 and "1" apart.
        return f"{KEY_PREFIX}:{dataset}:{key!r}"

    async def get_many(self, dataset: str, keys: Sequence[Hashable]) -> dict[Hashable, tuple[Row | None, float]]:
        """Fresh entries for the keys present: {key: (row or None for an absence, wall-clock expiry)}."""
        try:
            raw = await self.cache.multi_get([self.full_key(dataset, k) for k in keys], loads_fn=_identity)
        except Exception as exc:
            self._backend_error("read", exc)
            return {}
        found = {}
        now = time.time()
        for key, text in zip(keys, raw, strict=True):
            if text is None:
                continue
            try:
                row, expires_at = decode(text)
            except Exception as exc:  # written by something else, or an older format
                self._backend_error("decode", exc)
                continue
            if expires_at > now:
                found[key] = (row, expires_at)
        return found

    async def set_many(self, dataset: str, items: Sequence[tuple[Hashable, Row | None, float]], ttl: int) -> None:
        """One bulk write; ``ttl`` is the backend's upper bound, each entry carries its own expiry."""
        if not items:
            return
        try:
            pairs = [(self.full_key(dataset, k), encode(row, exp)) for k, row, exp in items]
            await self.cache.multi_set(pairs, ttl=ttl, dumps_fn=_identity)
        except Exception as exc:
            self._backend_error("write", exc)

    async def delete(self, dataset: str, key: Hashable) -> None:
        try:
            await self.cache.delete(self.full_key(dataset, key))
        except Exception as exc:
            self._backend_error("delete", exc)
            raise

    def _backend_error(self, op: str, exc: BaseException) -> None:
        # A cache outage must not flood the log at request rate.
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            logger.warning(
                "Cache backend %s failed (%s: %s); reading through to the database", op, type(exc).__name__, exc
            )
