"""Quickstart: a Starlette app whose user lookups read through a cache warmed from PostgreSQL.

Given this table, serve it with uvicorn:

    CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, last_seen timestamptz);
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test uvicorn examples.starlette_app:app
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_warmup import PostgresDataset, WarmupMiddleware

# At startup the most recently seen users (10 000, or ASGI_WARMUP_LIMIT) load in the background.
users = PostgresDataset("users", table="users", key="id", columns=["id", "name", "email"], order_by="last_seen DESC")


async def get_user(request: Request) -> JSONResponse:
    user = await users.get(request.path_params["user_id"])  # the row as a dict, or None
    if user is None:
        return JSONResponse({"detail": "user not found"}, status_code=404)
    return JSONResponse(user)


# Wrap the outermost app: the middleware needs the lifespan, and mounted sub-apps never see it.
app = WarmupMiddleware(
    Starlette(routes=[Route("/users/{user_id:int}", get_user)]),
    datasets=[users],  # no dsn=: DATABASE_URL, read at startup
    status_path="/_warmup",
)
