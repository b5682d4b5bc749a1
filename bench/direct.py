"""One plain Serve deployment of a model version: the baseline the routed app is measured against.

    import_path: bench.direct:build
    args: {config: configs/models/recommender/v1.yaml, batcher: app}

What a team would write without this project: one deployment, HTTP in, the V2 codec
(`app.serving.protocol`, the same one the Router uses), the model's adapter, dynamic batching, V2 out.
No router hop, no traffic split, no metrics, no access log, no cache. It takes the model
config's resources, torch threads, `max_ongoing_requests` and batching, so a routed/direct
ratio measures only what the Router and its hop add.

`batcher: app` batches with app.serving.batching.Batcher (what ModelServer uses); `batcher: serve`
with Ray Serve's own `@serve.batch` (same size and wait), to measure the difference.
The artifact's sha256 is checked at load, like ModelServer does.

    import_path: bench.direct:build_forward
    args: {app: noop, deployment: noop-v1, model_transport: grpc}

`Forward`: the least a second hop can cost. HTTP in, the same V2 codec, one call to another
app's ModelServer through a Serve handle over the Router's transport (`model_transport`), V2
out; no traffic choice, breaker, deadline, metrics, access log or FastAPI. Routed minus
forward is what the Router's own logic costs; forward minus direct is what Serve charges for
the extra deployment hop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app import ray_compat
from app.adapters import Tensors, adapter_class
from app.config import ModelConfig, load_model_config
from app.errors import ServingError, http_status
from app.serving.artifacts import resolve_artifact, verify_artifact
from app.serving.batching import Batcher
from app.serving.protocol import INFERENCE_HEADER, check_request, decode_body, encode_infer_response

__all__ = ["DirectArgs", "ForwardArgs", "build", "build_forward"]

Item = tuple[Tensors, dict[str, Any]]


class DirectArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str
    batcher: Literal["app", "serve"] = "app"


@serve.deployment
class Direct:
    def __init__(self, config: ModelConfig, batcher: str) -> None:
        cls = adapter_class(config.adapter)
        directory = resolve_artifact(config.artifact, config.base_dir())
        verify_artifact(directory, config.sha256)
        self.config = config
        self.adapter = cls(directory, cls.parse_hyperparameters(config.hyperparameters),
                           threads=config.resources.threads())  # fmt: skip
        batching = config.batching
        self.batcher = Batcher(self._predict, max_batch_size=batching.max_batch_size,
                               batch_wait_timeout_s=batching.batch_wait_timeout_s)  # fmt: skip
        self.serve_batch = batcher == "serve"
        self._serve_batched.set_max_batch_size(batching.max_batch_size)
        self._serve_batched.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    async def _predict(self, items: list[Item]) -> list[Tensors]:
        return await asyncio.to_thread(
            self.adapter.predict, [i[0] for i in items], [i[1] for i in items]
        )

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _serve_batched(self, items: list[Item]) -> list[Tensors]:
        return await self._predict(items)

    async def __call__(self, request: Request) -> Response:
        try:
            raw = decode_body(
                await request.body(), header_length=request.headers.get(INFERENCE_HEADER)
            )
            parsed = check_request(raw, self.adapter.inputs, self.adapter.outputs)
            self.adapter.check_parameters(parsed.inputs, parsed.parameters)
            item = (parsed.inputs, parsed.parameters)
            outputs = await (
                self._serve_batched(item) if self.serve_batch else self.batcher.submit(item)
            )
        except ServingError as exc:
            return JSONResponse({"error": str(exc)}, status_code=http_status(exc))
        content, headers = encode_infer_response(
            model=self.config.name, version=self.config.version, request=parsed, result=outputs,
            outputs=self.adapter.outputs,
        )  # fmt: skip
        return Response(content=content, headers=headers)


def build(args: dict[str, Any]):
    parsed = DirectArgs.model_validate(args)
    config = load_model_config(parsed.config)
    return Direct.options(
        name="Direct",
        ray_actor_options=config.resources.ray_actor_options(),
        max_ongoing_requests=config.max_ongoing_requests,
        num_replicas=config.autoscaling.min_replicas or 1,
    ).bind(config, parsed.batcher)


class ForwardArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app: str
    deployment: str
    model_transport: Literal["grpc", "actor"] = "grpc"


@serve.deployment
class Forward:
    def __init__(self, app: str, deployment: str, model_transport: str) -> None:
        self.app, self.deployment, self.by_reference = app, deployment, model_transport == "actor"
        self.handle = None
        self.adapter = None

    async def __call__(self, request: Request) -> Response:
        if self.handle is None:  # the other app may deploy after this one
            handle = serve.get_deployment_handle(self.deployment, app_name=self.app)
            transport = "actor" if self.by_reference else "grpc"
            self.handle = ray_compat.handle_with_transport(handle, transport)  # as the Router's
            described = ModelConfig.model_validate(await self.handle.describe.remote())
            self.adapter = adapter_class(described.adapter)
        try:
            raw = decode_body(
                await request.body(), header_length=request.headers.get(INFERENCE_HEADER)
            )
            parsed = check_request(raw, self.adapter.inputs, self.adapter.outputs)
            answer = await self.handle.infer.remote(parsed.inputs, parsed.parameters)
        except ServingError as exc:
            return JSONResponse({"error": str(exc)}, status_code=http_status(exc))
        content, headers = encode_infer_response(
            model=self.app, version=self.deployment, request=parsed, result=answer["outputs"],
            outputs=self.adapter.outputs,
        )  # fmt: skip
        return Response(content=content, headers=headers)


def build_forward(args: dict[str, Any]):
    parsed = ForwardArgs.model_validate(args)
    return Forward.options(name="Forward", ray_actor_options={"num_cpus": 0.25},
                           max_ongoing_requests=100).bind(parsed.app, parsed.deployment, parsed.model_transport)  # fmt: skip
