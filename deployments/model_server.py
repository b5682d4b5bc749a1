"""`ModelServer`: one Serve deployment per model version (`<model>-<version>`).

Loads the version's artifact after checking its sha256, serves dynamic batches through the
version's adapter, answers health checks with a tiny real inference, and applies its
`user_config` (hyperparameters, batching, fault injection, weights) in place.

Weights hot swap: a `user_config.weights` {artifact, sha256} other than the loaded one is
resolved, checksummed, loaded and smoke-tested in a worker thread while the old weights keep
serving, then swapped in under the model lock (between two batches). If any of that fails the
whole patch is refused: the old weights, hyperparameters, batching and faults keep serving, and
`info()` shows the refusal. The replica's first load happens in the first `reconfigure` (Serve
calls it before the replica serves), so a replica started after a swap loads only the patched
weights; a failure there fails the replica, as a bad artifact at deploy time should.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, cast

from ray import serve

from app.adapters import ModelAdapter, Tensors, adapter_class
from app.config import (
    Batching,
    FaultInjection,
    ModelConfig,
    ModelUserConfig,
    config_hash,
)
from app.errors import ArtifactError, InjectedFault, ModelFailure, ServingError
from app.observability.metrics import Metrics
from app.serving.artifacts import resolve_artifact, verify_artifact
from app.serving.batching import Batcher
from app.serving.faults import plan_fault
from deployments.capacity_policy import REQUESTS_IN_REPLICA

logger = logging.getLogger("ray.serve")

Weights = tuple[str, Any]  # (artifact, sha256) as declared


def _smoke(adapter: ModelAdapter) -> None:
    """One inference of the adapter's own example (load check and health check)."""
    (result,) = adapter.predict([adapter.example()], [{}])
    if isinstance(result, Exception):
        raise result


