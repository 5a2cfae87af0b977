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


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # `ohlora-rag search ... | head`
        sys.exit(0)
