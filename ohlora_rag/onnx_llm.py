"""The answering LLM's ONNX copy: greedy answers with onnxruntime, without importing torch or transformers.

Importing torch and transformers' Llama classes took 3-3.5 s of every cold `ask` before a weight was read, and torch
decodes the 135M model at 12-24 tokens/s here, bound by the overhead of ~200 small operations a token. The first
`ask` that loads the LLM with torch (merged with its adapter) therefore also exports it — the same weights, float32 —
to ONNX with its key/value cache as inputs and outputs, optimises the graph once with onnxruntime (portable
optimisations only) and keeps it in `models/cache/onnx-llm-<key>/`, keyed like the merged model by the base's
fingerprint and the adapter's files, with the tokenizer's files and what the prompt builder needs of it. Later
`ask`, `chat` and `evaluate-answers` runs load that copy in under a second and decode greedily with it: the same
tokens as torch in float32 (checked on a prompt before the copy is kept, and by tests).

What stays on torch: sampled answers (temperature > 0: torch's sampler and seeds, loaded on first use), an explicit
`--dtype bfloat16`, `--runtime torch`, a GPU, the server's batches, and any model the export does not cover (a
non-Llama architecture, a tokenizer whose decoding cleans up spaces). A missing, partial or unreadable copy means
the torch path, never an error.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import complete_copy, prune_copies, staged_folder, utc_timestamp, write_json
from .config import AskConfig
from .errors import OhloraError
from .generator import LLMChoice, Pending, Reply, _Row, encode_prompt, merged_folder, started_on_use
from .prompt import PromptBuilder

EXPORT_FORMAT = 2  # 2: one cache input and output per layer (1 stacked them: 10-15 % of a step in copies)
PREFIX = "onnx-llm-"
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "model.data"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "export.json"
#: Beside a copy that could not be made: `<folder><suffix>` says with which onnxruntime and why.
FAILED_SUFFIX = ".failed"
#: Copies kept in the cache (most recently written first).
KEEP = 2
OPSET = 17
#: Architectures whose export is checked here (the default SmolLM2 and the test models are Llama-shaped).
ARCHITECTURES = ("llama",)
#: A prompt and entry the export is checked on: the copy must give torch's first tokens for it.
_CHECK = ("What is dropout?", "dropout : randomly zeroes activations during training | key idea: less co-adaptation")
_CHECK_TOKENS = 8


def copy_key(choice: LLMChoice) -> str | None:
    """The copy's key: the merged model's (base fingerprint + adapter files), or the base's fingerprint alone."""
    if choice.adapter is None:
        return choice.base.fingerprint[:16]
    merged = merged_folder(choice)
    return merged.name.split("-", 1)[1] if merged is not None else None


def export_folder(cache: Path, key: str) -> Path:
    return cache / f"{PREFIX}{key}"


