"""`Router`: the ingress. Open Inference Protocol V2 over HTTP, traffic split across versions.

Decisions (which version, is the request valid) come from `app/`; this module holds the HTTP
surface and the deployment handles. The background loops (health poll, controller follower,
stats push, gauges) live in `router_sync.py`.

Why one module of ~680 lines: it is one FastAPI class whose routes share the replica's state
(traffic table, handles, cache, breakers); each route is short, and `_infer` is the request
path read top to bottom (pin, table, key, choose, dispatch, answer).
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at run time.
import asyncio
import hashlib
import json
import logging
import pickle
import random
import re
import time
import uuid
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

import app
from app import ray_compat
from app.adapters import ModelAdapter, adapter_class
from app.config import (
    NAME_PATTERN,
    ModelConfig,
    RouterSettings,
    TrafficConfig,
)
from app.config.router import MicroBatchSettings
from app.config.waves import WavesDocumentError, parse_waves_document
from app.constants import (
    ADMIN_CALL_TIMEOUT_S,
    GENERATION_WAIT_S,
    IDEMPOTENCY_HEADER,
    OFF_LOOP_PARSE_BYTES,
    PARSE_SLOTS,
    RECENT_REQUEST_IDS,
    SERVED_BACKLOG,
    TRAFFIC_GENERATION_HEADER,
)
from app.errors import (
    ConfigError,
    DeadlineExceeded,
    Gone,
    InvalidInput,
    LoadShed,
    ModelFailure,
    ModelNotFound,
    OverBudget,
    Overloaded,
    PayloadTooLarge,
    ReplicaLost,
    RequestTimeout,
    ServingError,
    Unauthorized,
    Unavailable,
    http_status,
)
from app.messages import ServedAnswer
from app.observability.access_log import (
    ACCESS_MESSAGE,
    access_record,
    outcome_for_status,
)
from app.observability.drift import ScoreWindow, score_output
from app.observability.metrics import (
    UNROUTED,
    UNROUTED_DECISION,
    MeteredStats,
    Metrics,
    RouterGauges,
    error_type,
)
from app.rollout import OPERATOR_COMMANDS, command_path
from app.rollout.feedback import (
    MAX_REQUEST_ID_CHARS,
    FeedbackSettings,
    RequestLedger,
    parse_feedback,
)
from app.serving.auth import check_bearer, load_admin_token, load_feedback_token
from app.serving.budget import body_limit, check_budget
from app.serving.cache import CacheSettings, ResponseCache, cache_key
from app.serving.capture import Capturer
from app.serving.coalesce import Coalescer, QueueFull
from app.serving.dispatch import Dispatcher, failure_is_evidence
from app.serving.protocol import (
    INFERENCE_HEADER,
    check_request,
    decode_body,
    encode_infer_response,
    model_metadata,
)
from app.serving.ratelimit import RateLimiter
from app.serving.traffic import Decision, Route, TrafficTable, apply_override
from app.ui import operator_page
from app.unicode import printable
from deployments.router_sync import RouterSync

logger = logging.getLogger("ray.serve")

_VERSION_NAME = re.compile(NAME_PATTERN)
_IDEMPOTENCY_KEY = re.compile(r"[!-~]+")  # printable ASCII, no space
# What a handle raises for a full queue, and for a replica that died or cannot be reached.
_BACKPRESSURE = ray_compat.backpressure_error_class()
_ACTOR_LOST = ray_compat.actor_error_class()

# No /docs, /redoc or /openapi.json on the inference port: the API, admin routes included, is
# documented in docs/http-api.md, not published to every client.
api = FastAPI(title="ray-rollout router", docs_url=None, redoc_url=None, openapi_url=None)
# The operator page's static files (app/ui), without a token: no secret in them; the page
# reads the token-protected admin API. Mounted, so never inference metrics or evidence.
api.mount("/ui", operator_page(), name="ui")


class _RequestIdMiddleware:
    """An empty `x-request-id` is replaced by a fresh one, as a missing one is by Serve's proxy
    (which only fills in an absent header), so every answer, error body, log record and
    feedback record names the request (schemathesis found the empty case)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        headers = scope.get("headers") or [] if scope["type"] == "http" else []
        if not any(k == b"x-request-id" and not v.strip() for k, v in headers):
            await self.app(scope, receive, send)
            return
        fresh = uuid.uuid4().hex.encode()
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in headers if k != b"x-request-id"] + [
            (b"x-request-id", fresh)
        ]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", fresh)]
            await send(message)

        await self.app(scope, receive, send_with_id)


api.add_middleware(_RequestIdMiddleware)


def _error_body(request: Request, message: str) -> dict[str, str]:
    """`{"error": ..., "request_id": ...}`: the message made printable (a client's string may
    be echoed in it), and the id that finds the request in the logs."""
    body = {"error": printable(message)}
    request_id = request.headers.get("x-request-id")
    if request_id:
        body["request_id"] = printable(request_id)
    return body


def _error_response(request: Request, error: ServingError) -> JSONResponse:
    headers = {}
    version = getattr(request.state, "version", None)
    if version:
        headers["x-model-version"] = version
    if error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after_s)))
    if isinstance(error, Unauthorized):
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(
        _error_body(request, error.message), status_code=http_status(error), headers=headers
    )


