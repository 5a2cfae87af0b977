"""QueryEngine = retriever + prompt builder + generator: a question in, an answer with its sources out.

The one way from a question to an answer: `ask`, `ask --file`, `chat`, `evaluate-answers` and the server all call
`QueryEngine.stream` (or `ask`, which waits for the whole). A stream is an iterator of text pieces:

    for piece in engine.stream("What is dropout?"):
        print(piece, end="")
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .answers import is_abstention
from .config import AskConfig, Paths, SearchConfig
from .conversation import Conversation
from .device import configure_threads
from .generator import Generator, LLMChoice, Reply, choose_llm
from .prompt import DECLINE, PromptBuilder
from .retriever import Hit, Retriever, SearchResult, check_question

#: The piece a stream adds when the guard replaced an answer (see AskConfig.guard).
GUARD_NOTE = "\n[replaced: nothing in the notes matched] "


class TextGenerator(Protocol):
    """What the engine needs of an LLM: its prompt builder, what was loaded, and a streamed generation.
    `Generator` (one answer at a time) and `batching.Batcher` (many at once) implement it; so do test fakes."""

    @property
    def prompts(self) -> PromptBuilder: ...

    @property
    def choice(self) -> LLMChoice: ...

    def start(
        self,
        prompt: str,
        max_new_tokens: int = AskConfig.max_new_tokens,
        temperature: float = AskConfig.temperature,
        seed: int | None = None,
    ) -> Reply: ...


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
    prompt_tokens: int = 0
    follow_up: bool = False  # retrieved for the conversation's topic (the question leaned on an earlier turn)
    query: str | None = None  # the text searched, when it was not the question alone

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
            "follow_up": self.follow_up,
            **({"query": self.query} if self.query else {}),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


class AnswerStream:
    """An answer on its way: iterate for the text pieces; `answer()` waits for the end and gives the `Answer`."""

    def __init__(
        self,
        engine: QueryEngine,
        question: str,
        result: SearchResult | None,
        used: Hit | None,
        reply: Reply,
        retrieve_seconds: float,
        follow_up: bool = False,
        query: str | None = None,
        max_new_tokens: int | None = None,
        rejected: bool = False,
    ) -> None:
        self.question = question
        self.rejected = rejected  # a given entry the entry verifier turned down (`QueryEngine.stream_with`)
        self.result = result
        self.used = used
        self.follow_up = follow_up
        self.query = query
        self.max_new_tokens = max_new_tokens  # the answer's token limit
        self._engine = engine
        self._reply = reply
        self._retrieve = retrieve_seconds
        self._answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        if self._answer is not None:
            return
        yield from self._reply
        answer = self._finish()
        if answer.guarded:
            yield GUARD_NOTE + DECLINE

    def cancel(self) -> None:
        """Stop generating (the learner went away)."""
        self._reply.cancel()

    def answer(self) -> Answer:
        """The whole answer; generated on this thread when the stream was not iterated (see `Reply.result`)."""
        if self._answer is None:
            self._reply.result()
        for _ in self:
            pass
        assert self._answer is not None
        return self._answer

    def _finish(self) -> Answer:
        generation = self._reply.result()
        config = self._engine.config
        text, guarded = generation.text, False
        # no entry found (with the guard on), or a given entry turned down: the reply must decline
        declining = (self.result is not None and config.guard) or self.rejected
        if self.used is None and declining and not is_abstention(text):
            text, guarded = DECLINE, True
        timings = {"load": self._engine.load_seconds, "retrieve": self._retrieve, "generate": generation.seconds}
        result = self.result
        self._answer = Answer(
            self.question,
            text,
            self.used,
            result.hits if result else [],
            result.threshold if result else None,
            generation.new_tokens,
            timings,
            guarded,
            result.cutoff if result else None,
            generation.prompt_tokens,
            self.follow_up,
            self.query,
        )
        return self._answer


def _answering_llm(choice: LLMChoice, config: AskConfig) -> tuple[TextGenerator, str | None]:
    """The LLM one-at-a-time answers come from: its ONNX copy (onnx_llm) where that serves — made now, from the
    torch model, when it is missing — else torch. Returns the generator and the copy's folder if made here."""
    from .device import gpu_possible

    if config.runtime != "auto" or config.dtype == "bfloat16" or gpu_possible():
        return Generator(choice, dtype=config.dtype), None
    from . import onnx_llm

    copy = onnx_llm.load(choice, config.dtype)
    if copy is not None:
        return copy, None
    llm = Generator(choice, dtype=config.dtype)
    folder = onnx_llm.export(llm)
    # sampled answers keep the torch model this run loaded anyway
    copy = onnx_llm.load(choice, config.dtype, sampler=llm) if folder is not None else None
    return (llm, None) if copy is None else (copy, str(folder))


