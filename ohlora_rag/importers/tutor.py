"""The tutor's trained parts that ship inside the package (`ohlora_rag/tutor/`), so a fresh install answers with a
trained retriever and LLM without a training run:

- `encoder_top.safetensors`: what `train-sbert --freeze-layers 9` changed in the top 3 of multilingual-e5-small's 12
  layers, as float16 differences from the base weights (a difference is ~1000x smaller than the weight, so float16
  keeps it to ~1e-7 where float16 weights would be off by ~1e-4 and move cosines by ~1e-3); `convert_encoder` adds
  them to the converted base encoder and writes a normal sentence-transformers folder (built-in alias
  `ohlora-tutor-e5`). A file without the `delta` mark holds the tensors themselves (the first shipped format);
- `adapter/`: the LoRA adapter of `train-llm --lora-r 8` (float16), used as it is by `ask`.

`export` writes both from a `train-sbert` and a `train-llm` output (see the Makefile's `tutor` target), with a
manifest saying what made them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..artifacts import MODEL_MANIFEST, ModelManifest, write_json
from ..errors import ModelImportError, UsageError

TUTOR_DIR = Path(__file__).resolve().parents[1] / "tutor"
ENCODER_FILE = "encoder_top.safetensors"
ENCODER_MANIFEST = "encoder.json"
ADAPTER_DIR = "adapter"
#: Files of a sentence-transformers folder that carry settings, copied from the trained model over the base's.
_SETTINGS = ("sentence_bert_config.json", "config_sentence_transformers.json")


def convert_encoder(top_file: Path, out_dir: Path, base_dir: Path) -> dict[str, object]:
    """Copy the base encoder folder and replace the tensors stored in `top_file`: base + difference (a file marked
    `delta`), else the stored tensor itself, in the base's dtype.

    Args:
        top_file: the shipped `encoder_top.safetensors`.
        out_dir: the new folder.
        base_dir: the converted multilingual-e5-small folder.

    Returns:
        Manifest fields for the new folder: its base, and the threshold train-sbert calibrated.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MODEL_MANIFEST))
    weights = load_file(str(base_dir / "model.safetensors"))
    top = load_file(str(top_file))
    with safe_open(str(top_file), "pt") as fh:
        delta = (fh.metadata() or {}).get("delta") == "1"
    unknown = sorted(set(top) - set(weights))
    if unknown:
        raise ModelImportError(f"{top_file}: tensors {', '.join(unknown[:3])} are not in the base encoder {base_dir}")
    for name, tensor in top.items():
        base = weights[name]
        weights[name] = (base.float() + tensor.float()).to(base.dtype) if delta else tensor.to(base.dtype)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    record = json.loads((top_file.parent / ENCODER_MANIFEST).read_text(encoding="utf-8"))
    for name, content in record.get("settings", {}).items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    limit = record.get("max_seq_length")
    if isinstance(limit, int) and limit > 0:  # the sequence limit it was trained with (train-sbert's --max-seq-length)
        tokenizer_config = out_dir / "tokenizer_config.json"
        settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        tokenizer_config.write_text(json.dumps({**settings, "model_max_length": limit}, indent=2) + "\n", "utf-8")
    return {"base": record.get("base"), "threshold": record.get("threshold"), "made_by": record.get("made_by")}


def export_encoder(encoder_dir: Path, base_encoder_dir: Path, out: Path = TUTOR_DIR) -> None:
    """Write what a `train-sbert` run changed (float16 differences from the base) and its settings and manifest into
    `out`.

    Args:
        encoder_dir: a `train-sbert` output (fine-tuned from multilingual-e5-small).
        base_encoder_dir: the converted multilingual-e5-small folder it was trained from.
        out: where to write (default: the package's `tutor/` folder).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from ..encoder import sequence_limit

    read = ModelManifest.read(encoder_dir)
    manifest = read.to_dict() if read else {}
    if manifest.get("kind") != "encoder":
        raise UsageError(f"export: {encoder_dir} is not a train-sbert output (no encoder manifest)")
    tuned = load_file(str(encoder_dir / "model.safetensors"))
    base = load_file(str(base_encoder_dir / "model.safetensors"))
    changed = {
        k: (v.float() - base[k].float()).to(torch.float16).contiguous()
        for k, v in tuned.items()
        if not torch.equal(v, base[k])
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(changed, str(out / ENCODER_FILE), metadata={"format": "pt", "delta": "1"})
    settings = {n: json.loads((encoder_dir / n).read_text(encoding="utf-8")) for n in _SETTINGS}
    tokenizer = json.loads((encoder_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    limit = sequence_limit(settings["sentence_bert_config.json"], tokenizer)
    keep = ("base", "data", "data_hash", "seed", "threshold", "config", "metrics")
    record = {"made_by": "ohlora-rag train-sbert", **{k: manifest.get(k) for k in keep}, "max_seq_length": limit}
    write_json(out / ENCODER_MANIFEST, {**record, "tensors": sorted(changed), "settings": settings})


def export_adapter(adapter_dir: Path, out: Path = TUTOR_DIR) -> None:
    """Write a `train-llm` adapter (float16), its config and a manifest into `out`/adapter."""
    import torch
    from safetensors.torch import load_file, save_file

    read = ModelManifest.read(adapter_dir)
    manifest = read.to_dict() if read else {}
    if manifest.get("kind") != "llm-adapter":
        raise UsageError(f"export: {adapter_dir} is not a train-llm output (no adapter manifest)")
    target = out / ADAPTER_DIR
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    half = {k: v.to(torch.float16).contiguous() for k, v in lora.items()}
    save_file(half, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(adapter_dir / "adapter_config.json", target / "adapter_config.json")
    keep = ("base", "template", "data", "data_hash", "seed", "rows", "train_loss", "eval_loss", "config")
    record = {"kind": "llm-adapter", "made_by": "ohlora-rag train-llm", **{k: manifest.get(k) for k in keep}}
    write_json(target / MODEL_MANIFEST, record)


def export(encoder_dir: Path, adapter_dir: Path, base_encoder_dir: Path, out: Path = TUTOR_DIR) -> dict[str, int]:
    """Both parts: `export_encoder` and `export_adapter`.

    Returns:
        Sizes in bytes of what was written, by file.
    """
    export_encoder(encoder_dir, base_encoder_dir, out)
    export_adapter(adapter_dir, out)
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


if __name__ == "__main__":  # python -m ohlora_rag.importers.tutor HOME: export HOME's models/sbert and models/llm
    import sys

    from ..config import DEFAULT_ENCODER, Paths
    from ..models import resolve

    home = Paths.resolve(sys.argv[1] if len(sys.argv) > 1 else None)
    base = resolve(DEFAULT_ENCODER, "encoder", home).path
    for name, size in export(home.sbert_dir, home.llm_dir, base).items():
        print(f"{TUTOR_DIR / name}: {size / 1e6:.1f} MB")
