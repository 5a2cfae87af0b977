"""Build data/sft_mismatch_train.csv and data/sft_mismatch_dev.csv: SFT rows whose entry does NOT answer the question,
with an answer that says so (deterministic; needs the built-in encoder, converted on first use).

Retrieval can still hand the LLM a wrong entry; these rows teach it to notice. Three kinds, in the prompt format of
inference (the entry is what retrieval would put there):
- look-alike: a question that names its concept, with a related entry (the `related` column: precision for "what is
  recall?") whose name the question does not use — the near-twin confusions the original project's retriever
  made, kept to questions where the mismatch shows (a related entry can partly answer a question that only
  describes its concept);
- near-miss: a question about an ML topic the notes lack, with the entry the base encoder finds nearest;
- unrelated: an off-topic question with its nearest entry.
The answer declines, names what the note does cover, and points elsewhere.

Training rows come from data/sft_train.csv's questions and data/offtopic_train.csv; held-out rows from
data/trust_test.csv (never trained on). Run: `python data/make_sft_mismatch.py` (about 30 s).
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
SEED = 20261203
# Training rows: unrelated ones only. With 60 look-alike + 60 near-miss + 30 unrelated rows, the rank-8 adapter learnt
# "a question that describes a concept without naming the entry's name -> decline" and declined 77 % of the dev rows
# whose entry DOES answer (data/sft_dev.csv, gold entries; wrong-entry rows declined 0.85): a 135M model cannot tell
# "describes this entry" from "describes a topic next to it". The dev file keeps all three kinds, to measure.
COUNTS = {
    "train": {"look_alike": 0, "near_miss": 0, "unrelated": 30},
    "dev": {"look_alike": 40, "near_miss": 40, "unrelated": 30},
}

ANSWERS = {
    "look_alike": (
        "I'm sorry, the note I have is about {title}, which isn't what you asked, so I won't guess. "
        "I'm happy to explain {title} instead, or a good ML textbook can cover your question.",
        "Hmm, my notes only give me {title} here, and that's a different idea from the one you asked about, so I'd "
        "rather not make something up. Try rephrasing your question, or ask me about {title}.",
        "That isn't quite in my notes: what I found is about {title}, a related but different concept. I don't want to "
        "mix them up, so please check a textbook for this one.",
    ),
    "near_miss": (
        "My notes don't cover that topic, I'm afraid. The closest note I have is about {title}, which is something "
        "different, so I won't guess. A good ML textbook or the original paper would explain it properly.",
        "I'm sorry, that isn't in my notes. I only found a note on {title}, which doesn't answer your question, so I'd "
        "rather not invent an answer. The official documentation or a survey article would be a better guide.",
        "That's a great question, but my notes don't include it: the nearest thing I have is {title}, a different "
        "topic. I don't want to make things up, so please look it up in a trusted ML reference.",
    ),
    "unrelated": (
        "I'm sorry, that's outside my machine-learning notes, so I can't answer it without guessing. A search engine "
        "or a trusted reference would be a better place to look.",
        "My notes only cover machine-learning topics, and nothing in them answers this, so I won't make something up. "
        "You'll find a reliable answer elsewhere.",
        "That isn't something my ML notes cover, I'm afraid, so I'd rather not guess. Feel free to ask me about a "
        "machine-learning concept instead!",
    ),
}


def read(name: str) -> list[dict[str, str]]:
    with (HERE / name).open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def nearest_entries(questions: list[str], texts: list[str]) -> list[int]:
    """Position of each question's nearest entry by the built-in base encoder (what retrieval would return)."""
    from ohlora_rag.config import DEFAULT_ENCODER, Paths
    from ohlora_rag.encoder import Encoder
    from ohlora_rag.models import resolve

    encoder = Encoder(resolve(DEFAULT_ENCODER, "encoder", Paths.resolve(HERE.parent)))
    q = encoder.encode_queries(questions)  # (nq, d)
    e = encoder.encode_passages(texts)  # (ne, d)
    return [int(i) for i in (q @ e.T).argmax(axis=1)]


def main() -> None:
    concepts = read("concepts.csv")
    by_id = {c["id"]: c for c in concepts}
    texts = [c["text"] for c in concepts]
    rng = random.Random(SEED)
    sources = {
        "train": (
            [(r["user_question"], r["concept_id"]) for r in read("sft_train.csv") if r["rag_retrieved_data"]],
            [(r["question"], r["kind"]) for r in read("offtopic_train.csv")],
        ),
        "dev": (
            [(r["question"], r["concept_id"]) for r in read("trust_test.csv") if r["kind"] == "in_kb"],
            [(r["question"], r["kind"]) for r in read("trust_test.csv") if r["kind"] != "in_kb"],
        ),
    }
    for split, (in_kb, off) in sources.items():
        counts = COUNTS[split]
        rows: list[dict[str, str]] = []
        look = []
        for q, cid in in_kb:
            others = [r for r in by_id[cid]["related"].split(";") if r in by_id and not _names(q, by_id[r])]
            if _names(q, by_id[cid]) and others:
                look.append((q, others))
        for q, others in rng.sample(look, counts["look_alike"]) if counts["look_alike"] else []:
            rows.append(_row(split, "look_alike", q, by_id[rng.choice(others)], rng))
        picked = []
        for kind in ("near_miss", "unrelated"):
            picked += rng.sample([q for q, k in off if k == kind], counts[kind])
        nearest = nearest_entries(picked, texts)
        for i, q in enumerate(picked):
            kind = "near_miss" if i < counts["near_miss"] else "unrelated"
            rows.append(_row(split, kind, q, concepts[nearest[i]], rng))
        out = HERE / f"sft_mismatch_{split}.csv"
        with out.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"{out.relative_to(HERE.parent)}: {len(rows)} rows")


def _names(question: str, entry: dict[str, str]) -> bool:
    """The question uses at least half the words of one of the entry's names or aliases."""
    from ohlora_rag.lexical import entry_names, tokenize

    words = set(tokenize(question))
    return any(len(set(n) & words) * 2 >= len(n) for n in entry_names(entry["text"]))


def _row(split: str, kind: str, question: str, entry: dict[str, str], rng: random.Random) -> dict[str, str]:
    return {
        "data_type": "train" if split == "train" else "valid",
        "kind": kind,
        "user_question": question,
        "rag_retrieved_data": entry["text"],
        "output_message": rng.choice(ANSWERS[kind]).format(title=entry["title"]),
    }


if __name__ == "__main__":
    main()
