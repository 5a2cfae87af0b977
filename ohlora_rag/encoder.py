"""The S-BERT wrapper: texts -> L2-normalised float32 vectors, with the model's own query/passage prompts.

A sentence-transformers folder of the common shape — a Hugging Face transformer, mean or CLS pooling, optional
normalisation (every e5 model, the shipped tutor encoder, what `train-sbert` saves) — is run through transformers'
`AutoModel` directly, with the folder's own prompts, pooling and sequence limit: the vectors are the ones
`SentenceTransformer.encode` gives (tests/test_encoder.py), without importing sentence-transformers, which with its
optional backends (scikit-learn, datasets, peft) took 4-7 s of every `search` and `ask`. Any other folder (other
modules, a hub id) is loaded by `SentenceTransformer` itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ENCODE_BATCH
from .device import quiet_transformers, torch_device
from .models import ModelRef, loading

#: The module classes of a plain folder, by class name (sentence-transformers has moved them between versions).
_PLAIN = ("Transformer", "Pooling", "Normalize")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8") or "{}")
    return data if isinstance(data, dict) else {}


@dataclass
class _Plain:
    """What a plain folder's settings files say: everything the direct path needs besides the weights."""

    pooling: str  # "mean" or "cls"
    prompts: dict[str, str]
    limit: int  # sentence-transformers' max_seq_length: the folder's, else the tokenizer's
    pad_token: str


