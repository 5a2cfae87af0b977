"""train-llm on the tiny LM: 2 SFT steps change the adapter; the pre-flight check refuses broken data (default and
seed templates); `ask` serves the adapter train-llm publishes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ohlora_rag.config import LlmTrainConfig, Paths
from ohlora_rag.data import load_sft
from ohlora_rag.errors import DataFormatError
from ohlora_rag.prompt import PromptBuilder
from ohlora_rag.training.llm import PreflightError, preflight, train_llm
from tests.conftest import CONCEPTS, kill_when, write_sft

PRECISION = CONCEPTS[1][2]


def _config(tmp_path: Path, tiny_lm: Path, **kw: object) -> LlmTrainConfig:
    data = write_sft(tmp_path / "sft.csv")
    base = dict(
        data=data, base_llm=str(tiny_lm), epochs=1, batch_size=2, out=tmp_path / "llm", progress=False, bf16=False
    )
    base.update(kw)
    return LlmTrainConfig(**base)  # type: ignore[arg-type]


def test_two_steps_change_the_adapter_and_write_its_files(tmp_path: Path, tiny_lm: Path) -> None:
    report = train_llm(_config(tmp_path, tiny_lm), Paths(tmp_path))
    assert report.steps == 2 and report.rows == 4
    out = tmp_path / "llm"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "ohlora_model.json"} <= names
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7  # 2 layers x all attention and MLP projections
    assert all(torch.count_nonzero(v) > 0 for v in lora_b)  # LoRA B starts at zero: it moved
    manifest = (out / "ohlora_model.json").read_text()
    assert '"template": "chat"' in manifest and '"seed": 42' in manifest and '"base_fingerprint"' in manifest


def test_merge_writes_a_merged_model(tmp_path: Path, tiny_lm: Path) -> None:
    train_llm(_config(tmp_path, tiny_lm, merge=True), Paths(tmp_path))
    assert (tmp_path / "llm" / "merged" / "model.safetensors").exists()


def test_resume_continues_from_checkpoint(tmp_path: Path, tiny_lm: Path) -> None:
    train_llm(_config(tmp_path, tiny_lm), Paths(tmp_path))
    again = train_llm(_config(tmp_path, tiny_lm, epochs=2, resume=True), Paths(tmp_path))
    assert again.steps == 2  # only the second epoch ran


def test_resumed_run_throughput_counts_only_its_own_epoch(tmp_path: Path, tiny_lm: Path) -> None:
    """4 rows in batches of 3: 2 steps (6 row slots) an epoch; the resumed run saw the 4 rows once, not 6."""
    train_llm(_config(tmp_path, tiny_lm, batch_size=3), Paths(tmp_path))
    again = train_llm(_config(tmp_path, tiny_lm, batch_size=3, epochs=2, resume=True), Paths(tmp_path))
    assert again.steps == 2
    assert again.tokens_per_second == pytest.approx(again.tokens / again.seconds)


def _tokenized(  # noqa: ANN202
    tmp_path: Path, tiny_lm: Path, template: str = "chat", builder_type: type[PromptBuilder] = PromptBuilder
):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ohlora_rag.training.llm import examples

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    rows = load_sft(write_sft(tmp_path / "sft.csv"))
    builder = builder_type.create(tok, template)
    args = SFTConfig(
        output_dir=str(tmp_path / "x"), completion_only_loss=True, max_length=None, report_to="none", use_cpu=True
    )
    from transformers import AutoModelForCausalLM

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_lm),
        args=args,
        train_dataset=Dataset.from_dict(examples(rows, builder)),
        processing_class=tok,
    )
    return [dict(x) for x in trainer.train_dataset], rows, builder


def test_preflight_accepts_what_trl_builds(tmp_path: Path, tiny_lm: Path) -> None:
    data, rows, builder = _tokenized(tmp_path, tiny_lm)
    assert preflight(data, rows, builder, max_length=512) > 4


def test_preflight_catches_a_broken_template(tmp_path: Path, tiny_lm: Path) -> None:
    data, rows, _ = _tokenized(tmp_path, tiny_lm, template="plain")
    from transformers import AutoTokenizer

    chat = PromptBuilder.create(AutoTokenizer.from_pretrained(tiny_lm), "chat")  # what `ask` would build
    with pytest.raises(PreflightError, match=re.escape("row 1: the training prompt is not the prompt `ask` builds")):
        preflight(data, rows, chat, max_length=512)


def test_preflight_catches_an_answer_cut_out_of_the_mask(tmp_path: Path, tiny_lm: Path) -> None:
    data, rows, builder = _tokenized(tmp_path, tiny_lm)
    data[2]["labels"] = [-100] * len(data[2]["labels"])
    with pytest.raises(PreflightError, match=re.escape("row 3: no answer tokens inside the loss mask")):
        preflight(data, rows, builder, max_length=512)


def test_preflight_catches_a_missing_eos_and_an_overlong_row(tmp_path: Path, tiny_lm: Path) -> None:
    data, rows, builder = _tokenized(tmp_path, tiny_lm)
    cut = [dict(x) for x in data]
    cut[0] = {"input_ids": data[0]["input_ids"][:-1], "labels": data[0]["labels"][:-1]}
    with pytest.raises(PreflightError, match="row 1: the sequence does not end on EOS inside the loss mask"):
        preflight(cut, rows, builder, max_length=512)
    with pytest.raises(PreflightError, match=r"row 1: prompt \+ answer is \d+ tokens, over --max-length 10"):
        preflight(data, rows, builder, max_length=10)


def test_preflight_accepts_what_trl_builds_for_the_seed_template(tmp_path: Path, tiny_bpe_lm: Path) -> None:
    """The original Korean format on a byte-level BPE tokenizer: the loss covers exactly the tokens after the prompt
    `ask` builds — the answer with its leading space, the closing marker and EOS."""
    from ohlora_rag.generator import encode_prompt

    data, rows, builder = _tokenized(tmp_path, tiny_bpe_lm, template="seed")
    tok = builder.tokenizer
    prompts = [encode_prompt(tok, builder.prompt(q, e)) for q, e in zip(rows.questions, rows.entries)]
    assert preflight(data, rows, builder, max_length=512) == sum(
        len(x["input_ids"]) - len(p) for x, p in zip(data, prompts)
    )
    first, no_info = data[0], data[3]
    in_loss = [t for t, label in zip(first["input_ids"], first["labels"]) if label != -100]
    assert tok.decode(in_loss) == " precision is true positives over predicted positives . (답변 종료)<|endoftext|>"
    assert tok.decode(no_info["input_ids"][: len(prompts[3])]) == (
        "(제공된 정보) 알맞은 정보를 찾을 수 없음 (사용자 질문) who won the cup ? (답변 시작) ### 답변:"
    )


class SpaceInPromptBuilder(PromptBuilder):
    """The seed format with the space before the answer moved into the prompt: prompt + completion is the same text,
    but `ask`'s prompt then ends on a lone space token the model never saw in training."""

    def prompt(self, question: str, entry: str | None) -> str:
        return super().prompt(question, entry) + " "

    def completion(self, answer: str) -> str:
        return super().completion(answer).removeprefix(" ")