@api.exception_handler(ServingError)
async def _serving_error(request: Request, error: ServingError) -> JSONResponse:
    return _error_response(request, error)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(_error_body(request, str(error.detail)), status_code=error.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return _error_response(request, InvalidInput(f"invalid request: {error.errors()}"))


@api.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """Anything else is a bug: a JSON 500 that says nothing of the internals (they go to the
    log, with the request id), never Starlette's plain-text page."""
    logger.error("Router: internal error on %s %s (request id %s)", request.method,
                 printable(request.url.path), request.headers.get("x-request-id"),
                 exc_info=error)  # fmt: skip
    return JSONResponse(_error_body(request, "internal error"), status_code=500)


async def _read_body(request: Request, limit: int, deadline: float | None = None) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes and (408) if it has not all
    arrived by `deadline` (time.monotonic()): a slow or endless upload holds a router slot no
    longer than a request may run. Chunks go into one buffer, however many there are."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    body = bytearray()

    async def collect() -> None:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            body.extend(chunk)

    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within the request's deadline ({len(body)} bytes "
            "read)"
        ) from None
    return bytes(body)


ADMIN_COMMANDS = tuple(command_path(name) for name in OPERATOR_COMMANDS)


def _original(exc: BaseException) -> BaseException:
    """The exception a replica raised, unwrapped from Ray's RayTaskError if need be."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _model_error(version: str, exc: BaseException) -> ServingError:
    """The ServingError a failed call to `version` (or one item of it) means for the request."""
    cause = _original(exc)
    if isinstance(cause, ServingError):
        return cause
    name = type(cause).__name__
    if isinstance(cause, _BACKPRESSURE):
        return LoadShed(f"version {version!r} is overloaded: {name}", retry_after_s=1.0)
    # RayActorError, ActorDiedError, ActorUnavailableError: the replica died or is gone.
    if isinstance(cause, _ACTOR_LOST):
        return ReplicaLost(f"version {version!r} lost a replica: {name}")
    logger.error("Router: call to %s failed", version, exc_info=cause)
    # Ray's error text can carry node addresses and actor ids: it goes to the log only.
    return ModelFailure(f"version {version!r} failed ({name}; details in the router's log)")


def _require_bearer(
    request: Request, token: str | None, broken: str | None, what: str, why_off: str
) -> None:
    """`what` needs `Authorization: Bearer <token>`: 503 when its token config is broken (the
    reason is in the log, not the answer), 404 when it is off, 401 without the token."""
    if broken is not None:
        raise Unavailable(
            f"{what} is unavailable: the router's token config for it is broken (the router's "
            "log says how)"
        )
    if token is None:
        raise ModelNotFound(f"{what} is off: {why_off}")
    if not check_bearer(request.headers.get("authorization"), token):
        raise Unauthorized(f"missing or wrong bearer token for {what}")


def _client_address(request: Request) -> str:
    """The address a request came from: the first `x-forwarded-for` hop (the proxy or load
    balancer in front says who sent it), else the peer."""
    forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
    return printable(forwarded)[:64] or (request.client.host if request.client else "unknown")


def _caller(request: Request) -> str:
    """Who sent an admin command, for the rollout history: the name the client gives
    (`x-rollout-actor`; `rollout` sends user@host) and where it came from. The admin token is
    shared, so the name is the caller's word; the address is what the proxy saw."""
    actor = printable(request.headers.get("x-rollout-actor", "").strip())[:80] or "unnamed"
    return f"{actor} from {_client_address(request)}"


