"""`build-index`: encode a concept DB, publish an exact inner-product index with its BM25 part and known questions,
and fit the entry decision on a labelled calibration file when there is one."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import CONVERSATIONS_TRAIN_DATA, FALLBACK_THRESHOLD, SBERT_TRAIN_DATA, IndexConfig, Paths
from .conversation import JUDGE_CUTOFF, JUDGE_WEIGHT, FollowModel, fit_follow
from .data import (
    ConceptDB,
    ConversationTurn,
    LabelledQuestions,
    load_concepts,
    load_conversations,
    load_labelled_questions,
)
from .decision import DecisionModel, fit_decision
from .encoder import Encoder
from .errors import DataFormatError, OhloraError
from .judge import judge_folder
from .lexical import LexicalIndex
from .models import choose_encoder, read_manifest
from .retriever import Retriever
from .store import KnownQuestions, Manifest, ScoreStats, StoredIndex, VectorIndex, check_writable, write_index
from .verifier import Verification, fit_verification, load_verifier


@dataclass
class BuildReport:
    """What `build_index` did, for the CLI to print."""

    manifest: Manifest
    folder: str
    on_gpu: bool
    encode_seconds: float
    total_seconds: float
    decision: DecisionModel | None = None
    follow: FollowModel | None = None
    verification: Verification | None = None
    onnx: str | None = None  # the encoder's ONNX copy (onnx_encoder), when written or already there
    onnx_seconds: float = 0.0


def calibration_file(config: IndexConfig, paths: Paths) -> Path | None:
    """The labelled file the decision is fitted on: `config.calibration`, else data/trust_calib.csv when the DB is
    the project's own (data/concepts.csv) and the file exists; none with `calibrate=False`."""
    if not config.calibrate:
        return None
    if config.calibration is not None:
        return config.calibration
    return _own_db_default(config, paths, paths.data_dir / "trust_calib.csv")


def known_questions_file(config: IndexConfig, paths: Paths) -> Path | None:
    """The labelled questions kept as match keys: `config.known_questions`, else the S-BERT training pairs
    (data/sbert_train.csv) when the DB is the project's own and the file exists; none with `use_known=False`."""
    if not config.use_known:
        return None
    if config.known_questions is not None:
        return config.known_questions
    return _own_db_default(config, paths, paths.home / SBERT_TRAIN_DATA)


def conversations_file(config: IndexConfig, paths: Paths) -> Path | None:
    """The labelled conversations the follow-up model is fitted on: `config.conversations`, else
    data/conversations_train.jsonl when the DB is the project's own and the file exists; none without an entry
    decision or with `use_conversations=False`."""
    if not config.use_conversations or not config.calibrate:
        return None
    if config.conversations is not None:
        return config.conversations
    return _own_db_default(config, paths, paths.home / CONVERSATIONS_TRAIN_DATA)


def check_conversations(
    conversations: list[list[ConversationTurn]], ids: set[str], path: Path, where: str, fix: str
) -> None:
    """Every labelled entry of the conversations must be an entry of `where` (the DB being indexed, or an index)."""
    for turns in conversations:
        for turn in turns:
            if turn.concept_id is not None and turn.concept_id not in ids:
                raise DataFormatError(f"{path}: concept_id {turn.concept_id!r} is not an entry of {where} — {fix}")


def _own_db_default(config: IndexConfig, paths: Paths, default: Path) -> Path | None:
    """`default` when the DB being indexed is the project's own (data/concepts.csv) and the file exists, else None."""
    db = Path(config.db).resolve() if config.db else paths.default_db.resolve()
    return default if db == paths.default_db.resolve() and default.is_file() else None


def known_questions(labelled: LabelledQuestions, db: ConceptDB, encoder: Encoder, batch_size: int) -> KnownQuestions:
    """Encode labelled questions (query side) as match keys; a question no entry answers keeps position -1."""
    positions = np.asarray([-1 if p is None else p for p in labelled.positions(db)], dtype=np.int64)
    vectors = encoder.encode_queries(labelled.questions, batch_size=batch_size)
    if not np.isfinite(vectors).all():
        raise OhloraError(
            f"encoder {encoder.ref.reference} returned non-finite vectors for the known questions of "
            f"{labelled.path} — check the model folder"
        )
    return KnownQuestions(vectors.astype(np.float32), positions, np.asarray(labelled.questions, dtype=str))