def _runtime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def ready(folder: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete copy made for this key by this onnxruntime version (an optimised graph is
    specific to the version that wrote it); None otherwise."""
    try:
        expected = {"format": EXPORT_FORMAT, "key": key, "onnxruntime": _runtime_version()}
    except ImportError:
        return None
    return complete_copy(folder, MANIFEST_FILE, expected, {GRAPH_FILE, WEIGHTS_FILE, TOKENIZER_FILE})


class LiteTokenizer:
    """What the prompt builder and the streamed rows use of a Hugging Face fast tokenizer, from the tokenizers
    library and the fields the export recorded: encode, decode, EOS/pad ids, the chat template."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.eos_token: str = meta["eos_token"]
        self.eos_token_id: int = int(meta["eos_token_id"])
        self.pad_token_id: int | None = meta.get("pad_token_id")
        self.chat_template: str | None = meta.get("chat_template")
        self.special_tokens: dict[str, str] = dict(meta.get("special_tokens") or {})
        self._template: Any = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        """The chat template rendered as transformers renders it (a sandboxed Jinja environment with trimmed blocks,
        loop controls, `raise_exception`, `strftime_now` and a non-escaping `tojson`, the special tokens as
        variables); the export checks the two agree before the copy is kept."""
        if tokenize or not self.chat_template:
            raise OhloraError("the LLM's ONNX copy renders chat templates to text only")
        if self._template is None:
            self._template = _compile(self.chat_template)
        return str(
            self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        )


def _compile(source: str) -> Any:
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class OnnxLM:
    """One decoding step of the exported model: new token ids and the cache in, last logits and the cache out."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # optimised when the copy was made; loading it as it is takes 0.8 s instead of 2.5 s
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(folder / GRAPH_FILE), options, providers=["CPUExecutionProvider"])
        self.layers, self.kv_heads, self.head_dim = (int(meta[k]) for k in ("layers", "kv_heads", "head_dim"))

    def empty_cache(self) -> list[np.ndarray]:
        """The cache before the first step: per layer its keys and values, float32 (1, kv_heads, 0, head_dim)."""
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]

    def step(self, ids: list[int], cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Args: ids: the tokens after the cache; cache: per layer keys, values (1, kv_heads, past, head_dim).
        Returns: the last position's logits (vocab,) and the grown cache."""
        feeds = {"input_ids": np.asarray([ids], np.int64)}
        feeds["attention_mask"] = np.ones((1, cache[0].shape[2] + len(ids)), np.int64)
        feeds.update(zip(cache_names("past", self.layers), cache))
        logits, *grown = self.session.run(None, feeds)
        return logits[0], grown


def cache_names(kind: str, layers: int) -> list[str]:
    """The graph's cache inputs ("past") or outputs ("present"): keys and values per layer, in that order."""
    return [f"{kind}_{part}_{i}" for i in range(layers) for part in ("key", "value")]


class OnnxGenerator:
    """`TextGenerator` over the ONNX copy: greedy answers streamed like `Generator`'s; sampled ones go to a torch
    `Generator` loaded on first use (torch's sampler and seeds, so a seeded answer is what it always was)."""

    def __init__(
        self, choice: LLMChoice, folder: Path, meta: dict[str, Any], dtype: str = "auto", sampler: Any = None
    ) -> None:
        self.choice = choice
        self.folder = folder
        self.dtype = "float32"
        self._torch_dtype = dtype
        self.tokenizer = LiteTokenizer(folder, meta)
        self.prompts = PromptBuilder.create(self.tokenizer, choice.template)
        self.model = OnnxLM(folder, meta)
        self._sampler: Any = sampler  # the torch Generator sampled answers come from (loaded on first use if None)
        self._lock = threading.Lock()  # one decoding loop at a time: the session's threads are the machine's cores

    def start(
        self,
        prompt: str,
        max_new_tokens: int = AskConfig.max_new_tokens,
        temperature: float = AskConfig.temperature,
        seed: int | None = None,
    ) -> Reply:
        """An answer to `prompt` (see `Generator.start`)."""
        if temperature > 0:
            return self._torch().start(prompt, max_new_tokens, temperature, seed)
        pending = Pending(Reply(), encode_prompt(self.tokenizer, prompt), max_new_tokens)
        return started_on_use(pending.reply, lambda: self.run(pending))

    def run(self, pending: Pending) -> None:
        """Greedy decoding of one prompt until EOS, a stop marker, its limit or cancellation."""
        start = time.perf_counter()
        row = _Row(pending, [*self.prompts.stop_strings, self.tokenizer.eos_token], self.prompts.clean, start)
        try:
            with self._lock:
                cache = self.model.empty_cache()
                ids = list(pending.ids)
                while not row.done:
                    logits, cache = self.model.step(ids, cache)
                    token = int(np.argmax(logits))
                    row.take(token, self.tokenizer)
                    ids = [token]
        except BaseException as exc:  # noqa: BLE001 — handed to the waiting consumer, never lost in a thread
            if not row.done:
                row.done = True
                row.reply.fail(exc)

    def _torch(self) -> Any:
        with self._lock:
            if self._sampler is None:
                from .generator import Generator

                self._sampler = Generator(self.choice, dtype=self._torch_dtype)
            return self._sampler


def load(choice: LLMChoice, dtype: str = "auto", sampler: Any = None) -> OnnxGenerator | None:
    """The copy of this choice's LLM, ready to answer (`sampler`: a torch `Generator` of the same choice, already
    loaded, for sampled answers); None when there is none, it is incomplete, or onnxruntime cannot read it."""
    key = copy_key(choice)
    if key is None or choice.cache is None:
        return None
    folder = export_folder(choice.cache, key)
    meta = ready(folder, key)
    if meta is None:
        return None
    try:
        return OnnxGenerator(choice, folder, meta, dtype, sampler)
    except Exception:  # noqa: BLE001 - a damaged graph or tokenizer file: the torch path serves
        return None


def export(generator: Any) -> Path | None:
    """Write the ONNX copy of a loaded torch `Generator`'s model (best effort: None when the model or tokenizer is
    not covered, the copy does not give torch's tokens, or the cache cannot be written)."""
    choice: LLMChoice = generator.choice
    key = copy_key(choice)
    model, tokenizer = getattr(generator, "model", None), getattr(generator, "tokenizer", None)
    if key is None or choice.cache is None or model is None or tokenizer is None:
        return None  # (a stand-in generator, in tests)
    if getattr(model.config, "model_type", None) not in ARCHITECTURES:
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) or not getattr(tokenizer, "is_fast", False):
        return None
    folder = export_folder(choice.cache, key)
    if ready(folder, key):
        return folder
    failed = folder.with_name(folder.name + FAILED_SUFFIX)
    if failed.is_file() and failed.read_text(encoding="utf-8", errors="replace").startswith(_runtime_version() + " "):
        return None  # this model's copy failed with this onnxruntime before: do not pay the export on every run
    try:
        with staged_folder(folder, keep_existing=lambda out: ready(out, key) is not None) as staging:
            _write(generator, key, staging)
    except (OSError, OhloraError) as exc:
        if isinstance(exc, CopyMismatch):
            _note_failure(failed, exc)
        return None
    except Exception as exc:  # noqa: BLE001 - the exporter or the optimiser failing on this model: keep torch
        _note_failure(failed, exc)
        return None
    prune_copies(folder, f"{PREFIX}*", KEEP)
    return folder


