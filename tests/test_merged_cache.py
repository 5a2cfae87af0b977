"""The base + LoRA merge is kept between runs: made once, reused as a plain load, remade when the adapter changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ohlora_rag.config import Paths
from ohlora_rag.generator import Generator, LLMChoice, choose_llm, merged_folder


def _adapter(lm: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(lm)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def choice(tiny_lm: Path, tmp_path: Path) -> LLMChoice:
    _adapter(tiny_lm, tmp_path / "adapter", seed=1)
    return choose_llm(str(tiny_lm), tmp_path / "adapter", Paths(tmp_path / "home"))


def _answer(generator: Generator) -> str:
    prompt = generator.prompts.prompt("what is precision ?", "precision : true positives over predicted positives")
    return generator.generate(prompt, max_new_tokens=12).text


def _weights(generator: Generator) -> dict[str, object]:
    return {k: v.clone() for k, v in generator.model.state_dict().items()}


def _same(a: dict[str, object], b: dict[str, object]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # type: ignore[arg-type]


def test_merge_is_kept_and_reused(choice: LLMChoice, tiny_lm: Path) -> None:
    folder = merged_folder(choice)
    assert folder is not None and folder.parent == choice.cache and not folder.exists()
    made = Generator(choice, device="cpu")
    assert (folder / "config.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    reused = Generator(choice, device="cpu")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # loaded, not remade
    in_memory = Generator(LLMChoice(choice.base, choice.adapter, choice.template), device="cpu")  # no cache
    assert _same(_weights(reused), _weights(in_memory)) and _same(_weights(made), _weights(in_memory))
    assert _answer(reused) == _answer(in_memory)
    base = Generator(LLMChoice(choice.base, None, choice.template), device="cpu")
    assert not _same(_weights(base), _weights(reused))  # the adapter is in the kept merge


def test_a_changed_adapter_gets_a_new_merge(choice: LLMChoice, tiny_lm: Path) -> None:
    old = merged_folder(choice)
    Generator(choice, device="cpu")
    assert choice.adapter is not None
    _adapter(tiny_lm, choice.adapter, seed=2)  # retrained in place
    new = merged_folder(choice)
    assert new != old
    remade = Generator(choice, device="cpu")
    assert new is not None and new.is_dir() and old is not None and not old.exists()  # the stale merge is gone
    fresh = Generator(LLMChoice(choice.base, choice.adapter, choice.template), device="cpu")
    assert _same(_weights(remade), _weights(fresh))


def test_an_unwritable_cache_only_costs_the_merge(choice: LLMChoice, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    choice.cache = blocked / "cache"  # cannot be created
    assert _answer(Generator(choice, device="cpu")) is not None
