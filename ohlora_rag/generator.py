"""The answering LLM: a base model plus the LoRA adapter (merged at load) -> an answer that stops at EOS.

Generation is a `Reply`: an iterator of text pieces as they are generated, whose `result()` is the whole answer.
Several prompts can be generated in one batch (`run`), which is how the server answers many learners at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import hash_into, prune_copies, staged_folder
from .config import DEFAULT_LLM, AskConfig, Paths
from .device import configure_threads
from .errors import ModelNotFoundError, OhloraError
from .models import ModelRef, check_json_files, loading, read_manifest, resolve
from .prompt import PromptBuilder


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float
    prompt_tokens: int = 0


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (what `transformers.set_seed` does, without importing the
    trainer utilities, which pull in peft and accelerate: 0.1-0.2 s of every `ask`)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA generators too


def started_on_use(reply: Reply, produce: Callable[[], Any]) -> Reply:
    """`reply`, whose producer `produce` runs when it is first used: on the caller's thread for `result()`, in a
    worker thread for an iterating consumer."""

    def begin(inline: bool) -> None:
        if inline:
            produce()
            return
        # Not a daemon: a reply ends as soon as its row is done, a step before generation returns; a process that
        # exits right after its answer waits for that step instead of killing torch mid-call (abort, status 134).
        threading.Thread(target=produce, name="ohlora-generate").start()

    reply.begin_with(begin)
    return reply


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt text -> token ids, the same way for training (checked by train-llm's pre-flight) and inference."""
    return list(tokenizer(text=prompt, add_special_tokens=False)["input_ids"])


@dataclass
class LLMChoice:
    """Which base model and adapter `ask` loads, and why."""

    base: ModelRef
    adapter: Path | None
    template: str
    notice: str | None = None
    cache: Path | None = None  # where the base + adapter merge is kept between runs (models/cache)


def choose_llm(
    base_llm: str | None,
    adapter: str | Path | None,
    paths: Paths,
    template: str | None = None,
    use_adapter: bool = True,
) -> LLMChoice:
    """The trained adapter under models/llm/ (with the base and template it was trained with) when present;
    else the base model alone, with a notice. An explicit `base_llm` must match the adapter's base."""
    if not use_adapter:
        base = resolve(base_llm or DEFAULT_LLM, "llm", paths)
        return LLMChoice(
            base,
            None,
            template or "auto",
            f"--no-adapter: answering with the base model {base.reference}",
            cache=paths.cache_dir,
        )
    adapter_dir = Path(adapter) if adapter else paths.llm_dir
    if not adapter and not (adapter_dir / "adapter_config.json").is_file() and base_llm in (None, DEFAULT_LLM):
        adapter_dir = shipped_adapter() or adapter_dir  # the tutor's trained adapter, shipped with the package
    if not (adapter_dir / "adapter_config.json").is_file():
        if adapter:
            raise ModelNotFoundError(
                f"--adapter {adapter}: no LoRA adapter there (adapter_config.json) — run `ohlora-rag train-llm`"
            )
        base = resolve(base_llm or DEFAULT_LLM, "llm", paths)
        notice = f"no trained adapter in {adapter_dir} — answering with the base model {base.reference} (run `ohlora-rag train-llm`)"
        return LLMChoice(base, None, template or "auto", notice, cache=paths.cache_dir)
    # Ours carry a manifest (base, its fingerprint, template); a plain PEFT adapter names its base in its config.
    check_json_files(adapter_dir, ("adapter_config.json",))
    manifest = read_manifest(adapter_dir) or {}
    if not manifest:
        import json

        peft_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8") or "{}")
        manifest = {"base": peft_config.get("base_model_name_or_path") if isinstance(peft_config, dict) else None}
    base_ref = base_llm or manifest.get("base")
    if not base_ref:
        raise ModelNotFoundError(f"the adapter in {adapter_dir} does not name its base model — pass --base-llm")
    base = resolve(str(base_ref), "llm", paths)
    expected = manifest.get("base_fingerprint")
    if expected and base.fingerprint != expected:
        raise ModelNotFoundError(
            f"the adapter in {adapter_dir} was trained on {manifest.get('base')} (fingerprint {expected}), not on "
            f"{base.reference} (fingerprint {base.fingerprint}) — pass the same --base-llm or retrain with `ohlora-rag train-llm`"
        )
    return LLMChoice(base, adapter_dir, template or str(manifest.get("template") or "auto"), cache=paths.cache_dir)


