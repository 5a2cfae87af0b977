"""Bad input through the real command line, one case per input: the exit code (2 for a bad option value, 1 for
anything else), exactly one line on stderr that starts with `error:`, no traceback, and every file of the home
folder (index, models) and of the inputs byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ohlora_rag.cli import app
from tests.conftest import broken_model, make_tiny_sbert, read_only, write_concepts, write_sft
from tests.test_train_sbert import write_pairs

runner = CliRunner()
Setup = Callable[[Path, Path], list[str]]  # (home, scratch folder) -> arguments after `--home HOME`


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_sbert_master: Path, tiny_lm_master: Path) -> Path:
    """A home with the project layout, the tiny S-BERT as models/sbert, a published index and a tiny LM."""
    root = tmp_path_factory.mktemp("bad-input") / "home"
    write_concepts(root / "data" / "concepts.csv")
    shutil.copytree(tiny_sbert_master, root / "models" / "sbert")
    result = runner.invoke(app, ["--home", str(root), "build-index", "-q"])
    assert result.exit_code == 0, result.output
    shutil.copytree(tiny_lm_master, root / "lm")  # inside the home so that every copy has one; not under models/
    return root


@pytest.fixture
def home(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "home"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`: relative path -> sha256 of the bytes ("dir" for a folder)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def check_one_line(code: int, stderr: str, output: str, expected_code: int, message: str) -> None:
    assert code == expected_code, output
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in output


# --- helpers that make inputs -------------------------------------------------------------------------------


def w(path: Path, content: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def build(h: Path) -> Path:
    return h / "index" / (h / "index" / "CURRENT").read_text(encoding="utf-8").strip()


def flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(h: Path, **changes: object) -> None:
    path = build(h) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def then(action: Callable[[Path, Path], object], *args: str) -> Setup:
    """Change the home (or make an input) first, then run `args`."""

    def setup(h: Path, t: Path) -> list[str]:
        action(h, t)
        return [a.format(h=h, t=t) for a in args]

    return setup


def folder(path: Path) -> str:
    path.mkdir(parents=True)
    return str(path)


def damage(action: Callable[[Path], object]) -> Setup:
    """Damage the published build, then search."""

    def setup(h: Path, t: Path) -> list[str]:
        action(build(h))
        return ["search", "what is recall"]

    return setup


def pointer(content: bytes) -> Setup:
    def setup(h: Path, t: Path) -> list[str]:
        (h / "index" / "CURRENT").write_bytes(content)
        return ["search", "what is recall"]

    return setup


def scaled_vectors(h: Path, t: Path) -> list[str]:
    """faiss.index holds vectors of length 10 and the manifest's checksum was made to match."""
    import faiss

    published = build(h)
    raw = faiss.read_index(str(published / "faiss.index"))
    scaled = faiss.IndexFlatIP(raw.d)
    scaled.add(raw.reconstruct_n(0, raw.ntotal) * 10.0)
    faiss.write_index(scaled, str(published / "faiss.index"))
    data = (published / "faiss.index").read_bytes()
    files = json.loads((published / "manifest.json").read_text())["files"]
    files["faiss.index"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    edit_manifest(h, files=files)
    return ["search", "what is recall", "--threshold", "0.5"]


def broken_encoder(content: str | bytes, name: str = "config.json", base: bool = False) -> Callable[[Path, Path], str]:
    """A copy of the tiny encoder with one file replaced by `content`."""

    def make(h: Path, t: Path) -> str:
        copy = Path(shutil.copytree(h / "models" / "sbert", t / "broken-encoder"))
        w(copy / name, content)
        if base:  # evaluate-retrieval measures the model's base first: the tiny one, not the built-in (slow)
            (copy / "ohlora_model.json").write_text(json.dumps({"base": str(h / "models" / "sbert")}))
        return str(copy)

    return make


def broken_lm(config: str) -> Callable[[Path, Path], str]:
    def make(h: Path, t: Path) -> str:
        return str(broken_model(h / "lm", t / "broken-lm", config))

    return make


def pairs(t: Path) -> str:
    return str(write_pairs(t / "pairs.csv"))


def sft(t: Path) -> str:
    return str(write_sft(t / "sft.csv"))


LONG = "x" * 20_001
PAIRS_HEAD = "user_question,rag_retrieved_data,similarity_score\n"
SFT_HEAD = "user_question,rag_retrieved_data,output_message\n"
FOO = '{"foo": 1}'

# (id, setup, exit code, a part of the error line)
CASES: list[tuple[str, Setup, int, str]] = [
    # search: the question and the options
    ("search-empty", lambda h, t: ["search", ""], 2, "the question is empty"),
    ("search-blank", lambda h, t: ["search", "  \t "], 2, "the question is empty"),
    ("search-not-utf8", lambda h, t: ["search", "what is \udcff\udcfe recall"], 2, "not valid UTF-8 (byte 0xff"),
    ("search-lone-surrogate", lambda h, t: ["search", "what \ud800"], 2, "not valid UTF-8 (character U+D800"),
    ("search-top-k-0", lambda h, t: ["search", "x", "--top-k", "0"], 2, "--top-k 0: must be at least 1"),
    ("search-top-k-negative", lambda h, t: ["search", "x", "-k", "-2"], 2, "--top-k -2: must be at least 1"),
    ("search-threshold-2", lambda h, t: ["search", "x", "--threshold", "2"], 2, "must lie in [-1, 1]"),
    (
        "search-threshold-nan",
        lambda h, t: ["search", "x", "--threshold", "nan"],
        2,
        "--threshold nan: must be a finite",
    ),
    (
        "search-threshold-inf",
        lambda h, t: ["search", "x", "--threshold", "inf"],
        2,
        "--threshold inf: must be a finite",
    ),
    ("search-threshold-neg-inf", lambda h, t: ["search", "x", "--threshold", "-inf"], 2, "--threshold -inf"),
    ("search-encoder-missing", lambda h, t: ["search", "x", "--encoder", str(t / "nope")], 1, "no such folder"),
    (
        "search-encoder-empty-folder",
        lambda h, t: ["search", "x", "--encoder", folder(t / "empty")],
        1,
        "has no config.json or modules.json",
    ),
    (
        "search-encoder-config-not-json",
        lambda h, t: ["search", "x", "--encoder", broken_encoder("nope")(h, t)],
        1,
        "config.json is not readable JSON",
    ),
    (
        "search-encoder-of-another-index",
        lambda h, t: ["search", "x", "--encoder", str(make_tiny_sbert(t / "other", seed=1))],
        1,
        "was built with encoder",
    ),
    # search: the index folder
    ("no-index", then(lambda h, t: shutil.rmtree(h / "index"), "search", "x"), 1, "no index at"),
    ("current-random-bytes", pointer(b"\xff\xfe\x00\x81junk"), 1, "is damaged (CURRENT is not valid UTF-8)"),
    ("current-parent", pointer(b"../../etc\n"), 1, "is damaged (CURRENT holds '../../etc'"),
    ("current-absolute", pointer(b"/etc/passwd"), 1, "is damaged (CURRENT holds '/etc/passwd'"),
    ("current-dotdot-inside", pointer(b"build-a/../../x"), 1, "not the name of a build folder"),
    ("current-empty", pointer(b""), 1, "is damaged (CURRENT holds ''"),
    ("current-missing-build", pointer(b"build-20000101T000000-1-000001\n"), 1, "points at a missing build"),
    (
        "current-is-folder",
        then(lambda h, t: [(h / "index" / "CURRENT").unlink(), (h / "index" / "CURRENT").mkdir()], "search", "x"),
        1,
        "is damaged (CURRENT is unreadable",
    ),
    ("faiss-flipped", damage(lambda b: flip(b / "faiss.index")), 1, "faiss.index does not match the sha256"),
    ("faiss-truncated", damage(lambda b: (b / "faiss.index").write_bytes(b"IxF")), 1, "faiss.index is 3 bytes"),
    ("faiss-deleted", damage(lambda b: (b / "faiss.index").unlink()), 1, "faiss.index is missing"),
    ("entries-flipped", damage(lambda b: flip(b / "entries.parquet", 50)), 1, "entries.parquet does not match"),
    ("entries-deleted", damage(lambda b: (b / "entries.parquet").unlink()), 1, "entries.parquet is missing"),
    ("stats-truncated", damage(lambda b: (b / "score_stats.npz").write_bytes(b"PK")), 1, "score_stats.npz is 2 bytes"),
    ("stats-flipped", damage(lambda b: flip(b / "score_stats.npz", 200)), 1, "score_stats.npz does not match"),
    ("bm25-flipped", damage(lambda b: flip(b / "bm25" / "vocab.index.json", 3)), 1, "bm25/vocab.index.json does not"),
    ("bm25-deleted", damage(lambda b: (b / "bm25" / "params.index.json").unlink()), 1, "bm25/params.index.json is"),
    ("bm25-folder-deleted", damage(lambda b: shutil.rmtree(b / "bm25")), 1, "is missing"),
    ("manifest-not-json", damage(lambda b: (b / "manifest.json").write_text("{")), 1, "manifest.json: Expecting"),
    ("manifest-a-list", damage(lambda b: (b / "manifest.json").write_text("[1]")), 1, "is damaged (build-"),
    ("manifest-not-utf8", damage(lambda b: (b / "manifest.json").write_bytes(b"\xff{}")), 1, "is damaged (build-"),
    (
        "manifest-count-text",
        then(lambda h, t: edit_manifest(h, count="six"), "search", "x"),
        1,
        "field 'count' is str",
    ),
    (
        "manifest-no-faiss-record",
        then(lambda h, t: edit_manifest(h, files={}), "search", "x"),
        1,
        "lists no faiss.index",
    ),
    ("manifest-format-99", then(lambda h, t: edit_manifest(h, format_version=99), "search", "x"), 1, "has format 99"),
    (
        "manifest-decision-garbage",
        then(lambda h, t: edit_manifest(h, decision={"coef": "x"}), "search", "x"),
        1,
        "unreadable decision model",
    ),
    ("vectors-not-unit-length", scaled_vectors, 1, "outside [-1, 1]"),
    # build-index: options and the concept DB
    ("build-batch-size-0", lambda h, t: ["build-index", "--batch-size", "0"], 2, "--batch-size 0: must be at least"),
    ("build-batch-size-negative", lambda h, t: ["build-index", "--batch-size", "-4"], 2, "--batch-size -4"),
    ("db-missing", lambda h, t: ["build-index", "--db", str(t / "no.csv")], 1, "concept DB"),
    ("db-is-a-folder", lambda h, t: ["build-index", "--db", str(t)], 1, "not found"),
    ("db-empty-csv", lambda h, t: ["build-index", "--db", w(t / "e.csv", "")], 1, "is empty"),
    ("db-header-only", lambda h, t: ["build-index", "--db", w(t / "h.csv", "id,text\n")], 1, "has no data rows"),
    ("db-no-text-column", lambda h, t: ["build-index", "--db", w(t / "n.csv", "id,body\n1,x\n")], 1, "no 'text'"),
    (
        "db-text-twice",
        lambda h, t: ["build-index", "--db", w(t / "d.csv", "id,text,text\n1,a,b\n")],
        1,
        "columns 2 and 3 are both named 'text'",
    ),
    (
        "db-id-twice-with-spaces",
        lambda h, t: ["build-index", "--db", w(t / "d.csv", "id, text,id \n1,a,b\n")],
        1,
        "columns 1 and 3 are both named 'id'",
    ),
    (
        "db-parquet-text-twice",
        then(
            lambda h, t: pq.write_table(
                pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), t / "d.parquet"
            ),
            "build-index",
            "--db",
            "{t}/d.parquet",
        ),
        1,
        "are both named 'text'",
    ),
    ("db-parquet-garbage", lambda h, t: ["build-index", "--db", w(t / "g.parquet", b"PAR1xx")], 1, "not a readable"),
    ("db-latin1-txt", lambda h, t: ["build-index", "--db", w(t / "l.txt", b"ok\ncaf\xe9\n")], 1, "not valid UTF-8"),
    ("db-latin1-csv", lambda h, t: ["build-index", "--db", w(t / "l.csv", b"text\ncaf\xe9\n")], 1, "not valid UTF-8"),
    ("db-blank-line", lambda h, t: ["build-index", "--db", w(t / "b.txt", "a\n \nb\n")], 1, "line 2 is empty"),
    ("db-duplicate-entry", lambda h, t: ["build-index", "--db", w(t / "d.txt", "a\nb\na\n")], 1, "the same entry"),
    ("db-duplicate-id", lambda h, t: ["build-index", "--db", w(t / "i.csv", "id,text\nk,a\nk,b\n")], 1, "same id"),
    ("db-empty-text", lambda h, t: ["build-index", "--db", w(t / "x.csv", 'id,text\n1,""\n')], 1, "'text' is empty"),
    ("db-ragged-row", lambda h, t: ["build-index", "--db", w(t / "r.csv", "id,text\n1,a,b\n")], 1, "has 3 fields"),
    ("db-json", lambda h, t: ["build-index", "--db", w(t / "db.json", "{}")], 1, "unsupported file type .json"),
    (
        "db-entry-too-long-txt",
        lambda h, t: ["build-index", "--db", w(t / "l.txt", f"a\n{LONG}\n")],
        1,
        "limit of 20,000",
    ),
    (
        "db-entry-too-long-csv",
        lambda h, t: ["build-index", "--db", w(t / "l.csv", f"text\n{LONG}\n")],
        1,
        "row 1, column 'text', is 20,001 characters long",
    ),
    # build-index: the encoder and the calibration file
    ("build-encoder-missing", lambda h, t: ["build-index", "--encoder", str(t / "no")], 1, "no such folder"),
    (
        "build-encoder-config-foo",
        lambda h, t: ["build-index", "-q", "--encoder", broken_encoder(FOO)(h, t)],
        1,
        "does not load (ValueError: Unrecognized model",
    ),
    (
        "build-encoder-config-not-json",
        lambda h, t: ["build-index", "--encoder", broken_encoder("{{")(h, t)],
        1,
        "config.json is not readable JSON",
    ),
    (
        "build-encoder-modules-not-json",
        lambda h, t: ["build-index", "--encoder", broken_encoder("[", "modules.json")(h, t)],
        1,
        "modules.json is not readable JSON",
    ),
    (
        "build-encoder-weights-damaged",
        lambda h, t: ["build-index", "-q", "--encoder", broken_encoder(b"\x00" * 64, "model.safetensors")(h, t)],
        1,
        "does not load",
    ),
    (
        "build-calibrate-and-no-calibrate",
        lambda h, t: ["build-index", "--calibrate", "x.csv", "--no-calibrate"],
        2,
        "--calibrate and --no-calibrate",
    ),
    ("build-calibrate-missing", lambda h, t: ["build-index", "--calibrate", str(t / "no.csv")], 1, "not found"),
    (
        "build-calibrate-unknown-entry",
        lambda h, t: ["build-index", "--calibrate", w(t / "c.csv", "question,kind,concept_id\nq,in_kb,nope\n")],
        1,
        "which is not in the concept DB",
    ),
    (
        "build-calibrate-bad-kind",
        lambda h, t: ["build-index", "--calibrate", w(t / "c.csv", "question,kind,concept_id\nq,maybe,\n")],
        1,
        "column 'kind' is 'maybe'",
    ),
    ("home-is-a-file", lambda h, t: ["--home", w(t / "f", "x"), "search", "x"], 2, "not a folder"),
    # ask and chat
    ("ask-nothing", lambda h, t: ["ask"], 2, "give a question or --file FILE"),
    ("ask-question-and-file", lambda h, t: ["ask", "x", "--file", w(t / "q.txt", "x\n")], 2, "not both"),
    ("ask-blank", lambda h, t: ["ask", " "], 2, "the question is empty"),
    ("ask-not-utf8", lambda h, t: ["ask", "\udcc3\udc28 what"], 2, "not valid UTF-8 (byte 0xc3 at position 1)"),
    ("ask-temperature-nan", lambda h, t: ["ask", "x", "--temperature", "nan"], 2, "--temperature nan: must be a"),
    ("ask-temperature-inf", lambda h, t: ["ask", "x", "--temperature", "inf"], 2, "--temperature inf"),
    ("ask-temperature-negative", lambda h, t: ["ask", "x", "--temperature", "-1"], 2, "must be 0 (greedy) or more"),
    ("ask-max-new-tokens-0", lambda h, t: ["ask", "x", "--max-new-tokens", "0"], 2, "--max-new-tokens 0"),
    ("ask-top-k-0", lambda h, t: ["ask", "x", "--top-k", "0"], 2, "--top-k 0"),
    ("ask-threshold-nan", lambda h, t: ["ask", "x", "--threshold", "nan"], 2, "--threshold nan"),
    ("ask-file-missing", lambda h, t: ["ask", "--file", str(t / "no.txt")], 1, "questions file"),
    ("ask-file-empty", lambda h, t: ["ask", "--file", w(t / "q.txt", "\n \n")], 1, "is empty"),
    ("ask-file-latin1", lambda h, t: ["ask", "--file", w(t / "q.txt", b"caf\xe9?\n")], 1, "not valid UTF-8"),
    (
        "ask-out-folder-missing",
        lambda h, t: ["ask", "--file", w(t / "q.txt", "x\n"), "--out", str(t / "missing" / "a.jsonl")],
        2,
        "does not exist — create it",
    ),
    ("ask-out-is-a-folder", lambda h, t: ["ask", "--file", w(t / "q.txt", "x\n"), "--out", str(t)], 2, "is a folder"),
    ("ask-adapter-missing", lambda h, t: ["ask", "x", "--adapter", str(t / "no")], 1, "no LoRA adapter there"),
    (
        "ask-adapter-config-not-json",
        then(
            lambda h, t: w(t / "ad" / "adapter_config.json", "{"),
            "ask",
            "x",
            "--adapter",
            "{t}/ad",
            "--base-llm",
            "{h}/lm",
        ),
        1,
        "adapter_config.json is not readable JSON",
    ),
    ("ask-base-llm-missing", lambda h, t: ["ask", "x", "--base-llm", str(t / "no")], 1, "no such folder"),
    (
        "ask-base-llm-config-foo",
        lambda h, t: ["ask", "x", "--base-llm", broken_lm(FOO)(h, t)],
        1,
        "broken-lm does not load (ValueError",
    ),
    (
        "ask-base-llm-config-not-json",
        lambda h, t: ["ask", "x", "--base-llm", broken_lm("nope")(h, t)],
        1,
        "config.json is not readable JSON",
    ),
    ("chat-temperature-nan", lambda h, t: ["chat", "--temperature", "nan"], 2, "--temperature nan"),
    ("chat-top-k-0", lambda h, t: ["chat", "--top-k", "0"], 2, "--top-k 0"),
    # train-sbert
    ("sbert-lr-nan", lambda h, t: ["train-sbert", "--lr", "nan"], 2, "--lr nan: must be a finite number"),
    ("sbert-lr-inf", lambda h, t: ["train-sbert", "--lr", "inf"], 2, "--lr inf: must be a finite number"),
    ("sbert-lr-0", lambda h, t: ["train-sbert", "--lr", "0"], 2, "--lr 0.0: must be positive"),
    ("sbert-ranking-weight-nan", lambda h, t: ["train-sbert", "--ranking-weight", "nan"], 2, "--ranking-weight nan"),
    ("sbert-ranking-weight-negative", lambda h, t: ["train-sbert", "--ranking-weight", "-1"], 2, "must be 0 or more"),
    ("sbert-epochs-0", lambda h, t: ["train-sbert", "--epochs", "0"], 2, "--epochs 0"),
    ("sbert-batch-size-1", lambda h, t: ["train-sbert", "--batch-size", "1"], 2, "--batch-size 1: must be at least 2"),
    ("sbert-loss-unknown", lambda h, t: ["train-sbert", "--loss", "triplet"], 2, "--loss triplet: choose one of"),
    ("sbert-freeze-negative", lambda h, t: ["train-sbert", "--freeze-layers", "-1"], 2, "--freeze-layers -1"),
    ("sbert-data-default-missing", lambda h, t: ["train-sbert"], 1, "data/sbert_train.csv not found"),
    (
        "sbert-data-question-twice",
        lambda h, t: ["train-sbert", "--data", w(t / "p.csv", "user_question," + PAIRS_HEAD + "a,b,c,1\n")],
        1,
        "columns 1 and 2 are both named 'user_question'",
    ),
    (
        "sbert-data-score-out-of-range",
        lambda h, t: ["train-sbert", "--data", w(t / "p.csv", PAIRS_HEAD + "q,e,1.5\n")],
        1,
        "outside [-1, 1]",
    ),
    (
        "sbert-data-score-text",
        lambda h, t: ["train-sbert", "--data", w(t / "p.csv", PAIRS_HEAD + "q,e,hi\n")],
        1,
        "not a number",
    ),
    (
        "sbert-data-no-train-rows",
        lambda h, t: ["train-sbert", "--data", w(t / "p.csv", "data_type," + PAIRS_HEAD + "dev,q,e,1\n")],
        1,
        "no rows with data_type 'train'",
    ),
    (
        "sbert-resume-without-checkpoint",
        lambda h, t: [
            "train-sbert",
            "--data",
            pairs(t),
            "--base",
            str(h / "models" / "sbert"),
            "--out",
            str(t / "o"),
            "--resume",
        ],
        2,
        "--resume: no checkpoint in",
    ),
    (
        "sbert-base-is-out",
        lambda h, t: ["train-sbert", "--data", pairs(t), "--base", str(h / "models" / "sbert")],
        2,
        "is the output folder",
    ),
    (
        "sbert-base-config-foo",
        lambda h, t: ["train-sbert", "--data", pairs(t), "--base", broken_encoder(FOO)(h, t), "--out", str(t / "o")],
        1,
        "does not load",
    ),
    (
        "sbert-valid-missing",
        lambda h, t: ["train-sbert", "--data", pairs(t), "--valid", str(t / "v.csv")],
        1,
        "not found",
    ),
    # train-llm
    ("llm-lr-nan", lambda h, t: ["train-llm", "--lr", "nan"], 2, "--lr nan: must be a finite number"),
    ("llm-lora-dropout-nan", lambda h, t: ["train-llm", "--lora-dropout", "nan"], 2, "--lora-dropout nan"),
    ("llm-lora-dropout-1", lambda h, t: ["train-llm", "--lora-dropout", "1"], 2, "must lie in [0, 1)"),
    ("llm-lora-r-0", lambda h, t: ["train-llm", "--lora-r", "0"], 2, "--lora-r 0: must be at least 1"),
    ("llm-lora-alpha-0", lambda h, t: ["train-llm", "--lora-alpha", "0"], 2, "--lora-alpha 0"),
    ("llm-max-length-0", lambda h, t: ["train-llm", "--max-length", "0"], 2, "--max-length 0"),
    ("llm-template-unknown", lambda h, t: ["train-llm", "--template", "jinja"], 2, "--template jinja: choose one"),
    ("llm-data-default-missing", lambda h, t: ["train-llm"], 1, "data/sft_train.csv not found"),
    (
        "llm-data-answer-twice",
        lambda h, t: ["train-llm", "--data", w(t / "s.csv", SFT_HEAD.strip() + ",output_message\nq,e,a,b\n")],
        1,
        "columns 3 and 4 are both named 'output_message'",
    ),
    (
        "llm-data-empty-answer",
        lambda h, t: ["train-llm", "--data", w(t / "s.csv", SFT_HEAD + "q,e, \n")],
        1,
        "is empty",
    ),
    (
        "llm-base-llm-config-foo",
        lambda h, t: ["train-llm", "--data", sft(t), "--base-llm", broken_lm(FOO)(h, t), "--out", str(t / "o")],
        1,
        "does not load",
    ),
    # evaluate-retrieval, evaluate-answers, evaluate-trust
    ("eval-pairs-missing", lambda h, t: ["evaluate-retrieval", "--pairs", str(t / "no.csv")], 1, "not found"),
    (
        "eval-pairs-score-twice",
        lambda h, t: [
            "evaluate-retrieval",
            "--pairs",
            w(t / "p.csv", PAIRS_HEAD.strip() + ",similarity_score\nq,e,1,1\n"),
        ],
        1,
        "both named 'similarity_score'",
    ),
    (
        "eval-model-config-foo",
        lambda h, t: ["evaluate-retrieval", "--pairs", pairs(t), "--model", broken_encoder(FOO, base=True)(h, t)],
        1,
        "does not load",
    ),
    (
        "eval-save-threshold-untrained",
        lambda h, t: ["evaluate-retrieval", "--pairs", pairs(t), "--save-threshold"],
        2,
        "has no encoder manifest",
    ),
    ("answers-data-default-missing", lambda h, t: ["evaluate-answers"], 1, "data/sft_dev.csv not found"),
    (
        "answers-data-question-twice",
        lambda h, t: ["evaluate-answers", "--data", w(t / "s.csv", "user_question," + SFT_HEAD + "q,q,e,a\n")],
        1,
        "both named 'user_question'",
    ),
    (
        "trust-same-file-twice",
        lambda h, t: ["evaluate-trust", "--questions", w(t / "q.csv", "x"), "--calibrate", str(t / "q.csv")],
        2,
        "name the same file",
    ),
]


