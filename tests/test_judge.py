"""The follow-up judge: `train-judge` on a tiny encoder, build-index taking it up, conversations combining its logit
with the follow-up model's, and what happens when it is missing or damaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ohlora_rag.cli import app
from ohlora_rag.config import Paths
from ohlora_rag.conversation import JUDGE_CUTOFF, JUDGE_WEIGHT, Conversation, follow_features
from ohlora_rag.judge import JUDGE_HEAD, SHIPPED_JUDGE, judge_folder, pair_for
from ohlora_rag.retriever import Retriever

from .test_conversation import _conversations, _manifest, _write_calib, _write_conversations

runner = CliRunner()


def _train(home: Path, *extra: str) -> None:
    result = runner.invoke(app, ["train-judge", "--encoder", str(home / "models" / "sbert"), "--epochs", "2", *extra])
    assert result.exit_code == 0, result.output
    assert "trained on" in result.stdout and "build-index" in result.stdout


@pytest.fixture
def judged_home(home: Path) -> Path:
    """A home whose index has a follow-up model and a judge trained on the tiny encoder."""
    _write_calib(home)
    _write_conversations(home / "data" / "conversations_train.jsonl", _conversations())
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    assert _manifest(home)["follow"]["judge"] is None  # type: ignore[index]  # no judge yet (tiny encoder: not the shipped one's)
    _train(home, "-q")
    built = runner.invoke(app, ["build-index", "-q"])
    assert built.exit_code == 0, built.output
    assert "follow-up judge: weight" in built.stdout
    return home


def test_build_index_takes_up_a_trained_judge_and_conversations_use_it(
    judged_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    follow = _manifest(judged_home)["follow"]
    assert follow["judge"] == JUDGE_WEIGHT and follow["judge_cutoff"] == JUDGE_CUTOFF  # type: ignore[index]
    record = json.loads((judged_home / "models" / "judge" / "judge.json").read_text())
    assert record["turns"] > 0 and record["config"]["seed"] == 42 and len(record["metrics"]["loss"]) == 2

    retriever = Retriever.load(paths=Paths.resolve())
    retriever.preload()  # in the background; follow_judge waits for it and returns the same judge
    judge = retriever.follow_judge()
    assert judge is not None and retriever.follow is not None and retriever.follow_judge() is judge
    calls: list[int] = []
    logits = judge.logits
    monkeypatch.setattr(judge, "logits", lambda pairs, **kw: calls.append(len(pairs)) or logits(pairs, **kw))

    conversation = Conversation(retriever)
    conversation.search("what is precision")
    assert calls == []  # no topic yet: nothing to judge
    topic, position = conversation.topic, conversation.topic_position
    assert topic is not None and position is not None
    conversation.search("how is it computed?")
    assert calls == [1]
    # the decision is the model's probability combined with the judge's logit, against the combined cutoff
    alone = retriever.search("how is it computed?")
    together = retriever.search(f"{topic} how is it computed?")
    x = follow_features(
        retriever, "how is it computed?", retriever.query_vector("how is it computed?"), position, alone, together
    )
    logit = float(logits([pair_for(retriever, topic, position, "how is it computed?", alone)])[0])
    combined = retriever.follow.with_judge(logit, float(retriever.follow.probability(x[None, :])[0]))
    assert conversation.turns[-1].follow_up == (combined >= JUDGE_CUTOFF)

    plain = Conversation(retriever, judge=False)  # the model alone: the judge is not asked
    plain.search("what is precision")
    plain.search("how is it computed?")
    assert calls == [1]


def test_the_same_seed_trains_the_same_judge(judged_home: Path) -> None:
    from safetensors.torch import load_file

    _train(judged_home, "-q", "--out", str(judged_home / "again"))
    first = load_file(str(judged_home / "models" / "judge" / JUDGE_HEAD))
    again = load_file(str(judged_home / "again" / JUDGE_HEAD))
    assert all((first[k] == again[k]).all() for k in first)


def test_a_damaged_judge_leaves_the_model_deciding(judged_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (judged_home / "models" / "judge" / JUDGE_HEAD).unlink()
    retriever = Retriever.load(paths=Paths.resolve())
    assert retriever.follow_judge() is None
    assert "follow-up judge" in capsys.readouterr().err
    conversation = Conversation(retriever)
    conversation.search("what is precision")
    conversation.search("how is it computed?")  # decided by the model alone, no error
    assert len(conversation.turns) == 2


def test_no_judge_flag_and_the_shipped_judge_only_for_the_tutor_encoder(judged_home: Path) -> None:
    assert runner.invoke(app, ["build-index", "-q", "--no-judge"]).exit_code == 0
    assert _manifest(judged_home)["follow"]["judge"] is None  # type: ignore[index]
    conflict = runner.invoke(app, ["build-index", "--no-judge", "--no-conversations"])
    assert conflict.exit_code != 0 and "--no-judge" in conflict.output
    empty = judged_home / "nothing"
    expected = SHIPPED_JUDGE if (SHIPPED_JUDGE / "judge.json").is_file() else None
    assert judge_folder(empty, "ohlora-tutor-e5") == expected
    assert judge_folder(empty, "multilingual-e5-small") is None
    assert judge_folder(judged_home / "models" / "judge", "anything") == judged_home / "models" / "judge"


def test_train_judge_bad_input_is_one_line(home: Path) -> None:
    missing = runner.invoke(app, ["train-judge", "--conversations", str(home / "nope.jsonl")])
    assert missing.exit_code != 0 and "nope.jsonl" in missing.output and "Traceback" not in missing.output
    _write_conversations(home / "data" / "conversations_train.jsonl", _conversations())
    assert runner.invoke(app, ["build-index", "-q", "--no-calibrate"]).exit_code == 0
    undecided = runner.invoke(app, ["train-judge", "--encoder", str(home / "models" / "sbert")])
    assert undecided.exit_code != 0 and "entry decision" in undecided.output
    zero = runner.invoke(app, ["train-judge", "--epochs", "0"])
    assert zero.exit_code != 0 and "--epochs 0" in zero.output
    assert not (home / "models" / "judge").exists()


def test_a_replayed_history_is_judged_once(judged_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server replays a conversation's history on every request: the judge answers the second time from memory."""
    retriever = Retriever.load(paths=Paths.resolve())
    judge = retriever.follow_judge()
    assert judge is not None
    history = ["what is precision", "how is it computed?", "and why does that help?", "what is dropout", "example?"]
    first = Conversation.replay(retriever, history)
    forwards: list[int] = []
    scores = judge._scores
    monkeypatch.setattr(judge, "_scores", lambda pairs: forwards.append(len(pairs)) or scores(pairs))
    again = Conversation.replay(retriever, history)
    assert forwards == [] and [t.follow_up for t in again.turns] == [t.follow_up for t in first.turns]
    fresh = judge.logits([("topic: x | asked: y", "a question never judged | alone: nothing (unsure)")] * 2)
    assert forwards == [1] and fresh[0] == fresh[1]


def test_a_question_longer_than_the_judge_reads_is_cut_not_an_error(judged_home: Path) -> None:
    retriever = Retriever.load(paths=Paths.resolve())
    conversation = Conversation(retriever)
    conversation.search("what is precision")
    conversation.search("and why " * 400 + "?")  # longer than --max-length on its own
    assert len(conversation.turns) == 2
