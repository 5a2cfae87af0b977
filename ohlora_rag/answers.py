"""What a generated answer is: an abstention or not, grounded in its entry or not, and how close to a reference.

Used by the engine (`Answer.declined`, the guard) and by `evaluate-answers`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from .data import SftRows

_ABSTAIN_PHRASES = (
    "no matching information",
    # the original Korean data's ways of declining: "can't find", "no information", "don't know", "look it up in ..."
    "찾을 수 없",
    "정보가 없",
    "모르겠",
    "알 수 없",
    "찾아보",
    "뭐였더라",
    "내용만 가지고",
)
_NEGATIONS = ("n't", " not ", "nothing", "outside", " no ", "only cover", "never")
_STOPWORDS = frozenset(
    [
        "about",
        "above",
        "after",
        "again",
        "against",
        "because",
        "before",
        "being",
        "below",
        "between",
        "both",
        "could",
        "does",
        "doing",
        "during",
        "each",
        "from",
        "further",
        "having",
        "here",
        "into",
        "itself",
        "more",
        "most",
        "other",
        "over",
        "same",
        "should",
        "some",
        "such",
        "than",
        "that",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "under",
        "until",
        "very",
        "what",
        "when",
        "where",
        "which",
        "while",
        "with",
        "would",
        "your",
        "using",
        "used",
        "uses",
        "makes",
        "make",
        "often",
        "usually",
        "like",
        "only",
        "also",
        "just",
        "the",
        "and",
        "for",
        "are",
        "its",
        "vs",
    ]
)


def is_abstention(answer: str) -> bool:
    """True when an answer says the tutor has no matching information: a first-person sentence that mentions the
    tutor's notes or information together with a negation ("my notes don't cover that", "I don't have any information on that"), or
    an explicit marker."""
    import re

    text = " " + answer.lower().replace("’", "'") + " "
    if any(p in text for p in _ABSTAIN_PHRASES):
        return True
    for sentence in re.split(r"[.!?]", text):
        padded = f" {sentence} "
        first_person = re.search(r"\b(i|i'm|i'd|i've|my|me)\b", padded)
        if (
            first_person
            and re.search(r"\b(notes?|information|info)\b", padded)
            and any(n in padded for n in _NEGATIONS)
        ):
            return True
    return False


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[\w'-]+", text.lower())


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 4 and word.endswith("s") else word


def key_terms(entry: str) -> tuple[list[list[str]], set[str]]:
    """An entry's names — the part before ' : ' split at parentheses, ' and ', ' vs ', commas — as word lists, and
    its explanation's content words (5+ letters, not stop words)."""
    import re

    head, _, body = entry.partition(" : ")
    names = []
    for part in re.split(r"[(),/]| and | vs\.? ", head.lower()):
        words = [_stem(w) for w in _words(part) if w not in _STOPWORDS]
        if words:
            names.append(words)
    content = {_stem(w) for w in _words(body) if len(w) >= 5 and w not in _STOPWORDS}
    return names, content


def _names(words: set[str], names: list[list[str]]) -> bool:
    return any(sum(w in words for w in name) * 2 >= len(name) for name in names)


def names_concept(text: str, entry: str) -> bool:
    """`text` names the entry's concept: it holds at least half the words of one of its names or aliases."""
    return _names({_stem(w) for w in _words(text)}, key_terms(entry)[0])


def is_grounded(answer: str, entry: str) -> bool:
    """The answer names the concept (`names_concept`) and uses at least one content word of the entry's
    explanation."""
    names, content = key_terms(entry)
    words = {_stem(w) for w in _words(answer)}
    return _names(words, names) and (not content or bool(content & words))


def copies_markup(answer: str) -> bool:
    """The answer carries the concept DB's markup into its prose: a "|" (what separates an entry's parts) or the
    "key idea:" label (the reference answers have neither)."""
    import re

    return "|" in answer or re.search(r"key idea\s*:", answer, re.IGNORECASE) is not None


