"""Tiny random BERT models in a temp dir: real transformers artifacts that load in milliseconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WORDS = (
    "user likes loves enjoys science fiction films movies space opera cooking show news sports "
    "music jazz rock history documentary comedy drama a the and of for who with about"
).split()


def build_tiny_bert(directory: Path, seed: int) -> Path:
    """Save a 2-layer, 32-wide BERT and its tokenizer (save_pretrained layout) to `directory`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if c not in vocab]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    # transformers 5 ignores vocab_file= here (every word would be [UNK]); pass the mapping.
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    assert tokenizer.unk_token_id not in tokenizer("space opera")["input_ids"]
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(str(directory))
    return directory


def write_model_config(directory: Path, version: str, artifact: Path, **overrides: Any) -> Path:
    """Write `<directory>/<version>.yaml`, a recommender model config for a tiny artifact."""
    import yaml

    from app.serving.artifacts import artifact_digests

    config: dict[str, Any] = {
        "name": "recommender",
        "version": version,
        "artifact": str(artifact),
        "sha256": next(iter(artifact_digests(artifact).values())),
        "adapter": "recommender",
        "resources": {"num_cpus": 0.5},
        "max_ongoing_requests": 32,
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
        **overrides,
    }
    path = directory / f"{version}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
