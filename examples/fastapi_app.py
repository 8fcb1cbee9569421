"""Quickstart: a FastAPI app whose user lookups read through a cache warmed from PostgreSQL.

Given this table, serve it with uvicorn:

    CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, last_seen timestamptz);
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test uvicorn examples.fastapi_app:app
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException

from asgi_warmup import PostgresDataset, WarmupMiddleware

# At startup the most recently seen users (10 000, or ASGI_WARMUP_LIMIT) load in the background.
users = PostgresDataset("users", table="users", key="id", columns=["id", "name", "email"], order_by="last_seen DESC")


async def get_user(user_id: int) -> dict[str, Any]:
    user = await users.get(user_id)  # the row as a dict, or None
    if user is None:
        raise HTTPException(status_code=404, detail="user not found")
    return user


app = FastAPI()
# add_middleware puts it outside FastAPI's router, where it sees the lifespan. No dsn=: it reads DATABASE_URL.
app.add_middleware(WarmupMiddleware, datasets=[users], status_path="/_warmup")


@app.get("/users/{user_id}")
async def read_user(user: Annotated[dict[str, Any], Depends(get_user)]) -> dict[str, Any]:
    return user