class QueryEngine:
    """Retrieve (following the conversation), decide, build the prompt, generate. Models load once."""

    def __init__(
        self, retriever: Retriever | None, generator: TextGenerator, config: AskConfig, load_seconds: float = 0.0
    ) -> None:
        self.retriever = retriever
        self.generator = generator
        self.config = config
        self.load_seconds = load_seconds
        self.made_copy: str | None = None  # the LLM's ONNX copy, when this load made it (once per model)

    @classmethod
    def load(
        cls,
        config: AskConfig | None = None,
        paths: Paths | None = None,
        retrieve: bool = True,
        batch: int | None = None,
        retriever: Retriever | None = None,
    ) -> QueryEngine:
        """Load the index + encoder (unless `retrieve` is False: answers from given entries only) and the LLM;
        `batch` generates up to that many concurrent answers together (the server); `retriever`: one loaded already
        (its index checked before the LLM's load), used instead of loading another."""
        configure_threads()  # a no-op when the caller imported torch already
        config = config or AskConfig()
        paths = paths or Paths.resolve()
        start = time.perf_counter()
        if retriever is None and retrieve:
            retriever = Retriever.load(SearchConfig(top_k=config.top_k, threshold=config.threshold), paths)
        choice = choose_llm(config.base_llm, config.adapter, paths, config.template, config.use_adapter)
        if batch:
            from .batching import Batcher

            generator: TextGenerator = Batcher(Generator(choice, dtype=config.dtype), max_batch=batch)
            return cls(retriever, generator, config, time.perf_counter() - start)
        generator, made = _answering_llm(choice, config)
        engine = cls(retriever, generator, config, time.perf_counter() - start)
        engine.made_copy = made
        return engine

    @property
    def notice(self) -> str | None:
        return self.generator.choice.notice

    def conversation(self, history: Sequence[str] = ()) -> Conversation:
        """A conversation that has already asked the user questions in `history` (oldest first)."""
        assert self.retriever is not None, "this engine was loaded without retrieval"
        return Conversation.replay(self.retriever, history, self.config.top_k)

    def stream(
        self,
        question: str,
        conversation: Conversation | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> AnswerStream:
        """Start answering `question` (in `conversation`, when given: a follow-up retrieves for its topic).

        `max_new_tokens`, `temperature` and `seed` override the engine's settings for this answer (the server's
        per-request values)."""
        question = check_question(question)
        start = time.perf_counter()
        conversation = conversation if conversation is not None else self.conversation()
        result = conversation.search(question)
        turn = conversation.turns[-1]
        used = result.best
        limit = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        reply = self.generator.start(
            self.generator.prompts.prompt(question, used.text if used else None),
            limit,
            self.config.temperature if temperature is None else temperature,
            self.config.seed if seed is None else seed,
        )
        query = turn.query if turn.follow_up else None
        seconds = time.perf_counter() - start
        return AnswerStream(self, question, result, used, reply, seconds, turn.follow_up, query, limit)

    def ask(self, question: str, conversation: Conversation | None = None) -> Answer:
        """The whole answer to `question`."""
        return self.stream(question, conversation).answer()

    def stream_with(self, question: str, entry: str | None, verify: bool = False) -> AnswerStream:
        """Answer from a given entry (None: "no matching information"), no retrieval: for evaluating the LLM.

        `verify`: check the entry with the index's verified entry decision first (`Retriever.entry_fits`); one it
        turns down is answered as no information and the answer declines (the model's own decline, else the guard's),
        as `ask` declines a question no entry answers."""
        question = check_question(question)
        fits = self.retriever.entry_fits(question, entry) if verify and entry and self.retriever else None
        rejected = fits is False
        if rejected:
            entry = None
        reply = self.generator.start(
            self.generator.prompts.prompt(question, entry),
            self.config.max_new_tokens,
            self.config.temperature,
            self.config.seed,
        )
        return AnswerStream(self, question, None, None, reply, 0.0, rejected=rejected)
