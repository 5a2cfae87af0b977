"""Cold starts: `ohlora-rag --help`, `search` and `ask` as new processes, against a bare script doing the same work
with transformers alone, side by side, with ratios (generation against its memory floor: `bench/llm.py`).

- `search`: two bare scripts. One runs what `search` runs since the encoder's ONNX copy (onnx_encoder): it imports
  onnxruntime + tokenizers, opens the same exported graph and word-embedding table, encodes the question (mean
  pooling) and takes the best of the entry vectors with numpy; the other does the same with torch + transformers
  (`AutoModel` on the encoder folder), what `search` ran before;
- `ask` (40 new tokens): the same, plus `AutoModelForCausalLM.from_pretrained` of the same weights `ask` loads
  (the merged model kept in `models/cache`, else the base) in the same dtype, and a greedy `generate`;

Run after `ohlora-rag build-index` and one `ohlora-rag ask` (which makes the merged model):
`python bench/cold_start.py [--repeat 5]` (about 3 minutes here). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUESTION = "What is dropout?"
NEW_TOKENS = 40

BARE = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np, torch, tokenizers
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
job = json.loads(sys.argv[1])
tok = tokenizers.Tokenizer.from_file(job["encoder"] + "/tokenizer.json")
model = AutoModel.from_pretrained(job["encoder"]).eval()
with torch.inference_mode():
    e = tok.encode("query: " + job["question"])
    hidden = model(input_ids=torch.tensor([e.ids]), attention_mask=torch.tensor([e.attention_mask])).last_hidden_state
    q = torch.nn.functional.normalize(hidden.mean(1), dim=-1).numpy()[0]
best = int(np.argmax(np.load(job["vectors"]) @ q))
if job["llm"]:
    lt = AutoTokenizer.from_pretrained(job["tokenizer"])
    lm = AutoModelForCausalLM.from_pretrained(job["llm"], dtype=getattr(torch, job["dtype"])).eval()
    ids = lt(job["prompt"], add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        lm.generate(**ids, max_new_tokens=job["new"], min_new_tokens=job["new"], do_sample=False,
                    pad_token_id=lt.eos_token_id)
print(time.perf_counter() - start, best)
"""


