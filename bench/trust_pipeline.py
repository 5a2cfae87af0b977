"""The whole tutor on the trust test set: what a learner ends up with, retrieval decision and LLM together.

Every question of `data/trust_test.csv` goes through `QueryEngine.ask` (the path `ask` takes). In-KB questions
end as: a grounded answer from their own entry; a decline (by the entry decision, or by the LLM given an entry);
or an answer built on a wrong entry. Near-miss and unrelated questions end declined or answered. Also reported:
how often the LLM declined when the decision had let a wrong entry through (its "second line of defence").

Run: `python bench/trust_pipeline.py [--home DIR] [--questions FILE] [--limit N] [--max-new-tokens 80] [--adapter DIR]`
(about 12 minutes for the 290 questions here). Uses the index under the home folder: run `build-index` first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(ROOT))
    parser.add_argument("--questions", type=Path, default=ROOT / "data" / "trust_test.csv")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--adapter", type=Path, help="LoRA adapter folder (default: the home's, else the shipped one)")
    parser.add_argument("--answers", type=Path, help="write each question, outcome and answer to this JSON-lines file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ohlora_rag.answers import copies_markup, is_grounded, repeats_sentence
    from ohlora_rag.config import AskConfig, Paths
    from ohlora_rag.data import load_labelled_questions
    from ohlora_rag.engine import QueryEngine

    paths = Paths.resolve(args.home)
    labelled = load_labelled_questions(args.questions)
    engine = QueryEngine.load(AskConfig(max_new_tokens=args.max_new_tokens, adapter=args.adapter), paths)
    ids = [str(i) for i in engine.retriever.stored.entries.column("id").to_pylist()]
    texts = engine.retriever.stored.entries.column("text").to_pylist()
    n = args.limit or len(labelled)
    tally: Counter[str] = Counter()
    records: list[dict[str, object]] = []
    start = time.perf_counter()
    for q, kind, gold in list(zip(labelled.questions, labelled.kinds, labelled.gold))[:n]:
        answer = engine.ask(q)
        used = answer.used.id if answer.used else None
        if kind == "in_kb":
            if answer.declined:
                outcome = "declined by the decision" if used is None else "declined by the LLM"
            elif used == gold:
                outcome = (
                    "grounded" if is_grounded(answer.answer, texts[ids.index(gold)]) else "right entry, ungrounded"
                )
            else:
                outcome = "answered from a wrong entry"
        else:
            outcome = "declined" if answer.declined else "answered"
            if used is not None:
                tally[f"{kind}: entry let through"] += 1
                tally[f"{kind}: entry let through, LLM declined"] += int(answer.declined)
        if kind == "in_kb" and used not in (None, gold):
            tally["in_kb: wrong entry let through"] += 1
            tally["in_kb: wrong entry let through, LLM declined"] += int(answer.declined)
        tally[f"{kind}: {outcome}"] += 1
        records.append(
            {
                "question": q,
                "kind": kind,
                "gold": gold,
                "used": used,
                "outcome": outcome,
                "declined": answer.declined,
                "answer": answer.answer,
            }
        )
        if not answer.declined:
            tally["answers: copy the entry's markup"] += int(copies_markup(answer.answer))
            tally["answers: say a sentence twice"] += int(repeats_sentence(answer.answer))
    seconds = time.perf_counter() - start
    if args.answers:
        args.answers.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    counts = Counter(labelled.kinds[:n])
    counts["answers"] = sum(not r["declined"] for r in records)  # the markup and repeat shares: of these
    print(f"{args.questions} ({n} questions, {seconds / max(n, 1):.2f} s each), index {engine.retriever.stored.folder}")
    if args.adapter:
        print(f"  adapter {args.adapter}")
    for key in sorted(tally):
        kind = key.split(":")[0]
        print(f"  {key:<52} {tally[key]:>4}  {tally[key] / counts[kind]:.3f} of {kind}")


if __name__ == "__main__":
    main()
