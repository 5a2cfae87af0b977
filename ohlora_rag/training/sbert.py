"""`train-sbert`: fine-tune the encoder on (question, entry, score) pairs with SentenceTransformerTrainer."""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_ENCODER, Paths, SbertTrainConfig
from ..data import Pairs, load_pairs
from ..device import native_bf16, quiet_transformers, torch_device
from ..encoder import Encoder
from ..errors import DataFormatError, UsageError
from ..evaluate import RetrievalReport, evaluate_retrieval
from ..models import ModelRef, loading, resolve, staged_folder, write_manifest
from .common import config_record, quiet_model_card, quiet_trainer, resume_checkpoint, warmup


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
        from .grouped import GroupedHybridLoss

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
    from .grouped import QuestionBatchSampler

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
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from transformers import TrainerCallback, set_seed

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
    if base.path.resolve() == out.resolve():
        raise UsageError(f"--base {base.reference} is the output folder — train from another model or pass --out")
    checkpoints = out.parent / f"{out.name}.checkpoints"
    resume_from = resume_checkpoint(checkpoints) if config.resume else None

    quiet_transformers()
    set_seed(config.seed)
    with loading(base, "encoder"):
        model = SentenceTransformer(str(base.path), device=torch_device(), local_files_only=True)
    model.max_seq_length = config.max_seq_length
    freeze(model[0].auto_model, config.freeze_embeddings, config.freeze_layers)
    train_data, loss = _training_data(train, config, model)
    if not config.progress:
        quiet_model_card(model)

    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        **warmup(config.warmup_ratio),
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="epoch",
        save_total_limit=1,
        eval_strategy="no",  # validation runs once, on the saved model, with the full retrieval metrics
        logging_strategy="epoch",
        report_to="none",
        prompts=_prompts(model, config.loss),
        disable_tqdm=not config.progress,
        **_sampler(config.loss),
        dataloader_drop_last=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=native_bf16() if config.bf16 is None else config.bf16,
    )
    steps_done: dict[str, float] = {"n": 0}

    class _Count(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            steps_done.setdefault("from_epoch", state.epoch or 0.0)

        def on_step_end(self, *_: Any, **__: Any) -> None:
            steps_done["n"] += 1

    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        loss=loss,
        callbacks=[_Count()],
    )
    if not config.progress:
        quiet_trainer(trainer)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    rows = len(train_data)

    with staged_folder(out) as staging:
        model.save(str(staging))
        report = evaluate_retrieval(
            Encoder(ModelRef(str(out), staging)), valid, sorted(set(pairs.entries) | set(valid.entries))
        )
        threshold = report.calibration.threshold if report.calibration else None
        write_manifest(
            staging,
            kind="encoder",
            reference=str(out),
            base=base.reference,
            base_fingerprint=base.fingerprint,
            data=str(config.data),
            data_hash=pairs.content_hash,
            valid=str(config.valid) if config.valid else None,
            seed=config.seed,
            threshold=threshold,
            metrics=report.to_dict(),
            config=config_record(config),
        )
    if not config.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the model is saved; only --resume of this run needed them
    epochs_run = trainer.state.epoch - steps_done.get("from_epoch", trainer.state.epoch)
    processed = rows * epochs_run  # pairs seen in this run (a resumed run counts only its own part)
    return SbertTrainReport(
        out=out,
        steps=int(steps_done["n"]),
        train_pairs=rows,
        valid_pairs=len(valid),
        seconds=seconds,
        pairs_per_second=processed / seconds if seconds else float("nan"),
        report=report,
    )
