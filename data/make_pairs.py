"""Build data/sbert_train.csv and data/sbert_dev.csv from data/questions.csv and data/concepts.csv (deterministic).

Scores follow the original project's graded scheme: the question's own entry 1.0, entries listed as related 0.5,
one other entry of the same topic 0.1, entries of other topics 0.0 (two for a training question, three for a dev
question); questions that no entry answers are paired with four random entries at 0.0. Training needs no third
unrelated pair: its ranking term already scores each question against every entry of its batch, and 14 % fewer pairs
is 14 % less training time. Run: `python data/make_pairs.py`.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20260702


def main() -> None:
    with (HERE / "concepts.csv").open(encoding="utf-8") as fh:
        concepts = list(csv.DictReader(fh))
    with (HERE / "questions.csv").open(encoding="utf-8") as fh:
        questions = list(csv.DictReader(fh))
    by_id = {c["id"]: c for c in concepts}
    rng = random.Random(SEED)
    unrelated = {"train": 2, "dev": 3}
    out: dict[str, list[dict[str, str]]] = {"train": [], "dev": []}
    for q in questions:
        rows: list[tuple[str, float]] = []
        cid = q["concept_id"]
        if cid:
            own = by_id[cid]
            related = [r for r in own["related"].split(";") if r in by_id and r != cid]
            rows.append((own["text"], 1.0))
            rows += [(by_id[r]["text"], 0.5) for r in related]
            taken = {cid, *related}
            same_topic = [c for c in concepts if c["topic"] == own["topic"] and c["id"] not in taken]
            if same_topic:
                pick = rng.choice(same_topic)
                rows.append((pick["text"], 0.1))
                taken.add(pick["id"])
            others = [c for c in concepts if c["topic"] != own["topic"] and c["id"] not in taken]
            drawn = rng.sample(others, 3)  # always 3, so each question's draws stay as they were
            rows += [(c["text"], 0.0) for c in drawn[: unrelated[q["split"]]]]
        else:
            rows += [(c["text"], 0.0) for c in rng.sample(concepts, 4)]
        data_type = "train" if q["split"] == "train" else "valid"
        for text, score in rows:
            out[q["split"]].append(
                {
                    "data_type": data_type,
                    "user_question": q["question"],
                    "rag_retrieved_data": text,
                    "similarity_score": f"{score}",
                }
            )
    for split, rows in out.items():
        with (HERE / f"sbert_{split}.csv").open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(
                fh, fieldnames=["data_type", "user_question", "rag_retrieved_data", "similarity_score"]
            )
            writer.writeheader()
            writer.writerows(rows)
        print(f"data/sbert_{split}.csv: {len(rows)} pairs")


if __name__ == "__main__":
    main()
