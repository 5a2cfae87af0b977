"""The answering LLM: a base model plus the LoRA adapter (merged at load) -> an answer that stops at EOS."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_LLM, Paths
from .errors import ModelNotFoundError
from .models import ModelRef, check_json_files, loading, read_manifest, resolve
from .prompt import PromptBuilder


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt text -> token ids, the same way for training (checked by train-llm's pre-flight) and inference."""
    return list(tokenizer(text=prompt, add_special_tokens=False)["input_ids"])


@dataclass
class LLMChoice:
    """Which base model and adapter `ask` loads, and why."""

    base: ModelRef
    adapter: Path | None
    template: str
    notice: str | None = None


def choose_llm(
    base_llm: str | None,
    adapter: str | Path | None,
    paths: Paths,
    template: str | None = None,
    use_adapter: bool = True,
) -> LLMChoice:
    """The trained adapter under models/llm/ (with the base and template it was trained with) when present;
    else the base model alone, with a notice. An explicit `base_llm` must match the adapter's base."""
    if not use_adapter:
        base = resolve(base_llm or DEFAULT_LLM, "llm", paths)
        return LLMChoice(
            base, None, template or "auto", f"--no-adapter: answering with the base model {base.reference}"
        )
    adapter_dir = Path(adapter) if adapter else paths.llm_dir
    if not adapter and not (adapter_dir / "adapter_config.json").is_file() and base_llm in (None, DEFAULT_LLM):
        adapter_dir = shipped_adapter() or adapter_dir  # the tutor's trained adapter, shipped with the package
    if not (adapter_dir / "adapter_config.json").is_file():
        if adapter:
            raise ModelNotFoundError(
                f"--adapter {adapter}: no LoRA adapter there (adapter_config.json) — run `ohlora-rag train-llm`"
            )
        base = resolve(base_llm or DEFAULT_LLM, "llm", paths)
        notice = f"no trained adapter in {adapter_dir} — answering with the base model {base.reference} (run `ohlora-rag train-llm`)"
        return LLMChoice(base, None, template or "auto", notice)
    # Ours carry a manifest (base, its fingerprint, template); a plain PEFT adapter names its base in its config.
    check_json_files(adapter_dir, ("adapter_config.json",))
    manifest = read_manifest(adapter_dir) or {}
    if not manifest:
        import json

        peft_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8") or "{}")
        manifest = {"base": peft_config.get("base_model_name_or_path") if isinstance(peft_config, dict) else None}
    base_ref = base_llm or manifest.get("base")
    if not base_ref:
        raise ModelNotFoundError(f"the adapter in {adapter_dir} does not name its base model — pass --base-llm")
    base = resolve(str(base_ref), "llm", paths)
    expected = manifest.get("base_fingerprint")
    if expected and base.fingerprint != expected:
        raise ModelNotFoundError(
            f"the adapter in {adapter_dir} was trained on {manifest.get('base')} (fingerprint {expected}), not on "
            f"{base.reference} (fingerprint {base.fingerprint}) — pass the same --base-llm or retrain with `ohlora-rag train-llm`"
        )
    return LLMChoice(base, adapter_dir, template or str(manifest.get("template") or "auto"))


def shipped_adapter() -> Path | None:
    """The LoRA adapter that ships in the package (ohlora_rag/tutor/adapter), if this install has it."""
    from .importers.tutor import ADAPTER_DIR, TUTOR_DIR

    folder = TUTOR_DIR / ADAPTER_DIR
    return folder if (folder / "adapter_config.json").is_file() else None


class Generator:
    """A causal LM ready to answer prompts built by `PromptBuilder`."""

    def __init__(self, choice: LLMChoice, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .device import torch_device
        from .encoder import quiet_transformers

        quiet_transformers()
        self.choice = choice
        self.device = device or torch_device()
        source = choice.adapter if choice.adapter and (choice.adapter / "tokenizer.json").exists() else choice.base.path
        with loading(ModelRef(str(source), Path(source)), "LLM tokenizer"):
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        with loading(choice.base, "LLM"):
            model = AutoModelForCausalLM.from_pretrained(choice.base.path, dtype=torch.float32, local_files_only=True)
        if choice.adapter is not None:
            from peft import PeftModel

            # Merged once at load: generation then costs exactly what the bare model costs.
            with loading(ModelRef(str(choice.adapter), choice.adapter), "LoRA adapter"):
                model = PeftModel.from_pretrained(model, str(choice.adapter)).merge_and_unload()
        self.model = model.to(self.device).eval()
        self.prompts = PromptBuilder.create(self.tokenizer, choice.template)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 160,
        temperature: float = 0.0,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continue `prompt` until EOS (or a template stop string, or `max_new_tokens`).

        Args:
            prompt: text from `self.prompts.prompt(...)`.
            max_new_tokens: hard cap on the answer length.
            temperature: 0 means greedy decoding; above 0 samples.
            seed: seeds sampling for reproducible answers.
            on_text: called with each new piece of text as it is generated (streaming).
        """
        import torch
        from transformers import TextIteratorStreamer, set_seed

        ids = torch.tensor([encode_prompt(self.tokenizer, prompt)], device=self.device)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
            set_seed(0 if seed is None else seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.prompts.stop_strings:
            kwargs.update(stop_strings=self.prompts.stop_strings, tokenizer=self.tokenizer)
        start = time.perf_counter()
        if on_text is None:
            with torch.inference_mode():
                out = self.model.generate(**kwargs)
            new = out[0, ids.shape[1] :]
            text = self.tokenizer.decode(new, skip_special_tokens=False)
            return Generation(self.prompts.clean(text), int(new.shape[0]), time.perf_counter() - start)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False)
        result: dict[str, Any] = {}

        def run() -> None:
            with torch.inference_mode():
                result["out"] = self.model.generate(**kwargs, streamer=streamer)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        stops = [*self.prompts.stop_strings, self.tokenizer.eos_token]
        hold = max(len(stop) for stop in stops) - 1  # a tail that may still grow into a stop marker waits
        text, emitted = "", 0
        for piece in streamer:
            text += piece
            visible = _cut(text, stops)
            safe = len(visible) if len(visible) < len(text) else max(len(visible) - hold, emitted)
            if safe > emitted:
                on_text(visible[emitted:safe])
                emitted = safe
        visible = _cut(text, stops).rstrip()
        if len(visible) > emitted:
            on_text(visible[emitted:])
        thread.join()
        new_tokens = int(result["out"].shape[1] - ids.shape[1])
        return Generation(self.prompts.clean(text), new_tokens, time.perf_counter() - start)


def _cut(text: str, stops: list[str]) -> str:
    """`text` up to the first complete stop marker."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text