def repeats_sentence(answer: str) -> bool:
    """The same sentence (lower-cased, at least three words) comes twice in the answer."""
    import re

    seen: set[tuple[str, ...]] = set()
    for sentence in re.split(r"(?<=[.!?])\s+", answer):
        words = tuple(_words(sentence))
        if len(words) < 3:
            continue
        if words in seen:
            return True
        seen.add(words)
    return False


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence)."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@dataclass
class AnswerMetrics:
    """How generated answers compare with the reference rows."""

    abstention_accuracy: float  # no-information rows answered with an abstention
    false_abstention: float  # rows whose entry answers the question, answered with an abstention
    grounding: float  # rows whose entry answers the question, answered naming the concept and using its explanation
    rouge_l: float  # mean ROUGE-L F1 against the reference answers
    retrieval_agreement: float | None  # full pipeline: share of rows whose retrieval decision matched the row
    rows: int
    no_info_rows: int
    seconds_per_answer: float
    examples: list[dict[str, object]]
    wrong_entry_declined: float = float("nan")  # rows given an entry that does not answer (reference declines)
    wrong_entry_rows: int = 0
    markup_copied: float = float("nan")  # answers that copy the entry's " | " or "key idea:" (`copies_markup`)
    repeated_sentence: float = float("nan")  # answers that say a sentence twice (`repeats_sentence`)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate_answers(
    generate: Callable[[str, str | None], str],
    rows: SftRows,
    retrieve: Callable[[str], str | None] | None = None,
    keep_examples: int = 6,
) -> AnswerMetrics:
    """Generate an answer per row and score it.

    A row with an entry whose reference answer declines (`is_abstention`) is a wrong-entry row: the entry does not
    answer the question, and the model should say so.

    Args:
        generate: (question, entry or None) -> answer text.
        rows: question, gold entry (None = no information), reference answer.
        retrieve: for the full pipeline, question -> retrieved entry text or None; None gives each row its own entry.
        keep_examples: how many (question, entry, answer) examples to keep in the report.
    """
    import time

    abstain_ok = abstain_n = false_abs = grounded = with_entry = agree = wrong_ok = wrong_n = markup = repeats = 0
    rouge_sum = 0.0
    kept: list[dict[str, object]] = []
    start = time.perf_counter()
    for q, gold, ref in zip(rows.questions, rows.entries, rows.answers):
        entry = retrieve(q) if retrieve else gold
        if retrieve:
            agree += int(entry == gold)
        answer = generate(q, entry)
        rouge_sum += rouge_l(answer, ref)
        markup += int(copies_markup(answer))
        repeats += int(repeats_sentence(answer))
        if gold is None:
            abstain_n += 1
            abstain_ok += int(is_abstention(answer))
        elif is_abstention(ref):
            wrong_n += 1
            wrong_ok += int(is_abstention(answer))
        else:
            with_entry += 1
            false_abs += int(is_abstention(answer))
            grounded += int(is_grounded(answer, gold))
        if len(kept) < keep_examples:
            kept.append({"question": q, "entry": entry, "answer": answer})
    n = len(rows)
    return AnswerMetrics(
        abstention_accuracy=abstain_ok / abstain_n if abstain_n else float("nan"),
        false_abstention=false_abs / with_entry if with_entry else float("nan"),
        grounding=grounded / with_entry if with_entry else float("nan"),
        rouge_l=rouge_sum / n if n else float("nan"),
        retrieval_agreement=agree / n if retrieve and n else None,
        rows=n,
        no_info_rows=abstain_n,
        seconds_per_answer=(time.perf_counter() - start) / max(n, 1),
        examples=kept,
        wrong_entry_declined=wrong_ok / wrong_n if wrong_n else float("nan"),
        wrong_entry_rows=wrong_n,
        markup_copied=markup / n if n else float("nan"),
        repeated_sentence=repeats / n if n else float("nan"),
    )
