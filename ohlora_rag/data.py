"""Read and validate concept DBs (.txt/.csv/.parquet) and the training tables built on them.

Every problem ends in a DataFormatError whose one line names the file, the row and the column, and the fix.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MAX_ENTRY_CHARS
from .errors import DataFormatError

SUPPORTED = (".txt", ".csv", ".parquet")


def rows_hash(rows: Iterable[Sequence[str]]) -> str:
    """sha256 (first 16 hex digits) of rows of strings, fields joined by NUL, rows ended by newline."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(("\0".join(row) + "\n").encode())
    return digest.hexdigest()[:16]


@dataclass
class ConceptDB:
    """A validated concept DB: one entry per row, `id` and `text` always present, other columns as metadata."""

    path: Path
    ids: list[str]
    texts: list[str]
    metadata: dict[str, list[Any]]  # column -> values, same length as texts (title, source, anything else)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def content_hash(self) -> str:
        """What the index was built from: the ids and texts in order."""
        return rows_hash(zip(self.ids, self.texts))

    def to_arrow(self) -> Any:
        """The entries as a pyarrow table: position, id, text, then the metadata columns."""
        import pyarrow as pa

        columns: dict[str, Any] = {
            "position": pa.array(range(len(self)), pa.int64()),
            "id": self.ids,
            "text": self.texts,
        }
        for name, values in self.metadata.items():
            columns[name] = values
        return pa.table(columns)


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[exc.start]:02x}) — re-save the file as UTF-8"
        ) from None


def _missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def _check_header(path: Path, names: Sequence[str]) -> None:
    """Refuse a column name that appears twice: {column: values} would keep one of them silently."""
    first: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if name in first:
            raise DataFormatError(
                f"{path}: columns {first[name]} and {number} are both named {name!r} — rename or delete one of them"
            )
        first[name] = number


def read_table(path: Path, what: str) -> dict[str, list[Any]]:
    """Read a .csv or .parquet file into {column: values}; every failure is a one-line DataFormatError."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{what} {path} not found — check the path")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            _check_header(path, pq.read_schema(path).names)
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        return {name: table.column(i).to_pylist() for i, name in enumerate(table.column_names)}
    if suffix == ".csv":
        import csv
        import io

        text = _decode(path)
        if not text.strip():
            raise DataFormatError(f"{path} is empty — it needs a header row and at least one data row")
        try:
            rows = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise DataFormatError(f"{path}: not valid CSV ({exc})") from None
        header = [h.strip() for h in rows[0]]
        _check_header(path, header)
        body = [r for r in rows[1:] if r]
        columns: dict[str, list[Any]] = {h: [] for h in header}
        for number, row in enumerate(body, start=1):
            if len(row) != len(header):
                raise DataFormatError(
                    f"{path}: row {number} has {len(row)} fields, the header has {len(header)} — quote fields that contain commas"
                )
            for h, value in zip(header, row):
                columns[h].append(value)
        return columns
    raise DataFormatError(f"{path}: unsupported file type {suffix or '(none)'} — use one of {', '.join(SUPPORTED)}")


def load_concepts(path: str | Path) -> ConceptDB:
    """Read and validate a concept DB.

    Args:
        path: `.txt` (one entry per line), `.csv` or `.parquet` (column `text`; optional `id`, `title`, `source`;
            other columns are kept as metadata).

    Returns:
        The validated DB.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(
            f"concept DB {path} not found — pass --db FILE or run from the project folder (or set --home)"
        )
    if path.suffix.lower() == ".txt":
        text = _decode(path)
        # Lines end at \n or \r\n only: str.splitlines would also cut at form feeds, U+2028 and other separators
        # that can sit inside an entry.
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            raise DataFormatError(f"{path} is empty — write one concept entry per line")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise DataFormatError(f"{path}: line {number} is empty — delete it or write an entry there")
        texts = [line.strip() for line in lines]
        _check_lengths(path, texts, "line")
        ids = [str(i) for i in range(len(texts))]
        _check_duplicates(path, texts, "line")
        return ConceptDB(path, ids, texts, {})

    columns = read_table(path, "concept DB")
    if "text" not in columns:
        found = ", ".join(columns) or "none"
        raise DataFormatError(
            f"{path}: no 'text' column (columns found: {found}) — name the column that holds the entries 'text'"
        )
    values = columns.pop("text")
    if not values:
        raise DataFormatError(f"{path} has no data rows — add at least one entry")
    for number, value in enumerate(values, start=1):
        if _missing(value):
            raise DataFormatError(f"{path}: row {number}, column 'text' is empty — fill it in or delete the row")
        if not isinstance(value, str):
            raise DataFormatError(
                f"{path}: row {number}, column 'text' is {type(value).__name__}, not text — store the entries as strings"
            )
    texts = [v.strip() for v in values]
    _check_lengths(path, texts, "row")
    _check_duplicates(path, texts, "row")
    if "id" in columns:
        raw_ids = columns.pop("id")
        for number, value in enumerate(raw_ids, start=1):
            if _missing(value):
                raise DataFormatError(
                    f"{path}: row {number}, column 'id' is empty — give every row an id or drop the column"
                )
        ids = [str(v).strip() for v in raw_ids]
        _check_duplicates(path, ids, "row", column="id")
    else:
        ids = [str(i) for i in range(len(texts))]
    metadata = {
        name: [None if _missing(v) else v for v in vals] for name, vals in columns.items() if name != "position"
    }
    return ConceptDB(path, ids, texts, metadata)


