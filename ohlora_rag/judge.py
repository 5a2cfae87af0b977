"""The follow-up judge: a cross-encoder that reads a conversation's topic and the next question together and says
whether the question follows the topic.

The follow-up model (`conversation.FollowModel`) sees the question and the topic only through scores — cosines,
match confidences, shares of shared words — so "how do I pick it without a hundred runs?" after learning rates and
"what's a GAN" after autoencoders look alike to it. The judge reads both texts: the topic's entry name and the
question(s) that set it, then the question with the entry it matches on its own (and whether that match was sure).
It is the tutor encoder with a rank-8 LoRA adapter and a linear head over its mean-pooled tokens, trained on labelled
conversations replayed with their labelled topics (`train_judge`, `ohlora-rag train-judge`), 2.7 MB. A conversation
averages its logit with the follow-up model's (`FollowModel.judge`: the judge's weight; `Conversation._follow`).

Where it comes from: `models/judge/` when `train-judge` wrote one, else the one that ships in the package
(`ohlora_rag/tutor/judge/`, made by `make tutor-judge`) for an index built with the shipped tutor encoder. It runs
on torch: the server loads it before it reports ready, `chat` in the background at start, anything else on a
conversation's first follow-up decision; a judge that cannot be loaded leaves the follow-up model deciding alone,
with one warning.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .artifacts import staged_folder, utc_timestamp, write_json
from .config import DEFAULT_TUTOR_ENCODER, JudgeTrainConfig, Paths
from .device import quiet_transformers
from .errors import DataFormatError, OhloraError

if TYPE_CHECKING:
    from .conversation import LabelledTurn
    from .models import ModelRef
    from .retriever import Retriever, SearchResult

JUDGE_MANIFEST = "judge.json"
JUDGE_HEAD = "head.safetensors"
JUDGE_ADAPTER = "adapter"
JUDGE_FORMAT = 1
SHIPPED_JUDGE = Path(__file__).resolve().parent / "tutor" / "judge"
#: Characters of the topic's text the judge reads (its end: the latest follow-ups), and of an entry's name.
TOPIC_CHARS = 200
NAME_CHARS = 80
#: Judged pairs remembered (as the retriever remembers query vectors).
RECENT_PAIRS = 4096


def judge_pair(topic_name: str, topic: str, question: str, own_name: str | None, own_sure: bool) -> tuple[str, str]:
    """The two texts the judge reads: the topic (its entry's name, the questions on it) and the question (with the
    entry it matches alone, and whether the entry decision chose that entry)."""
    own = own_name[:NAME_CHARS] if own_name else "nothing"
    return (
        f"topic: {topic_name[:NAME_CHARS]} | asked: {topic[-TOPIC_CHARS:]}",
        f"{question} | alone: {own} ({'sure' if own_sure else 'unsure'})",
    )


def entry_name(text: str) -> str:
    """An entry's name: its text before " : " (the whole text when it has none)."""
    return text.split(" : ", 1)[0]


def pair_for(
    retriever: Retriever, topic: str, topic_position: int, question: str, alone: SearchResult
) -> tuple[str, str]:
    """`judge_pair` for a question searched alone (`alone`) after a topic (its text and entry)."""
    top = alone.hits[0] if alone.hits else None
    own = entry_name(retriever.stored.entry(top.position)["text"]) if top else None
    topic_name = entry_name(retriever.stored.entry(topic_position)["text"])
    return judge_pair(topic_name, topic, question, own, bool(top and top.matched))


_TARGETS = ["query", "key", "value", "dense"]


