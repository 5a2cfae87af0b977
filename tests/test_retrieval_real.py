"""Integration: the real base encoder retrieves the right entries on the project's DB and on the original DB."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ohlora_rag.build import build_index
from ohlora_rag.config import IndexConfig, Paths, SearchConfig
from ohlora_rag.conversation import Conversation
from ohlora_rag.retriever import Retriever
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _home_with_encoder(tmp_path: Path, e5_home: Paths, e5_folder: Path) -> Paths:
    paths = Paths(tmp_path / "home")
    shutil.copytree(e5_folder, paths.base_models_dir / "multilingual-e5-small")
    return paths


def test_default_db_cosine_question(tmp_path: Path, e5_home: Paths, e5_folder: Path) -> None:
    paths = _home_with_encoder(tmp_path, e5_home, e5_folder)
    config = IndexConfig(db=ROOT / "data" / "concepts.csv", encoder="multilingual-e5-small", progress=False)
    report = build_index(config, paths)
    assert report.manifest.count >= 150 and report.manifest.encoder == "multilingual-e5-small"
    retriever = Retriever.load(SearchConfig(encoder="multilingual-e5-small"), paths)
    results = retriever.search_many(["What is cosine similarity?", "how does LoRA work", "what does dropout do?"], 3)
    assert [r.hits[0].id for r in results] == ["cosine-similarity", "lora", "dropout"]


@pytest.mark.skipif(not (SHARED_DATA / "concept_db.txt").exists(), reason="../shared/ohlora-data not present")
def test_original_db_korean_cosine_question(tmp_path: Path, e5_home: Paths, e5_folder: Path) -> None:
    paths = _home_with_encoder(tmp_path, e5_home, e5_folder)
    config = IndexConfig(db=SHARED_DATA / "concept_db.txt", encoder="multilingual-e5-small", progress=False)
    report = build_index(config, paths)
    assert report.manifest.count == 88
    hit = (
        Retriever.load(SearchConfig(encoder="multilingual-e5-small"), paths).search("코사인 유사도가 뭐야?", 3).hits[0]
    )
    assert hit.text.startswith("cosine similarity (코사인 유사도)")


@pytest.mark.skipif(not (ROOT / "ohlora_rag" / "tutor" / "encoder_top.safetensors").exists(), reason="no shipped tutor")
def test_default_tutor_encoder_and_decision_answer_or_decline(tmp_path: Path, e5_home: Paths, e5_folder: Path) -> None:
    """Out of the box: the shipped tutor encoder, the decision fitted on data/trust_calib.csv, the follow-up model
    fitted on data/conversations_train.jsonl."""
    paths = _home_with_encoder(tmp_path, e5_home, e5_folder)
    config = IndexConfig(
        db=ROOT / "data" / "concepts.csv",
        calibration=ROOT / "data" / "trust_calib.csv",
        conversations=ROOT / "data" / "conversations_train.jsonl",
        progress=False,
    )
    report = build_index(config, paths)
    assert report.manifest.encoder == "ohlora-tutor-e5" and report.decision is not None and report.follow is not None
    results = Retriever.load(SearchConfig(), paths).search_many(
        ["What is cosine similarity?", "dropout 이 뭐야?", "Who won the 2030 World Cup?", "🤖🤖🤖"], 3
    )
    assert [r.best.id if r.best else None for r in results] == ["cosine-similarity", "dropout", None, None]
    assert all(r.decision == "model" for r in results)
    retriever = Retriever.load(SearchConfig(), paths)
    assert retriever.follow is not None
    conversation = Conversation(retriever)
    asked = ["What is precision?", "how is it computed?", "ok and what is recall?", "what's the weather in Seoul?"]
    got = [(r.best.id if r.best else None) for r in map(conversation.search, asked)]
    assert got == ["precision", "precision", "recall", None]
    assert [t.follow_up for t in conversation.turns] == [False, True, False, False]
    # the shipped follow-up judge (ohlora_rag/tutor/judge/) is taken up for the shipped tutor encoder and reads the
    # topic and the question together: an obvious follow-up scores above an obvious new question
    if (ROOT / "ohlora_rag" / "tutor" / "judge" / "judge.json").exists():
        from ohlora_rag.judge import judge_pair

        assert report.follow.judge is not None
        judge = retriever.follow_judge()
        assert judge is not None
        topic = "Precision (정밀도) : share of predicted positives that are right"
        follow, new = judge.logits(
            [
                judge_pair(topic, "What is precision?", "how is it computed?", "Precision", False),
                judge_pair(topic, "What is precision?", "what's the weather in Seoul?", "Epoch", False),
            ]
        )
        assert follow > 0 > new
    # the shipped entry verifier (ohlora_rag/tutor/verifier/) is joined to the decision for the project's DB, and a
    # given entry passes the verified decision only when it answers the question
    if (ROOT / "ohlora_rag" / "tutor" / "verifier" / "verifier.json").exists():
        assert report.verification is not None and retriever.entry_verifier() is not None
        text = {i: retriever.stored.entry(p)["text"] for i, p in retriever.positions_by_id().items()}
        assert retriever.entry_fits("What is precision?", text["precision"])
        assert not retriever.entry_fits("What is precision?", text["recall"])
        assert not retriever.entry_fits("Who won the 2030 World Cup?", text["adamw"])
