"""A transformers text encoder with sentence-transformers style pooling, loaded offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from app.errors import InvalidInput, OverBudget

__all__ = [
    "MICRO_BATCH_TEXTS", "MICRO_BATCH_TOKENS", "TextEncoder", "TokenBook", "micro_batches",
    "pick_device",
]  # fmt: skip

Pooling = Literal["mean", "cls"]

# One forward pass takes at most this many texts and padded tokens: 8,192 tokens of MiniLM-L6
# are ~100 MB of activations in fp32 and well under a second on 2 CPU threads.
MICRO_BATCH_TEXTS = 256
MICRO_BATCH_TOKENS = 8192


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
        self.on_progress: Callable[[], None] | None = None  # called after each micro-batch

    def tokenize(self, texts: list[str], *, max_length: int) -> list[list[int]]:
        """Token ids of each text, special tokens included, truncated to `max_length`. Raises
        whatever the tokenizer raises on a text it cannot take (the caller blames the request
        the text came from)."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, truncation=True, max_length=max_length, padding=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def embed(
        self,
        ids: list[list[int]],
        *,
        pooling: Pooling,
        normalize: bool,
        micro_batch_texts: int = MICRO_BATCH_TEXTS,
        micro_batch_tokens: int = MICRO_BATCH_TOKENS,
    ) -> np.ndarray:
        """Embeddings of tokenized texts, float32 [N, D], in the order given.

        The forward pass runs in micro-batches of texts of similar length (sorted by length),
        each at most `micro_batch_texts` texts and `micro_batch_tokens` padded tokens, so one
        large request never becomes one giant activation: memory per pass is bounded, padding is
        small, and `on_progress` is called after each micro-batch (the replica's health check
        reads it, so a long batch that is making progress is not taken for a hung one)."""
        if not ids:
            return np.zeros((0, self.dimension), dtype=np.float32)
        out = np.empty((len(ids), self.dimension), dtype=np.float32)
        for chunk in micro_batches([len(t) for t in ids], micro_batch_texts, micro_batch_tokens):
            out[chunk] = self._forward([ids[i] for i in chunk], pooling, normalize)
            if self.on_progress is not None:
                self.on_progress()
        return out

    def _forward(self, ids: list[list[int]], pooling: Pooling, normalize: bool) -> np.ndarray:
        torch = self._torch
        width = max(len(t) for t in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy()

    def encode(
        self, texts: list[str], *, pooling: Pooling, normalize: bool, max_length: int
    ) -> np.ndarray:
        """`embed(tokenize(texts))`: embeddings of raw texts, float32 [N, D]."""
        return self.embed(
            self.tokenize(texts, max_length=max_length), pooling=pooling, normalize=normalize
        )


class TokenBook:
    """The distinct texts of one dynamic batch, tokenized request by request.

    `admit` tokenizes a request's new texts; if the tokenizer refuses one, or the request's
    texts come to more than `max_tokens` tokens, it raises `InvalidInput` naming the input or
    the limit and the request's texts are not kept, so the rest of the batch is encoded without
    them. `embed` then encodes every admitted text once; `row[text]` is its row."""

    def __init__(self, encoder: TextEncoder, max_length: int, max_tokens: int | None) -> None:
        self.encoder = encoder
        self.max_length = max_length
        self.max_tokens = max_tokens
        self.ids: dict[str, list[int]] = {}
        self.row: dict[str, int] = {}

    def admit(self, texts_by_input: dict[str, list[str]]) -> None:
        new: dict[str, list[int]] = {}
        total = 0
        for name, texts in texts_by_input.items():
            distinct = [t for t in dict.fromkeys(texts) if t not in self.ids and t not in new]
            try:
                ids = self.encoder.tokenize(distinct, max_length=self.max_length)
            except Exception as exc:  # the text is the client's; its failure is a 400
                raise InvalidInput(
                    f"input {name!r}: a text could not be tokenized ({type(exc).__name__})"
                ) from None
            new.update(zip(distinct, ids))
            total += sum(len(self.ids.get(t) or new[t]) for t in dict.fromkeys(texts))
        if self.max_tokens is not None and total > self.max_tokens:
            raise OverBudget(
                f"the request comes to {total} tokens; this model's limits.max_tokens is "
                f"{self.max_tokens}"
            )
        self.ids.update(new)

    def embed(self, *, pooling: Pooling, normalize: bool) -> np.ndarray:
        texts = list(self.ids)
        self.row = {t: i for i, t in enumerate(texts)}
        return self.encoder.embed(
            [self.ids[t] for t in texts], pooling=pooling, normalize=normalize
        )


def micro_batches(lengths: list[int], max_texts: int, max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` cut into micro-batches: sorted by length (least padding), each at
    most `max_texts` texts and `max_texts x longest <= max_tokens` padded tokens (a single
    text longer than `max_tokens` goes alone). Every index appears exactly once."""
    if max_texts < 1 or max_tokens < 1:
        raise ValueError("micro-batch bounds must be positive")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the text being added is the longest so far
        if current and (len(current) >= max_texts or (len(current) + 1) * lengths[i] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
