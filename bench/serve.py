"""Serving throughput: N concurrent clients x M questions against a running `ohlora-rag serve`.

Each client streams its answers (`stream: true`, the web page's way) one after another. Printed per run: latency
p50/p95 (whole answer), time to first token p50/p95, aggregate completion tokens/s, errors — for one client and for
N clients — and the ratio of the aggregate tokens/s (N clients / one client). A lone-`generate` line (the bare
library, the same model, one answer at a time, in this process) anchors what one client could get at best.

    python bench/serve.py                     # starts a server on the built index, 1 then 8 clients x 6 questions
    python bench/serve.py --url http://127.0.0.1:8000 --clients 8 --questions 6
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def questions(count: int) -> list[str]:
    with (ROOT / "data" / "trust_test.csv").open(encoding="utf-8") as fh:
        rows = [r["question"] for r in csv.DictReader(fh) if r["kind"] == "in_kb"]
    return rows[:count]


def one_answer(url: str, question: str, max_tokens: int) -> dict[str, float]:
    body = {
        "model": "ohlora-tutor",
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "max_tokens": max_tokens,
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return {"latency": total, "ttft": first if first is not None else total, "tokens": tokens}


def run(url: str, clients: int, asked: list[list[str]], max_tokens: int) -> dict[str, float]:
    results: list[dict[str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(mine: list[str]) -> None:
        for q in mine:
            try:
                r = one_answer(url, q, max_tokens)
                with lock:
                    results.append(r)
            except Exception as exc:  # noqa: BLE001 — counted and printed, the bench goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(asked[i],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))] if xs else float("nan")

    for e in errors[:3]:
        print("  error:", e)
    return {
        "clients": clients,
        "answers": len(results),
        "errors": len(errors),
        "p50": statistics.median(lat) if lat else float("nan"),
        "p95": pct(lat, 0.95),
        "ttft50": statistics.median(ttft) if ttft else float("nan"),
        "ttft95": pct(ttft, 0.95),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "wall": wall,
    }


def bare_generate(max_tokens: int, prompts: list[str]) -> float:
    """Tokens/s of the bare library: the same merged model, `generate` one prompt at a time, greedy."""
    import torch

    from ohlora_rag.config import Paths
    from ohlora_rag.generator import Generator, choose_llm, encode_prompt

    generator = Generator(choose_llm(None, None, Paths.resolve(ROOT)))
    tokens, start = 0, time.perf_counter()
    for p in prompts:
        ids = torch.tensor([encode_prompt(generator.tokenizer, generator.prompts.prompt(p, None))])
        with torch.inference_mode():
            out = generator.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                min_new_tokens=max_tokens,
                pad_token_id=generator.tokenizer.eos_token_id,
            )
        tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one on a free port)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--questions", type=int, default=6, help="questions per client")
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-generate line")
    args = parser.parse_args()

    server = None
    url = args.url
    if url is None:
        port = 8765
        server = subprocess.Popen(
            [sys.executable, "-m", "ohlora_rag", "--home", str(ROOT), "serve", "--port", str(port)],
            stderr=subprocess.DEVNULL,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        url = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        while True:
            try:
                health = httpx.get(url + "/health").json()
                if health["status"] == "ready":
                    break
                if health["status"] == "failed":
                    sys.exit(f"server failed to load: {health['error']}")
            except httpx.HTTPError:
                pass
            if time.perf_counter() - start > 180:
                sys.exit("server not ready after 180 s")
            time.sleep(0.2)
        pool = questions(args.clients * args.questions + 2)
        one_answer(url, pool[-1], args.max_tokens)  # warm-up
        one_answer(url, pool[-2], args.max_tokens)
        print(
            f"server {url}: {health['encoder']} + {health['llm']} (adapter {health['adapter']}); "
            f"{args.max_tokens} max tokens per answer, streamed"
        )
        head = (
            f"{'clients':>8}{'answers':>8}{'errors':>7}{'p50 s':>8}{'p95 s':>8}{'ttft50':>8}{'ttft95':>8}{'tok/s':>8}"
        )
        print(head)
        single = run(url, 1, [pool[: args.questions]], args.max_tokens)
        asked = [pool[i * args.questions : (i + 1) * args.questions] for i in range(args.clients)]
        many = run(url, args.clients, asked, args.max_tokens)
        for r in (single, many):
            print(
                f"{r['clients']:>8}{r['answers']:>8}{r['errors']:>7}{r['p50']:>8.2f}{r['p95']:>8.2f}"
                f"{r['ttft50']:>8.3f}{r['ttft95']:>8.3f}{r['tokens_per_s']:>8.1f}"
            )
        print(
            f"aggregate tokens/s, {args.clients} clients / 1 client: {many['tokens_per_s'] / single['tokens_per_s']:.2f}x"
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    if not args.no_bare:
        bare = bare_generate(args.max_tokens, pool[:3])
        print(
            f"bare transformers generate, one prompt at a time, {args.max_tokens} tokens: {bare:.1f} tokens/s "
            f"(one client through the server: {single['tokens_per_s'] / bare:.2f}x of it)"
        )


if __name__ == "__main__":
    main()
