"""The encoder runs plain sentence-transformers folders through transformers directly: the same vectors as
`SentenceTransformer.encode`, without importing sentence-transformers; other folders still load through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ohlora_rag.encoder import Encoder
from ohlora_rag.models import ModelRef

from .conftest import heavy_imports

TEXTS = [
    "what is cosine similarity ?",
    "dropout",
    "",
    "how does the adam optimiser work " * 20,  # past the 64-token limit: truncated as sentence-transformers does
    "LoRA : low rank adapter matrices",
]


def _reference(folder: Path, kind: str | None, batch_size: int) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(TEXTS, prompt_name=kind, normalize_embeddings=True, batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_same_vectors_as_sentence_transformers(tiny_sbert: Path, batch_size: int) -> None:
    encoder = Encoder(ModelRef(str(tiny_sbert), tiny_sbert), device="cpu")
    assert encoder.model is None  # the direct path, not SentenceTransformer
    assert encoder.max_length == 64
    ours = encoder.encode(TEXTS, "passage", batch_size=batch_size)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), encoder.dim)
    np.testing.assert_allclose(ours, _reference(tiny_sbert, None, batch_size), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_prompts_are_the_folders_own(tiny_sbert: Path) -> None:
    settings = tiny_sbert / "config_sentence_transformers.json"
    data = json.loads(settings.read_text())
    data["prompts"] = {"query": "query : ", "passage": "passage : "}
    settings.write_text(json.dumps(data))
    encoder = Encoder(ModelRef(str(tiny_sbert), tiny_sbert), device="cpu")
    for kind in ("query", "passage"):
        np.testing.assert_allclose(encoder.encode(TEXTS, kind), _reference(tiny_sbert, kind, 64), atol=1e-5)
    assert not np.allclose(encoder.encode(TEXTS, "query"), encoder.encode(TEXTS, "passage"))


def test_other_shapes_load_through_sentence_transformers(tiny_sbert: Path) -> None:
    pooling = tiny_sbert / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    for key in list(config):
        if key.startswith("pooling_mode"):
            config[key] = False if isinstance(config[key], bool) else config[key]
    config["pooling_mode"] = "max"  # not mean or CLS
    pooling.write_text(json.dumps(config))
    encoder = Encoder(ModelRef(str(tiny_sbert), tiny_sbert), device="cpu")
    assert encoder.model is not None
    np.testing.assert_allclose(np.linalg.norm(encoder.encode(TEXTS, "query"), axis=1), 1.0, atol=1e-5)


def test_search_path_imports_no_training_libraries(home: Path) -> None:
    """`search` loads the encoder without sentence-transformers (and its scikit-learn, datasets, peft), trl or
    pandas: they cost seconds of every cold start."""
    from ohlora_rag.build import build_index
    from ohlora_rag.config import IndexConfig, Paths

    build_index(IndexConfig(db=home / "data" / "concepts.csv", progress=False), Paths.resolve())
    code = (
        "from ohlora_rag.config import Paths, SearchConfig\n"
        "from ohlora_rag.retriever import Retriever\n"
        "assert Retriever.load(SearchConfig(), Paths.resolve()).search('what is dropout ?', 2).hits\n"
    )
    assert heavy_imports(code) == []