def _plain(folder: Path) -> _Plain | None:
    """The settings of a Transformer -> Pooling (mean or CLS) -> [Normalize] folder with a fast tokenizer that can
    pad; None for any other folder (sentence-transformers loads those)."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        types = [str(m["type"]) for m in modules]
        paths = [str(m.get("path", "")) for m in modules]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    names = [t.rsplit(".", 1)[-1] if t.startswith("sentence_transformers.") else t for t in types]
    if names not in (list(_PLAIN[:2]), list(_PLAIN)) or paths[0] != "":
        return None
    sbert = _read_json(folder / "sentence_bert_config.json")
    if sbert.get("do_lower_case"):
        return None
    pooling = _read_json(folder / paths[1] / "config.json")
    if "pooling_mode" in pooling:  # sentence-transformers 6
        mode = pooling["pooling_mode"]
    else:
        on = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
        mode = (
            {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(on[0]) if len(on) == 1 else None
        )
    if mode not in ("mean", "cls") or pooling.get("include_prompt") is False:
        return None
    tokenizer = _read_json(folder / "tokenizer_config.json")
    pad = _token(tokenizer.get("pad_token"))
    if not (folder / "tokenizer.json").is_file() or pad is None:
        return None  # a slow (sentencepiece-only) tokenizer, or one that cannot pad: sentence-transformers handles it
    prompts = _read_json(folder / "config_sentence_transformers.json").get("prompts") or {}
    return _Plain(str(mode), {k: str(v) for k, v in prompts.items()}, sequence_limit(sbert, tokenizer), pad)


def sequence_limit(sbert_config: dict[str, Any], tokenizer_config: dict[str, Any]) -> int:
    """The token limit sentence-transformers encodes with: the folder's `max_seq_length`, else the tokenizer's."""
    return int(sbert_config.get("max_seq_length") or tokenizer_config.get("model_max_length", 512))


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class Encoder:
    """A sentence-transformers model loaded from a resolved folder.

    Queries and passages get the model's `query` / `passage` prompts when it defines them (the e5 family does:
    `query: ` and `passage: `), and nothing otherwise.
    """

    def __init__(
        self, ref: ModelRef, device: str | None = None, cache: Path | None = None, runtime: str = "auto"
    ) -> None:
        """Load the encoder.

        Args:
            ref: the resolved model folder.
            device: where torch runs it (default: CUDA when present, else the CPU).
            cache: the models cache (models/cache): with `runtime="auto"`, the encoder's ONNX copy there is run by
                onnxruntime instead of loading torch (see onnx_encoder); `export_copy` writes it.
            runtime: "auto" (the ONNX copy when there is one and no device is asked for) or "torch".
        """
        self.ref = ref
        self.model: Any = None  # the SentenceTransformer, for folders of another shape
        self.transformer: Any = None  # the torch model of a plain folder
        self.onnx: Any = None  # its ONNX Runtime copy, when that serves instead
        with loading(ref, "encoder"):
            plain = _plain(ref.path)
            if plain is not None and runtime == "auto" and device in (None, "cpu") and cache is not None:
                from . import onnx_encoder

                self.onnx = onnx_encoder.load(cache, ref.fingerprint)
            if self.onnx is not None:
                assert plain is not None
                self.device = "cpu"
                self._load_tokenizer(plain, _read_json(ref.path / "config.json"))
                return
            quiet_transformers()
            self.device = device or torch_device()
            if plain is None:
                self._load_sentence_transformer()
            else:
                self._load_transformer(plain)

    @property
    def runtime(self) -> str:
        """What encodes: "onnxruntime", "transformers" or "sentence-transformers"."""
        if self.onnx is not None:
            return "onnxruntime"
        return "transformers" if self.model is None else "sentence-transformers"

    def export_copy(self, cache: Path) -> Path | None:
        """Write the ONNX copy `search` and `ask` will run (a plain BERT-architecture folder loaded with torch);
        None when this encoder has none (another architecture or shape, or the copy could not be written)."""
        from . import onnx_encoder

        if self.transformer is None:
            return None
        return onnx_encoder.export(self.transformer, self.fingerprint, cache)

    def _load_sentence_transformer(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(self.ref.path), device=self.device, local_files_only=True)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.prompts: dict[str, str] = dict(self.model.prompts or {})

    def _load_transformer(self, plain: _Plain) -> None:
        from transformers import AutoModel

        self.transformer = AutoModel.from_pretrained(self.ref.path, local_files_only=True).to(self.device).eval()
        self._load_tokenizer(plain, self.transformer.config.to_dict())

    def _load_tokenizer(self, plain: _Plain, model_config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        folder = self.ref.path
        self.pooling = plain.pooling
        self.prompts = plain.prompts
        positions = model_config.get("max_position_embeddings")
        self.max_length = min(plain.limit, positions) if positions and positions > 0 else plain.limit
        self.dim = int(model_config["hidden_size"])
        # The tokenizers library on the folder's tokenizer.json: what AutoTokenizer would run, without the second,
        # pure-Python parse of the same 17 MB file that AutoTokenizer makes (0.6 s of every `search`).
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        pad_id = self.tokenizer.token_to_id(plain.pad_token)
        self.tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0, pad_token=plain.pad_token)

    @property
    def fingerprint(self) -> str:
        return self.ref.fingerprint

    def encode(
        self, texts: Sequence[str], kind: str, batch_size: int = ENCODE_BATCH, progress: bool = False
    ) -> np.ndarray:
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
        if self.model is not None:
            vectors = self.model.encode(
                list(texts),
                prompt_name=kind if kind in self.prompts else None,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
            return np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)
        return self._encode(texts, self.prompts.get(kind, ""), batch_size, progress)

    def _encode(self, texts: Sequence[str], prompt: str, batch_size: int, progress: bool) -> np.ndarray:
        # Longest first, as sentence-transformers batches: similar lengths pad little.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Batches")
        pool = self._pool_onnx if self.onnx is not None else self._pool_torch
        for start in starts:
            rows = order[start : start + batch_size]
            encoded = self.tokenizer.encode_batch([prompt + texts[i] for i in rows])
            out[rows] = pool([e.ids for e in encoded], [e.attention_mask for e in encoded])
        return out  # (n, dim), unit rows

    def _pool_torch(self, ids: list[list[int]], attention: list[list[int]]) -> np.ndarray:
        """One padded batch through the torch model: float32 (b, dim), unit rows."""
        import torch

        with torch.inference_mode():
            input_ids = torch.tensor(ids, device=self.device)
            mask = torch.tensor(attention, device=self.device)
            hidden = self.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)  # (b, tokens, 1)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    def _pool_onnx(self, ids: list[list[int]], attention: list[list[int]]) -> np.ndarray:
        """One padded batch through the ONNX copy: float32 (b, dim), unit rows (the same pooling, in numpy)."""
        mask = np.array(attention, np.int64)  # (b, tokens)
        hidden = self.onnx(np.array(ids, np.int64), mask)  # (b, tokens, dim)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def encode_queries(self, texts: Sequence[str], batch_size: int = ENCODE_BATCH) -> np.ndarray:
        return self.encode(texts, "query", batch_size)

    def encode_passages(
        self, texts: Sequence[str], batch_size: int = ENCODE_BATCH, progress: bool = False
    ) -> np.ndarray:
        return self.encode(texts, "passage", batch_size, progress)
