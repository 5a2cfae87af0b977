"""The tutor's trained parts that ship inside the package (`ohlora_rag/tutor/`), so a fresh install answers with a
trained retriever and LLM without a training run:

- `encoder_top.safetensors`: the tensors `train-sbert --freeze-layers 9` changes (the top 3 of multilingual-e5-small's
  12 layers), float16; `convert_encoder` lays them over the converted base encoder into a normal
  sentence-transformers folder (built-in alias `ohlora-tutor-e5`);
- `adapter/`: the LoRA adapter of `train-llm --lora-r 8` (float16), used as it is by `ask`.

`export` writes both from a `train-sbert` and a `train-llm` output (see the Makefile's `tutor` target), with a
manifest saying what made them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import ModelImportError, UsageError

TUTOR_DIR = Path(__file__).resolve().parents[1] / "tutor"
ENCODER_FILE = "encoder_top.safetensors"
ENCODER_MANIFEST = "encoder.json"
ADAPTER_DIR = "adapter"
#: Files of a sentence-transformers folder that carry settings, copied from the trained model over the base's.
_SETTINGS = ("sentence_bert_config.json", "config_sentence_transformers.json")


def convert_encoder(top_file: Path, out_dir: Path, base_dir: Path) -> dict[str, object]:
    """Copy the base encoder folder and overwrite the tensors stored in `top_file` (cast to the base's dtype).

    Args:
        top_file: the shipped `encoder_top.safetensors`.
        out_dir: the new folder.
        base_dir: the converted multilingual-e5-small folder.

    Returns:
        Manifest fields for the new folder: its base, and the threshold train-sbert calibrated.
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("ohlora_model.json"))
    weights = load_file(str(base_dir / "model.safetensors"))
    top = load_file(str(top_file))
    unknown = sorted(set(top) - set(weights))
    if unknown:
        raise ModelImportError(f"{top_file}: tensors {', '.join(unknown[:3])} are not in the base encoder {base_dir}")
    for name, tensor in top.items():
        weights[name] = tensor.to(weights[name].dtype)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    record = json.loads((top_file.parent / ENCODER_MANIFEST).read_text(encoding="utf-8"))
    for name, content in record.get("settings", {}).items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return {"base": record.get("base"), "threshold": record.get("threshold"), "made_by": record.get("made_by")}


def export(encoder_dir: Path, adapter_dir: Path, base_encoder_dir: Path, out: Path = TUTOR_DIR) -> dict[str, Any]:
    """Write the shipped parts from a trained encoder and adapter.

    Args:
        encoder_dir: a `train-sbert` output (fine-tuned from multilingual-e5-small).
        adapter_dir: a `train-llm` output (LoRA adapter on smollm2-135m-instruct).
        base_encoder_dir: the converted multilingual-e5-small folder the encoder was trained from.
        out: where to write (default: the package's `tutor/` folder).

    Returns:
        Sizes in bytes of what was written, by file.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from ..models import read_manifest

    enc_manifest = read_manifest(encoder_dir) or {}
    llm_manifest = read_manifest(adapter_dir) or {}
    if enc_manifest.get("kind") != "encoder" or llm_manifest.get("kind") != "llm-adapter":
        raise UsageError(f"export: {encoder_dir} must be a train-sbert output and {adapter_dir} a train-llm output")
    tuned = load_file(str(encoder_dir / "model.safetensors"))
    base = load_file(str(base_encoder_dir / "model.safetensors"))
    changed = {k: v.to(torch.float16).contiguous() for k, v in tuned.items() if not torch.equal(v, base[k])}
    out.mkdir(parents=True, exist_ok=True)
    save_file(changed, str(out / ENCODER_FILE), metadata={"format": "pt"})
    settings = {n: json.loads((encoder_dir / n).read_text(encoding="utf-8")) for n in _SETTINGS}
    enc_keep = ("base", "data", "data_hash", "seed", "threshold", "config", "metrics")
    record = {"made_by": "ohlora-rag train-sbert", **{k: enc_manifest.get(k) for k in enc_keep}}
    (out / ENCODER_MANIFEST).write_text(
        json.dumps({**record, "tensors": sorted(changed), "settings": settings}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    adapter_out = out / ADAPTER_DIR
    shutil.rmtree(adapter_out, ignore_errors=True)
    adapter_out.mkdir()
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file(
        {k: v.to(torch.float16).contiguous() for k, v in lora.items()}, str(adapter_out / "adapter_model.safetensors")
    )
    shutil.copy2(adapter_dir / "adapter_config.json", adapter_out / "adapter_config.json")
    keep = ("base", "template", "data", "data_hash", "seed", "rows", "train_loss", "eval_loss", "config")
    adapter_record = {
        "kind": "llm-adapter",
        "made_by": "ohlora-rag train-llm",
        **{k: llm_manifest.get(k) for k in keep},
    }
    (adapter_out / "ohlora_model.json").write_text(
        json.dumps(adapter_record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


if __name__ == "__main__":  # python -m ohlora_rag.importers.tutor HOME: export HOME's models/sbert and models/llm
    import sys

    from ..config import DEFAULT_ENCODER, Paths
    from ..models import resolve

    home = Paths.resolve(sys.argv[1] if len(sys.argv) > 1 else None)
    base = resolve(DEFAULT_ENCODER, "encoder", home).path
    for name, size in export(home.sbert_dir, home.llm_dir, base).items():
        print(f"{TUTOR_DIR / name}: {size / 1e6:.1f} MB")
