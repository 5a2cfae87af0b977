"""The encoder runs plain sentence-transformers folders through transformers directly: the same vectors as
`SentenceTransformer.encode`, without importing sentence-transformers; other folders still load through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ohlora_rag import onnx_encoder
from ohlora_rag.encoder import Encoder
from ohlora_rag.models import ModelRef

from .conftest import heavy_imports, make_tiny_sbert, read_only

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


def _torch_and_copy(folder: Path, cache: Path) -> tuple[Encoder, Encoder]:
    ref = ModelRef(str(folder), folder)
    torch_encoder = Encoder(ref, runtime="torch")
    assert torch_encoder.export_copy(cache) == onnx_encoder.export_folder(cache, ref.fingerprint)
    return torch_encoder, Encoder(ref, cache=cache)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_onnx_copy_gives_the_torch_vectors(tiny_sbert: Path, tmp_path: Path, batch_size: int) -> None:
    ref = ModelRef(str(tiny_sbert), tiny_sbert)
    before = Encoder(ref, runtime="torch").encode(TEXTS, "query", batch_size=batch_size)
    torch_encoder, copy = _torch_and_copy(tiny_sbert, tmp_path / "cache")
    assert (torch_encoder.runtime, copy.runtime) == ("transformers", "onnxruntime")
    assert copy.transformer is None and copy.max_length == 64 and copy.dim == torch_encoder.dim
    for kind in ("query", "passage"):
        ours = copy.encode(TEXTS, kind, batch_size=batch_size)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, torch_encoder.encode(TEXTS, kind, batch_size=batch_size), atol=1e-5)
    # exporting traced a copy: the torch model in use still gives what it gave before
    np.testing.assert_array_equal(torch_encoder.encode(TEXTS, "query", batch_size=batch_size), before)


def test_onnx_copy_is_used_only_when_asked_and_complete(tiny_sbert: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ref = ModelRef(str(tiny_sbert), tiny_sbert)
    torch_encoder, _ = _torch_and_copy(tiny_sbert, cache)
    expected = torch_encoder.encode(TEXTS, "query")
    assert Encoder(ref, cache=cache, runtime="torch").runtime == "transformers"
    graph = onnx_encoder.export_folder(cache, ref.fingerprint) / onnx_encoder.MODEL_FILE
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 2])  # a partial copy: sizes disagree with its manifest
    encoder = Encoder(ref, cache=cache)
    assert encoder.runtime == "transformers"
    np.testing.assert_allclose(encoder.encode(TEXTS, "query"), expected, atol=1e-6)
    graph.write_bytes(b"\0" * len(data))  # the right size, unreadable: onnxruntime refuses it
    assert Encoder(ref, cache=cache).runtime == "transformers"


def test_onnx_copy_is_keyed_by_the_encoders_fingerprint(tiny_sbert: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _torch_and_copy(tiny_sbert, cache)
    other = make_tiny_sbert(tmp_path / "other", seed=1)  # other weights: another fingerprint
    ref = ModelRef(str(other), other)
    assert Encoder(ref, cache=cache).runtime == "transformers"  # the first encoder's copy is not this one's
    _torch_and_copy(other, cache)
    third = make_tiny_sbert(tmp_path / "third", seed=2)
    _torch_and_copy(third, cache)
    kept = sorted(p.name for p in cache.glob(f"{onnx_encoder.PREFIX}*"))
    assert len(kept) == onnx_encoder.KEEP and onnx_encoder.export_folder(cache, ref.fingerprint).name in kept


def test_unwritable_cache_costs_only_the_copy(tiny_sbert: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    encoder = Encoder(ModelRef(str(tiny_sbert), tiny_sbert), runtime="torch")
    with read_only(cache):
        assert encoder.export_copy(cache) is None
    assert list(cache.iterdir()) == []


def test_cold_search_runs_without_torch(home: Path) -> None:
    """With the copy that build-index writes, `search` encodes through onnxruntime: no torch, no transformers."""
    from ohlora_rag.build import build_index
    from ohlora_rag.config import IndexConfig, Paths

    report = build_index(IndexConfig(progress=False), Paths.resolve())
    assert report.onnx is not None and Path(report.onnx).parent == home / "models" / "cache"
    code = (
        "import sys\n"
        "from ohlora_rag.config import Paths, SearchConfig\n"
        "from ohlora_rag.retriever import Retriever\n"
        "r = Retriever.load(SearchConfig(), Paths.resolve())\n"
        "assert r.encoder.runtime == 'onnxruntime' and r.search('what is dropout ?', 2).hits\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch loaded'\n"
    )
    assert heavy_imports(code) == []


def test_build_index_no_onnx_writes_no_copy(home: Path) -> None:
    from ohlora_rag.build import build_index
    from ohlora_rag.config import IndexConfig, Paths

    assert build_index(IndexConfig(progress=False, onnx=False), Paths.resolve()).onnx is None
    assert not list((home / "models").glob(f"cache/{onnx_encoder.PREFIX}*"))