def merged_folder(choice: LLMChoice) -> Path | None:
    """Where the merge of `choice`'s base and adapter is kept: `<cache>/merged-<key>`, the key hashing the base's
    fingerprint and the adapter's files (a changed adapter or base gets a new folder); None without adapter or cache."""
    if choice.adapter is None or choice.cache is None:
        return None
    import hashlib

    # The adapter's bytes, hashed here rather than by `models.fingerprint`, which would cache its value in the
    # adapter's manifest: the shipped adapter lives in the package and is not ours to write.
    digest = hashlib.sha256(choice.base.fingerprint.encode())
    for path in sorted(
        p for p in choice.adapter.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")
    ):
        digest.update(path.name.encode() + b"\0")
        hash_into(digest, path)
    return choice.cache / f"merged-{digest.hexdigest()[:16]}"


def _keep_merged(model: Any, folder: Path) -> None:
    """Save a merged model for the next run (staged, then swapped in; older merges removed). Best effort: a cache
    that cannot be written (read-only home, full disk) costs the next run the merge again, nothing else."""
    try:
        with staged_folder(folder, keep_existing=lambda out: (out / "config.json").is_file()) as staging:
            model.save_pretrained(staging, safe_serialization=True)
    except (OSError, OhloraError):  # unwritable, full, or its lock held by another writer too long
        return
    prune_copies(folder, "merged-*", keep=1)


def shipped_adapter() -> Path | None:
    """The LoRA adapter that ships in the package (ohlora_rag/tutor/adapter), if this install has it."""
    from .importers.tutor import ADAPTER_DIR, TUTOR_DIR

    folder = TUTOR_DIR / ADAPTER_DIR
    return folder if (folder / "adapter_config.json").is_file() else None


