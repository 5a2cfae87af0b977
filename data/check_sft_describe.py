"""Check data/sft_describe_train.csv (or the file named): SFT rows whose question describes a concept without naming
it and whose answer names it first.

One row per concept of data/concepts.csv; the entry is the concept's text verbatim; the question does NOT name the
concept (by the grounding metric's naming rule, `ohlora_rag.answers.names_concept`); the answer names it in its first
sentence, is grounded (`ohlora_rag.answers.is_grounded`), is no decline and has 25-80 words. Prints every problem and
exits 1 if there is one. Run: `python data/check_sft_describe.py [FILE]`.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
COLUMNS = ["data_type", "concept_id", "user_question", "rag_retrieved_data", "output_message"]


def problems(row: dict[str, str], concepts: dict[str, str]) -> list[str]:
    from ohlora_rag.answers import is_abstention, is_grounded, names_concept

    found = []
    if list(row) != COLUMNS:
        found.append(f"columns {list(row)}, expected {COLUMNS}")
    if row.get("data_type") != "train":
        found.append("data_type must be train")
    entry = concepts.get(row.get("concept_id", ""))
    if entry is None:
        return [*found, f"unknown concept_id {row.get('concept_id')!r}"]
    answer = row["output_message"].strip()
    first = re.split(r"(?<=[.!?])\s", answer, maxsplit=1)[0]
    checks = [
        (row["rag_retrieved_data"] == entry, "rag_retrieved_data is not the concept's text verbatim"),
        (not names_concept(row["user_question"], entry), "the question names the concept (describe it instead)"),
        (names_concept(first, entry), "the answer's first sentence does not name the concept"),
        (is_grounded(answer, entry), "the answer is not grounded"),
        (not is_abstention(answer), "the answer reads as a decline"),
        (25 <= len(answer.split()) <= 80, "the answer should have 25-80 words"),
    ]
    return found + [message for ok, message in checks if not ok]


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "sft_describe_train.csv"
    with open(HERE / "concepts.csv", encoding="utf-8") as fh:
        concepts = {r["id"]: r["text"] for r in csv.DictReader(fh)}
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    bad = 0
    for line, row in enumerate(rows, start=2):
        found = problems(row, concepts)
        if found:
            bad += 1
            print(f"{path}:{line} ({row.get('concept_id')}): " + "; ".join(found))
    missing = sorted(set(concepts) - {r.get("concept_id") for r in rows})
    if missing:
        bad += 1
        print(f"{len(missing)} concepts without a row: {', '.join(missing[:20])}")
    print(f"{len(rows)} rows, {bad} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
