"""ask / chat / batch / --json through CliRunner, with a scripted generator and with the tiny random LM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

import ohlora_rag.engine as engine_module
from ohlora_rag.cli import app
from ohlora_rag.generator import Generation, LLMChoice, Reply
from ohlora_rag.prompt import NO_INFO, PromptBuilder

from .conftest import heavy_imports

runner = CliRunner()
PRECISION = "precision : true positives over predicted positives | key idea: few false alarms"


class ScriptedGenerator:
    """Stands in for the LLM: answers from a script and records every prompt it was given."""

    prompts_seen: list[str] = []

    def __init__(self, choice: LLMChoice, dtype: str = "auto") -> None:
        self.choice = choice
        self.dtype = dtype
        self.prompts = PromptBuilder.create(AutoTokenizer.from_pretrained(choice.base.path), choice.template)

    def start(self, prompt: str, max_new_tokens: int = 160, temperature: float = 0.0, seed: int | None = None) -> Reply:
        ScriptedGenerator.prompts_seen.append(prompt)
        text = "I have no notes on that." if NO_INFO in prompt else "Precision counts false alarms."
        return Reply.finished([word + " " for word in text.split(" ")], Generation(text, len(text.split()), 0.01))


@pytest.fixture
def scripted(home: Path, monkeypatch: pytest.MonkeyPatch, tiny_lm: Path) -> Path:
    ScriptedGenerator.prompts_seen = []
    monkeypatch.setattr(engine_module, "Generator", ScriptedGenerator)
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    return tiny_lm


def test_ask_puts_the_matching_entry_into_the_prompt(scripted: Path) -> None:
    result = runner.invoke(app, ["ask", PRECISION, "--base-llm", str(scripted)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Precision counts false alarms.\n\nsource [1.000] precision: ")
    assert "no trained adapter" in result.stderr  # the base model answers, with a notice
    assert f"Information: {PRECISION}" in ScriptedGenerator.prompts_seen[0]


def test_ask_below_threshold_says_no_information(scripted: Path) -> None:
    result = runner.invoke(app, ["ask", "what is dropout", "--threshold", "1.0", "--base-llm", str(scripted)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("I have no notes on that.\n\nsource: none (best score")
    assert f"Information: {NO_INFO}" in ScriptedGenerator.prompts_seen[0]


def test_ask_json(scripted: Path) -> None:
    result = runner.invoke(app, ["ask", PRECISION, "--json", "--base-llm", str(scripted)])
    payload = json.loads(result.stdout)
    assert payload["answer"] == "Precision counts false alarms." and payload["matched"] is True
    assert payload["source"]["id"] == "precision" and len(payload["scores"]) == 3
    assert set(payload["timings"]) == {"load", "retrieve", "generate"}


def test_ask_stream(scripted: Path) -> None:
    result = runner.invoke(app, ["ask", PRECISION, "--stream", "--base-llm", str(scripted)])
    assert result.exit_code == 0
    assert result.stdout.startswith("Precision counts false alarms. \n\nsource [1.000] precision")


def test_batch(scripted: Path, tmp_path: Path) -> None:
    questions = tmp_path / "q.txt"
    questions.write_text(f"{PRECISION}\n\nwhat is lora\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    result = runner.invoke(app, ["ask", "--file", str(questions), "--out", str(out), "--base-llm", str(scripted)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [x["question"] for x in lines] == [PRECISION, "what is lora"]
    assert "wrote 2 answers" in result.stderr


def test_chat_loop(scripted: Path) -> None:
    result = runner.invoke(app, ["chat", "--base-llm", str(scripted)], input=f"{PRECISION}\nwhat is adam\nexit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("tutor> ") == 2 and len(ScriptedGenerator.prompts_seen) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask"], "give a question or --file FILE"),
        (["ask", "  "], "the question is empty"),
        (["ask", "x", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
        (["ask", "x", "--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or more"),
        (["ask", "--file", "/nonexistent/q.txt"], "questions file /nonexistent/q.txt not found"),
        (["ask", "x", "--adapter", "/nonexistent/adapter"], "--adapter /nonexistent/adapter: no LoRA adapter there"),
    ],
)
def test_bad_input(scripted: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, [*args, "--base-llm", str(scripted)] if len(args) > 1 or args != ["ask"] else args)
    assert result.exit_code in (1, 2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_ask_without_index_points_at_build_index(home: Path, tiny_lm: Path) -> None:
    result = runner.invoke(app, ["ask", "what is lora", "--base-llm", str(tiny_lm)])
    assert result.exit_code == 1 and "run `ohlora-rag build-index`" in result.stderr


def test_real_tiny_lm_end_to_end(home: Path, tiny_lm: Path) -> None:
    """No script: the random tiny LM really generates, bounded by --max-new-tokens, through the whole pipeline."""
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    result = runner.invoke(app, ["ask", PRECISION, "--json", "--max-new-tokens", "5", "--base-llm", str(tiny_lm)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert 1 <= payload["new_tokens"] <= 5 and payload["source"]["id"] == "precision"


def test_streamed_pieces_make_the_answer(tiny_lm: Path, tmp_path: Path) -> None:
    from ohlora_rag.config import Paths
    from ohlora_rag.generator import Generator, choose_llm

    generator = Generator(choose_llm(str(tiny_lm), None, Paths(tmp_path)), device="cpu")
    prompt = generator.prompts.prompt("what is precision ?", PRECISION)
    reply = generator.start(prompt, max_new_tokens=12)
    pieces = list(reply)
    streamed = reply.result()
    plain = generator.generate(prompt, max_new_tokens=12)
    assert streamed.text == plain.text  # greedy: the same answer either way
    assert "".join(pieces).strip() == plain.text and streamed.new_tokens == plain.new_tokens


def test_no_adapter_answers_with_the_base_model(scripted: Path, home: Path, tmp_path: Path) -> None:
    (home / "models" / "llm").mkdir(parents=True)
    (home / "models" / "llm" / "adapter_config.json").write_text("{}")  # would fail to load: must not be touched
    result = runner.invoke(app, ["ask", PRECISION, "--no-adapter", "--base-llm", str(scripted)])
    assert result.exit_code == 0, result.output
    assert "--no-adapter: answering with the base model" in result.stderr


class InventingGenerator(ScriptedGenerator):
    """A model that answers everything, even without information."""

    def start(self, prompt: str, max_new_tokens: int = 160, temperature: float = 0.0, seed: int | None = None) -> Reply:
        ScriptedGenerator.prompts_seen.append(prompt)
        text = "The president of France is someone I made up."
        return Reply.finished([text], Generation(text, 9, 0.01))


def test_guard_replaces_an_invented_answer_when_nothing_matched(
    scripted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ohlora_rag.prompt import DECLINE

    monkeypatch.setattr(engine_module, "Generator", InventingGenerator)
    declined = json.loads(
        runner.invoke(
            app, ["ask", "who leads france", "--threshold", "1.0", "--json", "--base-llm", str(scripted)]
        ).stdout
    )
    assert declined["answer"] == DECLINE and declined["guarded"] is True
    kept = json.loads(
        runner.invoke(
            app, ["ask", "who leads france", "--threshold", "1.0", "--json", "--no-guard", "--base-llm", str(scripted)]
        ).stdout
    )
    assert kept["answer"].startswith("The president of France") and kept["guarded"] is False
    matched = json.loads(runner.invoke(app, ["ask", PRECISION, "--json", "--base-llm", str(scripted)]).stdout)
    assert matched["guarded"] is False  # with an entry in the prompt the model's answer stands


@pytest.mark.parametrize("out", ["/nonexistent/dir/a.jsonl", "{tmp}"])
def test_batch_out_is_checked_before_loading_models(
    scripted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str
) -> None:
    questions = tmp_path / "q.txt"
    questions.write_text("what is lora\n", encoding="utf-8")

    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("models were loaded before --out was checked")

    monkeypatch.setattr(engine_module.QueryEngine, "load", no_loading)
    target = out.format(tmp=tmp_path)
    result = runner.invoke(app, ["ask", "--file", str(questions), "--out", target, "--base-llm", str(scripted)])
    assert result.exit_code == 2, result.output
    expected = "the folder /nonexistent/dir does not exist" if target.startswith("/nonexistent") else "is a folder"
    assert result.stderr.startswith(f"error: --out {target}: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_chat_reports_a_line_that_is_not_utf8_and_goes_on(scripted: Path) -> None:
    lines = b"what is \xff\xfe recall\n" + PRECISION.encode() + b"\nexit\n"
    result = runner.invoke(app, ["chat", "--base-llm", str(scripted)], input=lines)
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the question is not valid UTF-8 (byte 0xff at position 9) — type it again, or set a UTF-8 locale "
        "for the terminal"
    ]
    assert result.stdout.count("tutor> ") == 1 and len(ScriptedGenerator.prompts_seen) == 1


@pytest.mark.parametrize(
    ("config", "message"),
    [('{"foo": 1}', "does not load (ValueError"), ("{broken", "config.json is not readable JSON")],
)
def test_broken_base_llm_is_one_line(home: Path, tiny_lm: Path, tmp_path: Path, config: str, message: str) -> None:
    from tests.conftest import broken_model

    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    broken = broken_model(tiny_lm, tmp_path / "broken-lm", config)
    result = runner.invoke(app, ["ask", "what is lora", "--base-llm", str(broken)])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_broken_adapter_config_is_one_line(scripted: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{oops", encoding="utf-8")
    result = runner.invoke(app, ["ask", "what is lora", "--adapter", str(adapter), "--base-llm", str(scripted)])
    assert result.exit_code == 1, result.output
    assert f"model folder {adapter}: adapter_config.json is not readable JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ask_path_imports_no_training_libraries(home: Path, tiny_lm: Path) -> None:
    """Answering a question (sampled, so seeding runs too) loads neither sentence-transformers, peft, trl, datasets,
    scikit-learn nor pandas: they cost seconds of every cold `ask`."""
    from ohlora_rag.build import build_index
    from ohlora_rag.config import IndexConfig, Paths

    build_index(IndexConfig(db=home / "data" / "concepts.csv", progress=False), Paths.resolve())
    code = (
        "from ohlora_rag.config import AskConfig, Paths\n"
        "from ohlora_rag.engine import QueryEngine\n"
        f"config = AskConfig(base_llm={str(tiny_lm)!r}, use_adapter=False, max_new_tokens=4, temperature=0.7)\n"
        "assert QueryEngine.load(config, Paths.resolve()).ask('what is dropout ?').new_tokens > 0\n"
    )
    assert heavy_imports(code) == []
