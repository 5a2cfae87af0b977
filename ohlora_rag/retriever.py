"""Question -> hits: encode the question, search the index exactly, apply the threshold."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import FALLBACK_THRESHOLD, Paths, SearchConfig
from .encoder import Encoder
from .errors import IndexMismatchError, UsageError
from .index import StoredIndex, load_index
from .models import choose_encoder


@dataclass
class Hit:
    """One retrieved entry."""

    position: int
    id: str
    text: str
    score: float
    matched: bool  # score >= threshold
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchResult:
    """The hits for one question, best first."""

    question: str
    hits: list[Hit]
    threshold: float
    seconds: float

    @property
    def best(self) -> Hit | None:
        """The top hit if it clears the threshold, else None ('no matching information')."""
        return self.hits[0] if self.hits and self.hits[0].matched else None


def check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise UsageError('the question is empty — ask something, e.g. ohlora-rag search "What is cosine similarity?"')
    return question.strip()


class Retriever:
    """An index plus the encoder that built it."""

    def __init__(self, stored: StoredIndex, encoder: Encoder, threshold: float) -> None:
        self.stored = stored
        self.encoder = encoder
        self.threshold = threshold

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
        if threshold is None:
            threshold = manifest.threshold if manifest.threshold is not None else FALLBACK_THRESHOLD
        return cls(stored, Encoder(ref), threshold)

    def search(self, question: str, top_k: int = 3) -> SearchResult:
        """Top-k entries for one question."""
        return self.search_many([question], top_k)[0]

    def search_many(self, questions: Sequence[str], top_k: int = 3) -> list[SearchResult]:
        """Top-k entries for each question (one encoder batch, one Faiss call)."""
        cleaned = [check_question(q) for q in questions]
        start = time.perf_counter()
        vectors = self.encoder.encode_queries(cleaned)  # (nq, d)
        scores, positions = self.stored.vectors.search(vectors, top_k)  # (nq, k) each
        seconds = (time.perf_counter() - start) / max(len(cleaned), 1)
        results = []
        for question, row_scores, row_positions in zip(cleaned, scores, positions):
            hits = []
            for score, position in zip(row_scores.tolist(), row_positions.tolist()):
                if position < 0:
                    continue
                entry = self.stored.entry(position)
                hits.append(
                    Hit(
                        position=position,
                        id=str(entry.pop("id")),
                        text=entry.pop("text"),
                        score=float(score),
                        matched=score >= self.threshold,
                        metadata={k: v for k, v in entry.items() if k != "position" and v is not None},
                    )
                )
            results.append(SearchResult(question, hits, self.threshold, seconds))
        return results