def test_preflight_catches_a_seed_prompt_that_ends_inside_a_token(tmp_path: Path, tiny_bpe_lm: Path) -> None:
    data, rows, builder = _tokenized(tmp_path, tiny_bpe_lm, template="seed", builder_type=SpaceInPromptBuilder)
    message = (
        "row 1: the training prompt is not the prompt `ask` builds (template 'seed') — the prompt and answer must meet"
    )
    with pytest.raises(PreflightError, match=re.escape(message)):
        preflight(data, rows, builder, max_length=512)


def test_preflight_catches_a_seed_row_that_lost_its_eos(tmp_path: Path, tiny_bpe_lm: Path) -> None:
    data, rows, builder = _tokenized(tmp_path, tiny_bpe_lm, template="seed")
    data[1] = {"input_ids": data[1]["input_ids"][:-1], "labels": data[1]["labels"][:-1]}  # ends on "(답변 종료)"
    with pytest.raises(PreflightError, match="row 2: the sequence does not end on EOS inside the loss mask"):
        preflight(data, rows, builder, max_length=512)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user_question,output_message\nq,a\n", "missing column 'rag_retrieved_data'"),
        ("user_question,rag_retrieved_data,output_message\nq,e,\n", "row 1, column 'output_message' is empty"),
        ("user_question,rag_retrieved_data,output_message\n ,e,a\n", "row 1, column 'user_question' is empty"),
        ("data_type,user_question,rag_retrieved_data,output_message\nvalid,q,e,a\n", "no rows with data_type 'train'"),
    ],
)
def test_bad_sft_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=re.escape(message)):
        load_sft(path)


