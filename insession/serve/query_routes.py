"""HTTP routes of the query interface: `POST /v1/query`, `GET /v1/features/{entity}/{key}`, `GET /metrics`.

Mount with `app.include_router(router)`. The routes read `app.state.insession` (the embedded handle,
whose `.query` is a `QueryService`), `app.state.auth` (an `Auth`; absent or empty: access control
off) and `app.state.metrics` (a `Metrics`, created on first use). Every query error is a 4xx with
`{"error", "code", "position"?}`; a full analytics queue answers 429 with `Retry-After`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from insession.features.engine import PartitionNotHeld
from insession.query import QueryError, QueryService
from insession.query.match import MAX_KEYS
from insession.query.sql import MAX_SQL_CHARS
from insession.schema import MAX_ID_LEN
from insession.serve.auth import SECURITY, authorize, require, roles_of
from insession.serve.forward import forwarder_of, here_or_there
from insession.serve.metrics import CONTENT_TYPE, metrics_of

router = APIRouter()


def _fallback_encoding(obj: Any) -> Any:
    """Values DuckDB can return that JSON has no type for (intervals, maps, ...) travel as text."""
    return str(obj)


_json = msgspec.json.Encoder(enc_hook=_fallback_encoding)


class QueryBody(msgspec.Struct, forbid_unknown_fields=True):
    """A SQL-friendly query with named parameters (`:name` in the SQL)."""

    sql: Annotated[
        str,
        msgspec.Meta(
            max_length=MAX_SQL_CHARS,
            examples=[
                "SELECT DISTINCT category FROM events WHERE user_id = :user AND ts > now() - INTERVAL 15 DAY "
                "ORDER BY ts DESC LIMIT 5"
            ],
        ),
    ]
    # Single values only: a nested value is refused while decoding (400 naming it), never recursed into.
    params: Annotated[dict[str, str | int | float | bool | None], msgspec.Meta(examples=[{"user": "u42"}])] = {}


_decode_body = msgspec.json.Decoder(QueryBody).decode
_QUERY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": msgspec.json.schema(QueryBody)["$defs"]["QueryBody"]}},
    }
}


class QueryAnswer(BaseModel):
    """The answer (documentation of the JSON the route writes with msgspec)."""

    lane: str = Field(description="serving (online feature state) or analytics (DuckDB over the history)")
    columns: list[str]
    rows: list[list[Any]]
    feature: str | None = Field(None, description="the declared feature that answered (serving lane)")
    fallbacks: dict[str, str] = Field(default_factory=dict, description="feature -> the fallback it used")
    truncated: bool = Field(False, description="a row or byte limit cut the answer short")
    elapsed_ms: float = 0.0


class ErrorAnswer(BaseModel):
    error: str
    code: str
    position: dict[str, int] | None = None
    retry_after_s: int | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorAnswer, "description": text}
    for status, text in (
        (400, "invalid SQL, unknown table or column, missing or mistyped parameter"),
        (401, "missing or unknown API key"),
        (403, "the key lacks the role"),
        (408, "the analytics query ran past its deadline"),
        (413, "the analytics query needs more memory than allowed"),
        (429, "the analytics queue is full; retry after Retry-After seconds"),
    )
}


def _service(request: Request) -> QueryService:
    return request.app.state.insession.query  # type: ignore[no-any-return]


def error_response(e: QueryError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
    return JSONResponse(e.to_dict(), status_code=e.status, headers=headers)


@router.post(
    "/v1/query",
    tags=["query"],
    responses={200: {"model": QueryAnswer}, **_ERRORS},
    openapi_extra={**_QUERY_BODY, **SECURITY},
)
async def post_query(request: Request) -> Response:
    """Run a query: a declared feature's shape is answered from online state (serving lane); any other
    SELECT over `events` and `items` runs on the analytics lane. `EXPLAIN <query>` says which and how.
    `CREATE FEATURE name AS SELECT ...` and `DROP FEATURE name` (admin role) declare and retire served
    features while the server runs; `SHOW FEATURES` and `DESCRIBE FEATURE name` list and describe them.

    The hot path of the serving lane: the body is decoded with msgspec and the key checked by
    `authorize`, without FastAPI's per-request model and dependency machinery."""
    principal = authorize(request, "serve", "analytics")
    metrics_of(request)
    gate = await here_or_there(request)
    if gate is not None:
        return gate
    try:
        try:
            body = _decode_body(await request.body())
        except msgspec.ValidationError as e:
            code = "bad_parameter" if "`$.params" in str(e) else "bad_request"
            raise QueryError(f"bad request body: {e}", code=code) from None
        except msgspec.DecodeError as e:
            raise QueryError(f"bad request body: {e}", code="bad_request") from None
        who = principal.name if principal is not None else "anonymous"
        result = await _service(request).execute_async(body.sql, body.params, roles_of(principal), who)
    except QueryError as e:
        return error_response(e)
    except PartitionNotHeld as e:  # a serving-lane read of shoppers another node holds
        forwarder = forwarder_of(request)
        assert forwarder is not None  # an engine holding some partitions only runs beside its forwarder
        return await forwarder.send(request, e.partitions, request.app.state.insession.features.applied_offset)
    return Response(_json.encode(result), media_type="application/json")


KeyId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]
KeyPair = Annotated[list[KeyId], msgspec.Meta(min_length=2, max_length=2)]  # (a tuple crashes msgspec's schema)


