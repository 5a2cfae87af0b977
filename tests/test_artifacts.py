"""The artifact layer: staged publishing, fsync'd JSON, timestamps, checksums and the model manifest."""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest

import ohlora_rag.artifacts as artifacts
from ohlora_rag.artifacts import (
    COMPACT_TIMESTAMP,
    MODEL_FORMAT_VERSION,
    MODEL_MANIFEST,
    ModelManifest,
    file_record,
    read_json_object,
    staged_folder,
    staged_publish,
    utc_timestamp,
    write_json,
)
from ohlora_rag.importers.tutor import TUTOR_DIR


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path fsync'd, in order (the real fsync still runs)."""
    calls: list[Path] = []
    real = artifacts.fsync

    def record(path: Path) -> None:
        calls.append(Path(path))
        real(path)

    monkeypatch.setattr(artifacts, "fsync", record)
    return calls


def _old_model(tmp_path: Path) -> Path:
    out = tmp_path / "models" / "sbert"
    out.mkdir(parents=True)
    (out / "weights").write_text("old")
    return out


def test_staged_folder_keeps_the_old_folder_when_the_body_raises(tmp_path: Path) -> None:
    out = _old_model(tmp_path)
    with pytest.raises(RuntimeError, match="^training failed$"), staged_folder(out) as staging:
        staging.mkdir()
        (staging / "weights").write_text("half")
        raise RuntimeError("training failed")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sbert"]  # no staging folder, no lock taken


def test_staged_folder_replaces_the_old_folder_with_everything_synced(tmp_path: Path, synced: list[Path]) -> None:
    out = _old_model(tmp_path)
    with staged_folder(out) as staging:
        (staging / "sub").mkdir(parents=True)
        (staging / "weights").write_text("new")
        (staging / "sub" / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["sub", "weights"] and (out / "weights").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == [".sbert.lock", "sbert"]
    # files before their folders, the staging folder last among them, then the folder the rename happened in
    assert synced == [staging / "sub" / "config.json", staging / "sub", staging / "weights", staging, out.parent]


def test_staged_publish_does_not_publish_when_the_body_raises(tmp_path: Path) -> None:
    published: list[Path] = []
    staging = tmp_path / ".staging-x"
    with (
        pytest.raises(OSError, match="^disk full$"),
        staged_publish(staging, tmp_path / ".lock", "test", published.append) as folder,
    ):
        folder.mkdir()
        (folder / "a").write_text("a")
        raise OSError("disk full")
    assert published == [] and not staging.exists()


def test_staged_publish_removes_the_staging_folder_when_publishing_fails(tmp_path: Path) -> None:
    def publish(_staging: Path) -> None:
        raise OSError("rename refused")

    staging = tmp_path / ".staging-x"
    with pytest.raises(OSError, match="^rename refused$"), staged_publish(staging, tmp_path / ".lock", "t", publish):
        staging.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_write_json_round_trip_is_synced_and_leaves_no_temporary_file(tmp_path: Path, synced: list[Path]) -> None:
    data = {"name": "tutor — ü", "count": 3, "nested": {"ok": True, "none": None}, "list": [1.5, "x"]}
    path = tmp_path / "manifest.json"
    path.write_text("old")
    write_json(path, data)
    assert read_json_object(path) == data
    assert path.read_text(encoding="utf-8") == json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    tmp = tmp_path / f".manifest.json.tmp-{os.getpid()}"
    assert synced == [tmp, tmp_path]  # the bytes before the rename, the folder after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_write_json_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "manifest.json"
    path.write_text('{"old": 1}\n')

    def fail(_path: Path) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(artifacts, "fsync", fail)
    with pytest.raises(OSError, match="^no space left on device$"):
        write_json(path, {"new": 2})
    assert read_json_object(path) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_read_json_object_refuses_other_json_values(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(TypeError, match=re.escape("a JSON list, not an object")):
        read_json_object(tmp_path / "list.json")


def test_utc_timestamp_formats() -> None:
    before = int(time.time())
    stamp, compact = utc_timestamp(), utc_timestamp(COMPACT_TIMESTAMP)
    after = int(time.time())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert re.fullmatch(r"\d{8}T\d{6}", compact)
    assert before <= calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) <= after  # UTC, not local time


def test_file_record_is_size_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_record(path) == {"size": 3000, "sha256": hashlib.sha256(b"abc" * 1000).hexdigest()}


def test_new_model_manifest_has_version_and_created_first(tmp_path: Path) -> None:
    manifest = ModelManifest.new(kind="encoder", reference="tiny", base="e5", seed=42, threshold=None)
    manifest.write(tmp_path)
    data = json.loads((tmp_path / MODEL_MANIFEST).read_text(encoding="utf-8"))
    assert list(data) == ["format_version", "created", "kind", "reference", "base", "seed", "threshold"]
    assert data["format_version"] == MODEL_FORMAT_VERSION and data["threshold"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["created"])
    assert ModelManifest.read(tmp_path) == manifest


@pytest.mark.parametrize("shipped", [TUTOR_DIR / "adapter" / MODEL_MANIFEST, TUTOR_DIR / "encoder.json"])
def test_shipped_manifests_read_and_write_back_unchanged(tmp_path: Path, shipped: Path) -> None:
    """The package's tutor/ manifests have no format_version or created: they still read, and write back the same."""
    (tmp_path / MODEL_MANIFEST).write_bytes(shipped.read_bytes())
    manifest = ModelManifest.read(tmp_path)
    assert manifest is not None and manifest.format_version is None and manifest.created is None
    assert manifest.base and manifest.made_by
    manifest.write(tmp_path)
    assert (tmp_path / MODEL_MANIFEST).read_bytes() == shipped.read_bytes()


def test_model_manifest_keeps_every_field_and_explicit_nulls() -> None:
    written = {
        "format_version": 1,
        "created": "2025-01-01T00:00:00Z",
        "reference": "ohlora-tutor-e5",
        "source": "ohlora_rag/tutor/encoder_top.safetensors",
        "source_hash": None,
        "kind": "encoder",
        "base": None,
        "fingerprint": "0123456789abcdef",
        "fingerprint_stats": [["model.safetensors", 10, 1]],
    }
    manifest = ModelManifest.from_dict(written)
    assert manifest.base is None and manifest.get("source_hash", "absent") is None
    assert manifest.to_dict() == written  # the same keys and values (typed fields in their declared order)
    again = manifest.updated(base="e5", threshold=0.5)
    assert again.base == "e5" and again.to_dict()["base"] == "e5" and again.extra["threshold"] == 0.5


@pytest.mark.parametrize("content", ['{"kind": 3}', '{"fingerprint_stats": "x"}', "[]", "{broken"])
def test_unreadable_model_manifest_reads_as_none(tmp_path: Path, content: str) -> None:
    (tmp_path / MODEL_MANIFEST).write_text(content)
    assert ModelManifest.read(tmp_path) is None
