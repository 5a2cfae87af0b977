"""The Faiss store: an exact inner-product index over L2-normalised vectors, its entries and its manifest.

On disk an index is a folder holding `CURRENT` (the name of the active build) and one `build-*` folder per build
with `faiss.index`, `entries.parquet`, `score_stats.npz`, `bm25/`, `known_questions.npz` (when built with known
questions) and `manifest.json`. A build is written completely
into a fresh staging folder and only then published by atomically replacing `CURRENT`, so a failed or killed build
leaves the previous index loadable. Publishing (rename, `CURRENT`, removing older builds) holds the lock file
`index/.lock`, so concurrent builds take turns and never remove the published build or each other's staging
folders; a reader whose build was removed under it reads `CURRENT` once more. The manifest records every file's size
and sha256; loading checks them, so a damaged build is refused, not served.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import (
    COMPACT_TIMESTAMP,
    check_types,
    file_record,
    read_json_object,
    staged_publish,
    utc_timestamp,
    write_json,
    write_text,
)
from .errors import IndexNotFoundError, OhloraError
from .lexical import LEXICAL_DIR, LexicalIndex
from .locks import abandoned

FORMAT_VERSION = 1
POINTER = "CURRENT"
LOCK_FILE = ".lock"
FAISS_FILE = "faiss.index"
ENTRIES_FILE = "entries.parquet"
MANIFEST_FILE = "manifest.json"
STATS_FILE = "score_stats.npz"
KEYS_FILE = "known_questions.npz"
#: What `CURRENT` may hold: a build folder's plain name (no path separators; ".." is refused separately).
_BUILD_NAME = re.compile(r"build-[A-Za-z0-9._-]{1,200}")
#: Files up to this size are checked against their sha256 at every load (the project's 160 x 384 index: ~1.5 MB, ~1 ms);
#: larger ones by size only, so loading a million-row index does not read it twice.
HASH_UP_TO_BYTES = 128 * 2**20
#: A cosine between unit vectors lies in [-1, 1]; float32 rounding stays far inside this slack.
COSINE_LIMIT = 1.001

# Search tuning, measured by bench/retrieval.py on 2 cores (1 M x 384):
# - one query: Faiss's scan is memory-bound and its OpenMP split of a single query costs ~3x; one thread reads
#   at the floor.
# - from this many queries up, the BLAS (sgemm) path beats the per-query scan; Faiss's own default threshold
#   (128000 queries in this version) keeps 64 queries on the scan, ~4x slower than a matmul.
_BLAS_FROM_QUERIES = 8
# - one query over many rows: one thread cannot saturate memory bandwidth; a scan split into one slice per core
#   (each slice single-threaded) reads at the all-core floor (44.7 ms vs 53.7 ms on 1 M x 384, 2 cores).
SPLIT_FROM_ROWS = 65536


@dataclass
class Manifest:
    """What made an index; `search` checks it against the encoder it would use."""

    encoder: str
    encoder_fingerprint: str
    dim: int
    count: int
    corpus_hash: str
    db: str
    faiss_version: str
    metric: str = "inner_product"
    normalized: bool = True
    threshold: float | None = None
    decision: dict[str, Any] | None = None
    """The fitted entry decision (decision.DecisionModel as a dict); None means the cosine threshold alone."""
    follow: dict[str, Any] | None = None
    """The fitted follow-up model (conversation.FollowModel as a dict); None means the hand-written rule."""
    verify: dict[str, Any] | None = None
    """How the entry verifier joins the decision (verifier.Verification as a dict); None: the decision alone."""
    lexical: bool = False
    """The build holds a BM25 index of the entries and the entries' score statistics (hybrid retrieval)."""
    known_questions: int = 0
    """How many labelled questions the build holds as extra match keys (`known_questions.npz`); 0: none."""
    files: dict[str, dict[str, Any]] | None = None
    """Every file of the build but the manifest: relative name -> {"size": bytes, "sha256": hex}. None in builds
    made before checksums were recorded (loaded unchecked)."""
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=utc_timestamp)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Read and type-check a build's manifest; anything unreadable is the one-line "damaged" error."""
        try:
            manifest = cls(**read_json_object(path))
            check_types(manifest, _MANIFEST_TYPES)
            return manifest
        except (OSError, ValueError, TypeError) as exc:
            raise _damaged(path.parent.parent, f"{path.parent.name}/{path.name}: {_first_line(exc)}") from None