class FollowJudge:
    """A loaded judge: `logits(pairs)` says how much each question follows its topic (> 0: follows)."""

    def __init__(self, tokenizer: Any, model: Any, head: Any, max_length: int) -> None:
        self.tokenizer, self.model, self.head, self.max_length = tokenizer, model, head, max_length
        self._lock = threading.Lock()
        self._recent: dict[tuple[str, str], float] = {}  # the last RECENT_PAIRS pairs judged

    @classmethod
    def load(cls, folder: Path, encoder_dir: Path, record: dict[str, Any]) -> FollowJudge:
        """The judge in `folder` (its manifest already read: `record`, `read_judge`) over the encoder weights it was
        trained on (`encoder_dir`)."""
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
        with warnings.catch_warnings():  # deprecation notices of transformers' own internals, mid-chat otherwise
            warnings.simplefilter("ignore")
            base = AutoModel.from_pretrained(str(encoder_dir))
            model = PeftModel.from_pretrained(base, str(folder / JUDGE_ADAPTER)).merge_and_unload().eval()
        weights = load_file(str(folder / JUDGE_HEAD))
        head = torch.nn.Linear(weights["weight"].shape[1], 1)
        head.load_state_dict(weights)
        return cls(tokenizer, model, head.eval(), int(record["config"]["max_length"]))

    def _forward(self, pairs: Sequence[tuple[str, str]]) -> Any:
        first, second = zip(*pairs)
        encoded = self.tokenizer(
            list(first),
            list(second),
            truncation="only_first",
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1)).squeeze(-1)

    def logits(self, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> np.ndarray:
        """float64 (n,): the judge's logit per (topic, question) pair. The last RECENT_PAIRS pairs are remembered:
        the server replays a conversation's history on every request, and each replayed turn asks again."""
        import torch

        with self._lock:
            known = {pair: self._recent[pair] for pair in pairs if pair in self._recent}
            todo = list(dict.fromkeys(pair for pair in pairs if pair not in known))
            with torch.inference_mode():
                for i in range(0, len(todo), batch_size):
                    batch = todo[i : i + batch_size]
                    known.update(zip(batch, self._forward(batch).double().tolist()))
            for pair in todo:
                if len(self._recent) >= RECENT_PAIRS:
                    self._recent.pop(next(iter(self._recent)))
                self._recent[pair] = known[pair]
            return np.asarray([known[pair] for pair in pairs], dtype=np.float64)


def read_judge(folder: Path) -> dict[str, Any]:
    """The judge's manifest, checked: one-line errors naming the folder."""
    path = folder / JUDGE_MANIFEST
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: unreadable judge manifest ({exc}) — run `ohlora-rag train-judge`") from None
    if not isinstance(record, dict) or record.get("format") != JUDGE_FORMAT or "config" not in record:
        raise DataFormatError(f"{path}: not a judge of this version — run `ohlora-rag train-judge`")
    for name in (JUDGE_HEAD, f"{JUDGE_ADAPTER}/adapter_config.json", f"{JUDGE_ADAPTER}/adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise DataFormatError(f"{folder}: {name} is missing — run `ohlora-rag train-judge`")
    return record


def judge_folder(user_dir: Path, encoder: str) -> Path | None:
    """Where the judge is: `user_dir` (models/judge/) when `train-judge` wrote one there; else the shipped one, for an
    index built with the shipped tutor encoder (whose decisions it was trained and tuned on); else None."""
    if (user_dir / JUDGE_MANIFEST).is_file():
        return user_dir
    if encoder == DEFAULT_TUTOR_ENCODER and (SHIPPED_JUDGE / JUDGE_MANIFEST).is_file():
        return SHIPPED_JUDGE
    return None


def load_judge(paths: Paths, encoder: str) -> FollowJudge | None:
    """The judge to use for an index built with `encoder` (`judge_folder`), over the encoder its manifest names; None
    when there is none, or (with one warning on stderr) when it cannot be loaded."""
    from .models import resolve

    folder = judge_folder(paths.judge_dir, encoder)
    if folder is None:
        return None
    try:
        record = read_judge(folder)
        base = resolve(str(record.get("encoder") or DEFAULT_TUTOR_ENCODER), "encoder", paths)
        return FollowJudge.load(folder, base.path, record)
    except (OhloraError, OSError, ImportError, RuntimeError, ValueError, KeyError) as exc:
        print(
            f"warning: the follow-up judge in {folder} was not loaded ({exc}); follow-ups are decided without it",
            file=sys.stderr,
        )
        return None


def train_judge(
    retriever: Retriever,
    rows: Sequence[LabelledTurn],
    encoder: ModelRef,
    out: Path,
    config: JudgeTrainConfig,
    data: str,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a judge on labelled turns (`conversation.labelled_turns`: the turns the follow-up model decides) and
    write it to `out` (replaced only once complete).

    Args:
        retriever: the index the turns were replayed on (entry names, and what each question matched alone).
        encoder: the encoder the judge's adapter goes on (the tutor encoder).
        data: the conversations file, for the manifest.

    Returns:
        The manifest written.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    from .generator import seed_everything
    from .training.common import config_record

    labels = [row.kind == "follow_up" for row in rows]
    if not rows or all(labels) or not any(labels):
        raise DataFormatError(f"{data}: training the judge needs both follow-ups and new questions")
    pairs = [pair_for(retriever, row.topic, row.topic_position, row.question, row.alone) for row in rows]
    quiet_transformers()
    seed_everything(config.seed)
    encoder_dir = encoder.path
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    base = AutoModel.from_pretrained(str(encoder_dir))
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=_TARGETS
    )
    model = get_peft_model(base, lora)
    head = torch.nn.Linear(base.config.hidden_size, 1)
    judge = FollowJudge(tokenizer, model, head, config.max_length)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)
    per_epoch = (len(pairs) + config.batch_size - 1) // config.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.learning_rate, total_steps=config.epochs * per_epoch, pct_start=0.1
    )
    y = torch.tensor(labels, dtype=torch.float32)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    head.train()
    for epoch in range(config.epochs):
        order = np.random.default_rng(config.seed + epoch).permutation(len(pairs))
        total = 0.0
        for i in range(0, len(pairs), config.batch_size):
            batch = order[i : i + config.batch_size]
            logits = judge._forward([pairs[j] for j in batch])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[batch])
            if not torch.isfinite(loss):
                raise OhloraError(f"training the judge diverged at epoch {epoch + 1} — lower --learning-rate")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
        losses.append(total / len(pairs))
        if progress:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    model.eval()
    record = {
        "format": JUDGE_FORMAT,
        "made_by": "ohlora-rag train-judge",
        "created": utc_timestamp(),
        "encoder": encoder.reference,
        "data": data,
        "data_hash": hashlib.sha256(json.dumps(pairs).encode("utf-8")).hexdigest()[:16],
        "turns": len(pairs),
        "follow_ups": int(sum(labels)),
        "config": config_record(config),
        "metrics": {"loss": [round(v, 6) for v in losses], "seconds": round(time.perf_counter() - start, 1)},
    }
    with staged_folder(out) as staging:
        model.save_pretrained(str(staging / JUDGE_ADAPTER))
        (staging / JUDGE_ADAPTER / "README.md").unlink(missing_ok=True)  # peft's empty model card
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(staging / JUDGE_HEAD))
        write_json(staging / JUDGE_MANIFEST, record)
    return record
