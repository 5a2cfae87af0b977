"""Lexical retrieval: BM25 over the entries (bm25s, sparse matrices) with a tokenizer that handles Hangul.

Korean glues particles onto words ("유사도가", "유사도는"), so a Hangul word is indexed as itself and as its character
bigrams; Latin words are lower-cased, stripped of a plural "s" and of English stop words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LEXICAL_DIR = "bm25"

# words; a Hangul run and a Latin/digit run are separate words ("dropout이" -> "dropout", "이")
_WORD = re.compile(r"[\uac00-\ud7a3]+|[^\W\uac00-\ud7a3]+", re.UNICODE)
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "doing",
        "have",
        "has",
        "had",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "as",
        "and",
        "or",
        "but",
        "if",
        "then",
        "than",
        "so",
        "that",
        "this",
        "these",
        "those",
        "it",
        "its",
        "it's",
        "what",
        "whats",
        "which",
        "who",
        "whom",
        "how",
        "why",
        "when",
        "where",
        "can",
        "could",
        "should",
        "would",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "i",
        "me",
        "my",
        "we",
        "our",
        "you",
        "your",
        "he",
        "she",
        "they",
        "them",
        "their",
        "there",
        "here",
        "about",
        "into",
        "over",
        "under",
        "again",
        "also",
        "just",
        "only",
        "very",
        "too",
        "not",
        "no",
        "yes",
        "please",
        "tell",
        "explain",
        "mean",
        "means",
        "meaning",
        "vs",
        "versus",
        "difference",
        "between",
        "use",
        "used",
        "using",
        "work",
        "works",
        "does",
    ]
)


def tokenize(text: str) -> list[str]:
    """Lexical tokens of a text: words (stop words dropped, plural s stripped) and Hangul character bigrams."""
    tokens: list[str] = []
    for word in _WORD.findall(unicodedata.normalize("NFKC", text).lower()):
        if _HANGUL.search(word):
            tokens.append(word)
            tokens.extend(word[i : i + 2] for i in range(len(word) - 1))
        elif word not in _STOP and not word.isdigit() or len(word) > 1 and word.isdigit():
            tokens.append(word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word)
    return tokens


def entry_names(text: str) -> list[list[str]]:
    """An entry's names as token lists: the part before " : " split at parentheses, commas and slashes
    ("F1 score (F1, F-measure) : ..." -> [f1, score], [f1], [f, measure])."""
    head, sep, _ = text.partition(" : ")
    if not sep:
        return []
    names = [tokenize(part) for part in re.split(r"[(),/]", head)]
    return [n for n in names if n]


class LexicalIndex:
    """BM25 scores of a question against every entry."""

    def __init__(self, bm25: Any) -> None:
        self.bm25 = bm25
        self.vocab: dict[str, int] = bm25.vocab_dict

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        import bm25s

        bm25 = bm25s.BM25()
        bm25.index([tokenize(t) or [""] for t in texts], show_progress=False)
        return cls(bm25)

    @property
    def count(self) -> int:
        return int(self.bm25.scores["num_docs"])

    def scores(self, question: str) -> np.ndarray:
        """BM25 score of `question` against each entry: float32 (n,)."""
        ids = [self.vocab[t] for t in tokenize(question) if t in self.vocab]
        if not ids:
            return np.zeros(self.count, np.float32)
        return np.asarray(self.bm25.get_scores_from_ids(ids), dtype=np.float32)

    def save(self, folder: Path) -> None:
        self.bm25.save(str(folder / LEXICAL_DIR))

    @classmethod
    def load(cls, folder: Path) -> LexicalIndex:
        import bm25s

        return cls(bm25s.BM25.load(str(folder / LEXICAL_DIR)))
