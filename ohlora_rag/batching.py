"""Many learners, one model: answers asked at about the same time are generated together in one batch.

On a CPU (and a GPU) one decoding step of a small model costs about the same for 1 row as for 8, so a batch of 8
answers finishes in little more than the time of one. `Batcher` has the same `start` as `Generator`, so the
`QueryEngine` uses either; the server uses a `Batcher`, the one-shot CLI commands the plain `Generator`.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from .config import AskConfig
from .generator import Generation, Generator, Pending, Reply

#: Most answers generated together (more rows cost more per step than they save on this CPU; see bench/serve.py).
MAX_BATCH = 8
#: How long the first request of a batch waits for company, in seconds (clients that ask together batch together).
GATHER_SECONDS = 0.02
#: ... and how long it waits when the previous batch was bigger than what is queued: the learners just answered
#: usually ask again within this time (measured by bench/serve.py; without it, batches alternate big and small).
REGATHER_SECONDS = 0.15


class Batcher:
    """Queues prompts and generates them in batches on one worker thread that owns the model."""

    def __init__(
        self, generator: Generator, max_batch: int = MAX_BATCH, gather_seconds: float = GATHER_SECONDS
    ) -> None:
        self.generator = generator
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self._queue: queue.Queue[Pending | None] = queue.Queue()
        self._carry: Pending | None = None
        self._thread = threading.Thread(target=self._loop, name="ohlora-batcher", daemon=True)
        self._thread.start()
        self.batches: list[int] = []  # the size of every batch run so far (for tests and the bench)
        self.steps: list[int] = []  # ... and its decoding steps

    @property
    def prompts(self) -> Any:
        return self.generator.prompts

    @property
    def choice(self) -> Any:
        return self.generator.choice

    def start(
        self,
        prompt: str,
        max_new_tokens: int = AskConfig.max_new_tokens,
        temperature: float = AskConfig.temperature,
        seed: int | None = None,
    ) -> Reply:
        """Queue a prompt; its reply's pieces arrive once its batch runs."""
        pending = self.generator.pending(prompt, max_new_tokens, temperature, seed)
        self._queue.put(pending)
        return pending.reply

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._queue.put(None)
        self._thread.join()

    def _next_batch(self) -> list[Pending] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch = [first]
        if first.temperature > 0:
            return batch  # sampled answers run alone, so their seed gives the answer it gives alone
        expected = self.batches[-1] if self.batches else 1
        wait = (
            self.gather_seconds if self._queue.qsize() + 1 >= expected else max(self.gather_seconds, REGATHER_SECONDS)
        )
        deadline = time.monotonic() + wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            if item.temperature > 0:
                self._carry = item  # runs alone, next
                break
            batch.append(item)
        live = []
        for pending in batch:
            if pending.reply.cancelled:  # its client left while it waited
                pending.reply.finish(Generation("", 0, 0.0))
            else:
                live.append(pending)
        return live

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            self.batches.append(len(batch))
            self.steps.append(self.generator.run(batch))
