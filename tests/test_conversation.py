"""Follow-up questions: the hand-written rule, the fitted follow-up model that build-index stores with the index, and
the errors around its file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ohlora_rag.cli import app
from ohlora_rag.config import IndexConfig, Paths, SearchConfig
from ohlora_rag.conversation import (
    FOLLOW_FEATURES,
    Conversation,
    FollowModel,
    follow_features,
    points_back,
    refers_back,
)
from ohlora_rag.errors import DataFormatError, UsageError
from ohlora_rag.retriever import Retriever

from .test_decision import CALIB, _write

runner = CliRunner()

TOPICS = [
    ("precision", "what is precision"),
    ("recall", "explain recall"),
    ("dropout", "what does dropout do"),
    ("lora", "what is lora"),
    ("adam", "what is the adam optimiser"),
    ("cosine-similarity", "what is cosine similarity"),
]
FOLLOW_UPS = ["how is it computed?", "why does that help?", "example?", "and its drawbacks?"]
OFF_TOPIC = ["who won the cup yesterday", "how do i bake bread", "best pizza in naples"]


def _conversations() -> list[dict[str, object]]:
    """Each topic asked, followed up, then a switch to the next topic (or an off-topic question)."""
    out = []
    for i, (concept, question) in enumerate(TOPICS):
        nxt_concept, nxt_question = TOPICS[(i + 1) % len(TOPICS)]
        turns = [
            {"q": question, "concept_id": concept, "kind": "first"},
            {"q": FOLLOW_UPS[i % len(FOLLOW_UPS)], "concept_id": concept, "kind": "follow_up"},
            {"q": nxt_question, "concept_id": nxt_concept, "kind": "switch"},
            {"q": FOLLOW_UPS[(i + 1) % len(FOLLOW_UPS)], "concept_id": nxt_concept, "kind": "follow_up"},
            {"q": OFF_TOPIC[i % len(OFF_TOPIC)], "concept_id": None, "kind": "offtopic_switch"},
        ]
        out.append({"id": f"c{i}", "turns": turns})
    return out


def _write_conversations(path: Path, conversations: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations), encoding="utf-8")
    return path


def _write_calib(home: Path) -> None:
    _write(home / "data" / "trust_calib.csv", ["question", "kind", "concept_id"], CALIB)


def _manifest(home: Path) -> dict[str, object]:
    current = (home / "index" / "CURRENT").read_text().strip()
    return json.loads((home / "index" / current / "manifest.json").read_text())


def test_rule_words_that_point_back() -> None:
    assert points_back("is it sensitive to outliers?") and points_back("그거 왜 써?")
    assert not points_back("what is recall?")
    assert refers_back("example?") and refers_back("그럼 단점은?") and refers_back("and the formula")
    assert not refers_back("what does dropout randomly zero during training")


def test_build_index_fits_the_follow_up_model_and_conversations_use_it(home: Path) -> None:
    _write_calib(home)
    _write_conversations(home / "data" / "conversations_train.jsonl", _conversations())
    built = runner.invoke(app, ["build-index", "-q"])
    assert built.exit_code == 0, built.output
    assert "follow-up model fitted on" in built.stdout and "(24 turns)" in built.stdout
    follow = _manifest(home)["follow"]
    assert isinstance(follow, dict) and follow["features"] == list(FOLLOW_FEATURES)
    assert 0.0 < follow["cutoff"] < 1.0 and follow["metrics"]["turns"] == 24

    retriever = Retriever.load(paths=Paths.resolve())
    assert retriever.follow is not None
    conversation = Conversation(retriever)
    first = conversation.search("what is precision")
    assert first.best is not None and first.best.id == "precision"
    conversation.search("how is it computed?")
    assert conversation.turns[-1].follow_up
    assert conversation.turns[-1].query == "what is precision how is it computed?"
    # the model's choice is its probability against its cutoff, on the features of both searches
    model = retriever.follow
    alone = retriever.search("how is it computed?")
    together = retriever.search("what is precision how is it computed?")
    assert conversation.topic_position is not None
    vector = retriever.query_vector("how is it computed?")
    x = follow_features(retriever, "how is it computed?", vector, conversation.topic_position, alone, together)
    assert x.shape == (len(FOLLOW_FEATURES),) and np.isfinite(x).all()
    assert 0.0 <= float(model.probability(x[None, :])[0]) <= 1.0

    # a threshold search has no entry decision, so no follow-up model: the rule decides
    plain = Retriever.load(SearchConfig(threshold=0.5))
    assert plain.follow is None

    report = runner.invoke(app, ["evaluate-conversations", "--data", str(home / "data" / "conversations_train.jsonl")])
    assert report.exit_code == 0, report.output
    assert "rule: right" in report.stdout and "the fitted follow-up model" in report.stdout
    payload = json.loads(
        runner.invoke(
            app, ["evaluate-conversations", "--data", str(home / "data" / "conversations_train.jsonl"), "--json"]
        ).stdout
    )
    assert set(payload) == {"data", "memory", "alone", "rule"}
    assert payload["memory"]["turns"] == {"first": 6, "follow_up": 12, "switch": 6, "offtopic_switch": 6}


def test_no_conversations_keeps_the_rule(home: Path) -> None:
    _write_calib(home)
    _write_conversations(home / "data" / "conversations_train.jsonl", _conversations())
    assert runner.invoke(app, ["build-index", "-q", "--no-conversations"]).exit_code == 0
    assert _manifest(home)["follow"] is None
    retriever = Retriever.load(paths=Paths.resolve())
    assert retriever.follow is None
    conversation = Conversation(retriever)
    conversation.search("what is precision")
    conversation.search("how is it computed?")  # "it": the rule follows the topic
    assert conversation.turns[-1].follow_up
    report = runner.invoke(app, ["evaluate-conversations", "--data", str(home / "data" / "conversations_train.jsonl")])
    assert report.exit_code == 0 and "rule: right" not in report.stdout and "hand-written" in report.stdout
    # without --data it measures the one file no shipped part was trained or chosen on, and says so when it is missing
    missing = runner.invoke(app, ["evaluate-conversations"])
    assert missing.exit_code != 0 and "conversations_holdout5.jsonl not found" in missing.output
    assert "Traceback" not in missing.output
    held_out = home / "data" / "conversations_holdout5.jsonl"
    held_out.write_bytes((home / "data" / "conversations_train.jsonl").read_bytes())
    report = runner.invoke(app, ["evaluate-conversations"])
    assert report.exit_code == 0 and "conversations_holdout5.jsonl: " in report.stdout.splitlines()[0]


def test_a_conversation_naming_an_unknown_entry_fails_before_encoding(home: Path, tmp_path: Path) -> None:
    _write_calib(home)
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    before = (home / "index" / "CURRENT").read_text()
    rows = _conversations()
    rows[2]["turns"][1]["concept_id"] = "xgboost"  # type: ignore[index]
    bad = _write_conversations(tmp_path / "conv.jsonl", rows)
    result = runner.invoke(app, ["build-index", "-q", "--conversations", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {bad}: concept_id 'xgboost' is not an entry of {home / 'data' / 'concepts.csv'} — fix the file, "
        "or give --no-conversations"
    )
    assert (home / "index" / "CURRENT").read_text() == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json\n", "line 1: not a conversation"),
        ('{"turns": [{"q": "hi", "concept_id": null, "kind": "chat"}]}\n', "kind 'chat'"),
        ("", "holds no conversations"),
        ('{"turns": [{"q": "  ", "concept_id": null, "kind": "first"}]}\n', "line 1: a turn with an empty question"),
    ],
)
def test_an_unreadable_conversations_file_is_one_line(home: Path, tmp_path: Path, content: str, message: str) -> None:
    _write_calib(home)
    bad = tmp_path / "conv.jsonl"
    bad.write_text(content, encoding="utf-8")
    result = runner.invoke(app, ["build-index", "-q", "--conversations", str(bad)])
    assert result.exit_code == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (home / "index" / "CURRENT").exists()


def test_only_new_questions_cannot_fit_a_model(home: Path, tmp_path: Path) -> None:
    _write_calib(home)
    firsts = [{"id": "a", "turns": [{"q": q, "concept_id": c, "kind": "first"} for c, q in TOPICS[:2]]}]
    firsts[0]["turns"][1]["kind"] = "switch"  # type: ignore[index]
    path = _write_conversations(tmp_path / "conv.jsonl", firsts)
    result = runner.invoke(app, ["build-index", "-q", "--conversations", str(path)])
    assert result.exit_code == 1
    assert "fitting the follow-up model needs both follow-ups and new questions" in result.stderr


def test_conflicting_flags(home: Path) -> None:
    result = runner.invoke(app, ["build-index", "--conversations", "x.jsonl", "--no-conversations"])
    assert result.exit_code == 2 and "--conversations and --no-conversations: give one of them" in result.stderr
    with pytest.raises(UsageError, match="needs the entry decision"):
        IndexConfig(conversations=Path("x.jsonl"), calibrate=False)


def test_a_stored_model_of_another_version_is_refused() -> None:
    model = FollowModel(
        coef=[0.0] * len(FOLLOW_FEATURES),
        intercept=0.0,
        mean=[0.0] * len(FOLLOW_FEATURES),
        scale=[1.0] * len(FOLLOW_FEATURES),
        cutoff=0.5,
    )
    assert FollowModel.from_dict(model.to_dict(), "m.json") == model
    with pytest.raises(DataFormatError, match="follow-up model of another version"):
        FollowModel.from_dict({**model.to_dict(), "version": 99}, "m.json")
    with pytest.raises(DataFormatError, match="not 17 finite numbers"):
        FollowModel.from_dict({**model.to_dict(), "coef": [float("nan")] * len(FOLLOW_FEATURES)}, "m.json")


def test_a_replayed_history_encodes_nothing_again(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server replays a conversation's earlier questions on every request: the second time, from memory."""
    assert runner.invoke(app, ["build-index", "-q", "--no-calibrate"]).exit_code == 0
    retriever = Retriever.load(paths=Paths.resolve())
    history = [f"and what about dropout rate number {i}?" for i in range(50)]
    Conversation.replay(retriever, history)
    encoded: list[int] = []
    encode = retriever.encoder.encode_queries
    monkeypatch.setattr(
        retriever.encoder, "encode_queries", lambda texts, **kw: encoded.append(len(texts)) or encode(texts, **kw)
    )
    again = Conversation.replay(retriever, history)
    assert encoded == [] and len(again.turns) == 50 and any(t.follow_up for t in again.turns)