@serve.deployment
class ModelServer:
    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.name = config.deployment_name
        self.adapter_cls = adapter_class(config.adapter)
        self.adapter: ModelAdapter | None = (
            None  # loaded by the first reconfigure (or the first call without one)
        )
        self.weights: Weights | None = None
        self.artifact_dir = None
        self.digests: dict[str, str] = {}
        self.faults: FaultInjection = config.faults
        self.rng = random.Random()
        self.patches = 0
        self.swaps = 0
        self.refused: dict[str, Any] | None = None
        self._model_lock = asyncio.Lock()
        self._batch_started = time.monotonic()  # when the running (or last) batch took the model
        self._load_lock = asyncio.Lock()  # one first load, however many callers wait for it
        self.config_hash = config_hash(config.user_config().model_dump(mode="json"))
        self.load_s = 0.0
        self.metrics = Metrics(config.name)
        self.requests_in_replica = 0  # in _infer now: the autoscaler's load (see below)
        self.infer_many_calls = 0  # coalesced calls from routers (infer_many), for info()
        self.infer_many_items = 0
        self._gauges_at = float("-inf")
        # Not @serve.batch: see app/serving/batching.py for why (batches of ~1 under load in 2.60).
        self.batcher: Batcher[tuple[Tensors, dict[str, Any]], tuple[Tensors, str]] = Batcher(
            self._predict_batch, max_batch_size=config.batching.max_batch_size,
            batch_wait_timeout_s=config.batching.batch_wait_timeout_s,
        )  # fmt: skip

    def _load(self, weights: Weights, hyperparameters) -> tuple[Any, Any, dict[str, str], float]:
        """Resolve, checksum, load and smoke-test `weights` (in a worker thread)."""
        started = time.perf_counter()
        directory = resolve_artifact(weights[0], self.config.base_dir())
        digests = verify_artifact(directory, weights[1])
        adapter = self.adapter_cls(
            directory, hyperparameters, threads=self.config.resources.threads()
        )
        adapter.max_tokens = self.config.limits.max_tokens
        _smoke(adapter)  # a model that cannot answer its own example is refused
        return adapter, directory, digests, time.perf_counter() - started

    async def _ensure_loaded(self, weights: Weights | None = None, hyperparameters=None) -> None:
        if self.adapter is not None:
            return
        async with self._load_lock:
            if self.adapter is None:
                await self._first_load(weights, hyperparameters)

    async def _first_load(self, weights: Weights | None, hyperparameters) -> None:
        weights = weights or (self.config.artifact, self.config.sha256)
        if hyperparameters is None:
            hyperparameters = self.adapter_cls.parse_hyperparameters(self.config.hyperparameters)
        try:
            loaded = await asyncio.to_thread(self._load, weights, hyperparameters)
        except ArtifactError as exc:
            # Fail this version's replicas loudly; the other versions are other deployments.
            raise ArtifactError(f"{self.name}: refusing to serve: {exc}") from None
        self.adapter, self.artifact_dir, self.digests, self.load_s = loaded
        self.weights = weights
        logger.info("%s loaded %s in %.2fs", self.name, self.artifact_dir, self.load_s)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot patch: hyperparameters, batching, faults and weights change in place, between
        batches; new weights load beside the old ones first (see the module docstring).

        Async on purpose: Ray Serve 2.60 runs a sync `reconfigure` in a worker thread, where it
        would race the batches. Here it takes the model lock, so a batch runs wholly under one
        config and is stamped with that config's digest."""
        update = ModelUserConfig.model_validate(user_config)
        digest = config_hash(user_config)
        hyperparameters = self.adapter_cls.parse_hyperparameters(update.hyperparameters)
        weights: Weights = (
            (update.weights.artifact, update.weights.sha256) if update.weights is not None
            else (self.config.artifact, self.config.sha256)
        )  # fmt: skip
        if self.adapter is None and update.weights is not None:
            # A replica started after a weights patch (autoscaling, a lost node). If the patched
            # weights fail here, serve the model config's own rather than never starting: the
            # refusal shows in info() and the log, as on the replicas that refused the patch.
            try:
                await self._ensure_loaded(weights, hyperparameters)
            except Exception as exc:
                self._refuse(
                    weights, digest, exc, f"serving the model config's {self.config.artifact}"
                )
                await self._ensure_loaded(None, None)  # the model config's weights and settings
                self._apply_batching(self.config.batching)
                return
        if self.adapter is None:
            await self._ensure_loaded(weights, hyperparameters)
        elif weights != self.weights:
            try:
                loaded = await asyncio.to_thread(self._load, weights, hyperparameters)
            except Exception as exc:  # refuse the whole patch; the old config keeps serving
                self._refuse(weights, digest, exc, f"still serving {self.artifact_dir}")
                return
            async with self._model_lock:  # between two batches: the swap is atomic
                self.adapter, self.artifact_dir, self.digests, self.load_s = loaded
                self.weights = weights
                self.config_hash = digest
            self.swaps += 1
            logger.info("%s: swapped in weights %s (loaded in %.2fs)", self.name, self.artifact_dir,
                        self.load_s)  # fmt: skip
        async with self._model_lock:
            cast(ModelAdapter, self.adapter).configure(hyperparameters)  # loaded just above
            self.config_hash = digest
        self.refused = None
        self._apply_batching(update.batching)
        self.faults = update.faults
        self.patches += 1

    def _refuse(self, weights: Weights, digest: str, exc: Exception, serving: str) -> None:
        """Record (for info()) and log weights that failed to load, check or answer."""
        self.refused = {"weights": {"artifact": weights[0], "sha256": weights[1]},
                        "config": digest, "error": f"{type(exc).__name__}: {exc}",
                        "at": time.time()}  # fmt: skip
        logger.error("%s: refused weights %s (%s); %s", self.name, weights[0], exc, serving)

    def _apply_batching(self, batching: Batching) -> None:
        self.batcher.configure(batching.max_batch_size, batching.batch_wait_timeout_s)

    async def infer(self, inputs: Tensors, parameters: dict[str, Any]) -> dict[str, Any]:
        """Serve one request: `{"outputs": Tensors, "config": <config_hash of the user_config
        that produced them>}`; the router's cache keys on the latter."""
        outputs, config = await self._infer(inputs, parameters)
        return {"outputs": outputs, "config": config}

    async def infer_many(
        self, items: list[tuple[Tensors, dict[str, Any]]]
    ) -> list[dict[str, Any] | ServingError]:
        """Serve several requests a router coalesced into one call (app/serving/coalesce.py):
        one result per item, in order, or the item's own error in its place. Each item runs
        concurrently through `_infer` as if it came alone (its own fault injection, its own
        place in the batcher), so a bad item fails alone and the good ones are batched as
        usual; the errors are ServingErrors, which keep their type across Ray's pickling."""
        self.infer_many_calls += 1
        self.infer_many_items += len(items)
        results = await asyncio.gather(
            *(self._infer(inputs, parameters) for inputs, parameters in items),
            return_exceptions=True,
        )
        answers: list[dict[str, Any] | ServingError] = []
        for result in results:
            if isinstance(result, ServingError):
                answers.append(result)
            elif isinstance(result, BaseException):  # a load failure (ArtifactError), a bug
                logger.error("%s: inference failed", self.name, exc_info=result)
                answers.append(ModelFailure(f"{self.name}: inference failed (details in the "
                                            "replica's log)"))  # fmt: skip
            else:
                outputs, config = result
                answers.append({"outputs": outputs, "config": config})
        return answers

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (pushed every `metrics_interval_s`): the requests
        this replica holds, each request of a Router's coalesced call counted on its own, which
        the version's autoscaling policy scales on (deployments/capacity_policy.py)."""
        return {REQUESTS_IN_REPLICA: float(self.requests_in_replica)}

    async def _infer(self, inputs: Tensors, parameters: dict[str, Any]) -> tuple[Tensors, str]:
        self.requests_in_replica += 1
        try:
            return await self._infer_counted(inputs, parameters)
        finally:
            self.requests_in_replica -= 1

    async def _infer_counted(
        self, inputs: Tensors, parameters: dict[str, Any]
    ) -> tuple[Tensors, str]:
        await self._ensure_loaded()
        plan = plan_fault(self.faults, self.rng)
        if plan.delay_s:
            await asyncio.sleep(plan.delay_s)
        if plan.fail:
            raise InjectedFault(
                f"{self.name}: injected fault (faults.error_rate={self.faults.error_rate})"
            )
        try:
            return await self.batcher.submit((inputs, parameters))
        except ServingError:
            raise
        except Exception:  # the model broke on a checked request: a 500, not a crash
            logger.exception("%s: inference failed", self.name)
            # The exception's text (library internals, sizes, paths) goes to the log, not to the
            # client.
            raise ModelFailure(
                f"{self.name}: inference failed (details in the replica's log)"
            ) from None

    async def _predict_batch(
        self, requests: list[tuple[Tensors, dict[str, Any]]]
    ) -> list[tuple[Tensors, str] | Exception]:
        # The forward pass runs off the event loop so new requests keep queueing for the next
        # batch (formed when this one is done); the lock keeps a hot patch (and the health
        # check, which shares the tokenizer) out of it.
        self.metrics.observe("rollout_batch_size", len(requests), version=self.config.version)
        self._refresh_gauges()
        async with self._model_lock:
            config = self.config_hash
            self._batch_started = time.monotonic()
            outputs = await asyncio.to_thread(  # loaded: _infer awaits _ensure_loaded first
                cast(ModelAdapter, self.adapter).predict,
                [r[0] for r in requests],
                [r[1] for r in requests],
            )
        # A request the model refused (InvalidInput in its place) fails alone, with a 400.
        return [out if isinstance(out, Exception) else (out, config) for out in outputs]

    def _refresh_gauges(self) -> None:
        # Ray's metrics agent drops a gauge not re-sent within two export intervals, so the
        # load time is re-sent (at most once a second) from health checks and batches.
        now = time.monotonic()
        if self.adapter is not None and now - self._gauges_at >= 1.0:  # loaded: load_s is real
            self._gauges_at = now
            self.metrics.set("rollout_model_load_s", self.load_s, version=self.config.version)

    async def check_health(self) -> None:
        """Healthy when the model answers its example, or, while a batch holds the model, when
        that batch shows progress (it started, or its adapter beat, within
        health_check_timeout_s). A health check never waits behind a long batch: Serve would
        take the wait for a hang and kill a replica that is working (F4)."""
        await self._ensure_loaded()
        self._refresh_gauges()
        adapter = cast(ModelAdapter, self.adapter)  # loaded by _ensure_loaded above
        if self._model_lock.locked():
            quiet_s = time.monotonic() - max(self._batch_started, adapter.heartbeat)
            if quiet_s > self.config.health_check_timeout_s:
                raise RuntimeError(f"{self.name}: the running batch shows no progress for "
                                   f"{quiet_s:.0f}s")  # fmt: skip
            return
        async with self._model_lock:
            await asyncio.to_thread(_smoke, adapter)

    async def describe(self) -> dict[str, Any]:
        """This version's model config (what a router in version_apps mode needs to route and
        validate requests for it)."""
        return self.config.model_dump(mode="json")

    def info(self) -> dict[str, Any]:
        """What this replica serves: artifact, digests, load time, applied hot patches."""
        context = serve.get_replica_context()
        return {
            "deployment": self.name,
            "replica": context.replica_id.unique_id,
            "actor_name": context.replica_id.to_full_id_str(),
            "pid": os.getpid(),
            "artifact": str(self.artifact_dir),
            "weights": None if self.weights is None else self.weights[0],
            "sha256": self.digests,
            "weights_swaps": self.swaps,
            "refused_patch": self.refused,
            "adapter": self.config.adapter,
            "hyperparameters": None
            if self.adapter is None
            else self.adapter.hyperparameters.model_dump(mode="json"),
            "faults": self.faults.model_dump(mode="json"),
            "load_s": round(self.load_s, 3),
            "patches": self.patches,
            "config": self.config_hash,
            "batching": {
                "max_batch_size": self.batcher.max_batch_size,
                "batch_wait_timeout_s": self.batcher.batch_wait_timeout_s,
                "batches": self.batcher.batches,
                "last_batch_size": self.batcher.last_batch_size,
                "isolated_batches": self.batcher.isolated,
            },
            "infer_many": {"calls": self.infer_many_calls, "items": self.infer_many_items},
            "requests_in_replica": self.requests_in_replica,
        }
