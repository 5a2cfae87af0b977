"""The entry verifier: a cross-encoder that reads a question and an entry together and says whether the entry answers
the question.

The entry decision (`decision.py`) sees a question and an entry only through scores — cosines, BM25, the share of
the question's words the entry has — so an entry next to the asked one ("precision" for a recall question, "RLHF"
for a DPO question) can look as good as the right one. The verifier reads both texts: it is a pair model
(`crossencoder.py`: the tutor encoder with a rank-8 LoRA adapter and a linear head), trained on the index's known
questions against their own entry and two look-alikes each — the other entry the decision scores best, and one of
the entry's related entries — and the known questions no entry answers against their two best-scored entries
(`train_verifier`, `ohlora-rag train-verifier`), 1.3 MB.

How the retriever uses it (`Verification`, fitted by `build-index` and stored in the index manifest): the decision's
few best candidates are re-scored by a weighted sum of the verifier's logit and the decision's log-odds; the best
goes into the prompt when that clears a cutoff — except where the decision alone is surer than the verifier ever
overruled on the calibration file (`Verification.settled`): a best candidate that likely or that unlikely is taken or
declined without running the verifier, which saves its ~40 ms on most questions. An entry given from outside (`QueryEngine.stream_with`: evaluating the
LLM on given entries) is checked by the verifier alone against its own cutoff, and a failed check declines as a
missing entry does.

Where it comes from: `models/verifier/` when `train-verifier` wrote one for the DB being indexed, else the one that
ships in the package (`ohlora_rag/tutor/verifier/`, made by `make tutor-verifier`) for the project's own DB, whatever
the index's encoder. A verifier that cannot be loaded leaves the decision alone, with one warning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import DEFAULT_TUTOR_ENCODER, Paths, VerifierTrainConfig
from .crossencoder import PairKind, Remembering, joined, load_pair_model, read_pair_model, train_pair_model
from .decision import Signals, best_cutoff, fit_decision
from .errors import DataFormatError

if TYPE_CHECKING:
    from .models import ModelRef
    from .retriever import Retriever

#: A pair too long is cut from the end of its longer text (the entry, but for a very long question); the adapter is
#: stored as float16 (1.3 MB: what fits the package's 20 MB).
VERIFIER = PairKind("entry verifier", "verifier.json", 1, "train-verifier", "longest_first", float16=True)
SHIPPED_VERIFIER = Path(__file__).resolve().parent / "tutor" / "verifier"
#: Candidates per question the trainer pairs with the question: the decision's best few.
TRAIN_CANDIDATES = 4
VERIFICATION_VERSION = 1
#: What `fit_verification` chooses from: how many of the decision's best candidates the verifier re-scores, and the
#: verifier's weight against the decision's log-odds.
CANDIDATE_CHOICES = (1, 2)
WEIGHT_CHOICES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: How far inside the calibration file's band, in log-odds, a question must lie for the decision alone to settle it: the
#: band where the verifier changed no outcome there is narrowed by this much on each side (`_settled_band`).
SETTLED_MARGIN = 0.5
#: Folds of the calibration file the decision is refitted on, so that its probabilities are those of new questions.
FOLDS = 5

#: A loaded verifier: `logits(pairs)` says how well each entry answers its question (> 0: answers).
EntryVerifier = Remembering


def verifier_pair(question: str, entry: str) -> tuple[str, str]:
    """The two texts the verifier reads."""
    return (question, entry)


@dataclass
class Verification:
    """How the verifier joins the entry decision (stored in the index manifest as `verify`).

    A candidate's score is `weight * verifier logit + (1 - weight) * decision log-odds`, over the decision's best
    `candidates`; the best goes into the prompt when sigmoid(score) >= `cutoff`. A given entry passes when
    sigmoid(verifier logit) >= `entry_cutoff`."""

    weight: float
    cutoff: float
    candidates: int
    entry_cutoff: float
    calibrated_on: str = ""
    metrics: dict[str, Any] | None = None
    sure_below: float = 0.0
    sure_above: float = 1.0
    version: int = VERIFICATION_VERSION

    def settled(self, probability: float) -> bool:
        """Whether the decision alone settles a question whose best candidate has this probability."""
        return probability < self.sure_below or probability > self.sure_above

    def scores(self, logits: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """The combined probability of each candidate (both arrays: the same candidates)."""
        return np.asarray(joined(logits, probabilities, self.weight))

    def entry_passes(self, logit: float) -> bool:
        return 1.0 / (1.0 + math.exp(-logit)) >= self.entry_cutoff

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Verification:
        if not isinstance(data, dict) or data.get("version") != VERIFICATION_VERSION:
            raise DataFormatError(f"{where}: the verification of another version — run `ohlora-rag build-index`")
        try:
            v = cls(
                float(data["weight"]),
                float(data["cutoff"]),
                int(data["candidates"]),
                float(data["entry_cutoff"]),
                str(data.get("calibrated_on", "")),
                data.get("metrics"),
                float(data.get("sure_below", 0.0)),  # an index built before the settled band: always verify
                float(data.get("sure_above", 1.0)),
            )
        except (KeyError, TypeError, ValueError):
            raise DataFormatError(f"{where}: damaged verification — run `ohlora-rag build-index`") from None
        if not (
            0 <= v.weight <= 1
            and 0 <= v.sure_below <= v.cutoff <= v.sure_above <= 1
            and 0 <= v.entry_cutoff <= 1
            and v.candidates >= 1
        ):
            raise DataFormatError(f"{where}: damaged verification — run `ohlora-rag build-index`")
        return v


def read_verifier(folder: Path) -> dict[str, Any]:
    """The verifier's manifest, checked: one-line errors naming the folder."""
    return read_pair_model(folder, VERIFIER)