def in_memory_index(db: ConceptDB, encoder: Encoder, batch_size: int, progress: bool) -> StoredIndex:
    """Encode a DB into a StoredIndex that lives in memory only (what build-index publishes, unpublished)."""
    import faiss

    vectors = encoder.encode_passages(db.texts, batch_size=batch_size, progress=progress)  # (n, d)
    if not np.isfinite(vectors).all():
        rows = int((~np.isfinite(vectors).all(axis=1)).sum())
        raise OhloraError(
            f"encoder {encoder.ref.reference} returned non-finite vectors for {rows} of {len(db)} entries — check the "
            "model folder, or retrain it with `ohlora-rag train-sbert`"
        )
    store = VectorIndex.from_vectors(vectors)
    manifest = Manifest(
        encoder=encoder.ref.reference,
        encoder_fingerprint=encoder.fingerprint,
        dim=store.dim,
        count=store.ntotal,
        corpus_hash=db.content_hash,
        db=str(db.path),
        faiss_version=faiss.__version__,
        lexical=True,
    )
    return StoredIndex(Path("."), store, db.to_arrow(), manifest, LexicalIndex.build(db.texts), ScoreStats.of(vectors))


def fit_on(
    stored: StoredIndex, encoder: Encoder, db: ConceptDB, labelled: LabelledQuestions, paths: Paths, verify: bool
) -> tuple[DecisionModel, Verification | None]:
    """Fit the decision model of an index on labelled questions, and how the entry verifier joins it when `verify`
    and there is one for this DB (`verifier.verifier_folder`)."""
    gold = labelled.positions(db)
    retriever = Retriever(stored, encoder, FALLBACK_THRESHOLD)
    signals = retriever.signals(labelled.questions, skip_own=True)
    decision = fit_decision(signals, gold, labelled.kinds, str(labelled.path))
    verifier = load_verifier(paths, db.content_hash) if verify else None
    verification = None
    if verifier is not None:
        verification = fit_verification(
            verifier, labelled.questions, signals, gold, labelled.kinds, db.texts.__getitem__, str(labelled.path)
        )
    return decision, verification


def build_index(config: IndexConfig | None = None, paths: Paths | None = None) -> BuildReport:
    """Encode the concept DB and publish the index under `paths.index_dir`.

    Args:
        config: DB, encoder, batch size, calibration file (defaults: data/concepts.csv, models/sbert/ or the base
            encoder, data/trust_calib.csv for the project's own DB).
        paths: home folder layout (default: from $OHLORA_HOME or the current directory).

    Returns:
        The manifest and timings of the new build, and the fitted decision model if any.
    """
    config = config or IndexConfig()
    paths = paths or Paths.resolve()
    start = time.perf_counter()
    db = load_concepts(config.db or paths.default_db)  # validate the data before loading any model
    calib = calibration_file(config, paths)
    labelled = load_labelled_questions(calib) if calib else None
    known_file = known_questions_file(config, paths)
    known_labelled = load_labelled_questions(known_file) if known_file else None
    conv_file = conversations_file(config, paths)
    conversations = load_conversations(conv_file) if conv_file else None
    for checked in (labelled, known_labelled):
        if checked is not None:
            checked.positions(db)  # every labelled entry must be in this DB: refuse before encoding
    if conversations is not None and conv_file is not None:
        check_conversations(
            conversations, set(db.ids), conv_file, str(db.path), "fix the file, or give --no-conversations"
        )
    check_writable(paths.index_dir)  # a read-only index/ fails now, not after minutes of encoding
    ref = choose_encoder(config.encoder, paths)
    encoder = Encoder(ref, runtime="torch")
    t0 = time.perf_counter()
    stored = in_memory_index(db, encoder, config.batch_size, config.progress)
    if known_labelled is not None:
        stored.known = known_questions(known_labelled, db, encoder, config.batch_size)
        stored.manifest.known_questions = len(stored.known)
    encode_seconds = time.perf_counter() - t0
    calibrated = (read_manifest(ref.path) or {}).get("threshold")
    manifest = stored.manifest
    manifest.threshold = float(calibrated) if isinstance(calibrated, (int, float)) else None
    decision = verification = None
    if labelled is not None:
        decision, verification = fit_on(stored, encoder, db, labelled, paths, config.use_verifier)
    manifest.decision = decision.to_dict() if decision else None
    manifest.verify = verification.to_dict() if verification else None
    follow = None
    if decision is not None and conversations is not None and conv_file is not None:
        # on the decision alone: conversations read searches as it scored them (`SearchResult.unverified`)
        follow = fit_follow(Retriever(stored, encoder, FALLBACK_THRESHOLD, decision), conversations, str(conv_file))
        if config.use_judge and judge_folder(paths.judge_dir, ref.reference) is not None:
            follow.judge, follow.judge_cutoff = JUDGE_WEIGHT, JUDGE_CUTOFF
    manifest.follow = follow.to_dict() if follow else None
    folder = write_index(
        paths.index_dir, stored.vectors, stored.entries, manifest, stored.lexical, stored.stats, stored.known
    )
    t1 = time.perf_counter()
    onnx = encoder.export_copy(paths.cache_dir) if config.onnx else None
    onnx_seconds = time.perf_counter() - t1
    return BuildReport(
        manifest,
        str(folder),
        stored.vectors.on_gpu,
        encode_seconds,
        time.perf_counter() - start,
        decision,
        follow,
        verification,
        str(onnx) if onnx else None,
        onnx_seconds,
    )
