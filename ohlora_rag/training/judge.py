"""`train-judge`: the follow-up judge (`ohlora_rag/judge.py`) trained on labelled conversations, replayed over the
published index with their labelled topics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import CONVERSATIONS_TRAIN_DATA, JudgeTrainConfig, Paths
from ..errors import UsageError


def train_judge_on(config: JudgeTrainConfig, paths: Paths) -> tuple[dict[str, Any], Path]:
    """Train the judge as `config` says and write it (default: models/judge/).

    Returns:
        The judge's manifest and the folder written.
    """
    from ..build import check_conversations
    from ..conversation import labelled_turns
    from ..data import load_conversations
    from ..judge import train_judge
    from ..models import resolve
    from ..retriever import Retriever

    source = config.conversations or paths.home / CONVERSATIONS_TRAIN_DATA
    if not Path(source).is_file():
        raise UsageError(f"--conversations {source}: no such file — give a labelled conversations file (JSON lines)")
    conversations = load_conversations(source)
    retriever = Retriever.load(paths=paths)
    retriever.verification = None  # turns are replayed as the entry decision scores them (`SearchResult.unverified`)
    if retriever.decision is None:
        raise UsageError(
            f"the index at {paths.index_dir} has no fitted entry decision — run `ohlora-rag build-index` (without "
            "--no-calibrate) first"
        )
    ids = set(retriever.positions_by_id())
    where = f"the index at {paths.index_dir}"
    check_conversations(conversations, ids, Path(source), where, "fix the file, or build the index of that DB")
    rows, _gated, _vectors = labelled_turns(retriever, conversations)
    encoder = resolve(config.encoder, "encoder", paths)
    out = config.out or paths.judge_dir
    resolved = Path(source).resolve()
    home = paths.home.resolve()
    label = str(resolved.relative_to(home)) if resolved.is_relative_to(home) else str(resolved)
    record = train_judge(retriever, rows, encoder, out, config, label, config.progress)
    return record, out