def trained_on(folder: Path) -> str | None:
    """The content hash of the DB the verifier in `folder` was trained on (None: no readable manifest)."""
    try:
        record = json.loads((folder / VERIFIER.manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(record.get("corpus_hash")) if isinstance(record, dict) else None


def verifier_folder(user_dir: Path, corpus_hash: str) -> Path | None:
    """Where the verifier for an index of the DB with this content hash is: `user_dir` (models/verifier/) when
    `train-verifier` wrote one there for this DB, else the shipped one when it was trained on this DB (the project's
    own), else None. A verifier reads entries' texts, not the index's vectors, so the index's encoder does not
    matter; the DB does (it learnt which of its entries look alike)."""
    for folder in (user_dir, SHIPPED_VERIFIER):
        if trained_on(folder) == corpus_hash:
            return folder
    return None


def load_verifier(paths: Paths, corpus_hash: str) -> EntryVerifier | None:
    """The verifier for an index of the DB with this content hash (`verifier_folder`); None when there is none, or
    (with one warning on stderr) when it cannot be loaded."""
    folder = verifier_folder(paths.verifier_dir, corpus_hash)
    return None if folder is None else load_pair_model(folder, VERIFIER, paths, DEFAULT_TUTOR_ENCODER)


def related_positions(retriever: Retriever) -> dict[int, list[int]]:
    """Each entry's related entries (the DB's `related` column: ids separated by ";"), as positions in the index."""
    by_id = retriever.positions_by_id()
    out: dict[int, list[int]] = {}
    for position in by_id.values():
        listed = str(retriever.stored.entry(position).get("related") or "")
        out[position] = [by_id[x] for x in listed.split(";") if x in by_id]
    return out


def training_pairs(retriever: Retriever, seed: int) -> tuple[list[tuple[str, str]], list[bool]]:
    """The verifier's training pairs, from the index's known questions: each answered one with its own entry (yes),
    the other entry the decision scores best and one of its entry's related entries (no); each unanswered one with
    the two entries the decision scores best (no). Candidates are scored as if each question were new."""
    known = retriever.stored.known
    if known is None or retriever.decision is None:
        raise DataFormatError(
            "training the verifier needs an index with known questions and a fitted entry decision — run "
            "`ohlora-rag build-index` (with --known-questions, without --no-calibrate)"
        )
    questions = [str(q) for q in known.questions]
    signals = retriever.signals(questions, known.vectors, skip_own=True)
    related = related_positions(retriever)
    texts: dict[int, str] = {}

    def text(position: int) -> str:
        if position not in texts:
            texts[position] = retriever.stored.entry(position)["text"]
        return texts[position]

    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, str]] = []
    labels: list[bool] = []
    for question, own, sig in zip(questions, known.positions.tolist(), signals):
        probability = retriever.decision.probability(sig.features())
        best = [int(sig.positions[i]) for i in np.argsort(-probability, kind="stable")[:TRAIN_CANDIDATES]]
        others = [p for p in best if p != own]
        if own >= 0:
            pairs.append(verifier_pair(question, text(own)))
            labels.append(True)
            picked = others[:1]
            look_alikes = [p for p in related.get(own, []) if p not in picked]
            if look_alikes:
                picked.append(look_alikes[int(rng.integers(len(look_alikes)))])
        else:
            picked = others[:2]
        for position in picked:
            pairs.append(verifier_pair(question, text(position)))
            labels.append(False)
    if all(labels) or not any(labels):
        raise DataFormatError("the index's known questions give the verifier only one kind of pair")
    return pairs, labels


