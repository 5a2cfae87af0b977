"""Concurrent writers: two build-index runs in one home, cleanup that spares other writers, readers that re-read
CURRENT, and model folders swapped under a lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ohlora_rag.artifacts import staged_folder
from ohlora_rag.build import build_index
from ohlora_rag.cli import app
from ohlora_rag.config import IndexConfig, Paths
from ohlora_rag.locks import publish_lock
from ohlora_rag.store import POINTER, active_build, load_index

# The real CLI with every fsync of the index files slowed down, so that two builds started together are still
# writing and publishing at the same time (with the tiny encoder they would otherwise rarely overlap).
SLOW_WRITES = textwrap.dedent(
    """
    import runpy, sys, time
    import ohlora_rag.artifacts as artifacts

    real_fsync = artifacts.fsync
    def slow_fsync(path):
        real_fsync(path)
        time.sleep(0.15)
    artifacts.fsync = slow_fsync
    sys.argv = ["ohlora-rag", *sys.argv[1:]]
    runpy.run_module("ohlora_rag", run_name="__main__", alter_sys=True)
    """
)


def _start_build(home: Path, slow: bool) -> subprocess.Popen[str]:
    head = [sys.executable, "-c", SLOW_WRITES] if slow else [sys.executable, "-m", "ohlora_rag"]
    return subprocess.Popen(
        [*head, "--home", str(home), "build-index", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_two_concurrent_builds_never_lose_the_published_index(home: Path) -> None:
    runner = CliRunner()
    for round_ in range(3):
        procs = [_start_build(home, slow=round_ > 0) for _ in range(2)]
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"round {round_}: {err}"
            assert "Traceback" not in err
        name = (home / "index" / POINTER).read_text(encoding="utf-8").strip()
        assert (home / "index" / name / "manifest.json").is_file(), f"round {round_}: CURRENT names a removed build"
        found = runner.invoke(app, ["--home", str(home), "search", "what is recall", "--json"])
        assert found.exit_code == 0, found.output
        assert len(json.loads(found.stdout)["hits"]) == 3
        leftovers = [p.name for p in (home / "index").iterdir() if p.name.startswith(".staging-")]
        assert not leftovers, f"round {round_}: {leftovers}"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cleanup_spares_a_live_writer_and_newer_builds(home: Path) -> None:
    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = paths.index_dir / f".staging-build-20990101T000000-{sleeper.pid}-000001"
        dead = paths.index_dir / f".staging-build-20000101T000000-{_dead_pid()}-000002"
        newer = paths.index_dir / "build-20990101T000000-1-000003"
        for folder in (live, dead, newer):
            folder.mkdir()
            (folder / "faiss.index").write_bytes(b"partial")
        future = time.time() + 3600
        os.utime(newer, (future, future))
        previous = active_build(paths.index_dir)
        build_index(IndexConfig(progress=False), paths)
        assert live.is_dir()  # another build is still writing it
        assert newer.is_dir()  # not older than the published build
        assert not dead.exists()  # its writer is gone
        assert not previous.exists()  # the build that was published before
        assert active_build(paths.index_dir).is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_reader_rereads_current_when_its_build_was_removed(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ohlora_rag.store as store

    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    stale = active_build(paths.index_dir).name
    build_index(IndexConfig(progress=False), paths)  # publishes a new build and removes `stale`
    current = active_build(paths.index_dir).name
    assert stale != current and not (paths.index_dir / stale).exists()
    real = store._read_pointer
    answers = iter([stale])  # the first read happened just before the other build published

    def racing_read(index_dir: Path) -> str:
        return next(answers, None) or real(index_dir)

    monkeypatch.setattr(store, "_read_pointer", racing_read)
    assert load_index(paths.index_dir).folder.name == current


def test_reader_follows_current_through_two_quick_publishes(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two builds that finish together publish one right after the other: a reader may find the build it read in
    `CURRENT` removed, and the next one too."""
    import ohlora_rag.store as store

    paths = Paths.resolve()
    names = []
    for _ in range(3):
        build_index(IndexConfig(progress=False), paths)
        names.append(active_build(paths.index_dir).name)
    assert not (paths.index_dir / names[0]).exists() and not (paths.index_dir / names[1]).exists()
    real = store._read_pointer
    answers = iter(names[:2])  # read just before each of the two later publishes

    def racing_read(index_dir: Path) -> str:
        return next(answers, None) or real(index_dir)

    monkeypatch.setattr(store, "_read_pointer", racing_read)
    assert load_index(paths.index_dir).folder.name == names[2]


def test_reader_whose_build_is_removed_while_it_checks_the_files(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cleanup removes the build between the reader's size check and its hash of a file: the reader loads the newer
    build (it got a raw FileNotFoundError — a traceback in `search` — before)."""
    import shutil

    import ohlora_rag.store as store

    paths = Paths.resolve()
    build_index(IndexConfig(progress=False), paths)
    stale = active_build(paths.index_dir)
    shutil.copytree(stale, tmp_path / "stale")
    build_index(IndexConfig(progress=False), paths)
    current = active_build(paths.index_dir).name
    shutil.copytree(tmp_path / "stale", stale)  # still there when the reader starts on it
    answers = iter([stale.name])
    real_read, real_record = store._read_pointer, store.file_record

    def racing_read(index_dir: Path) -> str:
        return next(answers, None) or real_read(index_dir)

    def record_after_cleanup(path: Path) -> dict[str, object]:
        shutil.rmtree(stale, ignore_errors=True)  # the newer build's cleanup, right now
        return real_record(path)

    monkeypatch.setattr(store, "_read_pointer", racing_read)
    monkeypatch.setattr(store, "file_record", record_after_cleanup)
    assert load_index(paths.index_dir).folder.name == current


def test_model_swap_waits_for_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "models" / "sbert"
    out.mkdir(parents=True)
    (out / "weights").write_text("old")
    swapped = threading.Event()

    def train() -> None:
        with staged_folder(out) as staging:
            staging.mkdir()
            (staging / "weights").write_text("new")
        swapped.set()

    with publish_lock(out.parent / ".sbert.lock", "test"):
        writer = threading.Thread(target=train)
        writer.start()
        assert not swapped.wait(1.0)  # another process is swapping the folder: this one waits
        assert (out / "weights").read_text() == "old"
    writer.join(30)
    assert swapped.is_set() and (out / "weights").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == [".sbert.lock", "sbert"]


def test_model_swap_removes_leftovers_of_dead_writers_only(tmp_path: Path) -> None:
    out = tmp_path / "sbert"
    dead = tmp_path / f".sbert.tmp-{_dead_pid()}"
    mine_elsewhere = tmp_path / f".sbert.old-{os.getppid()}"  # a live process (pytest's parent)
    for folder in (dead, mine_elsewhere):
        folder.mkdir()
    with staged_folder(out) as staging:
        staging.mkdir()
    assert out.is_dir() and not dead.exists() and mine_elsewhere.is_dir()
