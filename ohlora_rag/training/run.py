"""The run both trainers share: checkpoints and `--resume`, seeding and quiet libraries, the Trainer arguments they
set alike, a step counter, the throughput of this run's own part, and the staged save with its manifest."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import staged_folder
from ..device import native_bf16, quiet_transformers, torch_device
from ..errors import UsageError
from ..models import ModelRef, write_manifest
from .common import config_record, quiet_trainer, resume_checkpoint, warmup


@dataclass
class TrainingRun:
    """One `train-*` run: where it publishes, what it starts from, and what it has done so far.

    Checkpoints for `--resume` live in `<out>.checkpoints/`; the model is written into a staging folder beside `out`
    and swapped in only when the whole run succeeds, so a failed or interrupted run leaves the previous model intact.
    """

    config: Any
    """The command's config (`SbertTrainConfig` / `LlmTrainConfig`): seed, epochs, batch_size, learning_rate,
    bf16, resume and progress are read from it; it goes into the manifest whole."""
    out: Path
    base: ModelRef
    checkpoints: Path
    resume_from: Path | None
    steps: int = 0
    """Optimizer steps taken in this run (a resumed run counts only its own)."""
    from_epoch: float | None = None
    """The epoch this run's first step started at: 0 for a fresh run, the checkpoint's for a resumed one."""
    epochs_run: float = 0.0
    seconds: float = 0.0

    @classmethod
    def start(cls, config: Any, out: Path, base: ModelRef, base_flag: str) -> TrainingRun:
        """Check the output against the base, find the checkpoint `--resume` continues from, quiet the libraries and
        seed every generator.

        Args:
            config: the command's config.
            out: the folder the model is published into.
            base: the model training starts from.
            base_flag: the option that named `base`, for the message when it is the output folder.
        """
        from transformers import set_seed

        if base.path.resolve() == out.resolve():
            raise UsageError(
                f"{base_flag} {base.reference} is the output folder — train from another model or pass --out"
            )
        checkpoints = out.parent / f"{out.name}.checkpoints"
        resume_from = resume_checkpoint(checkpoints) if config.resume else None
        quiet_transformers()
        if not config.progress:
            import datasets

            datasets.disable_progress_bars()
        set_seed(config.seed)
        return cls(config, out, base, checkpoints, resume_from)

    def trainer_args(self, warmup_ratio: float) -> dict[str, Any]:
        """Keyword arguments both trainers' `TrainingArguments` take alike: a checkpoint per epoch (the last one
        kept), a log line per epoch, no reporting, the run's seed, bf16 where it is native, the CPU where torch work
        runs on it (`device.torch_device`, the device the models are placed on)."""
        config = self.config
        return {
            "output_dir": str(self.checkpoints),
            "num_train_epochs": config.epochs,
            "per_device_train_batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            **warmup(warmup_ratio),
            "seed": config.seed,
            "data_seed": config.seed,
            "save_strategy": "epoch",
            "save_total_limit": 1,
            "logging_strategy": "epoch",
            "report_to": "none",
            "disable_tqdm": not config.progress,
            "bf16": native_bf16() if config.bf16 is None else config.bf16,
            "use_cpu": torch_device() == "cpu",
        }

    def callbacks(self) -> list[Any]:
        """The Trainer callbacks that count this run's steps and note the epoch it started at."""
        from transformers import TrainerCallback

        run = self

        class _Count(TrainerCallback):  # type: ignore[misc]
            def on_step_begin(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
                if run.from_epoch is None:
                    run.from_epoch = state.epoch or 0.0

            def on_step_end(self, *_: Any, **__: Any) -> None:
                run.steps += 1

        return [_Count()]

    def train(self, trainer: Any) -> None:
        """Train (from the `--resume` checkpoint when there is one), timing it and noting how many epochs it ran."""
        if not self.config.progress:
            quiet_trainer(trainer)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        self.seconds = time.perf_counter() - start
        end = trainer.state.epoch or 0.0
        self.epochs_run = end - (end if self.from_epoch is None else self.from_epoch)

    def per_second(self, per_epoch: float) -> float:
        """Throughput of this run's own part: `per_epoch` (rows, tokens…) times the epochs it ran, per second."""
        return per_epoch * self.epochs_run / self.seconds if self.seconds else float("nan")

    @contextmanager
    def publish(self, kind: str, keep_checkpoints: bool) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Write the model into a staging folder in the block; when it completes, add the manifest and swap the
        folder in for `out`.

        Args:
            kind: the manifest's `kind` ("encoder", "llm-adapter").
            keep_checkpoints: False removes `<out>.checkpoints/` once the model is published (only `--resume` of
                this run needed them).

        Yields:
            The staging folder, and a dict the block fills with the manifest's fields beyond kind, reference, base
            and config (in the order they are written).
        """
        with staged_folder(self.out) as staging:
            fields: dict[str, Any] = {}
            yield staging, fields
            write_manifest(
                staging,
                kind=kind,
                reference=str(self.out),
                base=self.base.reference,
                base_fingerprint=self.base.fingerprint,
                **fields,
                config=config_record(self.config),
            )
        if not keep_checkpoints:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
