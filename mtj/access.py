"""Who may use a server: API keys (OpenAI-style `Authorization: Bearer KEY`), the refusal to serve beyond
loopback without them, and each caller's bounded share of the queue.

A caller is an API key (known to the server only by its place in the list, so logs can name it without
holding it) or, on a server without keys, a client address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mtj.paths import user_path

ENV_KEY = "MTJ_API_KEY"
OPEN_PATHS = ("/health",)  # a load balancer's probe needs no key


class AccessError(ValueError):
    """A key or exposure setting that cannot serve: the command prints it as one line."""


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def _checked(key: str, where: str) -> str:
    """A key as given, refused (without echoing it) when it cannot be sent in a Bearer header."""
    if not key:
        raise AccessError(f"an API key is empty ({where})")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise AccessError(f"an API key has a space, a control or a non-ASCII character ({where}); "
                          "keys are sent in an HTTP header")
    return key


def load_keys(given: list[str] | None, key_file: str | None, environ: dict[str, str] | None = None) -> list[str]:
    """The keys of --api-key (each), --api-key-file (one per line; blank lines and '#' comments skipped)
    and MTJ_API_KEY, in that order, duplicates dropped."""
    environ = os.environ if environ is None else environ
    keys = [_checked(k, f"--api-key number {i + 1}") for i, k in enumerate(given or [])]
    if key_file:
        for n, line in enumerate(user_path(key_file).read_text().splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(_checked(line, f"{key_file} line {n}"))
        if not keys:
            raise AccessError(f"{key_file} holds no API key (one per line)")
    if environ.get(ENV_KEY):
        keys.append(_checked(environ[ENV_KEY].strip(), ENV_KEY))
    return list(dict.fromkeys(keys))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, port: int, keys: list[str], allow_unauthenticated: bool) -> str | None:
    """Refuse to serve beyond loopback without a key (AccessError); the warning to print when the user
    asked for exactly that, else None."""
    if keys or is_loopback(host):
        return None
    if not allow_unauthenticated:
        raise AccessError(f"--host {host} is reachable from other machines and no API key is set: add "
                          f"--api-key-file FILE (one key per line; or --api-key KEY, or {ENV_KEY}), or pass "
                          "--allow-unauthenticated to serve anyone who can reach the port")
    return f"warning: serving without an API key on {host}:{port}: anyone who can reach the port can use this server"


class Keys:
    """The server's keys; `caller` names the key a header holds, comparing in constant time."""

    def __init__(self, keys: list[str]):
        self.digests = [_digest(k) for k in keys]

    def caller(self, authorization: str | None) -> str | None:
        """'key#N' for the N-th key (1-based) if the header is `Bearer` and that key, else None. Every key is
        compared, whatever matches, and the comparison of equal-length digests takes the same time for any
        header: nothing about the keys can be learnt from the time an answer takes."""
        scheme, _, token = (authorization or "").partition(" ")
        given = _digest(token.strip() if scheme.lower() == "bearer" else "")
        found = None
        for i, digest in enumerate(self.digests):
            if secrets.compare_digest(given, digest):
                found = f"key#{i + 1}"
        return found


class RequireKey:
    """ASGI middleware: a request without a valid key gets 401 (OpenAI's error shape) on every path but
    OPEN_PATHS; a valid one carries its caller's name in `request.state.caller`."""

    def __init__(self, app: ASGIApp, keys: Keys):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            caller = self.keys.caller(header)
            if caller is None:
                body = {"error": {"message": "a valid API key is needed: send 'Authorization: Bearer KEY'",
                                  "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


class Shares:
    """Rows each caller has queued or decoding, bounded per caller: past `limit`, TooMany (429)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"--max-queue-per-key must be at least 1, got {limit}")
        self.limit = limit
        self.rows: dict[str, int] = {}  # only callers with rows in flight: it does not grow with clients seen

    def take(self, caller: str, rows: int) -> None:
        held = self.rows.get(caller, 0)
        if held + rows > self.limit:
            raise TooMany(f"this caller has {held} rows queued or decoding and asks for {rows} more; each caller may "
                          f"have at most {self.limit}: retry when some have finished")
        self.rows[caller] = held + rows

    def give_back(self, caller: str, rows: int = 1) -> None:
        left = self.rows.get(caller, 0) - rows
        if left > 0:
            self.rows[caller] = left
        else:
            self.rows.pop(caller, None)


class TooMany(Exception):
    """A caller past its share: answered 429 with Retry-After."""


def caller_of(scope: dict[str, Any]) -> str:
    """The request's caller: its key's name, or on a server without keys its client address."""
    state = scope.get("state") or {}
    if "caller" in state:
        return state["caller"]
    client = scope.get("client")
    return client[0] if client else "-"