def _check_lengths(path: Path, texts: Sequence[str], unit: str) -> None:
    for number, text in enumerate(texts, start=1):
        if len(text) > MAX_ENTRY_CHARS:
            col = "" if unit == "line" else ", column 'text',"
            raise DataFormatError(
                f"{path}: {unit} {number}{col} is {len(text):,} characters long, over the limit of "
                f"{MAX_ENTRY_CHARS:,} — split it into several entries"
            )


def _check_duplicates(path: Path, values: Sequence[str], unit: str, column: str = "text") -> None:
    first: dict[str, int] = {}
    for number, value in enumerate(values, start=1):
        if value in first:
            where = f"{unit}s {first[value]} and {number}"
            what = "the same entry" if column == "text" else f"the same {column} {value!r}"
            col = "" if unit == "line" else f", column '{column}',"
            raise DataFormatError(f"{path}: {where}{col} hold {what} — delete or change one of them")
        first[value] = number


PAIR_COLUMNS = ("user_question", "rag_retrieved_data", "similarity_score")


@dataclass
class Pairs:
    """(question, entry, similarity score) rows for S-BERT training and evaluation."""

    path: Path
    questions: list[str]
    entries: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def content_hash(self) -> str:
        return rows_hash((q, e, repr(s)) for q, e, s in zip(self.questions, self.entries, self.scores))

    def subset(self, rows: Sequence[int]) -> Pairs:
        return Pairs(
            self.path,
            [self.questions[i] for i in rows],
            [self.entries[i] for i in rows],
            [self.scores[i] for i in rows],
        )


