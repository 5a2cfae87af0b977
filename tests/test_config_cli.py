"""Every setting is declared once, in `config.py` (`knob`): the command line's options and the README's command table
must say what the declarations say."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import typer

from ohlora_rag.cli import app
from ohlora_rag.config import (
    AskConfig,
    IndexConfig,
    JudgeTrainConfig,
    LlmTrainConfig,
    SbertTrainConfig,
    SearchConfig,
    ServeConfig,
    VerifierTrainConfig,
    option_name,
)

README = Path(__file__).resolve().parents[1] / "README.md"

#: The settings each command exposes.
CONFIGS: dict[str, list[type]] = {
    "build-index": [IndexConfig],
    "search": [SearchConfig],
    "ask": [AskConfig],
    "chat": [AskConfig],
    "serve": [ServeConfig, AskConfig],
    "evaluate-answers": [AskConfig],
    "evaluate-conversations": [AskConfig],
    "train-sbert": [SbertTrainConfig],
    "train-llm": [LlmTrainConfig],
    "train-judge": [JudgeTrainConfig],
    "train-verifier": [VerifierTrainConfig],
    "evaluate-trust": [IndexConfig],
}
#: Options that are not settings: what a command reads or measures, and how it prints.
NOT_SETTINGS: dict[str, set[str]] = {
    "search": {"--json"},
    "ask": {"--file", "--out", "--json", "--stream"},
    "evaluate-answers": {"--data", "--full-pipeline", "--verify-entries", "--limit", "--json"},
    "evaluate-retrieval": {"--pairs", "--model", "--db", "--save-threshold", "--json"},
    "evaluate-trust": {"--questions", "--calibrate", "--db", "--model", "--variants", "--json"},
    "evaluate-conversations": {"--data", "--json"},
}


def _commands() -> dict[str, Any]:
    """The click commands typer builds (typer carries its own copy of click)."""
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _declared(command: str) -> dict[str, dataclasses.Field[Any]]:
    declared: dict[str, dataclasses.Field[Any]] = {}
    for config in CONFIGS.get(command, []):
        for f in dataclasses.fields(config):
            if "help" in f.metadata:
                declared.setdefault(option_name(f), f)
    return declared


def _cli_default(f: dataclasses.Field[Any]) -> Any:
    """What the option's default must be for the field's default to hold."""
    if f.metadata["negate"]:
        return False  # the flag turns a True setting off
    if f.default is dataclasses.MISSING:
        return None  # required by the API; the command resolves it (e.g. against --home)
    return f.default


def _options(command: Any) -> list[Any]:
    return [p for p in command.params if p.param_type_name == "option"]


def test_every_command_is_covered() -> None:
    assert set(_commands()) == set(CONFIGS) | set(NOT_SETTINGS)


@pytest.mark.parametrize("name", sorted(set(CONFIGS) | set(NOT_SETTINGS)))
def test_options_say_what_the_config_declares(name: str) -> None:
    declared = _declared(name)
    for param in _options(_commands()[name]):
        flag = next(o for o in param.opts if o.startswith("--"))
        if flag in NOT_SETTINGS.get(name, set()):
            continue
        assert flag in declared, f"{name} {flag}: not declared in config.py (use knob) nor listed as a non-setting"
        f = declared[flag]
        assert param.help == f.metadata["help"], f"{name} {flag}: help differs from config.py"
        default = param.default if not param.multiple else (param.default or ())
        expected = _cli_default(f)
        if param.multiple:
            expected = tuple(expected or ())
            default = tuple(default)
        assert default == expected, f"{name} {flag}: default {default!r}, config.py says {expected!r}"
        short = f.metadata.get("short")
        assert not short or short in param.opts, f"{name} {flag}: alias {short} missing"
        if f.metadata["negate"]:
            assert param.is_flag and f.default is True, f"{name} {flag}: negating flag of a non-True setting"


def test_a_changed_declaration_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: an option whose default or help drifts from its declaration is reported."""
    top_k = next(f for f in dataclasses.fields(AskConfig) if f.name == "top_k")
    monkeypatch.setattr(top_k, "default", 4)
    with pytest.raises(AssertionError, match="--top-k: default 3, config.py says 4"):
        test_options_say_what_the_config_declares("ask")
    monkeypatch.undo()
    seed = next(f for f in dataclasses.fields(AskConfig) if f.name == "seed")
    monkeypatch.setattr(seed, "metadata", {**seed.metadata, "help": "Another text."})
    with pytest.raises(AssertionError, match="--seed: help differs"):
        test_options_say_what_the_config_declares("ask")


def test_readme_command_table_shows_the_defaults() -> None:
    """`[--flag VALUE]` in the README's command table names the option's default."""
    rows = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| `ohlora-rag ")]
    assert rows
    checked = 0
    commands = _commands()
    for row in rows:
        name = row.split("`")[1].split()[1]
        if name not in commands:
            continue
        options = {o: p for p in _options(commands[name]) for o in p.opts}
        for flag, value in re.findall(r"\[(--[a-z0-9-]+) ([^\]\s|]+)\]", row.split("`")[1]):
            assert flag in options, f"README: {name} {flag} is not an option"
            default = options[flag].default
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert float(value) == float(default), f"README: {name} {flag} {value}, the default is {default}"
                checked += 1
            elif isinstance(default, str) and re.fullmatch(r"[\w.-]+", value):
                assert value == default, f"README: {name} {flag} {value}, the default is {default}"
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    ("config", "name", "kwargs"),
    [
        (SbertTrainConfig, "loss", {"data": Path("p.csv")}),
        (LlmTrainConfig, "template", {"data": Path("p.csv")}),
        (AskConfig, "dtype", {}),
        (AskConfig, "runtime", {}),
    ],
)
def test_declared_choices_are_named_in_the_help_and_enforced(config: type, name: str, kwargs: dict[str, Any]) -> None:
    from ohlora_rag.errors import UsageError

    f = next(f for f in dataclasses.fields(config) if f.name == name)
    choices = f.metadata["choices"]
    assert choices and all(choice in f.metadata["help"] for choice in choices)
    for choice in choices:
        config(**kwargs, **{name: choice})
    with pytest.raises(UsageError, match=rf"^{option_name(f)} nope: choose one of {', '.join(choices)}$"):
        config(**kwargs, **{name: "nope"})
