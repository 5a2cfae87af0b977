"""S-BERT training benchmark: `train-sbert` against the bare sentence-transformers seed recipe, side by side.

Both train from the same base encoder on the same pairs and are measured on the same held-out questions:
- bare: SentenceTransformerTrainer + CosineSimilarityLoss, batch 16, 10 % warm-up, max_seq_length 64, fp32, every
  parameter trainable (the original project's recipe);
- ours: `train_sbert` with its defaults (the same cosine term plus a ranking term, batches of whole questions with
  each distinct text encoded once, the word embeddings and lowest 2 layers frozen, bf16 autocast where the CPU has
  it). Its pairs/s include what the command does besides the steps: a checkpoint per epoch.

Run: `python bench/train_sbert.py [--data PAIRS] [--valid PAIRS] [--epochs 2] [--db DB] [--set FIELD=VALUE]`.
Without --valid, `--holdout` (20 %) of the questions are held out (seeded by `--split-seed`). With `--paraphrases
bench/seed_paraphrases.csv` both train on all 105 original questions and are measured on new wordings of them (the
same entries and scores): unseen questions about trained entries, as a test set from the same source would be.
`--train-paraphrases FILE` (repeatable; `bench/seed_paraphrases_train*.csv`) adds rewordings of the training questions to
the training pairs (and so to the known questions and the decision's fitting questions).
Repeat `--paraphrases` for several sets: each is reported, and "all" of them together (210 questions for the two
sets here, which halves what one question is worth). The trained models are removed at the end unless `--keep`.
"R@1 hyb" is the whole-DB Recall@1 of the entry decision's ranking (dense + BM25 + names, fitted on the training
questions); "R@1 known" the same with the training questions kept in the index as known questions (what
`build-index --known-questions TRAIN` does). The README's numbers: `python bench/train_sbert.py --epochs 4 --paraphrases bench/seed_paraphrases.csv
--paraphrases bench/seed_paraphrases2.csv` and `python bench/train_sbert.py --epochs 4 --holdout 0.24
--split-seed 7` (25 of the 105 original questions held out, about questions whose entries may have no other
training question); about 21 minutes each here, 16 of them the bare recipe.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEED_PAIRS = ROOT.parent / "shared" / "ohlora-data" / "sbert_train.csv"


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_rows(target: Path, rows: list[dict[str, str]]) -> Path:
    with target.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


def split_file(path: Path, fraction: float, seed: int, folder: Path) -> tuple[Path, Path]:
    rows = read_rows(path)
    questions = sorted({r["user_question"] for r in rows})
    random.Random(seed).shuffle(questions)
    held = set(questions[: max(1, round(len(questions) * fraction))])
    as_train = [{**r, "data_type": "train"} if "data_type" in r else r for r in rows]
    return (
        write_rows(folder / "train.csv", [r for r in as_train if r["user_question"] not in held]),
        write_rows(folder / "valid.csv", [r for r in as_train if r["user_question"] in held]),
    )


def bare_recipe(train: Path, base_path: Path, out: Path, epochs: int, seed: int) -> tuple[float, int]:
    """The seed's recipe with plain sentence-transformers. Returns (seconds, pairs seen)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    from ohlora_rag.data import load_pairs
    from ohlora_rag.training.common import warmup

    pairs = load_pairs(train)
    model = SentenceTransformer(str(base_path), device="cpu")
    model.max_seq_length = 64
    data = Dataset.from_dict({"sentence1": pairs.questions, "sentence2": pairs.entries, "score": pairs.scores})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "ckpt"),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        **warmup(0.1),
        seed=seed,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        logging_strategy="no",
        prompts={"sentence1": "query: ", "sentence2": "passage: "},
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=losses.CosineSimilarityLoss(model)
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save(str(out / "model"))
    return seconds, len(pairs) * epochs


def reworded(rows: list[dict[str, str]], path: Path, paraphrases: Path, partial: bool = False) -> list[dict[str, str]]:
    """Pairs made of new wordings: every question of `rows` (read from `path`) replaced by its paraphrase in
    `paraphrases` (index = the question's place in first-appearance order), keeping its entries and scores.
    `partial`: questions without a paraphrase are left out (training rewordings); else each needs one."""
    new = {int(r["index"]): r["paraphrase"] for r in read_rows(paraphrases)}
    order = {q: i for i, q in enumerate(dict.fromkeys(r["user_question"] for r in rows))}
    unknown = set(new) - set(order.values())
    if unknown:
        raise SystemExit(
            f"{paraphrases}: index {min(unknown)} is no question of {path} (it has {len(order)}: 0 to {len(order) - 1})"
        )
    if not partial and len(new) != len(order):
        raise SystemExit(f"{paraphrases}: needs one paraphrase for each of the {len(order)} questions of {path}")
    return [{**r, "user_question": new[order[r["user_question"]]]} for r in rows if order[r["user_question"]] in new]


