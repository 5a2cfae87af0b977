"""Follow-up questions: "how is it computed?" retrieves for the conversation's topic; a new question does not.

A learner's follow-up leans on the previous turn ("what are its drawbacks?", "그럼 단점은?", "example?"): alone it
matches nothing, or the wrong entry. A question that names its own topic ("and what is recall?") is a topic
switch and must not be dragged back. The rule, per turn, once the conversation has a topic:

1. search the question alone; if its best entry is one the question names (title or alias) other than the topic,
   or it matched with `CONFIDENT` probability, it is a new question;
2. a question far from the DB's field (its mean cosine over the DB below `IN_FIELD` of a typical entry's: world
   news, cooking) is a new question too, whatever words it uses;
3. otherwise it follows the topic when it points back (a pronoun or opener in English or Korean — "it", "that",
   "그럼", "그거" — or at most `SHORT_QUESTION` content words) or lies close to the topic's entry (z-score of its
   cosine to that entry among its cosines to the whole DB at least `RELATED`): the topic's text and the question
   are searched together, and that result is kept when it matches;
4. else the question's own result stands (which may be "nothing matched").

The constants were tuned on data/conversations_dev.jsonl; data/conversations_holdout.jsonl measures them
(`ohlora-rag evaluate-conversations`, README).

The topic is carried as the text that found it (the question that set it, joined with the follow-ups on it), so
a chain of follow-ups stays on topic. `chat` and the server's `messages` history use the same `Conversation`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .lexical import tokenize
from .retriever import Retriever, SearchResult

#: A question with at most this many content words leans on the previous turn ("example?", "단점은?").
SHORT_QUESTION = 1
#: A question matched alone with this decision probability is self-contained even if it starts like a follow-up.
CONFIDENT = 0.9
#: z-score of the question's cosine to the topic's entry, among its cosines to the whole DB, above which it is about
#: the topic even without a word pointing back ("lower is better, right?" after log loss).
RELATED = 0.5
#: A question whose mean cosine over the DB is below this share of a typical entry's is not about the DB's field
#: (world news, cooking): never a follow-up, whatever words it uses.
#: RELATED and IN_FIELD were chosen for the shipped tutor encoder on data/conversations_dev.jsonl and
#: data/conversations_tune.jsonl together (the best mean of follow-ups right and switches not dragged back over a grid
#: of 0.5-2.0 x 0.6-0.8: 0.897 at 0.5 / 0.8 vs 0.885 at the previous encoder's 1.0 / 0.6); never on the holdouts.
IN_FIELD = 0.8

#: Words that stand for the topic: a question with one is about the topic even when it names another entry
#: ("why does it cause vanishing gradients?" after sigmoid).
_POINTS_BACK = re.compile(
    r"\b(it|its|it's|itself|this|that|these|those|they|them|their|the former|the latter|the same|there)\b"
    r"|(그거|그것|그건|그게|그걸|이거|이것|이건|이게|저거|걔|거기|여기서)",
    re.IGNORECASE,
)
#: Openers and question shapes that lean on the previous turn without a pronoun.
_LEANS_BACK = re.compile(
    r"\b(what about|how about|and|also|then|so|why|how come|example|examples|e\.g|formula|drawbacks?|downsides?|"
    r"pros|cons|advantages?|disadvantages?|instead|else|more|vs)\b"
    r"|(그럼|그러면|그래서|왜|예시|예를|단점|장점|공식|어떻게|종류|\s더\s)",
    re.IGNORECASE,
)


def points_back(question: str) -> bool:
    """True when the question has a word standing for the topic ("it", "that", "그거")."""
    return bool(_POINTS_BACK.search(question))


def refers_back(question: str) -> bool:
    """True when the question reads like a follow-up: a word pointing back, an opener, or very few words."""
    return points_back(question) or bool(_LEANS_BACK.search(question)) or len(tokenize(question)) <= SHORT_QUESTION


@dataclass
class Turn:
    """How one question was retrieved for."""

    question: str
    query: str  # the text searched: the question, or the topic's text + the question for a follow-up
    result: SearchResult
    follow_up: bool


@dataclass
class Conversation:
    """The retrieval side of a conversation: the topic so far, and how each question was searched."""

    retriever: Retriever
    top_k: int | None = None  # None: the retriever's
    turns: list[Turn] = field(default_factory=list)
    topic: str | None = None  # the text that found the current topic's entry
    topic_position: int | None = None  # that entry's position in the index

    @classmethod
    def replay(cls, retriever: Retriever, questions: Iterable[str], top_k: int | None = None) -> Conversation:
        """A conversation that has already asked `questions` (the user turns of a chat history)."""
        conversation = cls(retriever, top_k)
        for question in questions:
            conversation.search(question)
        return conversation

    def search(self, question: str) -> SearchResult:
        """Retrieve for the next question, following the topic when the question leans on it."""
        alone = self.retriever.search(question, self.top_k)
        turn = Turn(question, question, alone, False)
        if self.topic is not None and self.topic_position is not None and self._leans_on_topic(question, alone):
            query = f"{self.topic} {question}"
            together = self.retriever.search(query, self.top_k)
            if together.best is not None:
                turn = Turn(question, query, together, True)
        self.turns.append(turn)
        if turn.follow_up:
            self.topic = turn.query
        elif turn.result.hits:
            # a new question sets the topic, matched or not ("recall이 뭐야?" then "how is it computed?")
            self.topic, self.topic_position = question, turn.result.hits[0].position
        return turn.result

    def _leans_on_topic(self, question: str, alone: SearchResult) -> bool:
        assert self.topic_position is not None
        top = alone.hits[0] if alone.hits else None
        if (
            top is not None
            and top.position != self.topic_position
            and not points_back(question)
            and self.retriever.names(question, top.position) >= 1.0
        ):
            return False  # names another entry: a new question ("and what is recall?", "word2vec은 뭐야?")
        if top is not None and top.matched and top.confidence is not None and top.confidence >= CONFIDENT:
            return False  # matches an entry beyond doubt on its own
        related, domain = self.retriever.relatedness(question, self.topic_position)
        if domain < IN_FIELD:
            return False  # about something else altogether ("who directed Parasite?")
        return refers_back(question) or related >= RELATED