class FeaturesBody(msgspec.Struct, forbid_unknown_fields=True):
    """Many keys' features in one read: user or item ids, or [user_id, item_id] pairs for user_item."""

    entity: Literal["user", "item", "user_item"]
    keys: Annotated[list[KeyId | KeyPair], msgspec.Meta(min_length=1, max_length=MAX_KEYS, examples=[["u1", "u2"]])]
    features: list[Annotated[str, msgspec.Meta(max_length=MAX_ID_LEN)]] | None = None  # None: all of them


_decode_features = msgspec.json.Decoder(FeaturesBody).decode
_FEATURES_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": msgspec.json.schema(FeaturesBody)["$defs"]["FeaturesBody"]}},
    }
}


@router.post(
    "/v1/features",
    tags=["query"],
    responses={200: {"model": dict[str, Any]}, **_ERRORS},
    openapi_extra={**_FEATURES_BODY, **SECURITY},
)
async def post_features(request: Request) -> Response:
    """Every declared feature (or the named ones) of up to 1,000 keys, cleaned by the hygiene rules, read
    under one lock hold per partition: what a ranking service asks for a page of candidates."""
    authorize(request, "serve", "analytics")
    metrics_of(request)
    try:
        try:
            body = _decode_features(await request.body())
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise QueryError(f"bad request body: {e}", code="bad_request") from None
        pairs = [isinstance(k, list) for k in body.keys]
        if any(pairs) != (body.entity == "user_item") or (any(pairs) and not all(pairs)):
            raise QueryError("keys are ids for user and item, [user_id, item_id] pairs for user_item",
                             code="bad_key")
        gate = await here_or_there(request)
        if gate is not None:
            return gate

        def read(ks: list[Any]) -> list[dict[str, Any]]:
            tuples: list[str | tuple[str, ...] | None] = [tuple(k) if isinstance(k, list) else k for k in ks]
            answers = _service(request).read_features_many(body.entity, tuples, body.features)
            return [{"key": k, "features": values, "fallbacks": fb}
                    for k, (values, fb) in zip(ks, answers, strict=True)]

        forwarder = forwarder_of(request)
        if forwarder is None or body.entity == "item":
            rows = await _service(request).off_loop(read, body.keys)
        else:  # a node holding some partitions: the others' keys are read where they are held
            scattered = await forwarder.scatter(
                request, msgspec.structs.asdict(body), body.keys, lambda k: k[0] if isinstance(k, list) else k, read,
                request.app.state.insession.features.applied_offset)
            if isinstance(scattered, Response):
                return scattered
            rows = scattered
    except QueryError as e:
        return error_response(e)
    return Response(_json.encode({"entity": body.entity, "rows": rows}), media_type="application/json")


# The GET route's parameters, declared for the OpenAPI document by hand: the route reads them itself.
_KEY_PARAMS = {
    "parameters": [
        {"name": "entity", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "user, item, user_item or global (the key is then ignored)"},
        {"name": "key", "in": "path", "required": True, "schema": {"type": "string", "maxLength": MAX_ID_LEN},
         "description": "user_id, or item_id for the item entity"},
        {"name": "item_id", "in": "query", "required": False, "schema": {"type": "string", "maxLength": MAX_ID_LEN},
         "description": "the item of a user_item key"},
    ]
}


@router.get(
    "/v1/features/{entity}/{key}",
    tags=["query"],
    responses={200: {"model": dict[str, Any]}, **_ERRORS},
    openapi_extra={**_KEY_PARAMS, **SECURITY},
)
async def get_features(request: Request) -> Response:
    """Every declared feature of one key, cleaned by the hygiene rules (no SQL needed).

    A hot path like POST /v1/query: the key is checked by `authorize` and the path read by hand. FastAPI's
    dependency and parameter machinery took 12% of the server's GIL time under bench_mixed's load (py-spy,
    1,000,000 shoppers: 500 of these reads and 100 rankings a second beside 5,000 events/s)."""
    authorize(request, "serve", "analytics")
    metrics_of(request)
    entity, key = request.path_params["entity"], request.path_params["key"]
    item_id = request.query_params.get("item_id")
    for name, value in (("key", key), ("item_id", item_id)):
        if value is not None and len(value) > MAX_ID_LEN:
            return error_response(QueryError(f"{name} is longer than {MAX_ID_LEN} characters", 422, code="bad_key"))
    if entity == "user_item" and item_id is None:
        return error_response(QueryError("a user_item key needs ?item_id=...", code="bad_key"))
    gate = await here_or_there(request, key if entity in ("user", "user_item") else None)
    if gate is not None:
        return gate
    lookup: str | tuple[str, str] | None = {"global": None, "user_item": (key, item_id or "")}.get(entity, key)
    service = _service(request)
    try:
        values, fallbacks = await service.off_loop(service.read_features, entity, lookup)
    except QueryError as e:
        return error_response(e)
    doc = {"entity": entity, "key": lookup, "features": values, "fallbacks": fallbacks}
    return Response(_json.encode(doc), media_type="application/json")


@router.get(
    "/metrics",
    tags=["ops"],
    dependencies=[Depends(require("admin"))],
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
)
async def get_metrics(request: Request) -> Response:
    """Prometheus metrics of the whole product (needs the admin role when access control is on)."""
    return Response(metrics_of(request).render(), media_type=CONTENT_TYPE)
