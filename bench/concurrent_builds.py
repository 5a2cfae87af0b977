"""Concurrent builds, the issue's loop: each round starts two `ohlora-rag build-index -q` in one home at once, waits
for both, then runs `ohlora-rag search`; a reader thread loads the published index all the while.

    for r in $(seq 20); do ohlora-rag --home $H build-index -q & ohlora-rag --home $H build-index -q & wait
                          ohlora-rag --home $H search x; done

Per round: both builds' exit codes and seconds, the build `index/CURRENT` names (and that it exists), the search's
exit code and hits, the reader's loads (ok / failed) during the round, builds and staging folders left on disk.
Then a summary: rounds, index loadable after every round, reader loads that failed, rounds that lost the index.
The home is a temporary folder with the first `--entries` rows of data/concepts.csv; its models/base is a link to
this checkout's, so the built-in encoder is converted at most once.

Run: `python bench/concurrent_builds.py [--rounds 20] [--entries 24] [--encoder REF]` (about 20 s a round here).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_home(entries: int) -> Path:
    home = Path(tempfile.mkdtemp(prefix="ohlora-bench-builds-"))
    (home / "data").mkdir()
    with (ROOT / "data" / "concepts.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    with (home / "data" / "concepts.csv").open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows[: entries + 1])
    (ROOT / "models" / "base").mkdir(parents=True, exist_ok=True)
    (home / "models").mkdir()
    (home / "models" / "base").symlink_to(ROOT / "models" / "base")
    return home


class Reader(threading.Thread):
    """Loads the published index (manifest, checksums, vectors) over and over, as `search` does."""

    def __init__(self, index_dir: Path) -> None:
        super().__init__(daemon=True)
        self.index_dir = index_dir
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from ohlora_rag.errors import IndexNotFoundError
        from ohlora_rag.store import load_index

        while not self.stop.is_set():
            try:
                load_index(self.index_dir)
                self.ok += 1
            except IndexNotFoundError:
                pass  # before the first publish
            except Exception as exc:  # noqa: BLE001 — counted and shown, not raised: the point is to see them
                self.failed += 1
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--entries", type=int, default=24, help="rows of data/concepts.csv in the small DB")
    parser.add_argument("--encoder", help="passed to build-index and search (default: theirs)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from ohlora_rag.store import POINTER

    home = make_home(args.entries)
    index_dir = home / "index"
    cli = [sys.executable, "-m", "ohlora_rag"]  # the `ohlora-rag` command of this interpreter
    encoder = ["--encoder", args.encoder] if args.encoder else []
    build = [*cli, "--home", str(home), "build-index", "-q", "--no-calibrate", *encoder]
    search = [*cli, "--home", str(home), "search", "x", "--json", *encoder]
    print(f"{args.rounds} rounds of 2 concurrent build-index + search, {args.entries} entries, home {home}")
    print(
        f"{'round':>5}  {'builds rc':>9}  {'build s':>11}  {'CURRENT':<40}{'exists':>7}  {'search':>6}  {'hits':>4}"
        f"  {'reads ok/failed':>15}  {'builds':>6}  {'staging':>7}"
    )
    reader = Reader(index_dir)
    reader.start()
    summary = {"rounds": 0, "builds_ok": 0, "loadable": 0, "lost": 0}
    try:
        for round_ in range(1, args.rounds + 1):
            ok0, failed0 = reader.ok, reader.failed
            start = time.perf_counter()
            procs = [
                subprocess.Popen(build, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
            ]
            seconds, codes, errors = [], [], []
            for proc in procs:
                _, err = proc.communicate()
                seconds.append(time.perf_counter() - start)
                codes.append(proc.returncode)
                if proc.returncode != 0 or "Traceback" in err:
                    errors.append(err.strip().splitlines()[-1] if err.strip() else f"rc {proc.returncode}")
            pointer = index_dir / POINTER
            name = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else "(none)"
            exists = (index_dir / name / "manifest.json").is_file()
            found = subprocess.run(search, capture_output=True, text=True)
            hits = len(json.loads(found.stdout)["hits"]) if found.returncode == 0 else 0
            folders = [p.name for p in index_dir.iterdir() if p.is_dir()]
            builds = sum(n.startswith("build-") for n in folders)
            staging = sum(n.startswith(".staging-") for n in folders)
            reads = f"{reader.ok - ok0}/{reader.failed - failed0}"
            print(
                f"{round_:>5}  {' '.join(map(str, codes)):>9}  {' '.join(f'{s:.1f}' for s in seconds):>11}  "
                f"{name:<40}{'yes' if exists else 'NO':>7}  {found.returncode:>6}  {hits:>4}  {reads:>15}  "
                f"{builds:>6}  {staging:>7}",
                flush=True,
            )
            for error in errors:
                print(f"       build error: {error}")
            summary["rounds"] += 1
            summary["builds_ok"] += sum(code == 0 for code in codes)
            summary["loadable"] += int(exists and found.returncode == 0 and hits > 0)
            summary["lost"] += int(not exists or found.returncode != 0)
    finally:
        reader.stop.set()
        reader.join()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    print(
        f"\nsummary: {summary['rounds']} rounds; builds exited 0: {summary['builds_ok']}/{2 * summary['rounds']}; "
        f"index loadable and searched after the round: {summary['loadable']}/{summary['rounds']}; "
        f"rounds that lost the index: {summary['lost']}; reader loads during the builds: {reader.ok} ok, "
        f"{reader.failed} failed"
    )
    for error in sorted(set(reader.errors))[:5]:
        print(f"  reader error: {error}")


if __name__ == "__main__":
    main()
