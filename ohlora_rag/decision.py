"""Which entry goes into the prompt, or none: a small logistic model over dense, lexical and name signals.

One cosine against one number cannot tell "the right entry" from "the closest of 160 unrelated ones": e5 cosines
live in a narrow band (off-topic best scores reach 0.88 while right entries score 0.84). The model scores every
candidate entry of a question from signals that are free with an exact index over a small DB:

- the candidate's cosine, its gap to the question's best cosine, its margin over the runner-up;
- its z-score against the question's cosines to the whole DB (mean and variance come from the entries' mean
  vector and covariance, so they cost O(d^2) per question at any DB size);
- its BM25 score (raw, and as a share of the question's best BM25 score) and whether it is the BM25 top hit;
- how much of the entry's name or aliases (the text before " : ") the question contains;
- with known questions stored in the index (labelled questions, e.g. the encoder's training questions): the best
  cosine to the candidate's own known questions (or its text, if higher), its gap to the best candidate's, and how
  close the question lies to a known question that no entry answers;
- how much of the question the candidate covers: the share of the question's words (lexical tokens) found in the
  entry's text or in its known questions (a question about a topic next to the entry's names a word none of them
  has: "DPO" is in no wording of the RLHF entry).

The best-scoring candidate goes into the prompt if its probability of being the right entry clears the cutoff
chosen on a calibration split. The model is fitted by `fit_decision` and stored in the index manifest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from .errors import DataFormatError

FEATURES = (
    "cosine",
    "top_gap",
    "margin",
    "z",
    "cos_max",
    "z_max",
    "bm25",
    "bm25_share",
    "bm25_top",
    "name",
    "known",
    "known_gap",
    "unanswerable",
    "known_margin",
    "coverage",
)
#: Dense, lexical and known-question candidates per question (each side); the union is scored.
CANDIDATES = 16
DECISION_VERSION = 3
#: Inverse L2 strength of the logistic fit. Chosen by 5-fold cross-validation on data/trust_calib.csv (8 shuffles,
#: never the test file): utility 1.797 at 0.1 vs 1.789 at 0.03 / 0.3 and 1.783 at 1.0 (sklearn's default).
REGULARISATION = 0.1


@dataclass
class Signals:
    """Raw signals for one question's candidate entries (arrays of shape (c,) unless noted)."""

    positions: np.ndarray  # int64 entry positions
    cosine: np.ndarray
    bm25: np.ndarray
    name: np.ndarray  # share of the best-covered entry name's tokens present in the question
    mu: float  # mean cosine of the question over the whole DB
    sigma: float  # standard deviation of those cosines
    bm25_max: float  # the question's best BM25 score over the whole DB
    known: np.ndarray | None = None  # best cosine to each candidate's known questions or its text; None: no keys
    unanswerable: float = 0.0  # best cosine to a known question no entry answers (0 without such questions)
    coverage: np.ndarray | None = None  # share of the question's words in each candidate's text or known questions

    def features(self) -> np.ndarray:
        """float64 (c, len(FEATURES))."""
        cos = self.cosine.astype(np.float64)
        best = float(cos.max()) if len(cos) else 0.0
        second = np.sort(cos)[-2] if len(cos) > 1 else best
        margin = np.where(cos >= best, best - second, cos - best)
        sigma = max(self.sigma, 1e-6)
        z = (cos - self.mu) / sigma
        bm = self.bm25.astype(np.float64)
        share = bm / self.bm25_max if self.bm25_max > 0 else np.zeros_like(bm)
        top = (bm >= self.bm25_max) & (self.bm25_max > 0)
        known = cos if self.known is None else np.maximum(self.known.astype(np.float64), cos)
        known_best = float(known.max()) if len(known) else 0.0
        columns = [
            cos,
            cos - best,
            margin,
            z,
            np.full_like(cos, best),
            np.full_like(cos, (best - self.mu) / sigma),
            np.log1p(bm),
            share,
            top.astype(np.float64),
            self.name.astype(np.float64),
            known,
            known - known_best,
            np.full_like(cos, self.unanswerable),
            np.full_like(cos, known_best - self.unanswerable),
            np.zeros_like(cos) if self.coverage is None else self.coverage.astype(np.float64),
        ]
        return np.stack(columns, axis=1)


_M = TypeVar("_M", bound="LogisticModel")


