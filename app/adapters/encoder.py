"""A transformers text encoder with sentence-transformers style pooling, loaded offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["TextEncoder", "pick_device"]

Pooling = Literal["mean", "cls"]


def pick_device(cuda_available: bool, in_ray_actor: bool, assigned_gpus: int) -> str:
    """ "cuda" when this process may use a GPU: torch sees one and, inside a Ray actor (a Serve
    replica), Ray assigned it at least one. Outside Ray (offline runs, tests) torch decides.

    Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor assigned no GPU (ray-project/ray
    #54868), so without this a `num_gpus: 0` replica on a GPU node would take the GPU behind
    Ray's back, beside the replicas that reserved it."""
    if not cuda_available:
        return "cpu"
    return "cuda" if not in_ray_actor or assigned_gpus > 0 else "cpu"


def _ray_gpu_assignment() -> tuple[bool, int]:
    """(in a Ray actor, GPUs Ray assigned it)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency; offline tools may lack it
        return False, 0
    if not ray.is_initialized():
        return False, 0
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False, 0
    return True, len(context.get_accelerator_ids().get("GPU", []))


class TextEncoder:
    """Tokenizer + encoder from a local directory; `encode` returns float32 [N, D] embeddings."""

    def __init__(self, directory: Path, *, threads: int) -> None:
        # Model loading is local by design: never reach for a hub at run time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        # A replica runs on the GPU only if Ray assigned it one (`resources.num_gpus`); one
        # without, a CPU build of torch, or a fake GPU in tests runs on the CPU.
        self.device = torch.device(pick_device(torch.cuda.is_available(), *_ray_gpu_assignment()))
        self.model = AutoModel.from_pretrained(str(directory), local_files_only=True)
        self.model.to(self.device)
        self.model.eval()
        self.dimension = int(self.model.config.hidden_size)

    def encode(
        self, texts: list[str], *, pooling: Pooling, normalize: bool, max_length: int
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        torch = self._torch
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy()