class CopyMismatch(OhloraError):
    """The exported copy does not answer as the torch model does (prompt, token ids or greedy tokens)."""


def _note_failure(marker: Path, exc: BaseException) -> None:
    """Remember that this model's export failed (with this onnxruntime), and why, so later runs skip it."""
    with contextlib.suppress(OSError):
        marker.write_text(f"{_runtime_version()} {type(exc).__name__}: {exc}\n", encoding="utf-8")


def _write(generator: Any, key: str, out: Path) -> None:
    import copy
    import warnings

    import onnxruntime as ort
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(generator.model).float().cpu().eval()  # tracing changes the traced model; fp32 copy
    prompt_ids = encode_prompt(generator.tokenizer, generator.prompts.prompt(*_CHECK))
    reference = _greedy(model, prompt_ids, _CHECK_TOKENS)  # what torch in float32 answers, before tracing
    model.set_attn_implementation("eager")
    config = model.config
    layers, kv_heads = int(config.num_hidden_layers), int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    class Step(torch.nn.Module):
        """One decoding step with the cache as one keys and one values tensor per layer (batch, kv_heads, tokens,
        head_dim): no stacking, which copied the whole cache twice a step."""

        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: Any, attention_mask: Any, *past: Any) -> Any:
            from transformers import DynamicCache

            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.lm.config)
            positions = torch.arange(input_ids.shape[1]) + past[0].shape[2]
            output = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions.unsqueeze(0).expand(input_ids.shape[0], -1),
                past_key_values=cache,
                use_cache=True,
            )
            grown = output.past_key_values
            present = [t for i in range(layers) for t in (grown.layers[i].keys, grown.layers[i].values)]
            return (output.logits[:, -1], *present)

    past = [torch.zeros(1, kv_heads, 2, head_dim) for _ in range(2 * layers)]
    example = (torch.tensor([[5, 6, 7]]), torch.ones(1, 5, dtype=torch.long), *past)
    raw = out / "raw.onnx"
    past_names, present_names = cache_names("past", layers), cache_names("present", layers)
    axes = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "all"}, "logits": {0: "batch"}}
    axes.update({name: {0: "batch", 2: "past"} for name in past_names})
    axes.update({name: {0: "batch", 2: "all"} for name in present_names})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about Python control flow the step does not depend on
        torch.onnx.export(
            Step(model),
            example,
            str(raw),
            dynamo=False,
            input_names=["input_ids", "attention_mask", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=OPSET,
        )
    del model
    # Optimise once and keep the result (the extended level: fusions that do not depend on this CPU's features).
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out / GRAPH_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    raw.unlink()

    tokenizer = generator.tokenizer
    tokenizer.backend_tokenizer.save(str(out / TOKENIZER_FILE))
    special = {
        name: str(getattr(tokenizer, name))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, name, None) is not None
    }
    meta = {
        "format": EXPORT_FORMAT,
        "key": key,
        "onnxruntime": ort.__version__,
        "made_by": f"torch {torch.__version__} torch.onnx (opset {OPSET}), onnxruntime {ort.__version__}",
        "created": utc_timestamp(),
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": int(tokenizer.eos_token_id),
        "pad_token_id": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": special,
    }
    _check(generator, out, meta, prompt_ids, reference)
    meta["sizes"] = {name: (out / name).stat().st_size for name in (GRAPH_FILE, WEIGHTS_FILE, TOKENIZER_FILE)}
    write_json(out / MANIFEST_FILE, meta)