@dataclass
class LogisticModel:
    """A logistic model over standardised features; `cutoff` on its probability decides. Subclasses name their
    features and version; a stored model of another version or feature list is refused with the fix."""

    coef: list[float]
    intercept: float
    mean: list[float]
    scale: list[float]
    cutoff: float
    features: list[str]
    version: int
    calibrated_on: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    FEATURES: ClassVar[tuple[str, ...]] = ()
    VERSION: ClassVar[int] = 0
    WHAT: ClassVar[str] = "model"

    def probability(self, features: np.ndarray) -> np.ndarray:
        """Args: features: (c, F). Returns: (c,) probabilities."""
        x = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        logits = x @ np.asarray(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def fitted(
        cls: type[_M],
        x: np.ndarray,
        y: np.ndarray,
        regularisation: float,
        calibrated_on: str,
        use: Sequence[str],
        seed: int = 0,
    ) -> _M:
        """Fit on features `x` (n, F) and 0/1 labels `y`; features not in `use` get weight 0; cutoff 0.5."""
        from sklearn.linear_model import LogisticRegression

        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale < 1e-9] = 1.0
        cols = [cls.FEATURES.index(f) for f in use]
        clf = LogisticRegression(C=regularisation, max_iter=5000, random_state=seed)
        clf.fit(((x - mean) / scale)[:, cols], y)
        coef = np.zeros(len(cls.FEATURES))
        coef[cols] = clf.coef_[0]
        return cls(
            coef=[float(c) for c in coef],
            intercept=float(clf.intercept_[0]),
            mean=[float(m) for m in mean],
            scale=[float(s) for s in scale],
            cutoff=0.5,
            features=list(cls.FEATURES),
            version=cls.VERSION,
            calibrated_on=calibrated_on,
        )

    @classmethod
    def from_dict(cls: type[_M], data: dict[str, Any], where: str) -> _M:
        try:
            model = cls(**data)
        except TypeError as exc:
            raise DataFormatError(f"{where}: unreadable {cls.WHAT} ({exc}) — run `ohlora-rag build-index`") from None
        if model.version != cls.VERSION or list(model.features) != list(cls.FEATURES):
            raise DataFormatError(
                f"{where}: {cls.WHAT} of another version ({model.version}) — run `ohlora-rag build-index`"
            )

        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        n = len(cls.FEATURES)
        vectors = (model.coef, model.mean, model.scale)
        if not all(isinstance(v, list) and len(v) == n and all(map(number, v)) for v in vectors) or not (
            number(model.intercept) and number(model.cutoff)
        ):
            raise DataFormatError(
                f"{where}: unreadable {cls.WHAT} (its weights are not {n} finite numbers each) — run "
                "`ohlora-rag build-index`"
            )
        return model


@dataclass
class DecisionModel(LogisticModel):
    """Which candidate entry goes into the prompt: the probability that a candidate is the question's right entry."""

    features: list[str] = field(default_factory=lambda: list(FEATURES))
    version: int = DECISION_VERSION

    FEATURES: ClassVar[tuple[str, ...]] = FEATURES
    VERSION: ClassVar[int] = DECISION_VERSION
    WHAT: ClassVar[str] = "decision model"


@dataclass
class Outcomes:
    """What a decision did on a labelled question set (shares of each kind's questions)."""

    right: float  # in-KB questions answered from their own entry
    wrong: float  # in-KB questions answered from another entry
    declined: float  # in-KB questions declined
    near_miss_declined: float
    unrelated_declined: float
    in_kb: int
    near_miss: int
    unrelated: int
    ranked_first: float = math.nan  # in-KB questions whose best-scored candidate is right, declined or not (R@1)

    @property
    def utility(self) -> float:
        """What the cutoff maximises: a wrong entry costs as much as a right one earns; declines of questions the
        notes cannot answer count as much as right answers."""
        off = [
            x for x, n in ((self.near_miss_declined, self.near_miss), (self.unrelated_declined, self.unrelated)) if n
        ]
        return self.right - self.wrong + (sum(off) / len(off) if off else 0.0)


