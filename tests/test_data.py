"""Concept DB loading: the three formats, metadata, and a one-line error per bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ohlora_rag.data import load_concepts
from ohlora_rag.errors import DataFormatError


def test_txt_one_entry_per_line(tmp_path: Path) -> None:
    path = tmp_path / "db.txt"
    path.write_text("alpha : first\nbeta : second\n\n", encoding="utf-8")
    db = load_concepts(path)
    assert db.texts == ["alpha : first", "beta : second"]
    assert db.ids == ["0", "1"]


def test_csv_keeps_ids_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "db.csv"
    path.write_text('id,text,title,level\nx1,"a, with comma",A,easy\nx2,b text,B,\n', encoding="utf-8")
    db = load_concepts(path)
    assert db.ids == ["x1", "x2"]
    assert db.texts == ["a, with comma", "b text"]
    assert db.metadata == {"title": ["A", "B"], "level": ["easy", None]}
    assert db.to_arrow().column_names == ["position", "id", "text", "title", "level"]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "db.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "source": ["s", "t"]}), path)
    db = load_concepts(path)
    assert db.texts == ["one", "two"] and db.ids == ["0", "1"] and db.metadata == {"source": ["s", "t"]}


def test_content_hash_follows_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\ntwo\n", encoding="utf-8")
    b.write_text("one\ntwo!\n", encoding="utf-8")
    assert load_concepts(a).content_hash != load_concepts(b).content_hash
    assert load_concepts(a).content_hash == load_concepts(a).content_hash


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "empty.txt is empty — write one concept entry per line"),
        ("empty.csv", b"", "empty.csv is empty — it needs a header row and at least one data row"),
        ("header.csv", b"id,text\n", "header.csv has no data rows — add at least one entry"),
        (
            "notext.csv",
            b"id,body\n1,x\n",
            "notext.csv: no 'text' column (columns found: id, body) — name the column that holds the entries 'text'",
        ),
        (
            "blank.csv",
            b"id,text\n1,a\n2,  \n",
            "blank.csv: row 2, column 'text' is empty — fill it in or delete the row",
        ),
        ("blankline.txt", b"a\n\nb\n", "blankline.txt: line 2 is empty — delete it or write an entry there"),
        ("dup.txt", b"a\nb\na\n", "dup.txt: lines 1 and 3 hold the same entry — delete or change one of them"),
        (
            "dup.csv",
            b"text\na\nb\nb\n",
            "dup.csv: rows 2 and 3, column 'text', hold the same entry — delete or change one of them",
        ),
        (
            "dupid.csv",
            b"id,text\nk,a\nk,b\n",
            "dupid.csv: rows 1 and 2, column 'id', hold the same id 'k' — delete or change one of them",
        ),
        (
            "latin1.txt",
            b"ok\ncaf\xe9\n",
            "latin1.txt: line 2 is not valid UTF-8 (byte 0xe9) — re-save the file as UTF-8",
        ),
        (
            "latin1.csv",
            b"text\nok\ncaf\xe9\n",
            "latin1.csv: line 3 is not valid UTF-8 (byte 0xe9) — re-save the file as UTF-8",
        ),
        (
            "ragged.csv",
            b"id,text\n1,a,extra\n",
            "ragged.csv: row 1 has 3 fields, the header has 2 — quote fields that contain commas",
        ),
        ("db.json", b"{}", "db.json: unsupported file type .json — use one of .txt, .csv, .parquet"),
    ],
)
def test_bad_input_names_file_row_and_fix(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path}/{message}")):
        load_concepts(path)


def test_nan_row_in_parquet(tmp_path: Path) -> None:
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), path)
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: row 2, column 'text' is empty")):
        load_concepts(path)


def test_non_string_text_in_parquet(tmp_path: Path) -> None:
    path = tmp_path / "num.parquet"
    pq.write_table(pa.table({"text": [1.5, 2.5]}), path)
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: row 1, column 'text' is float, not text")):
        load_concepts(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=re.escape(f"concept DB {tmp_path / 'nope.csv'} not found")):
        load_concepts(tmp_path / "nope.csv")


def test_project_knowledge_base_is_valid() -> None:
    db = load_concepts(Path(__file__).resolve().parents[1] / "data" / "concepts.csv")
    assert len(db) >= 150
    assert all(" : " in t and "| key idea:" in t for t in db.texts)
    assert len(set(db.metadata["topic"])) == 8
