"""`train-llm`: LoRA SFT of the answering LLM with trl's SFTTrainer; loss on the answer only, EOS learned.

Before the first step a pre-flight check reads the tokenised training rows exactly as trl will feed them and
refuses to train unless every row has a non-empty answer inside the loss mask, ends on EOS inside the mask, and
starts with exactly the prompt tokens that `ask` will build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_LLM, LlmTrainConfig, Paths
from ..data import SftRows, load_sft, load_sft_files
from ..errors import OhloraError
from ..generator import encode_prompt
from ..models import loading, resolve
from ..prompt import PromptBuilder
from .run import TrainingRun

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PreflightError(OhloraError):
    """The tokenised training data would not teach what `ask` asks."""


@dataclass
class LlmTrainReport:
    out: Path
    steps: int
    rows: int
    tokens: int
    seconds: float
    tokens_per_second: float
    train_loss: float | None
    eval_loss: float | None


def examples(rows: SftRows, builder: PromptBuilder) -> dict[str, list[str]]:
    """Prompt-completion columns for trl: the prompt `ask` would build and the answer + EOS."""
    return {
        "prompt": [builder.prompt(q, e) for q, e in zip(rows.questions, rows.entries)],
        "completion": [builder.completion(a) for a in rows.answers],
    }


def preflight(
    tokenized: Sequence[Mapping[str, Sequence[int]]], rows: SftRows, builder: PromptBuilder, max_length: int
) -> int:
    """Check every tokenised row against what inference will do.

    Args:
        tokenized: per row, `input_ids` and the loss mask as trl produced them (`completion_mask`, or `labels`
            with -100 where there is no loss).
        rows: the source rows (same order).
        builder: the prompt builder `ask` uses.
        max_length: the longest sequence training keeps.

    Returns:
        The number of answer tokens (loss tokens) over all rows.
    """
    tok = builder.tokenizer
    eos = tok.eos_token_id
    loss_tokens = 0
    for i, (example, q, e) in enumerate(zip(tokenized, rows.questions, rows.entries)):
        where = f"{rows.path}: row {i + 1}"
        ids = list(example["input_ids"])
        if "completion_mask" in example:
            mask = [bool(m) for m in example["completion_mask"]]
        else:  # trl folds the mask into labels: -100 = no loss
            mask = [label != -100 for label in example["labels"]]
        prompt_ids = encode_prompt(tok, builder.prompt(q, e))
        if ids[: len(prompt_ids)] != prompt_ids or any(mask[: len(prompt_ids)]):
            raise PreflightError(
                f"pre-flight: {where}: the training prompt is not the prompt `ask` builds (template "
                f"{builder.template!r}) — the prompt and answer must meet on a token boundary"
            )
        answer_ids = [t for t, m in zip(ids, mask) if m]
        if not answer_ids or not tok.decode([t for t in answer_ids if t != eos]).strip():
            raise PreflightError(f"pre-flight: {where}: no answer tokens inside the loss mask — check output_message")
        if ids[-1] != eos or not mask[-1]:
            raise PreflightError(
                f"pre-flight: {where}: the sequence does not end on EOS inside the loss mask — the model would not learn to stop"
            )
        if len(ids) > max_length:
            raise PreflightError(
                f"pre-flight: {where}: prompt + answer is {len(ids)} tokens, over --max-length {max_length} — "
                "shorten the entry or answer, or raise --max-length"
            )
        loss_tokens += len(answer_ids)
    return loss_tokens


def train_llm(config: LlmTrainConfig, paths: Paths | None = None) -> LlmTrainReport:
    """LoRA-tune the LLM; save the adapter (+ tokenizer, manifest; `--merge`: the merged model) atomically.

    Checkpoints for `--resume` live in `<out>.checkpoints/` and are kept after a successful run.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    paths = paths or Paths.resolve()
    out = Path(config.out) if config.out else paths.llm_dir
    rows = load_sft_files(config.data, split="train")
    valid = load_sft(config.valid, split=None) if config.valid else None
    base = resolve(config.base_llm or DEFAULT_LLM, "llm", paths)
    run = TrainingRun.start(config, out, base, "--base-llm")

    with loading(base, "LLM"):
        tokenizer = AutoTokenizer.from_pretrained(base.path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    builder = PromptBuilder.create(tokenizer, config.template)
    with loading(base, "LLM"):
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, local_files_only=True)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        bias="none",
    )
    args = SFTConfig(
        **run.trainer_args(warmup_ratio=0.05),
        per_device_eval_batch_size=config.batch_size,
        lr_scheduler_type="linear",
        eval_strategy="epoch" if valid else "no",
        completion_only_loss=True,
        max_length=None,
        padding_free=False,
        dataset_num_proc=None,
        eos_token=tokenizer.eos_token,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(examples(rows, builder)),
        eval_dataset=Dataset.from_dict(examples(valid, builder)) if valid else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=run.callbacks(),
    )
    loss_tokens = preflight(list(trainer.train_dataset), rows, builder, config.max_length)
    if valid:
        preflight(list(trainer.eval_dataset), valid, builder, config.max_length)
    tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset)

    run.train(trainer)
    history = trainer.state.log_history
    train_loss = next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None)
    eval_loss = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)

    with run.publish(kind="llm-adapter", keep_checkpoints=True) as (staging, manifest):
        trainer.model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        if config.merge:
            trainer.model.merge_and_unload().save_pretrained(str(staging / "merged"))
            tokenizer.save_pretrained(str(staging / "merged"))
        manifest.update(
            template=builder.template,
            data=str(rows.path),
            data_hash=rows.content_hash,
            seed=config.seed,
            rows=len(rows),
            loss_tokens=loss_tokens,
            train_loss=train_loss,
            eval_loss=eval_loss,
        )
    tokens_per_second = run.per_second(tokens)  # tokens: one pass over the training rows
    return LlmTrainReport(out, run.steps, len(rows), tokens, run.seconds, tokens_per_second, train_loss, eval_loss)