BARE_ORT = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np, onnxruntime as ort, tokenizers
job = json.loads(sys.argv[1])
tok = tokenizers.Tokenizer.from_file(job["encoder"] + "/tokenizer.json")
session = ort.InferenceSession(job["onnx"] + "/model.onnx", providers=["CPUExecutionProvider"])
table = np.load(job["onnx"] + "/word_embeddings.npy", mmap_mode="r")
e = tok.encode("query: " + job["question"])
ids = np.array([e.ids])
hidden = session.run(None, {"inputs_embeds": np.ascontiguousarray(table[ids]), "attention_mask": np.ones_like(ids)})[0]
q = hidden.mean(1)[0]
q /= np.linalg.norm(q)
best = int(np.argmax(np.load(job["vectors"]) @ q))
if job["llm_onnx"]:
    meta = json.load(open(job["llm_onnx"] + "/export.json"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    lm = ort.InferenceSession(job["llm_onnx"] + "/model.onnx", options, providers=["CPUExecutionProvider"])
    lt = tokenizers.Tokenizer.from_file(job["llm_onnx"] + "/tokenizer.json")
    names = [i.name for i in lm.get_inputs()][2:]
    cache = [np.zeros((1, meta["kv_heads"], 0, meta["head_dim"]), np.float32) for _ in names]
    ids = lt.encode(job["prompt"], add_special_tokens=False).ids
    for _ in range(job["new"]):
        feeds = {"input_ids": np.asarray([ids]), "attention_mask": np.ones((1, cache[0].shape[2] + len(ids)), np.int64),
                 **dict(zip(names, cache))}
        logits, *cache = lm.run(None, feeds)
        ids = [int(logits[0].argmax())]
print(time.perf_counter() - start, best)
"""


def stats(values: list[float]) -> str:
    return f"{min(values):6.2f} {statistics.median(values):6.2f} {max(values):6.2f}"


def wall(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ohlora_rag.config import AskConfig, Paths
    from ohlora_rag.device import native_bf16
    from ohlora_rag.engine import QueryEngine
    from ohlora_rag.generator import merged_folder
    from ohlora_rag.onnx_encoder import export_folder, ready
    from ohlora_rag.onnx_llm import OnnxGenerator

    exe = Path(sys.executable).with_name("ohlora-rag")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ohlora_rag"]
    env = {**os.environ, "OHLORA_HOME": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}  # as the one-question commands

    engine = QueryEngine.load(AskConfig(max_new_tokens=NEW_TOKENS), Paths.resolve(ROOT))
    assert engine.retriever is not None
    gen = engine.generator
    choice = gen.choice  # type: ignore[attr-defined]
    llm_onnx = str(gen.folder) if isinstance(gen, OnnxGenerator) else ""
    merged = merged_folder(choice)
    llm = merged if merged is not None and (merged / "config.json").is_file() else choice.base.path
    result = engine.retriever.search(QUESTION, 3)
    prompt = gen.prompts.prompt(QUESTION, result.best.text if result.best else None)
    # the bare transformers side runs what `ask` ran before the copy: bfloat16 where the CPU has it natively
    dtype = ("bfloat16" if native_bf16("cpu") else "float32") if llm_onnx else str(gen.dtype)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        import numpy as np

        vectors = Path(tmp) / "vectors.npy"
        stored = engine.retriever.stored.vectors
        np.save(vectors, stored.vectors_at(np.arange(stored.ntotal)))
        encoder = engine.retriever.encoder
        onnx = export_folder(Paths.resolve(ROOT).cache_dir, encoder.fingerprint)
        if not ready(onnx, encoder.fingerprint):
            sys.exit(f"no ONNX copy of the encoder at {onnx}: run `ohlora-rag build-index` first")
        job = {
            "encoder": str(encoder.ref.path),
            "onnx": str(onnx),
            "vectors": str(vectors),
            "question": QUESTION,
            "tokenizer": str(
                choice.adapter if choice.adapter and (choice.adapter / "tokenizer.json").exists() else choice.base.path
            ),
            "llm": str(llm),
            "dtype": dtype,
            "prompt": prompt,
            "new": NEW_TOKENS,
            "llm_onnx": "",
        }
        del engine
        bare = [sys.executable, "-c", BARE]
        rows: dict[str, tuple[list[float], list[float]]] = {}
        loads: list[float] = []
        gens: list[float] = []
        helps = [wall([*cmd, "--help"], env)[0] for _ in range(args.repeat)]
        search_ours = [wall([*cmd, "search", QUESTION], env)[0] for _ in range(args.repeat)]
        search_ort = [wall([sys.executable, "-c", BARE_ORT, json.dumps(job)], env)[0] for _ in range(args.repeat)]
        ask_ort = [
            wall([sys.executable, "-c", BARE_ORT, json.dumps({**job, "llm_onnx": llm_onnx})], env)[0]
            for _ in range(args.repeat if llm_onnx else 0)
        ]
        search_bare = [wall([*bare, json.dumps({**job, "llm": ""})], env)[0] for _ in range(args.repeat)]
        rows["search"] = (search_ours, search_ort)
        rows["search (vs torch)"] = (search_ours, search_bare)
        ask_ours = []
        for _ in range(args.repeat):
            seconds, out = wall([*cmd, "ask", QUESTION, "--max-new-tokens", str(NEW_TOKENS), "--json"], env)
            timings = json.loads(out)["timings"]
            ask_ours.append(seconds)
            loads.append(timings["load"])
            gens.append(timings["generate"])
        ask_bare = [wall([*bare, json.dumps(job)], env)[0] for _ in range(args.repeat)]
        if ask_ort:
            rows["ask (vs onnxruntime)"] = (ask_ours, ask_ort)
        rows["ask"] = (ask_ours, ask_bare)

    llm_kind = "the LLM's ONNX copy, float32" if llm_onnx else f"torch, {dtype}"
    print(
        f"cold starts, {args.repeat} new processes each, seconds (min / median / max); ask: {llm_kind}; bare "
        f"transformers: {dtype}"
    )
    print(f"{'':<32}{'ohlora-rag':>21}{'bare library':>22}{'ratio':>8}")
    print(f"{'ohlora-rag --help':<32}{stats(helps):>21}")
    for name, (ours, plain) in rows.items():
        ratio = statistics.median(ours) / statistics.median(plain)
        label = {
            "ask": f"ask ({NEW_TOKENS} tokens) vs transformers",
            "ask (vs onnxruntime)": f"ask ({NEW_TOKENS} tokens) vs onnxruntime",
            "search": "search vs onnxruntime",
            "search (vs torch)": "search vs transformers",
        }[name]
        print(f"{label:<32}{stats(ours):>21}{stats(plain):>22}{ratio:>7.2f}x")
    tps = [NEW_TOKENS / g for g in gens]
    print(f"  ask: model loading {stats(loads)} s; generation {stats(tps)} tokens/s")


if __name__ == "__main__":
    main()