def test_original_sft_file_loads() -> None:
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "sft_train.csv"
    if not path.exists():
        pytest.skip("../shared/ohlora-data not present")
    rows = load_sft(path)
    assert len(rows) == 115 and sum(e is None for e in rows.entries) == 10


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_kill_9_during_train_llm_then_resume(tmp_path: Path, tiny_lm: Path) -> None:
    """SIGKILL the real `train-llm` once it has written a checkpoint: the published adapter is untouched and still
    served; `--resume` goes on from the last complete checkpoint (past one a kill cut short) and publishes."""
    from ohlora_rag.generator import Generator, choose_llm

    home = tmp_path / "home"
    data = write_sft(home / "data" / "sft.csv")
    out, checkpoints = home / "models" / "llm", home / "models" / "llm.checkpoints"
    train_llm(_config(tmp_path, tiny_lm, out=out), Paths(home))  # the adapter published before
    published = _hashes(out)
    shutil.rmtree(checkpoints)  # that run's checkpoints: the killed run starts afresh
    command = [sys.executable, "-m", "ohlora_rag", "--home", str(home), "train-llm", "--data", str(data)]
    command += ["--base-llm", str(tiny_lm), "--batch-size", "2", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, "--epochs", "1000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # trainer_state.json is written last: a complete checkpoint
    kill_when(proc, lambda: any(checkpoints.glob("checkpoint-*/trainer_state.json")), poll=0.02)
    assert proc.returncode == -signal.SIGKILL
    assert _hashes(out) == published  # nothing half-written in the published folder
    assert sorted(p.name for p in out.parent.iterdir()) == [".llm.lock", "llm", "llm.checkpoints"]
    assert Generator(choose_llm(None, None, Paths(home))).choice.adapter == out  # still served
    complete = max(
        (p.parent for p in checkpoints.glob("checkpoint-*/trainer_state.json")), key=lambda p: int(p.name.split("-")[1])
    )
    epoch = round(json.loads((complete / "trainer_state.json").read_text())["epoch"])
    cut_short = checkpoints / f"checkpoint-{int(complete.name.split('-')[1]) + 2}"  # a kill while saving the next
    cut_short.mkdir(exist_ok=True)
    (cut_short / "trainer_state.json").unlink(missing_ok=True)
    (cut_short / "adapter_model.safetensors").write_bytes(b"\x00" * 10)

    done = subprocess.run([*command, "--epochs", str(epoch + 2), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "(4 steps," in done.stdout  # 2 more epochs of 2 steps: it went on from the checkpoint, not from scratch
    assert all((p / "trainer_state.json").is_file() for p in checkpoints.glob("checkpoint-*"))
    manifest = json.loads((out / "ohlora_model.json").read_text())
    assert manifest["kind"] == "llm-adapter" and manifest["config"]["resume"] is True
    assert manifest["config"]["epochs"] == epoch + 2
    generator = Generator(choose_llm(None, None, Paths(home)))
    assert generator.choice.adapter == out
    assert generator.generate(generator.prompts.prompt("what is recall ?", None), max_new_tokens=3).new_tokens >= 1


@pytest.mark.parametrize(
    ("lm", "template", "served_template"), [("tiny_lm", "auto", "chat"), ("tiny_bpe_lm", "seed", "seed")]
)
def test_ask_answers_with_the_adapter_train_llm_wrote(
    home: Path, lm: str, template: str, served_template: str, request: pytest.FixtureRequest
) -> None:
    """The train -> serve hand-off: with no flag, `ask` loads what `train-llm` published under models/llm (its base
    and template from the manifest), answers differently from the base model given the same prompt, and serves
    exactly base + alpha / r * B @ A in every adapted projection (the other weights: the base's)."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from ohlora_rag.cli import app
    from ohlora_rag.config import AskConfig
    from ohlora_rag.engine import QueryEngine
    from ohlora_rag.generator import Generator, LLMChoice

    base_lm: Path = request.getfixturevalue(lm)
    config = LlmTrainConfig(
        data=write_sft(home / "data" / "sft.csv"),
        base_llm=str(base_lm),
        template=template,
        epochs=4,
        batch_size=4,
        learning_rate=0.2,  # 4 steps that move the tiny model's greedy answer (0.05 would not)
        progress=False,
        bf16=False,
    )
    assert train_llm(config, Paths(home)).steps == 4
    runner = CliRunner()
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    result = runner.invoke(app, ["ask", PRECISION, "--json", "--max-new-tokens", "8", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "notice" not in result.stderr  # an adapter was found: no "answering with the base model"
    answer = json.loads(result.stdout)
    assert answer["source"]["id"] == "precision"

    engine = QueryEngine.load(AskConfig(max_new_tokens=8, dtype="float32"), Paths(home), retrieve=False)
    choice = engine.generator.choice
    assert choice.adapter == home / "models" / "llm" and choice.base.path == base_lm
    assert engine.generator.prompts.template == served_template
    assert engine.stream_with(PRECISION, PRECISION).answer().answer == answer["answer"]
    alone = Generator(LLMChoice(choice.base, None, served_template), device="cpu", dtype="float32")
    prompt = alone.prompts.prompt(PRECISION, PRECISION)  # the very prompt `ask` built
    assert alone.generate(prompt, max_new_tokens=8).text != answer["answer"]  # the adapter changed the answer
    expected = AutoModelForCausalLM.from_pretrained(base_lm).state_dict()
    lora = load_file(str(home / "models" / "llm" / "adapter_model.safetensors"))
    a_keys = [k for k in lora if ".lora_A." in k]
    assert len(a_keys) == 2 * 7
    for a_key in a_keys:
        name = a_key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        update = config.lora_alpha / config.lora_r * lora[a_key.replace("lora_A", "lora_B")] @ lora[a_key]
        assert torch.count_nonzero(update) > 0
        expected[name] = expected[name] + update
    # `ask` answered through the LLM's ONNX copy (made from this merge); torch serves the same answer from exactly
    # base + alpha / r * B @ A
    torch_engine = QueryEngine.load(AskConfig(max_new_tokens=8, dtype="float32", runtime="torch"), Paths(home), False)
    assert torch_engine.stream_with(PRECISION, PRECISION).answer().answer == answer["answer"]
    served = torch_engine.generator.model.state_dict()  # type: ignore[attr-defined]
    assert served.keys() == expected.keys()
    for name, weight in served.items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=name)
