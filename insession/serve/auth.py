"""API keys with roles (ingest, serve, analytics, admin) and the FastAPI dependency `require(role)`.

Configuration (server config file, TOML or JSON, or a dict), either plain keys or their SHA-256:

    [[auth.keys]]
    name = "checkout-service"
    sha256 = "9f86d08..."          # or: key = "..." (hashed on load, never kept in memory)
    roles = ["serve", "ingest"]

Only SHA-256 digests are held; a presented key (header `X-API-Key`, or `Authorization: Bearer ...`) is
hashed and compared with every configured digest in constant time. Keys are never logged or echoed
(`Principal` carries the key's name, not the key). `admin` implies every role. Access control is off
when no key is configured (the embedded default) and on as soon as one is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

Role = Literal["ingest", "serve", "analytics", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
ADMIN = "admin"
API_KEY_HEADER = "X-API-Key"

_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="An insession API key")


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the configured key's name and its roles (admin expanded to every role)."""

    name: str
    roles: frozenset[str]


class KeySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One configured key: a plain `key` (hashed on load) or its `sha256`, and its roles.

    Decoding (`msgspec.convert`, the server config) refuses unknown fields, unknown or no roles, a
    malformed digest, and both or neither of `key` and `sha256`, naming the field."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256, description="shown in logs and 403s")]
    roles: Annotated[list[Role], msgspec.Meta(min_length=1, description="admin implies every role")]
    key: Annotated[str, msgspec.Meta(min_length=1, description="the plain key, hashed on load")] | None = None
    sha256: (
        Annotated[
            str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$", description="the key's SHA-256 hex digest (instead of key)")
        ]
        | None
    ) = None

    def __post_init__(self) -> None:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError(f"key {self.name!r}: give exactly one of key or sha256")


def hash_key(key: str) -> str:
    """The SHA-256 hex digest a config stores instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return "isk_" + secrets.token_urlsafe(32)


class Auth:
    """The configured keys. `Auth()` (no keys) turns access control off."""

    def __init__(self, keys: Iterable[KeySpec] = ()) -> None:
        self._keys: list[tuple[bytes, Principal]] = []
        for spec in keys:
            spec = msgspec.convert(msgspec.to_builtins(spec), KeySpec)  # the checks of decoding, for built specs
            digest = hash_key(spec.key) if spec.key is not None else str(spec.sha256).lower()
            roles = frozenset(ROLES) if ADMIN in spec.roles else frozenset(spec.roles)
            self._keys.append((bytes.fromhex(digest), Principal(spec.name, roles)))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal of a presented key, or None. Compares with every digest, in constant time each."""
        if not key:
            return None
        presented = hashlib.sha256(key.encode()).digest()
        found: Principal | None = None
        for digest, principal in self._keys:
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        return found


def write_config(path: str | Path, keys: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Create a key per name with the given roles, write their digests to a TOML config, return the keys.

    For the demo and for operators: the returned plain keys are shown once; the file holds hashes only.
    """
    plain = {name: generate_key() for name in keys}
    lines = []
    for name, roles in keys.items():
        role_list = ", ".join(json.dumps(r) for r in roles)
        lines += [
            "[[auth.keys]]",
            f"name = {json.dumps(name)}",
            f'sha256 = "{hash_key(plain[name])}"',
            f"roles = [{role_list}]",
            "",
        ]
    Path(path).write_text("\n".join(lines))
    return plain


def _presented(request: Request) -> str | None:
    key = request.headers.get(API_KEY_HEADER)
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authorize(request: Request, *roles: str) -> Principal | None:
    """Check the request's key against `request.app.state.auth` (an `Auth`): the `Principal`, or None when
    access control is off; HTTPException 401 without a valid key, 403 when the key has none of `roles`.
    For hot routes that skip FastAPI's dependency machinery; `require` is the dependency form."""
    auth: Auth | None = getattr(request.app.state, "auth", None)
    if auth is None or not auth.enabled:
        return None
    principal = auth.authenticate(_presented(request))
    if principal is None:
        raise HTTPException(
            401,
            detail=f"a valid API key is required (header {API_KEY_HEADER})",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not principal.roles.intersection(roles):
        raise HTTPException(403, detail=f"the key {principal.name!r} lacks the role {' or '.join(roles)}")
    return principal


def require(role: str, *more: str) -> Callable[..., Any]:
    """A FastAPI dependency doing `authorize(request, role, *more)`; returns the `Principal` (or None)."""
    wanted = (role, *more)
    if set(wanted) - set(ROLES):
        raise ValueError(f"unknown role in {wanted}; roles: {ROLES}")

    async def dependency(request: Request, _: str | None = Depends(_api_key_header)) -> Principal | None:
        return authorize(request, *wanted)

    dependency.__name__ = "require_" + "_or_".join(wanted)
    return dependency


# OpenAPI: the security requirement of a route that calls `authorize` itself (the scheme `require` declares).
SECURITY = {"security": [{_api_key_header.scheme_name: []}]}


def roles_of(principal: Principal | None) -> frozenset[str] | None:
    """The roles to check a query against (None: access control is off, everything is allowed)."""
    return None if principal is None else principal.roles
