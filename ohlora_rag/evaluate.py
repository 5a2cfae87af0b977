"""Retrieval metrics (pair scores, ranking over a DB), threshold calibration, trust reports; answer metrics: answers.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import ENCODE_BATCH
from .data import Pairs
from .decision import FEATURES, Outcomes, decide, fit_decision, outcomes
from .encoder import Encoder

if TYPE_CHECKING:
    from .config import Paths
    from .data import ConversationTurn
    from .models import ModelRef
    from .retriever import Retriever


@dataclass
class PairMetrics:
    """Predicted cosine vs target score over (question, entry) pairs, as the original project reported them."""

    mse: float
    mae: float
    pearson: float
    spearman: float
    pairs: int
    top1: float = float("nan")
    """Share of questions with a 1.0 pair whose highest-scored labelled entry is a 1.0 one: the original project's
    "right entry first among the question's candidates" (80 of 88), which ranks a question's own rows only."""


@dataclass
class RankingMetrics:
    """Where the question's 1.0 entry lands when the question searches the whole DB."""

    recall_at_1: float
    recall_at_5: float
    mrr_at_10: float
    questions: int


@dataclass
class Calibration:
    """The cosine threshold below which retrieval reports 'no matching information'.

    precision: of the questions answered (top score >= threshold), the share answered with their right entry;
    recall: of the questions whose top hit is right, the share answered;
    coverage: of the questions that have an entry, the share answered.
    """

    threshold: float
    precision: float
    recall: float
    coverage: float
    answerable: int
    unanswerable: int


