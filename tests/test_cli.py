"""The command line through CliRunner: build-index, search, --json, and a one-line error for each bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ohlora_rag.cli import app

runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201
    return runner.invoke(app, list(args))


def test_build_then_search(home: Path) -> None:
    built = invoke("build-index", "-q")
    assert built.exit_code == 0, built.output
    assert "indexed 6 entries" in built.stdout
    # The tiny encoder has no prompts: an entry's own text is its exact nearest neighbour.
    text = "precision : true positives over predicted positives | key idea: few false alarms"
    found = invoke("search", text, "--top-k", "2", "--json")
    assert found.exit_code == 0, found.output
    payload = json.loads(found.stdout)
    assert payload["hits"][0]["id"] == "precision"
    assert payload["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert payload["hits"][0]["metadata"] == {"title": "precision"}
    assert len(payload["hits"]) == 2 and payload["matched"] is True
    plain = invoke("search", text, "-k", "1")
    assert plain.exit_code == 0 and plain.stdout.startswith("1. [1.000] precision\n")


def test_threshold_reports_no_match(home: Path) -> None:
    assert invoke("build-index", "-q").exit_code == 0
    result = invoke("search", "what is dropout", "--threshold", "1.0")
    assert result.exit_code == 0
    assert "no matching information: best score below the threshold 1.00" in result.stdout
    assert "(below threshold)" in result.stdout


def test_home_option_overrides_environment(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OHLORA_HOME", str(tmp_path / "elsewhere"))
    result = runner.invoke(app, ["--home", str(home), "build-index", "-q"])
    assert result.exit_code == 0, result.output
    assert (home / "index" / "CURRENT").exists()


def test_db_and_encoder_options(home: Path, tmp_path: Path) -> None:
    db = tmp_path / "other.txt"
    db.write_text("what is adam\nwhat is lora\nexplain dropout\n", encoding="utf-8")
    encoder = tmp_path / "enc"
    shutil.copytree(home / "models" / "sbert", encoder)
    result = invoke("build-index", "--db", str(db), "--encoder", str(encoder), "--batch-size", "2", "-q")
    assert result.exit_code == 0, result.output
    assert f"indexed 3 entries from {db} with {encoder}" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("search", "   "), 2, "error: the question is empty — ask something"),
        (("search", "x", "--top-k", "0"), 2, "error: --top-k 0: must be at least 1"),
        (("search", "x", "--threshold", "2"), 2, "error: --threshold 2.0: a cosine threshold must lie in [-1, 1]"),
        (("build-index", "--batch-size", "0"), 2, "error: --batch-size 0: must be at least 1"),
        (("build-index", "--db", "/nonexistent/db.csv"), 1, "error: concept DB /nonexistent/db.csv not found"),
        (("build-index", "--encoder", "/nonexistent/model"), 1, "error: model '/nonexistent/model': no such folder"),
        (("search", "what is lora"), 1, "— run `ohlora-rag build-index`"),
    ],
)
def test_bad_input_is_one_line_without_traceback(home: Path, args: tuple[str, ...], code: int, message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_unknown_hub_id_offline_lists_builtins(home: Path) -> None:
    result = invoke("build-index", "--encoder", "no-such-org/no-such-model", "-q")
    assert result.exit_code == 1
    assert "built-in encoder: multilingual-e5-small" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_index_from_another_encoder_is_refused(home: Path, tmp_path: Path) -> None:
    from tests.conftest import make_tiny_sbert

    assert invoke("build-index", "-q").exit_code == 0
    other = make_tiny_sbert(tmp_path / "other", seed=1)
    result = invoke("search", "what is lora", "--encoder", str(other))
    assert result.exit_code == 1
    assert "was built with encoder" in result.stderr and "run `ohlora-rag build-index` to rebuild it" in result.stderr


def test_bad_db_keeps_index(home: Path, tmp_path: Path) -> None:
    assert invoke("build-index", "-q").exit_code == 0
    current = (home / "index" / "CURRENT").read_text()
    bad = tmp_path / "bad.csv"
    bad.write_text("id,body\n1,x\n", encoding="utf-8")
    result = invoke("build-index", "--db", str(bad))
    assert result.exit_code == 1 and "no 'text' column" in result.stderr
    assert (home / "index" / "CURRENT").read_text() == current


def test_help_lists_commands_and_loads_no_heavy_library() -> None:
    proc = subprocess.run([sys.executable, "-m", "ohlora_rag", "--help"], capture_output=True, text=True, check=True)
    for command in ("build-index", "search", "serve"):
        assert command in proc.stdout
    heavy = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, ohlora_rag.cli; print(sorted(m for m in ('torch','faiss','transformers','sentence_transformers') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert heavy.stdout.strip() == "[]"  # lazy imports: --help loads none of the heavy libraries


def test_failed_index_write_keeps_index(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    assert invoke("build-index", "-q").exit_code == 0
    current = (home / "index" / "CURRENT").read_text()

    def full_disk(*_: object) -> None:  # what Faiss raises when fwrite fails
        raise RuntimeError("Error in faiss::FileIOWriter: write error in index.faiss (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    result = invoke("build-index", "-q")
    assert result.exit_code == 1 and "could not write the index" in result.stderr
    assert "No space left on device" in result.stderr and "Traceback" not in result.output
    assert (home / "index" / "CURRENT").read_text() == current
    assert not [p for p in (home / "index").iterdir() if p.name.startswith(".staging-")]


def test_save_threshold_reaches_the_index(home: Path, tiny_sbert_master: Path, tmp_path: Path) -> None:
    from ohlora_rag.models import read_manifest, write_manifest
    from tests.test_train_sbert import write_pairs

    sbert = home / "models" / "sbert"
    write_manifest(sbert, kind="encoder", reference=str(sbert), base=str(tiny_sbert_master), threshold=0.99)
    fingerprint = read_manifest(sbert)["fingerprint"]  # type: ignore[index]
    pairs = write_pairs(tmp_path / "dev.csv")
    result = invoke("evaluate-retrieval", "--pairs", str(pairs), "--save-threshold", "--json")
    assert result.exit_code == 0, result.output
    calibrated = json.loads(result.stdout)["fine-tuned"]["calibration"]["threshold"]
    manifest = read_manifest(sbert) or {}
    assert manifest["threshold"] == calibrated != 0.99 and manifest["threshold_calibrated_on"] == str(pairs)
    assert manifest["fingerprint"] == fingerprint  # the weights did not change, indexes built with them stay valid
    assert invoke("build-index", "-q").exit_code == 0
    index_manifest = json.loads(
        (home / "index" / (home / "index" / "CURRENT").read_text().strip() / "manifest.json").read_text()
    )
    assert index_manifest["threshold"] == calibrated


def test_save_threshold_needs_a_trained_encoder(home: Path, tmp_path: Path) -> None:
    from tests.test_train_sbert import write_pairs

    result = invoke("evaluate-retrieval", "--pairs", str(write_pairs(tmp_path / "dev.csv")), "--save-threshold")
    assert result.exit_code == 2 and "--save-threshold" in result.stderr and "encoder manifest" in result.stderr


def _one_line_error(result, code: int, message: str) -> None:  # noqa: ANN001
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_question_that_is_not_utf8_is_one_line(home: Path) -> None:
    assert invoke("build-index", "-q").exit_code == 0
    # what `search $'what is \xff\xfe recall'` delivers: Python decodes argv with surrogateescape
    result = invoke("search", "what is \udcff\udcfe recall")
    _one_line_error(result, 2, "the question is not valid UTF-8 (byte 0xff at position 9)")


def test_read_only_index_fails_before_encoding(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ohlora_rag.build as build
    from tests.conftest import read_only

    assert invoke("build-index", "-q").exit_code == 0
    current = (home / "index" / "CURRENT").read_text()

    def no_encoding(*_: object, **__: object) -> None:
        raise AssertionError("the encoder was loaded before the index folder was checked")

    monkeypatch.setattr(build, "Encoder", no_encoding)
    with read_only(home / "index"):
        result = invoke("build-index", "-q")
    _one_line_error(result, 1, f"cannot write into the index folder {home / 'index'} (")
    assert "make it writable, or pass --home with a writable folder" in result.stderr
    assert (home / "index" / "CURRENT").read_text() == current


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"foo": 1}', "does not load (ValueError: "),
        ("this is not json", "config.json is not readable JSON (Expecting value"),
        ("[1, 2", "config.json is not readable JSON"),
        ("42", "config.json holds a JSON int, not an object"),
    ],
)
def test_broken_encoder_folder_is_one_line(home: Path, tmp_path: Path, config: str, message: str) -> None:
    from tests.conftest import broken_model

    broken = broken_model(home / "models" / "sbert", tmp_path / "broken", config)
    _one_line_error(invoke("build-index", "--encoder", str(broken), "-q"), 1, message)
    # its base is measured first: name the tiny one, or the built-in base would be converted (slow)
    (broken / "ohlora_model.json").write_text(json.dumps({"base": str(home / "models" / "sbert")}), encoding="utf-8")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user_question,rag_retrieved_data,similarity_score\nq,e,1.0\n", encoding="utf-8")
    _one_line_error(invoke("evaluate-retrieval", "--pairs", str(pairs), "--model", str(broken)), 1, message)


def test_every_option_has_help_and_flags_show_no_type() -> None:
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.opts[0]} has no help text"
        shown = runner.invoke(app, [name, "--help"])
        assert shown.exit_code == 0 and "<bool>" not in shown.stdout, name
    assert "<bool>" not in runner.invoke(app, ["--help"]).stdout
    json_option = next(p for p in group.commands["ask"].params if p.name == "as_json")  # type: ignore[attr-defined]
    assert "turns --stream off" in (json_option.help or "")


@pytest.mark.parametrize(
    ("command", "default"),
    [
        (["train-sbert", "-q"], "data/sbert_train.csv"),
        (["train-llm", "-q"], "data/sft_train.csv"),
        (["evaluate-answers"], "data/sft_dev.csv"),
    ],
)
def test_default_data_paths_follow_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], default: str
) -> None:
    """With --home, a default data file is looked up under that folder, not the current one."""
    here = tmp_path / "elsewhere"
    (here / "data").mkdir(parents=True)
    (here / default).write_text("not,the,file\n1,2,3\n", encoding="utf-8")  # must not be read
    monkeypatch.chdir(here)
    other = tmp_path / "home"
    other.mkdir()
    result = runner.invoke(app, ["--home", str(other), *command])
    assert result.exit_code == 1, result.output
    assert f"{other / default} not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_every_float_setting_must_be_finite() -> None:
    from dataclasses import fields

    from ohlora_rag.config import AskConfig, IndexConfig, LlmTrainConfig, SbertTrainConfig, SearchConfig
    from ohlora_rag.errors import UsageError

    checked = 0
    for cls in (IndexConfig, SearchConfig, SbertTrainConfig, LlmTrainConfig, AskConfig):
        required = {"data": Path("x.csv")} if cls in (SbertTrainConfig, LlmTrainConfig) else {}
        for f in fields(cls):
            if "float" not in str(f.type):
                continue
            for bad in (float("nan"), float("inf"), float("-inf")):
                with pytest.raises(UsageError, match="must be a finite number"):
                    cls(**required, **{f.name: bad})  # type: ignore[arg-type]
                checked += 1
    assert checked == 3 * 9  # threshold x2, lr x2, warmup, ranking weight, valid fraction, dropout, temperature
