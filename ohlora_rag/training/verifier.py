"""`train-verifier`: the entry verifier (`ohlora_rag/verifier.py`) trained on the published index's known questions
against their own entries and look-alikes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Paths, VerifierTrainConfig


def train_verifier_on(config: VerifierTrainConfig, paths: Paths) -> tuple[dict[str, Any], Path]:
    """Train the verifier as `config` says and write it (default: models/verifier/).

    Returns:
        The verifier's manifest and the folder written.
    """
    from ..models import resolve
    from ..retriever import Retriever
    from ..verifier import train_verifier

    retriever = Retriever.load(paths=paths)
    encoder = resolve(config.encoder, "encoder", paths)
    out = config.out or paths.verifier_dir
    return train_verifier(retriever, encoder, out, config, config.progress), out
