"""The `ohlora-rag` command line: each command parses its options, builds a config, calls one library function, prints."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from .config import (
    CONVERSATIONS_HELDOUT_DATA,
    AskConfig,
    Defaults,
    IndexConfig,
    JudgeTrainConfig,
    LlmTrainConfig,
    Paths,
    SbertTrainConfig,
    SearchConfig,
    ServeConfig,
    VerifierTrainConfig,
    option_name,
)
from .device import configure_threads
from .errors import OhloraError, UsageError


def _flags_without_type(params: list[Any]) -> list[Any]:
    """A flag takes no value: --help shows no `<bool>` type beside it."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


app = typer.Typer(
    name="ohlora-rag",
    help="Oh-LoRA ML tutor: retrieval-augmented answers to machine-learning questions, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)

_D = Defaults()
F = TypeVar("F", bound=Callable[..., Any])


def option(config: type, name: str, **extra: Any) -> Any:
    """The typer option of a setting declared with `config.knob`: flag, alias and help come from the declaration
    (the parameter's default is the field's: tests/test_config_cli.py checks both)."""
    declared = next(f for f in dataclasses.fields(config) if f.name == name)
    names = [option_name(declared)] + ([declared.metadata["short"]] if declared.metadata.get("short") else [])
    return typer.Option(*names, help=declared.metadata["help"], **extra)


class _State:
    home: str | None = None


def _paths() -> Paths:
    return Paths.resolve(_State.home)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _disk_full(exc: BaseException) -> str | None:
    """' (writing PATH)' / '' when `exc` or an exception it chains is a full disk; None otherwise."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return f" (writing {seen.filename})" if seen.filename else ""
        if "No space left on device" in str(seen):  # safetensors' and tokenizers' Rust errors are not OSErrors
            return ""
        seen = seen.__cause__ or seen.__context__
    return None


def friendly(func: F) -> F:
    """Library errors become one line on stderr and a non-zero exit; so does a full disk (outputs are swapped in
    only when complete, so the previous model or index is still there); Ctrl-C exits 130 without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OhloraError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:
            where = _disk_full(exc)
            if where is None:
                raise
            _fail(
                f"no space left on device{where} — free some disk space and run the command again;"
                " the previous model or index is unchanged",
                1,
            )

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    home: Annotated[
        str | None,
        typer.Option(
            "--home", help="Folder holding data/, index/, models/ (default: $OHLORA_HOME, else the current folder)."
        ),
    ] = None,
) -> None:
    _State.home = home


@app.command("build-index", cls=_Command)
@friendly
def build_index_cmd(
    db: Annotated[Path | None, option(IndexConfig, "db")] = None,
    encoder: Annotated[str | None, option(IndexConfig, "encoder")] = None,
    batch_size: Annotated[int, option(IndexConfig, "batch_size")] = _D.index.batch_size,
    calibration: Annotated[Path | None, option(IndexConfig, "calibration")] = None,
    no_calibrate: Annotated[bool, option(IndexConfig, "calibrate")] = False,
    known: Annotated[Path | None, option(IndexConfig, "known_questions")] = None,
    no_known: Annotated[bool, option(IndexConfig, "use_known")] = False,
    conversations: Annotated[Path | None, option(IndexConfig, "conversations")] = None,
    no_conversations: Annotated[bool, option(IndexConfig, "use_conversations")] = False,
    no_judge: Annotated[bool, option(IndexConfig, "use_judge")] = False,
    no_verifier: Annotated[bool, option(IndexConfig, "use_verifier")] = False,
    no_onnx: Annotated[bool, option(IndexConfig, "onnx")] = False,
    quiet: Annotated[bool, option(IndexConfig, "progress")] = False,
) -> None:
    """Encode the concept DB and publish an exact inner-product Faiss index (+ BM25, known questions) under index/."""
    from .build import build_index

    config = IndexConfig(
        db=db,
        encoder=encoder,
        batch_size=batch_size,
        progress=not quiet,
        calibration=calibration,
        calibrate=not no_calibrate,
        known_questions=known,
        use_known=not no_known,
        conversations=conversations,
        use_conversations=not no_conversations,
        use_judge=not no_judge,
        use_verifier=not no_verifier,
        onnx=not no_onnx,
    )
    report = build_index(config, _paths())
    m = report.manifest
    where = "GPU" if report.on_gpu else "CPU"
    typer.echo(
        f"indexed {m.count} entries from {m.db} with {m.encoder} (dim {m.dim}, {where}) "
        f"in {report.total_seconds:.1f}s (encoding {report.encode_seconds:.1f}s) -> {report.folder}"
    )
    if report.decision is not None:
        d = report.decision.metrics
        typer.echo(
            f"entry decision fitted on {report.decision.calibrated_on}: cutoff {report.decision.cutoff:.3f}; there "
            f"right entry {d['right']:.3f}, wrong {d['wrong']:.3f}, near-miss declined {d['near_miss_declined']:.3f}, "
            f"unrelated declined {d['unrelated_declined']:.3f}"
        )
    if report.verification is not None:
        v = report.verification
        typer.echo(
            f"entry verifier: the decision's best {v.candidates} re-scored, weight {v.weight:.2f}, cutoff "
            f"{v.cutoff:.3f}, not run where the decision alone is below {v.sure_below:.3f} or above "
            f"{v.sure_above:.3f} ({(v.metrics or {}).get('settled', 0.0):.0%} of the calibration questions); a given "
            f"entry passes at {v.entry_cutoff:.3f} (chat and the server load it at start)"
        )
    if report.follow is not None:
        f = report.follow.metrics
        typer.echo(
            f"follow-up model fitted on {report.follow.calibrated_on} ({f['turns']} turns): cutoff "
            f"{report.follow.cutoff:.2f}; there right entry "
            + ", ".join(f"{kind.replace('_', '-')} {share:.3f}" for kind, share in f["right"].items())
        )
        if report.follow.judge is not None:
            typer.echo(
                f"follow-up judge: weight {report.follow.judge:.2f}, combined cutoff {report.follow.judge_cutoff:.2f} "
                "(chat and the server load it at start)"
            )
    if report.onnx is not None:
        typer.echo(f"the encoder's ONNX copy for search and ask: {report.onnx} ({report.onnx_seconds:.1f}s)")


