"""The `ohlora-rag` command line: each command parses its options, builds a config, calls one library function, prints."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .config import Defaults, Paths
from .errors import OhloraError

app = typer.Typer(
    name="ohlora-rag",
    help="Oh-LoRA ML tutor: retrieval-augmented answers to machine-learning questions, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_D = Defaults()
F = TypeVar("F", bound=Callable[..., Any])


class _State:
    home: str | None = None


def _paths() -> Paths:
    return Paths.resolve(_State.home)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly(func: F) -> F:
    """Library errors become one line on stderr and a non-zero exit; Ctrl-C exits 130 without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OhloraError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    home: Annotated[
        str | None,
        typer.Option("--home", help="Folder holding data/, index/, models/ [default: $OHLORA_HOME, else the current folder]."),
    ] = None,
) -> None:
    _State.home = home


@app.command("build-index")
@friendly
def build_index_cmd(
    db: Annotated[Path | None, typer.Option("--db", help="Concept DB (.txt/.csv/.parquet) [default: data/concepts.csv].")] = None,
    encoder: Annotated[
        str | None,
        typer.Option("--encoder", help="Encoder: folder, built-in alias or hub id [default: models/sbert/ if trained, else multilingual-e5-small]."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per encoder batch.")] = _D.index.batch_size,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Encode the concept DB and publish an exact inner-product Faiss index under index/."""
    from .config import IndexConfig
    from .indexing import build_index

    report = build_index(IndexConfig(db=db, encoder=encoder, batch_size=batch_size, progress=not quiet), _paths())
    m = report.manifest
    where = "GPU" if report.on_gpu else "CPU"
    typer.echo(
        f"indexed {m.count} entries from {m.db} with {m.encoder} (dim {m.dim}, {where}) "
        f"in {report.total_seconds:.1f}s (encoding {report.encode_seconds:.1f}s) -> {report.folder}"
    )


@app.command("search")
@friendly
def search_cmd(
    question: Annotated[str, typer.Argument(help="The question.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Entries to show.")] = _D.search.top_k,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Cosine below which nothing counts as a match [default: calibrated, else 0.5]."),
    ] = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="Encoder to query with [default: the one build-index uses].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Retrieve the concept entries closest to a question (retrieval only, no LLM)."""
    from .config import SearchConfig
    from .retriever import Retriever, check_question

    config = SearchConfig(top_k=top_k, threshold=threshold, encoder=encoder)
    question = check_question(question)  # before loading any model
    result = Retriever.load(config, _paths()).search(question, top_k)
    if as_json:
        payload = {
            "question": result.question,
            "threshold": result.threshold,
            "matched": result.best is not None,
            "hits": [
                {"id": h.id, "score": round(h.score, 6), "matched": h.matched, "text": h.text, "metadata": h.metadata}
                for h in result.hits
            ],
            "seconds": round(result.seconds, 6),
        }
        typer.echo(json.dumps(payload, ensure_ascii=False))
        return
    for rank, hit in enumerate(result.hits, start=1):
        mark = "" if hit.matched else "  (below threshold)"
        typer.echo(f"{rank}. [{hit.score:.3f}] {hit.id}{mark}\n   {hit.text}")
    if result.best is None:
        typer.echo(f"no matching information: best score below the threshold {result.threshold:.2f}")


def _print_report(name: str, report: Any) -> None:
    p, r, c = report.pairs, report.ranking, report.calibration
    cells = [f"{p.mse:.4f}", f"{p.mae:.4f}", f"{p.pearson:.4f}", f"{p.spearman:.4f}"]
    cells += [f"{r.recall_at_1:.3f}", f"{r.recall_at_5:.3f}", f"{r.mrr_at_10:.3f}"] if r else ["-", "-", "-"]
    cells += [f"{c.threshold:.3f}", f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.coverage:.3f}"] if c else ["-"] * 4
    typer.echo(f"{name:<28}" + "".join(f"{x:>10}" for x in cells))


_REPORT_HEADER = f"{'model':<28}" + "".join(
    f"{h:>10}" for h in ("MSE", "MAE", "Pearson", "Spearman", "R@1", "R@5", "MRR@10", "threshold", "precision", "recall", "coverage")
)


@app.command("train-sbert")
@friendly
def train_sbert_cmd(
    data: Annotated[Path, typer.Option("--data", help="Pairs CSV/Parquet: user_question, rag_retrieved_data, similarity_score.")] = _D.sbert.data,
    valid: Annotated[Path | None, typer.Option("--valid", help="Validation pairs [default: a seeded 10 % split by question].")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Encoder to start from [default: multilingual-e5-small].")] = None,
    epochs: Annotated[int, typer.Option("--epochs")] = _D.sbert.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size")] = _D.sbert.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = _D.sbert.learning_rate,
    loss: Annotated[str, typer.Option("--loss", help="cosine (the seed's CosineSimilarityLoss) | cosent | mnrl.")] = _D.sbert.loss,
    seed: Annotated[int, typer.Option("--seed")] = _D.sbert.seed,
    max_seq_length: Annotated[int, typer.Option("--max-seq-length")] = _D.sbert.max_seq_length,
    train_embeddings: Annotated[bool, typer.Option("--train-embeddings", help="Also update the word-embedding matrix (slow on CPU).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder [default: models/sbert].")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Fine-tune the S-BERT encoder on (question, entry, score) pairs; build-index then uses it."""
    from .config import SbertTrainConfig
    from .training.sbert import train_sbert

    config = SbertTrainConfig(
        data=data, valid=valid, base=base, epochs=epochs, batch_size=batch_size, learning_rate=lr, loss=loss, seed=seed,
        max_seq_length=max_seq_length, freeze_embeddings=not train_embeddings, resume=resume, out=out, progress=not quiet,
    )
    result = train_sbert(config, _paths())
    typer.echo(
        f"trained on {result.train_pairs} pairs ({result.steps} steps, {result.pairs_per_second:.1f} pairs/s, "
        f"{result.seconds:.0f}s); validated on {result.valid_pairs} pairs -> {result.out}"
    )
    typer.echo(_REPORT_HEADER)
    _print_report("fine-tuned (valid split)", result.report)
    typer.echo("next: ohlora-rag build-index")


@app.command("evaluate-retrieval")
@friendly
def evaluate_retrieval_cmd(
    pairs: Annotated[Path, typer.Option("--pairs", help="Pairs CSV/Parquet to measure on (all rows are used).")],
    model: Annotated[str | None, typer.Option("--model", help="Encoder to measure [default: models/sbert/ if trained].")] = None,
    db: Annotated[Path | None, typer.Option("--db", help="DB to rank against [default: the entries of the pairs file].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Pair metrics (MSE, MAE, Pearson, Spearman), ranking (R@1, R@5, MRR@10) and the calibrated threshold:
    the base encoder and the fine-tuned one side by side."""
    from .config import DEFAULT_ENCODER
    from .data import load_concepts, load_pairs
    from .encoder import Encoder
    from .evaluate import evaluate_retrieval
    from .models import choose_encoder, read_manifest, resolve

    paths = _paths()
    data = load_pairs(pairs, split=None)
    db_texts = load_concepts(db).texts if db else None
    tuned = choose_encoder(model, paths)
    base_ref = str((read_manifest(tuned.path) or {}).get("base") or DEFAULT_ENCODER)
    refs = {"base": resolve(base_ref, "encoder", paths)}
    if tuned.path != refs["base"].path:
        refs["fine-tuned"] = tuned
    reports = {name: evaluate_retrieval(Encoder(ref), data, db_texts) for name, ref in refs.items()}
    if as_json:
        payload = {name: {"model": refs[name].reference, **rep.to_dict()} for name, rep in reports.items()}
        typer.echo(json.dumps(payload, ensure_ascii=False))
        return
    typer.echo(_REPORT_HEADER)
    for name, rep in reports.items():
        _print_report(f"{name}: {Path(refs[name].reference).name}"[:27], rep)


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # `ohlora-rag search ... | head`
        sys.exit(0)
