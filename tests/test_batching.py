"""Batched generation: each row's answer is the one it gets alone, rows end on their own, cancelled rows stop."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ohlora_rag.batching import Batcher
from ohlora_rag.config import Paths
from ohlora_rag.generator import Generator, choose_llm

from .conftest import CONCEPTS

QUESTIONS = ["what is precision ?", "what is recall ?", "who won the cup ?", "what is dropout and why use it ?"]


@pytest.fixture
def generator(tiny_lm: Path, tmp_path: Path) -> Generator:
    return Generator(choose_llm(str(tiny_lm), None, Paths(tmp_path)), device="cpu")


def _prompts(generator: Generator) -> list[str]:
    entries = [CONCEPTS[1][2], CONCEPTS[2][2], None, CONCEPTS[3][2]]
    return [generator.prompts.prompt(q, e) for q, e in zip(QUESTIONS, entries)]


def test_a_batch_gives_each_row_its_own_answer(generator: Generator) -> None:
    prompts = _prompts(generator)
    alone = [generator.generate(p, max_new_tokens=10) for p in prompts]
    limits = [10, 10, 4, 10]  # one row stops early on its own limit while the others go on
    pending = [generator.pending(p, n) for p, n in zip(prompts, limits)]
    generator.run(pending)
    together = [p.reply.result() for p in pending]
    for i, (a, b) in enumerate(zip(alone, together)):
        if limits[i] == 10:
            assert b.text == a.text and b.new_tokens == a.new_tokens
    assert together[2].new_tokens <= 4
    assert generator.generate(prompts[2], max_new_tokens=4).text == together[2].text


def test_batcher_batches_concurrent_requests_and_keeps_them_apart(generator: Generator) -> None:
    prompts = _prompts(generator)
    alone = [generator.generate(p, max_new_tokens=8).text for p in prompts]
    batcher = Batcher(generator, gather_seconds=0.2)
    try:
        replies = [batcher.start(p, max_new_tokens=8) for p in prompts * 2]
        texts = [r.result().text for r in replies]
    finally:
        batcher.close()
    assert texts == alone * 2
    assert max(batcher.batches) > 1 and sum(batcher.batches) == 8


def test_cancelled_reply_ends_and_the_others_finish(generator: Generator) -> None:
    prompts = _prompts(generator)
    batcher = Batcher(generator, gather_seconds=0.2)
    try:
        keep = batcher.start(prompts[0], max_new_tokens=30)
        drop = batcher.start(prompts[1], max_new_tokens=30)
        drop.cancel()
        done = threading.Event()
        threading.Thread(target=lambda: (drop.result(), done.set()), daemon=True).start()
        assert done.wait(30), "a cancelled reply must still end"
        assert drop.result().new_tokens <= 1
        assert keep.result().text == generator.generate(prompts[0], max_new_tokens=30).text
    finally:
        batcher.close()


def test_a_failed_generation_reaches_the_consumer(generator: Generator) -> None:
    reply = generator.start("x", max_new_tokens=0)  # generate() refuses max_new_tokens=0
    with pytest.raises(ValueError):
        reply.result()


def test_a_reply_generates_on_the_thread_that_waits_for_it(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`result()` before iterating runs generation on the calling thread (a second thread slows it on few cores);
    iterating runs it in a worker thread, so pieces stream while it generates. Same answer either way."""
    threads: list[threading.Thread] = []
    run = Generator.run

    def recording(self: Generator, batch: list) -> int:  # type: ignore[type-arg]
        threads.append(threading.current_thread())
        return run(self, batch)

    monkeypatch.setattr(Generator, "run", recording)
    prompt = _prompts(generator)[0]
    waited = generator.start(prompt, max_new_tokens=8).result()
    assert threads[-1] is threading.current_thread()
    reply = generator.start(prompt, max_new_tokens=8)
    assert len(threads) == 1  # nothing runs before the reply is consumed
    pieces = list(reply)
    assert threads[-1] is not threading.current_thread()
    assert "".join(pieces).strip() == waited.text.strip() and reply.result().text == waited.text
