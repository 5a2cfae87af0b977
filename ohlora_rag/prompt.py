"""The one prompt builder, used by BOTH training and inference, so the model is asked exactly as it was taught.

Templates:
- `chat`  — the tokenizer's chat template: system = the tutor persona; user = the retrieved entry (or the
            no-information marker) and the question. The default when the tokenizer has a chat template.
- `plain` — a plain-text layout for tokenizers without one.
- `seed`  — the original project's exact Korean format: `(제공된 정보) {entry} (사용자 질문) {question}`, the answer after
            ` (답변 시작) ### 답변: ` and closed by ` (답변 종료)`.

Every prompt ends on a token boundary (the seed format's space before the answer is part of the completion), so the
tokens of prompt + completion start with exactly the tokens of the prompt alone; `train-llm` checks this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import TEMPLATES
from .errors import UsageError

PERSONA = (
    "You are Oh-LoRA, a warm machine-learning tutor. Answer in two or three short sentences using only the given "
    "information. If none is given, say kindly that your notes do not cover it and suggest where to look; never invent facts."
)
NO_INFO = "No matching information was found in the tutor's notes."
#: What `ask` says when nothing matched and the model did not decline by itself (see AskConfig.guard).
DECLINE = (
    "I'm sorry, my notes don't cover that, so I won't guess. A search engine, an encyclopedia or the official "
    "documentation of the tool you're asking about would be a better place to look."
)
SEED_NO_INFO = "알맞은 정보를 찾을 수 없음"
#: Values of a training table's entry column that mean "no matching information".
NO_INFO_MARKERS = frozenset({"", NO_INFO, SEED_NO_INFO})

SEED_ANSWER_START = " (답변 시작) ### 답변:"  # the space before the answer belongs to the completion (token boundary)
SEED_ANSWER_END = " (답변 종료)"


@dataclass(frozen=True)
class PromptBuilder:
    """Builds prompts and training completions for one tokenizer and template."""

    tokenizer: Any
    template: str

    @classmethod
    def create(cls, tokenizer: Any, template: str = "auto") -> PromptBuilder:
        if template not in TEMPLATES:
            raise UsageError(f"--template {template}: choose one of {', '.join(TEMPLATES)}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "auto":
            template = "chat" if has_chat else "plain"
        if template == "chat" and not has_chat:
            raise UsageError("--template chat: this tokenizer has no chat template — use --template plain or seed")
        if tokenizer.eos_token is None:
            raise UsageError("the LLM's tokenizer defines no EOS token — generation could not stop; use another model")
        return cls(tokenizer, template)

    def prompt(self, question: str, entry: str | None) -> str:
        """The text the model continues: everything before the answer.

        Args:
            question: the learner's question.
            entry: the retrieved entry, or None when nothing cleared the threshold.
        """
        question = question.strip()
        info = entry.strip() if entry and entry.strip() not in NO_INFO_MARKERS else None
        if self.template == "seed":
            return f"(제공된 정보) {info or SEED_NO_INFO} (사용자 질문) {question}{SEED_ANSWER_START}"
        context = info or NO_INFO
        if self.template == "plain":
            return f"{PERSONA}\n\n### Information:\n{context}\n\n### Question:\n{question}\n\n### Answer:\n"
        messages = [
            {"role": "system", "content": PERSONA},
            {"role": "user", "content": f"Information: {context}\n\nQuestion: {question}"},
        ]
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def completion(self, answer: str) -> str:
        """The training target after the prompt: the answer, its closing marker (seed) and the EOS token."""
        answer = answer.strip()
        if self.template == "seed":
            answer = f" {answer}{SEED_ANSWER_END}"
        return answer + self.tokenizer.eos_token

    @property
    def stop_strings(self) -> list[str]:
        """Extra strings that end generation besides EOS."""
        return [SEED_ANSWER_END] if self.template == "seed" else []

    def clean(self, generated: str) -> str:
        """Cut a generated continuation at the first stop marker."""
        for stop in [*self.stop_strings, self.tokenizer.eos_token]:
            generated = generated.split(stop, 1)[0]
        return generated.strip()
