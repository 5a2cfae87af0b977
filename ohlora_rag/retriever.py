"""Question -> hits: encode the question, search the index exactly, decide which entry (or none) answers it.

Two decisions: the index's fitted decision model over dense + BM25 + name signals (decision.py), used when the
index has one and no `--threshold` is given — its best few candidates re-scored with the entry verifier when the
index was built with one (verifier.py) — else the best cosine against a threshold (the original project's rule).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import FALLBACK_THRESHOLD, Paths, SearchConfig
from .crossencoder import LoadOnce
from .decision import CANDIDATES, DecisionModel, Signals
from .encoder import Encoder
from .errors import IndexMismatchError, OhloraError, UsageError
from .lexical import entry_names, tokenize
from .models import choose_encoder
from .store import StoredIndex, load_index

if TYPE_CHECKING:
    from .conversation import FollowModel
    from .judge import FollowJudge
    from .verifier import EntryVerifier, Verification


@dataclass
class Hit:
    """One retrieved entry."""

    position: int
    id: str
    text: str
    score: float  # cosine
    matched: bool  # chosen for the prompt, or would be: confidence >= cutoff (decision) / score >= threshold
    metadata: dict[str, Any] = field(default_factory=dict)
    confidence: float | None = None  # the decision model's probability that this is the right entry

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "score": round(self.score, 6), "matched": self.matched}
        if self.confidence is not None:
            out["confidence"] = round(self.confidence, 6)
        return {**out, "text": self.text, "metadata": self.metadata}


@dataclass
class SearchResult:
    """The hits for one question, best first."""

    question: str
    hits: list[Hit]
    threshold: float | None  # the cosine threshold; None when the decision model decided
    seconds: float
    cutoff: float | None = None  # the decision model's probability cutoff, when it decided
    decided: SearchResult | None = None  # the same search before the entry verifier re-scored it, when it did

    @property
    def unverified(self) -> SearchResult:
        """The search as the entry decision alone scored it: what the follow-up model and judge read (they were
        fitted on it, and re-scoring every conversation turn while fitting would take minutes)."""
        return self.decided if self.decided is not None else self

    @property
    def decision(self) -> str:
        return "model" if self.cutoff is not None else "threshold"

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "decision": self.decision,
            "threshold": self.threshold,
            "cutoff": self.cutoff,
            "matched": self.best is not None,
            "hits": [h.to_dict() for h in self.hits],
            "seconds": round(self.seconds, 6),
        }

    @property
    def best(self) -> Hit | None:
        """The top hit if it clears the threshold, else None ('no matching information')."""
        return self.hits[0] if self.hits and self.hits[0].matched else None


def check_question(question: str) -> str:
    """The question stripped; an empty one, or one with bytes that are not UTF-8, is a UsageError."""
    if not isinstance(question, str) or not question.strip():
        raise UsageError('the question is empty — ask something, e.g. ohlora-rag search "What is cosine similarity?"')
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as exc:  # undecodable argv / stdin bytes arrive as lone surrogates (surrogateescape)
        char = ord(question[exc.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise UsageError(
            f"the question is not valid UTF-8 ({what} at position {exc.start + 1}) — type it again, or set a UTF-8 "
            "locale for the terminal"
        ) from None
    return question.strip()


#: Query vectors a retriever remembers (1.5 KB each at 384 dimensions): the server replays a conversation's earlier
#: questions on every request (each searched alone and with the topic: two vectors a question). Remembered, a
#: 20-question history replays in about 28 ms instead of 0.4 s; 64 (before) kept one such conversation, 1024 keep
#: about 25 learners' conversations at once.
RECENT_VECTORS = 1024
#: Entries whose mean cosines make a DB's "typical entry" for `Retriever.relatedness` (all of them, up to this many).
TYPICAL_SAMPLE = 4096


class Retriever:
    """An index plus the encoder that built it, and the decision: a fitted model, else a cosine threshold."""

    def __init__(
        self,
        stored: StoredIndex,
        encoder: Encoder,
        threshold: float,
        decision: DecisionModel | None = None,
        top_k: int = SearchConfig.top_k,
        follow: FollowModel | None = None,
        verification: Verification | None = None,
        verifier: EntryVerifier | None = None,
    ) -> None:
        self.stored = stored
        self.top_k = top_k  # entries a search returns unless it asks for another number
        self.encoder = encoder
        self.threshold = threshold
        self.decision = decision if stored.lexical is not None and stored.stats is not None else None
        self.follow = follow if self.decision is not None else None  # fitted on the decision's probabilities
        self.verification = verification if self.decision is not None else None
        self._names: dict[int, list[set[str]]] = {}
        self._recent: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._typical_mean: float | None = None
        self._known_index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._words: dict[int, set[str]] = {}  # entry position -> its text's lexical tokens
        self._known_words: dict[int, Counter[str]] | None = (
            None  # entry -> how many of its known questions have a token
        )
        self.paths: Paths | None = None  # where the pair models are looked for (set by `load`)
        self._judge: LoadOnce[FollowJudge] = LoadOnce(self._load_judge)
        self._verifier: LoadOnce[EntryVerifier] = LoadOnce(self._load_verifier, verifier)
        self._text_positions: dict[str, int] | None = None

    @classmethod
    def load(cls, config: SearchConfig | None = None, paths: Paths | None = None) -> Retriever:
        """Load the published index and its encoder; refuse an index built with a different encoder.

        Threshold: `config.threshold`, else the index's calibrated value, else FALLBACK_THRESHOLD.
        """
        config = config or SearchConfig()
        paths = paths or Paths.resolve()
        stored = load_index(paths.index_dir)
        ref = choose_encoder(config.encoder, paths)
        manifest = stored.manifest
        if ref.fingerprint != manifest.encoder_fingerprint:
            raise IndexMismatchError(
                f"the index at {paths.index_dir} was built with encoder {manifest.encoder} "
                f"(fingerprint {manifest.encoder_fingerprint}), but search would use {ref.reference} "
                f"(fingerprint {ref.fingerprint}) — run `ohlora-rag build-index` to rebuild it"
            )
        threshold = config.threshold
        decision = follow = verification = None
        if threshold is None:
            threshold = manifest.threshold if manifest.threshold is not None else FALLBACK_THRESHOLD
            where = str(stored.folder / "manifest.json")
            if manifest.decision is not None:
                decision = DecisionModel.from_dict(manifest.decision, where)
            if manifest.follow is not None:
                from .conversation import FollowModel

                follow = FollowModel.from_dict(manifest.follow, where)
            if manifest.verify is not None:
                from .verifier import Verification

                verification = Verification.from_dict(manifest.verify, where)
        encoder = Encoder(ref, cache=paths.cache_dir)
        retriever = cls(stored, encoder, threshold, decision, config.top_k, follow, verification)
        retriever.paths = paths
        return retriever

    def positions_by_id(self) -> dict[str, int]:
        """Each entry's id and its position in the index."""
        return {str(self.stored.entry(i)["id"]): i for i in range(self.stored.vectors.ntotal)}

    def preload(self) -> None:
        """Start loading the entry verifier and the follow-up judge (`entry_verifier`, `follow_judge`) in a background
        thread (5 s here), so the first question does not wait for them."""
        if (self.verification is not None and not self._verifier.tried) or (self.uses_judge and not self._judge.tried):
            threading.Thread(target=self.load_pair_models, name="ohlora-pair-models", daemon=True).start()

    def load_pair_models(self) -> None:
        """Load the entry verifier and the follow-up judge now, when the index uses them."""
        self.entry_verifier()
        self.follow_judge()

    def entry_verifier(self) -> EntryVerifier | None:
        """The entry verifier (`verifier.py`) when the index's decision uses one, loaded on first use: models/verifier/
        if trained, else the shipped one. None when the decision uses none, or it cannot be loaded — then the decision
        decides alone (one warning)."""
        return self._verifier.get() if self.verification is not None else None

    def _load_verifier(self) -> EntryVerifier | None:
        from .verifier import load_verifier

        return load_verifier(self.paths or Paths.resolve(), self.stored.manifest.corpus_hash)

    @property
    def uses_judge(self) -> bool:
        """Whether the index's follow-up model is combined with the follow-up judge."""
        return self.follow is not None and self.follow.judge is not None

    def follow_judge(self) -> FollowJudge | None:
        """The follow-up judge (`judge.py`) when the index's follow-up model uses one, loaded on first use:
        models/judge/ if trained, else the shipped one. None when the model uses none, or the judge cannot be loaded
        — then the follow-up model decides alone (one warning)."""
        return self._judge.get() if self.uses_judge else None

    def _load_judge(self) -> FollowJudge | None:
        from .judge import load_judge

        return load_judge(self.paths or Paths.resolve(), self.encoder.ref.reference)

    def entry_fits(self, question: str, entry: str) -> bool | None:
        """Whether an entry given from outside passes the verified decision for this question: an entry of the index
        is scored as a candidate would be (its decision probability joined with the verifier's logit, against the
        verified cutoff; an entry that is not among the question's candidates has probability 0); another text by
        the verifier alone (`Verification.entry_cutoff`). None when the index uses no verifier."""
        verifier = self.entry_verifier()
        if verifier is None or self.verification is None or self.decision is None:
            return None
        from .verifier import verifier_pair

        logit = float(verifier.logits([verifier_pair(question, entry)])[0])
        position = self._position_of(entry)
        if position is None:
            return self.verification.entry_passes(logit)
        sig = self.signals([question], self._vectors(check_question(question)))[0]
        at = np.flatnonzero(sig.positions == position)
        probability = float(self.decision.probability(sig.features())[at[0]]) if len(at) else 0.0
        combined = self.verification.scores(np.asarray([logit]), np.asarray([probability]))
        return bool(combined[0] >= self.verification.cutoff)

    def _position_of(self, text: str) -> int | None:
        """The position of the entry with exactly this text, if any."""
        if self._text_positions is None:
            n = self.stored.vectors.ntotal
            self._text_positions = {str(self.stored.entry(i)["text"]): i for i in range(n)}
        return self._text_positions.get(text)

    def search(self, question: str, top_k: int | None = None, verify: bool = True) -> SearchResult:
        """Top-k entries for one question (k: the loaded config's `top_k` unless given); `verify=False`: as the entry
        decision alone scores them, even when the index has an entry verifier."""
        return self.search_many([question], top_k, verify=verify)[0]

    def search_many(
        self,
        questions: Sequence[str],
        top_k: int | None = None,
        vectors: np.ndarray | None = None,
        verify: bool = True,
    ) -> list[SearchResult]:
        """Top-k entries for each question (one encoder batch, one Faiss call); `vectors`: their query vectors
        (nq, d), when already encoded."""
        top_k = self.top_k if top_k is None else top_k
        cleaned = [check_question(q) for q in questions]
        start = time.perf_counter()
        if vectors is None:
            vectors = self._vectors(cleaned[0]) if len(cleaned) == 1 else self.encoder.encode_queries(cleaned)
        if not np.isfinite(vectors).all():
            raise OhloraError(
                f"encoder {self.encoder.ref.reference} returned non-finite vectors for the question — check the "
                "model folder, or retrain it with `ohlora-rag train-sbert`"
            )
        if self.decision is not None:
            return self._decide(cleaned, vectors, top_k, start, verify)
        scores, positions = self.stored.search(vectors, top_k)  # (nq, k) each
        seconds = (time.perf_counter() - start) / max(len(cleaned), 1)
        results = []
        for question, row_scores, row_positions in zip(cleaned, scores, positions):
            hits = []
            for score, position in zip(row_scores.tolist(), row_positions.tolist()):
                if position < 0:
                    continue
                hits.append(self._hit(position, float(score), score >= self.threshold))
            results.append(SearchResult(question, hits, self.threshold, seconds))
        return results

    def _hit(self, position: int, score: float, matched: bool, confidence: float | None = None) -> Hit:
        entry = self.stored.entry(position)
        return Hit(
            position=position,
            id=str(entry.pop("id")),
            text=entry.pop("text"),
            score=score,
            matched=bool(matched),
            metadata={k: v for k, v in entry.items() if k != "position" and v is not None},
            confidence=confidence,
        )

    def _decide(
        self, questions: list[str], vectors: np.ndarray, top_k: int, start: float, verify: bool = True
    ) -> list[SearchResult]:
        """Score each question's candidates with the decision model — its best few re-scored with the entry verifier
        when the index uses one — and order the hits by that probability."""
        assert self.decision is not None
        signals = self.signals(questions, vectors)
        probabilities = [self.decision.probability(sig.features()) for sig in signals]  # (c,) each
        orders = [np.argsort(-prob, kind="stable") for prob in probabilities]
        seconds = (time.perf_counter() - start) / max(len(questions), 1)
        decided = self._results(questions, signals, probabilities, orders, top_k, self.decision.cutoff, seconds)
        verifier = self.entry_verifier() if verify else None
        if verifier is None or self.verification is None:
            return decided
        probabilities, orders = self._verify(verifier, self.verification, questions, signals, probabilities, orders)
        seconds = (time.perf_counter() - start) / max(len(questions), 1)
        verified = self._results(questions, signals, probabilities, orders, top_k, self.verification.cutoff, seconds)
        for result, before in zip(verified, decided):
            result.decided = before
        return verified

    def _results(
        self,
        questions: list[str],
        signals: list[Signals],
        probabilities: list[np.ndarray],
        orders: list[np.ndarray],
        top_k: int,
        cutoff: float,
        seconds: float,
    ) -> list[SearchResult]:
        results = []
        for question, sig, prob, order in zip(questions, signals, probabilities, orders):
            hits = [
                self._hit(int(sig.positions[i]), float(sig.cosine[i]), prob[i] >= cutoff, float(prob[i]))
                for i in order[:top_k]
            ]
            results.append(SearchResult(question, hits, None, seconds, cutoff))
        return results

    def _verify(
        self,
        verifier: EntryVerifier,
        verification: Verification,
        questions: list[str],
        signals: list[Signals],
        probabilities: list[np.ndarray],
        orders: list[np.ndarray],
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The decision's best `verification.candidates` candidates of each question re-scored with the verifier (one
        batch for all questions) and put first, best first; the others follow in the decision's order, never
        matched. A question the decision alone settles (`Verification.settled`) keeps its best candidate's
        probability, unverified."""
        from .verifier import verifier_pair

        n = verification.candidates
        settled = [verification.settled(float(prob[order[0]])) for prob, order in zip(probabilities, orders)]
        pairs = [
            verifier_pair(q, self.stored.entry(int(sig.positions[i]))["text"])
            for q, sig, order, sure in zip(questions, signals, orders, settled)
            if not sure
            for i in order[:n]
        ]
        logits = verifier.logits(pairs) if pairs else np.zeros(0)
        new_probabilities, new_orders = [], []
        offset = 0
        for prob, order, sure in zip(probabilities, orders, settled):
            top = order[: 1 if sure else n]
            if sure:
                combined = prob[top]
            else:
                combined = verification.scores(logits[offset : offset + len(top)], prob[top])
                offset += len(top)
            # the rest: below the re-scored ones and the cutoff, so never matched and never ranked above them
            rescored = np.minimum(prob, np.nextafter(min(float(combined.min()), verification.cutoff), 0.0))
            rescored[top] = combined
            new_probabilities.append(rescored)
            new_orders.append(np.concatenate([top[np.argsort(-combined, kind="stable")], order[len(top) :]]))
        return new_probabilities, new_orders

    def signals(
        self, questions: Sequence[str], vectors: np.ndarray | None = None, skip_own: bool = False
    ) -> list[Signals]:
        """Each question's candidates — its dense top entries, its BM25 top entries and the entries of its nearest
        known questions — with their signals.

        Args:
            questions: the questions as asked.
            vectors: their query vectors, float32 (nq, d); None encodes them with this retriever's encoder.
            skip_own: ignore a known question identical to the question itself (fitting the decision on the very
                questions the index holds as known questions, each must be scored as if it were new).
        """
        if vectors is None:
            vectors = self.encoder.encode_queries(list(questions))
        stored = self.stored
        if stored.lexical is None or stored.stats is None:
            raise UsageError("this index has no lexical part — rebuild it with `ohlora-rag build-index`")
        n = stored.vectors.ntotal
        k = min(n, CANDIDATES)
        dense_scores, dense_positions = stored.search(vectors, k)  # (nq, k) each
        mu, sigma = stored.stats.mu_sigma(vectors)  # (nq,) each
        known = stored.known
        known_scores = None if known is None else vectors @ known.vectors.T  # (nq, m)
        out = []
        for i, question in enumerate(questions):
            # skip_own: the known questions identical to this one (as if it were new: neither their keys nor words)
            own = (known.questions == question) & skip_own if known is not None else np.zeros(0, bool)
            bm = stored.lexical.scores(question)  # (n,)
            lexical = np.argpartition(-bm, k - 1)[:k] if k < n else np.arange(n)
            dense = [int(p) for p in dense_positions[i] if p >= 0]
            seen = set(dense)
            extra = [int(p) for p in lexical if bm[p] > 0 and int(p) not in seen]
            seen.update(extra)
            best: dict[int, float] = {}  # entry position -> best cosine to its known questions
            unanswerable = 0.0
            if known is not None and known_scores is not None:
                row = known_scores[i].astype(np.float64)
                if skip_own:
                    row = np.where(own, -1.0, row)
                entries, inverse, answered = self._known_entries()
                unanswerable = float(row[~answered].max(initial=0.0))
                per_entry = np.full(len(entries), -1.0)
                np.maximum.at(per_entry, inverse, row[answered])
                best = dict(zip(entries.tolist(), per_entry.tolist()))
                top = np.argsort(-per_entry, kind="stable")[:k]
                extra += [p for p in entries[top].tolist() if p not in seen]
            positions = np.asarray(dense + extra, dtype=np.int64)
            cosine = np.concatenate(
                [dense_scores[i][: len(dense)], stored.vectors.vectors_at(np.asarray(extra)) @ vectors[i]]
            )
            stored.check_cosines(cosine)
            tokens = tokenize(question)
            words = set(tokens)
            name = np.asarray([self._name_match(words, int(p)) for p in positions], dtype=np.float64)
            skipped = Counter(known.positions[own].tolist()) if known is not None else Counter()
            coverage = np.asarray(
                [self._coverage(tokens, int(p), skipped[int(p)]) for p in positions], dtype=np.float64
            )
            near = None if known is None else np.asarray([best.get(int(p), -1.0) for p in positions])
            out.append(
                Signals(
                    positions,
                    cosine,
                    bm[positions],
                    name,
                    float(mu[i]),
                    float(sigma[i]),
                    float(bm.max()),
                    near,
                    unanswerable,
                    coverage,
                )
            )
        return out

    def _coverage(self, tokens: list[str], position: int, skipped: int = 0) -> float:
        """Share of the question's tokens found in the entry's text or in one of its known questions (`skipped`: how
        many of those are the question itself, left out as `skip_own` asks — each has every one of its tokens)."""
        if not tokens:
            return 0.0
        words = self._words.get(position)
        if words is None:
            words = self._words[position] = set(tokenize(self.stored.entry(position)["text"]))
        known = self._known_counts().get(position, Counter())
        return sum(token in words or known[token] > skipped for token in tokens) / len(tokens)

    def _known_counts(self) -> dict[int, Counter[str]]:
        """Per entry, how many of its known questions contain each token; once per index."""
        if self._known_words is None:
            counts: dict[int, Counter[str]] = {}
            known = self.stored.known
            if known is not None:
                for question, position in zip(known.questions.tolist(), known.positions.tolist()):
                    if position >= 0:
                        counts.setdefault(int(position), Counter()).update(set(tokenize(str(question))))
            self._known_words = counts
        return self._known_words

    def _known_entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries that have known questions (positions, sorted), per answered known question the index of its
        entry among them, and which known questions an entry answers (bool, per known question); once per index."""
        if self._known_index is None:
            assert self.stored.known is not None
            positions = self.stored.known.positions
            answered = positions >= 0
            entries, inverse = np.unique(positions[answered], return_inverse=True)
            self._known_index = (entries.astype(np.int64), inverse.reshape(-1), answered)
        return self._known_index

    def relatedness(self, question: str, position: int) -> tuple[float, float]:
        """How the question relates to one entry and to the DB as a whole.

        Returns:
            z: how far above the question's mean cosine over the whole DB its cosine to the entry lies, in standard
               deviations;
            domain: the question's mean cosine over the DB relative to a typical entry's (about 1 for a question in
               the DB's field, lower for one about something else).
            Both are 0 for an index without score statistics.
        """
        return self.relatedness_of(self._vectors(question), position)

    def relatedness_of(self, vector: np.ndarray, position: int) -> tuple[float, float]:
        """`relatedness` for a query vector (1, d) already encoded."""
        stats = self.stored.stats
        if stats is None:
            return 0.0, 0.0
        cosine = float((self.stored.vectors.vectors_at(np.asarray([position])) @ vector[0])[0])
        mu, sigma = stats.mu_sigma(vector)
        if self._typical_mean is None:  # once per index; over at most TYPICAL_SAMPLE evenly spaced entries
            n = self.stored.vectors.ntotal
            sample = np.unique(np.linspace(0, n - 1, min(n, TYPICAL_SAMPLE)).astype(np.int64))
            self._typical_mean = float(np.median(stats.mu_sigma(self.stored.vectors.vectors_at(sample))[0]))
        return (cosine - float(mu[0])) / float(sigma[0]), float(mu[0]) / max(self._typical_mean, 1e-6)

    def coverage(self, question: str, position: int) -> float:
        """Share of the question's words found in the entry's text or in one of its known questions."""
        return self._coverage(tokenize(question), position)

    def query_vector(self, question: str) -> np.ndarray:
        """The question's query vector (1, d); free right after `search(question)`."""
        return self._vectors(check_question(question))

    def _vectors(self, question: str) -> np.ndarray:
        """The question's query vector, (1, d), remembered for the last RECENT_VECTORS questions (a conversation asks
        twice, and the server replays its history on every request)."""
        with self._lock:
            vector = self._recent.get(question)
        if vector is None:
            vector = self.encoder.encode_queries([question])
            with self._lock:
                if len(self._recent) >= RECENT_VECTORS:
                    self._recent.pop(next(iter(self._recent)))
                self._recent[question] = vector
        return vector

    def names(self, question: str, position: int) -> float:
        """Share of the entry's best-covered name (or alias) that the question contains (1.0: it names the entry)."""
        return self._name_match(set(tokenize(question)), position)

    def _name_match(self, words: set[str], position: int) -> float:
        """Share of the entry's best-covered name (or alias) that the question's tokens contain."""
        names = self._names.get(position)
        if names is None:
            names = self._names[position] = [set(n) for n in entry_names(self.stored.entry(position)["text"])]
        return max((len(n & words) / len(n) for n in names), default=0.0)
