"""A LiteLLM-style auth proxy: every request resolves its bearer key through a cache warmed from PostgreSQL.

LiteLLM stores sha256(key) and joins the key with its user and team on every request. After a
restart that cache is empty and the first wave of requests all go to the database. Here the most
active keys are warmed in the background while the proxy already serves, concurrent misses are
batched into a few queries, and unknown keys are cached as absences so they cannot hammer the database.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test uvicorn examples.litellm_proxy:app

``python examples/demo.py`` creates the tables, seeds them and fires a burst at a freshly started proxy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import time
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_warmup import LookupFailedError, PostgresDataset, WarmupMiddleware

Row = dict[str, Any]

MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4")

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS teams (
    team_id     text PRIMARY KEY,
    team_alias  text NOT NULL,
    max_budget  numeric,
    spend       numeric NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS users (
    user_id     text PRIMARY KEY,
    user_email  text,
    spend       numeric NOT NULL DEFAULT 0,
    max_budget  numeric,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS api_keys (
    token          text PRIMARY KEY,  -- sha256 hex of the bearer key, as LiteLLM stores it
    key_alias      text,
    user_id        text REFERENCES users,
    team_id        text REFERENCES teams,
    spend          numeric NOT NULL DEFAULT 0,
    expires        timestamptz,
    blocked        boolean NOT NULL DEFAULT false,
    last_used_at   timestamptz,
    request_count  bigint NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    metadata       jsonb NOT NULL DEFAULT '{}'
);
-- The warmup reads the most active keys first: with this index that is a short scan, not a sort.
CREATE INDEX IF NOT EXISTS api_keys_request_count ON api_keys (request_count DESC);
"""

# One row per key with its user and team, like LiteLLM's combined key view.
_KEY_VIEW = """
SELECT k.token, k.key_alias, k.user_id, k.team_id, k.spend, k.expires, k.blocked, k.metadata,
       u.user_email, u.spend AS user_spend, u.max_budget AS user_max_budget,
       t.team_alias, t.max_budget AS team_max_budget
FROM api_keys AS k
LEFT JOIN users AS u ON u.user_id = k.user_id
LEFT JOIN teams AS t ON t.team_id = k.team_id
"""
WARM_QUERY = _KEY_VIEW + "ORDER BY k.request_count DESC LIMIT $1"
LOOKUP_QUERY = _KEY_VIEW + "WHERE k.token = ANY($1)"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# -- the app -------------------------------------------------------------------------------


class AuthError(Exception):
    """Answered as a 401 in the error shape OpenAI clients expect."""


async def authenticate(request: Request) -> Row:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthError("No API key passed: send 'Authorization: Bearer sk-...'")
    row = await request.app.state.api_keys.get(hash_key(key))
    if row is None:
        raise AuthError("Invalid API key")
    if row["blocked"]:
        raise AuthError("API key is blocked")
    if row["expires"] is not None and row["expires"] <= dt.datetime.now(dt.timezone.utc):
        raise AuthError(f"API key expired at {row['expires'].isoformat()}")
    return row


def _caller(row: Row) -> Row:
    return {k: row[k] for k in ("key_alias", "user_id", "user_email", "team_id", "team_alias")}


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": str(status)}}, status_code=status)


async def chat_completions(request: Request) -> JSONResponse:
    row = await authenticate(request)
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error(400, "The request body is not valid JSON", "invalid_request_error")
    model = body.get("model", MODELS[0]) if isinstance(body, dict) else MODELS[0]
    reply = f"Hello {row['user_email']}, from key {row['key_alias']} of {row['team_alias']}."
    return JSONResponse(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "caller": _caller(row),
        }
    )


async def list_models(request: Request) -> JSONResponse:
    row = await authenticate(request)
    data = [{"id": m, "object": "model", "owned_by": row["team_alias"]} for m in MODELS]
    return JSONResponse({"object": "list", "data": data, "caller": _caller(row)})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "healthy"})


async def auth_error(request: Request, exc: Exception) -> JSONResponse:
    return _error(401, f"Authentication Error: {exc}", "auth_error")


