"""A thin client for the router's admin API (`/admin/rollout`), used by every control command."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from app.constants import IDEMPOTENCY_HEADER
from app.rollout.machine import OPERATOR_COMMANDS, command_path
from app.serving.auth import TOKEN_ENV, TOKEN_FILE_ENV

__all__ = [
    "ADMIN_PATH",
    "COMMAND_PATHS",
    "DEFAULT_URL",
    "URL_ENV",
    "AdminClient",
    "AdminError",
    "error_detail",
]

URL_ENV = "ROLLOUT_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
ADMIN_PATH = "/admin/rollout"
# Command name on the command line -> the last path segment of its POST.
COMMAND_PATHS = {name: command_path(name) for name in OPERATOR_COMMANDS}
UNAUTHORIZED = f"unauthorized: set {TOKEN_ENV} (or {TOKEN_FILE_ENV}) to the router's admin token"
ADMIN_OFF = "the admin API is off: the router has no admin token configured"


class AdminError(Exception):
    """The admin API could not do what was asked; `exit_code` is the CLI's exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class AdminClient:
    """A thin client for the router's admin API; one connection, reused across a --watch."""

    def __init__(self, url: str, token: str | None, timeout_s: float) -> None:
        self._httpx = httpx  # a main dependency; kept on the instance for _call's except clauses
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        # Who sends the command, for the rollout history (the admin token is shared).
        headers = {"accept": "application/json", "x-rollout-actor": _actor()}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()

    def status(self) -> dict[str, Any]:
        return self._call("GET", ADMIN_PATH)

    def history(self) -> dict[str, Any]:
        return self._call("GET", f"{ADMIN_PATH}/history")

    def command(self, name: str) -> dict[str, Any]:
        # A fresh key per command: one the ingress re-sends is applied once (a second promote
        # would skip a step).
        headers = {IDEMPOTENCY_HEADER: uuid.uuid4().hex}
        return self._call("POST", f"{ADMIN_PATH}/{COMMAND_PATHS[name]}", headers)

    def _call(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        httpx = self._httpx
        where = f"{method} {self.url}{path}"
        try:
            response = self._client.request(method, path, headers=headers)
        except httpx.ConnectError as exc:
            raise AdminError(
                f"cannot reach the router's admin API at {self.url}: {exc} "
                f"(is the app running? set --url or {URL_ENV})",
                2,
            ) from exc
        except httpx.TimeoutException as exc:
            message = f"{where}: no answer within {self.timeout_s:g}s (--timeout)"
            raise AdminError(message, 2) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise AdminError(f"{where}: {exc}", 2) from exc
        code = response.status_code
        if code in (401, 403):
            raise AdminError(UNAUTHORIZED, 2)
        if code == 404:
            raise AdminError(ADMIN_OFF, 2)
        if code == 409:
            raise AdminError(error_detail(response) or f"{where}: refused (HTTP 409)", 1)
        if code != 200:
            detail = error_detail(response)
            raise AdminError(f"{where}: HTTP {code}" + (f": {detail}" if detail else ""), 2)
        try:
            data = response.json()
        except ValueError as exc:
            message = f"{where}: the answer is not JSON: {response.text[:200]!r}"
            raise AdminError(message, 2) from exc
        if not isinstance(data, dict):
            raise AdminError(f"{where}: expected a JSON object, got {type(data).__name__}", 2)
        return data


def error_detail(response: Any) -> str:
    """The server's `{"error": ...}`, else the start of its body."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])
    return json.dumps(data)[:200]


def _actor() -> str:
    """user@host of whoever runs the CLI (overridable with ROLLOUT_ACTOR)."""
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no user name in a container without a passwd entry
        user = "unknown"
    return os.environ.get("ROLLOUT_ACTOR") or f"{user}@{socket.gethostname()}"
