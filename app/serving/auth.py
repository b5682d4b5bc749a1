"""The admin API's bearer token: where it comes from, and how a request's header is checked.

The router's admin API (`/admin/rollout...`) changes live traffic, so it requires a bearer
token. Both sides read it the same way, from the environment:

    ROLLOUT_ADMIN_TOKEN=<token>                 the token itself, or
    ROLLOUT_ADMIN_TOKEN_FILE=/path/to/token     a file holding it (a Kubernetes or Docker
                                                secret mount), surrounding whitespace ignored

The variable wins over the file. No token at all means the admin API is off (the router
answers 404 under /admin), which is a safe default: nothing can drive a rollout over HTTP
until an operator chooses a secret. Pure Python, no Ray, so the CLI and the router share it.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from app.errors import ConfigError

__all__ = [
    "FEEDBACK_TOKEN_ENV",
    "FEEDBACK_TOKEN_FILE_ENV",
    "MIN_TOKEN_LENGTH",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "check_bearer",
    "load_admin_token",
    "load_feedback_token",
]

TOKEN_ENV = "ROLLOUT_ADMIN_TOKEN"
TOKEN_FILE_ENV = "ROLLOUT_ADMIN_TOKEN_FILE"
FEEDBACK_TOKEN_ENV = "ROLLOUT_FEEDBACK_TOKEN"
FEEDBACK_TOKEN_FILE_ENV = "ROLLOUT_FEEDBACK_TOKEN_FILE"
# A bearer token is a password that is sent on every call and never rate-limited by us, so a
# short one can be guessed; 16 characters (e.g. `openssl rand -hex 16` gives 32) is the floor.
MIN_TOKEN_LENGTH = 16


def load_feedback_token(env: Mapping[str, str] | None = None) -> str | None:
    """The feedback endpoint's bearer token: ROLLOUT_FEEDBACK_TOKEN, or the file named by
    ROLLOUT_FEEDBACK_TOKEN_FILE; the same rules (and errors) as the admin token.

    A credential of its own, not the admin token: the service that reports outcomes (a click
    pipeline) must not be able to abort or promote a rollout, and a leaked admin token must not
    let anyone forge outcomes. Without it (and without `router.open_feedback`), feedback is off:
    outcomes that decide promotions must come from a trusted source (F2)."""
    return load_admin_token(env, token_env=FEEDBACK_TOKEN_ENV, file_env=FEEDBACK_TOKEN_FILE_ENV)


def load_admin_token(
    env: Mapping[str, str] | None = None,
    *,
    token_env: str = "ROLLOUT_ADMIN_TOKEN",
    file_env: str = "ROLLOUT_ADMIN_TOKEN_FILE",
) -> str | None:
    """The admin token from `env` (default: os.environ), or None when none is configured.

    ROLLOUT_ADMIN_TOKEN wins; when it is unset or blank, the file named by
    ROLLOUT_ADMIN_TOKEN_FILE is read. Whitespace around the token is dropped, because secret
    files and `echo` usually end with a newline that is not part of the secret. A blank result
    is None (admin API off) rather than an empty token, which would let an empty
    `Authorization: Bearer ` header in.

    Raises ConfigError when the named file cannot be read (a typo in a secret's path must not
    silently turn the admin API off) or when the token is shorter than MIN_TOKEN_LENGTH
    (short bearer tokens are guessable) or holds whitespace (a header could not carry it).
    Messages name the variable, never the token."""
    env = os.environ if env is None else env
    token = (env.get(token_env) or "").strip()
    source = token_env
    if not token:
        path = (env.get(file_env) or "").strip()
        if not path:
            return None
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{file_env}={path}: cannot read the token file: {reason}") from exc
        source = f"{file_env} ({path})"
    if not token:
        return None
    if any(char.isspace() for char in token):
        raise ConfigError(
            f"{source}: the token contains whitespace; an `Authorization: Bearer` "
            "header cannot carry it"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{source}: the token has {len(token)} characters; use at least "
            f"{MIN_TOKEN_LENGTH} (short bearer tokens are guessable), e.g. `openssl rand -hex 32`"
        )
    return token


def check_bearer(authorization: str | None, token: str) -> bool:
    """Whether an `Authorization` header value carries `token` as `Bearer <token>`.

    The scheme is case-insensitive (RFC 7235: `bearer` and `BEARER` are the same scheme) and
    whitespace around and between the two parts is tolerated; anything else (no header,
    another scheme, no token, extra parts) is False. The comparison is
    `hmac.compare_digest` on UTF-8 bytes: it takes the same time wherever the first
    difference is, so response timing does not reveal how much of a guess was right (and
    bytes, because compare_digest refuses non-ASCII str). An empty configured token never
    matches, so a misconfigured server fails closed."""
    if not authorization or not token:
        return False
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return False
    # surrogatepass: a header decoded with odd bytes still encodes (and simply fails to match).
    given = parts[1].encode("utf-8", "surrogatepass")
    return hmac.compare_digest(given, token.encode("utf-8", "surrogatepass"))