def train_verifier(
    retriever: Retriever, encoder: ModelRef, out: Path, config: VerifierTrainConfig, progress: bool = False
) -> dict[str, Any]:
    """Train a verifier on the index's known questions (`training_pairs`) and write it to `out` (replaced only once
    complete). Returns the manifest written."""
    pairs, labels = training_pairs(retriever, config.seed)
    manifest = retriever.stored.manifest
    record = {
        "db": manifest.db,
        "corpus_hash": manifest.corpus_hash,
        "index": retriever.stored.folder.name,
        "known_questions": manifest.known_questions,
        "pairs": len(pairs),
        "answers": int(sum(labels)),
    }
    return train_pair_model(pairs, labels, encoder, out, config, VERIFIER, record, progress)


def out_of_fold(
    signals: Sequence[Signals], gold: Sequence[int | None], kinds: Sequence[str], calibrated_on: str, seed: int = 0
) -> list[np.ndarray]:
    """The decision's probabilities for each calibration question's candidates, from a decision fitted on the other
    folds (FOLDS): the verifier is weighed against the decision as it scores questions it has not seen."""
    n = len(signals)
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % FOLDS
    out: list[np.ndarray] = [np.zeros(0)] * n
    for f in range(FOLDS):
        inside = [i for i in range(n) if fold[i] != f]
        model = fit_decision(
            [signals[i] for i in inside], [gold[i] for i in inside], [kinds[i] for i in inside], calibrated_on
        )
        for i in np.flatnonzero(fold == f).tolist():
            out[i] = model.probability(signals[i].features())
    return out


