"""asgi-warmup: warm an ASGI app's cache from PostgreSQL at startup, without blocking it."""

from __future__ import annotations

from ._dataset import DatasetStatus, PostgresDataset
from ._errors import ConfigError, LookupFailedError, NotStartedError, WarmupError
from ._middleware import WarmupMiddleware
from ._warmup import WarmupStatus

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DatasetStatus",
    "LookupFailedError",
    "NotStartedError",
    "PostgresDataset",
    "WarmupError",
    "WarmupMiddleware",
    "WarmupStatus",
    "__version__",
]
