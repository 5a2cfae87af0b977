"""The one prompt builder: templates, the no-information marker, completions ending in EOS."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ohlora_rag.errors import UsageError
from ohlora_rag.prompt import NO_INFO, PERSONA, SEED_NO_INFO, PromptBuilder


@pytest.fixture
def tokenizer(tiny_lm: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(tiny_lm)


def test_chat_template_holds_persona_entry_and_question(tokenizer) -> None:  # noqa: ANN001
    b = PromptBuilder.create(tokenizer)
    assert b.template == "chat"
    p = b.prompt("what is recall?", "recall : misses")
    assert p.startswith(
        f"<|im_start|>system\n{PERSONA}<|im_end|>\n<|im_start|>user\nInformation: recall : misses\n\nQuestion: what is recall?"
    )
    assert p.endswith("<|im_start|>assistant\n")
    assert f"Information: {NO_INFO}" in b.prompt("who won?", None)
    assert b.prompt("who won?", SEED_NO_INFO) == b.prompt("who won?", "") == b.prompt("who won?", None)
    assert b.completion(" answer ") == "answer<|im_end|>"


def test_seed_template_is_the_original_format(tokenizer) -> None:  # noqa: ANN001
    b = PromptBuilder.create(tokenizer, "seed")
    assert (
        b.prompt("코사인 유사도가 뭐야?", "cos : x")
        == "(제공된 정보) cos : x (사용자 질문) 코사인 유사도가 뭐야? (답변 시작) ### 답변:"
    )
    assert b.prompt("q", None) == f"(제공된 정보) {SEED_NO_INFO} (사용자 질문) q (답변 시작) ### 답변:"
    assert b.completion("답") == " 답 (답변 종료)<|im_end|>"
    assert b.clean(" 답 (답변 종료) trailing") == "답"


def test_plain_template_and_bad_names(tokenizer) -> None:  # noqa: ANN001
    b = PromptBuilder.create(tokenizer, "plain")
    assert b.prompt("q?", "e").endswith("### Information:\ne\n\n### Question:\nq?\n\n### Answer:\n")
    with pytest.raises(UsageError, match="--template fancy: choose one of auto, chat, plain, seed"):
        PromptBuilder.create(tokenizer, "fancy")
    tokenizer.chat_template = None
    assert PromptBuilder.create(tokenizer).template == "plain"
    with pytest.raises(UsageError, match="this tokenizer has no chat template"):
        PromptBuilder.create(tokenizer, "chat")
