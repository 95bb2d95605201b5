"""The ranking endpoints: `POST /v1/rank` (role serve) and `POST /v1/admin/reload` (role admin).

Mount with `app.include_router(router)`. The routes read `app.state.insession.ranker` (an
`insession.rank.Ranker`), `app.state.auth` and `app.state.metrics` like the other routers; each rank
request's latency, fallback reason and hygiene drops go to the app's metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from insession.rank import ArtefactRefused, ModelInfo, Ranker, RankRequest, RankRequestError, RankResponse
from insession.serve.auth import SECURITY, authorize, require
from insession.serve.forward import here_or_there
from insession.serve.metrics import metrics_of

log = logging.getLogger(__name__)
router = APIRouter()

_decode_rank = msgspec.json.Decoder(RankRequest)
_encode = msgspec.json.Encoder()


class ReloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/admin/reload` body: a version directory name under the model directory (default: newest)."""

    version: str | None = None


def _schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The struct's JSON schema with its nested definitions inlined (OpenAPI has no `$defs`)."""
    doc = msgspec.json.schema(struct)
    defs = doc.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(doc)  # type: ignore[no-any-return]


def _body(struct: type[msgspec.Struct], required: bool = True) -> dict[str, Any]:
    content = {"application/json": {"schema": _schema(struct)}}
    return {"requestBody": {"required": required, "content": content}}


def _response(struct: type[msgspec.Struct]) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {"application/json": {"schema": _schema(struct)}}}}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _ranker(request: Request) -> Ranker:
    return request.app.state.insession.ranker  # type: ignore[no-any-return]


@router.post(
    "/v1/rank",
    tags=["rank"],
    openapi_extra={**_body(RankRequest), **SECURITY},
    responses=_response(RankResponse),
)
async def rank(request: Request) -> Response:
    """Rank candidates (or the built-in candidate stage's ~60 proposals) for a shopper, within `budget_ms`.

    The response says which model version ranked, or which fallback did and why; `explain` adds the
    history and session events each top item attended to most. A hot path: the key is checked by
    `authorize`, without FastAPI's dependency machinery (see `query_routes.get_features`).
    """
    authorize(request, "serve")
    try:
        req = _decode_rank.decode(await request.body())
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        return _error(422 if isinstance(e, msgspec.ValidationError) else 400, f"invalid rank request: {e}")
    gate = await here_or_there(request, req.user_id)  # a shopper another node holds is ranked there
    if gate is not None:
        return gate
    try:
        result = await _ranker(request).arank(req)
    except RankRequestError as e:
        return _error(422, str(e))
    metrics = metrics_of(request)
    metrics.observe_rank(result.timings_ms["total"] / 1000.0, result.fallback_reason)
    for reason, n in result.hygiene_drops.items():
        metrics.hygiene_dropped("rank", reason, n)
    return Response(_encode.encode(result), media_type="application/json")


@router.get(
    "/v1/admin/model",
    tags=["admin"],
    responses={**_response(ModelInfo), 404: {"description": "no model is serving"}},
    dependencies=[Depends(require("admin"))],
)
async def get_model(request: Request) -> Response:
    """The serving model: version, artefact path, feature hash, backend (onnx once exported, else torch)."""
    ranker = _ranker(request)
    info = ranker.model
    if info is None:
        return _error(404, "no model is serving (no valid artefact loaded; the server log says why)")
    return Response(_encode.encode(info), media_type="application/json")


@router.post(
    "/v1/admin/reload",
    tags=["admin"],
    openapi_extra=_body(ReloadRequest, required=False),
    responses=_response(ModelInfo),
    dependencies=[Depends(require("admin"))],
)
async def reload_model(request: Request) -> Response:
    """Load a model artefact (the newest, or `version`) and swap it in without dropping requests.

    409 when its feature declarations differ from the running ones; 404 when there is no such artefact.
    """
    ranker = _ranker(request)
    body = await request.body()
    try:
        version = msgspec.json.decode(body, type=ReloadRequest).version if body.strip() else None
    except msgspec.DecodeError as e:
        return _error(422, f"invalid reload request: {e}")
    path: Path | None = None
    if version is not None:
        if ranker.model_dir is None:
            return _error(404, "this server has no model directory")
        if Path(version).name != version or version in ("", ".", ".."):
            return _error(422, f"version must be a directory name under the model directory, got {version!r}")
        path = ranker.model_dir / version
    asked = "the newest version" if version is None else f"version {version!r}"
    try:
        info = await run_in_threadpool(ranker.reload, path)
    except ArtefactRefused as e:  # the reason is the client's to know; where the files live is not
        log.warning("reload of %s refused: %s", asked, e)
        return _error(409, f"{asked} was refused: {e}")
    except FileNotFoundError as e:
        log.warning("reload of %s: %s", asked, e)
        return _error(404, f"no model artefact for {asked} in the model directory")
    return Response(_encode.encode(info), media_type="application/json")