@app.command("search", cls=_Command)
@friendly
def search_cmd(
    question: Annotated[str, typer.Argument(help="The question.")],
    top_k: Annotated[int, option(SearchConfig, "top_k")] = _D.search.top_k,
    threshold: Annotated[float | None, option(SearchConfig, "threshold")] = None,
    encoder: Annotated[str | None, option(SearchConfig, "encoder")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Retrieve the concept entries closest to a question (retrieval only, no LLM)."""
    configure_threads()  # one question at a time: set before torch is imported
    from .retriever import Retriever, check_question

    config = SearchConfig(top_k=top_k, threshold=threshold, encoder=encoder)
    question = check_question(question)  # before loading any model
    result = Retriever.load(config, _paths()).search(question)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    for rank, hit in enumerate(result.hits, start=1):
        mark = "" if hit.matched else "  (below threshold)" if result.cutoff is None else "  (not a match)"
        confidence = f" p={hit.confidence:.2f}" if hit.confidence is not None else ""
        typer.echo(f"{rank}. [{hit.score:.3f}{confidence}] {hit.id}{mark}\n   {hit.text}")
    if result.best is None and result.cutoff is None:
        typer.echo(f"no matching information: best score below the threshold {result.threshold:.2f}")
    elif result.best is None:
        typer.echo(f"no matching information: {_why_declined(result)}")


def _why_declined(result: Any) -> str:
    """Why nothing went into the prompt, in the words of the decision that was used (a SearchResult or Answer)."""
    hits = getattr(result, "hits", None) or getattr(result, "sources", [])
    if not hits:
        return "the index is empty"
    if result.cutoff is not None:
        return f"best confidence {hits[0].confidence:.2f} < cutoff {result.cutoff:.2f} (entry decision)"
    return f"best score {hits[0].score:.3f} < threshold {result.threshold:.2f}"


def _print_report(name: str, report: Any) -> None:
    p, r, c = report.pairs, report.ranking, report.calibration
    cells = [f"{p.mse:.4f}", f"{p.mae:.4f}", f"{p.pearson:.4f}", f"{p.spearman:.4f}", f"{p.top1:.3f}"]
    cells += [f"{r.recall_at_1:.3f}", f"{r.recall_at_5:.3f}", f"{r.mrr_at_10:.3f}"] if r else ["-", "-", "-"]
    cells += [f"{c.threshold:.3f}", f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.coverage:.3f}"] if c else ["-"] * 4
    typer.echo(f"{name:<28}" + "".join(f"{x:>10}" for x in cells))


_REPORT_HEADER = f"{'model':<28}" + "".join(
    f"{h:>10}"
    for h in (
        "MSE",
        "MAE",
        "Pearson",
        "Spearman",
        "top-1",
        "R@1",
        "R@5",
        "MRR@10",
        "threshold",
        "precision",
        "recall",
        "coverage",
    )
)


@app.command("train-sbert", cls=_Command)
@friendly
def train_sbert_cmd(
    data: Annotated[Path | None, option(SbertTrainConfig, "data")] = None,
    valid: Annotated[Path | None, option(SbertTrainConfig, "valid")] = None,
    base: Annotated[str | None, option(SbertTrainConfig, "base")] = None,
    epochs: Annotated[int, option(SbertTrainConfig, "epochs")] = _D.sbert.epochs,
    batch_size: Annotated[int, option(SbertTrainConfig, "batch_size")] = _D.sbert.batch_size,
    lr: Annotated[float, option(SbertTrainConfig, "learning_rate")] = _D.sbert.learning_rate,
    loss: Annotated[str, option(SbertTrainConfig, "loss")] = _D.sbert.loss,
    ranking_weight: Annotated[float, option(SbertTrainConfig, "ranking_weight")] = _D.sbert.ranking_weight,
    seed: Annotated[int, option(SbertTrainConfig, "seed")] = _D.sbert.seed,
    max_seq_length: Annotated[int, option(SbertTrainConfig, "max_seq_length")] = _D.sbert.max_seq_length,
    train_embeddings: Annotated[bool, option(SbertTrainConfig, "freeze_embeddings")] = False,
    freeze_layers: Annotated[int, option(SbertTrainConfig, "freeze_layers")] = _D.sbert.freeze_layers,
    resume: Annotated[bool, option(SbertTrainConfig, "resume")] = False,
    keep_checkpoints: Annotated[bool, option(SbertTrainConfig, "keep_checkpoints")] = False,
    out: Annotated[Path | None, option(SbertTrainConfig, "out")] = None,
    quiet: Annotated[bool, option(SbertTrainConfig, "progress")] = False,
) -> None:
    """Fine-tune the S-BERT encoder on (question, entry, score) pairs; build-index then uses it."""
    from .training.sbert import train_sbert

    paths = _paths()
    config = SbertTrainConfig(
        data=data if data is not None else paths.home / _D.sbert.data,
        valid=valid,
        base=base,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        loss=loss,
        ranking_weight=ranking_weight,
        seed=seed,
        max_seq_length=max_seq_length,
        freeze_embeddings=not train_embeddings,
        freeze_layers=freeze_layers,
        resume=resume,
        keep_checkpoints=keep_checkpoints,
        out=out,
        progress=not quiet,
    )
    result = train_sbert(config, paths)
    typer.echo(
        f"trained on {result.train_pairs} pairs ({result.steps} steps, {result.pairs_per_second:.1f} pairs/s, "
        f"{result.seconds:.0f}s); validated on {result.valid_pairs} pairs -> {result.out}"
    )
    typer.echo(_REPORT_HEADER)
    _print_report("fine-tuned (valid split)", result.report)
    typer.echo("next: ohlora-rag build-index")


@app.command("evaluate-retrieval", cls=_Command)
@friendly
def evaluate_retrieval_cmd(
    pairs: Annotated[Path, typer.Option("--pairs", help="Pairs CSV/Parquet to measure on (all rows are used).")],
    model: Annotated[
        str | None, typer.Option("--model", help="Encoder to measure (default: models/sbert/ if trained).")
    ] = None,
    db: Annotated[
        Path | None, typer.Option("--db", help="DB to rank against (default: the entries of the pairs file).")
    ] = None,
    save_threshold: Annotated[
        bool,
        typer.Option(
            "--save-threshold",
            help="Store the fine-tuned encoder's threshold calibrated on these pairs in its manifest (then build-index).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Pair metrics (MSE, MAE, Pearson, Spearman, top-1 among labelled), ranking (R@1, R@5, MRR@10) and the
    calibrated threshold: the base encoder and the fine-tuned one side by side."""
    from .evaluate import compare_encoders

    result = compare_encoders(pairs, model, db, save_threshold, _paths())
    if as_json:
        payload = {
            name: {"model": result.refs[name].reference, **rep.to_dict()} for name, rep in result.reports.items()
        }
        typer.echo(json.dumps(payload, ensure_ascii=False))
        return
    typer.echo(_REPORT_HEADER)
    for name, rep in result.reports.items():
        _print_report(f"{name}: {Path(result.refs[name].reference).name}"[:27], rep)
    if result.saved_threshold is not None:
        path = result.refs["fine-tuned"].path
        typer.echo(f"threshold {result.saved_threshold} saved in {path} — next: ohlora-rag build-index", err=True)


@app.command("evaluate-trust", cls=_Command)
@friendly
def evaluate_trust_cmd(
    questions: Annotated[
        Path | None,
        typer.Option(
            "--questions",
            help="Labelled test questions: question, kind (in_kb|near_miss|unrelated), concept_id "
            "(default: data/trust_test.csv).",
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibrate",
            help="Labelled questions to fit each decision on, never the test file (default: data/trust_calib.csv).",
        ),
    ] = None,
    db: Annotated[
        Path | None,
        typer.Option("--db", help="The concept DB the questions are labelled against (default: data/concepts.csv)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Fine-tuned encoder (default: models/sbert/ if trained).")
    ] = None,
    known: Annotated[Path | None, option(IndexConfig, "known_questions")] = None,
    no_known: Annotated[bool, option(IndexConfig, "use_known")] = False,
    all_variants: Annotated[
        bool, typer.Option("--variants", help="Also measure the simpler decisions (seed rule, cosine cut, BM25 ...).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Which entry, or none, goes into the prompt: right entry, wrong entry, wrongly declined, near-miss and
    unrelated questions declined — base and fine-tuned encoder side by side (indexes built in memory)."""
    from .build import known_questions_file
    from .evaluate import TRUST_VARIANTS, compare_trust

    paths = _paths()
    # defaults live under the home folder, like every command's default data files; given paths are taken as given
    test = questions if questions is not None else paths.data_dir / "trust_test.csv"
    calib = calibration if calibration is not None else paths.data_dir / "trust_calib.csv"
    db = db if db is not None else paths.default_db
    if test.resolve() == calib.resolve():
        raise UsageError("--questions and --calibrate name the same file — calibrate on questions you do not test on")
    variants = None if all_variants else [list(TRUST_VARIANTS)[0], *list(TRUST_VARIANTS)[-2:]]
    known_file = known_questions_file(IndexConfig(db=db, known_questions=known, use_known=not no_known), paths)
    for other, flag in ((test, "--questions"), (calib, "--calibrate")):
        if known_file is not None and known_file.resolve() == other.resolve():
            raise UsageError(f"--known-questions and {flag} name the same file — keep the known questions apart")
    rows = compare_trust(test, calib, db, model, variants, paths, known_file)
    if as_json:
        typer.echo(json.dumps({"questions": str(test), "calibration": str(calib), "rows": [r.to_dict() for r in rows]}))
        return
    o = rows[0].outcomes
    typer.echo(
        f"{test}: {o.in_kb} in-KB, {o.near_miss} near-miss, {o.unrelated} unrelated questions; fitted on {calib}"
    )
    heads = ("right", "wrong", "declined", "near-miss", "unrelated", "R@1")
    typer.echo(f"{'encoder':<11}{'decision':<50}" + "".join(f"{h:>10}" for h in heads) + f"{'cutoff':>9}")
    for r in rows:
        o = r.outcomes
        cells = (o.right, o.wrong, o.declined, o.near_miss_declined, o.unrelated_declined, o.ranked_first)
        cut = f"{r.cutoff:.3f}" if r.cutoff is not None else "-"
        typer.echo(f"{r.encoder:<11}{r.decision:<50}" + "".join(f"{c:>10.3f}" for c in cells) + f"{cut:>9}")
    typer.echo(
        "(right/wrong/declined: shares of the in-KB questions; near-miss/unrelated: shares declined; R@1: in-KB "
        "questions whose best-scored entry is right, before the decline decision)"
    )


@app.command("evaluate-conversations", cls=_Command)
@friendly
def evaluate_conversations_cmd(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help='Conversations, one JSON object per line: {"turns": [{"q", "concept_id", "kind"}]} '
            f"(default: {CONVERSATIONS_HELDOUT_DATA}, the file no shipped part was trained or chosen on).",
        ),
    ] = None,
    top_k: _TopK = _D.ask.top_k,
    threshold: _Threshold = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Follow-ups and topic switches over the published index: right entry per kind of turn, switches not dragged
    back to the old topic — with conversation memory and, for comparison, each question alone."""
    configure_threads()  # one question at a time: set before torch is imported
    from .data import load_conversations
    from .evaluate import evaluate_conversations
    from .retriever import Retriever

    paths = _paths()
    path = data if data is not None else paths.home / CONVERSATIONS_HELDOUT_DATA
    conversations = load_conversations(path)
    retriever = Retriever.load(SearchConfig(top_k=top_k, threshold=threshold), paths)
    reports = {
        "memory": evaluate_conversations(retriever, conversations, top_k),
        "alone": evaluate_conversations(retriever, conversations, top_k, follow=False),
    }
    if retriever.follow is not None:  # the hand-written rule the fitted model replaced, for comparison
        reports["rule"] = evaluate_conversations(retriever, conversations, top_k, rule=True)
    if as_json:
        typer.echo(json.dumps({"data": str(path), **{k: r.to_dict() for k, r in reports.items()}}))
        return
    typer.echo(f"{path}: {len(conversations)} conversations")
    kinds = list(reports["memory"].turns)
    rule = reports.get("rule")
    extra = f"{'rule: right':>13}{'rule: clean':>13}" if rule else ""
    typer.echo(f"{'kind':<17}{'turns':>6}{'right':>9}{'clean':>9}{'followed':>10}{'alone: right':>14}" + extra)
    for kind in kinds:
        m, a = reports["memory"], reports["alone"]
        clean = f"{m.clean[kind]:.3f}" if kind in m.clean else "-"
        row = f"{kind:<17}{m.turns[kind]:>6}{m.right[kind]:>9.3f}{clean:>9}{m.followed[kind]:>10.3f}{a.right[kind]:>14.3f}"
        if rule:
            rule_clean = f"{rule.clean[kind]:.3f}" if kind in rule.clean else "-"
            row += f"{rule.right[kind]:>13.3f}{rule_clean:>13}"
        typer.echo(row)
    model = "the fitted follow-up model" if rule else "the hand-written follow-up rule (the index has no fitted model)"
    typer.echo(
        f"(with memory: {model}; right: the entry put into the prompt is the labelled one, or none for off-topic; "
        "clean: a switch's entry is not the previous topic's; followed: retrieved for the topic as a follow-up"
        + ("; rule: the hand-written rule instead)" if rule else ")")
    )


@app.command("train-llm", cls=_Command)
@friendly
def train_llm_cmd(
    data: Annotated[list[Path] | None, option(LlmTrainConfig, "data")] = None,
    valid: Annotated[Path | None, option(LlmTrainConfig, "valid")] = None,
    base_llm: Annotated[str | None, option(LlmTrainConfig, "base_llm")] = None,
    template: Annotated[str, option(LlmTrainConfig, "template")] = _D.llm.template,
    epochs: Annotated[int, option(LlmTrainConfig, "epochs")] = _D.llm.epochs,
    batch_size: Annotated[int, option(LlmTrainConfig, "batch_size")] = _D.llm.batch_size,
    lora_r: Annotated[int, option(LlmTrainConfig, "lora_r")] = _D.llm.lora_r,
    lora_alpha: Annotated[int, option(LlmTrainConfig, "lora_alpha")] = _D.llm.lora_alpha,
    lora_dropout: Annotated[float, option(LlmTrainConfig, "lora_dropout")] = _D.llm.lora_dropout,
    lr: Annotated[float, option(LlmTrainConfig, "learning_rate")] = _D.llm.learning_rate,
    max_length: Annotated[int, option(LlmTrainConfig, "max_length")] = _D.llm.max_length,
    seed: Annotated[int, option(LlmTrainConfig, "seed")] = _D.llm.seed,
    resume: Annotated[bool, option(LlmTrainConfig, "resume")] = False,
    merge: Annotated[bool, option(LlmTrainConfig, "merge")] = False,
    out: Annotated[Path | None, option(LlmTrainConfig, "out")] = None,
    quiet: Annotated[bool, option(LlmTrainConfig, "progress")] = False,
) -> None:
    """LoRA-tune the answering LLM on (entry or no-info, question, answer) rows; loss on the answer only."""
    from .training.llm import train_llm

    paths = _paths()
    config = LlmTrainConfig(
        data=data or [paths.home / d for d in _D.llm.data],  # type: ignore[union-attr]
        valid=valid,
        base_llm=base_llm,
        template=template,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        max_length=max_length,
        seed=seed,
        resume=resume,
        merge=merge,
        out=out,
        progress=not quiet,
    )
    r = train_llm(config, paths)
    losses = f"train loss {r.train_loss:.3f}" if r.train_loss is not None else ""
    if r.eval_loss is not None:
        losses += f", eval loss {r.eval_loss:.3f}"
    typer.echo(
        f"trained on {r.rows} rows ({r.steps} steps, {r.tokens_per_second:.0f} tokens/s, {r.seconds:.0f}s; {losses}) -> {r.out}"
    )


@app.command("train-judge", cls=_Command)
@friendly
def train_judge_cmd(
    conversations: Annotated[Path | None, option(JudgeTrainConfig, "conversations")] = None,
    encoder: Annotated[str, option(JudgeTrainConfig, "encoder")] = _D.judge.encoder,
    epochs: Annotated[int, option(JudgeTrainConfig, "epochs")] = _D.judge.epochs,
    batch_size: Annotated[int, option(JudgeTrainConfig, "batch_size")] = _D.judge.batch_size,
    lr: Annotated[float, option(JudgeTrainConfig, "learning_rate")] = _D.judge.learning_rate,
    lora_r: Annotated[int, option(JudgeTrainConfig, "lora_r")] = _D.judge.lora_r,
    lora_alpha: Annotated[int, option(JudgeTrainConfig, "lora_alpha")] = _D.judge.lora_alpha,
    lora_dropout: Annotated[float, option(JudgeTrainConfig, "lora_dropout")] = _D.judge.lora_dropout,
    max_length: Annotated[int, option(JudgeTrainConfig, "max_length")] = _D.judge.max_length,
    seed: Annotated[int, option(JudgeTrainConfig, "seed")] = _D.judge.seed,
    out: Annotated[Path | None, option(JudgeTrainConfig, "out")] = None,
    quiet: Annotated[bool, option(JudgeTrainConfig, "progress")] = False,
) -> None:
    """Train the follow-up judge: does a question follow its conversation's topic? (labelled conversations, replayed
    over the published index; build-index then uses it)."""
    config = _pair_config(JudgeTrainConfig, dict(locals()))
    from .training.judge import train_judge_on

    record, folder = train_judge_on(config, _paths())
    _trained(record, folder, f"{record['turns']} turns ({record['follow_ups']} follow-ups")


def _pair_config(cls: type[Any], options: dict[str, Any]) -> Any:
    """A pair model's training config (train-judge, train-verifier) from its command's options."""
    options["learning_rate"] = options.pop("lr")
    options["progress"] = not options.pop("quiet")
    return cls(**options)


def _trained(record: dict[str, Any], folder: Path, what: str) -> None:
    m = record["metrics"]
    typer.echo(
        f"trained on {what}; {m['seconds']:.0f}s; final loss {m['loss'][-1]:.3f}) -> {folder}; run `ohlora-rag "
        "build-index` to use it"
    )


@app.command("train-verifier", cls=_Command)
@friendly
def train_verifier_cmd(
    encoder: Annotated[str, option(VerifierTrainConfig, "encoder")] = _D.verifier.encoder,
    epochs: Annotated[int, option(VerifierTrainConfig, "epochs")] = _D.verifier.epochs,
    batch_size: Annotated[int, option(VerifierTrainConfig, "batch_size")] = _D.verifier.batch_size,
    lr: Annotated[float, option(VerifierTrainConfig, "learning_rate")] = _D.verifier.learning_rate,
    lora_r: Annotated[int, option(VerifierTrainConfig, "lora_r")] = _D.verifier.lora_r,
    lora_alpha: Annotated[int, option(VerifierTrainConfig, "lora_alpha")] = _D.verifier.lora_alpha,
    lora_dropout: Annotated[float, option(VerifierTrainConfig, "lora_dropout")] = _D.verifier.lora_dropout,
    max_length: Annotated[int, option(VerifierTrainConfig, "max_length")] = _D.verifier.max_length,
    seed: Annotated[int, option(VerifierTrainConfig, "seed")] = _D.verifier.seed,
    out: Annotated[Path | None, option(VerifierTrainConfig, "out")] = None,
    quiet: Annotated[bool, option(VerifierTrainConfig, "progress")] = False,
) -> None:
    """Train the entry verifier: does an entry answer a question? (the published index's known questions against
    their own entries and look-alikes; build-index then uses it)."""
    config = _pair_config(VerifierTrainConfig, dict(locals()))
    from .training.verifier import train_verifier_on

    record, folder = train_verifier_on(config, _paths())
    _trained(record, folder, f"{record['pairs']} pairs ({record['answers']} answering")


def _loaded(engine: Any) -> None:
    """What loading the engine has to say: which LLM answers, and a copy made once (why this run was slow)."""
    if engine.notice:
        typer.echo(f"notice: {engine.notice}", err=True)
    if engine.made_copy:
        typer.echo(f"note: made the LLM's ONNX copy for faster starts from now on: {engine.made_copy} (once)", err=True)


def _ask_config(
    top_k: int,
    threshold: float | None,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    base_llm: str | None,
    adapter: Path | None,
    no_adapter: bool = False,
    no_guard: bool = False,
    dtype: str = "auto",
    runtime: str = "auto",
) -> Any:

    return AskConfig(
        top_k=top_k,
        threshold=threshold,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        base_llm=base_llm,
        adapter=adapter,
        use_adapter=not no_adapter,
        guard=not no_guard,
        dtype=dtype,
        runtime=runtime,
    )


def _print_answer(answer: Any, streamed: bool) -> None:
    if not streamed:
        typer.echo(answer.answer)
    if answer.used:
        note = " (given to the tutor, which found it does not answer the question)" if answer.declined else ""
        typer.echo(f"\nsource [{answer.used.score:.3f}] {answer.used.id}{note}: {answer.used.text}")
    else:
        typer.echo(f"\nsource: none ({_why_declined(answer)})")


_TopK = Annotated[int, option(AskConfig, "top_k")]
_Threshold = Annotated[float | None, option(AskConfig, "threshold")]
_MaxNew = Annotated[int, option(AskConfig, "max_new_tokens")]
_Temp = Annotated[float, option(AskConfig, "temperature")]
_Seed = Annotated[int, option(AskConfig, "seed")]
_BaseLLM = Annotated[str | None, option(AskConfig, "base_llm")]
_Adapter = Annotated[Path | None, option(AskConfig, "adapter")]
_NoAdapter = Annotated[bool, option(AskConfig, "use_adapter")]
_NoGuard = Annotated[bool, option(AskConfig, "guard")]
_DType = Annotated[str, option(AskConfig, "dtype")]
_Runtime = Annotated[str, option(AskConfig, "runtime")]


@app.command("ask", cls=_Command)
@friendly
def ask_cmd(
    question: Annotated[str | None, typer.Argument(help="The question (or use --file).")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Batch: one question per line.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Batch: write one JSON object per line here (default: stdout).")
    ] = None,
    top_k: _TopK = _D.ask.top_k,
    threshold: _Threshold = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object: answer, sources, scores, timings (turns --stream off)."),
    ] = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="Print the answer as it is generated (not with --json).")
    ] = False,
    max_new_tokens: _MaxNew = _D.ask.max_new_tokens,
    temperature: _Temp = _D.ask.temperature,
    seed: _Seed = _D.ask.seed,
    base_llm: _BaseLLM = None,
    adapter: _Adapter = None,
    no_adapter: _NoAdapter = False,
    no_guard: _NoGuard = False,
    dtype: _DType = _D.ask.dtype,
    runtime: _Runtime = _D.ask.runtime,
) -> None:
    """Answer a question: retrieve the best entry, build the prompt, generate with the LoRA-tuned LLM."""
    configure_threads()  # one question at a time: set before torch is imported
    from .data import load_questions
    from .engine import QueryEngine
    from .retriever import check_question

    if (question is None) == (file is None):
        raise UsageError("give a question or --file FILE (one question per line), not both")
    config = _ask_config(
        top_k, threshold, max_new_tokens, temperature, seed, base_llm, adapter, no_adapter, no_guard, dtype, runtime
    )
    questions = [check_question(question)] if question is not None else load_questions(file)  # type: ignore[arg-type]
    if out is not None:
        _check_out(out)  # before minutes of model loading
    engine = QueryEngine.load(config, _paths())
    _loaded(engine)
    if file is not None:
        sink = out.open("w", encoding="utf-8") if out else None
        try:
            for q in questions:
                line = json.dumps(engine.ask(q).to_dict(), ensure_ascii=False)
                typer.echo(line, file=sink) if sink else typer.echo(line)
        finally:
            if sink:
                sink.close()
        if out:
            typer.echo(f"wrote {len(questions)} answers to {out}", err=True)
        return
    answering = engine.stream(questions[0])
    streamed = stream and not as_json
    if streamed:
        for piece in answering:
            typer.echo(piece, nl=False)
        typer.echo()
    answer = answering.answer()
    if as_json:
        typer.echo(json.dumps(answer.to_dict(), ensure_ascii=False))
        return
    _print_answer(answer, streamed=streamed)


def _check_out(out: Path) -> None:
    """`--out` must name a file that can be created in an existing, writable folder."""
    folder = out.parent
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder — name a file, e.g. {out / 'answers.jsonl'}")
    if not folder.is_dir():
        raise UsageError(f"--out {out}: the folder {folder} does not exist — create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"--out {out}: not writable — choose a path you can write to")


@app.command("chat", cls=_Command)
@friendly
def chat_cmd(
    top_k: _TopK = _D.ask.top_k,
    threshold: _Threshold = None,
    max_new_tokens: _MaxNew = _D.ask.max_new_tokens,
    temperature: _Temp = _D.ask.temperature,
    seed: _Seed = _D.ask.seed,
    base_llm: _BaseLLM = None,
    adapter: _Adapter = None,
    no_adapter: _NoAdapter = False,
    no_guard: _NoGuard = False,
    dtype: _DType = _D.ask.dtype,
    runtime: _Runtime = _D.ask.runtime,
) -> None:
    """Ask questions in a loop (models loaded once). An empty line, 'exit' or Ctrl-D ends it."""
    configure_threads()  # one question at a time: set before torch is imported
    from .engine import QueryEngine
    from .retriever import check_question

    config = _ask_config(
        top_k, threshold, max_new_tokens, temperature, seed, base_llm, adapter, no_adapter, no_guard, dtype, runtime
    )
    engine = QueryEngine.load(config, _paths())
    _loaded(engine)
    conversation = engine.conversation()
    if engine.retriever is not None:
        engine.retriever.preload()  # the verifier and the judge, while the learner types the first question
    typer.echo(
        "Oh-LoRA ML tutor — ask a machine-learning question; follow-ups like 'how is it computed?' stay on the "
        "topic; 'new' starts over (empty line or 'exit' to quit)."
    )
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        # Bytes that are not UTF-8 arrive as lone surrogates instead of ending the loop with UnicodeDecodeError.
        sys.stdin.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    while True:
        try:
            question = input("\nyou> ").strip()
        except EOFError:
            break
        if not question or question.lower() in {"exit", "quit"}:
            break
        if question.lower() in {"new", "/new"}:
            conversation = engine.conversation()
            typer.echo("(new conversation)")
            continue
        try:
            question = check_question(question)
        except UsageError as exc:  # one bad line, not the end of the conversation
            typer.echo(f"error: {exc}", err=True)
            continue
        typer.echo("tutor> ", nl=False)
        answering = engine.stream(question, conversation)
        for piece in answering:
            typer.echo(piece, nl=False)
        typer.echo()
        _print_answer(answering.answer(), streamed=True)


@app.command("serve", cls=_Command)
@friendly
def serve_cmd(
    host: Annotated[str, option(ServeConfig, "host")] = _D.serve.host,
    port: Annotated[int, option(ServeConfig, "port")] = _D.serve.port,
    api_key: Annotated[str | None, option(ServeConfig, "api_key", envvar="OHLORA_API_KEY")] = None,
    cors_origin: Annotated[list[str] | None, option(ServeConfig, "cors_origins")] = None,
    max_batch: Annotated[int, option(ServeConfig, "max_batch")] = _D.serve.max_batch,
    top_k: _TopK = _D.ask.top_k,
    threshold: _Threshold = None,
    max_new_tokens: _MaxNew = _D.ask.max_new_tokens,
    base_llm: _BaseLLM = None,
    adapter: _Adapter = None,
    no_adapter: _NoAdapter = False,
    no_guard: _NoGuard = False,
    dtype: _DType = _D.ask.dtype,
) -> None:
    """Serve the tutor: a web chat page at /, an OpenAI-compatible API at /v1 (chat completions with streaming,
    models, search), /health. Models load once; follow-up questions use the conversation; Ctrl-C or SIGTERM stops
    after the answers in flight."""
    configure_threads("serve")  # a server owns the machine: briefly spinning OpenMP threads serve it faster
    from .engine import QueryEngine
    from .server import serve

    config = ServeConfig(
        host=host, port=port, api_key=api_key, cors_origins=tuple(cors_origin or ()), max_batch=max_batch
    )
    ask = _ask_config(top_k, threshold, max_new_tokens, 0.0, 0, base_llm, adapter, no_adapter, no_guard, dtype)
    paths = _paths()

    def load() -> QueryEngine:
        engine = QueryEngine.load(ask, paths, batch=config.max_batch)
        if engine.notice:
            typer.echo(f"notice: {engine.notice}", err=True)
        typer.echo(f"ready (models loaded in {engine.load_seconds:.1f}s)", err=True)
        return engine

    serve(config, load, lambda line: typer.echo(line, err=True))


_EVAL_DATA = Path("data/sft_dev.csv")


@app.command("evaluate-answers", cls=_Command)
@friendly
def evaluate_answers_cmd(
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            help="SFT dev file(s): user_question, rag_retrieved_data, output_message; repeat for several "
            "(default: data/sft_dev.csv under --home).",
        ),
    ] = None,
    full_pipeline: Annotated[
        bool, typer.Option("--full-pipeline", help="Start from the question alone (retrieval + threshold included).")
    ] = False,
    verify_entries: Annotated[
        bool,
        typer.Option(
            "--verify-entries",
            help="Check each row's entry with the index's entry verifier first; one it rejects is answered as no "
            "information (the answer path's check of a wrong entry).",
        ),
    ] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N rows.")] = None,
    top_k: _TopK = _D.ask.top_k,
    threshold: _Threshold = None,
    max_new_tokens: _MaxNew = _D.ask.max_new_tokens,
    base_llm: _BaseLLM = None,
    adapter: _Adapter = None,
    no_adapter: _NoAdapter = False,
    dtype: _DType = _D.ask.dtype,
    runtime: _Runtime = _D.ask.runtime,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Generate an answer per row: abstention accuracy on no-information rows, grounding, ROUGE-L."""
    configure_threads()  # one question at a time: set before torch is imported
    from .answers import evaluate_answers
    from .data import SftRows, load_sft_files
    from .engine import QueryEngine

    paths = _paths()
    files = (
        [d if d.is_absolute() or d.exists() else paths.home / d for d in data] if data else [paths.home / _EVAL_DATA]
    )
    rows = load_sft_files(files, split=None)
    if limit is not None:
        rows = SftRows(rows.path, rows.questions[:limit], rows.entries[:limit], rows.answers[:limit])
    config = _ask_config(
        top_k,
        threshold,
        max_new_tokens,
        0.0,
        0,
        base_llm,
        adapter,
        no_adapter,
        no_guard=True,
        dtype=dtype,
        runtime=runtime,
    )
    retriever = None
    if full_pipeline or verify_entries:  # the index's checks come before the LLM's load
        from .retriever import Retriever

        retriever = Retriever.load(SearchConfig(top_k=config.top_k, threshold=config.threshold), paths)
        if verify_entries and retriever.entry_verifier() is None:
            raise UsageError(
                "--verify-entries: the index uses no entry verifier — run `ohlora-rag build-index` "
                "(without --no-verifier)"
            )
    engine = QueryEngine.load(config, paths, retrieve=retriever is not None, retriever=retriever)
    _loaded(engine)
    choice = engine.generator.choice

    def generate(question: str, entry: str | None) -> str:
        return engine.stream_with(question, entry, verify=verify_entries).answer().answer

    retrieve = None
    if full_pipeline:

        def retrieve(question: str) -> str | None:
            assert engine.retriever is not None
            best = engine.retriever.search(question, top_k).best
            return best.text if best else None

    metrics = evaluate_answers(generate, rows, retrieve)
    if as_json:
        typer.echo(
            json.dumps(
                {"model": choice.adapter and str(choice.adapter) or choice.base.reference, **metrics.to_dict()},
                ensure_ascii=False,
            )
        )
        return
    model = f"{choice.base.reference} + {choice.adapter}" if choice.adapter else f"{choice.base.reference} (no adapter)"
    typer.echo(
        f"{model} on {rows.path} ({metrics.rows} rows, {metrics.no_info_rows} without information; "
        f"{'full pipeline' if full_pipeline else 'gold entries'})"
    )
    typer.echo(f"  abstention accuracy  {metrics.abstention_accuracy:.3f}")
    typer.echo(f"  false abstention     {metrics.false_abstention:.3f}")
    if metrics.wrong_entry_rows:
        typer.echo(f"  wrong entry declined {metrics.wrong_entry_declined:.3f} ({metrics.wrong_entry_rows} rows)")
    typer.echo(f"  grounding            {metrics.grounding:.3f}")
    typer.echo(f"  ROUGE-L              {metrics.rouge_l:.3f}")
    typer.echo(f"  markup copied        {metrics.markup_copied:.3f}")
    typer.echo(f"  repeated sentence    {metrics.repeated_sentence:.3f}")
    if metrics.retrieval_agreement is not None:
        typer.echo(f"  retrieval agreement  {metrics.retrieval_agreement:.3f}")
    typer.echo(f"  seconds per answer   {metrics.seconds_per_answer:.2f}")


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # `ohlora-rag search ... | head`
        sys.exit(0)
