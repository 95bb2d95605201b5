"""The ranking endpoints: `POST /v1/rank` and `POST /v1/admin/reload` (an APIRouter the app mounts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from insession.rank import ArtefactRefused, Ranker, RankRequest, RankRequestError, RankResponse

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


@router.post("/v1/rank", tags=["rank"], openapi_extra=_body(RankRequest), responses=_response(RankResponse))
async def rank(request: Request) -> Response:
    """Rank candidates (or the built-in candidate stage's ~60 proposals) for a shopper, within `budget_ms`.

    The response says which model version ranked, or which fallback did and why; `explain` adds the
    history and session events each top item attended to most.
    """
    try:
        req = _decode_rank.decode(await request.body())
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        return _error(422 if isinstance(e, msgspec.ValidationError) else 400, f"invalid rank request: {e}")
    try:
        result = await _ranker(request).arank(req)
    except RankRequestError as e:
        return _error(422, str(e))
    return Response(_encode.encode(result), media_type="application/json")


@router.post("/v1/admin/reload", tags=["admin"], openapi_extra=_body(ReloadRequest, required=False))
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
    try:
        info = await run_in_threadpool(ranker.reload, path)
    except ArtefactRefused as e:
        return _error(409, str(e))
    except FileNotFoundError as e:
        return _error(404, str(e))
    return Response(_encode.encode(info), media_type="application/json")
