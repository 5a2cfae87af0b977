"""Generation next to a CPU-busy process, idle and loaded: the project's thread setup (`configure_threads`: OpenMP
threads sleep while they wait) against the libgomp default (they spin); optionally against one OpenMP thread.

Four ways to the same answer ("What is dropout?", greedy):
  ask             `QueryEngine.ask` — `ask`, `ask --file`, `evaluate-answers` (generation in a worker thread);
  ask --stream    `QueryEngine.stream`, iterated — `ask --stream`, `chat`;
  calling thread  `Generator.run` on the thread that loaded the models and encodes the questions (how `ask` without
                  `--stream` generated before answers were streamed from a worker; what any caller of `run` gets);
  batcher thread  `batching.Batcher`, one long-lived generating thread (the server's way).
Each setting runs in a fresh process (the wait policy is read once, when OpenMP is loaded): a warm-up answer per
way, `--repeat` answers per way idle, then as many with `--busy` processes spinning `while True: pass` beside it.
Printed: min / median seconds of generation, tokens/s at the median, loaded / idle ratio, and the retrieval time of
`ask` (question encoding + search, on the calling thread).

Run: `python bench/threads.py [--home DIR] [--repeat 3] [--max-new-tokens 35] [--busy 1]` after
`ohlora-rag build-index` (about 3 minutes here; add `--settings ...,OMP_NUM_THREADS=1` for a third process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUESTION = "What is dropout?"
SETTINGS = {
    "ohlora-rag (configure_threads)": {},
    "libgomp default (spinning)": {"_SKIP_CONFIGURE": "1"},
    "OMP_NUM_THREADS=1": {"_SKIP_CONFIGURE": "1", "OMP_NUM_THREADS": "1"},
}
WAYS = ("ask", "ask --stream", "calling thread", "batcher thread")
DEFAULT_SETTINGS = "ohlora-rag (configure_threads),libgomp default (spinning)"


def child(home: str, repeat: int, max_new_tokens: int, busy: int) -> None:
    """One setting: prints one JSON object {phase: {way: [[seconds, tokens, retrieve_seconds], ...]}}."""
    if os.environ.get("_SKIP_CONFIGURE"):
        import torch  # noqa: F401  (loaded first: libgomp keeps its default, QueryEngine.load can change nothing)
    else:
        from ohlora_rag.device import configure_threads

        configure_threads()  # what `ask` does first
    from ohlora_rag.batching import Batcher
    from ohlora_rag.config import AskConfig, Paths
    from ohlora_rag.device import quiet_transformers

    quiet_transformers()
    from ohlora_rag.engine import QueryEngine

    engine = QueryEngine.load(AskConfig(max_new_tokens=max_new_tokens), Paths.resolve(home))
    generator = engine.generator
    entry = engine.ask(QUESTION).used
    prompt = generator.prompts.prompt(QUESTION, entry.text if entry else None)

    def run(way: str) -> list[float]:
        if way == "calling thread":
            pending = generator.pending(prompt, max_new_tokens)  # type: ignore[attr-defined]
            generator.run([pending])  # type: ignore[attr-defined]
            generation = pending.reply.result()
            return [generation.seconds, generation.new_tokens, 0.0]
        if way == "ask":
            answer = engine.ask(QUESTION)
        else:
            stream = engine.stream(QUESTION)
            for _ in stream:
                pass
            answer = stream.answer()
        return [answer.timings["generate"], answer.new_tokens, answer.timings["retrieve"]]

    def batched() -> list[list[float]]:
        # Its thread lives only for these answers: a long-lived thread with its own OpenMP team would change how
        # libgomp waits in every other thread (more threads than cores: it spins only briefly).
        batcher = Batcher(generator)  # type: ignore[arg-type]
        try:
            runs = [batcher.start(prompt, max_new_tokens).result() for _ in range(repeat + 1)][1:]  # 1 warm-up
        finally:
            batcher.close()
        return [[g.seconds, g.new_tokens, 0.0] for g in runs]

    for way in WAYS[:3]:
        run(way)  # warm-up
    results: dict[str, dict[str, list[list[float]]]] = {}
    for phase in ("idle", "loaded"):
        spinners = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(busy if phase == "loaded" else 0)
        ]
        try:
            time.sleep(0.5 if spinners else 0)
            results[phase] = {way: [run(way) for _ in range(repeat)] for way in WAYS[:3]}
            results[phase]["batcher thread"] = batched()
        finally:
            for proc in spinners:
                proc.kill()
                proc.wait()
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(ROOT))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=35)
    parser.add_argument("--busy", type=int, default=1, help="CPU-busy processes beside generation")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma-separated, of: {', '.join(SETTINGS)}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        child(args.home, args.repeat, args.max_new_tokens, args.busy)
        return

    print(
        f"generation next to {args.busy} CPU-busy process(es): '{QUESTION}', {args.max_new_tokens} new tokens max, "
        f"{args.repeat} runs per cell, {len(os.sched_getaffinity(0))} usable cores"
    )
    print(
        f"{'setting / way':<50}{'idle s (min/med)':>18}{'tok/s':>7}{'loaded s (min/med)':>20}{'tok/s':>7}{'ratio':>7}"
    )
    for name in (n.strip() for n in args.settings.split(",")):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        env.update(SETTINGS[name])
        cmd = [sys.executable, __file__, "--child", "--home", args.home, "--repeat", str(args.repeat)]
        cmd += ["--max-new-tokens", str(args.max_new_tokens), "--busy", str(args.busy)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name}: the run failed:\n{done.stderr[-2000:]}")
        results = json.loads(done.stdout.strip().splitlines()[-1])
        for way in WAYS:
            cells = []
            for phase in ("idle", "loaded"):
                seconds = [s for s, _, _ in results[phase][way]]
                tokens = statistics.median(n for _, n, _ in results[phase][way])
                cells.append((min(seconds), statistics.median(seconds), tokens / statistics.median(seconds)))
            (i_min, i_med, i_tps), (l_min, l_med, l_tps) = cells
            print(
                f"{f'{name} / {way}':<50}{f'{i_min:.2f} / {i_med:.2f}':>18}{i_tps:>7.1f}"
                f"{f'{l_min:.2f} / {l_med:.2f}':>20}{l_tps:>7.1f}{l_med / i_med:>6.2f}x"
            )
        retrieve = {p: statistics.median(r for w in WAYS[:2] for _, _, r in results[p][w]) * 1e3 for p in results}
        print(
            f"{'':<4}retrieval (median of ask and ask --stream): idle {retrieve['idle']:.0f} ms, loaded {retrieve['loaded']:.0f} ms"
        )
    print("ratio: loaded median / idle median of the same row (1.00x: the busy process costs nothing)")


if __name__ == "__main__":
    main()
