"""A thin client for the router's admin API (`/admin/rollout`), used by every control command."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections.abc import Callable
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
# How long a request that met a transient failure is sent again (`--retry-for`), and the pauses
# between sends (a Retry-After header wins, capped by what is left). Transient: the connection
# dropped before an answer (the Router replica died), a 503 (the controller restarting, the
# store not answering, no replica yet), or a 5xx that is not the app's JSON (the ingress's own
# page). A command keeps its Idempotency-Key across sends: the controller applies it once, also
# after it restarted (it stores the keys with the rollout state).
RETRY_FOR_S = 10.0
RETRY_PAUSES_S = (0.25, 0.5, 1.0, 2.0)
RETRY_AFTER_FLOOR_S = 0.1  # a Retry-After of 0 must not make a tight loop
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

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout_s: float,
        retry_for_s: float = RETRY_FOR_S,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        self._httpx = httpx  # a main dependency; kept on the instance for _call's except clauses
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        # Where "sending it again" lines go (stderr: stdout stays the answer, for --json).
        self._notice = notice or (lambda line: print(line, file=sys.stderr, flush=True))
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
        """One request, sent again (the same headers: a command's Idempotency-Key) while it
        meets a transient failure and `retry_for_s` has not run out; then read."""
        where = f"{method} {self.url}{path}"
        deadline = time.monotonic() + self.retry_for_s
        sends = 0
        while True:
            outcome = self._send(method, path, headers, where)
            sends += 1
            reason = _transient(outcome)
            if reason is None:
                break
            pause_s = RETRY_PAUSES_S[min(sends, len(RETRY_PAUSES_S)) - 1]
            wait_s = _retry_after_s(outcome, pause_s)
            if time.monotonic() + wait_s > deadline:
                break
            same_key = (
                " with the same Idempotency-Key" if IDEMPOTENCY_HEADER in (headers or {}) else ""
            )
            self._notice(f"rollout: {where}: {reason}; sending it again{same_key} in {wait_s:g}s")
            time.sleep(wait_s)
        if isinstance(outcome, AdminError):
            raise outcome
        return self._read(outcome, where)

    def _send(self, method: str, path: str, headers: dict[str, str] | None, where: str) -> Any:
        """The response; or, for a connection that dropped before the answer (sent again if
        time is left), the AdminError it ends in. Other transport failures raise at once."""
        httpx = self._httpx
        try:
            return self._client.request(method, path, headers=headers)
        except httpx.ConnectError as exc:
            raise AdminError(
                f"cannot reach the router's admin API at {self.url}: {exc} "
                f"(is the app running? set --url or {URL_ENV})",
                2,
            ) from exc
        except httpx.TimeoutException as exc:
            message = f"{where}: no answer within {self.timeout_s:g}s (--timeout)"
            raise AdminError(message, 2) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            dropped = AdminError(
                f"{where}: the connection dropped: {str(exc) or type(exc).__name__}", 2
            )
            dropped.__cause__ = exc
            return dropped
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise AdminError(f"{where}: {exc}", 2) from exc

    def _read(self, response: Any, where: str) -> dict[str, Any]:
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


def _transient(outcome: Any) -> str | None:
    """Why `outcome` (a response, or a dropped connection's AdminError) is worth sending
    again, or None: a 503, or a 5xx that is not the app's JSON error (the ingress's own page:
    HAProxy answers 500 for a Router that died under the request)."""
    if isinstance(outcome, AdminError):
        return "the connection dropped before an answer"
    code = outcome.status_code
    if code == 503:
        return "HTTP 503: " + (error_detail(outcome) if _is_json_error(outcome) else "unavailable")
    if code in (500, 502, 504) and not _is_json_error(outcome):
        return f"HTTP {code} from the ingress"
    return None


def _is_json_error(response: Any) -> bool:
    try:
        data = response.json()
    except ValueError:
        return False
    return isinstance(data, dict) and "error" in data


def _retry_after_s(outcome: Any, pause_s: float) -> float:
    """The server's Retry-After (seconds, between RETRY_AFTER_FLOOR_S and 5), else `pause_s`."""
    value = None if isinstance(outcome, AdminError) else outcome.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        return pause_s
    return min(max(seconds, RETRY_AFTER_FLOOR_S), 5.0)


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
