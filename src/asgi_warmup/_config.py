"""Environment variables, read and validated at startup (never at import)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ._errors import BAD_ENV, ConfigError

DEFAULT_LIMIT = 10_000
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    limit: int
    enabled: bool


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    return Settings(
        database_url=env.get("DATABASE_URL") or None,
        limit=_int(env, "ASGI_WARMUP_LIMIT", DEFAULT_LIMIT),
        enabled=_bool(env, "ASGI_WARMUP_ENABLED", True),
    )


def _int(env: Mapping[str, str], var: str, default: int) -> int:
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        expected = f"expected a whole number >= 0 (default {default})"
        raise ConfigError(BAD_ENV.format(var=var, value=raw, expected=expected))
    return value


def _bool(env: Mapping[str, str], var: str, default: bool) -> bool:
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return default
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(BAD_ENV.format(var=var, value=raw, expected="expected one of 1/0, true/false, yes/no, on/off"))