def _check(generator: Any, out: Path, meta: dict[str, Any], prompt_ids: list[int], reference: list[int]) -> None:
    """The copy must build the same prompts and token ids as the torch generator, and give torch's float32 greedy
    tokens."""
    lite = LiteTokenizer(out, meta)
    builder = PromptBuilder.create(lite, generator.choice.template)
    for entry in (_CHECK[1], None):
        prompt = generator.prompts.prompt(_CHECK[0], entry)
        if builder.prompt(_CHECK[0], entry) != prompt:
            raise CopyMismatch("the copy renders the prompt differently")
        if encode_prompt(lite, prompt) != encode_prompt(generator.tokenizer, prompt):
            raise CopyMismatch("the copy tokenises the prompt differently")
    lm = OnnxLM(out, meta)
    cache = lm.empty_cache()
    ours: list[int] = []
    step = prompt_ids
    for _ in range(len(reference)):
        logits, cache = lm.step(step, cache)
        ours.append(int(np.argmax(logits)))
        step = [ours[-1]]
    if ours != reference:
        raise CopyMismatch(f"the copy's greedy tokens {ours} differ from torch's {reference}")
    if lite.decode(ours) != generator.tokenizer.decode(ours, skip_special_tokens=False):
        raise CopyMismatch("the copy decodes differently")


def _greedy(model: Any, ids: list[int], count: int) -> list[int]:
    """A torch model's first `count` greedy tokens after `ids`."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids])
        past = None
        tokens: list[int] = []
        for _ in range(count):
            output = model(input_ids=x, past_key_values=past, use_cache=True)
            past = output.past_key_values
            tokens.append(int(output.logits[0, -1].float().argmax()))
            x = torch.tensor([[tokens[-1]]])
    return tokens
