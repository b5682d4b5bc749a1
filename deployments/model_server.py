"""`ModelServer`: one Serve deployment per model version (`<model>-<version>`).

Loads the version's artifact after checking its sha256, serves dynamic batches through the
version's adapter, answers health checks with a tiny real inference, and applies its
`user_config` (hyperparameters, batching, fault injection) in place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any

from ray import serve

from app.adapters import Tensors, adapter_class
from app.artifacts import resolve_artifact, verify_artifact
from app.config import Batching, FaultInjection, ModelConfig, ModelUserConfig, config_hash
from app.errors import ArtifactError, InjectedFault, ModelFailure, ServingError
from app.faults import plan_fault

logger = logging.getLogger("ray.serve")


@serve.deployment
class ModelServer:
    def __init__(self, config: ModelConfig) -> None:
        started = time.perf_counter()
        self.config = config
        self.name = config.deployment_name
        try:
            self.artifact_dir = resolve_artifact(config.artifact, config.base_dir())
            self.digests = verify_artifact(self.artifact_dir, config.sha256)
        except ArtifactError as exc:
            # Fail this version's replicas loudly; the other versions are other deployments.
            raise ArtifactError(f"{self.name}: refusing to serve: {exc}") from None
        self.adapter_cls = adapter_class(config.adapter)
        self.adapter = self.adapter_cls(
            self.artifact_dir,
            self.adapter_cls.parse_hyperparameters(config.hyperparameters),
            threads=config.resources.threads(),
        )
        self.faults: FaultInjection = config.faults
        self.rng = random.Random()
        self.patches = 0
        self._model_lock = asyncio.Lock()
        self.config_hash = config_hash(config.user_config().model_dump(mode="json"))
        self.load_s = time.perf_counter() - started
        logger.info("%s loaded %s in %.2fs", self.name, self.artifact_dir, self.load_s)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot patch: hyperparameters, batching and faults change in place, between batches.

        Async on purpose: Ray Serve 2.60 runs a sync `reconfigure` in a worker thread, where it
        would race the batches. Here it takes the model lock, so a batch runs wholly under one
        config and is stamped with that config's digest."""
        update = ModelUserConfig.model_validate(user_config)
        digest = config_hash(user_config)
        hyperparameters = self.adapter_cls.parse_hyperparameters(update.hyperparameters)
        async with self._model_lock:
            self.adapter.configure(hyperparameters)
            self.config_hash = digest
        self._apply_batching(update.batching)
        self.faults = update.faults
        self.patches += 1

    def _apply_batching(self, batching: Batching) -> None:
        self._predict_batch.set_max_batch_size(batching.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    async def infer(self, inputs: Tensors, parameters: dict[str, Any]) -> dict[str, Any]:
        """Serve one request: `{"outputs": Tensors, "config": <config_hash of the user_config
        that produced them>}`; the router's cache keys on the latter."""
        outputs, config = await self._infer(inputs, parameters)
        return {"outputs": outputs, "config": config}

    async def _infer(self, inputs: Tensors, parameters: dict[str, Any]) -> tuple[Tensors, str]:
        plan = plan_fault(self.faults, self.rng)
        if plan.delay_s:
            await asyncio.sleep(plan.delay_s)
        if plan.fail:
            raise InjectedFault(f"{self.name}: injected fault (faults.error_rate={self.faults.error_rate})")
        try:
            return await self._predict_batch((inputs, parameters))
        except ServingError:
            raise
        except Exception as exc:  # the model broke on a checked request: a 500, not a crash
            logger.exception("%s: inference failed", self.name)
            raise ModelFailure(f"{self.name}: inference failed: {type(exc).__name__}: {exc}") from None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _predict_batch(
        self, requests: list[tuple[Tensors, dict[str, Any]]]
    ) -> list[tuple[Tensors, str]]:
        # The forward pass runs off the event loop so new requests keep queueing for the next
        # batch; the lock keeps a hot patch (and the health check, which shares the tokenizer)
        # out of it.
        async with self._model_lock:
            config = self.config_hash
            outputs = await asyncio.to_thread(
                self.adapter.predict, [r[0] for r in requests], [r[1] for r in requests]
            )
        return [(out, config) for out in outputs]

    async def check_health(self) -> None:
        async with self._model_lock:
            await asyncio.to_thread(self.adapter.predict, [self.adapter.example()], [{}])

    def info(self) -> dict[str, Any]:
        """What this replica serves: artifact, digests, load time, applied hot patches."""
        context = serve.get_replica_context()
        return {
            "deployment": self.name,
            "replica": context.replica_id.unique_id,
            "actor_name": context.replica_id.to_full_id_str(),
            "pid": os.getpid(),
            "artifact": str(self.artifact_dir),
            "sha256": self.digests,
            "adapter": self.config.adapter,
            "hyperparameters": self.adapter.hyperparameters.model_dump(mode="json"),
            "faults": self.faults.model_dump(mode="json"),
            "load_s": round(self.load_s, 3),
            "patches": self.patches,
            "config": self.config_hash,
        }