def outcomes(
    chosen: Sequence[int | None],
    gold: Sequence[int | None],
    kinds: Sequence[str],
    ranked: Sequence[int] | None = None,
) -> Outcomes:
    """Args: chosen: the entry position put into the prompt (None: declined); gold: the right position (None for
    questions without one); kinds: "in_kb" | "near_miss" | "unrelated" per question; ranked: the best-scored
    entry position per question, before the decline decision."""
    counts = {"right": 0, "wrong": 0, "declined": 0, "near_miss": 0, "unrelated": 0}
    totals = {"in_kb": 0, "near_miss": 0, "unrelated": 0}
    for c, g, k in zip(chosen, gold, kinds):
        totals[k] += 1
        if k == "in_kb":
            counts["declined" if c is None else "right" if c == g else "wrong"] += 1
        elif c is None:
            counts[k] += 1
    n = totals["in_kb"] or 1
    return Outcomes(
        right=counts["right"] / n,
        wrong=counts["wrong"] / n,
        declined=counts["declined"] / n,
        near_miss_declined=counts["near_miss"] / totals["near_miss"] if totals["near_miss"] else math.nan,
        unrelated_declined=counts["unrelated"] / totals["unrelated"] if totals["unrelated"] else math.nan,
        in_kb=totals["in_kb"],
        near_miss=totals["near_miss"],
        unrelated=totals["unrelated"],
        ranked_first=sum(r == g for r, g, k in zip(ranked, gold, kinds) if k == "in_kb") / n if ranked else math.nan,
    )


def fit_decision(
    signals: Sequence[Signals],
    gold: Sequence[int | None],
    kinds: Sequence[str],
    calibrated_on: str,
    use: Sequence[str] = FEATURES,
    seed: int = 0,
) -> DecisionModel:
    """Fit the candidate model on labelled questions, then choose the cutoff that maximises `Outcomes.utility`.

    Args:
        signals: per question, its candidates' signals.
        gold: per question, the right entry position, or None when no entry answers it.
        kinds: per question, "in_kb", "near_miss" or "unrelated".
        calibrated_on: the file's name, recorded with the model.
        use: the features the model may use (the others get weight 0) — for measuring what each signal adds.
    """
    feats = [s.features() for s in signals]
    x = np.concatenate(feats)
    y = np.concatenate(
        [
            (s.positions == g).astype(int) if g is not None else np.zeros(len(s.positions), int)
            for s, g in zip(signals, gold)
        ]
    )
    if y.sum() == 0 or y.sum() == len(y):
        raise DataFormatError(
            f"{calibrated_on}: calibration needs questions whose right entry is among their candidates and "
            "questions without one"
        )
    model = DecisionModel.fitted(x, y, REGULARISATION, calibrated_on, use, seed)
    model.cutoff = choose_cutoff([model.probability(f) for f in feats], signals, gold, kinds)
    model.metrics = asdict(decide(model, signals, gold, kinds))
    return model


def decide(
    model: DecisionModel, signals: Sequence[Signals], gold: Sequence[int | None], kinds: Sequence[str]
) -> Outcomes:
    """What the model decides on labelled questions."""
    chosen: list[int | None] = []
    ranked = []
    for s in signals:
        p = model.probability(s.features())
        i = int(np.argmax(p))
        ranked.append(int(s.positions[i]))
        chosen.append(ranked[-1] if p[i] >= model.cutoff else None)
    return outcomes(chosen, gold, kinds, ranked)


def choose_cutoff(
    probabilities: Sequence[np.ndarray],
    signals: Sequence[Signals],
    gold: Sequence[int | None],
    kinds: Sequence[str],
) -> float:
    """The cutoff on each question's best probability that maximises `Outcomes.utility`."""
    best_p = [(int(s.positions[int(np.argmax(p))]), float(p.max())) for s, p in zip(signals, probabilities)]
    return best_cutoff(best_p, gold, kinds)[0]


def best_cutoff(
    best_p: Sequence[tuple[int, float]], gold: Sequence[int | None], kinds: Sequence[str]
) -> tuple[float, float]:
    """The cutoff on each question's (best entry, its probability) that maximises `Outcomes.utility`, and that
    utility."""
    candidates = sorted({p for _, p in best_p} | {0.0, 1.0})
    best: tuple[float, float] | None = None
    for i, cut in enumerate(candidates):
        lower = candidates[i - 1] if i else cut
        cut = (cut + lower) / 2  # halfway below a question's probability, so a near-tie does not flip it
        chosen = [pos if p >= cut else None for pos, p in best_p]
        u = outcomes(chosen, gold, kinds).utility
        if best is None or u > best[1] + 1e-12:
            best = (cut, u)
    assert best is not None
    return round(best[0], 6), best[1]
