"""Process setup for torch work: OpenMP threads sleep while they wait in the commands that answer one question at a
time, set before torch is loaded; a value the user set stands; training and building keep the library default."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ohlora_rag.build import build_index
from ohlora_rag.config import IndexConfig, Paths
from ohlora_rag.device import configure_threads

# Runs the CLI and writes OMP_WAIT_POLICY as it is at the moment torch starts loading (libgomp reads it then).
WATCH_TORCH_IMPORT = textwrap.dedent(
    """
    import os, runpy, sys

    seen = sys.argv[1]

    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and not os.path.exists(seen):
                with open(seen, "w") as fh:
                    fh.write(os.environ.get("OMP_WAIT_POLICY", "<unset>"))
            return None

    sys.meta_path.insert(0, Watch())
    sys.argv = ["ohlora-rag", *sys.argv[2:]]
    runpy.run_module("ohlora_rag", run_name="__main__", alter_sys=True)
    """
)


def _env_without_policy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def _probe(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_sets_passive_before_torch_and_keeps_the_users_value() -> None:
    code = "import os; from ohlora_rag.device import configure_threads; print(configure_threads(), os.environ.get('OMP_WAIT_POLICY'))"
    assert _probe(code, _env_without_policy()) == "['OMP_WAIT_POLICY'] PASSIVE"
    assert _probe(code, {**_env_without_policy(), "OMP_WAIT_POLICY": "ACTIVE"}) == "[] ACTIVE"
    assert _probe(code, {**_env_without_policy(), "GOMP_SPINCOUNT": "0"}) == "[] None"


def test_a_server_spins_briefly() -> None:
    code = (
        "import os; from ohlora_rag.device import configure_threads; "
        "print(configure_threads('serve'), os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    )
    assert _probe(code, _env_without_policy()) == "['GOMP_SPINCOUNT'] 20000 None"
    assert _probe(code, {**_env_without_policy(), "OMP_WAIT_POLICY": "PASSIVE"}) == "[] None PASSIVE"


def test_does_nothing_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch  # noqa: F401

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert configure_threads() == [] and configure_threads("serve") == []
    assert "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize(("command", "policy"), [("search", "PASSIVE"), ("build-index", "<unset>")])
def test_policy_when_the_command_loads_torch(home: Path, tmp_path: Path, command: str, policy: str) -> None:
    build_index(IndexConfig(progress=False, onnx=False), Paths.resolve())  # no ONNX copy: search loads torch
    seen = tmp_path / "policy"
    args = ["search", "what is recall"] if command == "search" else ["build-index", "-q"]
    done = subprocess.run(
        [sys.executable, "-c", WATCH_TORCH_IMPORT, str(seen), "--home", str(home), *args],
        env=_env_without_policy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert seen.read_text() == policy
