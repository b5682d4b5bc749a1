"""`Router`: the ingress. Open Inference Protocol V2 over HTTP, traffic split across versions.

Decisions (which version, is the request valid) come from `app/`; this module holds the HTTP
surface, the deployment handles and the loop that refreshes which versions are serving.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at run time.
import asyncio
import logging
import random
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

import app
from app.adapters import ModelAdapter, adapter_class
from app.config import ModelConfig, RouterSettings, TrafficConfig
from app.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelFailure,
    ModelNotFound,
    PayloadTooLarge,
    ServingError,
    Unavailable,
    http_status,
)
from app.protocol import INFERENCE_HEADER, encode_infer_response, model_metadata, parse_infer_request
from app.traffic import TrafficTable

logger = logging.getLogger("ray.serve")

api = FastAPI(title="ray-rollout router", docs_url=None, redoc_url=None)


def _error_response(request: Request, error: ServingError) -> JSONResponse:
    headers = {}
    version = getattr(request.state, "version", None)
    if version:
        headers["x-model-version"] = version
    if error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse({"error": error.message}, status_code=http_status(error), headers=headers)


@api.exception_handler(ServingError)
async def _serving_error(request: Request, error: ServingError) -> JSONResponse:
    return _error_response(request, error)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return _error_response(request, InvalidInput(f"invalid request: {error.errors()}"))


def _request_id(request: Request) -> str:
    # Serve's proxy passes a client's x-request-id through (or makes one) and echoes it back.
    return request.headers.get("x-request-id") or uuid.uuid4().hex


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _routable(deployment: Any) -> bool:
    if deployment.replica_states.get("RUNNING", 0) > 0:
        return True
    return deployment.status not in ("DEPLOY_FAILED", "UNHEALTHY")


def _original(exc: BaseException) -> BaseException:
    """The exception a replica raised, unwrapped from Ray's RayTaskError if need be."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(
        self,
        model: str,
        handles: dict[str, DeploymentHandle],
        configs: list[ModelConfig],
        settings: RouterSettings,
    ) -> None:
        self.model = model
        self.settings = settings
        self.handles = handles
        self.configs = {c.version: c for c in configs}
        self.adapters: dict[str, type[ModelAdapter]] = {
            c.version: adapter_class(c.adapter) for c in configs
        }
        self.table: TrafficTable | None = None
        self.rejected: dict[str, Any] | None = None
        self.available: frozenset[str] = frozenset(handles)
        self.rng = random.Random()
        self._poller: asyncio.Task | None = None

    # -- traffic ---------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Swap in a new traffic table atomically. A bad table is refused and the old one kept."""
        generation = self.table.generation + 1 if self.table else 1
        try:
            config = TrafficConfig.model_validate(user_config)
            table = TrafficTable.from_config(config, self.handles.keys(), generation)
        except ValueError as exc:
            if self.table is None:
                raise  # nothing to keep serving: fail the replica with the reason
            self.rejected = {"user_config": user_config, "error": str(exc)}
            logger.error("Router: refused traffic update, keeping generation %d: %s",
                         self.table.generation, exc)  # fmt: skip
            return
        self.table, self.rejected = table, None
        logger.info("Router: traffic generation %d: %s (stable %s)",
                    table.generation, dict(table.weights), table.stable)  # fmt: skip

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_health())

    async def _poll_health(self) -> None:
        """Keep `available` current from Serve's status, every `health_poll_interval_s`.

        A version is left out only when it has no RUNNING replica *and* Serve has given up on
        it (DEPLOY_FAILED, UNHEALTHY) or it is gone. A version whose replicas are still
        starting stays routable: its handle queues the request until a replica is up.
        """
        app_name = serve.get_replica_context().app_name
        names = {c.deployment_name: v for v, c in self.configs.items()}
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[app_name].deployments
                self.available = frozenset(
                    version
                    for name, version in names.items()
                    if name in deployments and _routable(deployments[name])
                )
            except RuntimeError as exc:
                if "shutdown" in str(exc):  # the replica is exiting
                    return
                logger.exception("Router: health poll failed")
            except Exception:  # keep the last view; the next poll may succeed
                logger.exception("Router: health poll failed")
            await asyncio.sleep(self.settings.health_poll_interval_s)

    async def check_health(self) -> None:
        self._ensure_poller()

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
        return {"name": "ray-rollout", "version": app.__version__, "extensions": ["binary_tensor_data"]}

    @api.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        self._ensure_poller()
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        self._ensure_poller()
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
        return self._metadata(self.table.stable if self.table else next(iter(self.handles)))

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
    async def status(self) -> dict[str, Any]:
        """Read-only view for operators: the live traffic table and which versions serve."""
        self._ensure_poller()
        table = self.table
        return {
            "model": self.model,
            "router_replica": serve.get_replica_context().replica_id.unique_id,
            "generation": table.generation if table else 0,
            "stable": table.stable if table else None,
            "weights": dict(table.weights) if table else {},
            "versions": {
                v: {"deployment": c.deployment_name, "available": v in self.available}
                for v, c in self.configs.items()
            },
            "rejected_update": self.rejected,
        }

    @api.post("/v2/models/{model}/infer")
    async def infer(self, model: str, request: Request) -> Response:
        return await self._infer(model, None, request)

    @api.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(self, model: str, version: str, request: Request) -> Response:
        return await self._infer(model, version, request)

    async def _infer(self, model: str, path_version: str | None, request: Request) -> Response:
        self._ensure_poller()
        self._check_model(model)
        if path_version is not None:
            self._check_version(path_version)
        body = await _read_body(request, self.settings.max_body_bytes)
        pin = path_version or request.headers.get(self.settings.pin_header) or None
        table = self.table
        if table is None:
            raise Unavailable("the router has no traffic table yet")
        route = table.choose(self.rng, versions=self.handles.keys(), available=self.available, pin=pin)
        version = route.version
        request.state.version = version
        adapter = self.adapters[version]
        parsed = parse_infer_request(
            body,
            header_length=request.headers.get(INFERENCE_HEADER),
            inputs=adapter.inputs,
            outputs=adapter.outputs,
        )
        adapter.check_parameters(parsed.inputs, parsed.parameters)
        result = await self._call(version, parsed.inputs, parsed.parameters)
        content, headers = encode_infer_response(
            model=model, version=version, request=parsed, result=result, outputs=adapter.outputs
        )
        headers.update({"x-model-version": version, "x-routing-decision": route.decision.value})
        return Response(content=content, headers=headers)

    async def _call(self, version: str, inputs: dict, parameters: dict) -> dict:
        response = self.handles[version].infer.remote(inputs, parameters)
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(response, timeout=timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise DeadlineExceeded(f"version {version!r} did not answer within {timeout:g}s") from None
        except ServingError as exc:
            raise _original(exc) from None
        except Exception as exc:
            cause = _original(exc)
            if isinstance(cause, ServingError):
                raise cause from None
            name = type(cause).__name__
            if name in ("BackPressureError", "ActorDiedError", "RayActorError", "ActorUnavailableError"):
                raise Unavailable(f"version {version!r} is unavailable: {name}") from None
            logger.exception("Router: call to %s failed", version)
            raise ModelFailure(f"version {version!r} failed: {name}: {cause}") from None