def held_out_sets(path: Path, paraphrase_files: list[Path], folder: Path) -> dict[str, Path]:
    """One held-out file per paraphrase set and, for several sets, "all" of them together (listed first)."""
    rows = read_rows(path)
    sets = {p.stem: reworded(rows, path, p) for p in paraphrase_files}
    files = {name: write_rows(folder / f"{name}.csv", held) for name, held in sets.items()}
    if len(sets) > 1:
        together = [row for held in sets.values() for row in held]
        files = {"all": write_rows(folder / "all-paraphrases.csv", together), **files}
    return files


def hybrid_recall(
    encoder: object, concepts: object, train: Path, held: dict[str, Path], known: bool = False, fit: Path | None = None
) -> dict[str, float]:
    """Whole-DB Recall@1 of the entry decision's ranking (dense + BM25 + names [+ known questions: the training
    questions]), its model fitted on `fit` (default: the training questions, each scored without its own key): per
    held-out set, the share of questions whose best-scored entry is their 1.0 entry."""
    from ohlora_rag.build import fit_on, in_memory_index, known_questions
    from ohlora_rag.config import ENCODE_BATCH, Paths
    from ohlora_rag.data import load_labelled_questions
    from ohlora_rag.decision import decide
    from ohlora_rag.retriever import Retriever

    stored = in_memory_index(concepts, encoder, ENCODE_BATCH, False)  # type: ignore[arg-type]
    labelled = load_labelled_questions(train)
    if known:
        stored.known = known_questions(labelled, concepts, encoder, ENCODE_BATCH)  # type: ignore[arg-type]
    if fit is not None:
        labelled = load_labelled_questions(fit)
    model, _ = fit_on(stored, encoder, concepts, labelled, Paths.resolve(ROOT), verify=False)  # type: ignore[arg-type]
    retriever = Retriever(stored, encoder, 0.5)  # type: ignore[arg-type]
    out = {}
    for name, path in held.items():
        labelled = load_labelled_questions(path)
        keep = [i for i, k in enumerate(labelled.kinds) if k == "in_kb"]
        questions = [labelled.questions[i] for i in keep]
        gold = [labelled.positions(concepts)[i] for i in keep]  # type: ignore[arg-type]
        signals = retriever.signals(questions)
        out[name] = decide(model, signals, gold, ["in_kb"] * len(keep)).ranked_first
    return out