_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "encoder": (str,),
    "encoder_fingerprint": (str,),
    "dim": (int,),
    "count": (int,),
    "corpus_hash": (str,),
    "db": (str,),
    "faiss_version": (str,),
    "metric": (str,),
    "normalized": (bool,),
    "threshold": (int, float, type(None)),
    "decision": (dict, type(None)),
    "follow": (dict, type(None)),
    "verify": (dict, type(None)),
    "lexical": (bool,),
    "known_questions": (int,),
    "files": (dict, type(None)),
    "format_version": (int,),
    "created": (str,),
}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _damaged(index_dir: Path, detail: str) -> IndexNotFoundError:
    return IndexNotFoundError(f"index at {index_dir} is damaged ({detail}) — run `ohlora-rag build-index`")


def _faiss() -> Any:
    import faiss

    return faiss


def gpu_available() -> bool:
    """True when this Faiss build has GPU support and sees a GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """Exact inner-product search (`faiss.IndexFlatIP`); row i of the index is entry position i.

    Moved to the GPU when Faiss has GPU support and a GPU is present; the same calls run on the CPU otherwise.
    """

    def __init__(self, index: Any) -> None:
        self._gpu_resources: Any = None
        self._pool: Any = None
        self.index = index
        if gpu_available():
            faiss = _faiss()
            self._gpu_resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray) -> VectorIndex:
        """Args: vectors: float32 (n, d), rows of unit length."""
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(index)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """The stored vectors of some rows: float32 (len(positions), d)."""
        ids = np.ascontiguousarray(positions, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.index.reconstruct_batch(ids), dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product.

        Args:
            queries: float32 (nq, d).
            k: hits per query (capped at the index size).

        Returns:
            scores float32 (nq, k) and positions int64 (nq, k), best first.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.ntotal)
        if self.on_gpu:
            return self.index.search(queries, k)  # type: ignore[no-any-return]
        faiss = _faiss()
        threads, threshold = faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold
        if len(queries) == 1 and threads > 1 and self.ntotal >= SPLIT_FROM_ROWS and hasattr(self.index, "get_xb"):
            return self._split_scan(queries, k, threads)
        try:
            if len(queries) == 1:
                faiss.omp_set_num_threads(1)
            elif len(queries) >= _BLAS_FROM_QUERIES:
                faiss.cvar.distance_compute_blas_threshold = _BLAS_FROM_QUERIES  # (lowering it for 1 query costs 2x)
            return self.index.search(queries, k)  # type: ignore[no-any-return]
        finally:
            faiss.omp_set_num_threads(threads)
            faiss.cvar.distance_compute_blas_threshold = threshold

    def _split_scan(self, query: np.ndarray, k: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
        """One query, the rows cut into `parts` slices searched at once (one thread each), results merged."""
        from concurrent.futures import ThreadPoolExecutor

        faiss = _faiss()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(parts, initializer=lambda: faiss.omp_set_num_threads(1))
        rows = faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)  # no copy
        bounds = np.linspace(0, self.ntotal, parts + 1, dtype=np.int64)
        slices = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

        def scan(bound: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            lo, hi = bound
            scores, positions = faiss.knn(query, rows[lo:hi], min(k, hi - lo), metric=faiss.METRIC_INNER_PRODUCT)
            return scores, positions + lo

        found = list(self._pool.map(scan, slices))
        scores = np.concatenate([f[0] for f in found], axis=1)  # (1, parts * k)
        positions = np.concatenate([f[1] for f in found], axis=1)
        best = np.argsort(-scores[0], kind="stable")[:k]
        return scores[:, best], positions[:, best]

    def save(self, path: Path) -> None:
        faiss = _faiss()
        cpu = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        faiss.write_index(cpu, str(path))

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        return cls(_faiss().read_index(str(path)))


@dataclass
class ScoreStats:
    """Mean vector and covariance of the entry vectors: a question's mean cosine over the whole DB is q.mean and
    its variance q^T cov q, exact and O(d^2) whatever the DB size."""

    mean: np.ndarray  # float64 (d,)
    cov: np.ndarray  # float64 (d, d)

    @classmethod
    def of(cls, vectors: np.ndarray) -> ScoreStats:
        """Args: vectors: float32 (n, d)."""
        v = vectors.astype(np.float64)
        mean = v.mean(axis=0)
        centred = v - mean
        return cls(mean, centred.T @ centred / max(len(v), 1))

    def mu_sigma(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query (nq, d): mean and standard deviation of its cosines to every entry, each (nq,)."""
        q = queries.astype(np.float64)
        var = np.einsum("nd,de,ne->n", q, self.cov, q)
        return q @ self.mean, np.sqrt(np.maximum(var, 0.0))

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez(fh, mean=self.mean, cov=self.cov)

    @classmethod
    def load(cls, path: Path) -> ScoreStats:
        with np.load(path) as data:
            return cls(data["mean"], data["cov"])


