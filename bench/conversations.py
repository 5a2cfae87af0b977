"""What conversation memory costs per turn: every question of a conversations file searched alone (the bare search,
no memory), with the hand-written follow-up rule, with the fitted follow-up model (one more search per turn once
there is a topic: the question together with the topic's text), and with the model and its judge (one cross-encoder
pass per turn on torch, when the index has a judge).

Each way replays the whole file `--repeat` times after one warm-up pass on the published index (the encoder's ONNX
copy when there is one); printed: milliseconds per turn (median over the repeats) and the ratio to the bare search.

Run: `python bench/conversations.py [--data data/conversations_holdout.jsonl] [--repeat 3]` after
`ohlora-rag build-index` (with the project's DB it fits the follow-up model; about a minute here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "conversations_holdout.jsonl")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from ohlora_rag.config import Paths
    from ohlora_rag.conversation import Conversation
    from ohlora_rag.data import load_conversations
    from ohlora_rag.retriever import Retriever

    retriever = Retriever.load(paths=Paths.resolve())
    if retriever.follow is None:
        sys.exit("the published index has no follow-up model — run `ohlora-rag build-index` on the project's DB")
    conversations = load_conversations(args.data)
    turns = sum(len(c) for c in conversations)

    def alone() -> None:
        for turns_ in conversations:
            for turn in turns_:
                retriever.search(turn.question)

    def replay(rule: bool, judge: bool = False) -> None:
        for turns_ in conversations:
            conversation = Conversation(retriever, rule=rule, judge=judge)
            for turn in turns_:
                conversation.search(turn.question)

    ways = {
        "bare search (no memory)": alone,
        "hand-written rule": lambda: replay(True),
        "follow-up model": lambda: replay(False),
    }
    if retriever.follow_judge() is not None:
        ways["follow-up model + judge"] = lambda: replay(False, judge=True)
    timings: dict[str, list[float]] = {name: [] for name in ways}
    for way in ways.values():
        way()  # warm-up: encoder sessions, caches
    for _ in range(args.repeat):  # interleaved, so a drift of the machine's speed hits every way alike
        for name, way in ways.items():
            retriever._recent.clear()  # each pass encodes its questions, as a new conversation would
            start = time.perf_counter()
            way()
            timings[name].append((time.perf_counter() - start) / turns * 1000)
    base = statistics.median(timings["bare search (no memory)"])
    print(f"{args.data.name}: {len(conversations)} conversations, {turns} turns, {args.repeat} repeats")
    for name, values in timings.items():
        ms = statistics.median(values)
        print(f"{name:<26}{ms:>8.1f} ms/turn{ms / base:>8.2f}x")


if __name__ == "__main__":
    main()