class Generator:
    """A causal LM ready to answer prompts built by `PromptBuilder`."""

    def __init__(self, choice: LLMChoice, device: str | None = None, dtype: str = "auto") -> None:
        configure_threads()  # a no-op when torch is imported already
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .device import native_bf16, quiet_transformers, torch_device

        quiet_transformers()
        self.choice = choice
        self.device = device or torch_device()
        if dtype == "auto":
            # bf16 halves the bytes each token reads; where it runs natively it is what fp32 gives within the
            # evaluation's noise (README, "How answers are made"). A CPU without it would emulate it, slowly.
            dtype = "bfloat16" if native_bf16(self.device) else "float32"
        self.dtype = dtype
        weights = getattr(torch, dtype)
        source = choice.adapter if choice.adapter and (choice.adapter / "tokenizer.json").exists() else choice.base.path
        with loading(ModelRef(str(source), Path(source)), "LLM tokenizer"):
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        merged = merged_folder(choice)
        if merged is not None and (merged / "config.json").is_file():
            # The merge of this base and this adapter, made by an earlier run: a plain load, no PEFT, no merge.
            with loading(ModelRef(str(merged), merged), "merged LLM"):
                model = AutoModelForCausalLM.from_pretrained(merged, dtype=weights, local_files_only=True)
        else:
            with loading(choice.base, "LLM"):
                model = AutoModelForCausalLM.from_pretrained(
                    choice.base.path, dtype=torch.float32, local_files_only=True
                )
            if choice.adapter is not None:
                from peft import PeftModel

                # Merged once: generation then costs exactly what the bare model costs, and the merge is kept.
                with loading(ModelRef(str(choice.adapter), choice.adapter), "LoRA adapter"):
                    model = PeftModel.from_pretrained(model, str(choice.adapter)).merge_and_unload()
                if merged is not None:
                    _keep_merged(model, merged)
        self.model = model.to(self.device, weights).eval()
        self.prompts = PromptBuilder.create(self.tokenizer, choice.template)

    def start(
        self,
        prompt: str,
        max_new_tokens: int = AskConfig.max_new_tokens,
        temperature: float = AskConfig.temperature,
        seed: int | None = None,
    ) -> Reply:
        """An answer to `prompt`: iterate the reply for its pieces as a worker thread generates them, or call its
        `result()` first to generate on the calling thread (no second thread: with PASSIVE OpenMP threads on 2 cores,
        a generation in a thread of its own ran at 15-19 tokens/s where the calling thread got 20-24).

        Args:
            prompt: text from `self.prompts.prompt(...)`.
            max_new_tokens: hard cap on the answer length.
            temperature: 0 means greedy decoding; above 0 samples.
            seed: seeds sampling for reproducible answers.
        """
        pending = self.pending(prompt, max_new_tokens, temperature, seed)
        return started_on_use(pending.reply, lambda: self.run([pending]))

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = AskConfig.max_new_tokens,
        temperature: float = AskConfig.temperature,
        seed: int | None = None,
    ) -> Generation:
        """The whole answer to `prompt` (see `start`)."""
        return self.start(prompt, max_new_tokens, temperature, seed).result()

    def pending(self, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None) -> Pending:
        """A prompt tokenised and waiting for `run` (alone or batched with others)."""
        ids = encode_prompt(self.tokenizer, prompt)
        return Pending(Reply(), ids, max_new_tokens, temperature, seed)

    def run(self, batch: Sequence[Pending]) -> int:
        """Generate every prompt of `batch` in one `generate` call and end their replies.

        Prompts are left-padded to one length; greedy rows give the answer they give alone. Rows end on their own
        (EOS, stop marker, own `max_new_tokens`, cancelled); the call ends when all have. Sampled rows run alone.

        Returns:
            the number of decoding steps run (the longest row's new tokens).
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        start = time.perf_counter()
        stops = [*self.prompts.stop_strings, self.tokenizer.eos_token]
        rows = [_Row(p, stops, self.prompts.clean, start) for p in batch]
        tokenizer = self.tokenizer
        try:
            pad = (
                self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            )
            width = max(len(row.prompt_ids) for row in rows)
            ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
            mask = torch.tensor(
                [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=self.device
            )

            class Fanout(BaseStreamer):  # type: ignore[misc]
                """Each step's new tokens (one per row) to their rows; the first call is the prompt."""

                prompt_seen = False

                def put(self, value: Any) -> None:
                    if not self.prompt_seen:
                        self.prompt_seen = True
                        return
                    for row, token in zip(rows, value.reshape(-1).tolist()):
                        row.take(int(token), tokenizer)

                def end(self) -> None:
                    pass

            class RowsDone(StoppingCriteria):  # type: ignore[misc]
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                    return torch.tensor([row.done or row.reply.cancelled for row in rows], device=input_ids.device)

            first = batch[0]
            kwargs: dict[str, Any] = {
                "input_ids": ids,
                "attention_mask": mask,
                "max_new_tokens": max(row.max_new_tokens for row in rows),
                "eos_token_id": self.tokenizer.eos_token_id,
                "pad_token_id": pad,
                "do_sample": first.temperature > 0,
                "streamer": Fanout(),
                "stopping_criteria": StoppingCriteriaList([RowsDone()]),
            }
            if first.temperature > 0:
                kwargs["temperature"] = first.temperature
                seed_everything(0 if first.seed is None else first.seed)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                self.model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 — handed to every waiting consumer, never lost in a thread
            for row in rows:
                if not row.done:
                    row.done = True
                    row.reply.fail(exc)
            return 0
        for row in rows:
            row.close()  # rows cut by the batch's max_new_tokens
        return max(len(row.ids) for row in rows)