@dataclass
class KnownQuestions:
    """Labelled questions stored with an index as extra match keys: a new wording of a question someone already
    asked lies closer to that question than to the entry's text. Position -1: a question no entry answers."""

    vectors: np.ndarray  # float32 (m, d), unit rows (query side)
    positions: np.ndarray  # int64 (m,)
    questions: np.ndarray  # str (m,)

    def __len__(self) -> int:
        return len(self.positions)

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez(fh, vectors=self.vectors, positions=self.positions, questions=self.questions)

    @classmethod
    def load(cls, path: Path) -> KnownQuestions:
        with np.load(path) as data:  # no pickles: the questions are a fixed-width unicode array
            return cls(data["vectors"], data["positions"].astype(np.int64), data["questions"])


@dataclass
class StoredIndex:
    """A loaded index folder: vectors, entries table and manifest."""

    folder: Path
    vectors: VectorIndex
    entries: Any  # pyarrow.Table: position, id, text, metadata...
    manifest: Manifest
    lexical: LexicalIndex | None = None
    stats: ScoreStats | None = None
    known: KnownQuestions | None = None

    def entry(self, position: int) -> dict[str, Any]:
        return {name: self.entries.column(name)[position].as_py() for name in self.entries.column_names}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`VectorIndex.search` that refuses cosines no pair of unit vectors can have (a damaged index).

        Args:
            queries: float32 (nq, d), rows of unit length.
            k: hits per query.

        Returns:
            scores float32 (nq, k) and positions int64 (nq, k), best first.
        """
        scores, positions = self.vectors.search(queries, k)
        self.check_cosines(scores[positions >= 0])
        return scores, positions

    def check_cosines(self, scores: np.ndarray) -> None:
        """Raise the "damaged" error when a score lies outside [-COSINE_LIMIT, COSINE_LIMIT] or is not a number."""
        bad = ~((scores >= -COSINE_LIMIT) & (scores <= COSINE_LIMIT))
        if bad.any():
            value = float(np.asarray(scores)[bad].flat[0])
            raise _damaged(self.folder.parent, f"a search returned the cosine {value:.6g}, outside [-1, 1]")


#: How many times `load_index` follows `CURRENT` to a newer build when the one it was loading was removed.
RELOADS = 10


def _read_pointer(index_dir: Path) -> str:
    """The build name in `CURRENT`: a plain `build-...` folder name, or the one-line "damaged" error."""
    pointer = index_dir / POINTER
    if not pointer.exists():
        raise IndexNotFoundError(f"no index at {index_dir} — run `ohlora-rag build-index`")
    try:
        with pointer.open("rb") as fh:
            raw = fh.read(256)
    except OSError as exc:
        raise _damaged(index_dir, f"{POINTER} is unreadable: {exc.strerror or exc}") from None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _damaged(index_dir, f"{POINTER} is not valid UTF-8") from None
    if not _BUILD_NAME.fullmatch(name) or ".." in name:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise _damaged(index_dir, f"{POINTER} holds {shown!r}, not the name of a build folder")
    return name


def _build_folder(index_dir: Path, name: str) -> Path:
    build = index_dir / name
    if not (build / MANIFEST_FILE).is_file():
        raise IndexNotFoundError(
            f"index at {index_dir} points at a missing build {name} — run `ohlora-rag build-index`"
        )
    if build.resolve().parent != index_dir.resolve():
        raise _damaged(index_dir, f"{POINTER} names {name}, which leads outside {index_dir}")
    return build


def active_build(index_dir: Path) -> Path:
    """The folder of the published build, or IndexNotFoundError saying how to make one."""
    return _build_folder(index_dir, _read_pointer(index_dir))


def load_index(index_dir: Path) -> StoredIndex:
    """Load the published build of an index folder, its files checked against the manifest.

    A build published meanwhile removes the one `CURRENT` named a moment ago; the reader then reads `CURRENT`
    again and loads the new build instead of failing — as long as `CURRENT` keeps changing (two builds that
    finish together publish one right after the other), up to `RELOADS` times.
    """
    name = _read_pointer(index_dir)
    for _ in range(RELOADS):
        try:
            return _load_build(index_dir, name)
        except IndexNotFoundError:
            again = _read_pointer(index_dir)
            if again == name:
                raise
            name = again
    return _load_build(index_dir, name)


def _load_build(index_dir: Path, name: str) -> StoredIndex:
    import pyarrow as pa
    import pyarrow.parquet as pq

    build = _build_folder(index_dir, name)
    manifest = Manifest.read(build / MANIFEST_FILE)
    if manifest.format_version != FORMAT_VERSION:
        raise IndexNotFoundError(
            f"index at {index_dir} has format {manifest.format_version}, this version reads {FORMAT_VERSION} — "
            "run `ohlora-rag build-index`"
        )
    _verify_files(index_dir, build, manifest)
    try:
        vectors = VectorIndex.load(build / FAISS_FILE)
        entries = pq.ParquetFile(build / ENTRIES_FILE).read()  # not read_table, which imports pandas (0.25 s)
        lexical = LexicalIndex.load(build) if manifest.lexical else None
        stats = ScoreStats.load(build / STATS_FILE) if manifest.lexical else None
        known = KnownQuestions.load(build / KEYS_FILE) if manifest.known_questions else None
    except (RuntimeError, OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise _damaged(index_dir, _first_line(exc)) from None
    if vectors.ntotal != manifest.count or entries.num_rows != manifest.count or vectors.dim != manifest.dim:
        raise IndexNotFoundError(
            f"index at {index_dir} is inconsistent (manifest {manifest.count} entries, Faiss {vectors.ntotal}, "
            f"table {entries.num_rows}) — run `ohlora-rag build-index`"
        )
    if known is not None and (
        len(known) != manifest.known_questions
        or known.vectors.shape != (len(known), manifest.dim)
        or int(known.positions.max(initial=-1)) >= manifest.count
        or int(known.positions.min(initial=-1)) < -1
    ):
        raise IndexNotFoundError(
            f"index at {index_dir} is inconsistent (its known questions do not fit its entries) — run "
            "`ohlora-rag build-index`"
        )
    return StoredIndex(build, vectors, entries, manifest, lexical, stats, known)


def _verify_files(index_dir: Path, build: Path, manifest: Manifest) -> None:
    """Sizes of every recorded file, and the sha256 of those up to HASH_UP_TO_BYTES, against the manifest."""
    files = manifest.files
    if files is None:
        return  # a build made before checksums were recorded
    needed = [FAISS_FILE, ENTRIES_FILE] + ([STATS_FILE, f"{LEXICAL_DIR}/"] if manifest.lexical else [])
    needed += [KEYS_FILE] if manifest.known_questions else []
    for want in needed:
        if not any(name == want or (want.endswith("/") and name.startswith(want)) for name in files):
            raise _damaged(index_dir, f"the manifest of {build.name} lists no {want}")
    for name, record in files.items():
        parts = Path(name).parts
        if (
            Path(name).is_absolute()
            or not parts
            or ".." in parts
            or not isinstance(record, dict)
            or not isinstance(record.get("size"), int)
            or not isinstance(record.get("sha256"), str)
        ):
            raise _damaged(index_dir, f"the manifest of {build.name} has an unreadable file record {name!r}")
        path = build / name
        try:
            size = path.stat().st_size
            matches = size > HASH_UP_TO_BYTES or file_record(path)["sha256"] == record["sha256"]
        except OSError as exc:  # also a build removed by a newer one while this reader checked it
            detail = "is missing" if isinstance(exc, FileNotFoundError) else f"is unreadable: {exc.strerror or exc}"
            raise _damaged(index_dir, f"{build.name}/{name} {detail}") from None
        if size != record["size"]:
            raise _damaged(index_dir, f"{build.name}/{name} is {size} bytes, the manifest says {record['size']}")
        if not matches:
            raise _damaged(index_dir, f"{build.name}/{name} does not match the sha256 in its manifest")


def check_writable(index_dir: Path) -> None:
    """Refuse, before any encoding, an index folder this process cannot write into."""
    if index_dir.exists() and not index_dir.is_dir():
        raise OhloraError(f"{index_dir} is a file, not a folder — move it away so build-index can create index/ there")
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        probe = index_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OhloraError(
            f"cannot write into the index folder {index_dir} ({exc.strerror or exc}) — make it writable, or pass "
            "--home with a writable folder"
        ) from None


def write_index(
    index_dir: Path,
    vectors: VectorIndex,
    entries: Any,
    manifest: Manifest,
    lexical: LexicalIndex | None = None,
    stats: ScoreStats | None = None,
    known: KnownQuestions | None = None,
) -> Path:
    """Write a complete build folder with each file's size and sha256 in its manifest, then publish it by
    atomically replacing `CURRENT`.

    Publishing holds `index/.lock`: the rename into place, `CURRENT` and the removal of older builds happen one
    build at a time. Removed are builds older than the one published and staging folders whose writer is gone.

    Returns:
        The new build folder.
    """
    import pyarrow.parquet as pq

    check_writable(index_dir)
    build = index_dir / f"build-{utc_timestamp(COMPACT_TIMESTAMP)}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}"

    def publish(staging: Path) -> None:
        os.replace(staging, build)
        write_text(index_dir / POINTER, build.name + "\n")  # via .CURRENT.tmp-<pid>, which _remove_stale knows
        with contextlib.suppress(OSError):  # the new index is published; leftovers wait for the next build
            _remove_stale(index_dir, keep=build.name)

    staged = staged_publish(
        index_dir / f".staging-{build.name}", index_dir / LOCK_FILE, f"the index at {index_dir}", publish
    )
    try:
        with staged as staging:
            staging.mkdir()
            vectors.save(staging / FAISS_FILE)
            pq.write_table(entries, staging / ENTRIES_FILE)
            names = [FAISS_FILE, ENTRIES_FILE]
            if lexical is not None and stats is not None:
                lexical.save(staging)
                stats.save(staging / STATS_FILE)
                names += [STATS_FILE, *(f"{LEXICAL_DIR}/{p.name}" for p in sorted((staging / LEXICAL_DIR).iterdir()))]
            if known is not None:
                known.save(staging / KEYS_FILE)
                names.append(KEYS_FILE)
                manifest = replace(manifest, known_questions=len(known))
            written = replace(manifest, files={name: file_record(staging / name) for name in names})
            write_json(staging / MANIFEST_FILE, asdict(written))
    except (OSError, RuntimeError) as exc:  # Faiss reports a failed write as RuntimeError
        raise OhloraError(f"could not write the index under {index_dir}: {exc}") from None
    return build


def _remove_stale(index_dir: Path, keep: str) -> None:
    """Under the publish lock: delete builds older than `keep` and leftovers of writers that are gone.

    Builds are renamed into place only under the lock, so no build other than `keep` will be published again; a
    reader still loading one reads `CURRENT` once more. A staging folder is removed only when its writer process
    is gone (or it is a day old), never while another build is writing it.
    """
    published = (index_dir / keep).stat().st_mtime
    for child in index_dir.iterdir():
        if child.name == keep or child.is_symlink():
            continue
        if child.name.startswith("build-") and child.is_dir():
            with contextlib.suppress(OSError):
                if child.stat().st_mtime <= published:
                    shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith(".staging-") and child.is_dir() and abandoned(child):
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith(f".{POINTER}.tmp-") and abandoned(child):
            child.unlink(missing_ok=True)
