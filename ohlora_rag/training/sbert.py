"""`train-sbert`: fine-tune the encoder on (question, entry, score) pairs with SentenceTransformerTrainer."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_ENCODER, Paths, SbertTrainConfig
from ..data import Pairs, load_pairs
from ..device import torch_device
from ..encoder import Encoder
from ..errors import DataFormatError, UsageError
from ..evaluate import RetrievalReport, evaluate_retrieval
from ..models import ModelRef, loading, resolve
from .common import quiet_model_card
from .run import TrainingRun


@dataclass
class SbertTrainReport:
    out: Path
    steps: int
    train_pairs: int
    valid_pairs: int
    seconds: float
    pairs_per_second: float
    report: RetrievalReport


def split_by_question(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """Seeded split that keeps all pairs of a question on the same side (no question leaks into validation)."""
    questions = sorted(set(pairs.questions))
    random.Random(seed).shuffle(questions)
    n_valid = max(1, round(len(questions) * fraction))
    if n_valid >= len(questions):
        raise DataFormatError(
            f"{pairs.path}: {len(questions)} distinct question(s) cannot be split into train and valid — add questions or pass --valid"
        )
    held = set(questions[:n_valid])
    train_rows = [i for i, q in enumerate(pairs.questions) if q not in held]
    valid_rows = [i for i, q in enumerate(pairs.questions) if q in held]
    return pairs.subset(train_rows), pairs.subset(valid_rows)


def freeze(transformer: Any, embeddings: bool, layers: int) -> None:
    """Stop gradients into the word embeddings and, when `layers` > 0, the embedding block and the lowest layers."""
    if embeddings or layers:
        transformer.get_input_embeddings().weight.requires_grad_(False)
    if layers:
        blocks = _layers(transformer)
        if layers >= len(blocks):
            raise UsageError(f"--freeze-layers {layers}: the model has only {len(blocks)} layers — freeze fewer")
        transformer.embeddings.requires_grad_(False)
        for block in blocks[:layers]:
            block.requires_grad_(False)


def _layers(transformer: Any) -> Any:
    encoder = getattr(transformer, "encoder", None)
    blocks = getattr(encoder, "layer", None)
    if blocks is None:
        raise UsageError("--freeze-layers works with BERT-style encoders (encoder.layer); pass --freeze-layers 0")
    return blocks


def _training_data(pairs: Pairs, config: SbertTrainConfig, model: Any) -> tuple[Any, Any]:
    """(dataset, loss) for the chosen loss; every loss reads the same (question, entry, score) columns."""
    from datasets import Dataset
    from sentence_transformers import losses

    graded = Dataset.from_dict({"sentence1": pairs.questions, "sentence2": pairs.entries, "score": pairs.scores})
    if config.loss == "hybrid":
        from .hybrid_loss import GroupedHybridLoss

        return graded, GroupedHybridLoss(model, ranking_weight=config.ranking_weight)
    if config.loss == "cosine":
        return graded, losses.CosineSimilarityLoss(model)
    if config.loss == "cosent":
        return graded, losses.CoSENTLoss(model)
    keep = [i for i, s in enumerate(pairs.scores) if s >= 1.0]
    positives = {"anchor": [pairs.questions[i] for i in keep], "positive": [pairs.entries[i] for i in keep]}
    return Dataset.from_dict(positives), losses.MultipleNegativesRankingLoss(model)


def _sampler(loss: str) -> dict[str, Any]:
    """Batches of whole questions for `hybrid`, the trainer's shuffled batches otherwise."""
    if loss != "hybrid":
        return {}
    from .hybrid_loss import QuestionBatchSampler

    return {"batch_sampler": QuestionBatchSampler}


def _prompts(model: Any, loss: str) -> Any:
    """Column -> prompt when the model has e5-style query/passage prompts."""
    prompts = model.prompts or {}
    if "query" not in prompts or "passage" not in prompts:
        return None
    q, p = prompts["query"], prompts["passage"]
    return {"anchor": q, "positive": p} if loss == "mnrl" else {"sentence1": q, "sentence2": p}


def train_sbert(config: SbertTrainConfig, paths: Paths | None = None) -> SbertTrainReport:
    """Fine-tune an S-BERT and save it (sentence-transformers folder + `ohlora_model.json`).

    The folder is written next to `out` and swapped in only when training and evaluation succeed, so a failed or
    interrupted run leaves the previous model intact; checkpoints for `--resume` live in `<out>.checkpoints/`, which
    a successful run removes unless `config.keep_checkpoints`.

    Returns:
        Throughput, sizes and the validation report (pair metrics, ranking, calibrated threshold).
    """
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    paths = paths or Paths.resolve()
    out = Path(config.out) if config.out else paths.sbert_dir
    pairs = load_pairs(config.data, split="train")
    if config.valid:
        train, valid = pairs, load_pairs(config.valid, split=None)
    else:
        train, valid = split_by_question(pairs, config.valid_fraction, config.seed)
    if config.loss == "mnrl" and not any(s >= 1.0 for s in train.scores):
        raise DataFormatError(f"{config.data}: --loss mnrl needs pairs with similarity_score 1.0")
    base = resolve(config.base or DEFAULT_ENCODER, "encoder", paths)
    run = TrainingRun.start(config, out, base, "--base")

    with loading(base, "encoder"):
        model = SentenceTransformer(str(base.path), device=torch_device(), local_files_only=True)
    model.max_seq_length = config.max_seq_length
    freeze(model[0].auto_model, config.freeze_embeddings, config.freeze_layers)
    train_data, loss = _training_data(train, config, model)
    if not config.progress:
        quiet_model_card(model)

    args = SentenceTransformerTrainingArguments(
        **run.trainer_args(warmup_ratio=config.warmup_ratio),
        eval_strategy="no",  # validation runs once, on the saved model, with the full retrieval metrics
        prompts=_prompts(model, config.loss),
        **_sampler(config.loss),
        dataloader_drop_last=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        loss=loss,
        callbacks=run.callbacks(),
    )
    run.train(trainer)
    rows = len(train_data)
    with run.publish(kind="encoder", keep_checkpoints=config.keep_checkpoints) as (staging, manifest):
        model.save(str(staging))
        report = evaluate_retrieval(
            Encoder(ModelRef(str(out), staging)), valid, sorted(set(pairs.entries) | set(valid.entries))
        )
        manifest.update(
            data=str(config.data),
            data_hash=pairs.content_hash,
            valid=str(config.valid) if config.valid else None,
            seed=config.seed,
            threshold=report.calibration.threshold if report.calibration else None,
            metrics=report.to_dict(),
        )
    return SbertTrainReport(
        out=out,
        steps=run.steps,
        train_pairs=rows,
        valid_pairs=len(valid),
        seconds=run.seconds,
        pairs_per_second=run.per_second(rows),  # pairs seen in this run (a resumed run counts only its own part)
        report=report,
    )
