"""The Faiss store: exact inner-product results, the manifest, atomic publishing, survival of a killed build."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from ohlora_rag.build import build_index
from ohlora_rag.config import IndexConfig, Paths
from ohlora_rag.errors import DataFormatError, IndexNotFoundError
from ohlora_rag.models import fingerprint
from ohlora_rag.store import VectorIndex, active_build, load_index
from tests.conftest import kill_when


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("nq", [1, 3, 40])
def test_search_is_exact_against_numpy(nq: int) -> None:
    rng = np.random.default_rng(0)
    base, queries = _unit(rng, 5000, 32), _unit(rng, nq, 32)
    index = VectorIndex.from_vectors(base)
    scores, positions = index.search(queries, 5)
    expected = np.argsort(-(queries @ base.T), axis=1)[:, :5]
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, expected, axis=1), rtol=1e-5)
    assert faiss.cvar.distance_compute_blas_threshold != 8  # the search's temporary setting was restored


def test_split_scan_for_one_query_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    import ohlora_rag.store as store

    monkeypatch.setattr(store, "SPLIT_FROM_ROWS", 1000)
    rng = np.random.default_rng(3)
    base, query = _unit(rng, 4001, 16), _unit(rng, 1, 16)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        scores, positions = VectorIndex.from_vectors(base).search(query, 7)
    finally:
        faiss.omp_set_num_threads(threads)
    expected = np.argsort(-(query @ base.T)[0])[:7]
    np.testing.assert_array_equal(positions[0], expected)
    np.testing.assert_allclose(scores[0], (query @ base.T)[0][expected], rtol=1e-5)


def test_k_is_capped_at_index_size() -> None:
    index = VectorIndex.from_vectors(_unit(np.random.default_rng(1), 3, 8))
    scores, positions = index.search(_unit(np.random.default_rng(2), 1, 8), 10)
    assert positions.shape == (1, 3)


def test_build_writes_flat_ip_index_and_manifest(home: Path) -> None:
    paths = Paths.resolve()
    report = build_index(IndexConfig(progress=False), paths)
    stored = load_index(paths.index_dir)
    raw = faiss.read_index(str(stored.folder / "faiss.index"))
    assert isinstance(raw, faiss.IndexFlatIP) and raw.metric_type == faiss.METRIC_INNER_PRODUCT
    assert raw.ntotal == 6 == report.manifest.count
    names = sorted(p.name for p in stored.folder.iterdir())
    assert names == ["bm25", "entries.parquet", "faiss.index", "manifest.json", "score_stats.npz"]
    assert stored.lexical is not None and stored.lexical.count == 6
    assert stored.stats is not None and stored.stats.cov.shape == (16, 16)
    manifest = json.loads((stored.folder / "manifest.json").read_text())
    assert manifest["encoder"] == str(paths.sbert_dir)
    assert manifest["encoder_fingerprint"] == fingerprint(paths.sbert_dir)
    assert manifest["dim"] == 16 and manifest["count"] == 6 and manifest["format_version"] == 1
    assert manifest["faiss_version"] == faiss.__version__ and len(manifest["corpus_hash"]) == 16
    assert stored.entries.column("id").to_pylist()[0] == "cosine-similarity"
    norms = np.linalg.norm(raw.reconstruct_n(0, raw.ntotal), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_rebuild_replaces_old_build(home: Path) -> None:
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    one = active_build(paths.index_dir)
    build_index(IndexConfig(progress=False), paths)
    two = active_build(paths.index_dir)
    assert one != two and not one.exists() and two.exists()


def test_failed_build_keeps_previous_index(home: Path, tmp_path: Path) -> None:
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    before = active_build(paths.index_dir)
    bad = tmp_path / "bad.csv"
    bad.write_text("text\na\na\n", encoding="utf-8")
    with pytest.raises(DataFormatError):
        build_index(IndexConfig(db=bad, progress=False), paths)
    assert active_build(paths.index_dir) == before
    assert load_index(paths.index_dir).manifest.count == 6


def test_missing_index_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match=re.escape(f"no index at {tmp_path} — run `ohlora-rag build-index`")):
        load_index(tmp_path)


def test_killed_build_leaves_old_index_loadable(home: Path, tmp_path: Path) -> None:
    """SIGKILL a build while it writes its files: the published index still loads and answers the same."""
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    before = load_index(paths.index_dir)
    marker = tmp_path / "writing"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import ohlora_rag.artifacts as artifacts
        from ohlora_rag.config import IndexConfig, Paths
        from ohlora_rag.build import build_index

        real_fsync = artifacts.fsync
        def slow_fsync(path):
            real_fsync(path)
            Path({str(marker)!r}).write_text(str(path))
            time.sleep(60)  # killed here, with a half-written build on disk
        artifacts.fsync = slow_fsync
        build_index(IndexConfig(progress=False), Paths.resolve())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    kill_when(proc, marker.exists, poll=0.1)
    assert any(p.name.startswith(".staging-") for p in paths.index_dir.iterdir())  # the half-written build
    after = load_index(paths.index_dir)
    assert after.folder == before.folder and after.manifest == before.manifest
    query = np.ones((1, 16), np.float32) / 4.0
    np.testing.assert_array_equal(after.vectors.search(query, 3)[1], before.vectors.search(query, 3)[1])
    build_index(IndexConfig(progress=False), paths)  # the next build cleans the leftovers
    assert not any(p.name.startswith(".staging-") for p in paths.index_dir.iterdir())


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_size_and_sha256_of_every_file(home: Path) -> None:
    import hashlib

    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    build = active_build(paths.index_dir)
    files = json.loads((build / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(build)) for p in build.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(files) == on_disk and {"faiss.index", "entries.parquet", "score_stats.npz"} <= on_disk
    assert any(name.startswith("bm25/") for name in files)
    for name, record in files.items():
        data = (build / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: _flip_byte(b / "faiss.index"), "faiss.index does not match the sha256 in its manifest"),
        (lambda b: _flip_byte(b / "entries.parquet", 40), "entries.parquet does not match the sha256"),
        (lambda b: _flip_byte(b / "score_stats.npz", 100), "score_stats.npz does not match the sha256"),
        (lambda b: _flip_byte(b / "bm25" / "params.index.json", 5), "bm25/params.index.json does not match"),
        (lambda b: (b / "entries.parquet").write_bytes(b"PAR1"), "entries.parquet is 4 bytes, the manifest says"),
        (lambda b: (b / "faiss.index").write_bytes(b""), "faiss.index is 0 bytes, the manifest says"),
        (lambda b: (b / "bm25" / "vocab.index.json").unlink(), "bm25/vocab.index.json is missing"),
        (lambda b: (b / "score_stats.npz").unlink(), "score_stats.npz is missing"),
        (lambda b: (b / "manifest.json").write_text("{not json"), "manifest.json: Expecting property name"),
        (lambda b: (b / "manifest.json").write_text("[]"), "manifest.json: "),
    ],
)
def test_damaged_build_is_refused(home: Path, damage, message: str) -> None:  # noqa: ANN001
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    damage(active_build(paths.index_dir))
    with pytest.raises(IndexNotFoundError, match=re.escape(message)) as info:
        load_index(paths.index_dir)
    assert str(info.value).startswith(f"index at {paths.index_dir} is damaged (")
    assert str(info.value).endswith("— run `ohlora-rag build-index`")


def _rewrite_manifest(build: Path, **changes: object) -> None:
    manifest = json.loads((build / "manifest.json").read_text())
    manifest.update(changes)
    (build / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"count": "six"}, "field 'count' is str"),
        ({"files": {"faiss.index": {"size": 1}}}, "lists no entries.parquet"),
        ({"lexical": "yes"}, "field 'lexical' is str"),
    ],
)
def test_manifest_with_wrong_types_is_damaged(home: Path, changes: dict[str, object], message: str) -> None:
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    _rewrite_manifest(active_build(paths.index_dir), **changes)
    with pytest.raises(IndexNotFoundError, match=re.escape(message)):
        load_index(paths.index_dir)


def test_manifest_file_record_cannot_leave_the_build(home: Path) -> None:
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    build = active_build(paths.index_dir)
    files = json.loads((build / "manifest.json").read_text())["files"]
    files["../CURRENT"] = {"size": 1, "sha256": "0"}
    _rewrite_manifest(build, files=files)
    with pytest.raises(IndexNotFoundError, match=re.escape("unreadable file record '../CURRENT'")):
        load_index(paths.index_dir)


def test_build_without_checksums_still_loads(home: Path) -> None:
    """Indexes built before checksums were recorded load as before (unchecked)."""
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    build = active_build(paths.index_dir)
    manifest = json.loads((build / "manifest.json").read_text())
    del manifest["files"]
    (build / "manifest.json").write_text(json.dumps(manifest))
    assert load_index(paths.index_dir).manifest.files is None


def test_cosine_outside_the_unit_range_is_an_error(home: Path) -> None:
    """Vectors scaled by 10 in an index whose checksums were made to match: the search refuses, not answers."""
    import hashlib

    from ohlora_rag.config import SearchConfig
    from ohlora_rag.retriever import Retriever

    paths = Paths.resolve()
    build_index(IndexConfig(progress=False, calibrate=False), paths)
    build = active_build(paths.index_dir)
    raw = faiss.read_index(str(build / "faiss.index"))
    scaled = faiss.IndexFlatIP(raw.d)
    scaled.add(raw.reconstruct_n(0, raw.ntotal) * 10.0)
    faiss.write_index(scaled, str(build / "faiss.index"))
    data = (build / "faiss.index").read_bytes()
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["files"]["faiss.index"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (build / "manifest.json").write_text(json.dumps(manifest))
    retriever = Retriever.load(SearchConfig(), paths)
    with pytest.raises(
        IndexNotFoundError, match=r"is damaged \(a search returned the cosine [0-9.]+, outside \[-1, 1\]\)"
    ):
        retriever.search("what is recall")


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00garbage\x80",
        b"../outside",
        b"build-x/../../etc",
        b"build-..",
        b"",
        b"   \n",
        b"/etc/passwd",
        b"build-" + b"a" * 300,
        b"faiss.index",
    ],
)
def test_current_holds_only_a_build_name(home: Path, content: bytes) -> None:
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    (paths.index_dir / "CURRENT").write_bytes(content)
    with pytest.raises(IndexNotFoundError, match=re.escape(f"index at {paths.index_dir} is damaged (CURRENT ")):
        load_index(paths.index_dir)


def test_current_that_is_a_folder_or_leads_outside_is_damaged(home: Path, tmp_path: Path) -> None:
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    real = active_build(paths.index_dir)
    elsewhere = tmp_path / "elsewhere"
    real.rename(elsewhere)
    (paths.index_dir / "build-evil").symlink_to(elsewhere)
    (paths.index_dir / "CURRENT").write_text("build-evil\n")
    with pytest.raises(IndexNotFoundError, match=re.escape("CURRENT names build-evil, which leads outside")):
        load_index(paths.index_dir)
    (paths.index_dir / "CURRENT").unlink()
    (paths.index_dir / "CURRENT").mkdir()
    with pytest.raises(IndexNotFoundError, match=re.escape("is damaged (CURRENT is unreadable")):
        load_index(paths.index_dir)