def test_enough_cases() -> None:
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("setup", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(home: Path, tmp_path: Path, setup: Setup, code: int, message: str) -> None:
    scratch = tmp_path / "inputs"
    scratch.mkdir()
    args = setup(home, scratch)
    if args[0] != "--home":
        args = ["--home", str(home), *args]
    before = snapshot(tmp_path)
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    check_one_line(result.exit_code, result.stderr, result.output, code, message)
    assert snapshot(tmp_path) == before  # the index, the models and the inputs, byte for byte


def test_read_only_index_folder(home: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    with read_only(home / "index"):
        result = runner.invoke(app, ["--home", str(home), "build-index", "-q"])
    check_one_line(result.exit_code, result.stderr, result.output, 1, "cannot write into the index folder")
    assert snapshot(tmp_path) == before


# A few through a real process: raw bytes in argv, and the console-script entry point's own exit path.
PROCESS_CASES: list[tuple[str, Callable[[Path, Path], list[str | bytes]], int, str]] = [
    ("argv-not-utf8", lambda h, t: ["search", b"what is \xff\xfe recall"], 2, "not valid UTF-8 (byte 0xff"),
    ("ask-argv-not-utf8", lambda h, t: ["ask", b"\xe9t\xe9 ?"], 2, "not valid UTF-8 (byte 0xe9 at position 1)"),
    (
        "current-random-bytes",
        then(lambda h, t: (h / "index" / "CURRENT").write_bytes(os.urandom(64) + b"\xff"), "search", "x"),
        1,
        "is damaged (CURRENT ",
    ),
    (
        "ask-out-folder-missing",
        lambda h, t: ["ask", "--file", w(t / "q.txt", "x\n"), "--out", "/missing/dir/a.jsonl"],
        2,
        "--out /missing/dir/a.jsonl: the folder /missing/dir does not exist",
    ),
    ("sbert-lr-nan", lambda h, t: ["train-sbert", "--lr", "nan"], 2, "--lr nan: must be a finite number"),
]


@pytest.mark.parametrize(
    ("setup", "code", "message"), [c[1:] for c in PROCESS_CASES], ids=[c[0] for c in PROCESS_CASES]
)
def test_bad_input_in_a_process(
    home: Path, tmp_path: Path, setup: Callable[[Path, Path], list[str | bytes]], code: int, message: str
) -> None:
    scratch = tmp_path / "inputs"
    scratch.mkdir()
    args = setup(home, scratch)
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "ohlora_rag", "--home", str(home), *args],
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"},
        timeout=300,
    )
    stderr = proc.stderr.decode("utf-8", "replace")
    check_one_line(proc.returncode, stderr, stderr + proc.stdout.decode("utf-8", "replace"), code, message)
    assert snapshot(tmp_path) == before