async def database_down(request: Request, exc: Exception) -> JSONResponse:
    # Not cached: the next request for this key asks the database again. The cause stays out of the answer.
    return _error(503, "Cannot check the API key right now: try again shortly", "service_unavailable")


async def client_gone(request: Request, exc: Exception) -> Response:
    # The client hung up before we read its body: nobody will read this, but do not log a traceback.
    return Response(status_code=499)


def create_app(
    *, dsn: str | None = None, pool_size: int = 10, cache: Any = None, **dataset_options: Any
) -> WarmupMiddleware:
    """The proxy, wrapped; ``dataset_options`` go to the api_keys PostgresDataset (limit=, ttl=, ...).

    Nothing connects here: the middleware opens its pool at lifespan startup (dsn None -> DATABASE_URL).
    """
    # One dataset per app: a dataset belongs to the one middleware that runs it.
    dataset_options.setdefault("warm_query", WARM_QUERY)
    dataset_options.setdefault("lookup_query", LOOKUP_QUERY)
    api_keys = PostgresDataset("api_keys", key="token", **dataset_options)
    inner = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={AuthError: auth_error, LookupFailedError: database_down, ClientDisconnect: client_gone},
    )
    inner.state.api_keys = api_keys
    return WarmupMiddleware(
        inner, datasets=[api_keys], dsn=dsn, pool_size=pool_size, cache=cache, status_path="/_warmup"
    )


app = create_app()


# -- schema and seed data ------------------------------------------------------------------


async def create_schema(conn: asyncpg.Connection) -> None:
    await conn.execute(SCHEMA_SQL)


async def seed(conn: asyncpg.Connection, n_keys: int, *, zipf_s: float = 1.0, seed: int = 0) -> list[str]:
    """Insert ``n_keys`` keys (and n/10 users, n/100 teams); return the bearer keys, most active first.

    The r-th most active key has ``request_count`` ~ 1/r**zipf_s, and activity is shuffled against
    creation order, so "most recent" and "most active" pick different keys (the seed PR's point).
    """
    rng = random.Random(seed)
    now = dt.datetime.now(dt.timezone.utc)
    n_teams, n_users = max(1, n_keys // 100), max(1, n_keys // 10)
    await conn.copy_records_to_table(
        "teams",
        columns=["team_id", "team_alias", "max_budget", "created_at"],
        records=[(f"team-{i}", f"Team {i}", Decimal(10_000), now) for i in range(n_teams)],
    )
    await conn.copy_records_to_table(
        "users",
        columns=["user_id", "user_email", "max_budget", "created_at"],
        records=[(f"user-{i}", f"user{i}@example.com", Decimal(500), now) for i in range(n_users)],
    )
    keys = [f"sk-{rng.getrandbits(128):032x}" for _ in range(n_keys)]
    ranks = list(range(1, n_keys + 1))
    rng.shuffle(ranks)
    first_created = now - dt.timedelta(minutes=n_keys)
    tiers = [json.dumps({"tier": tier}) for tier in ("free", "pro", "enterprise")]
    records = []
    for i, (key, rank) in enumerate(zip(keys, ranks, strict=True)):
        user = rng.randrange(n_users)
        # A tenth of the keys expire, but not before the demo is over.
        expires = now + dt.timedelta(days=rng.randint(30, 365)) if rng.random() < 0.1 else None
        records.append(
            (
                hash_key(key),
                f"key-{i}",
                f"user-{user}",
                f"team-{user % n_teams}",
                Decimal(rng.randrange(10_000)).scaleb(-2),
                expires,
                now - dt.timedelta(seconds=rank),
                round(1e9 / rank**zipf_s),
                first_created + dt.timedelta(minutes=i),
                tiers[i % 3],
            )
        )
    await conn.copy_records_to_table(
        "api_keys",
        columns="token key_alias user_id team_id spend expires last_used_at request_count created_at metadata".split(),
        records=records,
    )
    await conn.execute("ANALYZE teams, users, api_keys")
    by_activity = sorted(range(n_keys), key=ranks.__getitem__)
    return [keys[i] for i in by_activity]
