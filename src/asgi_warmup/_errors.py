"""Exception types and the messages tests assert on."""

from __future__ import annotations

LIFESPAN_NEVER_RAN = (
    "dataset {name!r} is not started: the lifespan of the app wrapped by WarmupMiddleware never ran. "
    "Is the server started with --lifespan off, is the middleware on a mounted sub-app (mounted apps never "
    "see lifespan), or is the dataset used outside the app? Wrap the top-level app, serve it with lifespan on, "
    "or drive it with asgi_lifespan.LifespanManager in tests."
)
ALREADY_BOUND = (
    "dataset {name!r} is already started by another running WarmupMiddleware: "
    "give each app its own PostgresDataset objects."
)
BAD_ENV = "{var}={value!r} is not valid: {expected}. Fix or unset {var}."
BAD_DSN = (
    "cannot use the database URL ({source}): {cause}. "
    "Set DATABASE_URL (or dsn=) to a URL like postgresql://user:password@host:5432/dbname."
)
NO_DSN = (
    "no database to read from: set the DATABASE_URL environment variable, or pass dsn= or pool= to WarmupMiddleware."
)


class WarmupError(Exception):
    """Base class of every error asgi-warmup raises."""


class ConfigError(WarmupError, ValueError):
    """A bad argument, dataset definition or environment variable; raised before anything is served."""


class NotStartedError(WarmupError, RuntimeError):
    """A dataset was used while no lifespan of its middleware is running."""


class LookupFailedError(WarmupError):
    """Reading keys from the database failed; nothing was cached and the next call tries again.

    The database's own exception is the ``__cause__``.
    """

    def __init__(self, dataset: str, keys: int, cause: BaseException) -> None:
        self.dataset = dataset
        super().__init__(
            f"dataset {dataset!r}: database lookup of {keys} key(s) failed: {type(cause).__name__}: {cause}"
        )