@dataclass
class RetrievalReport:
    pairs: PairMetrics
    ranking: RankingMetrics | None
    calibration: Calibration | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def pair_metrics(
    predicted: Sequence[float] | np.ndarray,
    target: Sequence[float] | np.ndarray,
    questions: Sequence[str] | None = None,
) -> PairMetrics:
    """MSE, MAE, Pearson and Spearman (average ranks for ties) of predicted vs target scores; with `questions`
    (each pair's question), also top-1 among each question's labelled candidates."""
    p = np.asarray(predicted, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    err = p - t
    return PairMetrics(
        mse=float(np.mean(err**2)),
        mae=float(np.mean(np.abs(err))),
        pearson=_correlation(p, t),
        spearman=_correlation(_ranks(p), _ranks(t)),
        pairs=len(p),
        top1=candidate_top1(p, t, questions) if questions is not None else float("nan"),
    )


def candidate_top1(predicted: np.ndarray, target: np.ndarray, questions: Sequence[str]) -> float:
    """Share of questions having a 1.0 pair whose best-scored pair (first on a tie) is labelled 1.0."""
    best: dict[str, tuple[float, float]] = {}
    for score, label, q in zip(predicted.tolist(), target.tolist(), questions):
        if q not in best or score > best[q][0]:
            best[q] = (score, label)
    asked = {q for q, label in zip(questions, target.tolist()) if label >= 1.0}
    return sum(best[q][1] >= 1.0 for q in asked) / len(asked) if asked else float("nan")


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def ranking_metrics(ranks: Sequence[int | None]) -> RankingMetrics:
    """Args: ranks: per question, the 1-based rank of its first right entry (None: not in the top 10)."""
    n = len(ranks)
    if n == 0:
        return RankingMetrics(float("nan"), float("nan"), float("nan"), 0)
    r1 = sum(1 for r in ranks if r is not None and r <= 1) / n
    r5 = sum(1 for r in ranks if r is not None and r <= 5) / n
    mrr = sum(1.0 / r for r in ranks if r is not None and r <= 10) / n
    return RankingMetrics(r1, r5, mrr, n)


def calibrate(right: Sequence[float], wrong: Sequence[float], unanswerable: Sequence[float]) -> Calibration:
    """Choose the threshold that maximises F1 of 'answer with the right entry' against everything else.

    Args:
        right: top scores of answerable questions whose top hit is right.
        wrong: top scores of answerable questions whose top hit is wrong.
        unanswerable: top scores of questions that no entry answers.
    """
    right_a, wrong_a, none_a = (np.asarray(x, dtype=np.float64) for x in (right, wrong, unanswerable))
    candidates = np.unique(np.concatenate([right_a, wrong_a, none_a, [1.0]]))
    best: tuple[float, float] | None = None
    for t in candidates:
        tp = float((right_a >= t).sum())
        fp = float((wrong_a >= t).sum() + (none_a >= t).sum())
        fn = float((right_a < t).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if best is None or f1 > best[1]:
            best = (float(t), f1)
    assert best is not None
    # Place the threshold halfway down to the next lower score, so a near-tie does not flip the decision.
    t = best[0]
    lower = candidates[candidates < t]
    threshold = float((t + lower.max()) / 2) if len(lower) else t
    answered_right = float((right_a >= threshold).sum())
    answered = answered_right + float((wrong_a >= threshold).sum() + (none_a >= threshold).sum())
    answerable = len(right_a) + len(wrong_a)
    return Calibration(
        threshold=round(threshold, 4),
        precision=answered_right / answered if answered else float("nan"),
        recall=answered_right / len(right_a) if len(right_a) else float("nan"),
        coverage=float((right_a >= threshold).sum() + (wrong_a >= threshold).sum()) / answerable
        if answerable
        else float("nan"),
        answerable=answerable,
        unanswerable=len(none_a),
    )


def evaluate_retrieval(
    encoder: Encoder, pairs: Pairs, db_texts: Sequence[str] | None = None, batch_size: int = ENCODE_BATCH
) -> RetrievalReport:
    """Pair metrics on `pairs`; ranking metrics and a threshold calibration over `db_texts`.

    Args:
        encoder: the encoder to measure.
        pairs: (question, entry, score) rows.
        db_texts: the DB to rank against; None means every distinct entry of `pairs`.

    Ranking covers questions whose 1.0 entry is in the DB. Calibration takes as unanswerable both the questions
    without a 1.0 entry and, for each answerable question, its best score once the entries labelled >= 0.5 for it
    are removed from the DB (what the question would see if the DB lacked anything close to an answer).
    """
    from .store import VectorIndex

    questions = sorted(set(pairs.questions))
    q_row = {q: i for i, q in enumerate(questions)}
    entries = sorted(set(pairs.entries) | set(db_texts or []))
    e_row = {e: i for i, e in enumerate(entries)}
    q_vecs = encoder.encode_queries(questions, batch_size=batch_size)  # (nq, d)
    e_vecs = encoder.encode_passages(entries, batch_size=batch_size)  # (ne, d)
    predicted = [float(q_vecs[q_row[q]] @ e_vecs[e_row[e]]) for q, e in zip(pairs.questions, pairs.entries)]
    pm = pair_metrics(predicted, pairs.scores, pairs.questions)

    db = list(dict.fromkeys(db_texts)) if db_texts is not None else sorted(set(pairs.entries))
    db_pos = {t: i for i, t in enumerate(db)}
    positives: dict[str, set[int]] = {q: set() for q in questions}
    related: dict[str, set[int]] = {q: set() for q in questions}  # labelled >= 0.5: close enough to answer from
    for q, e, s in zip(pairs.questions, pairs.entries, pairs.scores):
        if e in db_pos and s >= 0.5:
            related[q].add(db_pos[e])
            if s >= 1.0:
                positives[q].add(db_pos[e])
    index = VectorIndex.from_vectors(e_vecs[[e_row[t] for t in db]])
    k = min(len(db), 10 + max((len(p) for p in related.values()), default=0))
    scores, found = index.search(q_vecs, k)  # (nq, k)
    ranks: list[int | None] = []
    right: list[float] = []
    wrong: list[float] = []
    unanswerable: list[float] = []
    for q in questions:
        row_scores, row_found = scores[q_row[q]].tolist(), found[q_row[q]].tolist()
        pos = positives[q]
        if not pos:
            unanswerable.append(row_scores[0])
            continue
        rank = next((r for r, f in enumerate(row_found[:10], start=1) if f in pos), None)
        ranks.append(rank)
        (right if rank == 1 else wrong).append(row_scores[0])
        others = [s for s, f in zip(row_scores, row_found) if f not in related[q]]
        if others:
            unanswerable.append(others[0])
    ranking = ranking_metrics(ranks) if ranks else None
    calibration = calibrate(right, wrong, unanswerable) if right and unanswerable else None
    return RetrievalReport(pm, ranking, calibration)


@dataclass
class EncoderComparison:
    """`evaluate-retrieval`'s result: a report per encoder ("base", and "fine-tuned" when there is one)."""

    refs: dict[str, ModelRef]
    reports: dict[str, RetrievalReport]
    saved_threshold: float | None = None
    """The threshold stored with the fine-tuned encoder (`save_threshold`), else None."""


def compare_encoders(
    pairs_file: Path,
    model: str | None = None,
    db: Path | None = None,
    save_threshold: bool = False,
    paths: Paths | None = None,
) -> EncoderComparison:
    """Measure the fine-tuned encoder (`model`, else the one build-index would use) and its base on `pairs_file`.

    Args:
        pairs_file: labelled (question, entry, score) pairs; every row is used.
        model: encoder reference; None means models/sbert/ when trained, else the base encoder alone.
        db: concept DB to rank against; None means the entries of the pairs.
        save_threshold: store the fine-tuned encoder's threshold calibrated on these pairs in its manifest.
    """
    from .config import DEFAULT_ENCODER, Paths
    from .data import load_concepts, load_pairs
    from .errors import DataFormatError, UsageError
    from .models import choose_encoder, read_manifest, resolve, store_threshold, trained_encoder_manifest

    paths = paths or Paths.resolve()
    data = load_pairs(pairs_file, split=None)
    db_texts = load_concepts(db).texts if db else None
    tuned = choose_encoder(model, paths)
    # with --save-threshold, refuse a folder it cannot be stored in before measuring anything
    manifest = trained_encoder_manifest(tuned.path) if save_threshold else read_manifest(tuned.path) or {}
    refs = {"base": resolve(str(manifest.get("base") or DEFAULT_ENCODER), "encoder", paths)}
    if tuned.path != refs["base"].path:
        refs["fine-tuned"] = tuned
    elif save_threshold:
        raise UsageError(f"--save-threshold: {tuned.path} is a base encoder — store thresholds in a fine-tuned one")
    reports = {name: evaluate_retrieval(Encoder(ref), data, db_texts) for name, ref in refs.items()}
    if not save_threshold:
        return EncoderComparison(refs, reports)
    calibration = reports["fine-tuned"].calibration
    if calibration is None:
        raise DataFormatError(
            f"--save-threshold: {pairs_file} gives no calibration — it needs questions with a 1.0 entry in the DB"
        )
    store_threshold(tuned.path, calibration.threshold, str(pairs_file))
    return EncoderComparison(refs, reports, calibration.threshold)


#: The decisions the trust report compares: name -> the features the decision model may use (None: the seed's
#: rule, the best cosine >= 0.5). "cosine" alone with a fitted cut is a calibrated cosine threshold.
TRUST_VARIANTS: dict[str, tuple[str, ...] | None] = {
    "cosine >= 0.5 (seed rule)": None,
    "cosine, calibrated cut": ("cosine",),
    "cosine + margin + z-score": ("cosine", "top_gap", "margin", "z", "cos_max", "z_max"),
    "BM25 alone": ("bm25", "bm25_share", "bm25_top"),
    "dense + BM25": ("cosine", "top_gap", "margin", "z", "cos_max", "z_max", "bm25", "bm25_share", "bm25_top"),
    "dense + BM25 + names": FEATURES[: FEATURES.index("name") + 1],
    "dense + BM25 + names + known questions": FEATURES[: FEATURES.index("known_margin") + 1],
    "dense + BM25 + names + known questions + coverage": FEATURES,
    "dense + BM25 + names + known questions + coverage + entry verifier (default)": FEATURES,
}
#: The variant whose decision's best candidates the entry verifier re-scores (a row only where there is a verifier
#: for the DB: `verifier.verifier_folder`).
VERIFIED_VARIANT = list(TRUST_VARIANTS)[-1]


@dataclass
class TrustRow:
    """One encoder x decision on the trust test set."""

    encoder: str
    decision: str
    outcomes: Outcomes
    cutoff: float | None

    def to_dict(self) -> dict[str, object]:
        return {"encoder": self.encoder, "decision": self.decision, "cutoff": self.cutoff, **asdict(self.outcomes)}


def encoder_refs(model: str | None, paths: Paths) -> dict[str, ModelRef]:
    """ "base", and "fine-tuned" when `model` (else models/sbert/) is another encoder than its base."""
    from .config import DEFAULT_ENCODER
    from .models import choose_encoder, read_manifest, resolve

    tuned = choose_encoder(model, paths)
    manifest = read_manifest(tuned.path) or {}
    refs = {"base": resolve(str(manifest.get("base") or DEFAULT_ENCODER), "encoder", paths)}
    if tuned.path != refs["base"].path:
        refs["fine-tuned"] = tuned
    return refs


def compare_trust(
    test_file: Path,
    calibration: Path,
    db: Path,
    model: str | None = None,
    variants: Sequence[str] | None = None,
    paths: Paths | None = None,
    known: Path | None = None,
) -> list[TrustRow]:
    """Which entry, or none, each decision puts into the prompt for the questions of `test_file`, fitted on
    `calibration` — for the base encoder and the fine-tuned one (`model`, else models/sbert/ when trained), with
    the labelled questions of `known` as the index's known questions.

    Nothing on disk changes: each encoder's index is built in memory.
    """
    from .build import in_memory_index, known_questions
    from .config import ENCODE_BATCH, FALLBACK_THRESHOLD, Paths
    from .data import load_concepts, load_labelled_questions
    from .retriever import Retriever

    paths = paths or Paths.resolve()
    concepts = load_concepts(db)
    test, calib = load_labelled_questions(test_file), load_labelled_questions(calibration)
    test_gold, calib_gold = test.positions(concepts), calib.positions(concepts)
    known_labelled = load_labelled_questions(known) if known is not None else None
    names = list(variants) if variants else list(TRUST_VARIANTS)
    verifier = None
    if VERIFIED_VARIANT in names:
        from .verifier import fit_verification, load_verifier

        verifier = load_verifier(paths, concepts.content_hash)
    rows = []
    for name, ref in encoder_refs(model, paths).items():
        encoder = Encoder(ref)
        stored = in_memory_index(concepts, encoder, ENCODE_BATCH, False)
        if known_labelled is not None:
            stored.known = known_questions(known_labelled, concepts, encoder, ENCODE_BATCH)
        retriever = Retriever(stored, encoder, FALLBACK_THRESHOLD)
        calib_sig = retriever.signals(calib.questions, skip_own=True)  # as build-index fits it
        test_sig = retriever.signals(test.questions)
        for variant in names:
            use = TRUST_VARIANTS[variant]
            if use is None:
                ranked = [int(s.positions[0]) for s in test_sig]
                chosen = [r if s.cosine[0] >= FALLBACK_THRESHOLD else None for r, s in zip(ranked, test_sig)]
                rows.append(TrustRow(name, variant, outcomes(chosen, test_gold, test.kinds, ranked), None))
                continue
            fitted = fit_decision(calib_sig, calib_gold, calib.kinds, str(calibration), use=use)
            if variant != VERIFIED_VARIANT:
                rows.append(TrustRow(name, variant, decide(fitted, test_sig, test_gold, test.kinds), fitted.cutoff))
            elif verifier is not None:
                # joined as build-index joins it, searched as `search` searches
                verification = fit_verification(
                    verifier,
                    calib.questions,
                    calib_sig,
                    calib_gold,
                    calib.kinds,
                    concepts.texts.__getitem__,
                    str(calibration),
                )
                verified = Retriever(
                    stored, encoder, FALLBACK_THRESHOLD, fitted, verification=verification, verifier=verifier
                )
                results = verified.search_many(test.questions)
                chosen = [r.best.position if r.best else None for r in results]
                ranked = [r.hits[0].position for r in results]
                outcome = outcomes(chosen, test_gold, test.kinds, ranked)
                rows.append(TrustRow(name, variant, outcome, verification.cutoff))
    return rows


# ----------------------------------------------------------------------------------------------- conversations


@dataclass
class ConversationReport:
    """Per kind of turn: right entry (or right decline) and, for switches, not dragged back to the old topic."""

    turns: dict[str, int]
    right: dict[str, float]
    clean: dict[str, float]  # switches: the answer's entry is not the previous turn's topic
    followed: dict[str, float]  # share of turns retrieved for the topic (as a follow-up)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate_conversations(
    retriever: Retriever,
    conversations: Sequence[Sequence[ConversationTurn]],
    top_k: int | None = None,
    follow: bool = True,
    rule: bool = False,
) -> ConversationReport:
    """Replay each conversation turn by turn (`follow=False`: every question alone, the no-memory baseline;
    `rule=True`: the hand-written follow-up rule even when the index has a fitted follow-up model)."""
    from .conversation import Conversation

    right: dict[str, list[bool]] = {}
    clean: dict[str, list[bool]] = {}
    followed: dict[str, list[bool]] = {}
    for turns in conversations:
        conversation = Conversation(retriever, top_k, rule=rule)
        previous: str | None = None
        for turn in turns:
            if not follow:
                conversation = Conversation(retriever, top_k, rule=rule)
            best = conversation.search(turn.question).best
            got = best.id if best else None
            right.setdefault(turn.kind, []).append(got == turn.concept_id)
            followed.setdefault(turn.kind, []).append(conversation.turns[-1].follow_up)
            if turn.kind in ("switch", "offtopic_switch"):
                clean.setdefault(turn.kind, []).append(got is None or got != previous or got == turn.concept_id)
            previous = turn.concept_id if turn.concept_id is not None else previous
    return ConversationReport(
        turns={k: len(v) for k, v in right.items()},
        right={k: float(np.mean(v)) for k, v in right.items()},
        clean={k: float(np.mean(v)) for k, v in clean.items()},
        followed={k: float(np.mean(v)) for k, v in followed.items()},
    )