def overrides(items: list[str]) -> dict[str, object]:
    """`--set loss=cosine --set learning_rate=5e-5` -> typed SbertTrainConfig keyword arguments."""
    from dataclasses import fields

    from ohlora_rag.config import SbertTrainConfig

    types = {f.name: f.type for f in fields(SbertTrainConfig)}
    out: dict[str, object] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--set {item}: no such SbertTrainConfig field — one of {', '.join(types)}")
        kind = str(types[name])
        if "bool" in kind:
            out[name] = value.lower() in ("1", "true", "yes")
        else:
            out[name] = float(value) if "float" in kind else int(value) if "int" in kind else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=SEED_PAIRS if SEED_PAIRS.exists() else ROOT / "data" / "sbert_train.csv"
    )
    parser.add_argument("--valid", type=Path)
    parser.add_argument(
        "--paraphrases",
        type=Path,
        action="append",
        default=[],
        help="train on all of --data, measure on these rewordings of its questions (bench/seed_paraphrases*.csv); "
        "repeat for several sets",
    )
    parser.add_argument(
        "--calibrate",
        type=Path,
        action="append",
        default=[],
        help="fit the entry decision (R@1 hyb / known) on these rewordings of the training questions (the same "
        "index,paraphrase format) instead of the training questions themselves; repeat for several",
    )
    parser.add_argument(
        "--train-paraphrases",
        type=Path,
        action="append",
        default=[],
        help="also train on these rewordings of the training questions (index,paraphrase, not every index needed; each "
        "keeps its question's entries and scores); they are known questions too, and the decision is fitted on all of "
        "them; repeat for several",
    )
    parser.add_argument("--db", type=Path, help="DB to rank against (default: the entries of the pairs)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="training seed")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of questions held out (without --valid)")
    parser.add_argument("--split-seed", type=int, help="seed of the held-out split (default: --seed)")
    parser.add_argument("--skip-bare", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the trained models (else the work folder is removed)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a SbertTrainConfig default"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ohlora_rag.device import quiet_transformers

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="ohlora-bench-sbert-"))
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"models kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    from ohlora_rag.config import DEFAULT_ENCODER, Paths, SbertTrainConfig
    from ohlora_rag.data import ConceptDB, load_concepts, load_pairs
    from ohlora_rag.encoder import Encoder
    from ohlora_rag.evaluate import RetrievalReport, evaluate_retrieval
    from ohlora_rag.models import ModelRef, resolve
    from ohlora_rag.training.sbert import train_sbert

    if args.train_paraphrases and not (args.paraphrases or args.valid):
        # with a held-out split, rewordings of its held-out questions would be trained on
        raise SystemExit("--train-paraphrases needs --paraphrases or --valid (it rewords all of --data)")
    if args.paraphrases:
        train, held = args.data, held_out_sets(args.data, args.paraphrases, work)
    elif args.valid:
        train, held = args.data, {"valid": args.valid}
    else:
        train, valid_file = split_file(
            args.data, args.holdout, args.seed if args.split_seed is None else args.split_seed, work
        )
        held = {"held-out": valid_file}
    source = read_rows(args.data)
    if args.train_paraphrases:
        train = write_rows(
            work / "train-with-rewordings.csv",
            source + [r for p in args.train_paraphrases for r in reworded(source, args.data, p, partial=True)],
        )
    fit = None
    if args.calibrate:
        fit = write_rows(work / "calibration.csv", [r for p in args.calibrate for r in reworded(source, args.data, p)])
    first = next(iter(held))  # train-sbert validates (and calibrates) on the first set (for several: all)
    valid = held[first]
    held_pairs = {name: load_pairs(path, split=None) for name, path in held.items()}
    valid_pairs = held_pairs[first]
    paths = Paths.resolve(ROOT)
    base = resolve(DEFAULT_ENCODER, "encoder", paths)
    db = load_concepts(args.db).texts if args.db else sorted(set(load_pairs(train).entries) | set(valid_pairs.entries))
    print(
        f"data {args.data.name}: train {train.name}, held-out {len(set(valid_pairs.questions))} questions; {args.epochs} epochs; DB {len(db)} entries"
    )

    concepts = ConceptDB(Path("db"), [str(i) for i in range(len(db))], list(db), {})
    hybrid: dict[str, dict[str, float]] = {}
    with_known: dict[str, dict[str, float]] = {}

    def measure(model: ModelRef) -> dict[str, RetrievalReport]:
        encoder = Encoder(model)
        hybrid[model.reference] = hybrid_recall(encoder, concepts, train, held, fit=fit)
        with_known[model.reference] = hybrid_recall(encoder, concepts, train, held, known=True, fit=fit)
        return {name: evaluate_retrieval(encoder, pairs, db) for name, pairs in held_pairs.items()}

    results: dict[str, tuple[float | None, dict[str, RetrievalReport]]] = {}
    results["base (no training)"] = (None, measure(ModelRef("base", base.path)))
    report = train_sbert(
        SbertTrainConfig(
            data=train,
            valid=valid,
            epochs=args.epochs,
            seed=args.seed,
            out=work / "ours",
            progress=False,
            **overrides(args.set),
        ),
        paths,
    )
    results["ohlora-rag train-sbert"] = (report.pairs_per_second, measure(ModelRef("ours", report.out)))
    if not args.skip_bare:
        seconds, seen = bare_recipe(train, base.path, work / "bare", args.epochs, args.seed)
        results["bare seed recipe"] = (seen / seconds, measure(ModelRef("bare", work / "bare" / "model")))

    header = ["recipe", "pairs/s", "speed-up", "MSE", "MAE", "Pearson", "Spearman", "top-1", "R@1", "R@5", "MRR@10"]
    header += ["R@1 hyb", "R@1 known"]
    refs = {"base (no training)": "base", "ohlora-rag train-sbert": "ours", "bare seed recipe": "bare"}
    width = 24 + max(len(f" [{name}]") for name in held) if len(held) > 1 else 24
    print("  ".join(f"{h:>10}" if i else f"{h:<{width}}" for i, h in enumerate(header)))
    bare_speed = results.get("bare seed recipe", (None, None))[0]
    for name, (speed, reports) in results.items():
        for set_name, rep in reports.items():
            r = rep.ranking
            cells = [
                f"{speed:.1f}" if speed else "-",
                f"{speed / bare_speed:.2f}x" if speed and bare_speed else "-",
                f"{rep.pairs.mse:.4f}",
                f"{rep.pairs.mae:.4f}",
                f"{rep.pairs.pearson:.4f}",
                f"{rep.pairs.spearman:.4f}",
                f"{rep.pairs.top1:.3f}",
                f"{r.recall_at_1:.3f}" if r else "-",
                f"{r.recall_at_5:.3f}" if r else "-",
                f"{r.mrr_at_10:.3f}" if r else "-",
                f"{hybrid[refs[name]][set_name]:.3f}",
                f"{with_known[refs[name]][set_name]:.3f}",
            ]
            label = f"{name} [{set_name}]" if len(held) > 1 else name
            print("  ".join([f"{label:<{width}}", *[f"{c:>10}" for c in cells]]))


if __name__ == "__main__":
    main()
