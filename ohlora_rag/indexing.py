"""`build-index`: encode a concept DB with the chosen encoder and publish an exact inner-product index."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import IndexConfig, Paths
from .data import load_concepts
from .encoder import Encoder
from .index import Manifest, VectorIndex, write_index
from .models import choose_encoder, read_manifest


@dataclass
class BuildReport:
    """What `build_index` did, for the CLI to print."""

    manifest: Manifest
    folder: str
    on_gpu: bool
    encode_seconds: float
    total_seconds: float


def build_index(config: IndexConfig | None = None, paths: Paths | None = None) -> BuildReport:
    """Encode the concept DB and publish the index under `paths.index_dir`.

    Args:
        config: DB, encoder, batch size (defaults: data/concepts.csv, models/sbert/ or the base encoder).
        paths: home folder layout (default: from $OHLORA_HOME or the current directory).

    Returns:
        The manifest and timings of the new build.
    """
    import faiss

    config = config or IndexConfig()
    paths = paths or Paths.resolve()
    start = time.perf_counter()
    db = load_concepts(config.db or paths.default_db)  # validate the data before loading any model
    ref = choose_encoder(config.encoder, paths)
    encoder = Encoder(ref)
    t0 = time.perf_counter()
    vectors = encoder.encode_passages(db.texts, batch_size=config.batch_size, progress=config.progress)  # (n, d)
    encode_seconds = time.perf_counter() - t0
    store = VectorIndex.from_vectors(vectors)
    calibrated = (read_manifest(ref.path) or {}).get("threshold")
    manifest = Manifest(
        encoder=ref.reference,
        encoder_fingerprint=encoder.fingerprint,
        dim=store.dim,
        count=store.ntotal,
        corpus_hash=db.content_hash,
        db=str(db.path),
        faiss_version=faiss.__version__,
        threshold=float(calibrated) if isinstance(calibrated, (int, float)) else None,
    )
    folder = write_index(paths.index_dir, store, db.to_arrow(), manifest)
    return BuildReport(manifest, str(folder), store.on_gpu, encode_seconds, time.perf_counter() - start)
