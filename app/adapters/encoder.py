"""A transformers text encoder with sentence-transformers style pooling, loaded offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["TextEncoder"]

Pooling = Literal["mean", "cls"]


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
        # A replica that asked Ray for a GPU sees it in CUDA_VISIBLE_DEVICES; one without (or a
        # CPU build of torch, or a fake GPU in tests) runs on the CPU rather than failing.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