def _require_columns(path: Path, columns: dict[str, list[Any]], needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        found = ", ".join(columns) or "none"
        raise DataFormatError(
            f"{path}: missing column {', '.join(repr(m) for m in missing)} (columns found: {found}) — {what} needs columns {', '.join(needed)}"
        )


def _selected_rows(path: Path, columns: dict[str, list[Any]], split: str | None) -> list[int]:
    """Rows to use: all, or those whose `data_type` equals `split` when that column exists."""
    n = len(next(iter(columns.values()))) if columns else 0
    if split is None or "data_type" not in columns:
        return list(range(n))
    rows = [i for i, v in enumerate(columns["data_type"]) if str(v).strip() == split]
    if not rows:
        kinds = sorted({str(v) for v in columns["data_type"]})
        raise DataFormatError(
            f"{path}: no rows with data_type '{split}' (found: {', '.join(kinds)}) — mark the rows to use as '{split}'"
        )
    return rows


def load_pairs(path: str | Path, split: str | None = "train") -> Pairs:
    """Read S-BERT pairs: columns `user_question, rag_retrieved_data, similarity_score` (the original project's).

    Args:
        path: .csv or .parquet.
        split: when the file has a `data_type` column, keep only rows with this value (None: keep all).
    """
    path = Path(path)
    columns = read_table(path, "pairs file")
    _require_columns(path, columns, PAIR_COLUMNS, "an S-BERT pairs file")
    rows = _selected_rows(path, columns, split)
    if not rows:
        raise DataFormatError(f"{path} has no data rows — add (question, entry, score) rows")
    questions, entries, scores = [], [], []
    for i in rows:
        number = i + 1
        q, e, s = (columns[c][i] for c in PAIR_COLUMNS)
        for name, value in (("user_question", q), ("rag_retrieved_data", e)):
            if _missing(value):
                raise DataFormatError(f"{path}: row {number}, column '{name}' is empty — fill it in or delete the row")
        try:
            score = float(s)
        except (TypeError, ValueError):
            raise DataFormatError(
                f"{path}: row {number}, column 'similarity_score' is {s!r}, not a number — use a value in [-1, 1]"
            ) from None
        if not -1.0 <= score <= 1.0:
            raise DataFormatError(
                f"{path}: row {number}, column 'similarity_score' is {score}, outside [-1, 1] — scores are cosine targets"
            )
        questions.append(str(q).strip())
        entries.append(str(e).strip())
        scores.append(score)
    return Pairs(path, questions, entries, scores)


SFT_COLUMNS = ("user_question", "rag_retrieved_data", "output_message")


@dataclass
class SftRows:
    """(retrieved entry or None, question, answer) rows for LoRA SFT; None means 'no matching information'."""

    path: Path
    questions: list[str]
    entries: list[str | None]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def content_hash(self) -> str:
        return rows_hash((q, e or "", a) for q, e, a in zip(self.questions, self.entries, self.answers))

    @classmethod
    def concat(cls, parts: Sequence[SftRows]) -> SftRows:
        """Several files' rows as one table (its path names them all, joined by '+')."""
        if len(parts) == 1:
            return parts[0]
        return cls(
            Path("+".join(str(p.path) for p in parts)),
            [q for p in parts for q in p.questions],
            [e for p in parts for e in p.entries],
            [a for p in parts for a in p.answers],
        )


def load_sft(path: str | Path, split: str | None = "train") -> SftRows:
    """Read SFT rows: columns `user_question, rag_retrieved_data, output_message` (the original project's).

    An empty `rag_retrieved_data`, or a no-information marker (the original's `알맞은 정보를 찾을 수 없음`), marks a row
    whose answer must say that nothing matched.

    Args:
        path: .csv or .parquet.
        split: when the file has a `data_type` column, keep only rows with this value (None: keep all).
    """
    from .prompt import NO_INFO_MARKERS

    path = Path(path)
    columns = read_table(path, "SFT file")
    _require_columns(path, columns, SFT_COLUMNS, "an SFT file")
    rows = _selected_rows(path, columns, split)
    if not rows:
        raise DataFormatError(f"{path} has no data rows — add (question, entry, answer) rows")
    questions: list[str] = []
    entries: list[str | None] = []
    answers: list[str] = []
    for i in rows:
        number = i + 1
        q, e, a = (columns[c][i] for c in SFT_COLUMNS)
        for name, value in (("user_question", q), ("output_message", a)):
            if _missing(value):
                raise DataFormatError(f"{path}: row {number}, column '{name}' is empty — fill it in or delete the row")
        entry = None if _missing(e) or str(e).strip() in NO_INFO_MARKERS else str(e).strip()
        questions.append(str(q).strip())
        entries.append(entry)
        answers.append(str(a).strip())
    return SftRows(path, questions, entries, answers)


def load_sft_files(paths: Path | Sequence[Path], split: str | None = "train") -> SftRows:
    """`load_sft` over one file or several, concatenated in order."""
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not files:
        raise DataFormatError("no SFT file given — pass --data FILE")
    return SftRows.concat([load_sft(f, split) for f in files])


def load_questions(path: str | Path) -> list[str]:
    """A batch file for `ask --file`: one question per line, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"questions file {path} not found — check the path")
    lines = [line.strip() for line in _decode(path).splitlines() if line.strip()]
    if not lines:
        raise DataFormatError(f"{path} is empty — write one question per line")
    return lines


LABELLED_COLUMNS = ("question", "kind", "concept_id")
KINDS = ("in_kb", "near_miss", "unrelated")


@dataclass
class LabelledQuestions:
    """Questions labelled with the entry that answers them, or none, for calibrating and measuring the decision.

    `gold` holds entry ids (a `question, kind, concept_id` file) or entry texts (an S-BERT pairs file, where a
    question's 1.0 entry is its answer); `gold_by` says which.
    """

    path: Path
    questions: list[str]
    kinds: list[str]  # "in_kb" | "near_miss" | "unrelated"
    gold: list[str | None]
    gold_by: str  # "id" | "text"

    def __len__(self) -> int:
        return len(self.questions)

    def positions(self, db: ConceptDB) -> list[int | None]:
        """Each question's right entry as a position in `db` (None for questions without one)."""
        keys = db.ids if self.gold_by == "id" else db.texts
        where = {k: i for i, k in enumerate(keys)}
        out: list[int | None] = []
        for number, g in enumerate(self.gold, start=1):
            if g is not None and g not in where:
                col = "concept_id" if self.gold_by == "id" else "rag_retrieved_data"
                shown = g if len(g) <= 60 else g[:57] + "..."
                raise DataFormatError(
                    f"{self.path}: row {number}, column '{col}' names {shown!r}, which is not in the concept DB "
                    f"{db.path} — label questions against the DB being indexed"
                )
            out.append(where[g] if g is not None else None)
        return out


def load_labelled_questions(path: str | Path) -> LabelledQuestions:
    """Read a labelled question file: `question, kind, concept_id` (kind: in_kb, near_miss or unrelated; the
    concept_id of an in_kb row is the id of its entry), or an S-BERT pairs file (every row is used)."""
    path = Path(path)
    columns = read_table(path, "labelled questions file")
    if all(c in columns for c in PAIR_COLUMNS) and "question" not in columns:
        pairs = load_pairs(path, split=None)
        gold: dict[str, str | None] = {}
        for q, e, s in zip(pairs.questions, pairs.entries, pairs.scores):
            if s >= 1.0 and gold.get(q) is None:
                gold[q] = e
            else:
                gold.setdefault(q, None)
        kinds = ["in_kb" if g is not None else "near_miss" for g in gold.values()]
        return LabelledQuestions(path, list(gold), kinds, list(gold.values()), "text")
    _require_columns(path, columns, LABELLED_COLUMNS, "a labelled questions file")
    questions: list[str] = []
    kinds_out: list[str] = []
    golds: list[str | None] = []
    for i, (q, k, c) in enumerate(zip(*(columns[name] for name in LABELLED_COLUMNS)), start=1):
        if _missing(q):
            raise DataFormatError(f"{path}: row {i}, column 'question' is empty — fill it in or delete the row")
        kind = str(k).strip()
        if kind not in KINDS:
            raise DataFormatError(f"{path}: row {i}, column 'kind' is {k!r} — use one of {', '.join(KINDS)}")
        if kind == "in_kb" and _missing(c):
            raise DataFormatError(f"{path}: row {i}, column 'concept_id' is empty — an in_kb row names its entry's id")
        if kind != "in_kb" and not _missing(c):
            raise DataFormatError(
                f"{path}: row {i}, column 'concept_id' is {c!r} on a {kind} row — only in_kb rows name an entry"
            )
        questions.append(str(q).strip())
        kinds_out.append(kind)
        golds.append(str(c).strip() if kind == "in_kb" else None)
    if not questions:
        raise DataFormatError(f"{path} has no data rows — add labelled questions")
    return LabelledQuestions(path, questions, kinds_out, golds, "id")


CONVERSATION_KINDS = ("first", "follow_up", "switch", "offtopic_switch")


@dataclass
class ConversationTurn:
    question: str
    concept_id: str | None  # the entry that answers it (a follow-up: the conversation's topic), None: no entry
    kind: str  # one of CONVERSATION_KINDS


def load_conversations(path: str | Path) -> list[list[ConversationTurn]]:
    """Multi-turn test conversations: one JSON object per line, `{"id": ..., "turns": [{"q", "concept_id",
    "kind"}, ...]}` (see data/conversations_holdout4.jsonl)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"conversations file {path} not found — check the path")
    out = []
    for number, line in enumerate(_decode(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            turns = [
                ConversationTurn(str(t["q"]).strip(), t.get("concept_id"), str(t["kind"])) for t in record["turns"]
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(
                f"{path} line {number}: not a conversation ({exc}) — write "
                '{"turns": [{"q": "...", "concept_id": "id or null", "kind": "first"}, ...]}'
            ) from None
        for turn in turns:
            if not turn.question:
                raise DataFormatError(f"{path} line {number}: a turn with an empty question — write the question")
            if turn.kind not in CONVERSATION_KINDS:
                raise DataFormatError(
                    f"{path} line {number}: kind {turn.kind!r} — use one of {', '.join(CONVERSATION_KINDS)}"
                )
        if turns:
            out.append(turns)
    if not out:
        raise DataFormatError(f"{path} holds no conversations")
    return out
