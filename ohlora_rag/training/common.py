"""Plumbing the trainers share: warm-up arguments, quiet logging, the config as it goes into a manifest, the
checkpoint `--resume` starts from."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import UsageError


def warmup(ratio: float) -> dict[str, float]:
    """Warm-up as a share of the steps: `warmup_steps` takes a float from transformers 5, `warmup_ratio` before."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"warmup_steps": ratio} if major >= 5 else {"warmup_ratio": ratio}


def quiet_trainer(trainer: Any) -> None:
    """No per-epoch metric dicts on stdout (they stay in trainer.state.log_history)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def quiet_model_card(model: Any) -> None:
    """No "Computing widget examples" bar: sentence-transformers draws it when a trainer starts, whatever
    `disable_tqdm` says. The saved model card just lists no widget examples."""
    model.model_card_data.set_widget_examples = lambda _dataset: None


def config_record(config: Any) -> dict[str, Any]:
    """A training config dataclass as JSON-ready values (paths as strings) for the output's manifest."""

    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: plain(v) for k, v in asdict(config).items()}


def resume_checkpoint(checkpoints: Path) -> Path:
    """The newest complete checkpoint under `checkpoints`, for `--resume`.

    The Trainer writes `trainer_state.json` last into `checkpoint-<step>/`, so a run killed while saving leaves a
    folder without it, which the Trainer's own choice (the highest step) would load and fail on. Such folders are
    removed here (they belong to a run that is gone) and the newest complete one is returned.

    Raises:
        UsageError: no complete checkpoint there.
    """
    folders = [f for f in checkpoints.glob("checkpoint-*") if f.is_dir() and f.name.split("-", 1)[1].isdigit()]
    complete = [f for f in folders if (f / "trainer_state.json").is_file()]
    if not complete:
        what = "complete checkpoint" if folders else "checkpoint"
        raise UsageError(f"--resume: no {what} in {checkpoints} — run once without --resume")
    for folder in folders:
        if folder not in complete:
            shutil.rmtree(folder, ignore_errors=True)
    return max(complete, key=lambda folder: int(folder.name.split("-", 1)[1]))
