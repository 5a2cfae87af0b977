"""A pair classifier on the tutor encoder: the follow-up judge (`judge.py`) and the entry verifier (`verifier.py`).

Both read two texts together — a cross-encoder — where the retriever's scores only compare two vectors: the encoder
with a rank-8 LoRA adapter on its attention and feed-forward projections, and a linear head over its mean-pooled
tokens, giving one logit per pair (> 0: yes). This module loads one (`PairModel.load`, `read_pair_model`), scores
pairs (remembering the last `RECENT_PAIRS`), and trains one (`train_pair_model`); the two callers say what a pair
is, where the model lives and which text to cut when a pair is too long.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from .artifacts import staged_folder, utc_timestamp, write_json
from .device import quiet_transformers
from .errors import DataFormatError, OhloraError

if TYPE_CHECKING:
    from .models import ModelRef

HEAD_FILE = "head.safetensors"
ADAPTER_FOLDER = "adapter"
#: Pairs scored that a model remembers (as the retriever remembers query vectors): the server replays a
#: conversation's history on every request, and each replayed turn asks again.
RECENT_PAIRS = 4096
_TARGETS = ["query", "key", "value", "dense"]
#: The ONNX copies' folders in models/cache (kept apart from the encoders' copies).
COPY_PREFIX = "onnx-pair-"


@dataclass(frozen=True)
class PairKind:
    """What a pair model is: its manifest's name and format, the command that trains it, and which of the two
    texts is cut when a pair is longer than the model reads ("only_first" | "only_second")."""

    what: str  # "follow-up judge"
    manifest: str  # "judge.json"
    format: int
    command: str  # "train-judge"
    truncation: str
    float16: bool = False  # the adapter's weights stored as float16 (half the size; logits move by ~1e-3)


def joined(logit: Any, probability: Any, weight: float) -> Any:
    """A pair model's logit joined with a fitted model's probability for the same thing (scalars or arrays):
    sigmoid(weight * logit + (1 - weight) * log-odds(probability)), the probability kept inside [1e-6, 1 - 1e-6]."""
    p = np.clip(probability, 1e-6, 1.0 - 1e-6)
    return 1.0 / (1.0 + np.exp(-(weight * logit + (1.0 - weight) * np.log(p / (1.0 - p)))))


_T = TypeVar("_T")


class LoadOnce(Generic[_T]):
    """A model loaded on first use, once: `get()` loads it (None when it cannot be), and callers meanwhile wait for
    that load. Its own lock, so nothing else waits while a pair model loads (seconds)."""

    def __init__(self, load: Callable[[], _T | None], value: _T | None = None) -> None:
        self._load = load
        self._value = value
        self.tried = value is not None  # a value given up front counts as loaded
        self._lock = threading.Lock()

    def get(self) -> _T | None:
        with self._lock:
            if not self.tried:
                self.tried = True
                self._value = self._load()
            return self._value


class Remembering:
    """`logits(pairs)`: one float per (first, second) pair, the last RECENT_PAIRS pairs remembered; subclasses score
    a batch of new pairs (`_scores`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recent: dict[tuple[str, str], float] = {}  # the last RECENT_PAIRS pairs scored

    def _scores(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        raise NotImplementedError

    def logits(self, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> np.ndarray:
        """float64 (n,): the logit of each pair (> 0: yes)."""
        with self._lock:
            known = {pair: self._recent[pair] for pair in pairs if pair in self._recent}
            todo = list(dict.fromkeys(pair for pair in pairs if pair not in known))
            for i in range(0, len(todo), batch_size):
                batch = todo[i : i + batch_size]
                known.update(zip(batch, self._scores(batch)))
            for pair in todo:
                if len(self._recent) >= RECENT_PAIRS:
                    self._recent.pop(next(iter(self._recent)))
                self._recent[pair] = known[pair]
            return np.asarray([known[pair] for pair in pairs], dtype=np.float64)


class PairModel(Remembering):
    """A pair model on torch (training, and the first load, which writes the ONNX copy)."""

    def __init__(self, tokenizer: Any, model: Any, head: Any, max_length: int, truncation: str) -> None:
        super().__init__()
        self.tokenizer, self.model, self.head = tokenizer, model, head
        self.max_length, self.truncation = max_length, truncation

    @classmethod
    def load(cls, folder: Path, encoder_dir: Path, record: dict[str, Any], kind: PairKind) -> PairModel:
        """The model in `folder` (its manifest already read: `record`, `read_pair_model`) over the encoder weights it
        was trained on (`encoder_dir`)."""
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
        with warnings.catch_warnings():  # deprecation notices of transformers' own internals, mid-chat otherwise
            warnings.simplefilter("ignore")
            base = AutoModel.from_pretrained(str(encoder_dir))
            model = PeftModel.from_pretrained(base, str(folder / ADAPTER_FOLDER)).merge_and_unload().eval()
        weights = load_file(str(folder / HEAD_FILE))
        head = torch.nn.Linear(weights["weight"].shape[1], 1)
        head.load_state_dict(weights)
        max_length = readable_length(encoder_dir, int(record["config"]["max_length"]))
        return cls(tokenizer, model, head.eval(), max_length, kind.truncation)

    def forward(self, pairs: Sequence[tuple[str, str]]) -> Any:
        """The logits of a batch of pairs, as a torch tensor (training calls this with gradients on)."""
        first, second = zip(*pairs)
        encoded = self.tokenizer(
            list(first),
            list(second),
            truncation=self.truncation,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1)).squeeze(-1)

    def _scores(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        import torch

        with torch.inference_mode():
            return [float(x) for x in self.forward(pairs).double().tolist()]


class OnnxPairModel(Remembering):
    """The same logits from a pair model's ONNX copy (`onnx_encoder`'s export of the merged transformer): the
    tokenizers library, onnxruntime and the head in NumPy — no torch import, 0.3 s to load."""

    def __init__(self, body: Any, tokenizer_file: Path, head_file: Path, max_length: int, truncation: str) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        super().__init__()
        self.body = body
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(max_length, strategy=truncation)
        self.tokenizer.enable_padding()  # the pad id does not matter: padded positions are masked out
        head = load_file(str(head_file))
        self.weight = head["weight"].astype(np.float64)  # (1, hidden)
        self.bias = head["bias"].astype(np.float64)  # (1,)

    def _scores(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        encoded = self.tokenizer.encode_batch(list(pairs))
        ids = np.array([e.ids for e in encoded], np.int64)
        mask = np.array([e.attention_mask for e in encoded], np.int64)
        hidden = self.body(ids, mask).astype(np.float64)  # (b, tokens, hidden)
        weights = mask[:, :, None].astype(np.float64)
        pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        return (pooled @ self.weight.T + self.bias).reshape(-1).tolist()


def readable_length(encoder_dir: Path, max_length: int) -> int:
    """`max_length`, or the encoder's position limit when that is shorter (a longer pair would not run)."""
    try:
        positions = json.loads((encoder_dir / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return max_length
    return min(max_length, int(positions)) if isinstance(positions, int) and positions > 0 else max_length


def copy_key(folder: Path, encoder_fingerprint: str) -> str:
    """What the pair model's ONNX copy is keyed on: its adapter and head, and the encoder under them."""
    digest = hashlib.sha256(encoder_fingerprint.encode("utf-8"))
    for name in (f"{ADAPTER_FOLDER}/adapter_model.safetensors", HEAD_FILE):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def read_pair_model(folder: Path, kind: PairKind) -> dict[str, Any]:
    """The model's manifest, checked: one-line errors naming the folder and the command that makes one."""
    path = folder / kind.manifest
    fix = f"run `ohlora-rag {kind.command}`"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: unreadable {kind.what} manifest ({exc}) — {fix}") from None
    if not isinstance(record, dict) or record.get("format") != kind.format or "config" not in record:
        raise DataFormatError(f"{path}: not a {kind.what} of this version — {fix}")
    for name in (HEAD_FILE, f"{ADAPTER_FOLDER}/adapter_config.json", f"{ADAPTER_FOLDER}/adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise DataFormatError(f"{folder}: {name} is missing — {fix}")
    return record


def load_pair_model(folder: Path, kind: PairKind, paths: Any, default_encoder: str) -> Remembering | None:
    """The model in `folder` over the encoder its manifest names: its ONNX copy (models/cache/onnx-pair-*) when there
    is one, else on torch — then the copy is written for the next load (best effort). None, with one warning on
    stderr, when it cannot be loaded (the caller then decides without it)."""
    from . import onnx_encoder
    from .models import resolve

    try:
        record = read_pair_model(folder, kind)
        base = resolve(str(record.get("encoder") or default_encoder), "encoder", paths)
        key = copy_key(folder, base.fingerprint)
        max_length = readable_length(base.path, int(record["config"]["max_length"]))
        tokenizer = base.path / "tokenizer.json"
        body = onnx_encoder.load(paths.cache_dir, key, COPY_PREFIX) if tokenizer.is_file() else None
        if body is None:
            model = PairModel.load(folder, base.path, record, kind)
            if not tokenizer.is_file() or onnx_encoder.export(model.model, key, paths.cache_dir, COPY_PREFIX) is None:
                return model
            body = onnx_encoder.load(paths.cache_dir, key, COPY_PREFIX)
            if body is None:
                return model
        # the copy from here on, also right after writing it: every caller scores with the same numbers
        return OnnxPairModel(body, tokenizer, folder / HEAD_FILE, max_length, kind.truncation)
    except (OhloraError, OSError, ImportError, RuntimeError, ValueError, KeyError) as exc:
        print(f"warning: the {kind.what} in {folder} was not loaded ({exc}); deciding without it", file=sys.stderr)
        return None


def train_pair_model(
    pairs: Sequence[tuple[str, str]],
    labels: Sequence[bool],
    encoder: ModelRef,
    out: Path,
    config: Any,
    kind: PairKind,
    record: dict[str, Any],
    progress: bool = False,
) -> dict[str, Any]:
    """Train a pair model on labelled pairs and write it to `out` (replaced only once complete).

    Args:
        encoder: the encoder the adapter goes on (the tutor encoder).
        config: the training settings (`epochs`, `batch_size`, `learning_rate`, `lora_*`, `max_length`, `seed`).
        record: what the manifest says besides the training (data, counts).

    Returns:
        The manifest written.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    from .generator import seed_everything
    from .training.common import config_record

    quiet_transformers()
    seed_everything(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(encoder.path))
    base = AutoModel.from_pretrained(str(encoder.path))
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=_TARGETS
    )
    model = get_peft_model(base, lora)
    head = torch.nn.Linear(base.config.hidden_size, 1)
    scorer = PairModel(tokenizer, model, head, readable_length(encoder.path, config.max_length), kind.truncation)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)
    per_epoch = (len(pairs) + config.batch_size - 1) // config.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.learning_rate, total_steps=config.epochs * per_epoch, pct_start=0.1
    )
    y = torch.tensor([float(x) for x in labels], dtype=torch.float32)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    head.train()
    for epoch in range(config.epochs):
        order = np.random.default_rng(config.seed + epoch).permutation(len(pairs))
        total = 0.0
        for i in range(0, len(pairs), config.batch_size):
            batch = order[i : i + config.batch_size]
            logits = scorer.forward([pairs[j] for j in batch])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[batch])
            if not torch.isfinite(loss):
                raise OhloraError(f"training the {kind.what} diverged at epoch {epoch + 1} — lower --lr")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
        losses.append(total / len(pairs))
        if progress:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    model.eval()
    manifest = {
        "format": kind.format,
        "made_by": f"ohlora-rag {kind.command}",
        "created": utc_timestamp(),
        "encoder": encoder.reference,
        **record,
        "data_hash": hashlib.sha256(json.dumps(list(pairs)).encode("utf-8")).hexdigest()[:16],
        "config": config_record(config),
        "metrics": {"loss": [round(v, 6) for v in losses], "seconds": round(time.perf_counter() - start, 1)},
    }
    with staged_folder(out) as staging:
        model.save_pretrained(str(staging / ADAPTER_FOLDER))
        (staging / ADAPTER_FOLDER / "README.md").unlink(missing_ok=True)  # peft's empty model card
        if kind.float16:
            weights = staging / ADAPTER_FOLDER / "adapter_model.safetensors"
            save_file({k: v.half().contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(staging / HEAD_FILE))
        write_json(staging / kind.manifest, manifest)
    return manifest