@dataclass
class Pending:
    """A tokenised prompt waiting to be generated, and the reply its pieces go to."""

    reply: Reply
    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int | None = None


class Reply:
    """One answer being generated: iterate it for the text pieces as they arrive; `result()` waits for the end.

    The producer (a generation thread) calls `put`, then `finish` or `fail`; `cancel()` asks it to stop early
    (a client went away). Iterating twice, or after `result()`, yields nothing more. A reply may start its producer
    only when consumed (`begin_with`): in a thread for an iterating consumer, on the consumer's thread for `result()`.
    """

    def __init__(self) -> None:
        self._begin: Callable[[bool], None] | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._generation: Generation | None = None
        self._error: BaseException | None = None
        self._ended = False

    @classmethod
    def finished(cls, pieces: list[str], generation: Generation) -> Reply:
        """A reply whose text is already known (fakes, fixed answers)."""
        reply = cls()
        for piece in pieces:
            reply.put(piece)
        reply.finish(generation)
        return reply

    def begin_with(self, begin: Callable[[bool], None]) -> None:
        """Start the producer on first use: `begin(False)` before iterating, `begin(True)` (inline) for `result()`."""
        self._begin = begin

    def _start(self, inline: bool) -> None:
        begin, self._begin = self._begin, None
        if begin is not None:
            begin(inline)

    def put(self, piece: str) -> None:
        self._queue.put(piece)

    def finish(self, generation: Generation) -> None:
        self._generation = generation
        self._queue.put(_END)

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._queue.put(_END)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[str]:
        self._start(inline=False)
        while not self._ended:
            item = self._queue.get()
            if item is _END:
                self._ended = True
                break
            yield item
        if self._error is not None:
            raise self._error

    def result(self) -> Generation:
        """The whole answer, once generation has ended (generated here when nothing has started it)."""
        self._start(inline=True)
        for _ in self:
            pass
        assert self._generation is not None
        return self._generation


_END = object()


class _Row:
    """One prompt inside a (batched) `generate` call: its tokens so far, its limit, and the text handed out.
    A row ends its reply as soon as it is done (EOS, stop marker, limit, cancelled), not when the batch ends."""

    def __init__(self, pending: Pending, stops: list[str], clean: Callable[[str], str], start: float) -> None:
        self.reply = pending.reply
        self.prompt_ids = pending.ids
        self.max_new_tokens = pending.max_new_tokens
        self.stops = stops
        self.clean = clean
        self.start = start
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.done = False

    def take(self, token: int, tokenizer: Any) -> None:
        """One new token: hand out the text that can no longer change; end at EOS, a stop marker or the limit."""
        if self.done:
            return
        self.ids.append(token)
        self.text = tokenizer.decode(self.ids, skip_special_tokens=False)
        visible = _cut(self.text, self.stops)
        stopped = len(visible) < len(self.text) or token == tokenizer.eos_token_id
        if stopped or len(self.ids) >= self.max_new_tokens or self.reply.cancelled:
            self.close()
            return
        visible = visible.rstrip("\ufffd")  # U+FFFD: half a multi-byte character, completed by the next token
        safe = max(len(visible) - _partial_stop(visible, self.stops), self.emitted)
        if safe > self.emitted:
            self.reply.put(visible[self.emitted : safe])
            self.emitted = safe

    def close(self) -> None:
        """Hand out the rest and end the reply (once)."""
        if self.done:
            return
        self.done = True
        visible = _cut(self.text, self.stops).rstrip()
        if len(visible) > self.emitted:
            self.reply.put(visible[self.emitted :])
        seconds = time.perf_counter() - self.start
        self.reply.finish(Generation(self.clean(self.text), len(self.ids), seconds, len(self.prompt_ids)))


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop marker (held back while streaming)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _cut(text: str, stops: list[str]) -> str:
    """`text` up to the first complete stop marker."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text
