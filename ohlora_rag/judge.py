"""The follow-up judge: a cross-encoder that reads a conversation's topic and the next question together and says
whether the question follows the topic.

The follow-up model (`conversation.FollowModel`) sees the question and the topic only through scores — cosines,
match confidences, shares of shared words — so "how do I pick it without a hundred runs?" after learning rates and
"what's a GAN" after autoencoders look alike to it. The judge reads both texts: the topic's entry name and the
question(s) that set it, then the question with the entry it matches on its own (and whether that match was sure).
It is a pair model (`crossencoder.py`: the tutor encoder with a rank-8 LoRA adapter and a linear head), trained on labelled
conversations replayed with their labelled topics (`train_judge`, `ohlora-rag train-judge`), 2.7 MB. A conversation
averages its logit with the follow-up model's (`FollowModel.judge`: the judge's weight; `Conversation._follow`).

Where it comes from: `models/judge/` when `train-judge` wrote one, else the one that ships in the package
(`ohlora_rag/tutor/judge/`, made by `make tutor-judge`) for an index built with the shipped tutor encoder. It runs
on torch: the server loads it before it reports ready, `chat` in the background at start, anything else on a
conversation's first follow-up decision; a judge that cannot be loaded leaves the follow-up model deciding alone,
with one warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_TUTOR_ENCODER, JudgeTrainConfig, Paths
from .crossencoder import HEAD_FILE, PairKind, Remembering, load_pair_model, read_pair_model, train_pair_model
from .errors import DataFormatError

if TYPE_CHECKING:
    from .conversation import LabelledTurn
    from .models import ModelRef
    from .retriever import Retriever, SearchResult

#: A pair too long for the judge is cut from the end of its longer text (the topic's text is already its last
#: TOPIC_CHARS characters); cutting only one side fails on a pair whose other side alone is too long.
JUDGE = PairKind("follow-up judge", "judge.json", 1, "train-judge", "longest_first")
JUDGE_MANIFEST = JUDGE.manifest
JUDGE_HEAD = HEAD_FILE
SHIPPED_JUDGE = Path(__file__).resolve().parent / "tutor" / "judge"
#: Characters of the topic's text the judge reads (its end: the latest follow-ups), and of an entry's name.
TOPIC_CHARS = 200
NAME_CHARS = 80

#: A loaded judge: `logits(pairs)` says how much each question follows its topic (> 0: follows).
FollowJudge = Remembering


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


def read_judge(folder: Path) -> dict[str, Any]:
    """The judge's manifest, checked: one-line errors naming the folder."""
    return read_pair_model(folder, JUDGE)


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
    folder = judge_folder(paths.judge_dir, encoder)
    return None if folder is None else load_pair_model(folder, JUDGE, paths, DEFAULT_TUTOR_ENCODER)


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
    labels = [row.kind == "follow_up" for row in rows]
    if not rows or all(labels) or not any(labels):
        raise DataFormatError(f"{data}: training the judge needs both follow-ups and new questions")
    pairs = [pair_for(retriever, row.topic, row.topic_position, row.question, row.alone) for row in rows]
    record = {"data": data, "turns": len(pairs), "follow_ups": int(sum(labels))}
    return train_pair_model(pairs, labels, encoder, out, config, JUDGE, record, progress)
