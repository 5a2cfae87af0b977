"""Integration: the real base encoder retrieves the right entries on the project's DB and on the original DB."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ohlora_rag.config import IndexConfig, Paths, SearchConfig
from ohlora_rag.indexing import build_index
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
    report = build_index(IndexConfig(db=ROOT / "data" / "concepts.csv", progress=False), paths)
    assert report.manifest.count >= 150 and report.manifest.encoder == "multilingual-e5-small"
    retriever = Retriever.load(SearchConfig(), paths)
    results = retriever.search_many(["What is cosine similarity?", "how does LoRA work", "what does dropout do?"], 3)
    assert [r.hits[0].id for r in results] == ["cosine-similarity", "lora", "dropout"]


@pytest.mark.skipif(not (SHARED_DATA / "concept_db.txt").exists(), reason="../shared/ohlora-data not present")
def test_original_db_korean_cosine_question(tmp_path: Path, e5_home: Paths, e5_folder: Path) -> None:
    paths = _home_with_encoder(tmp_path, e5_home, e5_folder)
    report = build_index(IndexConfig(db=SHARED_DATA / "concept_db.txt", progress=False), paths)
    assert report.manifest.count == 88
    hit = Retriever.load(SearchConfig(), paths).search("코사인 유사도가 뭐야?", 3).hits[0]
    assert hit.text.startswith("cosine similarity (코사인 유사도)")
