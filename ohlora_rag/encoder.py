"""The S-BERT wrapper: texts -> L2-normalised float32 vectors, with the model's own query/passage prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .device import torch_device
from .models import ModelRef, loading


def quiet_transformers() -> None:
    """Silence weight-loading bars and 'newly initialised' chatter; our own progress bars stay."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for module in ("transformers", "peft", "trl", "sentence_transformers"):  # deprecation notices meant for their devs
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


class Encoder:
    """A sentence-transformers model loaded from a resolved folder.

    Queries and passages get the model's `query` / `passage` prompts when it defines them (the e5 family does:
    `query: ` and `passage: `), and nothing otherwise.
    """

    def __init__(self, ref: ModelRef, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        quiet_transformers()
        self.ref = ref
        with loading(ref, "encoder"):
            self.model: Any = SentenceTransformer(str(ref.path), device=device or torch_device(), local_files_only=True)
            get_dim = (
                getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            )
            self.dim = int(get_dim())

    @property
    def fingerprint(self) -> str:
        return self.ref.fingerprint

    def _prompt(self, name: str) -> str | None:
        return name if name in (self.model.prompts or {}) else None

    def encode(self, texts: Sequence[str], kind: str, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Encode texts.

        Args:
            texts: the strings to encode.
            kind: "query" or "passage" (selects the prompt).
            batch_size: texts per forward pass.
            progress: show a progress bar.

        Returns:
            float32 array (n, dim), each row of unit length.
        """
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self.model.encode(
            list(texts),
            prompt_name=self._prompt(kind),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self.encode(texts, "query", batch_size)

    def encode_passages(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self.encode(texts, "passage", batch_size, progress)
