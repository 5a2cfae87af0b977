"""LLM benchmarks: ohlora-rag against bare transformers / trl doing the same work, side by side, with ratios.

(1) train-llm tokens/s vs a bare trl SFTTrainer (same data, model, LoRA shape, batch; fp32, no pre-flight);
(2) `ask` latency split into load / retrieve / generate, and generate tokens/s vs, on the same prompt (greedy, same
    max_new_tokens), a bare onnxruntime loop over the same ONNX copy (when `ask` answers with it) and bare
    `model.generate` in float32 and bfloat16;
    and the memory floor: the LLM's weight bytes read once per token at the read bandwidth measured here.
Cold starts (`--help`, `search`, `ask` as new processes): `bench/cold_start.py`.

Run: `python bench/llm.py [--steps 6] [--skip-train]` after `ohlora-rag build-index` (about 10 minutes here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUESTION = "What is cosine similarity?"


def bench_train(steps: int) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ohlora_rag.config import DEFAULT_LLM, LlmTrainConfig, Paths
    from ohlora_rag.data import load_sft
    from ohlora_rag.models import resolve
    from ohlora_rag.prompt import PromptBuilder
    from ohlora_rag.training.llm import LORA_TARGETS, examples, train_llm

    paths = Paths.resolve(ROOT)
    base = resolve(DEFAULT_LLM, "llm", paths)
    rows = load_sft(ROOT / "data" / "sft_train.csv")
    defaults = LlmTrainConfig(data=ROOT / "data" / "sft_train.csv")
    n_rows = steps * defaults.batch_size
    work = Path(tempfile.mkdtemp(prefix="ohlora-bench-llm-"))
    subset = work / "sft.csv"
    with (ROOT / "data" / "sft_train.csv").open(encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    subset.write_text("\n".join(lines[: n_rows + 1]) + "\n", encoding="utf-8")

    ours = train_llm(LlmTrainConfig(data=subset, epochs=1, out=work / "ours", progress=False), paths)

    tok = AutoTokenizer.from_pretrained(base.path)
    builder = PromptBuilder.create(tok)
    sub = load_sft(subset)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(work / "bare"),
        num_train_epochs=1,
        per_device_train_batch_size=defaults.batch_size,
        learning_rate=defaults.learning_rate,
        completion_only_loss=True,
        max_length=None,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    lora = LoraConfig(
        r=defaults.lora_r,
        lora_alpha=defaults.lora_alpha,
        lora_dropout=defaults.lora_dropout,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(examples(sub, builder)),
        processing_class=tok,
        peft_config=lora,
    )
    tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset)
    start = time.perf_counter()
    trainer.train()
    bare_tps = tokens / (time.perf_counter() - start)
    print(
        f"\n(1) train-llm vs bare trl SFTTrainer ({n_rows} rows of {len(rows)}, {steps} steps, batch {defaults.batch_size})"
    )
    print(f"{'':<28}{'tokens/s':>10}{'ratio':>8}")
    print(f"{'bare SFTTrainer (fp32)':<28}{bare_tps:>10.0f}{'1.00x':>8}")
    print(f"{'ohlora-rag train-llm':<28}{ours.tokens_per_second:>10.0f}{ours.tokens_per_second / bare_tps:>7.2f}x")


def bench_ask(repeat: int) -> None:
    import numpy as np
    import torch

    from ohlora_rag.config import AskConfig, Paths
    from ohlora_rag.engine import QueryEngine
    from ohlora_rag.generator import Generator, encode_prompt

    engine = QueryEngine.load(AskConfig(), Paths.resolve(ROOT))
    answers = [engine.ask(QUESTION) for _ in range(repeat)]
    gen = engine.generator
    prompt = gen.prompts.prompt(QUESTION, answers[0].used.text if answers[0].used else None)
    prompt_ids = encode_prompt(gen.tokenizer, prompt)
    max_new = AskConfig().max_new_tokens
    rows: list[tuple[str, float]] = []
    copy = getattr(gen, "model", None)
    if hasattr(copy, "session"):  # the ONNX copy answers: bare onnxruntime greedy loop on the same graph

        def bare_ort() -> tuple[float, int]:
            session = copy.session  # type: ignore[union-attr]
            names = [i.name for i in session.get_inputs()][2:]  # the cache inputs, per layer keys and values
            cache = [np.zeros((1, copy.kv_heads, 0, copy.head_dim), np.float32) for _ in names]  # type: ignore[union-attr]
            ids, n = prompt_ids, 0
            start = time.perf_counter()
            while n < max_new:
                feeds = {
                    "input_ids": np.asarray([ids], np.int64),
                    "attention_mask": np.ones((1, cache[0].shape[2] + len(ids)), np.int64),
                    **dict(zip(names, cache)),
                }
                logits, *cache = session.run(None, feeds)
                token, n = int(logits[0].argmax()), n + 1
                if token == gen.tokenizer.eos_token_id:
                    break
                ids = [token]
            return time.perf_counter() - start, n

        runs = [bare_ort() for _ in range(repeat)]
        rows.append(("bare onnxruntime loop", statistics.median(n / s for s, n in runs)))
    for dtype in ("float32", "bfloat16"):
        torch_llm = Generator(gen.choice, dtype=dtype)
        ids = torch.tensor([prompt_ids])

        def bare() -> tuple[float, int]:
            start = time.perf_counter()
            with torch.inference_mode():
                out = torch_llm.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=torch_llm.tokenizer.eos_token_id,
                    pad_token_id=torch_llm.tokenizer.pad_token_id,
                )
            return time.perf_counter() - start, int(out.shape[1] - ids.shape[1])

        runs = [bare() for _ in range(repeat)]
        rows.append((f"bare model.generate {dtype}", statistics.median(n / s for s, n in runs)))
        if dtype == "float32":
            weights = sum(p.numel() * p.element_size() for p in torch_llm.model.parameters())

    ours_tps = statistics.median(a.new_tokens / a.timings["generate"] for a in answers)
    print(
        f"\n(2) ask latency (warm, median of {repeat}): load {engine.load_seconds:.2f}s (once), "
        f"retrieve {statistics.median(a.timings['retrieve'] for a in answers) * 1e3:.1f} ms, "
        f"generate {statistics.median(a.timings['generate'] for a in answers):.2f}s for {answers[0].new_tokens} tokens "
        f"({type(gen).__name__}, {getattr(gen, 'dtype', '?')})"
    )
    print(f"{'':<32}{'tokens/s':>10}{'ours vs':>9}")
    print(f"{'ohlora-rag generate':<32}{ours_tps:>10.1f}")
    for name, tps in rows:
        print(f"{name:<32}{tps:>10.1f}{ours_tps / tps:>8.2f}x")
    bandwidth = read_bandwidth()
    floor = bandwidth / weights
    print(
        f"{'memory floor (float32)':<32}{floor:>10.1f}{ours_tps / floor:>8.2f}x   ({weights / 1e6:.0f} MB of weights "
        f"per token at {bandwidth / 1e9:.1f} GB/s)"
    )


def read_bandwidth() -> float:
    """All-core read bandwidth in bytes/s: a sum over 1 GB (the best of 5)."""
    import numpy as np

    data = np.ones(1 << 28, np.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per side in (1)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ohlora_rag.device import quiet_transformers

    quiet_transformers()
    if not args.skip_train:
        bench_train(args.steps)
    bench_ask(args.repeat)


if __name__ == "__main__":
    main()
