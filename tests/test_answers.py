"""evaluate_answers on hand-made rows with scripted answers (every number by hand), and `evaluate-answers` end to end
with the tiny random LM (its answers are the generator's, its numbers are those answers' scores)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ohlora_rag.engine as engine_module
from ohlora_rag.answers import (
    copies_markup,
    evaluate_answers,
    is_abstention,
    is_grounded,
    repeats_sentence,
    rouge_l,
)
from ohlora_rag.cli import app
from ohlora_rag.data import SftRows
from ohlora_rag.generator import Generation, Reply
from ohlora_rag.prompt import NO_INFO
from tests.conftest import CONCEPTS, SFT_ROWS, write_sft
from tests.test_ask import ScriptedGenerator

runner = CliRunner()
PRECISION, RECALL, DROPOUT, LORA = (CONCEPTS[i][2] for i in (1, 2, 3, 4))
DECLINED = "Sorry, my notes don't cover that."

# (question, gold entry or None, reference answer, the answer the scripted model gives)
NO_INFO_ROWS = [
    ("who won the cup ?", None, DECLINED, DECLINED),  # declines: right; ROUGE-L 1
    ("what is the capital of peru ?", None, DECLINED, "Lima is the capital."),  # invents: wrong; ROUGE-L 0
]
WRONG_ENTRY_ROWS = [  # the entry given does not answer the question: the reference declines
    ("what is adam ?", DROPOUT, "My notes only cover dropout, not that.", "I don't have any information on Adam here."),
    (
        "what is recall ?",
        PRECISION,
        "My notes only cover precision, not recall.",
        "Recall is true positives over actual positives.",  # answers anyway: LCS "recall", F1 1/7
    ),
    ("what is an epoch ?", LORA, "My notes only cover LoRA, not epochs.", "My notes only cover LoRA, not epochs."),
]
ENTRY_ROWS = [
    (
        "what is precision ?",
        PRECISION,
        "Precision is true positives over predicted positives.",
        "Precision is true positives over predicted positives.",  # grounded; ROUGE-L 1
    ),
    (
        "what is recall ?",
        RECALL,
        "Recall is true positives over actual positives.",
        "I have no information about recall in my notes.",  # a false abstention; LCS "recall": p 1/9, r 1/7, F1 1/8
    ),
    (
        "what is dropout ?",
        DROPOUT,
        "Dropout randomly zeroes units during training.",
        "Dropout is great.",  # names it, says nothing of the entry; LCS "dropout": p 1/3, r 1/6, F1 2/9
    ),
    (
        "what is lora ?",
        LORA,
        "LoRA adds low rank adapter matrices to frozen weights.",
        "LoRA adds low rank matrices to frozen weights.",  # grounded; LCS 8 of 8 and 9 words: F1 16/17
    ),
]
ROWS = NO_INFO_ROWS + WRONG_ENTRY_ROWS + ENTRY_ROWS


def _sft_rows(rows: list[tuple[str, str | None, str, str]]) -> SftRows:
    return SftRows(Path("dev.csv"), [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


class ScriptedModel:
    """generate(question, entry) -> the scripted answer for that question and entry; records each call."""

    def __init__(self, rows: list[tuple[str, str | None, str, str]]) -> None:
        self.script = {(q, e): answer for q, e, _, answer in rows}
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, question: str, entry: str | None) -> str:
        self.calls.append((question, entry))
        return self.script[question, entry]


def test_every_number_of_a_hand_made_set() -> None:
    model = ScriptedModel(ROWS)
    m = evaluate_answers(model, _sft_rows(ROWS), keep_examples=3)
    assert model.calls == [(q, e) for q, e, _, _ in ROWS]  # each row once, with its own entry, in order
    assert (m.rows, m.no_info_rows, m.wrong_entry_rows) == (9, 2, 3)
    assert m.abstention_accuracy == 1 / 2
    assert m.wrong_entry_declined == 2 / 3
    assert m.false_abstention == 1 / 4
    assert m.grounding == 2 / 4
    assert m.rouge_l == pytest.approx((1 + 0 + 0 + 1 / 7 + 1 + 1 + 1 / 8 + 2 / 9 + 16 / 17) / 9, rel=1e-12)
    assert m.retrieval_agreement is None
    assert m.examples == [{"question": q, "entry": e, "answer": a} for q, e, _, a in ROWS[:3]]
    assert m.seconds_per_answer >= 0
    assert m.to_dict()["wrong_entry_declined"] == 2 / 3
    assert m.markup_copied == 0 and m.repeated_sentence == 0  # no scripted answer copies markup or repeats itself


def test_markup_and_repeated_sentences_are_counted_over_all_answers() -> None:
    rows = [
        (*ENTRY_ROWS[0][:3], "Precision is TP / (TP + FP) | key idea: few false alarms."),
        (*ENTRY_ROWS[2][:3], "Dropout zeroes units. Key idea: less co-adaptation."),
        (*ENTRY_ROWS[3][:3], "LoRA adds low rank matrices. It is cheap to train. LoRA adds low rank matrices."),
        NO_INFO_ROWS[0],
    ]
    m = evaluate_answers(ScriptedModel(rows), _sft_rows(rows))
    assert m.markup_copied == 2 / 4 and m.repeated_sentence == 1 / 4


def test_copies_markup_and_repeats_sentence() -> None:
    assert copies_markup("Accuracy is easy to read | key idea: misleading on imbalanced data.")
    assert copies_markup("Accuracy is easy to read. KEY IDEA : misleading.")
    assert not copies_markup("The key idea is that accuracy misleads on imbalanced data.")
    assert repeats_sentence("Dropout zeroes units. It helps. dropout zeroes units!")
    assert not repeats_sentence("Dropout zeroes units. It helps. It helps.")  # two-word sentences do not count
    assert not repeats_sentence("Dropout zeroes units during training. Dropout zeroes whole channels in CNNs.")


def test_full_pipeline_answers_from_the_retrieved_entry_and_scores_by_the_gold_row() -> None:
    rows = [ENTRY_ROWS[0], NO_INFO_ROWS[0], ENTRY_ROWS[3], ENTRY_ROWS[1]]
    retrieved = {q: e for q, e in zip([r[0] for r in rows], [PRECISION, DROPOUT, DROPOUT, None])}
    answers = {
        ("what is precision ?", PRECISION): ENTRY_ROWS[0][3],  # right entry, grounded
        ("who won the cup ?", DROPOUT): "Dropout randomly zeroes units during training.",  # not a decline
        ("what is lora ?", DROPOUT): ENTRY_ROWS[3][3],  # grounded in its gold entry, not in the one retrieved
        ("what is recall ?", None): DECLINED,  # retrieval missed: the model declines
    }
    calls: list[tuple[str, str | None]] = []

    def generate(question: str, entry: str | None) -> str:
        calls.append((question, entry))
        return answers[question, entry]

    m = evaluate_answers(generate, _sft_rows(rows), retrieve=retrieved.__getitem__)
    assert calls == list(answers)  # the retrieved entry went into each prompt, not the gold one
    assert m.retrieval_agreement == 1 / 4  # only precision retrieved its own entry
    assert m.no_info_rows == 1 and m.abstention_accuracy == 0.0  # scored as its gold row says: no information
    assert m.false_abstention == 1 / 3 and m.grounding == 2 / 3  # grounding is judged against the gold entry
    assert math.isnan(m.wrong_entry_declined) and m.wrong_entry_rows == 0
    assert m.examples[1] == {"question": "who won the cup ?", "entry": DROPOUT, "answer": answers[rows[1][0], DROPOUT]}


def test_a_set_without_some_kind_of_row_reports_nan_for_it() -> None:
    m = evaluate_answers(ScriptedModel(ENTRY_ROWS), _sft_rows(ENTRY_ROWS))
    assert math.isnan(m.abstention_accuracy) and math.isnan(m.wrong_entry_declined)
    assert (m.no_info_rows, m.wrong_entry_rows, m.false_abstention, m.grounding) == (0, 0, 1 / 4, 2 / 4)
    assert len(m.examples) == 4
    empty = evaluate_answers(ScriptedModel([]), _sft_rows([]))
    assert empty.rows == 0 and math.isnan(empty.rouge_l) and math.isnan(empty.grounding)


def _answers_of(tiny_lm: Path, home: Path, questions: list[str], entries: list[str | None]) -> list[str]:
    """What the tiny LM itself answers to each (question, entry) prompt, greedy, 6 tokens at most."""
    from ohlora_rag.config import Paths
    from ohlora_rag.generator import Generator, choose_llm

    generator = Generator(choose_llm(str(tiny_lm), None, Paths(home)), device="cpu", dtype="float32")
    return [
        generator.generate(generator.prompts.prompt(q, e), max_new_tokens=6).text for q, e in zip(questions, entries)
    ]


def test_evaluate_answers_command_scores_the_tiny_lms_answers(home: Path, tiny_lm: Path) -> None:
    """The default data/sft_dev.csv, gold entries, the real (random) tiny LM: the report's answers are the LM's own
    answers to each row's prompt, and its numbers are those answers' scores."""
    write_sft(home / "data" / "sft_dev.csv")
    args = ["evaluate-answers", "--max-new-tokens", "6", "--dtype", "float32", "--base-llm", str(tiny_lm)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert "no trained adapter" in result.stderr
    report = json.loads(result.stdout)
    questions = [q for q, _, _ in SFT_ROWS]
    entries = [e or None for _, e, _ in SFT_ROWS]
    answers = _answers_of(tiny_lm, home, questions, entries)
    assert report["examples"] == [
        {"question": q, "entry": e, "answer": a} for q, e, a in zip(questions, entries, answers)
    ]
    assert (report["rows"], report["no_info_rows"], report["wrong_entry_rows"]) == (4, 1, 0)
    assert report["model"] == str(tiny_lm) and report["retrieval_agreement"] is None
    entry_rows = [(a, e) for a, e in zip(answers, entries) if e]
    assert report["abstention_accuracy"] == float(is_abstention(answers[3]))
    assert report["false_abstention"] == sum(is_abstention(a) for a, _ in entry_rows) / 3
    assert report["grounding"] == sum(is_grounded(a, e) for a, e in entry_rows) / 3
    assert report["rouge_l"] == pytest.approx(sum(rouge_l(a, r) for a, (_, _, r) in zip(answers, SFT_ROWS)) / 4)

    text = runner.invoke(app, args)
    assert text.exit_code == 0, text.output
    dev = home / "data" / "sft_dev.csv"
    assert text.stdout.startswith(f"{tiny_lm} (no adapter) on {dev} (4 rows, 1 without information; gold entries)\n")


class EntryAnsweringGenerator(ScriptedGenerator):
    """A model that answers with the reference answer of the entry in its prompt, and declines without one."""

    def start(self, prompt: str, max_new_tokens: int = 160, temperature: float = 0.0, seed: int | None = None) -> Reply:
        ScriptedGenerator.prompts_seen.append(prompt)
        given = [answer for _, entry, answer in SFT_ROWS if entry and f"Information: {entry}" in prompt]
        text = given[0] if given else DECLINED
        return Reply.finished([text], Generation(text, len(text.split()), 0.01))


def test_evaluate_answers_command_gives_each_row_its_entry_and_prints_every_number(
    home: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ScriptedGenerator.prompts_seen = []
    monkeypatch.setattr(engine_module, "Generator", EntryAnsweringGenerator)
    wrong_entry = ("what is adam ?", DROPOUT, "my notes only cover dropout , not adam .")
    dev = write_sft(home / "data" / "sft_dev.csv", [*SFT_ROWS, wrong_entry])
    result = runner.invoke(app, ["evaluate-answers", "--base-llm", str(tiny_lm)])
    assert result.exit_code == 0, result.output
    assert len(ScriptedGenerator.prompts_seen) == 5
    assert [NO_INFO in p for p in ScriptedGenerator.prompts_seen] == [False, False, False, True, False]
    # precision, recall, dropout: the reference itself (grounded, ROUGE-L 1); the cup: a decline whose LCS with the
    # reference is 'sorry my notes cover that', 5 of 6 and 7 words, F1 10/13; adam: the dropout answer, not a
    # decline, LCS 'dropout', 1 of 6 and 7 words, F1 2/13
    rouge = (3 + 10 / 13 + 2 / 13) / 5
    assert result.stdout.splitlines()[:-1] == [
        f"{tiny_lm} (no adapter) on {dev} (5 rows, 1 without information; gold entries)",
        "  abstention accuracy  1.000",
        "  false abstention     0.000",
        "  wrong entry declined 0.000 (1 rows)",
        "  grounding            1.000",
        f"  ROUGE-L              {rouge:.3f}",
        "  markup copied        0.000",
        "  repeated sentence    0.000",
    ]
    assert result.stdout.splitlines()[-1].startswith("  seconds per answer   ")


def test_evaluate_answers_full_pipeline_with_several_files_and_a_limit(
    home: Path, tiny_lm: Path, tmp_path: Path
) -> None:
    """--full-pipeline retrieves for each question: with --threshold 0.999 only a question that is its entry's own
    text finds it (cosine 1), so retrieval agrees on that row and on the no-information row, not on 'what is recall'."""
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    first = write_sft(tmp_path / "a.csv", [(PRECISION, PRECISION, "precision is true positives ."), SFT_ROWS[1]])
    second = write_sft(tmp_path / "b.csv", [SFT_ROWS[3], SFT_ROWS[0]])
    args = ["evaluate-answers", "--full-pipeline", "--threshold", "0.999", "--max-new-tokens", "4"]
    args += ["--data", str(first), "--data", str(second), "--dtype", "float32", "--base-llm", str(tiny_lm)]
    result = runner.invoke(app, [*args, "--limit", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 3 and report["no_info_rows"] == 1  # a.csv's two rows, then b.csv's first
    assert report["retrieval_agreement"] == 2 / 3
    assert [x["entry"] for x in report["examples"]] == [PRECISION, None, None]  # what retrieval put in each prompt
    assert report["examples"][2]["question"] == SFT_ROWS[3][0]

    text = runner.invoke(app, args)
    assert text.exit_code == 0, text.output
    assert f"on {first}+{second} (4 rows, 1 without information; full pipeline)" in text.stdout
    assert "  retrieval agreement  0.500\n" in text.stdout  # 'what is precision ?' misses its entry too