def fit_verification(
    verifier: EntryVerifier,
    questions: Sequence[str],
    signals: Sequence[Signals],
    gold: Sequence[int | None],
    kinds: Sequence[str],
    text: Callable[[int], str],
    calibrated_on: str,
) -> Verification:
    """Choose how the verifier joins the decision, on a labelled calibration file: the number of candidates, the
    weight and the cutoff that maximise `Outcomes.utility` (as the decision's own cutoff does), the band outside
    which the decision alone settles a question (`_settled_band`), and the cutoff for a given entry that best
    separates each question's right entry from its best-scored wrong one.

    Args:
        questions, signals, gold, kinds: the calibration questions, their candidates' signals (scored as if new:
            `skip_own`), right entry positions (None: no entry answers) and kinds.
        text: an entry position -> its text.
    """
    probabilities = out_of_fold(signals, gold, kinds, calibrated_on)
    most = max(CANDIDATE_CHOICES)
    tops = [np.argsort(-p, kind="stable")[:most] for p in probabilities]
    pairs = [verifier_pair(q, text(int(s.positions[i]))) for q, s, top in zip(questions, signals, tops) for i in top]
    logits = verifier.logits(pairs)
    per_question = np.split(logits, np.cumsum([len(t) for t in tops])[:-1])
    best: tuple[float, Verification, list[int]] | None = None
    for candidates in CANDIDATE_CHOICES:
        for weight in WEIGHT_CHOICES:
            trial = Verification(weight, 0.0, candidates, 0.0)
            chosen, picked = [], []
            for s, p, top, v in zip(signals, probabilities, tops, per_question):
                combined = trial.scores(v[:candidates], p[top[:candidates]])
                i = int(np.argmax(combined))
                chosen.append((int(s.positions[top[i]]), float(combined[i])))
                picked.append(i)
            cutoff, utility = best_cutoff(chosen, gold, kinds)
            if best is None or utility > best[0] + 1e-12:
                trial.cutoff = cutoff
                # what the verified decision does with each question: 1 takes the decision's own best, else not
                taken = [int(i == 0 and score >= cutoff) for i, (_, score) in zip(picked, chosen)]
                declined = [int(score < cutoff) for _, score in chosen]
                best = (utility, trial, [t - d for t, d in zip(taken, declined)])
    assert best is not None
    verification, did = best[1], best[2]
    best_p = np.asarray([p[top[0]] for p, top in zip(probabilities, tops)])
    verification.sure_below, verification.sure_above = _settled_band(best_p, np.asarray(did), verification.cutoff)
    verification.entry_cutoff = _entry_cutoff(signals, gold, tops, per_question)
    verification.calibrated_on = calibrated_on
    settled = np.mean([verification.settled(float(p)) for p in best_p]) if len(best_p) else 0.0
    verification.metrics = {
        "utility": round(best[0], 6),
        "questions": len(questions),
        "settled": round(float(settled), 4),
    }
    return verification


def _settled_band(best: np.ndarray, did: np.ndarray, cutoff: float) -> tuple[float, float]:
    """Where the decision alone settles a question: below the lowest best-candidate probability of a calibration
    question the verified decision did not decline, above the highest of one where it did not take the decision's own
    best (declined, or took another candidate) — each narrowed by SETTLED_MARGIN in log-odds, and never across the
    cutoff (so a settled question is declined or taken as its probability says). `did` per question: 1 took the
    decision's best, -1 declined, 0 took another candidate."""

    def shifted(p: float, by: float) -> float:
        p = min(max(p, 1e-9), 1 - 1e-9)
        return 1.0 / (1.0 + math.exp(-(math.log(p / (1 - p)) + by)))

    kept, overruled = best[did != -1], best[did != 1]
    below = shifted(float(kept.min()), -SETTLED_MARGIN) if len(kept) else 0.0
    above = shifted(float(overruled.max()), SETTLED_MARGIN) if len(overruled) else 1.0
    return round(min(below, cutoff), 6), round(max(above, cutoff), 6)


def _entry_cutoff(
    signals: Sequence[Signals], gold: Sequence[int | None], tops: Sequence[np.ndarray], logits: Sequence[np.ndarray]
) -> float:
    """The verifier cutoff for a given entry: the best share of right entries passed minus wrong entries passed,
    over each question's right entry (when among its candidates) and its best-scored wrong one."""
    right, wrong = [], []
    for s, g, top, v in zip(signals, gold, tops, logits):
        positions = s.positions[top].tolist()
        if g in positions:
            right.append(float(v[positions.index(g)]))
        others = [float(x) for p, x in zip(positions, v.tolist()) if p != g]
        if others:
            wrong.append(others[0])
    if not right or not wrong:
        return 0.5
    r, w = np.asarray(right), np.asarray(wrong)
    cuts = np.unique(np.concatenate([r, w]))
    gain = [(r >= c).mean() - (w >= c).mean() for c in cuts]
    logit = float(cuts[int(np.argmax(gain))])
    return round(1.0 / (1.0 + math.exp(-logit)) - 1e-6, 6)
