"""train-sbert on the tiny S-BERT: weights change, files and manifest are written, resume works, bad input fails."""

from __future__ import annotations

import csv
import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ohlora_rag.config import Paths, SbertTrainConfig
from ohlora_rag.data import load_pairs
from ohlora_rag.errors import DataFormatError, UsageError
from ohlora_rag.training.sbert import split_by_question, train_sbert
from tests.conftest import CONCEPTS


def write_pairs(path: Path) -> Path:
    rows = []
    questions = {
        "what is precision ?": 1,
        "what is recall ?": 2,
        "what is dropout ?": 3,
        "what is lora ?": 4,
        "what is adam ?": 5,
    }
    for q, right in questions.items():
        for i, (_, _, text) in enumerate(CONCEPTS):
            rows.append(("train", q, text, 1.0 if i == right else 0.5 if i == right - 1 else 0.0))
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["data_type", "user_question", "rag_retrieved_data", "similarity_score"])
        w.writerows(rows)
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_two_steps_change_weights_and_write_files(tmp_path: Path, tiny_sbert: Path) -> None:
    data = write_pairs(tmp_path / "pairs.csv")  # 30 pairs; valid = 1 of 5 questions -> 24 train pairs
    config = SbertTrainConfig(
        data=data,
        base=str(tiny_sbert),
        epochs=1,
        batch_size=12,
        freeze_layers=1,
        out=tmp_path / "sbert",
        progress=False,
        bf16=False,
        loss="cosine",
    )
    report = train_sbert(config, Paths(tmp_path))
    assert report.steps == 2 and report.train_pairs == 24 and report.valid_pairs == 6
    out = tmp_path / "sbert"
    assert {"modules.json", "config.json", "tokenizer.json", "ohlora_model.json", "1_Pooling"} <= {
        p.name for p in out.iterdir()
    }
    before, after = _weights(tiny_sbert), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "encoder.layer.1.attention.self.query.weight" in changed
    frozen = {"embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"}
    assert not (changed & frozen)  # embeddings and the lowest layer stayed fixed
    manifest = json.loads((out / "ohlora_model.json").read_text())
    assert manifest["seed"] == 42 and manifest["base"] == str(tiny_sbert) and manifest["data_hash"]
    assert set(manifest["metrics"]) == {"pairs", "ranking", "calibration"}
    assert not (tmp_path / "sbert.checkpoints").exists()  # removed after a successful run


def test_resume(tmp_path: Path, tiny_sbert: Path) -> None:
    data = write_pairs(tmp_path / "pairs.csv")
    kw = dict(
        data=data,
        base=str(tiny_sbert),
        batch_size=12,
        out=tmp_path / "sbert",
        progress=False,
        bf16=False,
        freeze_layers=0,
        loss="cosine",
    )
    train_sbert(SbertTrainConfig(epochs=1, keep_checkpoints=True, **kw), Paths(tmp_path))  # type: ignore[arg-type]
    assert any((tmp_path / "sbert.checkpoints").glob("checkpoint-*"))
    again = train_sbert(SbertTrainConfig(epochs=2, resume=True, **kw), Paths(tmp_path))  # type: ignore[arg-type]
    assert again.steps == 2  # the second epoch only
    assert again.pairs_per_second == pytest.approx(again.train_pairs / again.seconds)  # one epoch of pairs


def test_resume_without_checkpoint_is_refused(tmp_path: Path, tiny_sbert: Path) -> None:
    data = write_pairs(tmp_path / "pairs.csv")
    with pytest.raises(UsageError, match="--resume: no checkpoint in"):
        train_sbert(SbertTrainConfig(data=data, base=str(tiny_sbert), resume=True, out=tmp_path / "s"), Paths(tmp_path))


def test_split_keeps_questions_apart(tmp_path: Path) -> None:
    pairs = load_pairs(write_pairs(tmp_path / "pairs.csv"))
    train, valid = split_by_question(pairs, 0.4, seed=1)
    assert not set(train.questions) & set(valid.questions) and len(set(valid.questions)) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user_question,rag_retrieved_data\nq,e\n", "missing column 'similarity_score'"),
        (
            "user_question,rag_retrieved_data,similarity_score\nq,e,1.5\n",
            "row 1, column 'similarity_score' is 1.5, outside [-1, 1]",
        ),
        (
            "user_question,rag_retrieved_data,similarity_score\nq,e,high\n",
            "row 1, column 'similarity_score' is 'high', not a number",
        ),
        ("user_question,rag_retrieved_data,similarity_score\nq,,0.5\n", "row 1, column 'rag_retrieved_data' is empty"),
    ],
)
def test_bad_pairs(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=re.escape(message)):
        load_pairs(path)


def test_original_pairs_file_loads() -> None:
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "sbert_train.csv"
    if not path.exists():
        pytest.skip("../shared/ohlora-data not present")
    assert len(load_pairs(path)) == 2100


def test_hybrid_loss_trains(tmp_path: Path, tiny_sbert: Path) -> None:
    data = write_pairs(tmp_path / "pairs.csv")
    config = SbertTrainConfig(
        data=data,
        base=str(tiny_sbert),
        epochs=1,
        batch_size=13,
        loss="hybrid",
        freeze_layers=0,
        out=tmp_path / "sbert",
        progress=False,
        bf16=False,
    )
    report = train_sbert(config, Paths(tmp_path))
    assert report.train_pairs == 24  # the 4 training questions x 6 entries
    assert report.steps == 2  # batches of whole questions: 2 questions (12 pairs) under --batch-size 13
    assert report.pairs_per_second > 0
    before, after = _weights(tiny_sbert), _weights(tmp_path / "sbert")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device", "model.safetensors"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    ],
)
def test_full_disk_is_one_line_and_keeps_the_model(
    tmp_path: Path, tiny_sbert: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    from sentence_transformers import SentenceTransformer
    from typer.testing import CliRunner

    from ohlora_rag.cli import app

    previous = tmp_path / "models" / "sbert"
    shutil.copytree(tiny_sbert, previous)
    before = _weights(previous)

    def full_disk(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr(SentenceTransformer, "save", full_disk)
    data = write_pairs(tmp_path / "pairs.csv")
    args = ["--home", str(tmp_path), "train-sbert", "--data", str(data), "--base", str(tiny_sbert), "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--loss", "cosine", "--freeze-layers", "0", "-q"])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: no space left on device") and "free some disk space" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    after = _weights(previous)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_keep_checkpoints_flag(tmp_path: Path, tiny_sbert: Path) -> None:
    from typer.testing import CliRunner

    from ohlora_rag.cli import app

    data = write_pairs(tmp_path / "pairs.csv")
    args = ["--home", str(tmp_path), "train-sbert", "--data", str(data), "--base", str(tiny_sbert), "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--loss", "cosine", "--freeze-layers", "0", "--keep-checkpoints", "-q"])
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "models" / "sbert.checkpoints").glob("checkpoint-*"))
