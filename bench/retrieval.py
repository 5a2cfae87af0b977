"""Retrieval benchmarks: ohlora-rag against the bare libraries doing the same work, side by side, with ratios.

(a) build-index encode throughput vs bare `SentenceTransformer.encode` of the same texts with the same model;
(b) per-question retrieval latency vs the seed's method (the question encoded once per DB row, compared in a
    Python loop);
(c) exact search on random 384-d vectors (100 k and 1 M rows; 1 and 64 queries): `VectorIndex.search` vs bare Faiss
    `IndexFlatIP` with default settings, numpy matmul + argmax, and the memory-read floor (matrix bytes / measured
    read bandwidth);
(d) the hybrid decision path (dense + BM25 + names, the fitted model) at 1 M rows of random vectors and synthetic
    texts, against the dense search alone.

(b) measures both decisions: the cosine threshold and the fitted model (calibrated on data/trust_calib.csv for
data/concepts.csv, with its known questions, and on the original pairs for the original DB).

Run: `python bench/retrieval.py [--home DIR] [--skip-encoder] [--sizes 100000,1000000]` (about 5 minutes here);
`--latency-only`: (b) on data/concepts.csv alone, with the search latency over the trust test file's questions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEED_DB = ROOT.parent / "shared" / "ohlora-data" / "concept_db.txt"
SEED_PAIRS = ROOT.parent / "shared" / "ohlora-data" / "sbert_train.csv"

QUESTIONS = [
    "What is cosine similarity?",
    "코사인 유사도가 뭐야?",
    "how does dropout prevent overfitting",
    "LoRA가 뭐야?",
    "precision vs recall",
    "what is a learning rate warm-up?",
    "배치 정규화 설명해줘",
    "why use cross-validation",
    "what is RAG",
    "Adam optimizer 원리",
]


def timed(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def bench_encode(paths: object, dbs: list[Path]) -> None:
    from sentence_transformers import SentenceTransformer

    from ohlora_rag.build import build_index
    from ohlora_rag.config import IndexConfig
    from ohlora_rag.data import load_concepts
    from ohlora_rag.device import quiet_transformers
    from ohlora_rag.models import choose_encoder

    quiet_transformers()
    ref = choose_encoder(None, paths)  # type: ignore[arg-type]
    print(f"\n(a) build-index vs bare SentenceTransformer.encode — encoder {ref.reference}")
    widths = [38, 8, 10, 10, 8]
    print(row(["DB", "entries", "ours t/s", "bare t/s", "ratio"], widths))
    for db_path in dbs:
        texts = load_concepts(db_path).texts

        def bare_encode() -> float:
            # Same conditions as build-index: a freshly loaded model, its first encode call, timed alone.
            model = SentenceTransformer(str(ref.path), device="cpu")
            start = time.perf_counter()
            model.encode(texts, prompt_name="passage", normalize_embeddings=True)
            return time.perf_counter() - start

        def bare_total() -> float:
            start = time.perf_counter()
            SentenceTransformer(str(ref.path), device="cpu").encode(
                texts, prompt_name="passage", normalize_embeddings=True
            )
            return time.perf_counter() - start

        bare_s = statistics.median([bare_encode() for _ in range(3)])
        ours_s = statistics.median(
            [build_index(IndexConfig(db=db_path, progress=False), paths).encode_seconds for _ in range(3)]
        )  # type: ignore[arg-type]
        name = db_path.name if db_path.parent.name != "data" else f"data/{db_path.name}"
        print(
            row(
                [
                    f"{name}: encode",
                    str(len(texts)),
                    f"{len(texts) / ours_s:.1f}",
                    f"{len(texts) / bare_s:.1f}",
                    f"{bare_s / ours_s:.2f}x",
                ],
                widths,
            )
        )
        total = statistics.median(
            [build_index(IndexConfig(db=db_path, progress=False), paths).total_seconds for _ in range(3)]
        )  # type: ignore[arg-type]
        bare_t = statistics.median([bare_total() for _ in range(3)])
        print(
            row(
                [
                    f"{name}: build vs load+encode",
                    str(len(texts)),
                    f"{len(texts) / total:.1f}",
                    f"{len(texts) / bare_t:.1f}",
                    f"{bare_t / total:.2f}x",
                ],
                widths,
            )
        )


def bench_seed_method(paths: object, db_path: Path) -> None:
    from ohlora_rag.build import build_index
    from ohlora_rag.config import IndexConfig, SearchConfig
    from ohlora_rag.retriever import Retriever

    own = db_path.name == "concepts.csv"
    calibration = ROOT / "data" / "trust_calib.csv" if own else SEED_PAIRS
    known = ROOT / "data" / "sbert_train.csv" if own else None  # the project DB's default known questions
    config = IndexConfig(
        db=db_path,
        progress=False,
        calibration=calibration,
        known_questions=known,
        use_known=own,
        use_conversations=False,  # the follow-up model plays no part in a search
    )
    build_index(config, paths)  # type: ignore[arg-type]
    retriever = Retriever.load(SearchConfig(threshold=0.5), paths)  # type: ignore[arg-type]
    hybrid = Retriever.load(SearchConfig(), paths)  # type: ignore[arg-type]
    assert hybrid.decision is not None
    unkeyed = Retriever.load(SearchConfig(), paths)  # type: ignore[arg-type]
    unkeyed.stored.known = None  # the same decision path without the known-question scan
    unkeyed.verification = None
    unverified = Retriever.load(SearchConfig(), paths)  # type: ignore[arg-type]
    unverified.verification = None  # the decision alone, without the entry verifier
    verifier = hybrid.entry_verifier()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(retriever.encoder.ref.path), device="cpu")  # the original's encoder object
    texts = [retriever.stored.entry(i)["text"] for i in range(retriever.stored.vectors.ntotal)]
    entries = model.encode(texts, prompt_name="passage", normalize_embeddings=True)

    def seed(question: str) -> int:
        # The original: encode the question once per DB row and compare in a Python loop.
        best, best_score = -1, -2.0
        for i, entry in enumerate(entries):
            q = model.encode([question], prompt_name="query", normalize_embeddings=True)[0]
            score = float(np.dot(q, entry) / (np.linalg.norm(q) * np.linalg.norm(entry)))
            if score > best_score:
                best, best_score = i, score
        return best

    def ours(question: str) -> int:
        retriever._recent.clear()  # each call a new question: no remembered query vector
        return retriever.search(question, 1).hits[0].position

    def ours_hybrid(question: str) -> int:
        hybrid._recent.clear()
        if verifier is not None:
            verifier._recent.clear()  # nor a remembered verifier pair
        return hybrid.search(question, 1).hits[0].position

    def ours_unverified(question: str) -> int:
        unverified._recent.clear()
        return unverified.search(question, 1).hits[0].position

    def ours_unkeyed(question: str) -> int:
        unkeyed._recent.clear()
        return unkeyed.search(question, 1).hits[0].position

    seed_s = statistics.median([timed(lambda q=q: seed(q), repeat=1, warmup=0) for q in QUESTIONS[:3]])
    # round-robin over the three paths, so a slow minute of this machine weighs on each alike
    samples: dict[str, list[float]] = {"ours": [], "hybrid": [], "unkeyed": [], "unverified": []}
    paths_ = {"ours": ours, "hybrid": ours_hybrid, "unkeyed": ours_unkeyed, "unverified": ours_unverified}
    for q in QUESTIONS:
        for fn in paths_.values():
            fn(q)  # warm-up
    for _ in range(5):
        for q in QUESTIONS:
            for name, fn in paths_.items():
                samples[name].append(timed(lambda fn=fn, q=q: fn(q), repeat=1, warmup=0))
    ours_s, hybrid_s, unkeyed_s, unverified_s = (
        statistics.median(samples[k]) for k in ("ours", "hybrid", "unkeyed", "unverified")
    )
    agree = sum(seed(q) == ours(q) for q in QUESTIONS[:3])
    print(f"\n(b) per-question retrieval on {db_path.name} ({len(texts)} entries)")
    widths = [34, 12, 12, 8]
    print(row(["method", "ms/question", "", "ratio"], widths))
    print(row(["seed: encode per row + loop", f"{seed_s * 1e3:.1f}", "", "1.00x"], widths))
    print(row(["ohlora-rag, cosine threshold", f"{ours_s * 1e3:.1f}", "", f"{seed_s / ours_s:.1f}x"], widths))
    print(
        row(
            ["ohlora-rag, entry decision model", f"{unverified_s * 1e3:.1f}", "", f"{seed_s / unverified_s:.1f}x"],
            widths,
        )
    )
    print(f"   decision model / threshold: {unverified_s / ours_s:.2f}x")
    if verifier is not None:
        print(
            row(["ohlora-rag, decision + verifier", f"{hybrid_s * 1e3:.1f}", "", f"{seed_s / hybrid_s:.1f}x"], widths)
        )
        print(
            f"   decision + verifier / decision alone: {hybrid_s / unverified_s:.2f}x "
            f"({type(verifier).__name__}, the decision's best {hybrid.verification.candidates} re-scored)"  # type: ignore[union-attr]
        )
    vectors = hybrid.encoder.encode_queries(QUESTIONS)  # the decision's own work, without the encoder's
    signals_s = timed(lambda: hybrid.signals(QUESTIONS, vectors), repeat=20) / len(QUESTIONS)
    unkeyed_signals_s = timed(lambda: unkeyed.signals(QUESTIONS, vectors), repeat=20) / len(QUESTIONS)
    print(
        f"   decision signals alone: {signals_s * 1e3:.2f} ms/question ({unkeyed_signals_s * 1e3:.2f} without known "
        "questions); the rest is encoding the question"
    )
    if hybrid.stored.known is not None:
        n = len(hybrid.stored.known)
        print(
            f"   with {n} known questions / without: {unverified_s * 1e3:.1f} / {unkeyed_s * 1e3:.1f} ms "
            f"({unverified_s / unkeyed_s:.2f}x)"
        )
    print(f"   same top entry on {agree}/3 questions")
    if own and verifier is not None:
        bench_verified_share(hybrid, unverified, retriever)


def bench_verified_share(hybrid: object, unverified: object, threshold: object) -> None:
    """Search latency over the trust test file's questions (new wordings, near-miss and unrelated questions: none
    of them a known or calibration question), each once, with the verified decision, the decision alone and the
    cosine threshold (the search before the decision), round-robin on the same questions — medians and means, since
    the verifier runs only on the questions the decision alone does not settle."""
    import csv

    from ohlora_rag.retriever import Retriever

    assert isinstance(hybrid, Retriever) and isinstance(unverified, Retriever) and isinstance(threshold, Retriever)
    verification, decision = hybrid.verification, hybrid.decision
    assert verification is not None and decision is not None
    with (ROOT / "data" / "trust_test.csv").open(encoding="utf-8") as fh:
        questions = [row["question"] for row in csv.DictReader(fh)]
    verifier = hybrid.entry_verifier()
    assert verifier is not None
    samples: dict[str, list[float]] = {"verified": [], "decision": [], "threshold": []}
    settled = 0
    for q in questions:
        for name, r in (("verified", hybrid), ("decision", unverified), ("threshold", threshold)):
            r._recent.clear()
            verifier._recent.clear()
            start = time.perf_counter()
            result = r.search(q, 1)
            samples[name].append(time.perf_counter() - start)
            if name == "decision":
                settled += verification.settled(result.hits[0].confidence or 0.0)
    v, d, t = samples["verified"], samples["decision"], samples["threshold"]
    print(
        f"   over data/trust_test.csv ({len(questions)} questions, each once): decision + verifier median "
        f"{statistics.median(v) * 1e3:.1f} ms, mean {statistics.fmean(v) * 1e3:.1f} ms; decision alone median "
        f"{statistics.median(d) * 1e3:.1f} ms, mean {statistics.fmean(d) * 1e3:.1f} ms "
        f"({statistics.median(v) / statistics.median(d):.2f}x / {statistics.fmean(v) / statistics.fmean(d):.2f}x); "
        f"the decision alone settles {settled}/{len(questions)} (below {verification.sure_below:.3f} or above "
        f"{verification.sure_above:.3f}), the verifier runs on the rest"
    )
    print(
        f"   the same questions with the cosine threshold: median {statistics.median(t) * 1e3:.1f} ms, mean "
        f"{statistics.fmean(t) * 1e3:.1f} ms; decision + verifier / threshold "
        f"{statistics.median(v) / statistics.median(t):.2f}x median, {statistics.fmean(v) / statistics.fmean(t):.2f}x "
        f"mean; decision alone / threshold {statistics.median(d) / statistics.median(t):.2f}x median, "
        f"{statistics.fmean(d) / statistics.fmean(t):.2f}x mean"
    )


def read_floor(x: np.ndarray) -> tuple[float, str]:
    """Seconds to stream the matrix once: the best of a 1-thread and an all-core read."""
    flat = x.reshape(-1).view(np.uint32)
    one = timed(lambda: flat.max(), repeat=3)
    cores = os.cpu_count() or 1
    parts = np.array_split(flat, cores)
    with ThreadPoolExecutor(cores) as pool:
        many = timed(lambda: list(pool.map(np.max, parts)), repeat=3)
    best = min(one, many)
    return best, f"{x.nbytes / best / 1e9:.1f} GB/s"


def bench_search(sizes: list[int], d: int = 384, k: int = 5) -> None:
    import faiss

    from ohlora_rag.store import VectorIndex

    print(f"\n(c) exact search, random unit vectors, d={d}, k={k}, faiss {faiss.__version__}, {os.cpu_count()} cores")
    widths = [10, 4, 10, 10, 10, 10, 12, 12]
    print(row(["rows", "nq", "ours ms", "faiss ms", "numpy ms", "floor ms", "ours/floor", "ours/numpy"], widths))
    rng = np.random.default_rng(0)
    for n in sizes:
        x = rng.standard_normal((n, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ours = VectorIndex.from_vectors(x)
        bare = faiss.IndexFlatIP(d)
        bare.add(x)
        floor_s, bandwidth = read_floor(x)
        for nq in (1, 64):
            q = x[rng.integers(0, n, nq)] + 0.01 * rng.standard_normal((nq, d), dtype=np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            rep = 5 if nq == 1 else 3
            ours_s = timed(lambda: ours.search(q, k), repeat=rep)
            bare_s = timed(lambda: bare.search(q, k), repeat=rep)
            numpy_s = timed(lambda: np.argmax(q @ x.T, axis=1), repeat=rep)
            assert np.array_equal(ours.search(q, k)[1], bare.search(q, k)[1])
            print(
                row(
                    [
                        f"{n:,}",
                        str(nq),
                        f"{ours_s * 1e3:.1f}",
                        f"{bare_s * 1e3:.1f}",
                        f"{numpy_s * 1e3:.1f}",
                        f"{floor_s * 1e3:.1f}",
                        f"{ours_s / floor_s:.2f}x",
                        f"{ours_s / numpy_s:.2f}x",
                    ],
                    widths,
                )
            )
        print(f"   read bandwidth {bandwidth}")


def bench_hybrid(n: int, d: int = 384, nq: int = 20) -> None:
    """The decision path at n rows: random unit vectors, texts of 12 words drawn from a 50 k-word vocabulary."""
    from ohlora_rag.decision import FEATURES, DecisionModel
    from ohlora_rag.lexical import LexicalIndex
    from ohlora_rag.retriever import Retriever
    from ohlora_rag.store import ScoreStats, StoredIndex, VectorIndex

    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    texts = [f"{a} {b} : " + " ".join(rest) for a, b, *rest in vocab[rng.integers(0, len(vocab), (n, 12))]]
    start = time.perf_counter()
    lexical = LexicalIndex.build(texts)
    stats = ScoreStats.of(x)
    build_s = time.perf_counter() - start
    import pyarrow as pa

    entries = pa.table({"position": np.arange(n), "id": [str(i) for i in range(n)], "text": texts})
    stored = StoredIndex(Path("."), VectorIndex.from_vectors(x), entries, None, lexical, stats)  # type: ignore[arg-type]
    f = len(FEATURES)
    model = DecisionModel(coef=[1.0] * f, intercept=0.0, mean=[0.0] * f, scale=[1.0] * f, cutoff=0.5)

    class _Fixed:  # the query vectors are given; the encoder is benchmarked in (a) and (b)
        def __init__(self) -> None:
            self.vectors = x[:1]

        def encode_queries(self, _texts: list[str]) -> np.ndarray:
            return self.vectors

    fixed = _Fixed()
    hybrid = Retriever(stored, fixed, 0.5, model)  # type: ignore[arg-type]
    dense = Retriever(stored, fixed, 0.5)  # type: ignore[arg-type]
    picks = rng.integers(0, n, nq)
    questions = [" ".join(texts[i].split()[3:7]) for i in picks]
    vectors = x[picks] + 0.02 * rng.standard_normal((nq, d), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def run(retriever: Retriever) -> float:
        times = []
        for q, v in zip(questions, vectors):
            fixed.vectors = v[None, :]
            times.append(timed(lambda q=q, r=retriever: r.search(q, 5), repeat=3))
        return statistics.median(times)

    dense_s, hybrid_s = run(dense), run(hybrid)
    print(f"\n(d) the entry decision at {n:,} rows (synthetic texts; BM25 + score statistics built in {build_s:.0f} s)")
    widths = [34, 12, 8]
    print(row(["path", "ms/question", "ratio"], widths))
    print(row(["dense search + threshold", f"{dense_s * 1e3:.1f}", "1.00x"], widths))
    print(row(["dense + BM25 + decision model", f"{hybrid_s * 1e3:.1f}", f"{hybrid_s / dense_s:.2f}x"], widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="home folder with models/ (default: a temporary copy-free home)")
    parser.add_argument("--skip-encoder", action="store_true", help="only run (c)")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--hybrid-rows", type=int, default=1_000_000, help="rows for (d); 0 skips it")
    parser.add_argument(
        "--latency-only", action="store_true", help="only (b) on data/concepts.csv: per-question search latency"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ohlora_rag.config import Paths

    if not args.skip_encoder:
        home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="ohlora-bench-"))
        paths = Paths.resolve(home)
        if not args.home:  # reuse this checkout's converted models, index into the temporary home
            (home / "models").mkdir(parents=True, exist_ok=True)
            if (ROOT / "models" / "base").exists():
                (home / "models" / "base").symlink_to(ROOT / "models" / "base")
            if (ROOT / "models" / "sbert").exists():
                (home / "models" / "sbert").symlink_to(ROOT / "models" / "sbert")
        dbs = [ROOT / "data" / "concepts.csv"] + ([SEED_DB] if SEED_DB.exists() and not args.latency_only else [])
        if args.latency_only:
            bench_seed_method(paths, dbs[0])
            return
        bench_encode(paths, dbs)
        for db in dbs[::-1]:  # the original DB first (the seed's own numbers), then the project's with known questions
            bench_seed_method(paths, db)
    bench_search([int(s) for s in args.sizes.split(",")])
    if args.hybrid_rows:
        bench_hybrid(args.hybrid_rows)


if __name__ == "__main__":
    main()
