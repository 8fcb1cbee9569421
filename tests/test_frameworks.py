"""Any ASGI app: Starlette, FastAPI (wrapped or add_middleware), Litestar and raw ASGI, end to end over HTTP."""

# No `from __future__ import annotations`: FastAPI and Litestar read the handlers' annotations at runtime,
# and these handlers are defined inside functions.

import json
from collections.abc import Callable
from typing import Annotated

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, HTTPException
from litestar import Litestar, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_warmup import PostgresDataset, WarmupMiddleware
from helpers import wait_for

pytestmark = pytest.mark.anyio


def starlette_app(ds: PostgresDataset) -> ASGIApp:
    async def show(request: Request) -> JSONResponse:
        row = await ds.get(request.path_params["token"])
        if row is None:
            return JSONResponse({"detail": "unknown"}, status_code=404)
        return JSONResponse({"n": row["n"]})

    return WarmupMiddleware(Starlette(routes=[Route("/keys/{token}", show)]), datasets=[ds])


def _fastapi(ds: PostgresDataset) -> FastAPI:
    app = FastAPI()

    async def key_row(token: str) -> dict:
        row = await ds.get(token)
        if row is None:
            raise HTTPException(404, "unknown")
        return row

    @app.get("/keys/{token}")
    async def show(row: Annotated[dict, Depends(key_row)]) -> dict:
        return {"n": row["n"]}

    return app


def fastapi_wrapped(ds: PostgresDataset) -> ASGIApp:
    return WarmupMiddleware(_fastapi(ds), datasets=[ds])


def fastapi_add_middleware(ds: PostgresDataset) -> ASGIApp:
    app = _fastapi(ds)
    app.add_middleware(WarmupMiddleware, datasets=[ds])
    return app


def litestar_app(ds: PostgresDataset) -> ASGIApp:
    @get("/keys/{token:str}")
    async def show(token: FromPath[str]) -> dict:
        row = await ds.get(token)
        if row is None:
            raise NotFoundException("unknown")
        return {"n": row["n"]}

    return WarmupMiddleware(Litestar(route_handlers=[show]), datasets=[ds])


def raw_app(ds: PostgresDataset) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        row = await ds.get(scope["path"].rsplit("/", 1)[-1])
        status, body = (404, {"detail": "unknown"}) if row is None else (200, {"n": row["n"]})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    return WarmupMiddleware(app, datasets=[ds])


@pytest.mark.parametrize(
    "build", [starlette_app, fastapi_wrapped, fastapi_add_middleware, litestar_app, raw_app],
    ids=["starlette", "fastapi", "fastapi-add_middleware", "litestar", "raw-asgi"],
)
async def test_reads_through_the_cache_in_any_framework(table, build: Callable[[PostgresDataset], ASGIApp]) -> None:
    ds = table.dataset(limit=10)
    app = build(ds)
    async with LifespanManager(app):
        # Requests go to the app itself, not manager.app: asgi-lifespan hands every request the
        # same state dict instead of a copy, and Litestar keeps per-request state in it.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/keys/k3")).json() == {"n": 3}
            assert (await client.get("/keys/k150")).json() == {"n": 150}
            assert (await client.get("/keys/missing")).status_code == 404
            # Once warm, the ten hottest keys are answered without a query.
            await wait_for(lambda: ds.status()["state"] == "warm")
            before = ds.status()["queries"]
            assert [(await client.get(f"/keys/k{i}")).json()["n"] for i in range(1, 11)] == list(range(1, 11))
            assert ds.status()["queries"] == before