def _idempotency_key(request: Request) -> str | None:
    """The client's `Idempotency-Key` for an admin command (None: none sent): a command re-sent
    with it (HAProxy re-sends a request whose Router died before answering) is applied once.
    400 naming the header for one that is not 1-MAX_REQUEST_ID_CHARS printable ASCII characters."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 0 < len(key) <= MAX_REQUEST_ID_CHARS or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            f"header {IDEMPOTENCY_HEADER}: 1 to {MAX_REQUEST_ID_CHARS} printable ASCII "
            "characters (e.g. a UUID), no spaces"
        )
    return key


def routing_unit(key: str | None) -> str | None:
    """The A/B test's unit of analysis for a routing key: a stable hash of the user (blake2b,
    the same in every router replica), or None for keyless traffic (each request its own unit).
    Sticky routing keeps one user on one version, so their outcomes are correlated and are
    counted as one unit (app/rollout/abtest/arms.py)."""
    if key is None:
        return None
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _traffic_generation(raw: str | None) -> int | None:
    """The controller generation a client echoes from an earlier answer (None: none sent)."""
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidInput(
            f"header {TRAFFIC_GENERATION_HEADER} must be the non-negative integer an earlier "
            f"answer carried in it, not {raw[:40]!r}"
        )
    return int(raw)


def _key_parameter(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidInput(f"parameter {name!r} (the routing key) must be a string or an integer")
    return str(value)


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(
        self,
        model: str,
        handles: dict[str, DeploymentHandle],
        configs: list[ModelConfig],
        settings: RouterSettings,
        controller: DeploymentHandle | None = None,
        version_apps: bool = False,
    ) -> None:
        self.model = model
        self.settings = settings
        self.handles = {version: self._transport(h) for version, h in handles.items()}
        self.configs = {c.version: c for c in configs}
        # version_apps: versions are Serve applications of their own, found by name when the
        # traffic table first names them (`_resolve_versions`); otherwise this app's deployments.
        self.version_apps = version_apps
        own_app = serve.get_replica_context().app_name
        self.apps = {c.version: own_app for c in configs}  # version -> the app that runs it
        # version_apps: an update waiting for its versions, with its delivery number
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._reconfigures = 0  # version_apps: which update is the newest
        self._missing: dict[str, float] = {}  # version_apps: pins that found no app, and when
        self.adapters: dict[str, type[ModelAdapter]] = {
            c.version: adapter_class(c.adapter) for c in configs
        }
        self.controller = controller
        # None: the admin API is off. A broken token config (an unreadable file, a short token)
        # turns it off loudly (the log, /status, a 503 per admin call) but never stops inference.
        self.admin_error: str | None = None
        try:
            self.admin_token = load_admin_token()
        except ConfigError as exc:
            self.admin_token, self.admin_error = None, str(exc)
            logger.error("Router: the admin API is OFF, its token config is broken: %s", exc)
        # The feedback endpoint's own credential (not the admin token): None and no
        # open_feedback means feedback is off; a broken config turns it off loudly.
        self.feedback_error: str | None = None
        try:
            self.feedback_token = load_feedback_token()
        except ConfigError as exc:
            self.feedback_token, self.feedback_error = None, str(exc)
            logger.error("Router: feedback is OFF, its token config is broken: %s", exc)
        self.feedback_limiter = RateLimiter(
            settings.feedback_rate_per_s, settings.feedback_burst, time.monotonic
        )
        # Traffic capture (off by default; app/serving/capture.py): a sample of answered user
        # requests for load replays. A broken salt config turns it off loudly, never inference.
        self.capturer: Capturer | None = None
        self.capture_error: str | None = None
        if settings.capture.enabled:
            try:
                self.capturer = Capturer(
                    settings.capture, identity_parameters={settings.routing_key_parameter}
                )
            except ConfigError as exc:
                self.capture_error = str(exc)
                logger.error("Router: traffic capture is OFF, its config is broken: %s", exc)
        self.declared: TrafficConfig | None = None  # this router's user_config
        self.override: dict[str, Any] | None = None  # the rollout controller's traffic
        self.seen_generation = 0  # the controller's last generation, applied or refused
        # The controller's traffic this router could not apply (a version it cannot route to):
        # {"generation", "error", "override"}; /status shows it, the health poll retries it.
        self.refused_override: dict[str, Any] | None = None
        self.table: TrafficTable | None = None
        self.rejected: dict[str, Any] | None = None
        self.available: frozenset[str] = frozenset(handles)  # a replica is RUNNING
        self.waitable: frozenset[str] = frozenset(handles)  # Serve is (re)starting replicas
        # Digest of each version's target user_config, from Serve: cache answers stamped with
        # another digest (computed before a hot patch) are never served.
        self.target_config: dict[str, str] = {}
        self.rng = random.Random()
        # Metrics (app/observability/metrics.py): recorded where the gates' stats are, plus a periodic pass.
        self.metrics = Metrics(model)
        self.gauges = RouterGauges(self.metrics)
        self.stats = MeteredStats(self.metrics)  # gate evidence, pushed to the controller
        # Requests that echoed a newer controller generation than this Router's: how many
        # saw it applied within GENERATION_WAIT_S, and how many routed with the older table.
        self.catch_ups = {"caught_up": 0, "timed_out": 0}
        self.pinned: dict[str, dict[str, int]] = {}  # pinned requests per version: shown only
        self.scores = ScoreWindow(settings.drift)
        self.score_outputs = {v: score_output(a.outputs) for v, a in self.adapters.items()}
        self.log_rng = random.Random()
        self.dispatcher = Dispatcher(self._call, self.adapters, clock=time.monotonic, rng=self.rng,
                                     on_shadow=self.stats.record,
                                     running=lambda version: self.running.get(version, 1) > 0)  # fmt: skip
        self.cache = ResponseCache(CacheSettings(), time.monotonic)
        # Router -> model micro-batching (off until the traffic table turns it on).
        # A version scaled out takes more calls at once (its running replicas, from the health
        # poll), and no more of its requests are out or waiting than Serve would admit from
        # this router if each were a call of its own (_outstanding_limit).
        self.running: dict[str, int] = {}  # version -> RUNNING replicas (router_sync.py)
        self.microbatch: Coalescer[tuple[dict, dict], dict] = Coalescer(
            self._send,
            MicroBatchSettings(),
            replicas=lambda version: self.running.get(version, 1),
            limit=self._outstanding_limit,
        )
        self.sync = RouterSync(self)  # the background loops (router_sync.py)
        # Feedback: request ids this replica answered. `served` waits for the next push to the
        # controller (bounded: a controller that is away must not grow it without end);
        # `recent` answers for ids whose push has not reached the controller yet.
        self.served: deque[ServedAnswer] = deque(maxlen=SERVED_BACKLOG)
        self.recent = RequestLedger(max_entries=RECENT_REQUEST_IDS, ttl_s=FeedbackSettings().ttl_s)
        self._body_limits: dict[str, int] = {}  # per version, from its model config's limits
        self._parse_slots = asyncio.Semaphore(PARSE_SLOTS)

    # -- traffic ---------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Swap in a new traffic table atomically. A bad table is refused and the old one kept.

        Async on purpose: Ray Serve 2.60 runs a sync `reconfigure` in a worker thread, where it
        would race the controller follower and the cache on the event loop; here it runs on the
        loop, between requests. It awaits only in version_apps mode, to find versions it has not
        seen yet; the newest update wins over one still waiting."""
        self._reconfigures += 1
        await self._apply_declared(user_config, self._reconfigures)

    async def retry_pending(self) -> None:
        """version_apps: the health poll retries the update that waits for its versions, as the
        update it was: if Serve delivered a newer one meanwhile, the newer one wins (F7)."""
        if self._pending is not None:
            mine, user_config = self._pending
            if mine != self._reconfigures:  # superseded: the newer update handles itself
                self._pending = None
                return
            await self._apply_declared(user_config, mine)

    async def _apply_declared(self, user_config: dict[str, Any], mine: int) -> None:
        """Apply update number `mine` (the count of Serve's deliveries when it arrived)."""
        if mine != self._reconfigures:
            return  # a newer update was delivered since: it wins, this one is dropped
        try:
            config = TrafficConfig.model_validate(user_config)
            if self.version_apps:
                try:
                    await self.sync.resolve_versions(config.versions_used())
                    if mine != self._reconfigures:
                        return  # a newer update arrived while this one waited: it wins
                except ValueError as exc:
                    if mine != self._reconfigures:
                        return
                    # A version's application may still be deploying (one `serve deploy` starts
                    # them all): keep the current table (none: 503s) and let the health poll
                    # retry this one until its versions answer or another update replaces it.
                    self._pending = (mine, user_config)
                    self.rejected = {"user_config": user_config, "error": str(exc), "pending": True}
                    logger.warning("Router: traffic update waits for its versions: %s", exc)
                    self.sync.ensure_running()
                    return
            generation = self.table.generation + 1 if self.table else 1
            table = TrafficTable.from_config(
                apply_override(config, self.override), self.handles.keys(), generation
            )
        except ValueError as exc:
            self._pending = None
            if self.table is None:
                raise  # nothing to keep serving: fail the replica with the reason
            self.rejected = {"user_config": user_config, "error": str(exc)}
            logger.error("Router: refused traffic update, keeping generation %d: %s",
                         self.table.generation, exc)  # fmt: skip
            return
        self.declared, self.table, self.rejected, self._pending = config, table, None, None
        self.dispatcher.reconfigure(table.config.breaker)
        self.cache.reconfigure(table.config.cache)
        logger.info("Router: traffic generation %d: %s (stable %s)",
                    table.generation, dict(table.weights), table.stable)  # fmt: skip

    def _transport(self, handle: DeploymentHandle) -> DeploymentHandle:
        """The handle with this router's model transport: Serve's inter-deployment gRPC
        (`_by_reference=False`) or Ray actor calls (README, Benchmarks: measured both ways)."""
        return ray_compat.handle_with_transport(handle, self.settings.model_transport)

    async def check_health(self) -> None:
        self.sync.ensure_running()

    # -- protocol surface --------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise ModelNotFound(f"model {model!r} not found; this endpoint serves {self.model!r}")

    def _check_version(self, version: str) -> None:
        if version not in self.handles:
            raise ModelNotFound(
                f"version {version!r} of model {self.model!r} not found; "
                f"versions: {sorted(self.handles)}"
            )

    @api.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "ray-rollout",
            "version": app.__version__,
            "extensions": ["binary_tensor_data"],
        }

    @api.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        self.sync.ensure_running()
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        self.sync.ensure_running()
        ok = self._ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def _ready(self, version: str | None = None) -> bool:
        if version is not None:
            return version in self.available
        table = self.table
        return table is not None and any(
            v in self.available for v, w in table.weights.items() if w > 0
        )

    @api.get("/v2/models/{model}")
    async def metadata(self, model: str) -> dict[str, Any]:
        self._check_model(model)
        if self.table is not None:
            return self._metadata(self.table.stable)
        if not self.handles:  # version_apps: no version application answered yet
            raise Unavailable("no version of this model is deployed yet", retry_after_s=1.0)
        return self._metadata(next(iter(self.handles)))

    @api.get("/v2/models/{model}/ready")
    async def model_ready(self, model: str) -> Response:
        self._check_model(model)
        ok = self._ready()
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 503)

    @api.get("/v2/models/{model}/versions/{version}")
    async def version_metadata(self, model: str, version: str) -> dict[str, Any]:
        self._check_model(model)
        self._check_version(version)
        return self._metadata(version)

    @api.get("/v2/models/{model}/versions/{version}/ready")
    async def version_ready(self, model: str, version: str) -> Response:
        self._check_model(model)
        self._check_version(version)
        ok = self._ready(version)
        return JSONResponse({"name": model, "version": version, "ready": ok},
                            status_code=200 if ok else 503)  # fmt: skip

    def _metadata(self, version: str) -> dict[str, Any]:
        adapter = self.adapters[version]
        document = model_metadata(
            self.model, sorted(self.handles), f"ray-rollout/{adapter.task}",
            adapter.inputs, adapter.outputs,
        )  # fmt: skip
        document["parameters"] = {"version": version}
        return document

    @api.get("/status")
    async def status(self, request: Request) -> dict[str, Any]:
        """Read-only view for operators: the live traffic table and which versions serve. It
        names every deployed version (preview ones too), breaker states and rejected configs,
        so it needs the admin token unless `router.public_status` (F10)."""
        self.sync.ensure_running()
        if not self.settings.public_status:
            self._authorize(request, what="the status page")
        table = self.table
        return {
            "model": self.model,
            "router_replica": serve.get_replica_context().replica_id.unique_id,
            "generation": table.generation if table else 0,
            "stable": table.stable if table else None,
            "weights": dict(table.weights) if table else {},
            "shadow": table.shadow.model_dump() if table and table.shadow else None,
            "versions": {
                v: {
                    "deployment": c.deployment_name,
                    "available": v in self.available,
                    "fallback": table.fallback_for(v) if table else None,
                    "breaker": self.dispatcher.breakers[v].snapshot(),
                }
                for v, c in self.configs.items()
            },
            "fallbacks": self.dispatcher.fallbacks,
            "pinned": self.pinned,
            "replica_retries": self.dispatcher.replica_retries,
            "traffic_generation": self.sync.applied_generation,
            "generation_catch_ups": dict(self.catch_ups),
            "shadow_stats": {v: st.snapshot() for v, st in self.dispatcher.shadow_stats.items()},
            "cache": {"enabled": self.cache.settings.enabled, **self.cache.stats()},
            "microbatch": {
                **self._microbatch().settings.model_dump(),
                **self.microbatch.snapshot(),
            },
            "model_transport": self.settings.model_transport,
            "serve_loops": ray_compat.serve_loops(),
            "body_limit_bytes": self._body_limit(),
            "rejected_update": self.rejected,
            "refused_rollout_traffic": None
            if self.refused_override is None
            else {k: self.refused_override[k] for k in ("generation", "error")},
            "admin_api": "broken token config"
            if self.admin_error
            else ("on" if self.admin_token and self.controller else "off"),
            "capture": self.capturer.counters()
            if self.capturer is not None
            else {"enabled": False, "error": self.capture_error},
        }

    # -- admin API (rollout control; bearer token) ------------------------------------------------

    def _authorize(self, request: Request, what: str = "the admin API") -> None:
        off = self.admin_token is None or (self.controller is None and what == "the admin API")
        _require_bearer(request, None if off else self.admin_token, self.admin_error, what,
                        "the router has no admin token configured")  # fmt: skip

    def _authorize_feedback(self, request: Request) -> None:
        """Outcomes decide promotions, so they come from a trusted source: the feedback token
        (a credential of its own), unless `router.open_feedback` (F2)."""
        if not self.settings.open_feedback:
            _require_bearer(request, self.feedback_token, self.feedback_error, "feedback",
                            "no feedback token is configured (ROLLOUT_FEEDBACK_TOKEN or "
                            "ROLLOUT_FEEDBACK_TOKEN_FILE) and router.open_feedback is false")  # fmt: skip

    def _admin_deadline(self) -> float:
        """A deadline for reading an admin or feedback body: the table's request timeout."""
        timeout = self.table.config.request_timeout_s if self.table is not None else 30.0
        return time.monotonic() + timeout

    def _is_admin(self, request: Request) -> bool:
        return self.admin_token is not None and check_bearer(
            request.headers.get("authorization"), self.admin_token
        )

    def _check_pin(self, pin: str, request: Request) -> None:
        """Any client may pin a version that takes weighted traffic, or one the table lists as
        `pinnable`; a version at weight 0 (a preview, a rolled-back candidate, a retired
        stable) needs the admin token, so that clients cannot reach or steer versions the
        operator has not opened to them (F5). Checked before the router looks the name up."""
        table = self.table
        if table is not None and (table.weights.get(pin, 0) > 0 or pin in table.config.pinnable):
            return
        if self._is_admin(request):
            return
        raise Unauthorized(
            f"version {pin!r} takes no traffic: pinning it needs the admin token, or the "
            "Router's user_config must list it in `pinnable`"
        )

    async def _ask_controller(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(
                getattr(self.controller, method).remote(*args), timeout=ADMIN_CALL_TIMEOUT_S
            )
        except Exception as exc:
            cause = _original(exc)
            if isinstance(cause, ServingError):  # CommandRefused (409), a feedback error, ...
                raise cause from None
            raise Unavailable(
                f"the rollout controller is unavailable: {type(cause).__name__}"
            ) from None

    @api.get("/admin/rollout")
    async def rollout_status(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return await self._ask_controller("status")

    @api.get("/admin/rollout/history")
    async def rollout_history(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return await self._ask_controller("history")

    @api.post("/admin/rollout/{command}")
    async def rollout_command(self, command: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        if command not in ADMIN_COMMANDS:
            raise InvalidInput(
                f"unknown command {command!r}; commands: {', '.join(ADMIN_COMMANDS)}"
            )
        return await self._ask_controller(
            "command", command, _caller(request), _idempotency_key(request)
        )

    @api.post("/admin/waves")
    async def waves_publish(self, request: Request) -> dict[str, Any]:
        """The waves orchestrator's state (app/ops/waves.py), for `status["waves"]`: checked
        here (400 naming the field), kept by the controller if it is the newest."""
        self._authorize(request)
        body = await _read_body(request, self.settings.max_body_bytes, self._admin_deadline())
        try:
            document = parse_waves_document(json.loads(body))
        except (ValueError, RecursionError) as exc:  # WavesDocumentError is a ValueError
            why = str(exc) if isinstance(exc, WavesDocumentError) else f"not valid JSON: {exc}"
            raise InvalidInput(f"the waves body: {why}") from None
        return await self._ask_controller("publish_waves", document.model_dump(mode="json"))

    @api.post("/v2/models/{model}/feedback")
    async def feedback(self, model: str, request: Request) -> Response:
        """Outcomes for earlier answers: `{"request_id", "outcome", "value"}` (value true/false
        or a number), or a batch `{"feedback": [...]}`. Counted once per (request id, outcome)
        for the version that answered; 404 unknown id, 410 expired id."""
        self.sync.ensure_running()
        self._check_model(model)
        if self.controller is None:
            raise Unavailable("feedback needs the rollout controller, which this app does not run")
        self._authorize_feedback(request)
        body = await _read_body(request, self.settings.max_body_bytes, self._admin_deadline())
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise InvalidInput(f"the feedback body is not valid JSON: {exc}") from None
        items, batch = parse_feedback(document)
        wait_s = self.feedback_limiter.take(_client_address(request), len(items))
        if wait_s is not None:
            raise Overloaded(
                f"feedback rate limit: {self.settings.feedback_rate_per_s:g} items/s per client "
                f"(burst {self.settings.feedback_burst}); this batch has {len(items)}",
                retry_after_s=wait_s,
            )
        # What this replica knows of each id (RequestLedger.hints), so that a controller that
        # lost its record, after a restart, still counts a repeat once.
        hints = self.recent.hints([item.request_id for item in items], time.time())
        payload = [{**item.to_dict(), "kind": item.kind.value} for item in items]
        # Its wall clock now: the controller moves the hints' times onto its own (F16).
        results: list[dict[str, Any]] = await self._ask_controller(
            "feedback", payload, hints, time.time()
        )
        self.recent.remember([(item.request_id, item.outcome) for item in items], results)
        if batch:
            n_counted = sum(1 for r in results if r.get("counted"))
            return JSONResponse({"counted": n_counted, "results": results})
        result = results[0]
        status = result.pop("status", None)
        if status is not None:
            error = {404: ModelNotFound, 410: Gone}.get(status, InvalidInput)
            raise error(result["error"])
        return JSONResponse(result)

    @api.post("/v2/models/{model}/infer")
    async def infer(self, model: str, request: Request) -> Response:
        return await self._observed(model, None, request)

    @api.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(self, model: str, version: str, request: Request) -> Response:
        return await self._observed(model, version, request)

    async def _observed(self, model: str, path_version: str | None, request: Request) -> Response:
        """`_infer`, then one metric record and one access log record, whatever the outcome."""
        started = time.monotonic()
        error: BaseException | None = None
        response: Response | None = None
        try:
            response = await self._infer(model, path_version, request)
            return response
        except ServingError as exc:
            error = exc
            raise
        except Exception as exc:  # a bug: FastAPI answers 500; count it as one
            error = exc
            raise
        finally:
            try:
                self._record_request(request, response, error, (time.monotonic() - started) * 1000)
            except Exception:  # observability must never fail a request
                logger.exception("Router: recording request metrics failed")

    def _record_request(self, request: Request, response: Response | None,
                        error: BaseException | None, latency_ms: float) -> None:  # fmt: skip
        state = request.state
        version = getattr(state, "version", None)
        headers = response.headers if response is not None else {}
        cache = headers.get("x-cache")
        decision = (
            "cache"
            if cache == "hit"
            else headers.get("x-routing-decision") or getattr(state, "decision", None)
        )
        status = response.status_code if response is not None else (
            http_status(error) if isinstance(error, ServingError) else 500
        )  # fmt: skip
        kind = error_type(error) if error is not None else None
        if version is None or decision is None:  # refused before a version was chosen
            version, decision = UNROUTED, UNROUTED_DECISION
        self.metrics.request(version, decision, outcome_for_status(status), latency_ms)
        if error is not None:
            self.metrics.request_error(version, error)
        if version != UNROUTED:
            if cache is not None:
                self.metrics.cache_lookup(version, cache == "hit")
            fell_back = headers.get("x-fallback-from")
            if fell_back is not None:
                self.metrics.fallback(fell_back, headers.get("x-fallback-reason") or "error")
        if self.settings.access_log.enabled:
            record = access_record(
                settings=self.settings.access_log, rng=self.log_rng,
                request_id=request.headers.get("x-request-id"), model=self.model,
                version=version, decision=decision, status=status, latency_ms=latency_ms,
                fallback_from=headers.get("x-fallback-from"),
                fallback_reason=headers.get("x-fallback-reason"), cache=cache, error_type=kind,
                body=getattr(state, "body", None),
            )  # fmt: skip
            logger.info("%s %s %s %s %d %.1fms", ACCESS_MESSAGE, version, decision, kind or "ok",
                        status, latency_ms, extra=record)  # fmt: skip

    async def _infer(self, model: str, path_version: str | None, request: Request) -> Response:
        self.sync.ensure_running()
        self._check_model(model)
        pin = path_version or request.headers.get(self.settings.pin_header) or None
        if pin is not None and (pin in self.handles or self.version_apps):
            self._check_pin(pin, request)  # (a name never deployed is a 404 below)
        if pin is not None and pin not in self.handles and self.version_apps:
            # A version app with no weight yet (a preview): pinning finds it. A name that did
            # not answer is not looked up again for a while (clients choose the pin).
            missed = self._missing.get(pin)
            if _VERSION_NAME.fullmatch(pin) and (missed is None or time.monotonic() - missed > 10):
                try:
                    await self.sync.resolve_versions({pin})
                except ValueError:
                    self._missing[pin] = time.monotonic()  # answered 404 below
                    if len(self._missing) > 1000:
                        self._missing.clear()
        if path_version is not None:
            self._check_version(path_version)
        wanted = _traffic_generation(request.headers.get(TRAFFIC_GENERATION_HEADER))
        applied = self.sync.applied_generation
        if wanted is not None and applied is not None and wanted > applied:
            caught_up = await self.sync.catch_up(wanted, GENERATION_WAIT_S)  # behind: wait
            self.catch_ups["caught_up" if caught_up else "timed_out"] += 1
        table = self.table
        request.state.traffic_generation = self.sync.applied_generation
        if table is None:
            raise Unavailable("the router has no traffic table yet")
        timeout_s = self._timeout_s(request, table)
        client_deadline = timeout_s < table.config.request_timeout_s
        deadline = time.monotonic() + timeout_s
        settings = self.settings
        body = await _read_body(request, self._body_limit(), deadline)
        raw = await self._decode(body, request.headers.get(INFERENCE_HEADER))
        key = request.headers.get(settings.routing_key_header) or _key_parameter(
            raw.parameters.get(settings.routing_key_parameter), settings.routing_key_parameter
        )
        route = table.choose(self.rng, versions=self.handles.keys(), available=self.available,
                             pin=pin, key=key, waitable=self.waitable)  # fmt: skip
        request.state.unit = routing_unit(key)
        request.state.version = route.version
        request.state.decision = route.decision.value
        request.state.body = body  # a reference, for the access log's opt-in payload sampling
        adapter = self.adapters[route.version]
        parsed = check_request(raw, adapter.inputs, adapter.outputs,
                               drop_parameters={settings.routing_key_parameter})  # fmt: skip
        adapter.check_parameters(parsed.inputs, parsed.parameters)
        check_budget(parsed.inputs, self.configs[route.version].limits, adapter)

        key_for_cache, key_config = self._cache_key(route.version, parsed, request)
        if key_for_cache is not None:
            hit = self.cache.get(key_for_cache)
            if hit is not None:  # outputs are cached, so each hit answers in its own encoding
                return self._answered(request, self._respond(
                    model, route.version, route.decision.value, parsed, pickle.loads(hit.body),
                    {"x-cache": "hit"},
                ))  # fmt: skip

        allow_fallback = (
            pin is None or request.headers.get(settings.fallback_header, "").lower() == "true"
        )
        started = time.monotonic()
        try:
            served = await self.dispatcher.serve(
                table, route, parsed.inputs, parsed.parameters, deadline=deadline,
                available=self.available, allow_fallback=allow_fallback,
                client_deadline=client_deadline,
            )  # fmt: skip
        except InvalidInput:
            raise
        except ServingError as error:
            # Not a client's own short deadline, load shedding, a lost replica or a wait on a
            # replacement: those are not the version's failures (failure_is_evidence).
            if failure_is_evidence(error, client_deadline=client_deadline):
                self._evidence(route, route.version, False, (time.monotonic() - started) * 1000)
            raise
        elapsed_ms = (time.monotonic() - started) * 1000
        if served.fell_back_from is not None and served.fallback_evidence:
            # The client saw no error; the rollout must.
            self._evidence(route, served.fell_back_from, False, elapsed_ms)
        self._evidence(route, served.version, True, elapsed_ms)
        request.state.version = served.version
        output = self.score_outputs.get(served.version)
        if output is not None and output in served.outputs and self.settings.drift.enabled:
            self.scores.add(served.version, served.outputs[output], time.monotonic())
        self.dispatcher.maybe_shadow(
            table, served, parsed.inputs, parsed.parameters,
            available=self.available, timeout_s=table.config.request_timeout_s,
        )  # fmt: skip
        extra: dict[str, str] = {}
        if served.fell_back_from is not None:
            extra["x-fallback-from"] = served.fell_back_from
            extra["x-fallback-reason"] = served.fallback_reason or "error"
        elif key_for_cache is not None and served.config == key_config == self.target_config.get(
            served.version
        ):
            # Store only answers computed under the config the key names, still the current one.
            self.cache.put(key_for_cache, pickle.dumps(served.outputs, protocol=5), {})
        if key_for_cache is not None:
            extra["x-cache"] = "miss"
        return self._answered(request, self._respond(
            model, served.version, served.decision.value, parsed, served.outputs, extra
        ))  # fmt: skip

    def _body_limit(self) -> int:
        """The largest infer body this router reads: what a request within the limits of any
        of its versions can take (app/serving/budget.py), capped by `max_body_bytes`."""
        limits = [self._body_limits.get(v) for v in self.configs]
        if None in limits:
            self._body_limits = {
                v: min(self.settings.max_body_bytes,
                       body_limit(c.limits, self.adapters[c.version].inputs))
                for v, c in self.configs.items()
            }  # fmt: skip
            limits = list(self._body_limits.values())
        return max((n for n in limits if n is not None), default=self.settings.max_body_bytes)

    async def _decode(self, body: bytes, header_length: str | None):
        """`decode_body`, off the event loop for a large body, with at most PARSE_SLOTS large
        bodies parsed at once: a parsed JSON body takes ~20x its size in memory, so a burst of
        large bodies must not multiply that by every request slot (F8)."""
        if len(body) < OFF_LOOP_PARSE_BYTES:
            return decode_body(body, header_length=header_length)
        async with self._parse_slots:
            return await asyncio.to_thread(decode_body, body, header_length=header_length)

    def _evidence(self, route: Route, version: str, ok: bool, latency_ms: float) -> None:
        """Gate evidence comes only from traffic the router chose (sticky, weighted, stable,
        and their fallbacks). A pinned request is the client's choice: counting it would let
        any client pad a failing canary with successes, or sink a good one, so it is counted
        apart (`/status` "pinned") and never reaches the controller."""
        if route.decision is Decision.PINNED:
            counts = self.pinned.setdefault(version, {"requests": 0, "errors": 0})
            counts["requests"] += 1
            counts["errors"] += 0 if ok else 1
            return
        self.stats.record(version, ok, latency_ms)
        if not ok and self.table is not None and version != self.table.stable:
            self.sync.candidate_failed()  # pushed now: a rollback waits on these

    def _answered(self, request: Request, response: Response) -> Response:
        """Remember who answered this request id and how it was chosen, for feedback (pushed
        to the controller). Ids too long to be sent back as feedback are not kept."""
        request_id = request.headers.get("x-request-id")
        if request_id and len(request_id) <= MAX_REQUEST_ID_CHARS:
            version, now = response.headers["x-model-version"], time.time()
            decision = response.headers.get("x-routing-decision")
            unit = getattr(request.state, "unit", None)  # the A/B test's unit: the user
            self.recent.record(request_id, version, now, now, decision, unit)
            self.served.append(ServedAnswer(request_id, version, now, decision, unit))
        generation = getattr(request.state, "traffic_generation", None)
        if generation is not None:  # echoed back, it keeps this client's reads monotonic
            response.headers[TRAFFIC_GENERATION_HEADER] = str(generation)
        body = getattr(request.state, "body", None)
        # Capture only what the router chose (a pin is the client's choice, not the traffic
        # mix); shadow copies never come here. `offer` is O(1) and never raises.
        decision = response.headers.get("x-routing-decision")
        if self.capturer is not None and body is not None and decision != Decision.PINNED.value:
            self.capturer.offer(self.model, response.headers["x-model-version"], body,
                                time.time(), header_length=request.headers.get(INFERENCE_HEADER))  # fmt: skip
        return response

    async def __del__(self) -> None:
        """Serve calls this once the replica has drained: write the queued capture records."""
        capturer = getattr(self, "capturer", None)  # the constructor may not have got that far
        if capturer is not None:
            await asyncio.to_thread(capturer.close)

    def _respond(self, model: str, version: str, decision: str, parsed, outputs, extra) -> Response:
        content, headers = encode_infer_response(
            model=model, version=version, request=parsed, result=outputs,
            outputs=self.adapters[version].outputs,
        )  # fmt: skip
        cap = self.configs[version].limits.max_response_bytes
        if len(content) > cap:
            raise OverBudget(
                f"the response would be {len(content)} bytes; this model's "
                f"limits.max_response_bytes is {cap} (ask for fewer outputs, a smaller top_k, "
                "or binary outputs)"
            )
        headers.update({"x-model-version": version, "x-routing-decision": decision, **extra})
        return Response(content=content, headers=headers)

    def _timeout_s(self, request: Request, table: TrafficTable) -> float:
        limit = table.config.request_timeout_s
        raw = request.headers.get(self.settings.timeout_header)
        if raw is None:
            return limit
        try:
            asked = float(raw)
        except ValueError:
            raise InvalidInput(
                f"{self.settings.timeout_header} must be a number of seconds, got {raw!r}"
            ) from None
        if not asked > 0:
            raise InvalidInput(f"{self.settings.timeout_header} must be positive, got {raw!r}")
        return min(asked, limit)

    def _cache_key(self, version: str, parsed, request: Request) -> tuple[str | None, str | None]:
        """(cache key, the config digest it names) for this request on `version`, or
        (None, None) when it must not be cached."""
        if not self.cache.settings.enabled or not self.configs[version].cacheable:
            return None, None
        if "no-cache" in request.headers.get("cache-control", "").lower():
            return None, None
        generation = self.target_config.get(version)
        if generation is None:
            return None, None
        # Every output is cached and each hit is encoded afresh, so the requested outputs,
        # their encoding and the request id are not part of the key.
        outputs = [o.name for o in self.adapters[version].outputs]
        key = cache_key(self.model, version, generation, parsed.inputs, parsed.parameters, outputs)
        return key, generation

    def _outstanding_limit(self, version: str) -> int:
        """Requests of `version` this router may have out or waiting with micro-batching on:
        its running replicas (at least 1) x `max_ongoing_requests` + `max_queued_requests`
        (-1: no limit), what Serve admits from one caller when each request is its own call."""
        config = self.configs[version]
        if config.max_queued_requests < 0:
            return -1
        running = max(1, self.running.get(version, 1))
        return running * config.max_ongoing_requests + config.max_queued_requests

    def _microbatch(self) -> Coalescer[tuple[dict, dict], dict]:
        """The coalescer, with the current traffic table's `microbatch` settings (applied on
        first use after a table swap: a hot patch reaches the next call)."""
        table = self.table
        if table is not None and table.config.microbatch is not self.microbatch.settings:
            self.microbatch.configure(table.config.microbatch)
        return self.microbatch

    async def _call(self, version: str, inputs: dict, parameters: dict, timeout: float) -> dict:
        if self._microbatch().enabled:
            # Through the coalescer (app/serving/coalesce.py): alone at once while the version
            # has room for more calls, else together with the requests queued beside it. The
            # deadline stays this request's own: giving up drops it from its call.
            call = self.microbatch.submit(version, (inputs, parameters))
        else:
            call = self._send_one(version, inputs, parameters)
        try:
            return await asyncio.wait_for(call, timeout=timeout)
        except QueueFull as full:
            raise LoadShed(
                f"version {version!r} is overloaded: {full.limit} of its requests are already "
                "out or waiting in this router (running replicas x max_ongoing_requests + "
                "max_queued_requests)",
                retry_after_s=1.0,
            ) from None
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"version {version!r} did not answer within {timeout:.3g}s"
            ) from None

    async def _send_one(self, version: str, inputs: dict, parameters: dict) -> dict:
        (result,) = await self._send(version, [(inputs, parameters)])
        return result

    async def _send(self, version: str, items: list[tuple[dict, dict]]) -> list[Any]:
        """One call to `version`: one item as the plain `infer`, more as one `infer_many` (the
        coalescer's sender; `_call` sends single items through it too). A whole-call failure
        raises (every item gets it); an item's own error comes back in its place; both mapped
        by `_model_error`. Cancelled (a deadline, every caller gone): the call is cancelled."""
        handle = self.handles[version]
        if len(items) == 1:
            response = handle.infer.remote(*items[0])
        else:
            response = handle.infer_many.remote(items)
        try:
            result = await response
        except asyncio.CancelledError:
            response.cancel()  # every caller gave up: the replica need not finish it
            raise
        except Exception as exc:
            raise _model_error(version, exc) from None
        if len(items) == 1:
            return [result]
        return [_model_error(version, r) if isinstance(r, BaseException) else r for r in result]
