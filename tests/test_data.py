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


def test_txt_lines_end_only_at_newlines(tmp_path: Path) -> None:
    """Form feeds, U+2028 and lone carriage returns sit inside an entry; str.splitlines would cut there."""
    path = _write(tmp_path, "db.txt", "a\x0cb : one\r\nc\u2028d : two\ne\x1cf\u0085g : three\n".encode())
    assert load_concepts(path).texts == ["a\x0cb : one", "c\u2028d : two", "e\x1cf\u0085g : three"]
    crlf = _write(tmp_path, "crlf.txt", b"alpha\r\nbeta\r\n\r\n")
    assert load_concepts(crlf).texts == ["alpha", "beta"]


def test_entry_length_is_capped(tmp_path: Path) -> None:
    from ohlora_rag.config import MAX_ENTRY_CHARS

    long = "x" * (MAX_ENTRY_CHARS + 1)
    fits = _write(tmp_path, "fits.txt", ("y" * MAX_ENTRY_CHARS + "\nshort\n").encode())
    assert len(load_concepts(fits).texts[0]) == MAX_ENTRY_CHARS
    txt = _write(tmp_path, "long.txt", f"short\n{long}\n".encode())
    with pytest.raises(
        DataFormatError,
        match=re.escape(f"{txt}: line 2 is 20,001 characters long, over the limit of 20,000 — split it"),
    ):
        load_concepts(txt)
    csv_path = _write(tmp_path, "long.csv", f"text\nshort\n{long}\n".encode())
    with pytest.raises(DataFormatError, match=re.escape(f"{csv_path}: row 2, column 'text', is 20,001 characters")):
        load_concepts(csv_path)


@pytest.mark.parametrize(
    ("loader", "header"),
    [
        ("load_concepts", "id,text,text"),
        ("load_concepts", "text, id,id "),
        ("load_pairs", "user_question,user_question,rag_retrieved_data,similarity_score"),
        ("load_sft", "user_question,rag_retrieved_data,output_message,user_question"),
        ("load_labelled_questions", "question,kind,concept_id,kind"),
    ],
)
def test_repeated_column_names_are_refused(tmp_path: Path, loader: str, header: str) -> None:
    import ohlora_rag.data as data

    names = [h.strip() for h in header.split(",")]
    repeated = next(n for i, n in enumerate(names) if n in names[:i])
    first, second = names.index(repeated) + 1, len(names) - names[::-1].index(repeated)
    path = _write(tmp_path, "dup.csv", (header + "\n" + ",".join(f"v{i}" for i in range(len(names))) + "\n").encode())
    expected = f"{path}: columns {first} and {second} are both named '{repeated}' — rename or delete one of them"
    with pytest.raises(DataFormatError, match=re.escape(expected)):
        getattr(data, loader)(path)
    parquet = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["v"]) for _ in names], names=names), parquet)
    with pytest.raises(DataFormatError, match=re.escape(expected.replace(str(path), str(parquet)))):
        getattr(data, loader)(parquet)
