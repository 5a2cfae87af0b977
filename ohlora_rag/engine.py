"""QueryEngine = retriever + prompt builder + generator: a question in, an answer with its sources out."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import AskConfig, Paths, SearchConfig
from .evaluate import is_abstention
from .generator import Generator, choose_llm
from .prompt import DECLINE
from .retriever import Hit, Retriever, check_question


@dataclass
class Answer:
    """What `ask` returns."""

    question: str
    answer: str
    used: Hit | None  # the entry put into the prompt, or None ("no matching information")
    sources: list[Hit]
    threshold: float | None  # the cosine threshold, or None when the decision model decided (see `cutoff`)
    new_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    guarded: bool = False  # the model's reply to a no-information prompt did not decline and was replaced
    cutoff: float | None = None  # the decision model's probability cutoff, when it decided

    @property
    def declined(self) -> bool:
        """The tutor said its notes do not answer this: nothing matched, or the entry given did not fit."""
        return self.used is None or is_abstention(self.answer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "matched": self.used is not None,
            "source": {"id": self.used.id, "text": self.used.text, "score": round(self.used.score, 6)}
            if self.used
            else None,
            "sources": [{k: v for k, v in h.to_dict().items() if k != "metadata"} for h in self.sources],
            "scores": [round(h.score, 6) for h in self.sources],
            "decision": "model" if self.cutoff is not None else "threshold",
            "threshold": self.threshold,
            "cutoff": self.cutoff,
            "new_tokens": self.new_tokens,
            "guarded": self.guarded,
            "declined": self.declined,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


class QueryEngine:
    """Retrieve, apply the threshold, build the prompt, generate. Models are loaded once and reused."""

    def __init__(
        self, retriever: Retriever, generator: Generator, config: AskConfig, load_seconds: float = 0.0
    ) -> None:
        self.retriever = retriever
        self.generator = generator
        self.config = config
        self.load_seconds = load_seconds

    @classmethod
    def load(cls, config: AskConfig | None = None, paths: Paths | None = None) -> QueryEngine:
        config = config or AskConfig()
        paths = paths or Paths.resolve()
        start = time.perf_counter()
        retriever = Retriever.load(SearchConfig(top_k=config.top_k, threshold=config.threshold), paths)
        generator = Generator(choose_llm(config.base_llm, config.adapter, paths, config.template, config.use_adapter))
        return cls(retriever, generator, config, time.perf_counter() - start)

    @property
    def notice(self) -> str | None:
        return self.generator.choice.notice

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer one question (streaming pieces to `on_text` when given)."""
        question = check_question(question)
        start = time.perf_counter()
        result = self.retriever.search(question, self.config.top_k)
        retrieve = time.perf_counter() - start
        used = result.best
        prompt = self.generator.prompts.prompt(question, used.text if used else None)
        generation = self.generator.generate(
            prompt, self.config.max_new_tokens, self.config.temperature, self.config.seed, on_text=on_text
        )
        timings = {"load": self.load_seconds, "retrieve": retrieve, "generate": generation.seconds}
        text, guarded = generation.text, False
        if used is None and self.config.guard and not is_abstention(text):
            text, guarded = DECLINE, True
            if on_text:
                on_text(f"\n[replaced: nothing in the notes matched] {DECLINE}")
        return Answer(
            question, text, used, result.hits, result.threshold, generation.new_tokens, timings, guarded, result.cutoff
        )
